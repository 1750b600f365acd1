"""GPAW for real, end to end through the LaunchPad: relax 2-atom Si with `rlaunch`.

Checked against known physics: the PBE lattice of Si (5.47 A), its PBE band gap (~0.6 eV)
and a formation energy of zero for the element against its own reference.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

from matcouple.dft.calculation import run_dft, run_dft_with_retries
from matcouple.dft.errors import (
    DFTCalculationError,
    SCFNotConvergedError,
    UnsupportedElementError,
    WalltimeError,
)
from matcouple.dft.gpaw_engine import GpawEngine
from matcouple.dft.presets import gpaw_preset
from matcouple.dft.retries import escalate
from matcouple.dft.runs import run_results
from matcouple.dft.workflows import submit_dft
from matcouple.store.connection import open_launchpad
from matcouple.store.materials import MaterialsStore
from tests.conftest import write_launchpad_file

BIN = Path(sys.executable).parent
PBE_SI_A = 5.47  # A, PBE lattice constant of diamond Si


def _tool(name: str) -> str:
    return shutil.which(name, path=str(BIN)) or name


def si_primitive(a: float) -> Structure:
    """The 2-atom fcc cell of diamond Si with conventional lattice constant ``a``."""
    return Structure(Lattice.from_parameters(a / math.sqrt(2), a / math.sqrt(2),
                                             a / math.sqrt(2), 60, 60, 60),
                     ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def conventional_a(structure: Structure) -> float:
    return (structure.volume * 4 / len(structure) * 2) ** (1 / 3)


@pytest.fixture(scope="module")
def dft_launchpad(server, tmp_path_factory):
    """One database for the module, so the Si reference is computed once and reused."""
    from matcouple.settings import get_settings

    base = tmp_path_factory.mktemp("dft")
    config = write_launchpad_file(base / "my_launchpad.yaml", server,
                                  f"dft_{uuid.uuid4().hex[:8]}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATCOUPLE_LAUNCHPAD", str(config.path))
        mp.setenv("OMP_NUM_THREADS", "1")
        get_settings.cache_clear()
        yield config, base
    get_settings.cache_clear()


def _rlaunch(config, cwd: Path, mode: tuple[str, ...] = ("rapidfire",)) -> None:
    env = {**os.environ, "MATCOUPLE_LAUNCHPAD": str(config.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([_tool("rlaunch"), "-l", str(config.path), *mode], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_si_relaxation_through_rlaunch(dft_launchpad, tmp_path):
    config, _ = dft_launchpad
    start = si_primitive(5.40)  # 1.3% compressed: the relaxation has to expand it
    sub = submit_dft(config, [("si", start)], engine="gpaw", preset="fast", run="ci",
                     queueadapter={"walltime": "00:10:00"})
    assert sub.references_to_compute == ["Si"] and len(sub.reference_fw_ids) == 1
    lp = open_launchpad(config)
    fw = lp.get_fw_by_id(sub.fw_ids["si"][0])
    assert fw.spec["_category"] == "dft" and fw.spec["_queueadapter"] == {"walltime": "00:10:00"}

    # Two workers, as on a cluster: the reference Firework and the structure's run at once;
    # the structure's formation energy waits for the reference instead of recomputing it.
    _rlaunch(config, tmp_path, ("multi", "2"))

    doc = MaterialsStore(lp.db).get("gpaw-fast", "si")
    assert doc is not None, run_results(lp, "ci")
    assert doc["fidelity"] == "gpaw/PBE/fast"
    relaxed = Structure.from_dict(doc["structure"])
    assert conventional_a(relaxed) == pytest.approx(PBE_SI_A, rel=0.01)
    assert doc["symmetry"]["number"] == 227
    labels = doc["labels"]
    assert abs(labels["formation_energy_per_atom"]["value"]) < 0.005  # an element vs itself
    assert 0.3 < labels["band_gap"]["value"] < 0.9  # PBE underestimates Si's 1.1 eV gap
    assert labels["band_gap"]["fidelity"] == "gpaw/PBE/fast"
    dft = doc["dft"]
    assert dft["energy_per_atom"] == pytest.approx(-5.37, abs=0.05)
    assert dft["details"]["references_computed_here"] == []  # the reference Firework did it
    ref = lp.db["dft_references"].find_one({"element": "Si", "state": "done"})
    assert ref["fidelity"] == "gpaw/PBE/fast" and ref["settings"]["ecut_ev"] == 500.0
    rows = run_results(lp, "ci")
    assert rows[0]["state"] == "COMPLETED" and rows[0]["a"] == pytest.approx(relaxed.lattice.a)

    # Throughput mode skips what is already computed at this fidelity, by id or by crystal.
    again = submit_dft(config, [("si", start), ("si-copy", si_primitive(5.45))],
                       engine="gpaw", preset="fast", run="ci2")
    assert again.fw_ids == {} and set(again.skipped) == {"si", "si-copy"}
    assert again.references_to_compute == []


def test_failed_relaxation_is_recorded_and_retried(dft_launchpad, tmp_path):
    """A relaxation cut short continues from its last geometry with more steps."""
    config, _ = dft_launchpad
    sub = submit_dft(config, [("si-strained", si_primitive(5.25))], engine="gpaw",
                     preset="fast", run="retry", skip_existing=False)
    lp = open_launchpad(config)
    first = sub.fw_ids["si-strained"][0]
    task = lp.fireworks.find_one({"fw_id": first})["spec"]["_tasks"][0]
    task["retry"] = {"max_steps": 1}
    lp.fireworks.update_one({"fw_id": first}, {"$set": {"spec._tasks.0": task}})

    _rlaunch(config, tmp_path)

    launch = lp.launches.find_one({"fw_id": first})
    failure = launch["action"]["stored_data"]["failure"]
    assert failure["kind"] == "relax_not_converged" and failure["attempt"] == 1
    rows = run_results(lp, "retry")
    assert rows[0]["state"] == "COMPLETED" and rows[0]["attempt"] >= 2
    doc = MaterialsStore(lp.db).get("gpaw-fast", "si-strained")
    assert conventional_a(Structure.from_dict(doc["structure"])) == pytest.approx(PBE_SI_A,
                                                                                rel=0.01)
    retry_fw = lp.fireworks.find_one({"fw_id": rows[0]["fw_id"]})
    retry_task = retry_fw["spec"]["_tasks"][0]
    assert retry_task["retry"]["max_steps"] >= 2 and retry_task["failures"][0]["attempt"] == 1
    assert retry_fw["spec"]["_category"] == "dft"
    # The retry started where the first attempt stopped, not from the input.
    assert Structure.from_dict(retry_task["structure"]).volume != pytest.approx(
        si_primitive(5.25).volume)


def test_plain_retries_continue_like_the_workflow(tmp_path):
    """run_dft_with_retries: what the detour Fireworks do, for callers without a LaunchPad."""
    engine = GpawEngine()
    result, failures = run_dft_with_retries(si_primitive(5.25), engine, "fast",
                                            workdir=tmp_path, retry={"max_steps": 1})
    assert failures[0]["kind"] == "relax_not_converged" and failures[0]["attempt"] == 1
    assert failures[0]["retry"] == {"max_steps": 1}
    assert conventional_a(result.structure) == pytest.approx(PBE_SI_A, rel=0.01)
    with pytest.raises(DFTCalculationError, match="gave up after 1 attempt") as info:
        run_dft_with_retries(si_primitive(5.25), engine, "fast", workdir=tmp_path / "once",
                             retry={"max_steps": 1}, max_attempts=1)
    assert info.value.structure is not None  # the last geometry, to continue by hand


def test_scf_failure_names_itself(tmp_path):
    with pytest.raises(SCFNotConvergedError, match="SCF did not converge") as info:
        GpawEngine().relax_static(si_primitive(5.43), "fast", workdir=tmp_path,
                                  retry={"scf_maxiter": 2})
    assert info.value.kind == "scf_not_converged" and info.value.structure is not None


def test_walltime_stops_cleanly_with_the_last_geometry(tmp_path):
    with pytest.raises(WalltimeError, match="walltime") as info:
        GpawEngine().relax_static(si_primitive(5.30), "fast", workdir=tmp_path,
                                  walltime_s=1e-3)
    # Stopped right after the first forces: the geometry to continue from is the input's.
    assert info.value.kind == "walltime" and info.value.steps_done == 0
    assert Structure.from_dict(info.value.structure).volume == pytest.approx(
        si_primitive(5.30).volume)


def test_escalation_changes_what_fixes_it():
    fast = gpaw_preset("fast")
    scf = escalate("scf_not_converged", fast, None)
    assert scf["mixing_beta"] < fast.mixing_beta and scf["smearing_ev"] > fast.smearing_ev
    assert scf["scf_maxiter"] > fast.scf_maxiter
    again = escalate("scf_not_converged", fast, scf)
    assert again["mixing_beta"] < scf["mixing_beta"]
    assert escalate("relax_not_converged", fast, {"max_steps": 7})["max_steps"] == 14
    assert escalate("walltime", fast, {"max_steps": 7}) == {"max_steps": 7}


def test_missing_setup_is_a_clear_error(tmp_path):
    with pytest.raises(UnsupportedElementError, match="no PBE PAW setup for Np"):
        run_dft(Structure(Lattice.cubic(3.5), ["Np"], [[0, 0, 0]]), GpawEngine(), "fast",
                workdir=tmp_path)


def test_cli_prints_relaxed_lattice(dft_launchpad, tmp_path):
    """`matcouple dft run FILE` computes and prints a; run again, it skips the structure."""
    config, _ = dft_launchpad
    path = tmp_path / "si-cli.cif"
    si_primitive(5.43).to(filename=str(path))
    env = {**os.environ, "MATCOUPLE_LAUNCHPAD": str(config.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "matcouple.cli", "dft", "run", str(path)]
    proc = subprocess.run([*cmd, "--recompute", "--json", "--run", "cli"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["state"] == "COMPLETED" and row["formula"] == "Si"
    assert row["a"] * math.sqrt(2) == pytest.approx(PBE_SI_A, rel=0.01)
    assert row["energy_per_atom"] == pytest.approx(-5.37, abs=0.05)
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped si-cli: already computed as gpaw-fast:si-cli" in proc.stderr
    assert "nothing was run" in proc.stdout


def test_atomate2_makers_share_the_engine_scale(tmp_path):
    """GpawStaticMaker (an atomate2 ASE maker) gives the engine's static energy."""
    from jobflow import run_locally

    from matcouple.dft.makers import GpawRelaxMaker, GpawStaticMaker

    assert GpawRelaxMaker(preset="standard").relax_kwargs["fmax"] == 0.02
    si = si_primitive(5.489)
    responses = run_locally(GpawStaticMaker(preset="fast").make(si), root_dir=tmp_path,
                            ensure_success=True)
    (out,) = [r[1].output for r in responses.values()]
    engine = GpawEngine().relax_static(si, "fast", workdir=tmp_path / "engine")
    # the engine relaxed first (a few meV at most) and then ran the same static settings
    assert out.output.energy / len(si) == pytest.approx(engine.energy_per_atom, abs=0.005)
