"""A value pair: two value models' weighted prediction as the value; with dropout off their
own spread (given a floor) as the sigma, the ensemble not run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matcouple.store.registry import model_files
from matcouple.surrogate.predict import SurrogatePredictor, mode_name
from matcouple.surrogate.uncertainty import (
    calibration_metrics,
    cross_fitted_calibration,
    fit_floor,
    with_floor,
)
from matcouple.surrogate.value_blend import (
    fit_pair_weights,
    fit_value_weights,
    simplex_grid,
    value_model_names,
)
from tests.test_surrogate_value_model import _model

CPU = torch.device("cpu")
TARGETS = ("formation_energy_per_atom", "band_gap")


def _pair_predictor(mc_samples: int, card: dict) -> tuple[SurrogatePredictor, list, list]:
    members = [_model(0.2, seed) for seed in (1, 2)]
    values = [_model(0.0, 7), _model(0.0, 8)]
    predictor = SurrogatePredictor.from_models(
        [m for m, _ in members], [b for _, b in members], device=CPU,
        mc_samples=mc_samples, value=values, card=card)
    return predictor, members, values


def _alone(model_blob, graphs) -> np.ndarray:
    model, blob = model_blob
    one = SurrogatePredictor.from_models([model, model], [blob, blob], device=CPU,
                                         mc_samples=0)
    return one.member_outputs(graphs)[0][0]


CARD = {"value_weights": {"formation_energy_per_atom": [0.7, 0.3], "band_gap": [0.4, 0.6]},
        "calibration": {"value2": {"formation_energy_per_atom": {"scale": 2.0, "floor": 0.05},
                                   "band_gap": {"scale": 3.0, "floor": 0.2}},
                        "value2+ensemble2+mc4": {"formation_energy_per_atom": {"scale": 1.5},
                                                 "band_gap": {"scale": 1.2}}}}


def test_with_dropout_off_the_pair_alone_gives_value_and_floored_sigma(silicon, rocksalt):
    predictor, members, values = _pair_predictor(0, CARD)
    assert predictor.mode == "value2" and predictor.values_only and predictor.calibrated
    calls = []
    for model, _ in members:
        model.register_forward_hook(lambda *_: calls.append(1))
    graphs = [predictor.graph(s) for s in (silicon, rocksalt)]
    a, b = _alone(values[0], graphs), _alone(values[1], graphs)
    mean, sigma = predictor.predict_graphs(graphs)
    assert not calls  # the members were not run
    weights = np.array([[0.7, 0.4], [0.3, 0.6]])
    point = weights[0] * a + weights[1] * b
    assert mean[:, 0] == pytest.approx(point[:, 0], abs=1e-6)
    assert mean[:, 1] == pytest.approx(np.maximum(point[:, 1], 0), abs=1e-6)
    spread = np.sqrt(((a - point) ** 2 + (b - point) ** 2) / 2)
    expected = np.array([2.0, 3.0]) * np.sqrt(np.array([0.05, 0.2]) ** 2 + spread**2)
    assert sigma == pytest.approx(expected, rel=1e-5)
    assert (sigma[:, 0] >= 2.0 * 0.05 - 1e-9).all()  # never below the scaled floor


def test_with_mc_dropout_the_members_give_the_sigma_about_the_pair(silicon, rocksalt):
    predictor, _, values = _pair_predictor(4, CARD)
    assert predictor.mode == "value2+ensemble2+mc4" and not predictor.values_only
    graphs = [predictor.graph(s) for s in (silicon, rocksalt)]
    means, variances, point = predictor.outputs(graphs)
    assert means.shape[0] == 2 and variances.max() > 0  # the members' MC passes
    a, b = _alone(values[0], graphs), _alone(values[1], graphs)
    assert point == pytest.approx(np.array([0.7, 0.4]) * a + np.array([0.3, 0.6]) * b,
                                  abs=1e-6)
    _, sigma = predictor.predict_graphs(graphs)
    raw = np.sqrt((variances + (means - point[None]) ** 2).mean(0))
    assert sigma == pytest.approx(raw * np.array([1.5, 1.2]), rel=1e-5)


def test_mode_names():
    assert mode_name(3, 0, 0) == "ensemble3" and mode_name(3, 0, 8) == "ensemble3+mc8"
    assert mode_name(3, 1, 0) == "value+ensemble3"
    assert mode_name(3, 1, 8) == "value+ensemble3+mc8"
    assert mode_name(3, 2, 0) == "value2" and mode_name(3, 2, 8) == "value2+ensemble3+mc8"


def test_card_names_one_value_model_or_a_pair_and_the_registry_keeps_them_all():
    old = {"members": ["a.pt", "b.pt"], "value_model": "v.pt"}
    pair = {"members": ["a.pt", "b.pt"], "value_models": ["v.pt", "w.pt"]}
    assert value_model_names(old) == ["v.pt"] and value_model_names({"members": []}) == []
    assert value_model_names(pair) == ["v.pt", "w.pt"]
    assert model_files(pair) == ["a.pt", "b.pt", "v.pt", "w.pt"]


def test_the_floor_is_found_where_the_errors_have_one():
    rng = np.random.default_rng(0)
    spread = rng.exponential(0.03, 20_000)
    errors = rng.normal(0, np.sqrt(0.04**2 + spread**2))
    floor, scale = fit_floor(errors, spread)
    assert floor == pytest.approx(0.04, rel=0.25) and scale == pytest.approx(1.0, abs=0.1)
    # a floor beats the bare spread on NLL, the coverage stays at 90%
    bare = calibration_metrics(errors, cross_fitted_calibration(errors, spread)["scale"]
                               * spread)
    floored = cross_fitted_calibration(errors, spread, floor=True)
    assert floored["held_out"]["nll"] < bare["nll"] - 0.5
    assert floored["held_out"]["coverage_90"] == pytest.approx(0.9, abs=0.02)
    assert floored["floor"] == pytest.approx(floor) and floored["scale"] == pytest.approx(scale)
    # errors that follow the spread exactly want (almost) no floor
    errors = rng.normal(0, 1, 20_000) * spread
    assert fit_floor(errors, spread)[0] < 0.005
    assert with_floor(np.array([0.0, 3.0]), 4.0) == pytest.approx([4.0, 5.0])


def test_pair_weights_lean_towards_the_better_model():
    rng = np.random.default_rng(1)
    y = rng.normal(-1, 1, (4000, 2))
    good = y + rng.normal(0, 0.02, y.shape)
    worse = y + rng.normal(0, 0.06, y.shape)
    weights, report = fit_pair_weights(np.stack([worse, good]), y, TARGETS, {"band_gap"})
    for (w0, w1), t in zip(weights, TARGETS, strict=True):
        assert w0 + w1 == pytest.approx(1.0)
        assert 0.8 <= w1 <= 0.99  # inverse variances: 0.9
        r = report[t]
        assert r["pair_weight"] == pytest.approx(w1)
        assert r["pair_held_out_mae"] < r["pair_second_mae"] < r["pair_first_mae"]
    nan_y = y.copy()
    nan_y[::3, 0] = np.nan  # rows without a label are left out, not NaN
    _, report = fit_pair_weights(np.stack([worse, good]), nan_y, TARGETS, {"band_gap"})
    assert np.isfinite(report["formation_energy_per_atom"]["pair_held_out_mae"])


def test_three_value_models_get_weights_on_the_simplex_judged_on_held_out_halves():
    rng = np.random.default_rng(2)
    y = rng.normal(-1, 1, (3000, 2))
    shared = rng.normal(0, 0.03, y.shape)  # what two of them get wrong together
    a = y + shared + rng.normal(0, 0.01, y.shape)
    b = y + shared + rng.normal(0, 0.01, y.shape)
    c = y + rng.normal(0, 0.04, y.shape)  # worse alone, but errs on its own
    weights, report = fit_value_weights(np.stack([a, b, c]), y, TARGETS, {"band_gap"})
    for w, t in zip(weights, TARGETS, strict=True):
        assert sum(w) == pytest.approx(1.0) and min(w) >= 0
        assert w[2] > 0.2  # the independent model is worth a real share
        r = report[t]
        assert r["held_out_mae"] < min(r["model_maes"])
    # a trio with a useless third model gives that one no weight
    junk = y + rng.normal(0, 1.0, y.shape)
    weights, _ = fit_value_weights(np.stack([a, c, junk]), y, TARGETS, {"band_gap"})
    assert all(w[2] == 0 for w in weights)
    assert simplex_grid(3, 50).shape == (1326, 3)
    assert simplex_grid(3, 50).sum(1) == pytest.approx(np.ones(1326))


def test_three_value_models_with_dropout_off_give_value_and_floored_sigma(silicon, rocksalt):
    members = [_model(0.2, seed) for seed in (1, 2)]
    values = [_model(0.0, 7), _model(0.0, 8), _model(0.0, 9)]
    card = {"value_weights": {"formation_energy_per_atom": [0.5, 0.3, 0.2],
                              "band_gap": [0.2, 0.2, 0.6]},
            "calibration": {"value3": {"formation_energy_per_atom": {"scale": 2.0,
                                                                     "floor": 0.05},
                                       "band_gap": {"scale": 3.0, "floor": 0.2}}}}
    predictor = SurrogatePredictor.from_models(
        [m for m, _ in members], [b for _, b in members], device=CPU, mc_samples=0,
        value=values, card=card)
    assert predictor.mode == "value3" and predictor.values_only and predictor.calibrated
    graphs = [predictor.graph(s) for s in (silicon, rocksalt)]
    alone = [_alone(v, graphs) for v in values]
    mean, sigma = predictor.predict_graphs(graphs)
    w = np.array([[0.5, 0.2], [0.3, 0.2], [0.2, 0.6]])
    point = sum(w[i] * alone[i] for i in range(3))
    assert mean[:, 0] == pytest.approx(point[:, 0], abs=1e-6)
    spread = np.sqrt(sum((x - point) ** 2 for x in alone) / 3)
    expected = np.array([2.0, 3.0]) * np.sqrt(np.array([0.05, 0.2]) ** 2 + spread**2)
    assert sigma == pytest.approx(expected, rel=1e-5)
