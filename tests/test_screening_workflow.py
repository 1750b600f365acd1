"""The first workflow end to end: submit, `rlaunch rapidfire`, `lpad`, results in MongoDB."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from matcouple.screening import screening_results, submit_screening
from matcouple.store.connection import open_launchpad
from matcouple.workflows import screening_workflow

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    return shutil.which(name, path=str(BIN)) or name


def test_workflow_shape(silicon, rocksalt):
    wf = screening_workflow([(f"s{i}", silicon) for i in range(10)], "r", batch_size=4,
                            category="ai")
    assert len(wf.fws) == 3
    assert [len(fw.tasks[0]["structures"]) for fw in wf.fws] == [4, 4, 2]
    assert all(fw.spec["_category"] == "ai" for fw in wf.fws)
    with pytest.raises(ValueError, match="batch size"):
        screening_workflow([("a", silicon)], "r", batch_size=0)


def test_rlaunch_runs_it_and_lpad_sees_it(launchpad_config, cli_env, tmp_path, silicon,
                                          rocksalt):
    structures = [(f"si{i}", silicon) for i in range(5)] + [(f"mgo{i}", rocksalt)
                                                            for i in range(4)]
    run, fw_ids = submit_screening(launchpad_config, structures, run="t1", batch_size=4)
    assert len(fw_ids) == 3
    proc = subprocess.run([_tool("rlaunch"), "-l", str(launchpad_config.path), "rapidfire"],
                          cwd=tmp_path, env=cli_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run([_tool("lpad"), "-l", str(launchpad_config.path), "get_wflows",
                          "-d", "more"], env=cli_env, capture_output=True, text=True,
                         timeout=120)
    wflows = json.loads(out.stdout)
    wflows = wflows if isinstance(wflows, list) else [wflows]
    assert wflows[0]["state"] == "COMPLETED" and wflows[0]["name"].startswith("screening t1")
    docs = screening_results(run, launchpad_config.path)
    assert len(docs) == 9
    by_id = {d["structure_id"]: d for d in docs}
    assert by_id["si0"]["symmetry"]["number"] == 227
    assert by_id["mgo3"]["symmetry"]["symbol"] == "Fm-3m"
    assert by_id["mgo0"]["density_g_cm3"] == pytest.approx(3.58, abs=0.02)
    lp = open_launchpad(launchpad_config)
    stored = sorted(lp.launches.find_one({"fw_id": i})["action"]["stored_data"]["stored"]
                    for i in fw_ids)
    assert stored == [1, 4, 4]
    # `lpad reset` empties the LaunchPad, and leaves matcouple's collections alone.
    today = datetime.datetime.now().strftime("%Y-%m-%d")
    proc = subprocess.run([_tool("lpad"), "-l", str(launchpad_config.path), "reset",
                           "--password", today], env=cli_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert lp.fireworks.count_documents({}) == 0
    assert len(screening_results(run, launchpad_config.path)) == 9


def test_cli_submit_then_results(launchpad_config, cli_env, tmp_path, silicon):
    folder = tmp_path / "in"
    folder.mkdir()
    silicon.to(filename=str(folder / "si.cif"))
    (folder / "broken.cif").write_text("data_x\n")
    cmd = [sys.executable, "-m", "matcouple.cli", "screen"]
    proc = subprocess.run([*cmd, "submit", str(folder), "--run", "cli"], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "broken.cif" in proc.stderr and "1 structures in 1 Fireworks" in proc.stdout
    subprocess.run([_tool("rlaunch"), "-l", str(launchpad_config.path), "rapidfire"],
                   cwd=tmp_path, env=cli_env, capture_output=True, timeout=300, check=True)
    proc = subprocess.run([*cmd, "results", "cli"], env=cli_env, capture_output=True,
                          text=True, timeout=120)
    assert "cubic" in proc.stdout and "Fd-3m" in proc.stdout
