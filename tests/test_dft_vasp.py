"""VASP through atomate2 without VASP: the inputs it would run and the workflow's shape."""

from __future__ import annotations

import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.vasp import Incar, Kpoints

from matcouple.dft.errors import EngineUnavailableError, UnsupportedElementError
from matcouple.dft.vasp import VaspEngine, corrected_entry, vasp_workflow, write_vasp_inputs
from matcouple.dft.workflows import submit_dft


@pytest.fixture()
def hematite() -> Structure:
    """Corundum Fe2O3 (10 atoms): a GGA+U case for the MP input sets."""
    return Structure.from_spacegroup(
        "R-3c", Lattice.hexagonal(5.035, 13.72), ["Fe", "O"],
        [[0, 0, 0.3553], [0.3059, 0, 0.25]]).get_primitive_structure()


def test_standard_inputs_are_mp_settings(tmp_path, rocksalt, hematite):
    write_vasp_inputs(rocksalt, "standard", tmp_path / "mgo")
    incar = Incar.from_file(tmp_path / "mgo" / "INCAR")
    assert incar["ENCUT"] == 520 and incar["ISIF"] == 3 and incar["IBRION"] == 2
    # MP: spin-polarised, EDIFF of 5e-5 eV per atom
    assert incar["ISPIN"] == 2 and incar["EDIFF"] == pytest.approx(5e-5 * len(rocksalt))
    assert not incar.get("LDAU", False)  # no +U without a U element
    spec = (tmp_path / "mgo" / "POTCAR.spec").read_text().split()
    assert spec == ["Mg_pv", "O"] and not (tmp_path / "mgo" / "POTCAR").exists()

    write_vasp_inputs(hematite, "standard", tmp_path / "fe2o3")
    incar = Incar.from_file(tmp_path / "fe2o3" / "INCAR")
    assert incar["LDAU"] is True
    potcars = (tmp_path / "fe2o3" / "POTCAR.spec").read_text().split()
    assert potcars == ["Fe_pv", "O"]
    assert dict(zip(potcars, incar["LDAUU"], strict=True))["Fe_pv"] == pytest.approx(5.3)
    assert incar["MAGMOM"][0] == pytest.approx(5.0)

    write_vasp_inputs(rocksalt, "standard", tmp_path / "static", step="static")
    assert Incar.from_file(tmp_path / "static" / "INCAR")["NSW"] == 0


def test_fast_preset_loosens_kpoints_and_ediff(tmp_path, rocksalt):
    write_vasp_inputs(rocksalt, "standard", tmp_path / "std")
    write_vasp_inputs(rocksalt, "fast", tmp_path / "fast")
    std = Kpoints.from_file(tmp_path / "std" / "KPOINTS").kpts[0]
    fast = Kpoints.from_file(tmp_path / "fast" / "KPOINTS").kpts[0]
    assert all(f <= s for f, s in zip(fast, std, strict=True)) and fast != std
    assert Incar.from_file(tmp_path / "fast" / "INCAR")["EDIFF"] == pytest.approx(1e-4)
    assert VaspEngine().fidelity("standard") == "vasp/GGA+U/MP2020"
    assert VaspEngine().fidelity("fast") == "vasp/GGA+U/fast"


def test_workflow_structure(launchpad_config, rocksalt):
    wf = vasp_workflow("mgo", rocksalt, preset="standard", run="r1",
                       queueadapter={"walltime": "08:00:00", "nodes": 2},
                       launchpad_file=str(launchpad_config.path))
    fw_id = {fw.name: fw.fw_id for fw in wf.fws}
    assert len(fw_id) == len(wf.fws) == 12  # (relax 1, relax 2, static, store) x (MgO, Mg, O2)

    def children(name: str) -> set[str]:
        return {fw.name for fw in wf.fws if fw.fw_id in wf.links[fw_id[name]]}

    for tag in ("[mgo]", "[Mg reference]", "[O reference]"):
        assert children(f"MP GGA relax 1 {tag}") == {f"MP GGA relax 2 {tag}"}
        assert children(f"MP GGA relax 2 {tag}") == {f"MP GGA static {tag}"}
    assert children("MP GGA static [mgo]") == {"store vasp result mgo"}
    assert children("MP GGA static [O reference]") == {"store vasp reference O"}
    assert children("store vasp reference Mg") == {"store vasp result mgo"}
    for fw in wf.fws:
        assert fw.spec["_category"] == "dft" and fw.spec["matcouple_run"] == "r1"
        assert fw.spec["_queueadapter"] == {"walltime": "08:00:00", "nodes": 2}
        task = fw.tasks[0]
        assert type(task).__name__ == "JobFiretask"  # jobflow runs atomate2's job as is
        docs = task["store"].docs_store
        assert (docs.host, docs.port, docs.database) == (
            launchpad_config.host, launchpad_config.port, launchpad_config.data["name"])
    static = next(fw for fw in wf.fws if fw.name == "MP GGA static [mgo]")
    maker = static.tasks[0]["job"].maker
    assert type(maker.input_set_generator).__name__ == "MPStaticSet"
    relax = next(fw for fw in wf.fws if fw.name == "MP GGA relax 1 [mgo]")
    assert type(relax.tasks[0]["job"].maker.input_set_generator).__name__ == "MPRelaxSet"


def test_throughput_submits_references_once(launchpad_config, rocksalt, hematite):
    sub = submit_dft(launchpad_config, [("mgo", rocksalt), ("fe2o3", hematite)],
                     engine="vasp", preset="standard", run="batch",
                     queueadapter={"walltime": "12:00:00"})
    assert sub.references_to_compute == ["Fe", "Mg", "O"]
    assert len(sub.reference_fw_ids) == 3 * 4  # relax 1, relax 2, static, store per element
    # each structure workflow has no reference jobs of its own: 3 VASP jobs + store
    assert {k: len(v) for k, v in sub.fw_ids.items()} == {"mgo": 4, "fe2o3": 4}


def test_engine_reports_what_is_missing(rocksalt, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no vasp_std anywhere
    with pytest.raises(EngineUnavailableError, match="VASP executable 'vasp_std' not found"):
        VaspEngine().relax_static(rocksalt, "standard", workdir=tmp_path)
    with pytest.raises(UnsupportedElementError, match="no POTCAR for Og"):
        VaspEngine().check_elements(["Og", "O"])


def test_mp2020_corrections_apply_to_a_gga_u_oxide(hematite):
    """The anion and +U corrections of MP2020 land on the energy used for E_f."""
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    hubbards = {"Fe": 5.3, "O": 0.0}
    entry = ComputedStructureEntry(
        hematite, -80.0, parameters={
            "run_type": "GGA+U", "is_hubbard": True, "hubbards": hubbards,
            "potcar_spec": [{"titel": "PAW_PBE Fe_pv 06Sep2000", "hash": None},
                            {"titel": "PAW_PBE O 08Apr2002", "hash": None}]})
    doc = {"entry": entry, "structure": hematite}
    corrected = corrected_entry(doc)
    # MP2020: -0.687 eV per O (oxide) and -2.256 eV per Fe (GGA+U Fe in an oxide)
    assert hematite.composition.reduced_formula == "Fe2O3" and len(hematite) == 10
    expected = 6 * -0.687 + 4 * -2.256
    assert corrected.correction == pytest.approx(expected, abs=0.05)
    assert corrected.energy == pytest.approx(-80.0 + expected, abs=0.05)
