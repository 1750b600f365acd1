"""Reading and checking structures: every refusal names its reason."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from matcouple.errors import StructureInputError
from matcouple.structures.descriptors import composition_keys, screening_summary
from matcouple.structures.io import (
    check_structure,
    find_structure_files,
    structure_from_file,
    structure_from_text,
)


def test_reads_cif_and_poscar(silicon):
    cif = silicon.to(fmt="cif")
    poscar = silicon.to(fmt="poscar")
    assert structure_from_text(cif, "cif").composition.reduced_formula == "Si"
    assert len(structure_from_text(poscar, "poscar")) == 8


@pytest.mark.parametrize("text, reason", [
    ("", "empty CIF"),
    ("data_x\n_cell_length_a 3\n", "malformed CIF"),
    ("this is not a crystal", "malformed CIF"),
])
def test_malformed_cif(text, reason):
    with pytest.raises(StructureInputError, match=reason):
        structure_from_text(text, "cif")


def test_unknown_element_is_named(silicon):
    poscar = silicon.to(fmt="poscar").replace("Si", "Xx")
    with pytest.raises(StructureInputError, match="unknown element.*Xx"):
        structure_from_text(poscar, "poscar")


def test_empty_and_huge_and_overlapping_cells():
    with pytest.raises(StructureInputError, match="empty cell"):
        check_structure(Structure(Lattice.cubic(3), [], []))
    big = Structure(Lattice.cubic(60), ["H"] * 1001, np.random.default_rng(0).random((1001, 3)))
    with pytest.raises(StructureInputError, match="cell too large"):
        check_structure(big)
    with pytest.raises(StructureInputError, match="overlapping atoms: sites 0 and 1"):
        check_structure(Structure(Lattice.cubic(4), ["Na", "Cl"], [[0, 0, 0], [0.001, 0, 0]]))
    with pytest.raises(StructureInputError, match="volume per atom"):
        check_structure(Structure(Lattice.cubic(40), ["Na"], [[0, 0, 0]]))


def test_single_atom_cell_is_accepted():
    s = check_structure(Structure(Lattice.cubic(2.87), ["Fe"], [[0, 0, 0]]))
    assert screening_summary(s)["min_interatomic_distance_A"] == pytest.approx(2.87)


def test_files_and_folders(tmp_path, silicon, rocksalt):
    (tmp_path / "a").mkdir()
    silicon.to(filename=str(tmp_path / "a" / "si.cif"))
    rocksalt.to(filename=str(tmp_path / "a" / "POSCAR"))
    (tmp_path / "a" / "notes.txt").write_text("x")
    files = find_structure_files([tmp_path / "a"])
    assert [f.name for f in files] == ["POSCAR", "si.cif"]
    assert structure_from_file(files[0]).composition.reduced_formula == "MgO"
    with pytest.raises(StructureInputError, match="missing.cif: no such file"):
        structure_from_file(tmp_path / "missing.cif")


def test_descriptors_are_physical(silicon, rocksalt):
    si = screening_summary(silicon)
    assert si["symmetry"]["number"] == 227
    assert si["density_g_cm3"] == pytest.approx(2.33, abs=0.01)
    assert si["min_interatomic_distance_A"] == pytest.approx(5.431 * np.sqrt(3) / 4, rel=1e-6)
    keys = composition_keys(rocksalt)
    assert keys["chemsys"] == "Mg-O" and keys["reduced_formula"] == "MgO"
    assert screening_summary(rocksalt)["symmetry"]["symbol"] == "Fm-3m"
