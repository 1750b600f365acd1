"""DFT failures, each named so a workflow can record it and choose the retry that fixes it."""

from __future__ import annotations

from typing import Any

from matcouple.errors import MatcoupleError


class UnsupportedElementError(MatcoupleError):
    """The engine has no pseudopotential/PAW data (or reference phase) for an element."""


class EngineUnavailableError(MatcoupleError):
    """The DFT code itself is not installed or cannot run here."""


class UnknownPresetError(MatcoupleError, ValueError):
    """A preset name that the engine does not define."""


class DFTCalculationError(MatcoupleError):
    """A calculation stopped before its result was usable.

    ``kind`` is what went wrong (``scf_not_converged``, ``relax_not_converged``,
    ``walltime``); ``structure`` is the last geometry reached (a pymatgen dict), so a
    retry can continue from it instead of starting over.
    """

    kind = "failed"

    def __init__(self, message: str, structure: dict[str, Any] | None = None,
                 steps_done: int = 0) -> None:
        super().__init__(message)
        self.structure = structure
        self.steps_done = steps_done


class SCFNotConvergedError(DFTCalculationError):
    kind = "scf_not_converged"


class RelaxNotConvergedError(DFTCalculationError):
    kind = "relax_not_converged"


class WalltimeError(DFTCalculationError):
    kind = "walltime"
