"""Read crystal structures from CIF/POSCAR text or files and refuse the unusable ones.

Every refusal raises :class:`~matcouple.errors.StructureInputError` whose message names
the problem (malformed text, unknown element, empty, huge or degenerate cell, overlapping
atoms), so batch callers can report it per row and carry on.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from pymatgen.core import DummySpecies, Element, Species, Structure

from matcouple.errors import StructureInputError
from matcouple.settings import get_settings

STRUCTURE_SUFFIXES = {".cif", ".vasp", ".poscar"}
STRUCTURE_NAMES = {"POSCAR", "CONTCAR"}
# Two atoms closer than this are the same atom written twice, not chemistry.
OVERLAP_DISTANCE = 0.1


def _unknown_symbols(structure: Structure) -> list[str]:
    bad = set()
    for site in structure:
        for sp in site.species:
            if isinstance(sp, DummySpecies) or not isinstance(sp, Element | Species):
                bad.add(getattr(sp, "symbol", str(sp)))
    return sorted(bad)


def check_structure(structure: Structure) -> Structure:
    """Return the structure if it is a usable ordered crystal, else raise with the reason."""
    settings = get_settings()
    n = len(structure)
    if n == 0:
        raise StructureInputError("empty cell: the structure has no atoms")
    unknown = _unknown_symbols(structure)
    if unknown:
        raise StructureInputError(f"unknown element(s) {', '.join(unknown)}")
    if not structure.is_ordered:
        raise StructureInputError("partial occupancies: only ordered structures are supported")
    if n > settings.max_sites:
        raise StructureInputError(
            f"cell too large: {n} sites exceeds the limit of {settings.max_sites} "
            "(Settings.max_sites)"
        )
    matrix = structure.lattice.matrix
    if not np.all(np.isfinite(matrix)) or not np.all(np.isfinite(structure.frac_coords)):
        raise StructureInputError("lattice or coordinates contain NaN or infinity")
    volume = structure.volume
    if not math.isfinite(volume) or volume <= 1e-6:
        raise StructureInputError(f"degenerate cell: volume {volume:.3g} A^3")
    vpa = volume / n
    if not settings.min_volume_per_atom <= vpa <= settings.max_volume_per_atom:
        raise StructureInputError(
            f"implausible volume per atom {vpa:.3g} A^3 (allowed "
            f"{settings.min_volume_per_atom}-{settings.max_volume_per_atom})"
        )
    if n > 1:
        dmat = structure.distance_matrix
        np.fill_diagonal(dmat, np.inf)
        closest = float(dmat.min())
        if closest < OVERLAP_DISTANCE:
            i, j = np.unravel_index(int(np.argmin(dmat)), dmat.shape)
            raise StructureInputError(
                f"overlapping atoms: sites {i} and {j} are {closest:.3f} A apart"
            )
    return structure


def _parse(text: str, fmt: str) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return Structure.from_str(text, fmt=fmt)
        except Exception as exc:  # pymatgen raises many types for bad text
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StructureInputError(f"malformed {fmt.upper()}: {reason}") from exc


def structure_from_text(text: str, fmt: str = "cif") -> Structure:
    """Parse CIF (``fmt='cif'``) or POSCAR (``fmt='poscar'``) text and check it."""
    if not isinstance(text, str) or not text.strip():
        raise StructureInputError(f"empty {fmt.upper()} text")
    return check_structure(_parse(text, fmt))


def structure_from_file(path: str | Path) -> Structure:
    """Read and check one CIF or POSCAR file (format from the suffix or name)."""
    path = Path(path)
    if not path.is_file():
        raise StructureInputError(f"{path}: no such file")
    fmt = "cif" if path.suffix.lower() == ".cif" else "poscar"
    try:
        return structure_from_text(path.read_text(errors="replace"), fmt)
    except StructureInputError as exc:
        raise StructureInputError(f"{path.name}: {exc}") from exc


def find_structure_files(paths: list[Path]) -> list[Path]:
    """Expand folders to the structure files inside them (sorted), keep files as given."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p for p in path.rglob("*")
                    if p.is_file()
                    and (p.suffix.lower() in STRUCTURE_SUFFIXES or p.name in STRUCTURE_NAMES)
                )
            )
        else:
            found.append(path)
    return found


def structure_from_atoms(atoms) -> Structure:
    """The geometry of ASE ``atoms`` only: no calculator, constraint or magnetic moments
    carried along (what a relaxation hands back to be stored or predicted on)."""
    from ase import Atoms
    from pymatgen.io.ase import AseAtomsAdaptor

    bare = Atoms(atoms.get_chemical_symbols(), positions=atoms.get_positions(),
                 cell=atoms.get_cell(), pbc=True)
    return AseAtomsAdaptor.get_structure(bare)
