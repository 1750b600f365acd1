"""The diffusion generator on several GPUs of one node (data parallel).

Every rank runs :func:`matcouple.directive.train.train` unchanged; the checkpoint is the
single-GPU one (bare model, EMA, optimizer), so a run moves between 1 and N GPUs freely.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matcouple.directive.model import DenoiserConfig
from matcouple.directive.train import TrainConfig, train
from matcouple.distributed import current, default_backend, launch
from matcouple.errors import MatcoupleError


def _rank_train(out: Path, config: TrainConfig | None, model_config: DenoiserConfig | None,
                kwargs: dict[str, Any]) -> dict | None:
    summary = train(out, config, model_config, **kwargs)
    return summary if current().is_main else None


def train_on_gpus(out: Path, config: TrainConfig | None = None,
                  model_config: DenoiserConfig | None = None, *, gpus: int,
                  backend: str | None = None, device: str | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """Train on ``gpus`` data-parallel ranks (0: CPU, 1: one device without DDP).

    ``config.batch_size`` is per rank (global batch = ``gpus`` x that; the learning rate
    follows ``config.lr_scaling``); ``backend='gloo'`` runs CPU processes. Returns rank 0's
    summary.
    """
    if gpus < 0:
        raise MatcoupleError(f"--gpus must be 0 (CPU) or more, got {gpus}")
    if gpus <= 1 and backend is None:
        return train(out, config, model_config, device="cpu" if gpus == 0 else device,
                     **kwargs)
    backend = backend or default_backend()
    ranks = max(gpus, 1)
    threads = max(1, (os.cpu_count() or 1) // ranks) if backend == "gloo" else None
    kwargs = {**kwargs, "device": "cpu" if backend == "gloo" else device}  # world 1: no group
    return launch(_rank_train, [(out, config, model_config, kwargs)] * ranks, backend=backend,
                  threads_per_process=threads)[0]
