"""What to change when a DFT calculation fails: the usual fixes, escalated per attempt.

- SCF not converged: gentler density mixing (half the step, longer history), wider
  smearing (smooths occupations of near-degenerate states), more SCF iterations.
- Relaxation not converged: twice the ionic steps, continuing from the last geometry.
- Walltime reached: continue from the last geometry with the same settings.

VASP jobs get the same treatment from custodian's handlers inside the job (atomate2's
default), so these rules serve the engines that have no custodian (GPAW).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matcouple.dft.presets import GpawPreset

MAX_SMEARING_EV = 0.2
MIN_MIXING_BETA = 0.01


def escalate(kind: str, preset: GpawPreset, retry: Mapping[str, Any] | None) -> dict[str, Any]:
    """The overrides of the next attempt after a failure of ``kind``."""
    current = preset.with_overrides(**dict(retry or {}))
    changes: dict[str, Any] = dict(retry or {})
    if kind == "scf_not_converged":
        changes.update(
            mixing_beta=max(MIN_MIXING_BETA, current.mixing_beta / 2),
            mixing_history=current.mixing_history + 3,
            smearing_ev=min(MAX_SMEARING_EV, current.smearing_ev * 2),
            scf_maxiter=current.scf_maxiter * 2,
        )
    elif kind == "relax_not_converged":
        changes.update(max_steps=current.max_steps * 2)
    elif kind != "walltime":
        raise ValueError(f"no retry rule for a failure of kind {kind!r}")
    return changes


def failure_record(exc: Any, attempt: int, retry: Mapping[str, Any] | None) -> dict[str, Any]:
    """What one failed attempt leaves in the history (a :class:`DFTCalculationError`)."""
    return {"attempt": attempt, "kind": exc.kind, "message": str(exc),
            "steps_done": exc.steps_done, "retry": dict(retry or {})}


def may_retry(engine: str, attempt: int, max_attempts: int | None = None) -> bool:
    """Whether attempt ``attempt`` may be followed by another: GPAW only (VASP has
    custodian inside the job), up to ``Settings.dft_max_attempts``."""
    from matcouple.settings import get_settings

    return engine == "gpaw" and attempt < (max_attempts or get_settings().dft_max_attempts)


def gave_up_message(failures: list[dict[str, Any]]) -> str:
    """The error of the last attempt, with the whole history."""
    history = "; ".join(f"#{f['attempt']} {f['kind']}: {f['message']}" for f in failures)
    return f"gave up after {failures[-1]['attempt']} attempt(s): {history}"
