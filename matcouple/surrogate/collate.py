"""Many crystal graphs as one disjoint graph: the tensors Crysformer reads, for a batch.

PyG's ``Batch.from_data_list`` handles any attribute of any ``Data``; at inference the
graphs have exactly three arrays, and concatenating those directly costs a fraction of it
(it was a large part of the CPU time that bounds GPU prediction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from matcouple.surrogate.graph import nearest_edges_mask


@dataclass
class GraphBatch:
    """Atomic numbers, edges (indices into the batch's atoms) and edge vectors of several
    crystals, and which crystal each atom belongs to."""

    z: torch.Tensor           # (atoms,) int64
    edge_index: torch.Tensor  # (2, edges) int64
    edge_vec: torch.Tensor    # (edges, 3)
    batch: torch.Tensor       # (atoms,) int64, crystal of each atom
    num_graphs: int
    # k -> this batch's k-nearest subgraph, built once for every model that reads it
    _nearest: dict = field(default_factory=dict, repr=False, compare=False)

    def nearest(self, k: int, tie_tol: float) -> GraphBatch:
        """The batch with each atom's k nearest neighbours only (ties kept): the input of
        a model trained on k neighbours when the graphs were built with more."""
        key = (k, tie_tol)
        if key not in self._nearest:
            keep = nearest_edges_mask(self.edge_index, self.edge_vec, self.num_nodes, k,
                                      tie_tol)
            self._nearest[key] = GraphBatch(self.z, self.edge_index[:, keep],
                                            self.edge_vec[keep], self.batch, self.num_graphs)
        return self._nearest[key]

    @property
    def num_nodes(self) -> int:
        return int(self.z.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def to(self, device: torch.device | str) -> GraphBatch:
        """The batch on ``device``; from pinned host memory to a GPU the copies are
        asynchronous, so the next batch is assembled while this one travels."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        fields = (self.z, self.edge_index, self.edge_vec, self.batch)
        moved = [t.pin_memory().to(device, non_blocking=True) for t in fields]
        return GraphBatch(*moved, num_graphs=self.num_graphs)


def _array(graph: Mapping[str, Any] | Any, key: str) -> np.ndarray:
    value = graph[key]
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def collate_graphs(graphs: Sequence[Mapping[str, Any] | Any]) -> GraphBatch:
    """One batch from graphs given as ``{"z", "edge_index", "edge_vec"}`` mappings of
    arrays or tensors (a PyG ``Data`` works too): atom indices of each graph's edges are
    shifted past the atoms of the graphs before it."""
    if not graphs:
        raise ValueError("cannot collate an empty list of graphs")
    zs = [_array(g, "z") for g in graphs]
    sizes = np.fromiter((len(z) for z in zs), dtype=np.int64, count=len(zs))
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    edges = [_array(g, "edge_index") for g in graphs]
    edge_index = np.concatenate([e + off for e, off in zip(edges, offsets, strict=True)],
                                axis=1)
    edge_vec = np.concatenate([_array(g, "edge_vec") for g in graphs])
    return GraphBatch(
        z=torch.from_numpy(np.concatenate(zs).astype(np.int64, copy=False)),
        edge_index=torch.from_numpy(edge_index.astype(np.int64, copy=False)),
        edge_vec=torch.from_numpy(np.ascontiguousarray(edge_vec)),
        batch=torch.from_numpy(np.repeat(np.arange(len(zs), dtype=np.int64), sizes)),
        num_graphs=len(zs))
