"""Exponential moving average of the weights during training.

The average over the last ~1/(1-decay) steps sits nearer the centre of the loss basin than
the last step's weights, which still carry the noise of the recent mini-batches; it is the
set that is evaluated, kept as the best and shipped when a run averages. The decay ramps
up from 0 ((1 + step) / (10 + step)) so the first steps are not averaged with the random or
warm-start weights for ~1/(1-decay) steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """EMA of every floating-point tensor of a module's state (parameters and buffers),
    bound to that module: ``update`` reads its tensors as they are now."""

    def __init__(self, model: nn.Module, decay: float,
                 state: dict[str, torch.Tensor] | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        own = model.state_dict()
        source = state if state is not None else own
        missing = set(own) - set(source)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:3]}")
        self.shadow = {k: source[k].detach().to(own[k].device, own[k].dtype).clone()
                       for k in own}
        # The module's own tensors, read once: the optimizer and load_state_dict update
        # them in place, so every step lerps towards the current weights without
        # rebuilding the state dict.
        floats = [k for k, v in own.items() if v.is_floating_point()]
        self._targets = [self.shadow[k] for k in floats]
        self._live = [own[k] for k in floats]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the current weights (after optimizer step ``step``)."""
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(self._targets, self._live, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in ``model`` for the block's duration (evaluation), the
        trained ones back afterwards."""
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(trained)
