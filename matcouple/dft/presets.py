"""Named levels of DFT settings: ``fast`` for CI and demos, ``standard`` for production.

A preset fixes everything that changes an energy (cutoff, k-point density, smearing,
convergence), so results and elemental references computed with the same preset are on
one scale and carry one fidelity tag. The retry fields (mixing, SCF iterations, ionic
steps) do not change the converged answer and may be escalated by a retry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from matcouple.dft.errors import UnknownPresetError


@dataclass(frozen=True)
class GpawPreset:
    """Plane-wave PBE settings for GPAW (energies in eV, lengths in Angstrom)."""

    name: str
    ecut_ev: float
    # k-points per reciprocal Angstrom along each reciprocal vector (ASE's ``density``).
    kpt_density: float
    static_kpt_density: float
    smearing_ev: float
    scf_energy_tol: float  # eV per valence electron
    fmax: float  # eV/A, also applied to the stress through the cell filter
    max_steps: int
    scf_maxiter: int = 300
    mixing_beta: float = 0.05
    mixing_history: int = 5
    # Vacuum around isolated molecules (gas-phase references).
    molecule_box: float = 9.0
    # Bands in the static relative to occupied ones, so a gap has a conduction band.
    static_nbands: str = "130%"

    @property
    def energy_settings(self) -> dict[str, Any]:
        """The fields that change the converged energy: they define the fidelity."""
        return {k: v for k, v in asdict(self).items()
                if k in {"ecut_ev", "kpt_density", "static_kpt_density", "smearing_ev",
                         "scf_energy_tol", "molecule_box"}}

    def with_overrides(self, **changes: Any) -> GpawPreset:
        unknown = set(changes) - set(asdict(self))
        if unknown:
            raise UnknownPresetError(f"unknown GPAW setting(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)


GPAW_PRESETS: dict[str, GpawPreset] = {
    # Seconds per small cell; lattices of sp semiconductors within ~0.5%. Too low a cutoff
    # for first-row anions (O, N, F): their lattices come out a few % small.
    "fast": GpawPreset(name="fast", ecut_ev=500.0, kpt_density=2.0, static_kpt_density=2.5,
                       smearing_ev=0.05, scf_energy_tol=5e-4, fmax=0.05, max_steps=60),
    # Converged for oxides and nitrides too (MgO a within 0.2% of the 1000 eV value).
    "standard": GpawPreset(name="standard", ecut_ev=800.0, kpt_density=3.5,
                           static_kpt_density=4.5, smearing_ev=0.05, scf_energy_tol=1e-4,
                           fmax=0.02, max_steps=200),
}


def gpaw_preset(name: str) -> GpawPreset:
    try:
        return GPAW_PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r} for gpaw; choose one of {', '.join(GPAW_PRESETS)}"
        ) from None


@dataclass(frozen=True)
class VaspPreset:
    """How far the atomate2/Materials Project input sets are loosened for a quick look."""

    name: str
    # None keeps the MP input set's own k-point density (MP-compatible results).
    relax_reciprocal_density: int | None
    static_reciprocal_density: int | None
    ediff: float | None  # None keeps MP's EDIFF
    mp_compatible: bool


VASP_PRESETS: dict[str, VaspPreset] = {
    "fast": VaspPreset(name="fast", relax_reciprocal_density=32, static_reciprocal_density=50,
                       ediff=1e-4, mp_compatible=False),
    # The Materials Project settings unchanged: results are on MP's scale (MP2020).
    "standard": VaspPreset(name="standard", relax_reciprocal_density=None,
                           static_reciprocal_density=None, ediff=None, mp_compatible=True),
}


def vasp_preset(name: str) -> VaspPreset:
    try:
        return VASP_PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r} for vasp; choose one of {', '.join(VASP_PRESETS)}"
        ) from None
