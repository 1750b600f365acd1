"""Training-time structure noise: the perturbed edge vectors are those of the strained or
displaced crystal (checked against pymatgen), the levels are what was asked, and training
uses it while evaluation does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.loader import DataLoader

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.surrogate.atom_features import atom_feature_table
from matcouple.surrogate.augment import StructureNoise, displace_edges, strain_edges
from matcouple.surrogate.data import load_graphs
from matcouple.surrogate.graph import GraphSpec, structure_to_graph
from matcouple.surrogate.model import Crysformer, CrysformerConfig
from matcouple.surrogate.train import TrainConfig, evaluate, train

CI = get_settings().data_dir / get_settings().datasets["mp2018-ci"]


@pytest.fixture
def crystal() -> Structure:
    """A skewed, low-symmetry cell with two elements (no accidental cancellations)."""
    lat = Lattice.from_parameters(4.1, 4.6, 5.2, 81, 97, 112)
    return Structure(lat, ["Na", "Cl", "Na", "Cl"],
                     [[0, 0, 0], [0.48, 0.52, 0.47], [0.51, 0.03, 0.55], [0.02, 0.49, 0.46]])


def _images(structure: Structure, g: dict) -> np.ndarray:
    """Integer lattice translation of every edge: vec = r_src + n L - r_dst."""
    cart = structure.cart_coords
    src, dst = g["edge_index"].numpy()
    rest = g["edge_vec"].double().numpy() - (cart[src] - cart[dst])
    n = rest @ np.linalg.inv(structure.lattice.matrix)
    assert np.allclose(n, np.round(n), atol=1e-4)
    return np.round(n)


def _edge_vectors(structure: Structure, g: dict, images: np.ndarray) -> np.ndarray:
    cart = structure.cart_coords
    src, dst = g["edge_index"].numpy()
    return cart[src] + images @ structure.lattice.matrix - cart[dst]


def test_displaced_edges_are_those_of_the_displaced_crystal(crystal):
    g = structure_to_graph(crystal)
    images = _images(crystal, g)
    u = torch.randn(len(crystal), 3, generator=torch.Generator().manual_seed(3)) * 0.05
    moved = Structure(crystal.lattice, crystal.species, crystal.cart_coords + u.numpy(),
                      coords_are_cartesian=True, to_unit_cell=False)
    got = displace_edges(g["edge_vec"].double(), g["edge_index"], u.double())
    assert np.allclose(got.numpy(), _edge_vectors(moved, g, images), atol=1e-9)


def test_strained_edges_are_those_of_the_strained_crystal(crystal):
    g = structure_to_graph(crystal)
    images = _images(crystal, g)
    a = torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = (a + a.T) * 0.01
    strained = Structure(Lattice(crystal.lattice.matrix @ (np.eye(3) + eps.numpy())),
                         crystal.species, crystal.frac_coords)
    edge_graph = torch.zeros(len(g["edge_vec"]), dtype=torch.long)
    got = strain_edges(g["edge_vec"].double(), edge_graph, eps[None])
    assert np.allclose(got.numpy(), _edge_vectors(strained, g, images), atol=1e-9)


def test_noise_levels_are_the_requested_standard_deviations():
    # one crystal per edge, unit edges along x: the strained edge's x component is 1+e_xx
    n = 20_000
    vec = torch.zeros(n, 3, dtype=torch.float64)
    vec[:, 0] = 1.0
    index = torch.stack([torch.arange(n), torch.arange(n)])  # self-loops: no displacement
    batch = torch.arange(n)
    gen = torch.Generator().manual_seed(0)
    out = StructureNoise(strain=0.02)(vec, index, batch, n, generator=gen)
    assert float((out[:, 0] - 1).std()) == pytest.approx(0.02, rel=0.05)  # normal strain
    assert float(out[:, 1].std()) == pytest.approx(0.02 / 2 ** 0.5, rel=0.05)  # shear
    pairs = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    moved = StructureNoise(displacement=0.03)(torch.zeros(n, 3, dtype=torch.float64), pairs,
                                              torch.zeros(n, dtype=torch.long), 1,
                                              generator=gen)
    assert float(moved.std()) == pytest.approx(0.03 * 2 ** 0.5, rel=0.05)  # u_s - u_d


def test_off_is_the_identity_and_bad_levels_are_refused():
    vec = torch.randn(5, 3)
    assert StructureNoise()(vec, torch.zeros(2, 5, dtype=torch.long),
                            torch.zeros(1, dtype=torch.long), 1) is vec
    with pytest.raises(MatcoupleError, match="strain noise"):
        StructureNoise(strain=0.5)
    with pytest.raises(MatcoupleError, match="displacement noise"):
        TrainConfig(data="x.csv", displacement_noise=-0.1)


@pytest.mark.skipif(not CI.exists(), reason="data sets not present")
def test_training_uses_the_noise_and_validation_does_not(tmp_path):
    base = dict(data=str(CI), split_column="ci_split", epochs=1, batch_size=8, lr=3e-3,
                limit_train=24, seed=7, model={"scalars": 8, "vectors": 4, "tensors": 4,
                                               "layers": 1, "heads": 4, "rbf": 8})
    clean = train(TrainConfig(**base), tmp_path / "a.pt", progress=False, workers=1)
    noisy = train(TrainConfig(**base, strain_noise=0.02, displacement_noise=0.05),
                  tmp_path / "b.pt", progress=False, workers=1)
    assert noisy["train_config"]["strain_noise"] == 0.02
    assert noisy["history"][0]["train_loss"] != clean["history"][0]["train_loss"]
    # the epoch's validation MAE is that of the clean validation graphs
    val = load_graphs(CI, ("formation_energy_per_atom", "band_gap"), split_column="ci_split",
                      split="val", spec=GraphSpec(), workers=1, progress=False)
    model = Crysformer(CrysformerConfig(**{**noisy["model_config"], "targets": tuple(
        noisy["model_config"]["targets"])}), torch.from_numpy(atom_feature_table()))
    model.load_state_dict(noisy["state_dict"])
    mae = evaluate(model, DataLoader(val.graphs, batch_size=16), noisy["norm_mean"],
                   noisy["norm_std"], torch.device("cpu"))
    assert mae["band_gap"] == pytest.approx(noisy["history"][0]["val_mae_band_gap"], rel=1e-5)
