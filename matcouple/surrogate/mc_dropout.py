"""MC-dropout masks drawn ahead of the passes, in the order the passes would draw them.

A pass in train mode draws its dropout masks from the global generator as it goes, so MC
passes had to run one after another on one thread to stay reproducible. Drawing the same
masks up front (same generator, same order, same arithmetic as PyTorch's CPU dropout:
bernoulli(1 - p) / (1 - p)) and replaying them lets the passes run on any thread, in any
order, with the numbers of the sequential run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

_LOCAL = threading.local()


def replay_active() -> bool:
    """Whether this thread is inside :func:`replaying`."""
    return getattr(_LOCAL, "masks", None) is not None


@contextmanager
def replaying(masks: Iterable[torch.Tensor]) -> Iterator[None]:
    """Every MaskedDropout called in this thread takes the next of ``masks``."""
    _LOCAL.masks = iter(masks)
    try:
        yield
    finally:
        _LOCAL.masks = None


def draw_masks(shapes: Iterable[tuple[int, ...]], p: float,
               generator: torch.Generator) -> list[torch.Tensor]:
    """The masks nn.Dropout(p) would draw on the CPU for inputs of these shapes, in order,
    from ``generator`` (seeded like the global one: the same masks)."""
    masks = []
    for shape in shapes:
        mask = torch.empty(shape).bernoulli_(1 - p, generator=generator)
        masks.append(mask.div_(1 - p))
    return masks


class MaskedDropout(nn.Dropout):
    """nn.Dropout that, inside :func:`replaying`, applies the next given mask instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not replay_active():
            return super().forward(x)
        if self.p == 0.0:
            return x
        return x * next(_LOCAL.masks).to(x)
