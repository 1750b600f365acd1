"""Crysformer on several GPUs of one node: one run in data parallel, or ensemble members
side by side (one process per member, each pinned to its GPU).

Both reuse :func:`matcouple.surrogate.train.train` unchanged in every process, so
checkpoints, logs and resume are those of a single-GPU run: a checkpoint written on N GPUs
continues on one and vice versa.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from matcouple.distributed import current, default_backend, launch
from matcouple.errors import MatcoupleError
from matcouple.surrogate.train import TrainConfig, export_model, train


def _device_for(gpus: int, backend: str | None, device: str | None) -> str | None:
    if gpus == 0 or backend == "gloo":
        return "cpu"
    return device


def _cpu_threads(processes: int) -> int:
    return max(1, (os.cpu_count() or 1) // processes)


def _rank_train(cfg: TrainConfig, out: Path, kwargs: dict[str, Any]) -> dict | None:
    state = train(cfg, out, **kwargs)
    return state if current().is_main else None


def train_on_gpus(cfg: TrainConfig, out: Path, *, gpus: int, backend: str | None = None,
                  device: str | None = None, **kwargs: Any) -> dict:
    """Train one model on ``gpus`` data-parallel ranks (0: CPU, 1: one device, no DDP).

    ``backend='gloo'`` runs the ranks as CPU processes (tests, machines without GPUs).
    ``cfg.batch_size`` is per rank; the global batch is ``gpus`` times that and the
    learning rate follows ``cfg.lr_scaling``. Returns rank 0's final training state.
    """
    if gpus < 0:
        raise MatcoupleError(f"--gpus must be 0 (CPU) or more, got {gpus}")
    if gpus <= 1 and backend is None:
        return train(cfg, out, device=_device_for(gpus, backend, device), **kwargs)
    backend = backend or default_backend()
    ranks = max(gpus, 1)
    threads = _cpu_threads(ranks) if backend == "gloo" else None
    kwargs = {**kwargs, "device": _device_for(gpus, backend, device)}  # world 1: no group
    return launch(_rank_train, [(cfg, out, kwargs)] * ranks, backend=backend,
                  threads_per_process=threads)[0]


def member_path(path: Path, seed: int) -> Path:
    """File of the member with ``seed``: ``name-s<seed>.pt`` like the shipped ensemble."""
    return path.with_name(f"{path.stem}-s{seed}{path.suffix}")


def _member_train(cfg: TrainConfig, out: Path, device: str, kwargs: dict[str, Any]) -> dict:
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    state = train(cfg, out, device=device, **kwargs)
    return {"seed": cfg.seed, "checkpoint": str(out), "epoch": state["epoch"],
            "history": state["history"]}


def train_members(cfg: TrainConfig, out: Path, *, members: int, gpus: int,
                  backend: str | None = None, parallel: bool = False,
                  device: str | None = None, export: Path | None = None,
                  **kwargs: Any) -> list[dict]:
    """Train ``members`` ensemble members with seeds ``cfg.seed .. cfg.seed + members - 1``.

    ``parallel``: member k in its own process on GPU ``k % gpus`` (CPU processes with
    ``gpus=0`` or ``backend='gloo'``); otherwise one after another, each on all ``gpus``.
    Checkpoints (and exported models) are named ``<stem>-s<seed>.pt``.
    """
    if members < 1:
        raise MatcoupleError(f"--members must be at least 1, got {members}")
    configs = [replace(cfg, seed=cfg.seed + k) for k in range(members)]
    paths = [member_path(out, c.seed) for c in configs]
    if parallel:
        on_cpu = _device_for(gpus, backend, device) == "cpu" or not torch.cuda.is_available()
        if not on_cpu and gpus > torch.cuda.device_count():
            raise MatcoupleError(f"asked for {gpus} GPUs, this node has "
                                 f"{torch.cuda.device_count()}")
        jobs = [(c, p, "cpu" if on_cpu else f"cuda:{k % max(gpus, 1)}",
                 {**kwargs, "progress": kwargs.get("progress", True) and k == 0})
                for k, (c, p) in enumerate(zip(configs, paths, strict=True))]
        results = launch(_member_train, jobs,
                         threads_per_process=_cpu_threads(members) if on_cpu else None)
    else:
        results = []
        for c, p in zip(configs, paths, strict=True):
            state = train_on_gpus(c, p, gpus=gpus, backend=backend, device=device, **kwargs)
            results.append({"seed": c.seed, "checkpoint": str(p), "epoch": state["epoch"],
                            "history": state["history"]})
    if export is not None:
        for r in results:
            info = export_model(Path(r["checkpoint"]), member_path(export, r["seed"]))
            r["export"] = str(member_path(export, r["seed"]))
            r["val_mae"] = info["val_mae"]
    return results
