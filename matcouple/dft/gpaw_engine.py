"""GPAW through ASE: the open engine that runs anywhere ``pip install gpaw`` builds.

Plane-wave PBE with GPAW's PAW setups (PyPI ``gpaw-data``, the same files as Debian's
``gpaw-data``, plus the lanthanides; ``$GPAW_SETUP_PATH`` is searched first). A relaxation
moves cell and atoms together (ASE's ``FrechetCellFilter``) while keeping the space group
(``FixSymmetry``, as VASP's symmetrisation does), then a static run on a denser k-mesh
gives the energy and the band gap on that mesh.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from matcouple.dft.engine import DFTEngine, DFTResult, ReferenceResult
from matcouple.dft.errors import (
    EngineUnavailableError,
    RelaxNotConvergedError,
    SCFNotConvergedError,
    UnsupportedElementError,
    WalltimeError,
)
from matcouple.dft.presets import GPAW_PRESETS, GpawPreset, gpaw_preset
from matcouple.dft.references import reference_phase
from matcouple.structures.io import structure_from_atoms as _structure

# Initial moments (mu_B) of the Materials Project input sets for elements that are often
# magnetic; a structure containing one of them is computed spin-polarised.
MAGNETIC_ELEMENTS = {
    "Ce": 5, "Co": 5, "Cr": 5, "Eu": 10, "Fe": 5, "Gd": 7, "Mn": 5, "Mo": 5, "Ni": 5,
    "V": 5, "W": 5, "Dy": 5, "Er": 3, "Ho": 4, "Nd": 3, "Pm": 4, "Pr": 2, "Sm": 5, "Tb": 6,
    "Tm": 2, "Yb": 1,
}


def setup_paths() -> list[Path]:
    """Where GPAW looks for PAW setups ($GPAW_SETUP_PATH first, then gpaw-data)."""
    try:
        import gpaw
    except ImportError as exc:
        raise EngineUnavailableError(
            "GPAW is not installed: `pip install 'matcouple[dft]'` (needs the Debian packages "
            "libxc-dev libopenblas-dev libfftw3-dev libopenmpi-dev; `make sysdeps` installs "
            f"them). Import error: {exc}"
        ) from exc
    return [Path(p) for p in gpaw.setup_paths]


def missing_setups(elements: Iterable[str], xc: str = "PBE") -> list[str]:
    paths = setup_paths()
    return sorted(
        el for el in set(elements)
        if not any((p / f"{el}.{xc}{ext}").exists() for p in paths for ext in (".gz", ""))
    )


def _atoms(structure: Structure, magmoms: list[float] | None = None):
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(structure)
    if magmoms is not None:
        atoms.set_initial_magnetic_moments(magmoms)
    return atoms


def _calculator(preset: GpawPreset, *, kpts: Any, spinpol: bool, txt: Path,
                nbands: str | None = None):
    from gpaw import GPAW, PW, Mixer, MixerSum

    mixer = (MixerSum if spinpol else Mixer)(beta=preset.mixing_beta,
                                               nmaxold=preset.mixing_history, weight=50.0)
    kwargs: dict[str, Any] = dict(
        mode=PW(preset.ecut_ev, dedecut="estimate"), xc="PBE", kpts=kpts, spinpol=spinpol,
        occupations={"name": "fermi-dirac", "width": preset.smearing_ev},
        convergence={"energy": preset.scf_energy_tol}, mixer=mixer,
        maxiter=preset.scf_maxiter, txt=str(txt),
    )
    if nbands:
        kwargs["nbands"] = nbands
    return GPAW(**kwargs)


def _kpts(density: float, molecule: bool) -> Any:
    return (1, 1, 1) if molecule else {"density": density, "gamma": True}


def _energy(atoms, what: str) -> float:
    from gpaw import KohnShamConvergenceError

    try:
        return float(atoms.get_potential_energy())
    except KohnShamConvergenceError as exc:
        raise SCFNotConvergedError(
            f"GPAW {what}: SCF did not converge ({exc})",
            structure=_structure(atoms).as_dict()) from exc


class GpawEngine(DFTEngine):
    """Relax + static with GPAW; presets in :data:`matcouple.dft.presets.GPAW_PRESETS`."""

    name = "gpaw"

    def preset_names(self) -> list[str]:
        return list(GPAW_PRESETS)

    def energy_settings(self, preset: str) -> dict[str, Any]:
        import gpaw

        return {**gpaw_preset(preset).energy_settings, "code": f"gpaw {gpaw.__version__}",
                "xc": self.xc, "mode": "pw", "spin": "MP moments for magnetic elements"}

    def check_available(self) -> None:
        setup_paths()

    def check_elements(self, elements: Iterable[str]) -> None:
        missing = missing_setups(elements, self.xc)
        if missing:
            searched = ", ".join(str(p) for p in setup_paths())
            raise UnsupportedElementError(
                f"GPAW has no {self.xc} PAW setup for {', '.join(missing)} (searched {searched})."
                " Install the PyPI package gpaw-data or Debian's gpaw-data, or generate one with "
                "`gpaw-setup -f PBE <element>` and add its folder to GPAW_SETUP_PATH."
            )

    # ------------------------------------------------------------------ calculations
    def relax_static(self, structure: Structure, preset: str, *, workdir: Path,
                     retry: Mapping[str, Any] | None = None,
                     walltime_s: float | None = None) -> DFTResult:
        self.check_elements(structure.composition.chemical_system.split("-"))
        settings = gpaw_preset(preset).with_overrides(**dict(retry or {}))
        magmoms = [float(MAGNETIC_ELEMENTS.get(site.specie.symbol, 0.0)) for site in structure]
        return self._run(structure, settings, preset, workdir=Path(workdir),
                         magmoms=magmoms, molecule=False, walltime_s=walltime_s)

    def reference(self, element: str, preset: str, *, workdir: Path) -> ReferenceResult:
        self.check_elements([element])
        settings = gpaw_preset(preset)
        phase = reference_phase(element, settings.molecule_box)
        moment = phase.magmom_per_atom or float(MAGNETIC_ELEMENTS.get(element, 0.0))
        result = self._run(phase.structure, settings, preset, workdir=Path(workdir) / element,
                           magmoms=[moment] * len(phase.structure), molecule=phase.molecule,
                           walltime_s=None, with_gap=False)
        return ReferenceResult(element=element, energy_per_atom=result.energy_per_atom,
                               structure=result.structure, structure_source=phase.source,
                               timings=result.timings)

    def _run(self, structure: Structure, settings: GpawPreset, preset: str, *, workdir: Path,
             magmoms: list[float], molecule: bool, walltime_s: float | None,
             with_gap: bool = True) -> DFTResult:
        workdir.mkdir(parents=True, exist_ok=True)
        spinpol = any(abs(m) > 0 for m in magmoms)
        start = time.monotonic()
        atoms, nsteps = self._relax(structure, settings, workdir, magmoms, spinpol, molecule,
                                    start, walltime_s)
        relaxed_at = time.monotonic()
        atoms.calc = _calculator(settings, kpts=_kpts(settings.static_kpt_density, molecule),
                                 spinpol=spinpol, txt=workdir / "static.txt",
                                 nbands=settings.static_nbands if with_gap else None)
        energy = _energy(atoms, "static")
        gap = self._band_gap(atoms.calc) if with_gap else None
        moment = float(atoms.calc.get_magnetic_moment()) if spinpol else 0.0
        done = time.monotonic()
        return DFTResult(
            structure=_structure(atoms), energy=energy, engine=self.name, preset=preset,
            fidelity=self.fidelity(preset), band_gap=gap, magnetic_moment=moment,
            n_ionic_steps=nsteps,
            timings={"relax_s": relaxed_at - start, "static_s": done - relaxed_at,
                     "total_s": done - start},
            details={"ecut_ev": settings.ecut_ev, "kpt_density": settings.kpt_density,
                     "static_kpt_density": settings.static_kpt_density,
                     "smearing_ev": settings.smearing_ev, "mixing_beta": settings.mixing_beta,
                     "scf_maxiter": settings.scf_maxiter, "max_steps": settings.max_steps,
                     "fmax": settings.fmax, "spinpol": spinpol,
                     "kpts_static": [int(k) for k in atoms.calc.wfs.kd.N_c]},
        )

    @staticmethod
    def _relax(structure: Structure, settings: GpawPreset, workdir: Path,
               magmoms: list[float], spinpol: bool, molecule: bool, start: float,
               walltime_s: float | None):
        from ase.constraints import FixSymmetry
        from ase.filters import FrechetCellFilter
        from ase.optimize import BFGS

        atoms = _atoms(structure, magmoms)
        atoms.calc = _calculator(settings, kpts=_kpts(settings.kpt_density, molecule),
                                 spinpol=spinpol, txt=workdir / "relax.txt")
        if not molecule:
            atoms.set_constraint(FixSymmetry(atoms, symprec=1e-3))
        target = atoms if molecule else FrechetCellFilter(atoms)
        opt = BFGS(target, logfile=str(workdir / "relax.log"))
        converged = False
        try:
            for converged in opt.irun(fmax=settings.fmax, steps=settings.max_steps):
                if walltime_s and time.monotonic() - start > walltime_s and not converged:
                    raise WalltimeError(
                        f"GPAW relax stopped after {opt.nsteps} steps at the walltime of "
                        f"{walltime_s:.0f} s", structure=_structure(atoms).as_dict(),
                        steps_done=opt.nsteps)
        except Exception as exc:
            from gpaw import KohnShamConvergenceError

            if isinstance(exc, KohnShamConvergenceError):
                raise SCFNotConvergedError(
                    f"GPAW relax step {opt.nsteps}: SCF did not converge in "
                    f"{settings.scf_maxiter} iterations", structure=_structure(atoms).as_dict(),
                    steps_done=opt.nsteps) from exc
            raise
        if not converged:
            raise RelaxNotConvergedError(
                f"GPAW relax not converged to fmax {settings.fmax} eV/A in "
                f"{settings.max_steps} steps", structure=_structure(atoms).as_dict(),
                steps_done=opt.nsteps)
        atoms.set_constraint()
        return atoms, int(opt.nsteps)

    @staticmethod
    def _band_gap(calc) -> float:
        from ase.dft.bandgap import bandgap

        gap, _, _ = bandgap(calc)
        return float(gap)
