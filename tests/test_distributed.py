"""Data-parallel training with real process groups: 2 CPU ranks over gloo (spawned)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fireworks import FWorker
from fireworks.user_objects.queue_adapters.common_adapter import CommonAdapter

from matcouple.directive.model import DenoiserConfig
from matcouple.directive.train import TrainConfig as GeneratorConfig
from matcouple.distributed import DistributedError, launch, scaled_lr
from matcouple.settings import get_settings
from matcouple.store.connection import open_launchpad
from matcouple.surrogate.batching import GlobalBatchSampler
from matcouple.surrogate.parallel import train_members
from matcouple.surrogate.train import TrainConfig, train
from matcouple.training_tasks import training_workflow
from tests import ddp_workers

CI = get_settings().data_dir / get_settings().datasets["mp2018-ci"]
pytestmark = pytest.mark.skipif(not CI.exists(), reason="data sets not present")
# Dropout off: with it, N ranks draw other masks than one process (a different, valid run).
TINY = {"scalars": 8, "vectors": 4, "tensors": 4, "layers": 1, "heads": 4, "rbf": 8,
        "dropout": 0.0}
QUIET = {"progress": False, "workers": 1}


def _cfg(**kw) -> TrainConfig:
    base = dict(data=str(CI), split_column="ci_split", epochs=2, batch_size=4, lr=3e-3,
                limit_train=21, model=TINY, seed=7, lr_scaling="none")
    base.update(kw)
    return TrainConfig(**base)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


def test_global_batches_are_the_single_process_batches():
    """Rank slices of every global batch tile it exactly, the last partial one included."""
    n, b, world = 21, 4, 3
    single = list(GlobalBatchSampler(n, b * world, torch.Generator().manual_seed(1)))
    ranks = [GlobalBatchSampler(n, b, torch.Generator().manual_seed(1), r, world)
             for r in range(world)]
    per_rank = [list(s) for s in ranks]
    for k, batch in enumerate(single):
        joined = [i for r in range(world) if ranks[r].local_size(k) for i in per_rank[r][k]]
        assert joined == batch
        assert sum(s.local_size(k) for s in ranks) == len(batch)
    assert scaled_lr(1e-3, 4, "sqrt") == pytest.approx(2e-3)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two gloo ranks, batch 4 each, 2 epochs: every rank's final state and the checkpoint."""
    out = tmp_path_factory.mktemp("ddp") / "ddp.pt"
    return out, launch(ddp_workers.surrogate_state, [(_cfg(), out, QUIET)] * 2,
                       backend="gloo", threads_per_process=1)


def test_two_ranks_of_batch_b_train_like_one_process_of_batch_2b(ddp_run, tmp_path):
    """Same init, same global batches (21 crystals: the last batch is partial and uneven),
    gradients all-reduced: both ranks end equal, and equal to one process with batch 8."""
    out, (r0, r1) = ddp_run
    single = train(_cfg(batch_size=8), tmp_path / "single.pt", device="cpu", **QUIET)
    assert _max_diff(r0["state_dict"], r1["state_dict"]) == 0.0
    assert _max_diff(r0["state_dict"], single["state_dict"]) < 1e-5
    assert [h["train_loss"] for h in r0["history"]] == pytest.approx(
        [h["train_loss"] for h in single["history"]], rel=1e-5)
    for key in ("val_mae_formation_energy_per_atom", "val_mae_band_gap"):  # sharded val
        assert r0["history"][-1][key] == pytest.approx(single["history"][-1][key], rel=1e-5)
    saved = torch.load(out, weights_only=True)
    assert not any(k.startswith("module.") for k in saved["state_dict"])
    assert [h["gpus"] for h in saved["history"]] == [2, 2]


def test_checkpoints_move_between_ddp_and_one_process(ddp_run, tmp_path):
    out, (r0, _) = ddp_run
    shutil.copy(out, tmp_path / "a.pt")
    resumed = train(_cfg(epochs=3), tmp_path / "a.pt", device="cpu", **QUIET)
    assert resumed["epoch"] == 3 and [h["gpus"] for h in resumed["history"]] == [2, 2, 1]
    assert resumed["history"][:2] == r0["history"]
    one = train(_cfg(), tmp_path / "b.pt", device="cpu", chunk_epochs=1, **QUIET)
    both = launch(ddp_workers.surrogate_state, [(_cfg(), tmp_path / "b.pt", QUIET)] * 2,
                  backend="gloo", threads_per_process=1)
    assert [r["epoch"] for r in both] == [2, 2]
    assert _max_diff(both[0]["state_dict"], both[1]["state_dict"]) == 0.0
    assert both[0]["history"][0] == one["history"][0]
    assert [h["gpus"] for h in both[0]["history"]] == [1, 2]
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 2


def test_generator_ranks_stay_in_sync(tmp_path):
    config = GeneratorConfig(datasets=["perov5"], batch_size=8, lr=3e-3, warmup_steps=2,
                             csp_fraction=0.5, limit=48, seed=0, step_lr=1e-5,
                             lr_scaling="none")
    tiny = DenoiserConfig(hidden=16, layers=1, frequencies=4, time_dim=8)
    r0, r1 = launch(ddp_workers.generator_steps, [(tmp_path / "g.pt", config, tiny, 3)] * 2,
                    backend="gloo", threads_per_process=1)
    assert not torch.equal(r0["first_batch"], r1["first_batch"])  # different crystals
    assert _max_diff(r0["params"], r1["params"]) == 0.0  # yet the same update
    assert _max_diff(r0["params"], r0["init"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(r0["grads"], r1["grads"], strict=True))
    assert r0["summary"]["step"] == 3 and r0["summary"]["gpus"] == 2
    assert r1["summary"] is not None and (tmp_path / "g.pt").exists()
    saved = torch.load(tmp_path / "g.pt", weights_only=True)
    assert saved["step"] == 3 and not any(k.startswith("module.") for k in saved["model"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_a_failing_rank_stops_the_run_with_its_error(mode):
    with pytest.raises(DistributedError) as info:
        launch(ddp_workers.fail_on_rank_one, [(mode,)] * 2, backend="gloo")
    message = str(info.value)
    assert "rank 1" in message
    if mode == "raise":
        assert "rank one refuses its shard" in message


def test_members_train_side_by_side(tmp_path):
    results = train_members(_cfg(epochs=1), tmp_path / "m.pt", members=2, gpus=0,
                            parallel=True, export=tmp_path / "model.pt", **QUIET)
    assert [r["seed"] for r in results] == [7, 8]
    for seed in (7, 8):
        assert torch.load(tmp_path / f"m-s{seed}.pt", weights_only=True)["train_config"][
            "seed"] == seed
        assert (tmp_path / f"model-s{seed}.pt").exists()


@pytest.mark.parametrize("name,scheduler,line", [
    ("my_qadapter_slurm_gpu.yaml", "slurm", "#SBATCH --gres=gpu:8"),
    ("my_qadapter_pbs_gpu.yaml", "pbs", "#PBS -l select=1:ncpus=16:ngpus=8"),
])
def test_gpu_queue_adapters_take_the_fireworks_gpu_count(name, scheduler, line, tmp_path):
    configs = Path(__file__).resolve().parents[1] / "fw_configs"
    adapter = yaml.safe_load((configs / name).read_text())
    if "_fw_template_file" in adapter:
        adapter["_fw_template_file"] = str(configs / "PBS_gpu_template.txt")
    adapter = CommonAdapter.from_dict(adapter)
    wf = training_workflow("generator", GeneratorConfig(), tmp_path / "g.pt", gpus=8,
                           scheduler=scheduler)
    adapter.update(wf.fws[0].spec["_queueadapter"])  # what `qlaunch -r` does
    script = adapter.get_script_str(str(tmp_path))
    assert line in script and "my_fworker_gpu.yaml" in script
    assert FWorker.from_file(str(configs / "my_fworker_gpu.yaml")).category == "gpu"


def test_training_firework_asks_for_gpus_and_runs(launchpad_config, cli_env, tmp_path):
    # A 0.001-minute chunk stops after epoch 1 of 2 and queues its own continuation.
    wf = training_workflow("surrogate", _cfg(epochs=2, limit_train=12), tmp_path / "fw.pt",
                           gpus=2, backend="gloo", minutes=0.001)
    spec = wf.fws[0].spec
    assert spec["_queueadapter"] == {"nodes": 1, "gres": "gpu:2"}
    assert spec["_category"] == get_settings().training_category
    lp = open_launchpad(launchpad_config)
    lp.add_wf(wf)
    worker = tmp_path / "fworker.yaml"
    worker.write_text(yaml.safe_dump({"name": "gpu node", "category": ["gpu"], "query": "{}"}))
    rlaunch = shutil.which("rlaunch", path=str(Path(sys.executable).parent)) or "rlaunch"
    proc = subprocess.run([rlaunch, "-l", str(launchpad_config.path), "-w", str(worker),
                           "singleshot"], cwd=tmp_path, env=cli_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fw = lp.get_fw_by_id(min(lp.get_fw_ids()))
    assert fw.state == "COMPLETED", lp.launches.find_one({"fw_id": fw.fw_id})["action"]
    stored = lp.launches.find_one({"fw_id": fw.fw_id})["action"]["stored_data"]
    assert not stored["done"] and stored["members"][0]["epoch"] == 1
    follow = lp.get_fw_by_id(max(lp.get_fw_ids()))
    assert follow.fw_id != fw.fw_id and follow.state == "READY"
    assert follow.spec["_queueadapter"] == spec["_queueadapter"]
    assert follow.tasks[0]["out"] == str((tmp_path / "fw.pt").resolve())
    assert torch.load(tmp_path / "fw-s7.pt", weights_only=True)["history"][0]["gpus"] == 2
