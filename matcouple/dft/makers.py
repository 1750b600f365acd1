"""atomate2 ASE makers for GPAW at matcouple's presets, for use in your own jobflow flows.

``GpawRelaxMaker(preset="fast").make(structure)`` is a jobflow Job like atomate2's
``EmtRelaxMaker``: same GPAW settings as :class:`matcouple.dft.gpaw_engine.GpawEngine`, so
its energies are on the scale of matcouple's ``gpaw/PBE/<preset>`` results and references.
matcouple's own workflows use the engine directly (for its retries and references).
Needs the ``[vasp]`` extra (atomate2, jobflow) next to ``[dft]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from atomate2.ase.jobs import AseRelaxMaker

from matcouple.dft.presets import gpaw_preset


def gpaw_calculator(preset: str, *, static: bool = False, spinpol: bool = False):
    """The GPAW calculator matcouple uses at ``preset`` (relax or static k-mesh)."""
    from gpaw import GPAW, PW, Mixer, MixerSum

    p = gpaw_preset(preset)
    mixer = (MixerSum if spinpol else Mixer)(beta=p.mixing_beta, nmaxold=p.mixing_history,
                                               weight=50.0)
    kwargs = dict(
        mode=PW(p.ecut_ev, dedecut="estimate"), xc="PBE",
        kpts={"density": p.static_kpt_density if static else p.kpt_density, "gamma": True},
        spinpol=spinpol, occupations={"name": "fermi-dirac", "width": p.smearing_ev},
        convergence={"energy": p.scf_energy_tol}, mixer=mixer, maxiter=p.scf_maxiter,
        txt=None,
    )
    if static:
        kwargs["nbands"] = p.static_nbands
    return GPAW(**kwargs)


@dataclass
class GpawRelaxMaker(AseRelaxMaker):
    """Relax cell and positions with GPAW (space group kept) at a matcouple preset."""

    name: str = "GPAW relaxation"
    preset: str = "fast"
    fix_symmetry: bool = True
    symprec: float | None = 1e-3
    spinpol: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        p = gpaw_preset(self.preset)
        self.steps = p.max_steps if self.steps == AseRelaxMaker.steps else self.steps
        self.relax_kwargs = {"fmax": p.fmax, **self.relax_kwargs}

    def _get_calculator(self):
        return gpaw_calculator(self.preset, spinpol=self.spinpol)


@dataclass
class GpawStaticMaker(GpawRelaxMaker):
    """A single-point GPAW calculation on the preset's static k-mesh."""

    name: str = "GPAW static"
    relax_cell: bool = False
    fix_symmetry: bool = False
    steps: int = 1

    def _get_calculator(self):
        return gpaw_calculator(self.preset, static=True, spinpol=self.spinpol)
