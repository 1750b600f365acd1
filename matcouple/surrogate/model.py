"""Crysformer: an equivariant graph attention transformer for crystal properties.

Paper section 3.1 (eqs. 1-9), built from e3nn irreps:
  E_ij  = RBF(|r_ij|)                                  (1)
  x_ij  = phi(h_i) + phi(h_j)                           (2)
  f_ij  = phi_f(x_ij (x)_{cE} SH(r_ij))                 (3)  tensor product weighted by E
  zeta  = a^T LeakyReLU(f_ij^0); alpha = softmax_j      (4, 5) attention from the scalars
  mu    = Gate(f_ij^L); v_ij = phi_f(mu (x)_w SH(r_ij)) (6, 7) values from the type-L part
  P(i)  = sum_j alpha_ij v_ij ; P = mean_i P(i)         (8, 9) (alpha already sums to one)
Each block adds its attention output and an equivariant feed-forward network to the node
features (pre-norm residual), as in Equiformer. Invariant heads read the scalar channels,
averaged over atoms, for formation energy per atom and band gap. Dropout sits on the
attention weights and the scalar channels so MC-dropout gives an uncertainty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from e3nn import o3
from e3nn.nn import Gate
from torch import nn
from torch_geometric.utils import scatter, softmax

from matcouple.errors import MatcoupleError
from matcouple.surrogate.direct_gate import DirectGate
from matcouple.surrogate.fused import FusedTPLinear
from matcouple.surrogate.mc_dropout import MaskedDropout, replay_active


@dataclass(frozen=True)
class CrysformerConfig:
    """Hyper-parameters; stored in every checkpoint."""

    scalars: int = 96
    vectors: int = 24
    tensors: int = 12
    layers: int = 4
    heads: int = 4
    rbf: int = 32
    rbf_cutoff: float = 8.0
    lmax: int = 2
    dropout: float = 0.1
    atom_features: int = 84
    targets: tuple[str, ...] = ("formation_energy_per_atom", "band_gap")
    # Mean square below which an l>0 block is exactly zero by site symmetry and only holds
    # float32 round-off; the norm layers set it to zero instead of rescaling it to O(1)
    # (which made predictions for symmetric crystals depend on the cell's orientation).
    zero_floor: float = 1e-8
    # A learned vector per element added to the k-hot embedding's projection. The k-hot
    # table gives some elements identical rows (Pr, Nd, Pm, Sm, Tb; Gd, Dy, Ho, Er), which
    # the model alone cannot tell apart. Starts at zero, so --init-from a model without it
    # keeps that model's predictions.
    element_embedding: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


# Fields a user may set when training; targets come from the data, atom_features from
# the embedding table.
TUNABLE_FIELDS = ("scalars", "vectors", "tensors", "layers", "heads", "rbf", "rbf_cutoff",
                  "lmax", "dropout", "zero_floor", "element_embedding")
_BOOLEAN = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_model_overrides(items: list[str]) -> dict:
    """``["dropout=0", "scalars=144"]`` → ``{"dropout": 0.0, "scalars": 144}``, typed like
    :class:`CrysformerConfig`'s defaults; a clear error for an unknown name, a value of the
    wrong type or range, or channel counts the attention heads cannot split."""
    defaults = CrysformerConfig()
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in TUNABLE_FIELDS:
            raise MatcoupleError(f"model option {item!r}: expected NAME=VALUE with NAME one "
                                 f"of {', '.join(TUNABLE_FIELDS)}")
        kind = type(getattr(defaults, key))
        if kind is bool:
            word = raw.strip().lower()
            if word not in _BOOLEAN:
                raise MatcoupleError(f"model option {key}: {raw!r} is not one of 0, 1, "
                                     "true, false")
            out[key] = _BOOLEAN[word]
            continue
        try:
            value = kind(raw) if kind is float else int(raw)
        except ValueError:
            raise MatcoupleError(f"model option {key}: {raw!r} is not a {kind.__name__}") \
                from None
        if (key == "dropout" and not 0 <= value < 1) or (key != "dropout" and value < 0) \
                or (key in ("scalars", "layers", "heads", "rbf", "rbf_cutoff") and value <= 0):
            raise MatcoupleError(f"model option {key}={raw} is out of range")
        out[key] = value
    cfg = replace(defaults, **out)
    for name in ("scalars", "vectors", "tensors"):
        if getattr(cfg, name) % cfg.heads:
            raise MatcoupleError(f"model option {name}={getattr(cfg, name)} must be divisible "
                                 f"by heads={cfg.heads}")
    return out


def have_dropout(models) -> bool:
    """Whether every member was trained with dropout, i.e. MC-dropout passes give a spread."""
    return all(m.cfg.dropout > 0 for m in models)


def node_irreps(cfg: CrysformerConfig) -> o3.Irreps:
    parts = [(cfg.scalars, (0, 1)), (cfg.vectors, (1, -1))]
    if cfg.lmax >= 2 and cfg.tensors:
        parts.append((cfg.tensors, (2, 1)))
    return o3.Irreps(parts)


class GaussianRBF(nn.Module):
    """Gaussian expansion of distances on [0, cutoff] (eq. 1)."""

    def __init__(self, n: int, cutoff: float) -> None:
        super().__init__()
        self.register_buffer("centers", torch.linspace(0.0, cutoff, n))
        self.gamma = (n / cutoff) ** 2

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma * (d[:, None] - self.centers) ** 2)


class EquivariantLayerNorm(nn.Module):
    """LayerNorm for scalars, RMS normalisation of each l>0 block (keeps equivariance).

    A vector or tensor block that site symmetry makes zero (any centrosymmetric site has no
    l=1 feature, a cubic one no l=2 either) arrives as float round-off of ~1e-7; rescaled
    by 1/sqrt(eps) in every layer, that noise grew to O(1) and moved the prediction when
    the crystal was rotated. Blocks whose mean square is at most ``zero_floor`` are
    therefore set to zero.
    """

    def __init__(self, irreps: o3.Irreps, eps: float = 1e-5, zero_floor: float = 0.0) -> None:
        super().__init__()
        self.irreps = o3.Irreps(irreps)
        self.eps = eps
        self.zero_floor = zero_floor
        self.weight = nn.Parameter(torch.ones(self.irreps.num_irreps))
        self.bias = nn.Parameter(torch.zeros(sum(mul for mul, ir in self.irreps if ir.l == 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, w, b = [], 0, 0
        for (mul, ir), sl in zip(self.irreps, self.irreps.slices(), strict=True):
            block = x[:, sl].reshape(-1, mul, ir.dim)
            if ir.l == 0:
                block = block - block.mean(dim=1, keepdim=True)
            norm = block.pow(2).mean(dim=(1, 2), keepdim=True)
            scale = torch.rsqrt(norm + self.eps)
            if ir.l > 0 and self.zero_floor > 0:
                scale = torch.where(norm > self.zero_floor, scale, torch.zeros_like(scale))
            block = block * scale * self.weight[w:w + mul, None]
            if ir.l == 0:
                block = block + self.bias[b:b + mul, None]
                b += mul
            w += mul
            out.append(block.reshape(-1, mul * ir.dim))
        return torch.cat(out, dim=-1)


def _gate(irreps_out: o3.Irreps) -> tuple[Gate, o3.Irreps]:
    """A gate whose output is ``irreps_out`` and the irreps its input must have."""
    scalars = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l == 0])
    gated = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l > 0])
    gates = o3.Irreps([(gated.num_irreps, (0, 1))]) if gated.num_irreps else o3.Irreps("")
    gate = Gate(scalars, [nn.SiLU()] * len(scalars), gates, [torch.sigmoid] * len(gates),
                gated)
    return gate, gate.irreps_in


class ScalarDropout(nn.Module):
    """Dropout on the scalar channels only (l>0 channels untouched: stays equivariant)."""

    def __init__(self, irreps: o3.Irreps, p: float) -> None:
        super().__init__()
        self.n_scalar = sum(mul for mul, ir in o3.Irreps(irreps) if ir.l == 0)
        self.drop = MaskedDropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop.p == 0.0 or not (self.training or replay_active()):
            return x  # identity: skip the copy (inference speed)
        return torch.cat([self.drop(x[:, :self.n_scalar]), x[:, self.n_scalar:]], dim=-1)


def _depthwise_tp(irreps_in: o3.Irreps, irreps_sh: o3.Irreps, keep: o3.Irreps,
                  shared: bool) -> o3.TensorProduct:
    """Channel-wise ("uvu") tensor product, keeping only outputs of the types in ``keep``."""
    wanted = {ir for _, ir in keep}
    out, instr = [], []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in wanted:
                    instr.append((i, j, len(out), "uvu", True))
                    out.append((mul, ir_out))
    irreps_out = o3.Irreps(out)
    return o3.TensorProduct(irreps_in, irreps_sh, irreps_out, instr,
                            shared_weights=shared, internal_weights=shared)


class AttentionBlock(nn.Module):
    """One equivariant graph attention layer plus feed-forward network (eqs. 2-8)."""

    def __init__(self, cfg: CrysformerConfig, irreps: o3.Irreps, irreps_sh: o3.Irreps):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = EquivariantLayerNorm(irreps, zero_floor=cfg.zero_floor)
        # Messages are built in a narrower space (half the channels): the per-edge tensor
        # product is the cost of the model.
        msg = o3.Irreps([(max(mul // 2, cfg.heads), ir) for mul, ir in irreps])
        self.lin_dst = o3.Linear(irreps, msg)
        self.lin_src = o3.Linear(irreps, msg)
        self.tp_msg = _depthwise_tp(msg, irreps_sh, irreps, shared=False)
        self.rbf_mlp = nn.Sequential(nn.Linear(cfg.rbf, 64), nn.SiLU(),
                                     nn.Linear(64, self.tp_msg.weight_numel))
        # f_ij = [attention scalars | gate input for the values]
        self.att_dim = cfg.heads * 16
        value_gate, value_in = _gate(irreps)
        self.value_gate = value_gate
        self.irreps_f = (o3.Irreps(f"{self.att_dim}x0e") + value_in).simplify()
        self.n_att = self.att_dim
        self.lin_f = o3.Linear(self.tp_msg.irreps_out.simplify(), o3.Irreps(
            f"{self.att_dim}x0e") + value_in)
        self.alpha = nn.Parameter(torch.randn(cfg.heads, 16) * 0.1)
        self.tp_val = _depthwise_tp(irreps, irreps_sh, irreps, shared=True)
        self.lin_val = o3.Linear(self.tp_val.irreps_out.simplify(), irreps)
        self.att_drop = MaskedDropout(cfg.dropout)
        self.lin_out = o3.Linear(irreps, irreps)
        self.norm2 = EquivariantLayerNorm(irreps, zero_floor=cfg.zero_floor)
        ffn_gate, ffn_in = _gate(irreps)
        self.ffn_in = o3.Linear(irreps, ffn_in)
        self.ffn_gate = ffn_gate
        self.ffn_out = o3.Linear(irreps, irreps)
        self.drop = ScalarDropout(irreps, cfg.dropout)
        self.irreps = irreps
        self._value_split = self._head_split(irreps, cfg.heads)
        # Fused paths of the messages (eq. 3) and values (eq. 7), same math as
        # lin_f(tp_msg(.)) and lin_val(tp_val(.)) (set_fused): ``fused`` uses them without
        # autograd (inference; on CPU ~1.7x and ~2x faster than e3nn on those ops),
        # ``fused_training`` with autograd too (training; 1.8x per step on an H200).
        self.fused = False
        self.fused_training = False
        self._fused_val = FusedTPLinear(self.tp_val, self.lin_val)
        self._fused_msg = FusedTPLinear(self.tp_msg, self.lin_f)
        # the gates computed directly on the fused paths (same math; ~35% less time on
        # the edges' gate, e3nn's Gate stays the reference)
        self._direct_value_gate = DirectGate(self.value_gate)
        self._direct_ffn_gate = DirectGate(self.ffn_gate)
        # the edge side kept in component-major blocks from the messages to the weighted
        # sum (no e3nn layout in between) when the layouts line up, as they do for the
        # irreps node_irreps() makes
        self._edge_blocks = self._blocks_line_up()

    def _blocks_line_up(self) -> bool:
        """Whether the fused edge path can pass blocks: the messages' output types are the
        scalars then the gated irreps in the gate's order, and the gate's output blocks
        are the value product's input blocks one to one."""
        gate = self.value_gate
        msg_types = [ir for _, ir in self.lin_f.irreps_out.simplify()]
        gated = [ir for _, ir in gate.irreps_gated]
        gate_out = [(mul, ir) for mul, ir in (gate.irreps_scalars + gate.irreps_gated)]
        return (self._direct_value_gate.takes_blocks and msg_types[0] == o3.Irrep("0e")
                and msg_types[1:] == gated
                and [ir for _, ir in gate.irreps_scalars] == [o3.Irrep("0e")]
                and gate_out == [(mul, ir) for mul, ir in self.tp_val.irreps_in1])

    @staticmethod
    def _head_split(irreps: o3.Irreps, heads: int) -> list[tuple[int, int, int]]:
        for mul, _ in irreps:
            if mul % heads:
                raise ValueError(f"channel count {mul} must be divisible by heads={heads}")
        return [(mul, ir.dim, mul // heads) for mul, ir in irreps]

    def _weighted_sum(self, v: torch.Tensor, alpha: torch.Tensor, dst: torch.Tensor,
                      n: int) -> torch.Tensor:
        """sum_j alpha_ij^h v_ij over incoming edges, heads splitting each irrep's channels."""
        out, start = [], 0
        for mul, dim, per_head in self._value_split:
            block = v[:, start:start + mul * dim].reshape(-1, self.heads, per_head, dim)
            block = block * alpha[:, :, None, None]
            out.append(scatter(block, dst, dim=0, dim_size=n, reduce="sum").reshape(n, -1))
            start += mul * dim
        return torch.cat(out, dim=-1)

    def _weighted_sum_blocks(self, v: list[torch.Tensor], alpha: torch.Tensor,
                             dst: torch.Tensor, n: int) -> torch.Tensor:
        """:meth:`_weighted_sum` on component-major blocks (E, components, channels);
        the node-side result in e3nn's flat layout."""
        out = []
        for block in v:
            e, dim, mul = block.shape
            w = block.view(e, dim, self.heads, mul // self.heads) * alpha[:, None, :, None]
            s = scatter(w, dst, dim=0, dim_size=n, reduce="sum")
            out.append(s.view(n, dim, mul).transpose(1, 2).reshape(n, mul * dim))
        return torch.cat(out, dim=-1)

    def _attend_blocks(self, hn: torch.Tensor, edge_src: torch.Tensor,
                       edge_dst: torch.Tensor, sh: torch.Tensor, rbf: torch.Tensor
                       ) -> torch.Tensor:
        """Eqs. 2-7 and the weighted sum on the fused path, edges kept in blocks."""
        n = hn.shape[0]
        x = self.lin_dst(hn)[edge_dst] + self.lin_src(hn)[edge_src]          # (2)
        msg = self._fused_msg
        f = msg.forward_blocks(msg.split_input(x), sh, self.rbf_mlp(rbf))     # (3)
        f0 = f[0].view(f[0].shape[0], -1)
        alpha = self._attention(f0[:, :self.n_att], edge_dst, n)              # (4-5)
        mu = self._direct_value_gate.on_blocks(f0[:, self.n_att:], f[1:])    # (6)
        v = self._fused_val.forward_blocks(mu, sh)                            # (7)
        return self._weighted_sum_blocks(v, alpha, edge_dst, n)

    def _use_fused(self) -> bool:
        """Inference fusion without autograd; the training switch with autograd too."""
        return self.fused_training or (self.fused and not torch.is_grad_enabled())

    def _values(self, mu: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
        if self._use_fused():
            return self._fused_val(mu, sh)
        return self.lin_val(self.tp_val(mu, sh))

    def _messages(self, x: torch.Tensor, sh: torch.Tensor, weight: torch.Tensor
                  ) -> torch.Tensor:
        if self._use_fused():
            return self._fused_msg(x, sh, weight)
        return self.lin_f(self.tp_msg(x, sh, weight))

    def _attention(self, f_att: torch.Tensor, edge_dst: torch.Tensor, n: int
                   ) -> torch.Tensor:
        """Attention weights (E, heads) from the messages' attention scalars (eqs. 4-5)."""
        zeta = (nn.functional.leaky_relu(f_att.reshape(-1, self.heads, 16), 0.2)
                * self.alpha).sum(-1)
        return self.att_drop(softmax(zeta, edge_dst, num_nodes=n))

    def _attend_flat(self, hn: torch.Tensor, edge_src: torch.Tensor, edge_dst: torch.Tensor,
                     sh: torch.Tensor, rbf: torch.Tensor, fused: bool) -> torch.Tensor:
        """Eqs. 2-7 and the weighted sum in e3nn's flat layout (the reference path, and the
        fused one for layouts that do not line up for blocks)."""
        n = hn.shape[0]
        x = self.lin_dst(hn)[edge_dst] + self.lin_src(hn)[edge_src]          # (2)
        f = self._messages(x, sh, self.rbf_mlp(rbf))                          # (3)
        alpha = self._attention(f[:, :self.n_att], edge_dst, n)               # (4-5)
        mu = (self._direct_value_gate if fused else self.value_gate)(f[:, self.n_att:])  # (6)
        v = self._values(mu, sh)                                              # (7)
        return self._weighted_sum(v, alpha, edge_dst, n)

    def forward(self, h, edge_src, edge_dst, sh, rbf):
        hn = self.norm1(h)
        fused = self._use_fused()
        if fused and self._edge_blocks:
            attended = self._attend_blocks(hn, edge_src, edge_dst, sh, rbf)
        else:
            attended = self._attend_flat(hn, edge_src, edge_dst, sh, rbf, fused)
        h = h + self.drop(self.lin_out(attended))                             # (8)
        ff = self.ffn_out((self._direct_ffn_gate if fused else self.ffn_gate)(
            self.ffn_in(self.norm2(h))))
        return h + self.drop(ff)


class Crysformer(nn.Module):
    """Crystal graph -> one value per target (in normalised units) for each crystal."""

    def __init__(self, cfg: CrysformerConfig, atom_table: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        irreps = node_irreps(cfg)
        self.irreps_sh = o3.Irreps.spherical_harmonics(cfg.lmax)
        self.register_buffer("atom_table", atom_table.float())
        self.embed = nn.Linear(atom_table.shape[1], cfg.scalars)
        self.element_embed = None
        if cfg.element_embedding:
            self.element_embed = nn.Embedding(atom_table.shape[0], cfg.scalars)
            nn.init.zeros_(self.element_embed.weight)
        self.rbf = GaussianRBF(cfg.rbf, cfg.rbf_cutoff)
        self.to_irreps = o3.Linear(o3.Irreps(f"{cfg.scalars}x0e"), irreps)
        self.blocks = nn.ModuleList(
            AttentionBlock(cfg, irreps, self.irreps_sh) for _ in range(cfg.layers))
        self.norm = EquivariantLayerNorm(irreps, zero_floor=cfg.zero_floor)
        self.n_scalar = cfg.scalars
        self.head = nn.Sequential(
            nn.Linear(cfg.scalars, cfg.scalars), nn.SiLU(), MaskedDropout(cfg.dropout),
            nn.Linear(cfg.scalars, len(cfg.targets)))

    def dropout_shapes(self, num_nodes: int, num_edges: int) -> list[tuple[int, int]]:
        """Shapes of the dropout masks one pass draws, in the order forward() draws them
        (attention weights, then the two scalar residuals, per block; then the head)."""
        if self.cfg.dropout == 0.0:
            return []
        per_block = [(num_edges, self.cfg.heads), (num_nodes, self.n_scalar),
                     (num_nodes, self.n_scalar)]
        return per_block * len(self.blocks) + [(num_nodes, self.cfg.scalars)]

    def set_fused(self, on: bool, training: bool = False) -> Crysformer:
        """Use the fused paths of messages and values, or e3nn's (default, reference).

        ``on`` alone: inference without autograd only (e3nn where gradients flow). With
        ``training`` too: also with autograd (training), gradients reaching the e3nn
        modules' own parameters; same math, fewer and larger kernels."""
        for block in self.blocks:
            block.fused = on
            block.fused_training = on and training
        return self

    def forward(self, z: torch.Tensor, edge_index: torch.Tensor, edge_vec: torch.Tensor,
                batch: torch.Tensor, num_graphs: int, features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(crystals, targets) in normalised units; with ``features`` also each crystal's
        mean over atoms of the head's hidden layer, (crystals, scalars): the output is
        linear in it (the head's last layer), so it is the model's own representation of
        the crystal for a look-up of neighbours (residual_memory.py)."""
        src, dst = edge_index[0], edge_index[1]
        dist = edge_vec.norm(dim=-1)
        sh = o3.spherical_harmonics(self.irreps_sh, edge_vec, normalize=True,
                                    normalization="component")
        rbf = self.rbf(dist)
        h0 = self.embed(self.atom_table[z])
        if self.element_embed is not None:
            h0 = h0 + self.element_embed(z)
        h = self.to_irreps(h0)
        for block in self.blocks:
            h = block(h, src, dst, sh, rbf)
        scalars = self.norm(h)[:, :self.n_scalar]
        hidden = self.head[:-1](scalars)
        out = scatter(self.head[-1](hidden), batch, dim=0, dim_size=num_graphs,
                      reduce="mean")  # (9)
        if not features:
            return out
        return out, scatter(hidden, batch, dim=0, dim_size=num_graphs, reduce="mean")
