"""Bad rows, a database killed mid-ingest, and the CLI's exit codes."""

from __future__ import annotations

import subprocess
import sys
import threading

import pandas as pd
import pytest
from pymatgen.core import Structure

from matcouple.datasets import csv_dataset, known_dataset
from matcouple.ingest import ingest
from matcouple.settings import get_settings
from matcouple.store.connection import open_database
from matcouple.store.materials import MaterialsStore

needs_data = pytest.mark.skipif(
    not get_settings().data_dir.joinpath("mp2018").exists(), reason="data sets not present")


@pytest.fixture()
def messy_csv(tmp_path, silicon, rocksalt):
    si, mgo = silicon.to(fmt="cif"), rocksalt.to(fmt="cif")
    nan_formula = Structure(rocksalt.lattice, ["Na", "N"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(
        fmt="cif")
    rows = [
        {"material_id": "good-si", "cif": si, "e_form": 0.0, "gap": 0.6},
        {"material_id": "good-mgo", "cif": mgo, "e_form": -3.0, "gap": 4.5},
        {"material_id": "NaN", "cif": nan_formula, "e_form": 0.1, "gap": 0.0},
        {"material_id": "bad-cif", "cif": "data_broken\n_cell_length_a 3\n", "e_form": 1.0,
         "gap": 0.0},
        {"material_id": "bad-element", "cif": si.replace("Si", "Qq"), "e_form": 1.0, "gap": 0},
        {"material_id": "nan-label", "cif": mgo, "e_form": float("nan"), "gap": 1.0},
        {"material_id": "text-label", "cif": mgo, "e_form": "high", "gap": 1.0},
    ]
    path = tmp_path / "messy.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_bad_rows_are_reported_and_good_rows_loaded(messy_csv, launchpad_config):
    spec = csv_dataset(messy_csv, source="mine", fidelity="mine/PBE", labels=["e_form", "gap"])
    store = MaterialsStore(open_database(launchpad_config))
    report = ingest(spec, store, workers=1, progress=False)
    refused = {e.material_id: e.reason for e in report.errors}
    assert set(refused) == {"bad-cif", "bad-element", "nan-label", "text-label"}
    assert "malformed CIF" in refused["bad-cif"]
    assert "unknown element" in refused["bad-element"] and "Qq" in refused["bad-element"]
    assert "'e_form' is missing or NaN" in refused["nan-label"]
    assert "not a number" in refused["text-label"]
    assert report.written == 3
    assert store.get("mine", "NaN")["reduced_formula"] == "NaN"  # sodium nitride, not a NaN


def test_cli_exit_codes(messy_csv, tmp_path, cli_env):
    cmd = [sys.executable, "-m", "matcouple.cli", "data", "load", str(messy_csv),
           "--labels", "e_form,gap", "--report", str(tmp_path / "r.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "refused row 3 (bad-cif): malformed CIF" in proc.stderr
    assert "3 of 7 rows stored, 4 refused" in proc.stdout
    all_bad = tmp_path / "allbad.csv"
    pd.DataFrame([{"material_id": "x", "cif": "nonsense", "e": 1.0}]).to_csv(all_bad,
                                                                             index=False)
    proc = subprocess.run([*cmd[:5], str(all_bad)], capture_output=True, text=True,
                          env=cli_env, timeout=120)
    assert proc.returncode == 1 and "0 of 1 rows stored" in proc.stdout


@needs_data
def test_sigkill_during_ingest_loses_no_acknowledged_document(server, launchpad_config):
    spec = known_dataset("mp2018", "ci")
    store = MaterialsStore(open_database(launchpad_config))
    acknowledged: list[str] = []
    failure: list[BaseException] = []
    two_batches = threading.Event()

    def on_batch(ids: list[str]) -> None:
        acknowledged.extend(ids)
        if len(acknowledged) >= 64:
            two_batches.set()

    def run() -> None:
        try:
            ingest(spec, store, batch_size=32, workers=1, on_batch=on_batch, progress=False)
        except BaseException as exc:  # the expected outcome: the server vanished
            failure.append(exc)
        finally:
            two_batches.set()

    worker = threading.Thread(target=run)
    worker.start()
    assert two_batches.wait(120)
    server.kill()
    worker.join(120)
    assert failure, "the ingest should have failed when its server was killed"
    assert 64 <= len(acknowledged) < 512
    server.start()
    store = MaterialsStore(open_database(launchpad_config))
    stored = {d["_id"]: d for d in store.collection.find({})}
    assert set(acknowledged) <= set(stored)
    for doc in stored.values():  # nothing half-written
        assert Structure.from_dict(doc["structure"]).composition.reduced_formula == \
            doc["reduced_formula"]
        assert set(doc["labels"]) == {"formation_energy_per_atom", "band_gap"}
    report = ingest(spec, store, workers=2, skip_existing=True, progress=False)
    assert report.written == 512 and store.count() == 512
