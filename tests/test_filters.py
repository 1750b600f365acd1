"""Each validity filter on hand-made structures, and the per-filter counts of a batch."""

from __future__ import annotations

import pytest
from pymatgen.core import Lattice, Structure

from matcouple.store.connection import open_database
from matcouple.store.materials import MaterialsStore, material_document
from matcouple.structures.filters import (
    FILTER_NAMES,
    DuplicateFinder,
    apply_filters,
    atoms_apart,
    charge_neutral,
    few_elements,
    has_symmetry,
    min_distance,
    sane_volume,
    space_group_number,
)


def _p1(species, lattice=None) -> Structure:
    """A cell with no symmetry at all: triclinic lattice, scattered atoms."""
    lattice = lattice or Lattice.from_parameters(4.1, 5.3, 6.2, 71, 83, 97)
    coords = [[0.01, 0.02, 0.03], [0.41, 0.13, 0.27], [0.23, 0.61, 0.77], [0.71, 0.37, 0.52],
              [0.57, 0.83, 0.11], [0.87, 0.69, 0.91], [0.17, 0.91, 0.43], [0.33, 0.29, 0.63],
              [0.63, 0.53, 0.31], [0.93, 0.07, 0.71], [0.49, 0.97, 0.59]]
    return Structure(lattice, species, coords[: len(species)])


def test_few_elements():
    ten = _p1(["Li", "Na", "K", "Rb", "Cs", "Mg", "Ca", "Sr", "Ba", "O"])
    eleven = _p1(["Li", "Na", "K", "Rb", "Cs", "Mg", "Ca", "Sr", "Ba", "O", "S"],
                 Lattice.cubic(9.0))
    assert few_elements(ten)
    assert not few_elements(eleven)
    assert few_elements(eleven, limit=11)


def test_charge_neutral(rocksalt, silicon):
    assert charge_neutral(rocksalt)  # Mg2+ O2-
    assert charge_neutral(silicon)  # an element
    nacl2 = Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"],
                      [[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]])
    assert not charge_neutral(nacl2)  # NaCl2: no Na/Cl oxidation states balance it
    alloy = Structure(Lattice.cubic(3.0), ["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert charge_neutral(alloy)  # all metals: nothing to balance


def test_symmetry(silicon, rocksalt):
    assert space_group_number(silicon) == 227 and has_symmetry(silicon)
    assert has_symmetry(rocksalt)
    p1 = _p1(["Si", "O", "O", "C"])
    assert space_group_number(p1, symprec=0.01) == 1
    assert not has_symmetry(p1, symprec=0.01)


def test_min_distance_and_volume(silicon):
    assert min_distance(silicon) == pytest.approx(5.431 * 3**0.5 / 4, abs=1e-3)
    assert atoms_apart(silicon) and sane_volume(silicon)
    close = Structure(Lattice.cubic(5.0), ["Si", "Si"], [[0, 0, 0], [0.05, 0, 0]])
    assert not atoms_apart(close)  # 0.25 A apart
    thin = Structure(Lattice.from_parameters(0.4, 8, 8, 90, 90, 90), ["Si"], [[0, 0, 0]])
    assert min_distance(thin) == pytest.approx(0.4)  # its own periodic image
    assert not atoms_apart(thin)
    exploded = Structure(Lattice.cubic(20.0), ["Si"], [[0, 0, 0]])
    assert not sane_volume(exploded)  # 8000 A^3 per atom
    collapsed = Structure(Lattice.cubic(1.2), ["Si"], [[0, 0, 0]])
    assert not sane_volume(collapsed)


def test_duplicates_among_candidates(silicon, rocksalt):
    finder = DuplicateFinder()
    assert finder.is_new(silicon)
    shifted = silicon.copy()
    shifted.translate_sites(list(range(len(shifted))), [0.1, 0.2, 0.3])
    shifted.apply_strain(0.02)
    assert not finder.is_new(shifted)  # same crystal, moved and 2% strained
    assert finder.is_new(rocksalt)


def test_apply_filters_counts_each_filter(silicon, rocksalt):
    close = Structure(Lattice.cubic(5.0), ["Si", "Si"], [[0, 0, 0], [0.05, 0, 0]])
    nacl2 = Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"],
                      [[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]])
    p1 = _p1(["Mg", "O"])
    eleven = _p1(["Li", "Na", "K", "Rb", "Cs", "Mg", "Ca", "Sr", "Ba", "O", "S"],
                 Lattice.cubic(9.0))
    exploded = Structure(Lattice.cubic(20.0), ["Si"], [[0, 0, 0]])
    batch = [silicon, close, nacl2, p1, silicon.copy(), eleven, exploded, rocksalt]
    kept, report = apply_filters(batch)
    assert kept == [0, 7]
    assert report.removed == {"few_elements": 1, "atoms_apart": 1, "sane_volume": 1,
                              "charge_neutral": 1, "has_symmetry": 1, "unique": 1}
    assert report.candidates == 8 and report.survivors == 2
    assert set(report.removed) == set(FILTER_NAMES)


def test_duplicate_of_a_database_entry(launchpad_config, silicon, rocksalt):
    store = MaterialsStore(open_database(launchpad_config))
    store.upsert_many([material_document(silicon, source="test", material_id="si",
                                         fidelity="x")])
    finder = DuplicateFinder(store=store)
    strained = silicon.copy()
    strained.apply_strain(0.03)
    kept, report = apply_filters([strained, rocksalt], finder)
    assert kept == [1] and report.removed["unique"] == 1
