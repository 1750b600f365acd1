"""Cheap, exact descriptors of a crystal: composition keys, symmetry and density.

These are what the materials collection indexes and what the screening workflow stores.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer


def composition_keys(structure: Structure) -> dict[str, Any]:
    """Formula, reduced formula, chemical system and sorted elements."""
    comp = structure.composition
    elements = sorted(el.symbol for el in comp.elements)
    return {
        "formula": comp.formula.replace(" ", ""),
        "formula_pretty": comp.reduced_formula,
        "reduced_formula": comp.reduced_formula,
        "chemsys": "-".join(elements),
        "elements": elements,
        "nelements": len(elements),
        "nsites": len(structure),
    }


def symmetry(structure: Structure, symprec: float = 0.1) -> dict[str, Any]:
    """Space group symbol/number and crystal system at the given tolerance (spglib)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sga = SpacegroupAnalyzer(structure, symprec=symprec)
            return {
                "symbol": sga.get_space_group_symbol(),
                "number": int(sga.get_space_group_number()),
                "crystal_system": sga.get_crystal_system(),
                "symprec": symprec,
            }
        except Exception:  # spglib gives up on some distorted cells
            return {"symbol": "P1", "number": 1, "crystal_system": "triclinic",
                    "symprec": symprec, "failed": True}


def screening_summary(structure: Structure, symprec: float = 0.1) -> dict[str, Any]:
    """Everything the first screening workflow computes for one structure."""
    nsites = len(structure)
    # Nearest neighbour including a site's own periodic images (the shortest lattice vector).
    min_distance = float(min(structure.lattice.abc))
    if nsites > 1:
        dmat = structure.distance_matrix
        np.fill_diagonal(dmat, np.inf)
        min_distance = min(min_distance, float(dmat.min()))
    return {
        **composition_keys(structure),
        "symmetry": symmetry(structure, symprec),
        "density_g_cm3": float(structure.density),
        "volume_A3": float(structure.volume),
        "volume_per_atom_A3": float(structure.volume / nsites),
        "min_interatomic_distance_A": min_distance,
    }
