"""Guarded MLIP pre-relaxation of generated crystals, before the surrogate judges them.

A diffusion sample is an unrelaxed cell; Crysformer learned relaxed MP structures, so its
sigma on raw samples is large and the confidence policy sends everything to DFT. A cheap
relaxation with a universal interatomic potential (CHGNet, weights in its wheel) moves a
sample towards the structures the surrogate knows. Unguarded, CHGNet's cell relaxation of
raw samples collapsed two of three NaCl cells to 5-20% of their volume, so it runs in two
stages, both keeping the space group (ASE ``FixSymmetry``, as the DFT relaxations do):

1. atoms only, cell fixed;
2. atoms and cell (``FrechetCellFilter``), abandoned the moment the volume leaves
   ``volume_bounds`` (relative to the input) or two atoms come closer than
   ``min_distance``; the stage-1 structure is then kept.

The result says which stage it came from, so a design run reports what happened.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymatgen.core import Structure

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.structures.io import structure_from_atoms

ENGINES = ("none", "chgnet")


class PreRelaxError(MatcoupleError):
    """The pre-relaxation engine is missing or was asked for something it cannot do."""


@dataclass(frozen=True)
class PreRelaxResult:
    """One structure after pre-relaxation and what the guards decided."""

    structure: Structure
    stage: str  # "cell" (both stages kept), "positions" (stage 2 rejected), "input"
    volume_ratio: float  # final volume / input volume
    energy_per_atom: float | None  # the potential's, eV/atom (not a formation energy)
    steps: int
    seconds: float
    reason: str = ""  # why stage 2 (or everything) was not kept

    def summary(self) -> dict[str, Any]:
        return {"stage": self.stage, "volume_ratio": round(self.volume_ratio, 4),
                "energy_per_atom": self.energy_per_atom, "steps": self.steps,
                "seconds": round(self.seconds, 2), "reason": self.reason}


@functools.lru_cache(maxsize=1)
def _chgnet_calculator():
    try:
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError as exc:
        raise PreRelaxError("pre-relaxation with CHGNet needs the `chgnet` package: "
                            "pip install 'matcouple[mlip]' (or use --prerelax none)") from exc
    return CHGNetCalculator(use_device="cpu", check_cuda_mem=False)


def _min_distance(atoms) -> float:
    if len(atoms) < 2:
        cell = np.asarray(atoms.get_cell())
        return float(np.min(np.linalg.norm(cell, axis=1)))
    d = atoms.get_all_distances(mic=True)
    return float(d[np.triu_indices(len(atoms), 1)].min())


@dataclass
class PreRelaxMaker:
    """Settings of one pre-relaxation (atomate2-style: a dataclass that makes the result)."""

    name: str = "chgnet pre-relax"
    fmax: float = field(default_factory=lambda: get_settings().prerelax_fmax)
    position_steps: int = field(default_factory=lambda: get_settings().prerelax_position_steps)
    cell_steps: int = field(default_factory=lambda: get_settings().prerelax_cell_steps)
    volume_bounds: tuple[float, float] = field(
        default_factory=lambda: tuple(get_settings().prerelax_volume_bounds))
    min_distance: float = field(default_factory=lambda: get_settings().prerelax_min_distance)
    symprec: float = 1e-3
    maxstep: float = 0.1  # A per BFGS step (ASE's default 0.2 let raw cells run away)

    def relax(self, structure: Structure) -> PreRelaxResult:
        """Both stages on one structure; never raises for a bad geometry (it says so)."""
        from ase.constraints import FixSymmetry
        from ase.filters import FrechetCellFilter
        from ase.optimize import BFGS
        from pymatgen.io.ase import AseAtomsAdaptor

        start = time.monotonic()
        calc = _chgnet_calculator()
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = calc
        atoms.set_constraint(FixSymmetry(atoms, symprec=self.symprec))
        v0 = float(atoms.get_volume())
        opt = BFGS(atoms, logfile=None, maxstep=self.maxstep)
        for _ in opt.irun(fmax=self.fmax, steps=self.position_steps):
            if _min_distance(atoms) < self.min_distance:
                return PreRelaxResult(structure, "input", 1.0, None, opt.nsteps,
                                      time.monotonic() - start,
                                      f"atoms closer than {self.min_distance} A at fixed cell")
        steps = opt.nsteps
        stage1 = structure_from_atoms(atoms)
        e1 = float(atoms.get_potential_energy()) / len(atoms)
        low, high = self.volume_bounds
        reason = ""
        opt = BFGS(FrechetCellFilter(atoms), logfile=None, maxstep=self.maxstep)
        for _ in opt.irun(fmax=self.fmax, steps=self.cell_steps):
            ratio = float(atoms.get_volume()) / v0
            if not low <= ratio <= high:
                reason = f"cell stage left the volume bounds ({ratio:.2f} x the input)"
                break
            if _min_distance(atoms) < self.min_distance:
                reason = f"cell stage brought atoms closer than {self.min_distance} A"
                break
        steps += opt.nsteps
        if reason:
            return PreRelaxResult(stage1, "positions", stage1.volume / v0, e1, steps,
                                  time.monotonic() - start, reason)
        final = structure_from_atoms(atoms)
        energy = float(atoms.get_potential_energy()) / len(atoms)
        return PreRelaxResult(final, "cell", final.volume / v0, energy, steps,
                              time.monotonic() - start)


def prerelax_structures(structures: list[Structure], engine: str,
                        maker: PreRelaxMaker | None = None) -> list[PreRelaxResult]:
    """Pre-relax each structure with ``engine`` ("none" returns them unchanged)."""
    if engine not in ENGINES:
        raise PreRelaxError(f"unknown pre-relaxation engine {engine!r}; choose one of "
                            f"{', '.join(ENGINES)}")
    if engine == "none":
        return [PreRelaxResult(s, "input", 1.0, None, 0, 0.0, "pre-relaxation off")
                for s in structures]
    maker = maker or PreRelaxMaker()
    return [maker.relax(s) for s in structures]
