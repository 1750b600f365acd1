"""Models trained on different numbers of neighbours served by one graph: a k-nearest
graph cut down to fewer neighbours must be exactly the graph built for that k (ties with
the k-th neighbour kept), so a model reads what it was trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.data import Data

from matcouple.errors import MatcoupleError
from matcouple.surrogate.collate import collate_graphs
from matcouple.surrogate.graph import (
    GraphSpec,
    common_spec,
    nearest_edges_mask,
    nearest_graphs,
    parse_graph_options,
    structure_to_graph,
)
from matcouple.surrogate.predict import SurrogatePredictor
from tests.test_surrogate_value_model import _model

CPU = torch.device("cpu")


def _crystals(silicon, rocksalt) -> list[Structure]:
    rng = np.random.default_rng(3)
    skewed = Structure(Lattice.from_parameters(3.1, 3.4, 9.0, 61, 77, 118),
                       ["Ti", "O", "O"], [[0, 0, 0], [0.3, 0.6, 0.2], [0.7, 0.1, 0.55]])
    shaken = rocksalt.copy()
    shaken.make_supercell([2, 1, 1])
    shaken.perturb(0.08, min_distance=0.01)
    one = Structure(Lattice.hexagonal(2.5, 4.1), ["Mg"], [[0, 0, 0]])
    random = Structure(Lattice.from_parameters(4.3, 5.2, 6.1, 85, 95, 100),
                       ["Li", "Fe", "P", "O", "O", "O", "O"], rng.random((7, 3)))
    return [silicon, rocksalt, skewed, shaken, one, random]


def _edges(g) -> list[tuple]:
    src, dst = (np.asarray(x) for x in g["edge_index"])
    vec = np.round(np.asarray(g["edge_vec"], dtype=np.float64), 4)
    return sorted(zip(src.tolist(), dst.tolist(), map(tuple, vec.tolist()), strict=True))


@pytest.mark.parametrize("k", [4, 8, 12])
def test_cutting_a_wider_graph_gives_the_k_nearest_graph(silicon, rocksalt, k):
    cut_any = False
    for crystal in _crystals(silicon, rocksalt):
        wide = structure_to_graph(crystal, GraphSpec(k=16))
        direct = structure_to_graph(crystal, GraphSpec(k=k))
        keep = nearest_edges_mask(wide["edge_index"], wide["edge_vec"], len(wide["z"]),
                                  k, GraphSpec().tie_tol)
        cut = {"edge_index": wide["edge_index"][:, keep], "edge_vec": wide["edge_vec"][keep]}
        assert _edges(cut) == _edges(direct), crystal.composition
        cut_any |= int(keep.sum()) < keep.numel()
    assert cut_any  # the wider graphs do have more edges


def test_ties_with_the_kth_neighbour_are_kept(silicon):
    # diamond Si: 4 neighbours at 2.35 A, then 12 at 3.84: k=12 keeps all 16
    wide = structure_to_graph(silicon, GraphSpec(k=16))
    keep = nearest_edges_mask(wide["edge_index"], wide["edge_vec"], 8, 12, 1e-3)
    per_atom = torch.bincount(wide["edge_index"][1][keep], minlength=8)
    assert per_atom.tolist() == [16] * 8


def test_a_batch_is_cut_like_its_graphs(silicon, rocksalt):
    crystals = _crystals(silicon, rocksalt)
    batch = collate_graphs([structure_to_graph(c, GraphSpec(k=16)) for c in crystals])
    direct = collate_graphs([structure_to_graph(c, GraphSpec(k=12)) for c in crystals])
    cut = batch.nearest(12, 1e-3)
    assert cut is batch.nearest(12, 1e-3)  # built once per batch
    assert _edges({"edge_index": cut.edge_index, "edge_vec": cut.edge_vec}) == \
        _edges({"edge_index": direct.edge_index, "edge_vec": direct.edge_vec})
    assert torch.equal(cut.batch, direct.batch) and cut.num_graphs == direct.num_graphs


def test_too_few_neighbours_for_k_is_an_error(rocksalt):
    g = structure_to_graph(rocksalt, GraphSpec(k=6))
    with pytest.raises(MatcoupleError, match="fewer than 12 neighbours"):
        nearest_edges_mask(g["edge_index"], g["edge_vec"], len(g["z"]), 12, 1e-3)


def test_cut_training_graphs_keep_their_labels(rocksalt):
    g = structure_to_graph(rocksalt, GraphSpec(k=16))
    data = Data(z=g["z"], edge_index=g["edge_index"], edge_vec=g["edge_vec"],
                y=torch.tensor([[-3.0, 5.0]]), num_nodes=len(g["z"]), material_id="mp-1")
    (cut,) = nearest_graphs([data], 6, 1e-3)
    assert torch.equal(cut.y, data.y) and cut.material_id == "mp-1"
    assert cut.edge_index.shape[1] == 6 * len(g["z"]) < data.edge_index.shape[1]
    assert data.edge_index.shape[1] == len(g["edge_vec"])  # the input is untouched


def test_the_common_graph_has_the_most_neighbours_and_nothing_else_may_differ():
    assert common_spec([GraphSpec(k=12), GraphSpec(k=16), GraphSpec()]).k == 16
    with pytest.raises(MatcoupleError, match="other than k"):
        common_spec([GraphSpec(k=12), GraphSpec(k=16, max_radius=20.0)])


def test_graph_options_are_typed_and_checked():
    assert parse_graph_options(["k=16"]) == {"k": 16}
    assert parse_graph_options([]) == {}
    for bad, why in ((["k=0"], "positive"), (["cutoff=5"], "one of k"),
                     (["k=many"], "not a int"), (["initial_radius=40"], "exceeds")):
        with pytest.raises(MatcoupleError, match=why):
            parse_graph_options(bad)


def test_a_predictor_serves_models_of_different_k_each_its_own_graph(silicon, rocksalt):
    members = [_model(0.2, seed) for seed in (1, 2)]
    narrow = _model(0.0, 7)
    wide = _model(0.0, 8, GraphSpec(k=16))
    mixed = SurrogatePredictor.from_models([m for m, _ in members], [b for _, b in members],
                                           device=CPU, mc_samples=4, value=[narrow, wide])
    assert mixed.spec.k == 16
    crystals = _crystals(silicon, rocksalt)  # some with more edges at k=16 than at 12
    graphs = [mixed.graph(c) for c in crystals]
    means, variances, values = mixed.raw_outputs(graphs)
    # the k=12 models alone, on graphs built for k=12
    alone = SurrogatePredictor.from_models([m for m, _ in members], [b for _, b in members],
                                           device=CPU, mc_samples=4, value=[narrow, narrow])
    assert alone.spec.k == 12
    graphs12 = [alone.graph(c) for c in crystals]
    means12, variances12, values12 = alone.raw_outputs(graphs12)
    assert means == pytest.approx(means12, abs=1e-5)  # same MC masks: same edge counts
    assert variances == pytest.approx(variances12, abs=1e-6)
    assert values[0] == pytest.approx(values12[0], abs=1e-5)
    # the k=16 model reads the whole graph: on the cut one it would differ
    only16 = SurrogatePredictor.from_models([wide[0], wide[0]], [wide[1], wide[1]],
                                            device=CPU, mc_samples=0)
    assert values[1] == pytest.approx(only16.member_outputs(graphs)[0][0], abs=1e-5)
    on12 = SurrogatePredictor.from_models([wide[0], wide[0]], [narrow[1], narrow[1]],
                                          device=CPU, mc_samples=0)
    assert not np.allclose(values[1], on12.member_outputs(graphs12)[0][0], atol=1e-4)


def test_the_fast_mode_builds_only_the_neighbours_its_value_models_read(silicon, rocksalt):
    """A card whose fast mode runs two 12-neighbour value models of three (the third reads
    16): predict() in that mode builds 12-neighbour graphs, and gives what the same mode
    gives on the 16-neighbour graphs cut down; the full mode builds 16."""
    members = [_model(0.2, seed) for seed in (1, 2)]
    values = [_model(0.0, 7), _model(0.0, 9), _model(0.0, 8, GraphSpec(k=16))]
    weights = {"formation_energy_per_atom": [0.7, 0.3], "band_gap": [0.4, 0.6]}
    card = {"fast_value_count": 2, "fast_value_weights": weights,
            "value_weights": {t: [0.5, 0.2, 0.3] for t in weights}}
    fast = SurrogatePredictor.from_models([m for m, _ in members], [b for _, b in members],
                                          device=CPU, mc_samples=0, value=values, card=card)
    assert fast.mode == "value2" and (fast.spec.k, fast.mode_spec.k) == (16, 12)
    crystals = _crystals(silicon, rocksalt)
    rows = fast.predict([(str(i), c) for i, c in enumerate(crystals)])
    wide = [fast.graph(c) for c in crystals]  # built with 16 neighbours
    mean, sigma = fast.predict_graphs(wide)
    for j, t in enumerate(fast.targets):
        assert [r.values[t] for r in rows] == pytest.approx(mean[:, j].tolist(), abs=1e-5)
        assert [r.sigmas[t] for r in rows] == pytest.approx(sigma[:, j].tolist(), abs=1e-5)
    # graphs too narrow for a model the mode runs are refused, not read as if wider
    fast.mc_samples = 4
    assert fast.mode == "value3+ensemble2+mc4" and fast.mode_spec.k == 16
    narrow = [structure_to_graph(c, GraphSpec(k=12)) for c in crystals[:2]]
    with pytest.raises(MatcoupleError, match="built with 12 neighbours cannot serve"):
        fast.predict_graphs(narrow, graph_k=12)
