"""Per-structure features the match discriminator reads.

A CSP sample that matches a known crystal looks like a relaxed DFT structure: bonds near
the sums of atomic radii, a volume per atom near what its elements usually take, high
symmetry with few distinct sites, a low and confidently predicted formation energy. A
miss is typically strained, low-symmetry or loosely packed. The features measure exactly
these, plus the cell size (larger cells are matched less often), so a small classifier
can learn p_match from a few thousand labelled samples.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

import numpy as np
import spglib
from pymatgen.core import Element, Structure

from matcouple.errors import StructureInputError

GEOMETRY = (
    "log_nsites", "nelements", "log_formula_units",
    "log_volume_ratio", "min_bond_ratio", "mean_nn_ratio", "std_nn_ratio",
    "mean_coordination", "std_coordination",
    "log_ops_tight", "log_ops_mid", "log_ops_loose", "orbit_fraction_mid",
    "min_angle", "max_angle", "length_ratio",
)
SURROGATE = ("formation_energy", "log_sigma_formation_energy", "band_gap")
SYMPRECS = (0.01, 0.1, 0.5)
BOND_SLACK = 1.25  # a neighbour is bonded within 1.25 x the sum of atomic radii


@lru_cache(maxsize=128)
def _radius(z: int) -> float:
    """Empirical atomic radius (A); the covalent-ish fallback keeps noble gases finite."""
    element = Element.from_Z(z)
    radius = element.atomic_radius or element.atomic_radius_calculated
    return float(radius) if radius else 1.5


def check_input(structures: Sequence[Structure]) -> list[Structure]:
    """The structures p_match can score; a clear error for anything else."""
    if isinstance(structures, Structure):
        structures = [structures]
    structures = list(structures)
    if not structures:
        raise StructureInputError("p_match needs at least one structure; got an empty list")
    for k, s in enumerate(structures):
        if not isinstance(s, Structure):
            raise StructureInputError(f"item {k} is a {type(s).__name__}, not a pymatgen "
                                      "Structure")
        if len(s) == 0:
            raise StructureInputError(f"structure {k} has no atoms")
        if not s.is_ordered:
            raise StructureInputError(
                f"structure {k} ({s.composition.formula}) is disordered (partial "
                "occupancies); the discriminator scores ordered crystals only")
        if not math.isfinite(s.volume) or s.volume <= 1e-6:
            raise StructureInputError(f"structure {k} has a flat or non-finite cell")
    return structures


def _symmetry(structure: Structure) -> tuple[list[float], float]:
    """log(number of symmetry operations) at three tolerances, and the fraction of
    symmetry-distinct sites at the middle one."""
    cell = (structure.lattice.matrix, structure.frac_coords,
            [site.specie.Z for site in structure])
    logs, orbits = [], 1.0
    for symprec in SYMPRECS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                data = spglib.get_symmetry_dataset(cell, symprec=symprec)
            except Exception:  # spglib gives up on some distorted cells: P1
                data = None
        ops = len(data.rotations) if data is not None else 1
        logs.append(math.log(ops))
        if symprec == 0.1 and data is not None:
            orbits = len(set(data.equivalent_atoms)) / len(structure)
    return logs, orbits


def _bonds(structure: Structure, radii: np.ndarray) -> list[float]:
    """Nearest-neighbour distances over radius sums, and coordination numbers."""
    cutoff = max(2.0 * BOND_SLACK * float(radii.max()), 1.0)
    centers, neighbors, _, distances = structure.get_neighbor_list(cutoff)
    n = len(structure)
    ratio = distances / (radii[centers] + radii[neighbors]) if len(distances) else \
        np.array([])
    nearest = np.full(n, 3.0)
    coordination = np.zeros(n)
    for i, r in zip(centers, ratio, strict=True):
        nearest[i] = min(nearest[i], r)
        coordination[i] += r <= BOND_SLACK
    smallest = float(ratio.min()) if len(ratio) else 3.0
    return [smallest, float(nearest.mean()), float(nearest.std()),
            float(coordination.mean()), float(coordination.std())]


def geometry_features(structure: Structure) -> list[float]:
    """The GEOMETRY features of one ordered structure, read off its primitive cell so that
    a conventional cell and a supercell score like the crystal they describe (the same
    reduction StructureMatcher makes before labelling)."""
    with warnings.catch_warnings(), contextlib.suppress(Exception):  # else: as given
        warnings.simplefilter("ignore")
        structure = structure.get_primitive_structure(tolerance=0.25)
    numbers = [site.specie.Z for site in structure]
    radii = np.array([_radius(z) for z in numbers])
    n = len(structure)
    composition = structure.composition
    units = n / composition.reduced_composition.num_atoms
    expected = float(np.mean(4.0 / 3.0 * math.pi * radii**3))
    symmetry_logs, orbits = _symmetry(structure)
    reduced = structure.lattice.get_niggli_reduced_lattice()
    angles = reduced.angles
    lengths = reduced.abc
    return [math.log(n), float(len(composition.elements)), math.log(units),
            math.log(structure.volume / n / expected), *_bonds(structure, radii),
            *symmetry_logs, orbits,
            min(angles) / 90.0, max(angles) / 90.0, max(lengths) / min(lengths)]


def surrogate_features(structures: Sequence[Structure], predictor) -> np.ndarray:
    """Formation energy, log sigma and band gap from the surrogate; NaN where it fails."""
    rows = predictor.predict([(str(k), s) for k, s in enumerate(structures)])
    out = np.full((len(structures), len(SURROGATE)), np.nan)
    for k, row in enumerate(rows):
        if row.error is None:
            sigma = row.sigmas.get("formation_energy_per_atom", float("nan"))
            out[k] = [row.values.get("formation_energy_per_atom", float("nan")),
                      math.log(max(sigma, 1e-6)), row.values.get("band_gap", float("nan"))]
    return out


def feature_matrix(structures: Sequence[Structure], *, predictor=None,
                   progress: bool = False, workers: int = 1) -> np.ndarray:
    """(N, features) float64: GEOMETRY, then SURROGATE when a predictor is given;
    ``workers`` > 1 computes the geometry in that many processes."""
    from tqdm import tqdm

    structures = check_input(structures)
    bar = tqdm(total=len(structures), disable=not progress, desc="features", unit="st")
    if workers > 1 and len(structures) > 200:
        context = multiprocessing.get_context("spawn")  # safe beside CUDA
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            rows = []
            for row in pool.map(geometry_features, structures, chunksize=32):
                rows.append(row)
                bar.update(1)
    else:
        rows = []
        for s in structures:
            rows.append(geometry_features(s))
            bar.update(1)
    bar.close()
    geometry = np.array(rows, dtype=np.float64)
    if predictor is None:
        return geometry
    return np.concatenate([geometry, surrogate_features(structures, predictor)], axis=1)
