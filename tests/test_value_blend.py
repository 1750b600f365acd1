"""The value model's step towards the ensemble's mean: fitted where it helps, zero where
it does not, judged on held-out halves, and applied by the predictor from the card."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matcouple.surrogate.predict import SurrogatePredictor
from matcouple.surrogate.uncertainty import combine, spread_around
from matcouple.surrogate.value_blend import (
    blend,
    cross_fitted_weight,
    fit_value_blend,
    fit_weight,
)
from tests.test_surrogate_value_model import _model

CPU = torch.device("cpu")


def test_blend_steps_towards_the_ensemble_and_keeps_a_gap_physical():
    point, ens = np.array([1.0, -0.2]), np.array([2.0, -1.0])
    assert blend(point, ens, 0.25) == pytest.approx([1.25, -0.4])
    assert blend(point, ens, 0.25, non_negative=True) == pytest.approx([1.25, 0.0])


def test_the_fitted_fraction_is_the_one_that_made_the_labels():
    rng = np.random.default_rng(1)
    point, ens = rng.normal(size=2000), rng.normal(size=2000)
    y = 0.8 * point + 0.2 * ens  # exactly a fifth of the way to the ensemble
    assert fit_weight(point, ens, y) == pytest.approx(0.2)
    report = cross_fitted_weight(point, ens, y)
    assert report["ensemble_weight"] == pytest.approx(0.2)
    assert report["held_out_mae"] < 1e-9 < report["value_model_mae"]


def test_no_step_when_the_ensemble_only_adds_error_and_nan_labels_are_ignored():
    rng = np.random.default_rng(2)
    point = rng.normal(size=500)
    ens = point + rng.normal(size=500)  # the value model is exact, the ensemble noisy
    y = point.copy()
    y[::7] = np.nan
    assert fit_weight(point, ens, y) == 0.0
    assert fit_weight(point, ens, np.full(500, np.nan)) == 0.0
    report = cross_fitted_weight(point, ens, y)
    assert report["held_out_mae"] == pytest.approx(0.0) and np.isfinite(report["value_model_mae"])


def test_fit_value_blend_fits_each_target_against_the_mixture_mean():
    rng = np.random.default_rng(3)
    means, variances = rng.normal(size=(3, 400, 2)), np.full((3, 400, 2), 0.1)
    point = rng.normal(size=(400, 2))
    mix = combine(means, variances)[0]
    y = np.stack([0.7 * point[:, 0] + 0.3 * mix[:, 0], point[:, 1]], axis=1)
    weights, report = fit_value_blend(point, means, variances, y, ("a", "b"), set())
    assert weights == pytest.approx([0.3, 0.0])
    assert set(report) == {"a", "b"} and report["a"]["ensemble_weight"] == pytest.approx(0.3)


def test_the_predictor_applies_the_cards_fraction(silicon, rocksalt):
    members = [_model(0.2, seed) for seed in (1, 2)]
    card = {"calibration": {"value+ensemble2": {
        "formation_energy_per_atom": {"scale": 2.0, "ensemble_weight": 0.3},
        "band_gap": {"scale": 1.0}}}}  # no fraction in the card: the value model alone
    predictor = SurrogatePredictor.from_models(
        [m for m, _ in members], [b for _, b in members], device=CPU, mc_samples=0,
        value=_model(0.0, 7), card=card)
    assert predictor.ensemble_weight == [0.3, 0.0]
    graphs = [predictor.graph(s) for s in (silicon, rocksalt)]
    means, variances, point = predictor.outputs(graphs)
    mean, sigma = predictor.predict_graphs(graphs)
    mix = combine(means, variances)[0]
    expected_ef = point[:, 0] + 0.3 * (mix[:, 0] - point[:, 0])
    assert mean[:, 0] == pytest.approx(expected_ef, abs=1e-6)
    assert mean[:, 1] == pytest.approx(np.maximum(point[:, 1], 0.0), abs=1e-6)
    moved = point.copy()
    moved[:, 0] = expected_ef
    assert sigma[:, 0] == pytest.approx(2.0 * spread_around(moved, means, variances)[:, 0],
                                        rel=1e-6)
