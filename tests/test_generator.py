"""Training, sampling and generation runs with a tiny generator trained here on CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from matcouple.directive.data import load_split
from matcouple.directive.generate import GenerationRequest, generate, generation_report
from matcouple.directive.model import DenoiserConfig
from matcouple.directive.sample import (
    HybridSizes,
    composition_numbers,
    load_generator,
    sample_crystals,
    size_sampler,
    to_structures,
)
from matcouple.directive.tasks import generation_workflow
from matcouple.directive.train import TrainConfig, export_release, read_checkpoint, train
from matcouple.errors import CheckpointError, GenerationError
from matcouple.settings import get_settings
from matcouple.store.connection import open_database, open_launchpad
from matcouple.structures.filters import FILTER_NAMES
from tests.conftest import requires_data, skip_without_data

BIN = Path(sys.executable).parent
TINY = DenoiserConfig(hidden=32, layers=2, frequencies=8, time_dim=16)
torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared CI machine


def _tiny_config(**changes) -> TrainConfig:
    config = TrainConfig(datasets=["perov5"], batch_size=32, lr=3e-3, warmup_steps=10,
                         csp_fraction=0.5, limit=96, seed=0, step_lr=1e-5)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained for 40 steps on 96 Perov-5 crystals, exported as a release file."""
    skip_without_data("perov5")
    base = tmp_path_factory.mktemp("gen")
    train(base / "train.pt", _tiny_config(), TINY, minutes=5, max_steps=40, progress=False)
    export_release(base / "train.pt", base / "release.pt")
    return base / "release.pt"


@requires_data("perov5")
def test_training_reduces_the_loss_and_resumes(tmp_path):
    out = tmp_path / "t.pt"
    config = _tiny_config(batch_size=64)
    first = train(out, config, TINY, minutes=5, max_steps=200, progress=False)
    assert first["step"] == 200
    before, after = first["first_losses"], first["last_losses"]  # steps 1-50 vs 151-200
    assert after["loss"] < 0.9 * before["loss"]
    for term in ("lattice", "frac", "types"):
        assert after[term] < 0.95 * before[term], term
    second = train(out, config, TINY, minutes=5, max_steps=250, progress=False)
    assert second["step"] == 250  # resumed at 200, not restarted
    payload = read_checkpoint(out)  # weights_only=True
    assert payload["step"] == 250 and "optimizer" in payload
    assert payload["data_hash"] == load_split("perov5", "train", limit=96).data_hash
    log = [json.loads(line) for line in (tmp_path / "t.log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [50, 100, 150, 200, 250]
    with pytest.raises(CheckpointError, match="other data"):
        train(out, _tiny_config(limit=64), TINY, minutes=1, max_steps=260, progress=False)


def test_sampling_returns_well_formed_crystals(checkpoint):
    gen = load_generator(checkpoint, "cpu")
    assert gen.max_atoms == 20 and gen.size_histogram[5] == 96
    numbers = composition_numbers("SrTiO3", gen)
    csp = sample_crystals(gen, torch.tensor([5, 5, 5]), torch.tensor(numbers * 3), steps=8)
    assert csp.lattice.shape == (3, 3, 3) and csp.frac.shape == (15, 3)
    assert torch.equal(csp.atomic_numbers, torch.tensor(numbers * 3))
    assert float(csp.frac.min()) >= 0 and float(csp.frac.max()) < 1
    free = sample_crystals(gen, torch.tensor([2, 7]), steps=8, seed=3)
    assert free.frac.shape == (9, 3)
    assert set(free.atomic_numbers.tolist()) <= set(gen.elements)
    structures = to_structures(free)
    assert [len(s) for s in structures if s is not None] == [
        n for n, s in zip([2, 7], structures, strict=True) if s is not None]
    again = sample_crystals(gen, torch.tensor([2, 7]), steps=8, seed=3)
    assert torch.equal(again.lattice, free.lattice)  # seeded


def test_size_strategies():
    histogram = [0, 0, 10, 0, 0, 90] + [0] * 15
    g = torch.Generator().manual_seed(0)
    data = size_sampler("data", histogram).sample(2000, g)
    assert set(data.tolist()) == {2, 5} and 0.85 < float((data == 5).float().mean()) < 0.95
    uniform = size_sampler("uniform", histogram).sample(2000, g)
    assert 0.45 < float((uniform == 5).float().mean()) < 0.55
    hybrid = HybridSizes(histogram, switch_ratio=0.75, window=2)
    for fraction in (0.4, 0.4, 0.35):
        hybrid.record(fraction)
    assert hybrid.current == "data"
    hybrid.record(0.2)  # mean of the last two (0.275) < 0.75 * 0.4
    assert hybrid.current == "uniform"
    with pytest.raises(GenerationError, match="strategy"):
        size_sampler("sometimes", histogram)


def test_bad_input_names_the_problem(checkpoint, launchpad_config, tmp_path):
    gen = load_generator(checkpoint, "cpu")
    db = open_database(launchpad_config)
    with pytest.raises(GenerationError, match="unknown element 'Xx'"):
        composition_numbers("Xx2O3", gen)
    with pytest.raises(GenerationError, match="25 atoms.*at most 20"):
        composition_numbers("Sr5Ti5O15", gen)
    with pytest.raises(GenerationError, match="not trained on element.*Og"):
        composition_numbers("OgO2", gen)
    for n in (0, -3):
        with pytest.raises(GenerationError, match="positive"):
            generate(GenerationRequest(n=n), db, generator=gen)
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_generator(tmp_path / "junk.pt")


def test_generation_run_stores_survivors_with_provenance(checkpoint, launchpad_config,
                                                         tmp_path):
    db = open_database(launchpad_config)
    gen = load_generator(checkpoint, "cpu")
    request = GenerationRequest(n=24, batch_size=8, steps=6, run="r1", strategy="hybrid",
                                output_dir=str(tmp_path / "cifs"), workers=1)
    result = generate(request, db, generator=gen, progress=False)
    report = result.report
    assert report.candidates == 24
    assert report.survivors == len(result.stored) == len(result.cif_files)
    assert report.survivors + sum(report.removed.values()) == 24
    assert set(report.removed) == set(FILTER_NAMES)
    run = generation_report(db, "r1")
    assert run["status"] == "completed" and len(run["batches"]) == 3
    assert run["report"]["removed"] == report.removed
    assert run["model"]["version"] == gen.version
    stored = list(db[get_settings().materials_collection].find({"generation.run": "r1"}))
    assert len(stored) == report.survivors
    for doc in stored:
        prov = doc["generation"]
        assert doc["source"] == "generated" and prov["model_version"] == gen.version
        assert prov["p_n_strategy"] == "hybrid" and prov["filters_passed"] == list(FILTER_NAMES)
        assert isinstance(prov["seed"], int)


def test_csp_run_and_its_cifs(checkpoint, launchpad_config, tmp_path):
    """Structure prediction for SrTiO3: every candidate has the asked composition."""
    db = open_database(launchpad_config)
    gen = load_generator(checkpoint, "cpu")
    request = GenerationRequest(n=6, composition="SrTiO3", formula_units=[1, 2], steps=6,
                                run="csp", output_dir=str(tmp_path / "out"), workers=1)
    result = generate(request, db, generator=gen, progress=False)
    assert result.report.candidates == 6
    for doc in db[get_settings().materials_collection].find({"generation.run": "csp"}):
        assert doc["reduced_formula"] == "SrTiO3" and doc["nsites"] in (5, 10)
        assert doc["generation"]["mode"] == "csp"
    for path in result.cif_files:
        assert Path(path).read_text().startswith("# generated using pymatgen")


def test_sampler_failure_keeps_what_is_stored(checkpoint, launchpad_config):
    """Batch 2 fails: batches 0-1 stay stored; the same run then continues from batch 2."""
    db = open_database(launchpad_config)
    gen = load_generator(checkpoint, "cpu")
    calls = []

    def failing_on_third_batch(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return sample_crystals(*args, **kwargs)

    request = GenerationRequest(n=20, batch_size=5, steps=4, run="flaky", workers=1)
    with pytest.raises(GenerationError, match="batch 2 of run 'flaky'.*stored"):
        generate(request, db, generator=gen, sampler=failing_on_third_batch, progress=False)
    run = generation_report(db, "flaky")
    assert run["status"] == "failed" and [b["index"] for b in run["batches"]] == [0, 1]
    kept = [i for b in run["batches"] for i in b["stored"]]
    materials = db[get_settings().materials_collection]
    assert materials.count_documents({"generation.run": "flaky"}) == len(kept)
    result = generate(request, db, generator=gen, progress=False)  # continue the run
    run = generation_report(db, "flaky")
    assert run["status"] == "completed" and [b["index"] for b in run["batches"]] == [0, 1, 2, 3]
    assert result.report.candidates == 20
    assert materials.count_documents({"generation.run": "flaky"}) == result.report.survivors


def _tool(name: str) -> str:
    return shutil.which(name, path=str(BIN)) or name


def test_generate_task_through_rlaunch(checkpoint, launchpad_config, cli_env, tmp_path):
    request = GenerationRequest(n=12, batch_size=6, steps=4, run="wf", checkpoint=str(checkpoint),
                                device="cpu", workers=1, output_dir=str(tmp_path / "cifs"))
    wf = generation_workflow(request, per_firework=6, launchpad_file=str(launchpad_config.path))
    assert len(wf.fws) == 2
    ids = open_launchpad(launchpad_config).add_wf(wf)
    proc = subprocess.run([_tool("rlaunch"), "-l", str(launchpad_config.path), "rapidfire"],
                          cwd=tmp_path, env=cli_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lp = open_launchpad(launchpad_config)
    db = open_database(launchpad_config)
    for fw_id in sorted(ids.values()):
        assert lp.get_fw_by_id(fw_id).state == "COMPLETED"
        launch = lp.launches.find_one({"fw_id": fw_id})
        stored = launch["action"]["stored_data"]
        assert stored["candidates"] == 6
        run = generation_report(db, stored["run"])
        assert run["status"] == "completed" and stored["run"] in {"wf.000", "wf.001"}
        assert run["report"]["survivors"] == stored["survivors"]


def test_cli_generates_and_refuses_bad_input(checkpoint, launchpad_config, cli_env, tmp_path):
    cmd = [sys.executable, "-m", "matcouple.cli", "generate"]
    out = tmp_path / "cifs"
    proc = subprocess.run([*cmd, "--n", "4", "--checkpoint", str(checkpoint), "--steps", "3",
                           "--run", "cli", "--output", str(out), "--workers", "1",
                           "--device", "cpu"], env=cli_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "candidates" in proc.stdout and "removed by has_symmetry" in proc.stdout
    run = generation_report(open_database(launchpad_config), "cli")
    assert run["report"]["candidates"] == 4
    assert len(list(out.glob("*.cif"))) == run["report"]["survivors"]
    proc = subprocess.run([*cmd, "--n", "5", "--checkpoint", str(tmp_path / "none.pt")],
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "none.pt not found" in proc.stderr
    proc = subprocess.run([*cmd, "--n", "4", "--submit", "--per-firework", "2", "--run", "sub",
                           "--category", "ai", "--checkpoint", str(checkpoint)], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "2 Fireworks added" in proc.stdout, proc.stderr
    lp = open_launchpad(launchpad_config)
    fws = list(lp.fireworks.find({"name": {"$regex": "^generate sub"}}))
    assert len(fws) == 2 and all(fw["spec"]["_category"] == "ai" for fw in fws)


def test_model_card(checkpoint):
    from matcouple.directive.card import model_card

    card = model_card(checkpoint)
    payload = read_checkpoint(checkpoint)
    assert payload["data_hash"] in card and "perov5" in card
    assert "optimizer" not in payload  # the release file carries no optimizer state


# A real, small Perov-5 model (hidden 128, 3 layers) trained for CSP on one CPU thread:
# python -m matcouple.directive.train --dataset perov5 --hidden 128 --layers 3
#   --batch-size 128 --lr 2e-3 --minutes 15 --budget-minutes 40 --out p.pt --export ...
# (export in float16). It places perovskites well enough that candidates survive.
SMALL_MODEL = Path(__file__).parent / "data" / "generator_perov5_cpu.pt"


def test_trained_model_predicts_srtio3_and_finds_its_own_duplicates(launchpad_config,
                                                                     tmp_path):
    db = open_database(launchpad_config)
    gen = load_generator(SMALL_MODEL, "cpu")
    request = GenerationRequest(n=8, composition="SrTiO3", formula_units=[1], steps=100,
                                run="sto", output_dir=str(tmp_path / "sto"), workers=1)
    first = generate(request, db, generator=gen, progress=False)
    assert first.report.survivors >= 1
    materials = db[get_settings().materials_collection]
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

    for doc, cif in zip(materials.find({"generation.run": "sto"}).sort("_id", 1),
                        sorted(first.cif_files), strict=True):
        assert doc["reduced_formula"] == "SrTiO3" and doc["nsites"] == 5
        assert doc["symmetry"]["number"] != 1
        assert 3.0 < doc["structure"]["lattice"]["a"] < 5.5  # a perovskite-sized cell
        assert StructureMatcher().fit(Structure.from_file(cif), Structure.from_dict(
            doc["structure"]))
    # The same request again: whatever passes the other filters is now in the database.
    again = generate(GenerationRequest(**{**request.__dict__, "run": "sto2",
                                          "output_dir": None}),
                     db, generator=gen, progress=False)
    assert again.report.survivors == 0
    assert again.report.removed["unique"] == first.report.survivors + \
        first.report.removed["unique"]
