"""Design runs: request parser, decisions with real predictions, and runs through rlaunch.

The run tests use lithium cells of one or two atoms, 20 diffusion steps and GPAW's fast
preset, so a DFT Firework takes about a minute on two cores. They share one database, so
the lithium reference computed by the first run is reused by the later ones, as it is in
production.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from fireworks import LaunchPad

from matcouple.coordinate import designrun as dr
from matcouple.coordinate.buffer import FineTuneBuffer
from matcouple.coordinate.request import RequestError, make_request, parse_request
from tests.conftest import write_launchpad_file

BIN = Path(sys.executable).parent
LI_REQUEST = "up to 3 structures of Li with a formation energy of less than 1 eV/atom"


# ---------------------------------------------------------------- parser
@pytest.mark.parametrize("text, formula, n, label, op, value", [
    ("Please generate up to 50 structures of Fe2O3 materials with a formation energy of "
     "less than 1 eV/atom", "Fe2O3", 50, "formation_energy_per_atom", "<", 1.0),
    ("Please generate up to 50 structures of Fe_2O_3 materials with a formation energy of "
     "less than 1 eV/atom", "Fe2O3", 50, "formation_energy_per_atom", "<", 1.0),
    ("generate 20 structures of TiO2 with formation energy below -2 eV/atom", "TiO2", 20,
     "formation_energy_per_atom", "<", -2.0),
    ("up to 10 crystals of GaN with a band gap greater than 1.5 eV", "GaN", 10, "band_gap",
     ">", 1.5),
    ("Find 3 structures for SiO2 with band gap >= 2", "SiO2", 3, "band_gap", ">=", 2.0),
    ("up to 5 structures of NaCl with formation energy <= -500 meV/atom", "NaCl", 5,
     "formation_energy_per_atom", "<=", -0.5),
    ("up to 4 structures of MgO with a formation energy above -3 eV", "MgO", 4,
     "formation_energy_per_atom", ">", -3.0),
])
def test_parser_reads_requests(text, formula, n, label, op, value):
    req = parse_request(text)
    assert (req.formula, req.n, req.target.label, req.target.op) == (formula, n, label, op)
    assert req.target.value == pytest.approx(value)
    assert req.target.unit == ("eV/atom" if label == "formation_energy_per_atom" else "eV")


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("make me something nice", "N structures of FORMULA"),
    ("up to 5 structures of Fe2O3 that are stable", "property condition"),
    ("up to 5 structures of Qq2O3 with formation energy < 1 eV/atom", "unknown element"),
    ("up to 5 structures of GaN with band gap > 1 eV/atom", "band_gap is given in eV"),
    ("up to 0 structures of GaN with band gap > 1 eV", "positive"),
])
def test_parser_refuses_with_a_reason(text, words):
    with pytest.raises(RequestError) as info:
        parse_request(text)
    assert words in str(info.value)
    if words in ("N structures of FORMULA", "property condition", "empty"):
        assert "Fe2O3" in str(info.value)  # examples are shown


def test_target_and_structured_form():
    req = make_request("Fe2O3", 50, value=1.0)
    assert req.target.met_by(0.5) and not req.target.met_by(1.0)
    assert not req.target.met_by(float("nan"))
    assert req.target.mongo_filter() == {"labels.formation_energy_per_atom.value": {"$lt": 1.0}}
    with pytest.raises(RequestError):
        make_request("Fe2O3", 5, op="!=", value=1.0)


def test_plan_names_tau_and_a_p_match_gate_only_when_set():
    from matcouple.coordinate.planner import describe_plan

    base = dict(request=make_request("Fe2O3", 5, value=1.0), run="plan", tau=0.05)
    plain = " ".join(describe_plan(dr.DesignConfig(**base)))
    assert "tau 0.050" in plain and "p_match" not in plain
    gated = dr.DesignConfig(**base, p_match_min=0.5)
    assert gated.resolved().p_match_min == 0.5
    assert "p_match >= 0.5" in " ".join(describe_plan(gated))


def test_cli_refuses_bad_request_with_examples(cli_env):
    proc = subprocess.run([str(BIN / "matcouple"), "design", "design something great"],
                          env=cli_env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Examples" in proc.stderr and "Fe2O3" in proc.stderr


def test_no_llm_endpoint_means_deterministic_and_bad_endpoint_is_explained(monkeypatch):
    from matcouple.coordinate import llm
    from matcouple.settings import get_settings

    monkeypatch.delenv("MATCOUPLE_LLM_URL", raising=False)
    get_settings.cache_clear()
    assert not llm.llm_configured()
    monkeypatch.setenv("MATCOUPLE_LLM_URL", "not a url")
    monkeypatch.setenv("MATCOUPLE_LLM_MODEL", "m")
    get_settings.cache_clear()
    assert llm.llm_configured()
    with pytest.raises(llm.LLMError, match="http"):
        llm.chat([{"role": "user", "content": "hi"}], llm.TOOLS)
    monkeypatch.setenv("MATCOUPLE_LLM_URL", "http://127.0.0.1:9/v1")  # nothing listens
    get_settings.cache_clear()
    with pytest.raises(llm.LLMError, match="cannot reach"):
        llm.chat([{"role": "user", "content": "hi"}], llm.TOOLS)
    get_settings.cache_clear()


# ---------------------------------------------------------------- decisions
def _decide_with_tau(config, structure, tau, run, p_match_min=None):
    from matcouple.coordinate.design_tasks import DesignDecideTask
    from matcouple.store.connection import open_database

    db = open_database(config)
    cfg = dr.DesignConfig(request=make_request("MgO", 1, value=1.0), run=run, tau=tau,
                          max_iterations=1, max_dft=1, launchpad_file=str(config.path),
                          p_match_min=p_match_min)
    dr.create_run(db, cfg)
    dr.record_generated(db, run, 1, [structure], {"test": True}, "formation_energy_per_atom")
    task = DesignDecideTask(run=run, iteration=1, launchpad_file=str(config.path))
    task.fw_id = 41
    return db, task.run_task({})


def test_policy_branches_with_real_predictions(launchpad_config, cli_env, rocksalt, tmp_path):
    from matcouple.coordinate.tools import predict_properties

    (pred,) = predict_properties([("mgo", rocksalt)], "formation_energy_per_atom")
    assert pred.sigma > 0
    # tau below the real sigma: the decide step appends a DFT relaxation + filing.
    db, action = _decide_with_tau(launchpad_config, rocksalt, pred.sigma / 2, "low-tau")
    (cand,) = dr.iteration_candidates(db, "low-tau", 1)
    assert cand["status"] == "dft_queued" and cand["decision"]["action"] == "dft"
    assert cand["prediction"]["sigma"] == pytest.approx(pred.sigma)
    dft_wfs = [wf for wf in action.additions if wf.name.startswith("design dft")]
    assert len(dft_wfs) == 1
    names = [fw.name for fw in dft_wfs[0].fws]
    assert any(n.startswith("dft gpaw-fast") for n in names)
    assert any(n.startswith("design file") for n in names)
    assert 0.0 <= cand["decision"]["p_match"] <= 1.0  # the match discriminator's p_match
    # tau above it: accepted (by default p_match is recorded, not a gate), no DFT appended.
    db, action = _decide_with_tau(launchpad_config, rocksalt, pred.sigma * 2, "high-tau")
    (cand,) = dr.iteration_candidates(db, "high-tau", 1)
    assert dr.run_config(db, "high-tau").p_match_min == 0.0
    assert cand["status"] == "accepted" and cand["value"] == pytest.approx(pred.value)
    assert cand["meets_target"] is True
    assert not [wf for wf in action.additions if wf.name.startswith("design dft")]
    # `matcouple report` of that run: the accepted structure, its counts, JSON and plot.
    proc = subprocess.run([str(BIN / "matcouple"), "report", "high-tau", "--out",
                           str(tmp_path / "rep")], env=cli_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["counts"]["ai_accepted"] == 1 and data["counts"]["unique"] == 1
    assert data["unique"][0]["source"] == "AI" and data["unique"][0]["spacegroup"] == "Fm-3m"
    assert data["unique"][0]["p_match"] == pytest.approx(cand["decision"]["p_match"])
    assert (tmp_path / "rep" / "iterations.png").stat().st_size > 0
    assert "Fm-3m" in proc.stdout
    # ... and a p_match threshold above the structure's p_match sends it to DFT.
    p_match = cand["decision"]["p_match"]
    if p_match < 1.0:
        db, action = _decide_with_tau(launchpad_config, rocksalt, pred.sigma * 2, "p-match",
                                      p_match_min=min(1.0, p_match + 1e-6))
        (cand,) = dr.iteration_candidates(db, "p-match", 1)
        assert cand["status"] == "dft_queued" and "p_match" in cand["decision"]["reason"]
    # A confident prediction well below every computed value of the composition is a
    # new-ground-state claim: DFT whatever sigma. (Known value 0.2 above the prediction,
    # stored for another MgO cell.)
    from matcouple.coordinate.planner import lowest_known_value
    from matcouple.store.materials import Label, MaterialsStore, material_document

    known = rocksalt.copy()
    known.scale_lattice(rocksalt.volume * 1.3)
    fe = Label(pred.value + 0.2, "eV/atom", "test-dft", "test/PBE")
    MaterialsStore(db).upsert_many([material_document(
        known, source="test-dft", material_id="mgo-known", fidelity="test/PBE",
        labels={"formation_energy_per_atom": fe})])
    assert lowest_known_value(db, "MgO", "formation_energy_per_atom") == \
        pytest.approx(pred.value + 0.2)
    db, action = _decide_with_tau(launchpad_config, rocksalt, pred.sigma * 2, "ground-claim")
    (cand,) = dr.iteration_candidates(db, "ground-claim", 1)
    assert cand["status"] == "dft_queued"
    assert "below the lowest known" in cand["decision"]["reason"]


# ---------------------------------------------------------------- runs through rlaunch
@pytest.fixture(scope="module")
def shared_lp(server, tmp_path_factory):
    path = tmp_path_factory.mktemp("design") / "my_launchpad.yaml"
    return write_launchpad_file(path, server, f"t_design_{uuid.uuid4().hex[:8]}")


def _env(config) -> dict[str, str]:
    return {**os.environ, "MATCOUPLE_LAUNCHPAD": str(config.path), "OMP_NUM_THREADS": "1"}


def _submit(config, run, **limits):
    from matcouple.coordinate.workflow import submit_design

    req = parse_request(LI_REQUEST)
    cfg = dr.DesignConfig(request=req, run=run, batch_size=limits.get("batch_size", 4),
                          steps=20, formula_units=limits.get("formula_units", [1, 2]),
                          max_iterations=limits.get("max_iterations", 1),
                          max_dft=limits.get("max_dft", 1), tau=1e-6, seed=limits.get("seed", 0),
                          launchpad_file=str(config.path))
    submit_design(cfg, config)
    return LaunchPad.from_file(str(config.path))


def _worker(config, tmp: Path, run: str, name: str, exclude_finetune: bool = False):
    tmp.mkdir(parents=True, exist_ok=True)
    query = {"spec.matcouple_run": run}
    if exclude_finetune:  # a worker that leaves fine-tunes to another node
        query["name"] = {"$not": {"$regex": "^finetune"}}
    fworker = tmp / "fworker.yaml"
    fworker.write_text(yaml.safe_dump({"name": name, "category": "",
                                       "query": json.dumps(query)}))
    return subprocess.Popen(
        [str(BIN / "rlaunch"), "-l", str(config.path), "-w", str(fworker), "--loglvl",
         "WARNING", "rapidfire", "--nlaunches", "0", "--sleep", "1"],
        cwd=tmp, env=_env(config), stdout=open(tmp / "rlaunch.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True)


def _fws(lp: LaunchPad, run: str) -> list[dict]:
    return list(lp.fireworks.find({"spec.matcouple_run": run},
                                  {"fw_id": 1, "name": 1, "state": 1}))


def _running_dft(lp: LaunchPad, run: str) -> dict | None:
    for fw in _fws(lp, run):
        if fw["name"].startswith("dft ") and fw["state"] == "RUNNING":
            launch = lp.launches.find_one({"fw_id": fw["fw_id"], "state": "RUNNING"})
            if launch:
                return {**fw, "worker": launch["fworker"]["name"]}
    return None


def test_two_workers_and_a_killed_worker(shared_lp, tmp_path, rocksalt):
    """Two rlaunch workers run one design; the one inside a DFT Firework is SIGKILLed.

    `lpad detect_lostruns --rerun` (limited to the dead worker's launches) recovers it; every
    candidate is computed and filed once, the buffer counts each result once, and only one
    fine-tune is queued although the buffer is due at both filings.
    """
    from matcouple.coordinate.report import build_report
    from matcouple.settings import get_settings

    run = "li-two"
    lp = _submit(shared_lp, run, batch_size=8, max_dft=2, seed=2)
    buffer = FineTuneBuffer(lp.db)
    for k in range(get_settings().finetune_buffer_size - 1):  # due at the first filing
        buffer.add(f"prefill-{k}", rocksalt, {"formation_energy_per_atom": -3.0},
                   fidelity="mp2018/GGA+U", source="mp2018")
    workers = {f"w{k}": _worker(shared_lp, tmp_path / f"w{k}", run, f"w{k}",
                                exclude_finetune=True) for k in range(2)}
    deadline = time.monotonic() + 300
    dft = None
    while time.monotonic() < deadline and dft is None:
        dft = _running_dft(lp, run)
        time.sleep(0.5)
    assert dft is not None, "no DFT Firework started"
    time.sleep(4)  # inside GPAW now
    victim = workers.pop(dft["worker"])
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert lp.get_fw_dict_by_id(dft["fw_id"])["state"] == "RUNNING"  # lost, not finished
    time.sleep(2)
    proc = subprocess.run(
        [str(BIN / "lpad"), "-l", str(shared_lp.path), "detect_lostruns", "--time", "1",
         "--rerun", "-lq", json.dumps({"fworker.name": dft["worker"]})],
        env=_env(shared_lp), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert lp.get_fw_dict_by_id(dft["fw_id"])["state"] in ("READY", "RESERVED", "RUNNING",
                                                          "COMPLETED")
    workers["w9"] = _worker(shared_lp, tmp_path / "w9", run, "w9", exclude_finetune=True)
    for w in workers.values():
        assert w.wait(timeout=600) == 0
    states = {f["name"]: f["state"] for f in _fws(lp, run)
              if not f["name"].startswith("finetune")}
    assert set(states.values()) == {"COMPLETED"}, states
    db = lp.db
    done = [c for c in dr.candidates(db).find({"run": run}) if c["status"] == "dft_done"]
    assert len(done) == 2, [c["status"] for c in dr.candidates(db).find({"run": run})]
    ids = [c["dft"]["material_id"] for c in done]
    assert len(set(ids)) == 2
    for material_id in ids:
        assert db["materials"].count_documents({"_id": material_id}) == 1
        assert buffer.entries.count_documents({"material_id": material_id}) == 1
    dft_fws = [f for f in _fws(lp, run) if f["name"].startswith("dft ")]
    assert len(dft_fws) == 2  # one DFT Firework per candidate, the killed one rerun
    finetunes = list(lp.fireworks.find({"name": {"$regex": "^finetune"}}))
    assert len(finetunes) == 1 and finetunes[0]["state"] == "READY"
    report = build_report(db, run)
    assert report["counts"]["dft_run"] == 2 and report["counts"]["database_hits"] == 0
    assert report["counts"]["valid"] == 2
    assert all(row["spacegroup_number"] != 1 for row in report["unique"])
