"""Training-time structure noise: small random strains and atomic displacements.

Why: formation energy is stationary at the relaxed structure (no first-order change under
a small strain or displacement), and the MP 2018 labels sit on c.2023 relaxations whose
lattices differ by ~1%; a model that is not thrown by such differences generalises better.
The noise is applied to a batch's cached edge vectors, so cached graphs need no rebuilding:
a homogeneous strain maps every edge vector r to r (I + eps) (eps symmetric, one per
crystal), and displacing atom a by u_a maps the edge from centre d to neighbour s (any
periodic image) to r + u_s - u_d. The neighbour lists are kept: for noise far below the
neighbour spacing they are those of the perturbed crystal up to near-ties at the k-th
neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from matcouple.errors import MatcoupleError


def strain_edges(edge_vec: torch.Tensor, edge_graph: torch.Tensor,
                 eps: torch.Tensor) -> torch.Tensor:
    """Edge vectors of each crystal strained by its ``eps`` (G, 3, 3), symmetric."""
    return edge_vec + torch.einsum("ej,ejk->ek", edge_vec, eps[edge_graph])


def displace_edges(edge_vec: torch.Tensor, edge_index: torch.Tensor,
                   u: torch.Tensor) -> torch.Tensor:
    """Edge vectors after moving atom a by ``u[a]`` (edge_index = (neighbour, centre),
    vectors from centre to neighbour, as :func:`matcouple.surrogate.graph.knn_edges`)."""
    return edge_vec + u[edge_index[0]] - u[edge_index[1]]


@dataclass(frozen=True)
class StructureNoise:
    """Gaussian strain (standard deviation of each normal strain component, a fraction;
    shear components get 1/sqrt(2) of it) and displacement (standard deviation per
    Cartesian component, Å); zero turns each off."""

    strain: float = 0.0
    displacement: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.strain <= 0.1:
            raise MatcoupleError(f"strain noise must lie in [0, 0.1], got {self.strain} "
                                 "(it is a fraction: 0.01 is 1%)")
        if not 0.0 <= self.displacement <= 0.3:
            raise MatcoupleError(f"displacement noise must lie in [0, 0.3] Å, got "
                                 f"{self.displacement}")

    @property
    def active(self) -> bool:
        return self.strain > 0 or self.displacement > 0

    def __call__(self, edge_vec: torch.Tensor, edge_index: torch.Tensor,
                 batch: torch.Tensor, num_graphs: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """A perturbed copy of ``edge_vec`` (the input is returned as is when off)."""
        if not self.active:
            return edge_vec
        out = edge_vec
        dev, dtype = edge_vec.device, edge_vec.dtype
        if self.displacement > 0:
            u = torch.randn(batch.shape[0], 3, device=dev, dtype=dtype, generator=generator)
            out = displace_edges(out, edge_index, u * self.displacement)
        if self.strain > 0:
            a = torch.randn(num_graphs, 3, 3, device=dev, dtype=dtype, generator=generator)
            eps = (a + a.transpose(1, 2)) * (self.strain / 2)  # diagonal std = strain
            out = strain_edges(out, batch[edge_index[1]], eps)
        return out
