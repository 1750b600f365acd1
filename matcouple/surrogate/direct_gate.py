"""An e3nn ``Gate``'s forward pass without its generic extraction and product modules.

e3nn's ``Gate`` splits its input with ``Extract`` (a copy per part), applies the
activations, multiplies the gated irreps by their gates with an
``ElementwiseTensorProduct`` and concatenates. On the edges of Crysformer's attention
blocks that costs ~10% of a CPU forward pass. For the layouts ``Gate`` produces the three
parts are column ranges of the input and each gate multiplies one irrep instance, so
slicing and one broadcast product per irrep type give the same numbers with fewer copies.
"""

from __future__ import annotations

import torch
from e3nn.nn import Gate


def _columns(part: torch.Tensor) -> slice | torch.Tensor:
    """The input columns an extracted part reads (from the part of an identity matrix):
    a slice when they are one increasing run, else an index tensor."""
    if not part.shape[-1]:
        return slice(0, 0)
    cols = part.argmax(dim=0)
    if bool((cols.diff() == 1).all()):
        return slice(int(cols[0]), int(cols[-1]) + 1)
    return cols


def _take(x: torch.Tensor, cols: slice | torch.Tensor) -> torch.Tensor:
    return x[..., cols] if isinstance(cols, slice) else x[..., cols.to(x.device)]


class DirectGate:
    """``gate(x)`` computed directly (same math, fewer copies); differentiable.

    A plain object, not a Module: the ``Gate`` keeps owning its (parameter-free)
    activations, state dicts are unchanged."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        dim = gate.irreps_in.dim
        with torch.no_grad():
            scalars, gates, gated = gate.sc(torch.eye(dim))
        self._scalars, self._gates, self._gated = map(_columns, (scalars, gates, gated))
        self._blocks = [(mul, ir.dim) for mul, ir in gate.irreps_gated]
        if gate.irreps_gates.num_irreps != sum(mul for mul, _ in self._blocks):
            raise ValueError("each gated irrep needs exactly one gate")
        # on_blocks needs the scalars and gates as column runs of the scalar input
        self.takes_blocks = all(isinstance(c, slice) for c in (self._scalars, self._gates)) \
            and len({ir for _, ir in gate.irreps_gated}) == len(self._blocks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scalars = self.gate.act_scalars(_take(x, self._scalars))
        if not self._blocks:
            return scalars
        gates = self.gate.act_gates(_take(x, self._gates))
        gated = _take(x, self._gated)
        lead = x.shape[:-1]
        out, col, g = [scalars], 0, 0
        for mul, dim in self._blocks:
            block = gated[..., col:col + mul * dim].reshape(*lead, mul, dim)
            out.append((block * gates[..., g:g + mul, None]).reshape(*lead, mul * dim))
            col, g = col + mul * dim, g + mul
        return torch.cat(out, dim=-1)

    def on_blocks(self, scalar_in: torch.Tensor, gated: list[torch.Tensor]
                  ) -> list[torch.Tensor]:
        """The gate on component-major blocks (the fused tensor products' layout):
        ``scalar_in`` (n, scalars + gates) holds the gate's scalar input columns, ``gated``
        one (n, components, channels) block per gated irrep, in order; returns the
        activated scalars as (n, 1, channels) followed by the gated blocks."""
        if not self.takes_blocks:
            raise ValueError("this gate's scalars and gates are not column runs")
        scalars = self.gate.act_scalars(scalar_in[:, self._scalars])
        out = [scalars.unsqueeze(1)]
        if self._blocks:
            gates = self.gate.act_gates(scalar_in[:, self._gates])
            g = 0
            for (mul, _), block in zip(self._blocks, gated, strict=True):
                out.append(block * gates[:, None, g:g + mul])
                g += mul
        return out
