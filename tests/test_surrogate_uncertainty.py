"""Combining ensemble samples into a sigma, and calibrating it (no data or models needed)."""

from __future__ import annotations

import numpy as np
import pytest

from matcouple.surrogate.uncertainty import (
    calibration_metrics,
    combine,
    fit_scale,
    spread_around,
)


def test_spread_around_the_mixture_mean_is_the_mixture_sigma():
    rng = np.random.default_rng(0)
    means, variances = rng.normal(size=(3, 50, 2)), rng.uniform(0, 0.1, size=(3, 50, 2))
    mean, sigma = combine(means, variances)
    assert spread_around(mean, means, variances) == pytest.approx(sigma, rel=1e-12)


def test_spread_around_another_value_adds_the_distance_to_it():
    means = np.array([[[1.0]], [[3.0]]])  # two members: 1 and 3, no MC variance
    variances = np.zeros_like(means)
    assert spread_around(np.array([[2.0]]), means, variances)[0, 0] == pytest.approx(1.0)
    # a point model at 0: the members stand 1 and 3 away -> sqrt((1 + 9) / 2)
    assert spread_around(np.array([[0.0]]), means, variances)[0, 0] == pytest.approx(
        np.sqrt(5.0))
    with_var = spread_around(np.array([[0.0]]), means, np.full_like(means, 0.5))
    assert with_var[0, 0] == pytest.approx(np.sqrt(5.5))


def test_fitted_scale_gives_the_asked_coverage():
    rng = np.random.default_rng(1)
    sigma = rng.uniform(0.05, 0.2, size=20000)
    errors = rng.normal(size=sigma.size) * sigma * 3.0  # sigma three times too small
    scale = fit_scale(errors, sigma)
    assert scale == pytest.approx(3.0, rel=0.05)
    assert calibration_metrics(errors, sigma * scale)["coverage_90"] == pytest.approx(0.9,
                                                                                     abs=0.01)
