"""Residual memory: a value model's training residuals, looked up by neighbours in its own
pooled features, correct its predictions; built by `matcouple train memory`, named by the
card, refused for other weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.data import Data
from typer.testing import CliRunner

from matcouple.cli import app
from matcouple.errors import MatcoupleError
from matcouple.store.registry import model_files
from matcouple.surrogate.graph import GraphSpec, structure_to_graph
from matcouple.surrogate.predict import SurrogatePredictor
from matcouple.surrogate.residual_memory import (
    ResidualMemory,
    fit_residual_memory,
    pooled_outputs,
    weights_sha,
)
from tests.test_surrogate_value_model import _model, write_model_dir

TARGETS = ("formation_energy_per_atom", "band_gap")


def _structures() -> list[Structure]:
    """Twelve small crystals: rock salts and CsCl types of a few elements and lattices."""
    out = []
    for a, (x, y) in zip((4.0, 4.2, 4.4, 4.6, 5.0, 5.6),
                         [("Mg", "O"), ("Na", "Cl"), ("Ca", "O"), ("Li", "F"), ("K", "Cl"),
                          ("Ba", "S")], strict=True):
        out.append(Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [x, y],
                                             [[0, 0, 0], [0.5, 0.5, 0.5]]))
        out.append(Structure(Lattice.cubic(a * 0.7), [x, y], [[0, 0, 0], [0.5, 0.5, 0.5]]))
    return out


def test_forward_features_are_what_the_last_layer_reads(silicon, rocksalt):
    model, blob = _model(0.0, 7)
    predictor = SurrogatePredictor.from_models([model, model], [blob, blob],
                                               device=torch.device("cpu"), mc_samples=0)
    graphs = [predictor.graph(s) for s in (silicon, rocksalt)]
    preds, feats = pooled_outputs(model, blob, graphs, progress=False)
    assert feats.shape == (2, model.cfg.scalars)
    last = model.head[-1]
    linear = (torch.from_numpy(feats) @ last.weight.T + last.bias).detach()
    physical = linear * blob["norm_std"] + blob["norm_mean"]
    assert preds == pytest.approx(physical.numpy(), abs=1e-5)
    # and the predictions are the model's plain outputs
    assert preds == pytest.approx(predictor.member_outputs(graphs)[0][0], abs=1e-6)


def _memory(k: int = 2, n: int = 40, seed: int = 0) -> tuple[ResidualMemory, np.ndarray,
                                                              np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, 6))
    labels = rng.normal(size=(n, 2))
    preds = labels + rng.normal(scale=0.1, size=(n, 2))
    return fit_residual_memory(feats, labels, preds, TARGETS, "sha", dims=6, k=k,
                               eps=1e-6), feats, labels - preds


def test_a_training_crystal_gets_its_own_residual_back():
    memory, feats, residuals = _memory(k=3)
    corr = memory.correction(torch.tensor(feats, dtype=torch.float32)).numpy()
    # float16 keys: the crystal's own key is ~1e-3 away, its neighbours ~1 away
    assert corr == pytest.approx(residuals, abs=0.01)


def test_the_correction_is_the_inverse_distance_mean_of_the_k_nearest():
    memory, feats, residuals = _memory(k=3)
    query = torch.tensor(feats[:5] + 0.3, dtype=torch.float32)
    keys = memory.keys.float().numpy()
    q = memory.project(query).numpy()
    expected = []
    for row in q:
        d = np.linalg.norm(keys - row, axis=1)
        near = np.argsort(d)[:3]
        w = 1 / (d[near] + memory.eps)
        expected.append((w[:, None] * residuals[near]).sum(0) / w.sum())
    assert memory.correction(query).numpy() == pytest.approx(np.array(expected), abs=1e-5)


def test_a_missing_label_is_left_out_of_its_targets_mean():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(10, 4))
    labels = rng.normal(size=(10, 2))
    labels[0, 1] = np.nan
    query = torch.tensor(feats[:1], dtype=torch.float32)
    two = fit_residual_memory(feats, labels, np.zeros_like(labels), TARGETS, "sha",
                              dims=4, k=2, eps=1e-6)
    corr = two.correction(query).numpy()
    assert corr[0, 0] == pytest.approx(labels[0, 0], abs=0.01)
    # the gap: the one neighbour with a label, alone
    dist = np.linalg.norm(two.keys.float().numpy() - two.project(query).numpy(), axis=1)
    second = np.argsort(dist)[1]
    assert corr[0, 1] == pytest.approx(labels[second, 1], abs=1e-5)
    one = fit_residual_memory(feats, labels, np.zeros_like(labels), TARGETS, "sha",
                              dims=4, k=1, eps=1e-6)
    assert one.correction(query).numpy()[0, 1] == 0.0  # nothing known: no correction


def test_bad_inputs_are_refused():
    feats, labels = np.zeros((5, 3)), np.zeros((5, 2))
    with pytest.raises(MatcoupleError, match="dims"):
        fit_residual_memory(feats, labels, labels, TARGETS, "s", dims=4, k=2, eps=1e-3)
    with pytest.raises(MatcoupleError, match="not finite"):
        fit_residual_memory(feats * np.nan, labels, labels, TARGETS, "s", dims=2, k=2,
                            eps=1e-3)
    with pytest.raises(MatcoupleError, match="must both be"):
        fit_residual_memory(feats, labels[:4], labels, TARGETS, "s", dims=2, k=2, eps=1e-3)
    memory, _, _ = _memory()
    with pytest.raises(MatcoupleError, match="expects"):
        memory.correction(torch.zeros(2, 5))


def test_save_load_and_a_memory_for_other_weights_is_refused(tmp_path):
    _, blob = _model(0.0, 7)
    rng = np.random.default_rng(0)
    memory = fit_residual_memory(rng.normal(size=(20, 8)), np.zeros((20, 2)),
                                 rng.normal(size=(20, 2)), TARGETS, weights_sha(blob),
                                 dims=3, k=2, eps=1e-3)
    memory.save(tmp_path / "m.pt")
    back = ResidualMemory.load(tmp_path / "m.pt")
    query = torch.tensor(rng.normal(size=(4, 8)), dtype=torch.float32)
    assert torch.equal(back.correction(query), memory.correction(query))
    back.check_model(blob)
    _, other = _model(0.0, 8)
    with pytest.raises(MatcoupleError, match="made for weights"):
        back.check_model(other, "value-x.pt")
    torch.save(blob, tmp_path / "model.pt")
    with pytest.raises(MatcoupleError, match="not a matcouple residual memory"):
        ResidualMemory.load(tmp_path / "model.pt")
    with pytest.raises(MatcoupleError, match="not found"):
        ResidualMemory.load(tmp_path / "none.pt")


def _model_dir(tmp_path) -> tuple[list[str], dict]:
    return write_model_dir(tmp_path, "value_models")


def _table(tmp_path, structures: list[Structure], labels: np.ndarray) -> str:
    path = tmp_path / "train.csv"
    pd.DataFrame({"material_id": [f"t-{i}" for i in range(len(structures))],
                  "split": "train", "cif": [s.to(fmt="cif") for s in structures],
                  "formation_energy_per_atom": labels[:, 0], "band_gap": labels[:, 1]}
                 ).to_csv(path, index=False)
    return str(path)


def test_train_memory_builds_it_the_card_names_it_and_predictions_take_it(tmp_path):
    names, _ = _model_dir(tmp_path)
    structures = _structures()
    rng = np.random.default_rng(3)
    labels = np.stack([rng.normal(-1, 1, len(structures)), rng.uniform(0, 3, len(structures))],
                      1)
    data = _table(tmp_path, structures, labels)
    model_path = tmp_path / names[2]
    result = CliRunner().invoke(app, [
        "train", "memory", str(model_path), "--data", data, "--split-column", "split",
        "--split", "train", "--k", "1", "--dims", "4", "--device", "cpu",
        "--card", str(tmp_path / "model_card.json")])
    assert result.exit_code == 0, result.output
    assert "12 crystals" in result.output
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["value_memories"] == {"value-t.pt": "value-t.memory.pt"}
    assert "value-t.memory.pt" in model_files(card)

    bare = SurrogatePredictor(
        [tmp_path / n for n in names[:2]], device="cpu", mc_samples=0,
        value_model=[model_path])
    with_memory = SurrogatePredictor.default(model_dir=tmp_path, device="cpu", mc_samples=0)
    graphs = [with_memory.graph(s) for s in structures]
    assert with_memory.residual_memories == 1 and bare.residual_memories == 0
    _, _, plain = bare.outputs(graphs)
    _, _, corrected = with_memory.outputs(graphs)
    # k=1: a training crystal's own residual comes back, so its label does
    assert corrected == pytest.approx(labels, abs=0.01)
    assert np.abs(plain - labels).mean() > 0.1
    # a new crystal gets its nearest training crystal's residual
    new = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.1), ["Mg", "O"],
                                    [[0, 0, 0], [0.5, 0.5, 0.5]])
    g = [with_memory.graph(new)]
    shift = with_memory.outputs(g)[2] - bare.outputs(g)[2]
    assert any(np.allclose(shift, labels[i] - plain[i], atol=1e-3) for i in range(12))


def test_the_card_refuses_a_stale_memory_and_a_setting_turns_memories_off(tmp_path,
                                                                          monkeypatch):
    from matcouple.settings import get_settings

    names, card = _model_dir(tmp_path)
    _, other = _model(0.0, 8)  # another model's weights
    rng = np.random.default_rng(0)
    fit_residual_memory(rng.normal(size=(20, 8)), np.zeros((20, 2)), np.zeros((20, 2)),
                        TARGETS, weights_sha(other), dims=3, k=2, eps=1e-3
                        ).save(tmp_path / "value-t.memory.pt")
    card["value_memories"] = {"value-t.pt": "value-t.memory.pt"}
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(MatcoupleError, match="fine-tuned since"):
        SurrogatePredictor.default(model_dir=tmp_path, device="cpu", mc_samples=0)
    monkeypatch.setenv("MATCOUPLE_RESIDUAL_MEMORY", "0")
    get_settings.cache_clear()
    try:
        predictor = SurrogatePredictor.default(model_dir=tmp_path, device="cpu",
                                               mc_samples=0)
        assert predictor.mode == "value+ensemble2"
    finally:
        monkeypatch.delenv("MATCOUPLE_RESIDUAL_MEMORY")
        get_settings.cache_clear()


def test_train_memory_refuses_a_model_with_dropout(tmp_path):
    names, _ = _model_dir(tmp_path)
    structures = _structures()[:4]
    data = _table(tmp_path, structures, np.zeros((4, 2)))
    result = CliRunner().invoke(app, [
        "train", "memory", str(tmp_path / names[0]), "--data", data, "--split-column",
        "split", "--device", "cpu"])
    assert result.exit_code == 1 and "dropout" in result.output


def test_graphs_with_more_neighbours_give_the_same_features(silicon, rocksalt):
    model, blob = _model(0.0, 7, GraphSpec(k=6))

    def graphs(k):
        out = []
        for s in (silicon, rocksalt):
            g = structure_to_graph(s, GraphSpec(k=k))
            out.append(Data(z=g["z"], edge_index=g["edge_index"], edge_vec=g["edge_vec"],
                            num_nodes=len(g["z"])))
        return out

    a = pooled_outputs(model, blob, graphs(6), progress=False)
    b = pooled_outputs(model, blob, graphs(12), graph_k=12, progress=False)
    assert a[0] == pytest.approx(b[0], abs=1e-5) and a[1] == pytest.approx(b[1], abs=1e-5)


def test_a_card_built_with_memories_names_them_and_predictions_reproduce_its_mae(tmp_path):
    from matcouple.surrogate.card import build_model_card
    from matcouple.surrogate.data import load_graphs

    names, _ = _model_dir(tmp_path)
    structures = _structures()
    rng = np.random.default_rng(5)
    labels = np.stack([rng.normal(-1, 1, 12), rng.uniform(0, 3, 12)], 1)
    data = Path(_table(tmp_path, structures, labels))
    frame = pd.read_csv(data)
    frame["split"] = ["train"] * 8 + ["val"] * 4
    frame.to_csv(data, index=False)
    result = CliRunner().invoke(app, [
        "train", "memory", str(tmp_path / names[2]), "--data", str(data),
        "--split-column", "split", "--k", "2", "--dims", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    card = build_model_card(tmp_path, data, split_column="split", split="val", mc_samples=0,
                            device="cpu", value_model=names[2],
                            value_memory=["value-t.memory.pt"], progress=False)
    assert card["value_memories"] == {"value-t.pt": "value-t.memory.pt"}
    predictor = SurrogatePredictor.default(model_dir=tmp_path, device="cpu", mc_samples=0)
    graphs = load_graphs(data, TARGETS, split_column="split", split="val",
                         spec=predictor.spec, progress=False).graphs
    mean, _ = predictor.predict_graphs(graphs)
    for j, t in enumerate(TARGETS):
        assert card["val_mae"][predictor.mode][t] == pytest.approx(
            float(np.abs(mean[:, j] - labels[8:, j]).mean()), rel=1e-5)
    bare = SurrogatePredictor([tmp_path / n for n in names[:2]], device="cpu", mc_samples=0,
                              value_model=[tmp_path / names[2]])
    assert not np.allclose(bare.outputs(graphs)[2], predictor.outputs(graphs)[2])


def test_a_query_next_to_a_training_crystal_gets_a_steady_correction():
    """Round-off in the features (another batch, a rotated cell) must not move the
    correction: near a training crystal the matrix-product distances lose their digits,
    so the nearest candidates are re-measured directly."""
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(3000, 40)) * 5
    labels = rng.normal(size=(3000, 2))
    memory = fit_residual_memory(feats, labels, np.zeros_like(labels), TARGETS, "sha",
                                 dims=32, k=3, eps=1e-3)
    query = torch.tensor(feats[:200], dtype=torch.float32)
    nudged = query * (1 + 1e-6 * torch.from_numpy(rng.normal(size=(200, 40))).float())
    a, b = memory.correction(query), memory.correction(nudged)
    assert (a - b).abs().max() < 1e-4
