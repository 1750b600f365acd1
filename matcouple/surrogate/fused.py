"""Inference path of Crysformer's edge tensor products: TP + the Linear after it as GEMMs.

e3nn evaluates a depthwise ("uvu") tensor product instruction by instruction, each as an
einsum with its own outer product, reshapes and copies (about 100 small kernels per call,
memory-bound on a CPU), and ``o3.Linear`` adds as many again. Here the product of one
input block with all spherical-harmonic components is one outer product and one GEMM
against a constant Clebsch-Gordan matrix, and the Linear that follows is one matmul per
output irrep. The constants are derived from the e3nn modules themselves (the Linear by
probing it with the identity) and rebuilt whenever their parameters change, so the
result is the e3nn result up to float rounding and training code never sees this path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from e3nn import o3


@dataclass
class _Path:
    """One TP instruction followed by its part of the Linear."""

    w_cols: slice         # its per-edge weights
    out_type: int         # index into the output irrep types
    matrix: torch.Tensor  # (mul, mul out): its rows of the Linear (x shared TP weights)
    q_cols: slice         # its columns in the block's product with all its matrices


@dataclass
class _InputBlock:
    """One irrep block of the first input and the instructions that read it."""

    x: slice
    mul: int
    dim: int
    paths: list[_Path]
    matrix: torch.Tensor  # (mul, sum of mul out): the paths' matrices side by side


@dataclass
class _OutputType:
    """One irrep block of the Linear's output and its columns of P = sh @ cg."""

    dim: int
    p_cols: slice


def _check_supported(tp: o3.TensorProduct, lin: o3.Linear) -> None:
    if any(mul != 1 for mul, _ in tp.irreps_in2):
        raise ValueError("fused TP needs a multiplicity-1 second input (spherical harmonics)")
    if any(ins.connection_mode != "uvu" or not ins.has_weight for ins in tp.instructions):
        raise ValueError("fused TP supports weighted 'uvu' instructions only")
    if lin.irreps_in.dim != tp.irreps_out.dim:
        raise ValueError("the Linear must read the tensor product's output")
    out = lin.irreps_out.simplify()
    if len({ir for _, ir in out}) != len(out):
        raise ValueError("fused TP needs one Linear output block per irrep type")


def _linear_matrix(lin: o3.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense matrix (in, out), bias (out,)) of an o3.Linear, read off by probing it."""
    like = {"device": lin.weight.device, "dtype": lin.weight.dtype}
    eye = torch.eye(lin.irreps_in.dim, **like)
    zero = torch.zeros(1, lin.irreps_in.dim, **like)
    with torch.no_grad():
        bias = lin(zero)[0]
        return lin(eye) - bias, bias


class FusedTPLinear:
    """``lin(tp(x, sh, weight))`` for a depthwise TP whose second input is SH.

    Per edge, output type t: f_t[m, w] = sum over paths and a of P[m, a] Q[a, w], with
    Q = x (components a, channels u) @ Linear rows (x weights) -- one GEMM per input
    block -- and P = SH contracted with the path's CG matrix; the sum is one batched
    matmul per output type. Nothing of size (edges x TP output) is ever formed."""

    def __init__(self, tp: o3.TensorProduct, lin: o3.Linear) -> None:
        # A plain object, not a Module: the e3nn modules stay the only owners of the
        # parameters (state dicts unchanged), this only reads them.
        _check_supported(tp, lin)
        self.tp, self.lin = tp, lin
        self.shared = tp.internal_weights
        self._version: tuple | None = None

    def _source_version(self) -> tuple:
        """Changes with any in-place update (optimizer step, load_state_dict) and with
        any move or cast of the parameters (``.to``, ``.double()``)."""
        params = [*self.tp.parameters(), *self.lin.parameters()]
        return tuple((id(p), p.data_ptr(), p.dtype, p._version) for p in params)

    def _build(self) -> None:
        """Constant matrices from the current e3nn modules (cheap; on parameter change)."""
        tp, lin = self.tp, self.lin
        sh_dim, sh_offsets = tp.irreps_in2.dim, [sl.start for sl in tp.irreps_in2.slices()]
        tp_slices = tp.irreps_out.slices()
        dense, bias = _linear_matrix(lin)
        out_irreps = lin.irreps_out.simplify()
        out_slices = out_irreps.slices()
        types = {ir: t for t, (_, ir) in enumerate(out_irreps)}
        blocks = [_InputBlock(sl, mul, ir.dim, [], torch.zeros(0))
                  for (mul, ir), sl in zip(tp.irreps_in1, tp.irreps_in1.slices(), strict=True)]
        cgs: list[list[torch.Tensor]] = [[] for _ in out_irreps]
        w_offsets = torch.tensor([0] + [ins.path_shape[0] * ins.path_shape[1]
                                        for ins in tp.instructions]).cumsum(0).tolist()
        # block by block: the order forward() stacks each type's Q parts in
        order = sorted(range(len(tp.instructions)), key=lambda k: tp.instructions[k].i_in1)
        for k in order:
            ins, w_col = tp.instructions[k], w_offsets[k]
            mul, ir_in = tp.irreps_in1[ins.i_in1]
            l2 = tp.irreps_in2[ins.i_in2].ir.l
            ir_out = tp.irreps_out[ins.i_out].ir
            t = types[ir_out]
            # P[e, k, a] = sum_b sh[e, b] * path_weight * C[a, b, k]
            cg = torch.zeros(sh_dim, ir_out.dim, ir_in.dim, dtype=torch.float64)
            j0 = sh_offsets[ins.i_in2]
            # wigner_3j in the default dtype, as e3nn stores it (same constants)
            w3j = o3.wigner_3j(ir_in.l, l2, ir_out.l).to(torch.float64)
            cg[j0:j0 + 2 * l2 + 1] = ins.path_weight * w3j.permute(1, 2, 0)
            # channel u, component 0 of this TP output -> channel w, component 0
            isl, osl = tp_slices[ins.i_out], out_slices[t]
            m = dense[isl.start:isl.stop:ir_out.dim, osl.start:osl.stop:ir_out.dim]
            if self.shared:  # constant weights: fold them into the Linear
                m = tp.weight.detach()[w_col:w_col + mul, None] * m
            blk = blocks[ins.i_in1]
            q0 = sum(path.matrix.shape[1] for path in blk.paths)
            cgs[t].append(cg)
            blk.paths.append(_Path(slice(w_col, w_col + mul), t, m.contiguous(),
                                   slice(q0, q0 + m.shape[1])))
        for blk in blocks:
            if blk.paths:
                blk.matrix = torch.cat([path.matrix for path in blk.paths], dim=1)
        self._in_blocks = [blk for blk in blocks if blk.paths]
        if any(not c for c in cgs):
            raise ValueError("every Linear output type must be reached by a TP path")
        # P's columns per type: (dim, rows), rows = (path, component in) as stacked in Q
        mats = [torch.cat(c, dim=2).reshape(sh_dim, -1) for c in cgs]
        bounds = torch.tensor([0] + [m.shape[1] for m in mats]).cumsum(0).tolist()
        self._types = [_OutputType(ir.dim, slice(bounds[t], bounds[t + 1]))
                       for t, (_, ir) in enumerate(out_irreps)]
        self._cg = torch.cat(mats, dim=1).to(dense)
        self._bias = bias if bias.abs().max() > 0 else None
        self._version = self._source_version()

    def __call__(self, x: torch.Tensor, sh: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        if self._version != self._source_version():
            self._build()
        n = x.shape[0]
        p = sh @ self._cg
        parts: list[list[torch.Tensor]] = [[] for _ in self._types]
        for blk in self._in_blocks:
            xt = x[:, blk.x].view(n, blk.mul, blk.dim).transpose(1, 2)
            if self.shared:  # one GEMM for all paths of the block
                q = (xt.reshape(n * blk.dim, blk.mul) @ blk.matrix).view(n, blk.dim, -1)
            for path in blk.paths:
                if self.shared:
                    parts[path.out_type].append(q[:, :, path.q_cols])
                else:
                    xw = (xt * weight[:, path.w_cols].unsqueeze(1)).reshape(n * blk.dim, -1)
                    parts[path.out_type].append((xw @ path.matrix).view(n, blk.dim, -1))
        out = []
        for t, qs in zip(self._types, parts, strict=True):
            # (n, dim, rows) @ (n, rows, mul): all paths into this type in one product
            f = torch.bmm(p[:, t.p_cols].view(n, t.dim, -1), torch.cat(qs, dim=1))
            out.append(f.view(n, -1) if t.dim == 1 else f.transpose(1, 2).reshape(n, -1))
        result = torch.cat(out, dim=1)
        return result if self._bias is None else result + self._bias
