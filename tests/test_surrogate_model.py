"""Crysformer's graph and model: physics-respecting invariances, training mechanics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from scipy.spatial.transform import Rotation

from matcouple.errors import StructureInputError
from matcouple.surrogate.atom_features import atom_feature_table
from matcouple.surrogate.graph import GraphSpec, structure_to_graph
from matcouple.surrogate.model import Crysformer, CrysformerConfig

TINY = CrysformerConfig(scalars=16, vectors=8, tensors=4, layers=2, heads=4, rbf=8,
                        dropout=0.0)


@pytest.fixture(scope="module")
def tiny_model() -> Crysformer:
    torch.manual_seed(0)
    return Crysformer(TINY, torch.from_numpy(atom_feature_table())).double().eval()


def predict(model: Crysformer, s: Structure) -> torch.Tensor:
    g = structure_to_graph(s)
    with torch.no_grad():
        return model(g["z"], g["edge_index"], g["edge_vec"].double(),
                     torch.zeros(len(s), dtype=torch.long), 1)


@pytest.fixture()
def skewed() -> Structure:
    lattice = Lattice([[3.1, 0.2, 0.0], [1.9, 3.3, 0.1], [0.3, 0.2, 5.2]])
    return Structure(lattice, ["Ga", "N", "Ga", "N"],
                     [[0, 0, 0], [0.33, 0.66, 0.37], [0.5, 0.5, 0.5], [0.1, 0.8, 0.9]])


def test_knn_keeps_ties_and_periodic_images():
    bcc = Structure(Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    g = structure_to_graph(bcc)
    per_atom = torch.bincount(g["edge_index"][1])
    assert per_atom.tolist() == [14, 14]  # 8 at a*sqrt(3)/2 and all 6 at a, not 12
    d = g["edge_vec"].norm(dim=1)
    assert torch.allclose(d.min(), torch.tensor(2.87 * 3**0.5 / 2), atol=1e-4)
    fcc_primitive = Lattice([[0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]])
    single = Structure(fcc_primitive, ["Cu"], [[0, 0, 0]])
    g1 = structure_to_graph(single)
    assert g1["edge_index"].shape[1] >= 12  # all neighbours are images of the one atom
    assert torch.allclose(g1["edge_vec"].norm(dim=1)[:12], torch.tensor(3.6 / 2**0.5),
                          atol=1e-4)


def test_uncovered_element_and_empty_cell_are_named():
    with pytest.raises(StructureInputError, match="Am not covered"):
        structure_to_graph(Structure(Lattice.cubic(3.5), ["Am"], [[0, 0, 0]]))
    with pytest.raises(StructureInputError, match="empty cell"):
        structure_to_graph(Structure(Lattice.cubic(3), [], []))


def test_invariances(tiny_model, skewed):
    ref = predict(tiny_model, skewed)
    rot = Rotation.random(random_state=3).as_matrix()
    rotated = Structure(Lattice(skewed.lattice.matrix @ rot.T), skewed.species,
                        skewed.frac_coords)
    order = [2, 0, 3, 1]
    permuted = Structure(skewed.lattice, [skewed.species[i] for i in order],
                         skewed.frac_coords[order])
    shifted = skewed.copy()
    shifted.translate_sites(list(range(len(shifted))), [0.31, 0.12, 0.77])
    other_cell = skewed.copy()
    other_cell.make_supercell([[1, 1, 0], [0, 1, 0], [0, 0, 2]])
    reduced = skewed.get_reduced_structure("niggli")
    for name, s in [("rotation", rotated), ("permutation", permuted),
                    ("translation", shifted), ("supercell", other_cell),
                    ("niggli cell", reduced)]:
        assert torch.allclose(predict(tiny_model, s), ref, atol=1e-8), name
    # ... and the model is not trivially constant.
    squeezed = Structure(skewed.lattice.matrix * 0.9, skewed.species, skewed.frac_coords)
    assert not torch.allclose(predict(tiny_model, squeezed), ref, atol=1e-6)


def test_graph_spec_is_respected(skewed):
    g6 = structure_to_graph(skewed, GraphSpec(k=6))
    g12 = structure_to_graph(skewed, GraphSpec(k=12))
    assert g6["edge_index"].shape[1] < g12["edge_index"].shape[1]
    assert np.all(torch.bincount(g6["edge_index"][1]).numpy() >= 6)


def test_fused_tensor_products_match_e3nn():
    """The inference path of a TP + Linear equals e3nn's, for shared weights (values) and
    per-edge weights (messages, both contraction orders), and follows in-place weight
    updates (fine-tuning). Float64, to rounding: the fused path copies e3nn's constants
    (its float32-rounded Wigner 3j buffers, its exact 1/sqrt(2l+1) in the l = 0 paths); a
    wrong path would be off by O(1)."""
    from e3nn import o3

    from matcouple.surrogate.fused import FusedTPLinear

    torch.manual_seed(1)
    block = Crysformer(TINY, torch.from_numpy(atom_feature_table())).double().blocks[0]
    sh_irreps = o3.Irreps.spherical_harmonics(TINY.lmax)
    e = 50
    sh = o3.spherical_harmonics(sh_irreps, torch.randn(e, 3, dtype=torch.float64), True,
                                normalization="component")
    mu = torch.randn(e, block.tp_val.irreps_in1.dim, dtype=torch.float64)
    x = torch.randn(e, block.tp_msg.irreps_in1.dim, dtype=torch.float64)
    w = torch.randn(e, block.tp_msg.weight_numel, dtype=torch.float64)
    values, messages = FusedTPLinear(block.tp_val, block.lin_val), FusedTPLinear(
        block.tp_msg, block.lin_f)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(values(mu, sh), block.lin_val(block.tp_val(mu, sh)),
                                       rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(messages(x, sh, w),
                                       block.lin_f(block.tp_msg(x, sh, w)),
                                       rtol=1e-10, atol=1e-12)
            block.tp_val.weight.mul_(1.5)  # an optimizer step: the fused path must follow
            block.lin_val.weight.add_(0.1)
    # both mix the two contraction orders (X first where its per-edge intermediate is the
    # smaller one: the scalars of the values, l <= 1 of the messages here; Q first for the
    # rest), so both orders are checked above, with shared and with per-edge weights
    for fused in (messages, values):
        assert 0 < len(fused.plan().x_types) < len(fused.plan().types)


def test_fused_model_matches_the_e3nn_reference(tiny_model, skewed):
    """Whole model, fused inference path vs the e3nn modules, in float64 (in float32 both
    carry the model's own rounding noise, which its layer norms can amplify); both fused
    edge paths: blocks from the messages to the weighted sum (the default for these
    irreps) and the flat e3nn layout between the steps."""
    batch = [skewed, skewed * (2, 1, 1), Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])]
    assert all(block._edge_blocks for block in tiny_model.blocks)
    try:
        fused = torch.cat([predict(tiny_model.set_fused(True), s) for s in batch])
        for block in tiny_model.blocks:
            block._edge_blocks = False
        flat = torch.cat([predict(tiny_model, s) for s in batch])
        reference = torch.cat([predict(tiny_model.set_fused(False), s) for s in batch])
    finally:
        tiny_model.set_fused(False)
        for block in tiny_model.blocks:
            block._edge_blocks = True
    torch.testing.assert_close(fused, reference, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(flat, reference, rtol=1e-9, atol=1e-10)


def _batch(structures: list[Structure]) -> tuple:
    """Model inputs of several crystals in one batch (float64 edge vectors)."""
    graphs = [structure_to_graph(s) for s in structures]
    offsets = np.cumsum([0] + [len(g["z"]) for g in graphs[:-1]])
    return (torch.cat([g["z"] for g in graphs]),
            torch.cat([g["edge_index"] + int(o) for g, o in zip(graphs, offsets, strict=True)],
                      dim=1),
            torch.cat([g["edge_vec"] for g in graphs]).double(),
            torch.cat([torch.full((len(g["z"]),), i) for i, g in enumerate(graphs)]),
            len(graphs))


def test_fused_training_path_matches_e3nn_forward_and_gradients(skewed):
    """Training mode of the fused path (autograd, matrices gathered from the parameters
    every call): same output and same gradients for every parameter (and the edge
    vectors) as e3nn, in float64; still after optimizer steps, and the no-grad cache built
    before a step follows it. The e3nn modules keep owning the parameters."""
    torch.manual_seed(2)
    model = Crysformer(TINY, torch.from_numpy(atom_feature_table())).double().train()
    names = list(model.state_dict())
    z, edge_index, edge_vec, batch, n = _batch([skewed, skewed * (1, 2, 1), Structure(
        Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])])
    weights = torch.randn(n, len(TINY.targets), dtype=torch.float64)

    def run(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        model.set_fused(fused, training=fused)
        model.zero_grad(set_to_none=True)
        vec = edge_vec.clone().requires_grad_(True)
        out = model(z, edge_index, vec, batch, n)
        (out * weights).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        return out.detach(), grads, vec.grad

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    try:
        for _ in range(3):
            with torch.no_grad():  # the inference cache, built before this step's update
                cached = model.set_fused(True, training=True)(z, edge_index, edge_vec, batch, n)
            ref_out, ref_grads, ref_vec = run(False)
            out, grads, vec = run(True)
            torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-9)
            torch.testing.assert_close(cached, ref_out, rtol=0, atol=1e-9)
            torch.testing.assert_close(vec, ref_vec, rtol=1e-7, atol=1e-8)
            assert set(grads) == set(ref_grads)
            for k, g in grads.items():
                torch.testing.assert_close(g, ref_grads[k], rtol=1e-7, atol=1e-8, msg=k)
            opt.step()  # moves every parameter in place
    finally:
        model.set_fused(False)
    assert list(model.state_dict()) == names
