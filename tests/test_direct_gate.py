"""DirectGate: an e3nn Gate's forward computed from column ranges (the fused paths use it)."""

import pytest
import torch
from e3nn import o3
from e3nn.nn import Gate

from matcouple.surrogate.direct_gate import DirectGate
from matcouple.surrogate.model import _gate


def _compare(gate: Gate) -> None:
    x = torch.randn(50, gate.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    ref = gate(x)
    (g_ref,) = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.shape[1])).sum(), x)
    out = DirectGate(gate)(x)
    (g_out,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[1])).sum(), x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("irreps", ["144x0e+36x1o+16x2e", "16x0e+4x1o+4x2e", "8x0e"])
def test_direct_gate_equals_e3nn_on_the_model_gates(irreps):
    _compare(_gate(o3.Irreps(irreps))[0])


def test_direct_gate_equals_e3nn_when_the_parts_interleave():
    # odd scalars sort after the gates: the scalars' columns are not one run
    gate = Gate("4x0e+2x0o", [torch.nn.functional.silu, torch.tanh], "3x0e",
                [torch.sigmoid], "2x1o+1x2e")
    assert not isinstance(DirectGate(gate)._scalars, slice)
    _compare(gate)


@pytest.mark.parametrize("irreps", ["144x0e+36x1o+16x2e", "16x0e+4x1o+4x2e", "8x0e"])
def test_direct_gate_on_component_major_blocks_equals_e3nn(irreps):
    """The fused edge path's gate: scalar columns plus one (n, components, channels)
    block per gated irrep in, the same numbers as e3nn's Gate (flat layout) out."""
    gate = _gate(o3.Irreps(irreps))[0]
    x = torch.randn(40, gate.irreps_in.dim, dtype=torch.float64)
    direct = DirectGate(gate)
    assert direct.takes_blocks
    n_scalar = gate.irreps_scalars.dim + gate.irreps_gates.dim
    start = n_scalar
    blocks = direct.on_blocks(x[:, :n_scalar], [
        x[:, start + sl.start:start + sl.stop].view(40, mul, ir.dim).transpose(1, 2)
        for (mul, ir), sl in zip(gate.irreps_gated, gate.irreps_gated.slices(), strict=True)])
    flat = torch.cat([b.transpose(1, 2).reshape(40, -1) for b in blocks], dim=1)
    torch.testing.assert_close(flat, gate(x), rtol=0, atol=1e-12)


def test_interleaved_gate_refuses_blocks():
    gate = Gate("4x0e+2x0o", [torch.nn.functional.silu, torch.tanh], "3x0e",
                [torch.sigmoid], "2x1o+1x2e")
    direct = DirectGate(gate)
    assert not direct.takes_blocks
    with pytest.raises(ValueError, match="column runs"):
        direct.on_blocks(torch.zeros(2, 9), [])
