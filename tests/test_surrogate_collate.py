"""The inference batches are the graphs PyG would batch, built straight from arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.data import Batch, Data

from matcouple.surrogate.collate import collate_graphs
from matcouple.surrogate.graph import GraphSpec, structure_to_graph


def _structures() -> list[Structure]:
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])
    skewed = Structure(Lattice.from_parameters(3.1, 4.2, 5.3, 70, 100, 115),
                       ["Mg", "O", "O"], [[0, 0, 0], [0.4, 0.1, 0.3], [0.7, 0.6, 0.2]])
    single = Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]])
    return [nacl, skewed, single, nacl * (2, 1, 1)]


def test_collate_equals_pyg_batch():
    graphs = [structure_to_graph(s, GraphSpec()) for s in _structures()]
    ours = collate_graphs([{k: v.numpy() for k, v in g.items()} for g in graphs])
    ref = Batch.from_data_list([Data(**g, num_nodes=len(g["z"])) for g in graphs])
    assert ours.num_graphs == ref.num_graphs == 4
    assert ours.num_nodes == ref.num_nodes and ours.num_edges == ref.num_edges
    for name in ("z", "edge_index", "edge_vec", "batch"):
        mine, theirs = getattr(ours, name), getattr(ref, name)
        assert mine.dtype == theirs.dtype, name
        assert torch.equal(mine, theirs), name
    # PyG Data objects (what the fine-tune and card code hold) collate the same way
    again = collate_graphs([Data(**g, num_nodes=len(g["z"])) for g in graphs])
    assert torch.equal(again.edge_index, ours.edge_index)
    assert ours.to("cpu") is ours
    # every edge stays inside its own crystal
    src, dst = ours.edge_index.numpy()
    assert np.array_equal(ours.batch.numpy()[src], ours.batch.numpy()[dst])


def test_collate_rejects_an_empty_list():
    with pytest.raises(ValueError, match="empty"):
        collate_graphs([])
