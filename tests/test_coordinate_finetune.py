"""Model registry and fine-tune on the real embedded server and the shipped ensemble:
end to end through rlaunch, a failing and a worse fine-tune leave the promoted model,
a corrupt GridFS file is a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from matcouple.coordinate.buffer import FineTuneBuffer, finetune_firework_if_due
from matcouple.coordinate.finetune import (
    FineTuneConfig,
    entry_graphs,
    finetune_now,
    promotion_decision,
    split_entries,
)
from matcouple.settings import get_settings
from matcouple.store.connection import open_database, open_launchpad
from matcouple.store.registry import ModelRegistry, RegistryError
from matcouple.structures.io import structure_from_text
from matcouple.surrogate.graph import GraphSpec
from matcouple.surrogate.predict import SurrogatePredictor
from matcouple.surrogate.train import masked_l1
from matcouple.surrogate.value_blend import value_model_names

CI = get_settings().data_dir / get_settings().datasets["mp2018-ci"]
FULL = get_settings().data_dir / get_settings().datasets["mp2018"]
pytestmark = pytest.mark.skipif(not (CI.exists() and FULL.exists()),
                                reason="data sets not present")
BIN = Path(sys.executable).parent
# Small enough for CI: one epoch, 16 replay rows, a 32-row val slice.
SMALL = {"epochs": 1, "replay_size": 16, "val_size": 32, "device": "cpu"}
FIDELITY = "gpaw/PBE/fast"


@pytest.fixture()
def env(launchpad_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MATCOUPLE_MODEL_CACHE", str(tmp_path / "model-cache"))
    get_settings.cache_clear()
    yield {**os.environ}
    get_settings.cache_clear()


@pytest.fixture()
def db(env, launchpad_config):
    return open_database(launchpad_config)


def _file_ci_results(db, n: int) -> list[str]:
    """Real MP labels of CI rows from the MEGNet train split, filed as another fidelity;
    every other one without a band gap (a DFT result may lack one)."""
    df = pd.read_csv(CI, keep_default_na=False, na_values=[""])
    df = df[df["megnet_split"] == "train"].head(n)
    buffer = FineTuneBuffer(db)
    for i, row in enumerate(df.itertuples()):
        labels = {"formation_energy_per_atom": row.formation_energy_per_atom}
        if i % 2 == 0:
            labels["band_gap"] = row.band_gap
        assert buffer.add(row.material_id, structure_from_text(row.cif, "cif"), labels,
                          fidelity=FIDELITY, source="gpaw-fast", run="t")
    return list(df["material_id"])


def _register_shipped(registry: ModelRegistry, version: str = "base") -> str:
    return registry.register(get_settings().surrogate_model_dir, version=version,
                             note="shipped ensemble")


def test_promotion_rule_numbers():
    cur = {"val": {"formation_energy_per_atom": 0.100}, "holdout": {
        "formation_energy_per_atom": 0.30}}
    ok, why = promotion_decision(cur, {"val": {"formation_energy_per_atom": 0.1019},
                                       "holdout": {"formation_energy_per_atom": 0.25}},
                                 val_tolerance=0.02, holdout_tolerance=0.0)
    assert ok and "0.1019 <= 0.1020" in why
    ok, why = promotion_decision(cur, {"val": {"formation_energy_per_atom": 0.1021},
                                       "holdout": {"formation_energy_per_atom": 0.25}},
                                 val_tolerance=0.02, holdout_tolerance=0.0)
    assert not ok and "val MAE 0.1021" in why
    ok, why = promotion_decision(cur, {"val": {"formation_energy_per_atom": 0.09},
                                       "holdout": {"formation_energy_per_atom": 0.31}},
                                 val_tolerance=0.02, holdout_tolerance=0.0)
    assert not ok and "held-out" in why
    ok, _ = promotion_decision(cur, {"val": {"formation_energy_per_atom": float("nan")},
                                     "holdout": {}}, val_tolerance=0.02, holdout_tolerance=0)
    assert not ok
    ok, _ = promotion_decision({"val": cur["val"], "holdout": {}},
                               {"val": {"formation_energy_per_atom": 0.1}, "holdout": {}},
                               val_tolerance=0.0, holdout_tolerance=0.0)
    assert ok  # equal is "not worse"; no held-out entries: the val slice decides
    defaults = FineTuneConfig.from_settings()
    assert (defaults.val_tolerance, defaults.holdout_tolerance) == (0.02, 0.02)
    entries = [{"material_id": f"m{i}", "fidelity": "f"} for i in range(8)]
    train, held = split_entries(entries, 0.25)
    assert len(held) == 2 and len(train) == 6 and split_entries(entries, 0.25)[1] == held
    assert split_entries(entries[:3], 0.25)[1] == []


def test_finetune_end_to_end_through_rlaunch(db, env, launchpad_config, tmp_path):
    ids = _file_ci_results(db, 8)
    fw = finetune_firework_if_due(db, launchpad_file=str(launchpad_config.path), run="t")
    assert fw is not None and finetune_firework_if_due(db) is None
    fw.tasks[0]["config"] = SMALL
    lp = open_launchpad(launchpad_config)
    fw_id = next(iter(lp.add_wf(fw).values()))
    tool = shutil.which("rlaunch", path=str(BIN)) or "rlaunch"
    proc = subprocess.run([tool, "-l", str(launchpad_config.path), "singleshot"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert lp.get_fw_by_id(fw_id).state == "COMPLETED"
    outcome = lp.launches.find_one({"fw_id": fw_id})["action"]["stored_data"]["finetune"]
    assert outcome["status"] in ("promoted", "refused"), outcome
    version = outcome["version"]
    registry = ModelRegistry(db)
    doc = registry.get(version)
    assert doc["status"] == outcome["status"] and doc["parent"].startswith("shipped:")
    m = doc["metrics"]
    assert m["n_holdout"] == 2 and m["n_buffer_train"] == 6 and m["n_val"] == 32
    assert m["n_replay"] == 16 and m["val"]["formation_energy_per_atom"] > 0
    assert m["current"]["val"]["formation_energy_per_atom"] > 0
    assert sorted(e["material_id"] for e in doc["data"]["entries"]) == sorted(ids)
    # the buffer counts them as consumed by this version; the lock is free again
    buffer = FineTuneBuffer(db)
    assert buffer.count_pending() == 0
    assert buffer.entries.count_documents({"consumed_by": version}) == 8
    assert buffer.lock_state().state == "idle"
    # the registered version loads in the predictor, recalibrated, and tags predictions
    folder = registry.model_dir(version)
    predictor = SurrogatePredictor.default(model_dir=folder, device="cpu")
    assert predictor.version == version and predictor.calibrated
    shipped = json.loads((get_settings().surrogate_model_dir / "model_card.json").read_text())
    names = value_model_names(shipped)
    if names:
        assert predictor.mode.startswith("value") and len(predictor.values) == len(names)
    for name in names:  # each value model was fine-tuned and travels with the members
        assert name in {f["name"] for f in doc["files"]}
        before = torch.load(get_settings().surrogate_model_dir / name, weights_only=True)
        after = torch.load(folder / name, weights_only=True)
        assert after["finetune"]["parent"] == doc["parent"]
        assert any(not torch.equal(before["state_dict"][k], after["state_dict"][k])
                   for k in before["state_dict"])
    assert predictor.scales["formation_energy_per_atom"] > 0
    structure = structure_from_text(
        pd.read_csv(CI, keep_default_na=False, na_values=[""]).cif.iloc[0], "cif")
    row = predictor.predict([("x", structure)])[0]
    assert row.error is None and row.sigmas["formation_energy_per_atom"] > 0
    if outcome["status"] == "refused":
        registry.promote(version)  # a user may still promote it by hand
    assert registry.current()["version"] == version and registry.model_dir() == folder
    # a second download is served from the verified cache
    assert registry.model_dir(version) == folder


def test_failing_and_worse_finetunes_leave_the_promoted_model(db, rocksalt):
    registry = ModelRegistry(db)
    registry.promote(_register_shipped(registry))
    _file_ci_results(db, 5)
    buffer = FineTuneBuffer(db)
    # a fine-tune that raises (its replay data is not where the worker looks)
    broken = FineTuneConfig.from_settings(**SMALL, replay_data="/nonexistent/mp2018.csv.gz")
    outcome = finetune_now(db, owner="t", config=broken)
    assert outcome.status == "failed" and "not found" in outcome.error
    assert registry.current()["version"] == "base"
    failed = registry.get(outcome.version)
    assert failed["status"] == "failed" and "not found" in failed["error"]
    assert failed["parent"] == "base" and failed["data"]["n_entries"] == 5
    assert buffer.count_pending() == 5 and buffer.lock_state().last_error == outcome.error
    # a fine-tune that is worse (a learning rate that wrecks the weights) is refused
    worse = FineTuneConfig.from_settings(**SMALL, lr=0.5)
    outcome = finetune_now(db, owner="t", config=worse)
    assert outcome.status == "refused" and "val MAE" in outcome.reason, outcome
    assert outcome.parent == "base"  # it started from the promoted registry version
    assert registry.get(outcome.version)["status"] == "refused"
    assert registry.get(outcome.version)["status_reason"] == outcome.reason
    assert registry.current()["version"] == "base"
    assert registry.get("base")["status"] == "promoted"
    assert buffer.count_pending() == 0  # the data was used; the refused version records it
    assert finetune_now(db, owner="t").status == "skipped"


def test_corrupt_or_missing_gridfs_files_are_clear_errors(db):
    registry = ModelRegistry(db)
    registry.promote(_register_shipped(registry, "good"))
    version = _register_shipped(registry, "bad")
    doc = registry.get(version)
    member = next(f for f in doc["files"] if f["name"].endswith(".pt"))
    chunks = db[f"{registry.bucket_name}.chunks"]
    chunk = chunks.find_one({"files_id": member["file_id"], "n": 3})
    data = bytearray(chunk["data"])
    data[100] ^= 0xFF
    chunks.update_one({"_id": chunk["_id"]}, {"$set": {"data": bytes(data)}})
    with pytest.raises(RegistryError, match=r"bad is corrupt: sha256"):
        registry.model_dir(version)
    with pytest.raises(RegistryError, match="corrupt"):
        registry.promote(version)
    assert registry.current()["version"] == "good"
    assert not (registry.cache_dir / version).exists()  # nothing half-written is left
    gone = registry.get(_register_shipped(registry, "gone"))
    registry.bucket.delete(next(f["file_id"] for f in gone["files"]
                                if f["name"] == "model_card.json"))
    with pytest.raises(RegistryError, match="model_card.json of model version gone is "
                       "missing from GridFS"):
        registry.model_dir("gone")
    with pytest.raises(RegistryError, match="no model version 'nope'"):
        registry.model_dir("nope")
    # a damaged cached copy of the good version is noticed and downloaded again
    folder = registry.model_dir()
    (folder / "model_card.json").write_text("{}")
    assert registry.model_dir() == folder
    assert SurrogatePredictor.default(model_dir=folder, device="cpu").version == "good"
    with pytest.raises(RegistryError, match="no model_card.json"):
        registry.register(folder / "nonexistent")


def test_unusable_entries_are_skipped_and_missing_labels_masked(rocksalt):
    import torch
    from pymatgen.core import Lattice, Structure

    lonely = Structure(Lattice.cubic(80.0), ["Na"], [[0, 0, 0]])
    entries = [
        {"material_id": "ok", "structure": rocksalt.as_dict(),
         "labels": {"formation_energy_per_atom": -3.0}},
        {"material_id": "other-label", "structure": rocksalt.as_dict(),
         "labels": {"energy_per_atom": -5.0}},
        {"material_id": "lonely", "structure": lonely.as_dict(),
         "labels": {"formation_energy_per_atom": 0.0}},
    ]
    graphs, skipped = entry_graphs(entries, GraphSpec(), ("formation_energy_per_atom",
                                                          "band_gap"))
    assert [g.material_id for g in graphs] == ["ok"]
    assert torch.isnan(graphs[0].y[0, 1]) and graphs[0].y[0, 0] == -3.0
    reasons = dict(skipped)
    assert "no label" in reasons["other-label"] and "neighbours" in reasons["lonely"]
    pred = torch.tensor([[0.5, 0.2], [0.1, 0.0]], requires_grad=True)
    mean, std = torch.zeros(2), torch.ones(2)
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    assert float(masked_l1(pred, y, mean, std).detach()) == pytest.approx((0.5 + 0.1 + 1.0) / 3)
    none = masked_l1(pred, torch.full((2, 2), float("nan")), mean, std)
    none.backward()
    assert float(none) == 0.0 and torch.all(pred.grad == 0)
