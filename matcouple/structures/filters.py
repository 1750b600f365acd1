"""Validity filters for generated crystals (paper section 4.2), each a plain function.

A candidate passes through the filters in order, cheapest first; the first filter that
rejects it is charged with the removal, so a run reports how many candidates each filter
removed. Duplicates are looked for among the candidates already accepted and in the
materials collection (narrowed through its reduced-formula index), with the
StructureMatcher tolerances of the generation literature.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from matcouple.settings import get_settings

if TYPE_CHECKING:  # the database layer is only needed when a store is given
    from matcouple.store.materials import MaterialsStore


def few_elements(structure: Structure, limit: int | None = None) -> bool:
    """At most ``limit`` distinct elements (paper: more than 10 is not a reasonable compound)."""
    limit = get_settings().filter_max_elements if limit is None else limit
    return len(structure.composition.elements) <= limit


def charge_neutral(structure: Structure, pauling_test: bool | None = None) -> bool:
    """SMACT finds oxidation states that balance the charge; all-metal compositions pass.

    Alloys and elements have no ionic charge to balance, so SMACT's ``include_alloys``
    rule accepts them, as CDVAE/DiffCSP's validity metric does.
    """
    from smact.screening import smact_validity

    settings = get_settings()
    pauling_test = settings.filter_smact_pauling_test if pauling_test is None else pauling_test
    composition = structure.composition
    if len(composition.elements) == 1:
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(smact_validity(composition, use_pauling_test=pauling_test,
                                       include_alloys=True))
        except (KeyError, ValueError, TypeError):
            # SMACT has no data for the element (e.g. Z > 103): nothing to balance with.
            return False


def space_group_number(structure: Structure, symprec: float | None = None) -> int:
    """International space group number found by spglib at ``symprec`` (1 if it fails)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    symprec = get_settings().filter_symprec if symprec is None else symprec
    try:
        return int(SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number())
    except Exception:  # spglib gives up on degenerate cells: no symmetry found
        return 1


def has_symmetry(structure: Structure, symprec: float | None = None) -> bool:
    """Space group other than P1 at the stated ``symprec`` (Å)."""
    return space_group_number(structure, symprec) != 1


def shortest_lattice_vector(structure: Structure) -> float:
    """Length of the shortest non-zero lattice vector in Å (an atom's distance to its image)."""
    reduced = np.asarray(structure.lattice.lll_matrix)
    combos = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                       if (i, j, k) != (0, 0, 0)], dtype=float)
    return float(np.linalg.norm(combos @ reduced, axis=1).min())


def min_distance(structure: Structure) -> float:
    """Shortest interatomic distance in Å, periodic images of an atom itself included."""
    closest = shortest_lattice_vector(structure)
    if len(structure) > 1:
        dmat = structure.distance_matrix
        np.fill_diagonal(dmat, np.inf)
        closest = min(closest, float(dmat.min()))
    return closest


def atoms_apart(structure: Structure, threshold: float | None = None) -> bool:
    """No two atoms closer than ``threshold`` Å (default 0.5, as in CDVAE/DiffCSP)."""
    threshold = get_settings().filter_min_distance if threshold is None else threshold
    return min_distance(structure) >= threshold


def sane_volume(structure: Structure, low: float | None = None,
                high: float | None = None) -> bool:
    """Volume per atom inside ``[low, high]`` Å^3 (collapsed or exploded cells fail)."""
    settings = get_settings()
    low = settings.filter_min_volume_per_atom if low is None else low
    high = settings.filter_max_volume_per_atom if high is None else high
    volume = structure.volume
    if not np.isfinite(volume) or volume <= 0:
        return False
    return low <= volume / len(structure) <= high


def default_matcher() -> StructureMatcher:
    """StructureMatcher with stol=0.5, ltol=0.3, angle_tol=10 (the literature's "same")."""
    from matcouple.store.materials import MATCHER_TOLERANCES

    return StructureMatcher(**MATCHER_TOLERANCES)


@dataclass
class DuplicateFinder:
    """Remembers accepted structures and looks up the database, by reduced formula.

    ``is_new`` answers whether a candidate is neither a structure seen before in this
    finder nor an entry of the materials collection; an accepted candidate is remembered.
    Database entries of one formula are read once and kept.
    """

    store: MaterialsStore | None = None
    matcher: StructureMatcher = field(default_factory=default_matcher)
    seen: dict[str, list[Structure]] = field(default_factory=lambda: defaultdict(list))
    _db_loaded: set[str] = field(default_factory=set)
    db_hits: int = 0

    def preload(self, formulas: Iterable[str]) -> None:
        """Read the database entries of these reduced formulas in one indexed query."""
        if self.store is None:
            return
        wanted = sorted(set(formulas) - self._db_loaded)
        if not wanted:
            return
        cursor = self.store.collection.find({"reduced_formula": {"$in": wanted}},
                                            {"structure": 1, "reduced_formula": 1})
        for doc in cursor:
            self.seen[doc["reduced_formula"]].append(Structure.from_dict(doc["structure"]))
        self._db_loaded.update(wanted)

    def is_new(self, structure: Structure) -> bool:
        formula = structure.composition.reduced_formula
        self.preload([formula])
        for other in self.seen[formula]:
            if self.matcher.fit(structure, other):
                return False
        self.seen[formula].append(structure)
        return True


# Per-structure filters in the order they run; the dedupe filter ("unique") runs last.
STRUCTURE_FILTERS: dict[str, Callable[[Structure], bool]] = {
    "few_elements": few_elements,
    "atoms_apart": atoms_apart,
    "sane_volume": sane_volume,
    "charge_neutral": charge_neutral,
    "has_symmetry": has_symmetry,
}
FILTER_NAMES: tuple[str, ...] = (*STRUCTURE_FILTERS, "unique")


def first_failed_filter(structure: Structure) -> str | None:
    """Name of the first per-structure filter the candidate fails, or None if it passes all.

    A plain function of one structure, so a process pool can run it over a batch.
    """
    for name, check in STRUCTURE_FILTERS.items():
        if not check(structure):
            return name
    return None


@dataclass
class FilterReport:
    """How many candidates came in and how many each filter removed."""

    candidates: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTER_NAMES, 0))

    @property
    def survivors(self) -> int:
        return self.candidates - sum(self.removed.values())

    def add(self, other: FilterReport) -> None:
        self.candidates += other.candidates
        for name, count in other.removed.items():
            self.removed[name] = self.removed.get(name, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "survivors": self.survivors,
                "removed": dict(self.removed)}


def apply_filters(
    structures: list[Structure],
    duplicates: DuplicateFinder | None = None,
    map_fn: Callable[..., Iterable[str | None]] = map,
) -> tuple[list[int], FilterReport]:
    """Indices of the structures that pass every filter, and the per-filter counts.

    ``map_fn`` runs the per-structure filters (``pool.map`` to spread them over processes);
    the duplicate check then runs in order, since it depends on what was accepted before.
    """
    report = FilterReport(candidates=len(structures))
    verdicts = list(map_fn(first_failed_filter, structures))
    duplicates = duplicates if duplicates is not None else DuplicateFinder()
    duplicates.preload(s.composition.reduced_formula
                       for s, v in zip(structures, verdicts, strict=True) if v is None)
    kept: list[int] = []
    for i, (structure, failed) in enumerate(zip(structures, verdicts, strict=True)):
        if failed is None and not duplicates.is_new(structure):
            failed = "unique"
        if failed is None:
            kept.append(i)
        else:
            report.removed[failed] += 1
    return kept, report


def passed_filters() -> list[str]:
    """The filter names a survivor passed, in order (stored as provenance)."""
    return list(FILTER_NAMES)
