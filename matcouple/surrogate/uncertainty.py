"""Uncertainty of Crysformer predictions: combining samples, recalibrating, scoring.

Samples come from a deep ensemble (members trained with different seeds) and, optionally,
MC dropout inside each member. The raw spread is recalibrated with one scale factor per
target, fitted on validation data (split-conformal: the 90% quantile of |error|/sigma is
mapped onto the Gaussian 90% interval), then judged on data that did not fit the scale.
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


def calibration_metrics(errors: np.ndarray, sigma: np.ndarray) -> dict[str, float]:
    """Coverage of the 90% interval, miscalibration area, Spearman(|err|, sigma), NLL."""
    errors, sigma = np.asarray(errors, float), np.maximum(np.asarray(sigma, float), 1e-12)
    levels = np.linspace(0.01, 0.99, 99)
    z = np.abs(errors) / sigma
    observed = np.array([(z <= stats.norm.ppf(0.5 + p / 2)).mean() for p in levels])
    rho = stats.spearmanr(np.abs(errors), sigma).statistic
    nll = 0.5 * np.log(2 * math.pi * sigma**2) + 0.5 * z**2
    return {
        "coverage_90": float((z <= Z90).mean()),
        "miscalibration_area": float(np.abs(observed - levels).mean()),
        "spearman_abs_error_sigma": float(rho) if np.isfinite(rho) else float("nan"),
        "nll": float(nll.mean()),
        "mae": float(np.abs(errors).mean()),
        "mean_sigma": float(sigma.mean()),
    }


def seeded_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of two random halves of n rows (the same for the same seed)."""
    idx = np.random.default_rng(seed).permutation(n)
    return idx[: n // 2], idx[n // 2:]


def held_out_sigmas(errors: np.ndarray, sigma: np.ndarray, seed: int = 0
                    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Each row's sigma scaled by the factor fitted on the *other* seeded half of the set:
    what a calibrated sigma looks like on data the calibration never saw. Also returns
    the two halves (row indices)."""
    halves = seeded_halves(len(errors), seed)
    out = np.empty(len(errors), dtype=float)
    for fit_idx, test_idx in (halves, halves[::-1]):
        out[test_idx] = fit_scale(errors[fit_idx], sigma[fit_idx]) * sigma[test_idx]
    return out, halves


def cross_fitted_calibration(errors: np.ndarray, sigma: np.ndarray,
                             seed: int = 0) -> dict[str, object]:
    """Fit the scale on one half of the set, score on the other half, both ways.

    Returns the scale fitted on all of it (what is shipped) and the held-out metrics
    (what is reported), so the coverage quoted was never used to choose the scale.
    """
    scaled, halves = held_out_sigmas(errors, sigma, seed)
    held_out = [calibration_metrics(errors[h], scaled[h]) for h in halves[::-1]]
    report = {k: float(np.mean([h[k] for h in held_out])) for k in held_out[0]}
    return {"scale": fit_scale(errors, sigma), "held_out": report,
            "uncalibrated": calibration_metrics(errors, sigma)}
