"""The periodic E(3)-equivariant denoiser over lattice L, fractional coordinates F, types A.

A message-passing network on the fully connected graph of each cell (DiffCSP/EquiCSP
style). Its inputs make the symmetries hold by construction:

- atom permutation: messages are summed over neighbours, outputs are per atom;
- periodic translation: atoms meet only through Fourier features of F_j - F_i, which are
  unchanged by a shift of every atom (and by whole lattice vectors);
- rotation/reflection of the Cartesian frame (L -> L R^T for row lattice vectors): write
  L = P U (polar decomposition, P = (L L^T)^(1/2) symmetric, U orthogonal). P is
  frame-free and is the only way the lattice enters; U turns with the frame (U -> U R^T).
  The lattice output is (P + N) U = L + N U with an invariant N, so it rotates with the
  frame. At t = T the noise is L itself (N = 0); elsewhere N is linear in P and in the
  clean cell seen in L's frame, so no matrix inverse must be learned (DiffCSP's M L needs
  an inverse square root of L L^T to undo the lattice's scale).

Lattice rows are the cell vectors a, b, c (pymatgen's convention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

N_TYPES = 100  # one-hot over Z = 1..100, as CDVAE/DiffCSP


@dataclass(frozen=True)
class DenoiserConfig:
    """Size of the network; stored in every checkpoint."""

    hidden: int = 256
    layers: int = 5
    frequencies: int = 64
    time_dim: int = 128
    n_types: int = N_TYPES
    length_scale: float = 5.0  # A: the lattice's symmetric factor P is divided by this

    def as_dict(self) -> dict:
        return asdict(self)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the diffusion time t in [0, 1] (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t[:, None].float() * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def fully_connected_edges(num_atoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed edges (i, j), i != j, between all atoms of each crystal, vectorised."""
    device = num_atoms.device
    offsets = torch.cumsum(num_atoms, 0) - num_atoms
    pairs = num_atoms * num_atoms
    crystal = torch.repeat_interleave(torch.arange(len(num_atoms), device=device), pairs)
    local = torch.arange(int(pairs.sum()), device=device) - torch.repeat_interleave(
        torch.cumsum(pairs, 0) - pairs, pairs)
    n = num_atoms[crystal]
    i_local, j_local = local // n, local % n
    keep = i_local != j_local
    base = offsets[crystal]
    return (base + i_local)[keep], (base + j_local)[keep]


def polar_decomposition(lattice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L = P U with P symmetric positive semi-definite (frame-free) and U orthogonal."""
    with torch.autocast(lattice.device.type, enabled=False):
        w, sv, vh = torch.linalg.svd(lattice.double())
        p = (w * sv[:, None, :]) @ w.transpose(1, 2)
        u = w @ vh
    return p.to(lattice.dtype), u.to(lattice.dtype)


def scatter_mean(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of ``values`` rows per ``index``; sums in at least float32 (bf16 under AMP)."""
    dtype = torch.promote_types(values.dtype, torch.float32)
    out = torch.zeros(size, values.shape[-1], dtype=dtype, device=values.device)
    out.index_add_(0, index, values.to(dtype))
    count = torch.zeros(size, dtype=dtype, device=values.device)
    count.index_add_(0, index, torch.ones_like(index, dtype=dtype))
    return out / count.clamp(min=1)[:, None]


class MessageLayer(nn.Module):
    """One round: edge messages from (h_i, h_j, geometry), mean-aggregated, residual update."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.src = nn.Linear(hidden, hidden)
        self.dst = nn.Linear(hidden, hidden, bias=False)
        self.geom = nn.Linear(hidden, hidden, bias=False)
        self.edge_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.node = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden))

    def forward(self, h: torch.Tensor, edge_geom: torch.Tensor, src: torch.Tensor,
                dst: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        # Linear([x_i, x_j, e_ij]) split so the node parts are computed once per atom.
        message = self.edge_out(self.src(x)[src] + self.dst(x)[dst] + self.geom(edge_geom))
        aggregated = scatter_mean(message, src, h.shape[0])
        return h + self.node(torch.cat([x, aggregated], dim=-1))


class CrystalDenoiser(nn.Module):
    """eps_L (B,3,3), normalised score of F (N,3) and eps_A (N,n_types) at time t."""

    def __init__(self, config: DenoiserConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DenoiserConfig()
        h = config.hidden
        self.type_in = nn.Linear(config.n_types, h)
        self.node_in = nn.Sequential(nn.Linear(h + config.time_dim + 1, h), nn.SiLU(),
                                     nn.Linear(h, h))
        self.geom_in = nn.Sequential(nn.Linear(6 * config.frequencies + 9, h), nn.SiLU(),
                                     nn.Linear(h, h))
        self.layers = nn.ModuleList(MessageLayer(h) for _ in range(config.layers))
        self.out_norm = nn.LayerNorm(h)
        self.frac_out = nn.Linear(h, 3, bias=False)
        self.type_out = nn.Linear(h, config.n_types)
        self.lattice_out = nn.Sequential(nn.Linear(h + 9, h), nn.SiLU(), nn.Linear(h, h),
                                         nn.SiLU(), nn.Linear(h, 9))
        self.register_buffer("frequency", 2 * math.pi * torch.arange(
            1, config.frequencies + 1, dtype=torch.float32), persistent=False)

    def edge_geometry(self, shape: torch.Tensor, frac: torch.Tensor, src: torch.Tensor,
                      dst: torch.Tensor, edge_crystal: torch.Tensor) -> torch.Tensor:
        """Fourier features of F_j - F_i and the crystal's lattice shape P, per edge."""
        with torch.autocast(frac.device.type, enabled=False):  # full precision geometry
            diff = frac[dst] - frac[src]
            angles = diff[:, :, None] * self.frequency.to(diff.dtype)[None, None, :]
            fourier = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)
            return torch.cat([fourier, shape[edge_crystal].to(fourier.dtype)], dim=-1)

    def forward(
        self,
        lattice: torch.Tensor,
        frac: torch.Tensor,
        types: torch.Tensor,
        t: torch.Tensor,
        batch: torch.Tensor,
        num_atoms: torch.Tensor,
        types_known: torch.Tensor,
        edges: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``t`` is the diffusion time scaled to [0, 1] per crystal (B,)."""
        src, dst = edges if edges is not None else fully_connected_edges(num_atoms)
        n_crystals = lattice.shape[0]
        crystal_features = torch.cat(
            [time_embedding(t, self.config.time_dim), types_known.float()[:, None]], dim=-1)
        h = self.node_in(torch.cat([self.type_in(types), crystal_features[batch]], dim=-1))
        sym, rot = polar_decomposition(lattice)
        shape = sym.flatten(1) / self.config.length_scale
        geom = self.geom_in(self.edge_geometry(shape, frac, src, dst, batch[src]))
        for layer in self.layers:
            h = layer(h, geom, src, dst)
        h = self.out_norm(h)
        frac_score = self.frac_out(h)
        type_eps = self.type_out(h)
        pooled = scatter_mean(h, batch, n_crystals)
        frame_free = self.lattice_out(torch.cat([pooled, shape.to(pooled.dtype)], dim=-1))
        with torch.autocast(lattice.device.type, enabled=False):
            lattice_eps = lattice + frame_free.view(n_crystals, 3, 3).to(lattice.dtype) @ rot
        return lattice_eps, frac_score, type_eps


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
