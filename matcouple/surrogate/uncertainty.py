"""Uncertainty of Crysformer predictions: combining samples, recalibrating, scoring.

Samples come from a deep ensemble (members trained with different seeds) and, optionally,
MC dropout inside each member. The raw spread is recalibrated with one scale factor per
target, fitted on validation data (split-conformal: the 90% quantile of |error|/sigma is
mapped onto the Gaussian 90% interval), then judged on data that did not fit the scale.
A spread of few dropout-free models (a value pair) can be near zero where both models
still err, so it is first given a floor, sigma = sqrt(floor^2 + spread^2), the floor fitted
beside the scale (:func:`fit_floor`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

Z90 = float(stats.norm.ppf(0.95))  # half-width of the central 90% Gaussian interval


def combine(member_means: np.ndarray, member_vars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mixture mean and std over members: (M, N, T) -> (N, T), (N, T)."""
    mean = member_means.mean(axis=0)
    var = member_vars.mean(axis=0) + member_means.var(axis=0)
    return mean, np.sqrt(var)


def spread_around(point: np.ndarray, member_means: np.ndarray,
                  member_vars: np.ndarray) -> np.ndarray:
    """RMS deviation of an ensemble's samples from another model's value: (N, T).

    sigma^2 = mean_k [var_k + (mean_k - point)^2], the mixture's second moment about
    ``point``. With ``point`` the mixture mean this is :func:`combine`'s sigma; for a more
    accurate single model it adds how far the ensemble stands from that model, so the
    ensemble can give an uncertainty to a model that has none of its own."""
    dev = member_means - point[None]
    return np.sqrt((member_vars + dev**2).mean(axis=0))


def fit_scale(errors: np.ndarray, sigma: np.ndarray, level: float = 0.9) -> float:
    """Scale s so that |error| <= s * z * sigma holds for ``level`` of the calibration set."""
    ratio = np.abs(errors) / np.maximum(sigma, 1e-12)
    z = float(stats.norm.ppf(0.5 + level / 2))
    return float(np.quantile(ratio, level) / z)


def _nll(errors: np.ndarray, sigma: np.ndarray) -> float:
    sigma = np.maximum(sigma, 1e-12)
    return float((0.5 * np.log(2 * math.pi * sigma**2) + 0.5 * (errors / sigma) ** 2).mean())


def with_floor(spread: np.ndarray, floor: float) -> np.ndarray:
    """sqrt(floor^2 + spread^2): a spread that is never below ``floor``."""
    return np.sqrt(floor**2 + np.asarray(spread, float) ** 2)


def fit_floor(errors: np.ndarray, spread: np.ndarray, level: float = 0.9
              ) -> tuple[float, float]:
    """(floor, scale) for sigma = scale * sqrt(floor^2 + spread^2): for each floor on a grid
    (0 and 40 steps from 1e-3 to 3x the median |error|) the scale of :func:`fit_scale`,
    keeping the pair with the lowest Gaussian NLL. The scale still sets the coverage; the
    floor decides how much of sigma follows the spread."""
    errors = np.abs(np.asarray(errors, float))
    top = max(3 * float(np.median(errors)), 2e-3)
    best = (math.inf, 0.0, 1.0)
    for floor in np.concatenate([[0.0], np.geomspace(1e-3, top, 40)]):
        raw = with_floor(spread, floor)
        scale = fit_scale(errors, raw, level)
        best = min(best, (_nll(errors, scale * raw), float(floor), scale))
    return best[1], best[2]


def calibration_metrics(errors: np.ndarray, sigma: np.ndarray) -> dict[str, float]:
    """Coverage of the 90% interval, miscalibration area, Spearman(|err|, sigma), NLL."""
    errors, sigma = np.asarray(errors, float), np.maximum(np.asarray(sigma, float), 1e-12)
    levels = np.linspace(0.01, 0.99, 99)
    z = np.abs(errors) / sigma
    observed = np.array([(z <= stats.norm.ppf(0.5 + p / 2)).mean() for p in levels])
    rho = stats.spearmanr(np.abs(errors), sigma).statistic
    return {
        "coverage_90": float((z <= Z90).mean()),
        "miscalibration_area": float(np.abs(observed - levels).mean()),
        "spearman_abs_error_sigma": float(rho) if np.isfinite(rho) else float("nan"),
        "nll": _nll(errors, sigma),
        "mae": float(np.abs(errors).mean()),
        "mean_sigma": float(sigma.mean()),
    }


def seeded_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of two random halves of n rows (the same for the same seed)."""
    idx = np.random.default_rng(seed).permutation(n)
    return idx[: n // 2], idx[n // 2:]


def held_out_sigmas(errors: np.ndarray, sigma: np.ndarray, seed: int = 0, *,
                    floor: bool = False) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Each row's sigma scaled by the factor (and, with ``floor``, given the floor of
    :func:`fit_floor`) fitted on the *other* seeded half of the set: what a calibrated
    sigma looks like on data the calibration never saw. Also returns the two halves."""
    halves = seeded_halves(len(errors), seed)
    out = np.empty(len(errors), dtype=float)
    for fit_idx, test_idx in (halves, halves[::-1]):
        if floor:
            f, scale = fit_floor(errors[fit_idx], sigma[fit_idx])
            out[test_idx] = scale * with_floor(sigma[test_idx], f)
        else:
            out[test_idx] = fit_scale(errors[fit_idx], sigma[fit_idx]) * sigma[test_idx]
    return out, halves


def cross_fitted_calibration(errors: np.ndarray, sigma: np.ndarray,
                             seed: int = 0, *, floor: bool = False) -> dict[str, object]:
    """Fit the scale (and with ``floor`` the floor) on one half of the set, score on the
    other half, both ways.

    Returns the scale fitted on all of it (what is shipped; with ``floor`` also the floor)
    and the held-out metrics (what is reported), so the coverage quoted was never used to
    choose the scale.
    """
    scaled, halves = held_out_sigmas(errors, sigma, seed, floor=floor)
    held_out = [calibration_metrics(errors[h], scaled[h]) for h in halves[::-1]]
    report = {k: float(np.mean([h[k] for h in held_out])) for k in held_out[0]}
    if floor:
        f, scale = fit_floor(errors, sigma)
        fitted = {"scale": scale, "floor": f}
    else:
        fitted = {"scale": fit_scale(errors, sigma)}
    return {**fitted, "held_out": report, "uncalibrated": calibration_metrics(errors, sigma)}
