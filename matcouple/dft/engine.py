"""The one DFT engine interface: relax + static of a structure at a named preset.

Everything else (workflows, CLI, benchmarks, the coupling loop) talks to an engine only
through :class:`DFTEngine` and gets a :class:`DFTResult` back, so a GPAW result computed
here and a VASP result computed on a cluster are stored and compared the same way: each
with its own fidelity tag.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pymatgen.core import Composition, Structure

from matcouple.dft.errors import EngineUnavailableError


@dataclass
class DFTResult:
    """A relaxed structure with its static energies, band gap and provenance."""

    structure: Structure
    energy: float  # eV, total energy of the cell from the static calculation
    engine: str
    preset: str
    fidelity: str
    band_gap: float | None = None  # eV; None when the engine gives none
    formation_energy_per_atom: float | None = None  # eV/atom vs. the engine's references
    magnetic_moment: float | None = None  # Bohr magnetons per cell
    n_ionic_steps: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds: relax, static, ...
    details: dict[str, Any] = field(default_factory=dict)  # engine settings actually used

    @property
    def energy_per_atom(self) -> float:
        return self.energy / len(self.structure)

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["structure"] = self.structure.as_dict()
        data["energy_per_atom"] = self.energy_per_atom
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DFTResult:
        values = {k: v for k, v in data.items() if k != "energy_per_atom"}
        structure = values["structure"]
        values["structure"] = (structure if isinstance(structure, Structure)
                               else Structure.from_dict(structure))
        return cls(**values)


@dataclass(frozen=True)
class ReferenceResult:
    """An elemental reference phase computed with an engine and preset."""

    element: str
    energy_per_atom: float
    structure: Structure
    structure_source: str  # where the starting phase came from
    timings: dict[str, float] = field(default_factory=dict)


def formation_energy_per_atom(composition: Composition, energy: float,
                              references: Mapping[str, float]) -> float:
    """(E - sum_i n_i mu_i) / N from total energy and elemental energies per atom."""
    amounts = composition.get_el_amt_dict()
    missing = sorted(set(amounts) - set(references))
    if missing:
        raise KeyError(f"no reference energy for {', '.join(missing)}")
    natoms = sum(amounts.values())
    return (energy - sum(n * references[el] for el, n in amounts.items())) / natoms


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short stable hash of energy-defining settings (keys references by exact settings)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class DFTEngine(ABC):
    """A DFT code behind matcouple: runs relax + static and elemental references."""

    name: str = ""
    xc: str = "PBE"

    @abstractmethod
    def preset_names(self) -> list[str]:
        """The presets this engine defines (``fast``, ``standard``)."""

    @abstractmethod
    def energy_settings(self, preset: str) -> dict[str, Any]:
        """Everything that changes a converged energy at this preset."""

    def fidelity(self, preset: str) -> str:
        """The level-of-theory tag stored on every result (e.g. ``gpaw/PBE/fast``)."""
        return f"{self.name}/{self.xc}/{preset}"

    def source(self, preset: str) -> str:
        """The ``materials`` source name of this engine's results at this preset."""
        return f"{self.name}-{preset}"

    def reference_key(self, preset: str) -> str:
        """Cache key of elemental references: fidelity plus a hash of the exact settings."""
        return f"{self.fidelity(preset)}#{settings_hash(self.energy_settings(preset))}"

    @abstractmethod
    def check_available(self) -> None:
        """Raise :class:`EngineUnavailableError` if the code cannot run here."""

    @abstractmethod
    def check_elements(self, elements: Iterable[str]) -> None:
        """Raise :class:`UnsupportedElementError` naming elements the engine cannot treat."""

    @abstractmethod
    def relax_static(self, structure: Structure, preset: str, *, workdir: Path,
                     retry: Mapping[str, Any] | None = None,
                     walltime_s: float | None = None) -> DFTResult:
        """Relax cell and positions, then a static run; formation energy left unset."""

    @abstractmethod
    def reference(self, element: str, preset: str, *, workdir: Path) -> ReferenceResult:
        """Relax and compute the elemental reference phase of ``element``."""


def get_engine(name: str) -> DFTEngine:
    """The engine called ``name`` (``gpaw`` or ``vasp``)."""
    if name == "gpaw":
        from matcouple.dft.gpaw_engine import GpawEngine

        return GpawEngine()
    if name == "vasp":
        from matcouple.dft.vasp import VaspEngine

        return VaspEngine()
    raise EngineUnavailableError(f"unknown DFT engine {name!r}; choose gpaw or vasp")
