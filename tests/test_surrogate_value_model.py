"""A value model: one model's prediction as the value, the ensemble's samples as its sigma."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.surrogate.atom_features import atom_feature_table
from matcouple.surrogate.graph import GraphSpec
from matcouple.surrogate.model import Crysformer, CrysformerConfig
from matcouple.surrogate.predict import SurrogatePredictor
from matcouple.surrogate.train import MODEL_FORMAT
from matcouple.surrogate.uncertainty import spread_around

CPU = torch.device("cpu")


def _model(dropout: float, seed: int, spec: GraphSpec | None = None, **cfg_kw
           ) -> tuple[Crysformer, dict]:
    torch.manual_seed(seed)
    cfg = CrysformerConfig(scalars=8, vectors=4, tensors=4, layers=1, heads=4, rbf=8,
                           dropout=dropout, **cfg_kw)
    model = Crysformer(cfg, torch.from_numpy(atom_feature_table())).eval()
    blob = {"format": MODEL_FORMAT, "model_config": cfg.as_dict(),
            "graph_spec": (spec or GraphSpec()).__dict__, "norm_mean": torch.tensor([0.1, 1.0]),
            "norm_std": torch.tensor([0.5, 2.0]), "state_dict": model.state_dict(),
            "data_hash": "test", "train_config": {}, "epochs_trained": 1, "best_epoch": 1,
            "val_mae": {"formation_energy_per_atom": 0.1, "band_gap": 0.3}}
    return model, blob


def _predictor(value, mc_samples=4, card=None):
    members = [_model(0.2, seed) for seed in (1, 2)]
    return SurrogatePredictor.from_models([m for m, _ in members], [b for _, b in members],
                                          device=CPU, mc_samples=mc_samples, value=value,
                                          card=card)


@pytest.mark.parametrize("mc_samples", [0, 4])
def test_value_is_the_value_models_and_sigma_the_spread_about_it(silicon, rocksalt,
                                                                 mc_samples):
    value = _model(0.0, 7)
    card = {"calibration": {f"value+ensemble2{'+mc4' if mc_samples else ''}": {
        "formation_energy_per_atom": {"scale": 2.0}, "band_gap": {"scale": 3.0}}}}
    predictor = _predictor(value, mc_samples, card)
    assert predictor.mode == "value+ensemble2" + ("+mc4" if mc_samples else "")
    assert predictor.calibrated
    graphs = [predictor.graph(s) for s in (silicon, rocksalt)]
    means, variances, point = predictor.outputs(graphs)
    alone = SurrogatePredictor.from_models([value[0], value[0]], [value[1], value[1]],
                                           device=CPU, mc_samples=0)
    assert point == pytest.approx(alone.member_outputs(graphs)[0][0], abs=1e-6)
    mean, sigma = predictor.predict_graphs(graphs)
    expected = spread_around(point, means, variances) * np.array([2.0, 3.0])
    assert sigma == pytest.approx(expected, rel=1e-6)
    assert mean[:, 0] == pytest.approx(point[:, 0], abs=1e-6)
    assert (mean[:, 1] >= 0).all()  # the gap stays physical


def test_the_value_model_leaves_the_members_mc_passes_unchanged(silicon, rocksalt):
    plain, with_value = _predictor(None), _predictor(_model(0.0, 7))
    graphs = [plain.graph(s) for s in (silicon, rocksalt)]
    a, b = plain.member_outputs(graphs), with_value.outputs(graphs)
    assert a[0] == pytest.approx(b[0], abs=1e-7) and a[1] == pytest.approx(b[1], abs=1e-9)
    assert plain.outputs(graphs)[2] is None


def test_a_value_model_on_other_graphs_or_targets_is_refused():
    # another k is served (the graph is cut down to it: test_graph_nearest.py) ...
    assert _predictor(_model(0.0, 7, spec=GraphSpec(k=8))).spec.k == 12
    # ... any other graph setting is not
    with pytest.raises(MatcoupleError, match="graph settings other than k"):
        _predictor(_model(0.0, 7, spec=GraphSpec(max_radius=20.0)))
    with pytest.raises(MatcoupleError, match="value models"):
        _predictor(_model(0.0, 7, targets=("band_gap",)))


def write_model_dir(folder, value_key: str = "value_model") -> tuple[list[str], dict]:
    """Two members (dropout 0.2) and a dropout-free value model saved in ``folder`` with a
    card naming them (``value_key``: an old card's ``value_model`` or ``value_models``)."""
    names = []
    for k, (dropout, seed) in enumerate([(0.2, 1), (0.2, 2), (0.0, 7)]):
        _, blob = _model(dropout, seed)
        name = f"crysformer-t-s{k}.pt" if k < 2 else "value-t.pt"
        torch.save(blob, folder / name)
        names.append(name)
    card = {"version": "t", "members": names[:2],
            value_key: names[2] if value_key == "value_model" else [names[2]]}
    (folder / "model_card.json").write_text(json.dumps(card))
    return names, card


def test_the_card_names_the_value_model_and_a_setting_turns_it_off(tmp_path, monkeypatch):
    names, _ = write_model_dir(tmp_path)
    predictor = SurrogatePredictor.default(model_dir=tmp_path, device="cpu", mc_samples=0)
    assert predictor.mode == "value+ensemble2"
    monkeypatch.setenv("MATCOUPLE_VALUE_MODEL", "0")
    get_settings.cache_clear()
    try:
        predictor = SurrogatePredictor.default(model_dir=tmp_path, device="cpu",
                                               mc_samples=0)
        assert predictor.mode == "ensemble2" and predictor.value is None
    finally:
        monkeypatch.delenv("MATCOUPLE_VALUE_MODEL")
        get_settings.cache_clear()
    (tmp_path / names[2]).unlink()
    with pytest.raises(MatcoupleError, match="value-t.pt not found"):
        SurrogatePredictor.default(model_dir=tmp_path, device="cpu")
