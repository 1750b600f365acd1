"""Functions the data-parallel tests run in spawned ranks (importable, so spawn finds them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from matcouple.distributed import current
from matcouple.errors import MatcoupleError


def surrogate_state(cfg, out: Path, kwargs: dict) -> dict:
    """Every rank's final training state (not only rank 0's)."""
    from matcouple.surrogate.train import train

    state = train(cfg, out, **kwargs)
    return {"rank": current().rank, "state_dict": state["state_dict"],
            "history": state["history"], "epoch": state["epoch"]}


def generator_steps(out: Path, config, model_config, steps: int) -> dict:
    """Run the training loop for ``steps`` DDP steps, then take two more real steps by hand
    and return this rank's parameters, gradients and batch indices."""
    from matcouple.directive.data import load_training_data
    from matcouple.directive.diffusion import LossWeights, Schedules
    from matcouple.directive.train import _build, train, train_step

    ctx = current()
    summary = train(out, config, model_config, minutes=5, max_steps=steps, progress=False)
    data = load_training_data(config.datasets, "train", config.max_atoms, config.limit)
    torch.manual_seed(config.seed)
    state = _build(config, model_config, ctx.device)
    init = {k: v.clone() for k, v in state.model.state_dict().items()}
    state.net = ctx.wrap(state.model)
    generator = torch.Generator().manual_seed(100 + ctx.rank)
    first_batch = torch.randint(0, len(data), (config.batch_size,),
                                generator=generator.clone_state())
    schedules = Schedules.build(config.diffusion_steps, config.sigma_min, config.sigma_max)
    weights = LossWeights(config.loss_lattice, config.loss_frac, config.loss_types)
    for _ in range(2):
        train_step(state, data, schedules, config, weights, ctx.device, generator,
                   data.num_atoms.clone(), data.offsets.clone())
    return {"rank": ctx.rank, "summary": summary, "init": init,
            "params": {k: v.clone() for k, v in state.model.state_dict().items()},
            "grads": [p.grad.clone() for p in state.model.parameters() if p.grad is not None],
            "first_batch": first_batch}


def fail_on_rank_one(mode: str) -> str:
    """Rank 1 fails while rank 0 waits in a collective (it must not wait forever)."""
    ctx = current()
    if ctx.rank == 1:
        time.sleep(0.5)
        if mode == "raise":
            raise MatcoupleError("rank one refuses its shard")
        os._exit(3)
    ctx.barrier()
    ctx.sum(torch.ones(1))
    return "unreachable"
