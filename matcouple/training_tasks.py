"""FireTasks that train the surrogate or the generator on the GPUs of one node, and the
workflow builder whose Firework asks the queue for those GPUs.

A training Firework is one unit of expensive work: it trains for at most ``minutes``
(below the queue walltime), saves the checkpoint, and, if the run is not finished, adds a
copy of itself that resumes from that checkpoint. Its spec carries ``_queueadapter`` keys
for N GPUs on one node (``gres: gpu:N`` for SLURM, ``ngpus: N`` for the PBS GPU template
in ``fw_configs/``); ``qlaunch -r`` (reservation mode) applies them per job.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from fireworks import FiretaskBase, Firework, FWAction, Workflow, explicit_serialize

from matcouple.settings import get_settings

KINDS = ("surrogate", "generator")


def gpu_request(gpus: int, scheduler: str = "slurm") -> dict[str, Any]:
    """``_queueadapter`` keys asking for ``gpus`` GPUs on one node: ``gres`` for SLURM,
    ``ngpus`` for PBS with ``fw_configs/PBS_gpu_template.txt``."""
    if scheduler == "slurm":
        return {"nodes": 1, **({"gres": f"gpu:{gpus}"} if gpus else {})}
    if scheduler == "pbs":
        return {"nnodes": 1, **({"ngpus": gpus} if gpus else {})}
    raise ValueError(f"unknown scheduler {scheduler!r}; use 'slurm' or 'pbs'")


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _continuation(task: FiretaskBase, fw_spec: dict, done: bool, summary: dict) -> FWAction:
    if done:
        return FWAction(stored_data=summary)
    spec = {k: v for k, v in fw_spec.items() if not k.startswith("_") or k in (
        "_category", "_queueadapter", "_fworker")}
    params = {k: v for k, v in task.items() if not k.startswith("_")}
    more = Firework([task.__class__(**params)], spec=spec,
                    name=f"continue training {Path(task['out']).name}")
    return FWAction(stored_data=summary, additions=[more])


@explicit_serialize
class TrainSurrogateTask(FiretaskBase):
    """Train (or continue) Crysformer; ``config`` holds the TrainConfig fields."""

    required_params = ["config", "out"]
    optional_params = ["gpus", "backend", "members", "parallel_members", "minutes", "export"]

    def run_task(self, fw_spec: dict) -> FWAction:
        from matcouple.surrogate.parallel import train_members
        from matcouple.surrogate.train import TrainConfig

        cfg = TrainConfig(**{**self["config"], "targets": tuple(self["config"]["targets"])})
        gpus = self.get("gpus")
        results = train_members(
            cfg, Path(self["out"]), members=int(self.get("members", 1)),
            gpus=_visible_gpus() if gpus is None else int(gpus), backend=self.get("backend"),
            parallel=bool(self.get("parallel_members", False)), minutes=self.get("minutes"),
            export=Path(self["export"]) if self.get("export") else None, progress=False,
            cache_dir=get_settings().graph_cache_dir)
        done = all(r["epoch"] >= cfg.epochs for r in results)
        summary = {"members": [{k: r[k] for k in ("seed", "checkpoint", "epoch")}
                               | {"last": r["history"][-1]} for r in results], "done": done}
        return _continuation(self, fw_spec, done, summary)


@explicit_serialize
class TrainGeneratorTask(FiretaskBase):
    """Train (or continue) the diffusion generator; ``config`` holds TrainConfig fields."""

    required_params = ["config", "out"]
    optional_params = ["model_config", "gpus", "backend", "minutes", "export"]

    def run_task(self, fw_spec: dict) -> FWAction:
        from matcouple.directive.model import DenoiserConfig
        from matcouple.directive.parallel import train_on_gpus
        from matcouple.directive.train import TrainConfig, export_release

        config = TrainConfig.from_dict(self["config"])
        model_config = DenoiserConfig(**self["model_config"]) if self.get("model_config") \
            else None
        gpus = self.get("gpus")
        summary = train_on_gpus(
            Path(self["out"]), config, model_config,
            gpus=_visible_gpus() if gpus is None else int(gpus), backend=self.get("backend"),
            minutes=float(self.get("minutes", 8.0)), progress=False)
        done = summary["elapsed_s"] >= summary["budget_s"]
        if done and self.get("export"):
            summary["export"] = export_release(Path(self["out"]), Path(self["export"]))
        return _continuation(self, fw_spec, done, {**summary, "done": done})


def training_workflow(kind: str, config: Any, out: str | Path, *, gpus: int,
                      minutes: float | None = None, category: str | None = None,
                      scheduler: str | None = None, name: str | None = None,
                      **params: Any) -> Workflow:
    """One training Firework on ``gpus`` GPUs of one node (``gpus=0``: CPU).

    ``config`` is the surrogate's or generator's ``TrainConfig``; ``params`` go to the task
    (``members``, ``parallel_members``, ``export``, ``model_config``, ``backend``).
    ``scheduler`` ('slurm' or 'pbs', default from settings) picks the GPU request keys.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown training kind {kind!r}; use one of {KINDS}")
    if gpus < 0:
        raise ValueError(f"gpus must be 0 (CPU) or more, got {gpus}")
    task_params = {"config": _plain(asdict(config)), "out": str(Path(out).resolve()),
                   "gpus": gpus, **{k: v for k, v in params.items() if v is not None}}
    if "export" in task_params:
        task_params["export"] = str(Path(task_params["export"]).resolve())
    if "model_config" in task_params and not isinstance(task_params["model_config"], dict):
        task_params["model_config"] = asdict(task_params["model_config"])
    if minutes is not None:
        task_params["minutes"] = minutes
    task = TrainSurrogateTask(**task_params) if kind == "surrogate" \
        else TrainGeneratorTask(**task_params)
    spec = {"_category": category or get_settings().training_category,
            "_queueadapter": gpu_request(gpus, scheduler or get_settings().training_scheduler)}
    name = name or f"train {kind} {Path(out).stem}"
    return Workflow([Firework([task], spec=spec, name=name)], name=name,
                    metadata={"matcouple": f"train-{kind}", "gpus": gpus})


def _plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
