"""The value model's prediction moved a fitted fraction of the way to the ensemble's mean.

Why: the value model (wide, deep, dropout-free) and the ensemble (narrower members with MC
dropout) err differently, so a small step from the value model towards the ensemble's mean
averages part of the error away; the ensemble runs anyway for the sigma, so the step costs
nothing at prediction. The fraction is fitted per target and mode on the validation split,
next to the calibration scale, and judged on held-out halves like the scale.

A card may name two or more value models (``value_models``, trained from different starts
or on different graphs); their value is their weighted sum (``value_weights``, per target,
on a grid of the simplex: for a pair, the first moved a fraction of the way to the second),
fitted and judged the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from matcouple.surrogate.uncertainty import combine, seeded_halves

# Fractions tried: the ensemble is the weaker predictor, so more than half is never useful.
WEIGHT_GRID = np.linspace(0.0, 0.5, 51)


NonNegative = bool | np.ndarray  # for a whole target, or per row (a bool array)


def floor_at_zero(value: np.ndarray, non_negative: NonNegative) -> np.ndarray:
    """``value`` clipped at zero where it cannot be negative."""
    if isinstance(non_negative, np.ndarray):
        return np.where(non_negative, np.maximum(value, 0.0), value)
    return np.maximum(value, 0.0) if non_negative else value


def _rows(non_negative: NonNegative, index) -> NonNegative:
    return non_negative[index] if isinstance(non_negative, np.ndarray) else non_negative


def blend(point: np.ndarray, ensemble_mean: np.ndarray, weight,
          non_negative: NonNegative = False) -> np.ndarray:
    """point + weight (ensemble_mean - point), clipped at zero where it cannot be negative
    (a whole target, e.g. the band gap, or the rows a bool array marks)."""
    return floor_at_zero(point + np.asarray(weight) * (ensemble_mean - point), non_negative)


def _mae(point, ensemble_mean, y, weight, non_negative) -> float:
    return float(np.abs(blend(point, ensemble_mean, weight, non_negative) - y).mean())


def fit_weight(point: np.ndarray, ensemble_mean: np.ndarray, y: np.ndarray,
               non_negative: NonNegative = False, grid: np.ndarray = WEIGHT_GRID) -> float:
    """The fraction on ``grid`` with the lowest MAE (rows with a label only);
    0 (the value model alone) when nothing is better or there is nothing to fit."""
    known = ~np.isnan(y)
    if not known.any():
        return 0.0
    p, e, t = point[known], ensemble_mean[known], y[known]
    floor = _rows(non_negative, known)
    maes = [_mae(p, e, t, w, floor) for w in grid]
    return float(grid[int(np.argmin(maes))])  # argmin: the smallest of ties


def held_out_values(point: np.ndarray, ensemble_mean: np.ndarray, y: np.ndarray,
                    non_negative: NonNegative = False, seed: int = 0,
                    grid: np.ndarray = WEIGHT_GRID) -> np.ndarray:
    """Each row's blended value with the fraction fitted on the *other* seeded half of the
    rows: what the blend does on data it was not fitted to (rows without a label: NaN)."""
    known = np.flatnonzero(~np.isnan(y))
    out = np.full(len(y), np.nan)
    halves = seeded_halves(len(known), seed)
    for fit, test in (halves, halves[::-1]):
        w = fit_weight(point[known[fit]], ensemble_mean[known[fit]], y[known[fit]],
                       _rows(non_negative, known[fit]), grid)
        out[known[test]] = blend(point[known[test]], ensemble_mean[known[test]], w,
                                 _rows(non_negative, known[test]))
    return out


def cross_fitted_weight(point: np.ndarray, ensemble_mean: np.ndarray, y: np.ndarray,
                        non_negative: NonNegative = False, seed: int = 0,
                        grid: np.ndarray = WEIGHT_GRID) -> dict[str, float]:
    """The fraction fitted on all rows (what is shipped) and the MAE it gives on each half
    when fitted on the other (what is reported), beside the value model's own MAE there."""
    known = ~np.isnan(y)
    held = held_out_values(point, ensemble_mean, y, non_negative, seed, grid)[known]
    p, e, t = point[known], ensemble_mean[known], y[known]
    floor = _rows(non_negative, known)
    own = floor_at_zero(p, floor)
    return {"ensemble_weight": fit_weight(p, e, t, floor, grid),
            "held_out_mae": float(np.abs(held - t).mean()) if len(t) else float("nan"),
            "value_model_mae": float(np.abs(own - t).mean()) if len(t) else float("nan")}


def _target_rows(non_negative: set[str] | np.ndarray, targets: Sequence[str]
                 ) -> list[NonNegative]:
    return [non_negative[:, j] if isinstance(non_negative, np.ndarray)
            else t in non_negative for j, t in enumerate(targets)]


def fit_value_blend(point: np.ndarray, member_means: np.ndarray, member_vars: np.ndarray,
                    y: np.ndarray, targets: Sequence[str], non_negative: set[str] | np.ndarray
                    ) -> tuple[list[float], dict[str, dict[str, float]]]:
    """Per-target fractions for :func:`matcouple.surrogate.predict.ensemble_value_and_sigma`
    and, per target, the report of :func:`cross_fitted_weight`. ``non_negative``: the
    targets that are never negative, or an (N, targets) bool array of the values that are
    not (:func:`matcouple.surrogate.predict.non_negative_rows`)."""
    mix, _ = combine(member_means, member_vars)
    floors = _target_rows(non_negative, targets)
    report = {t: cross_fitted_weight(point[:, j], mix[:, j], y[:, j], floors[j])
              for j, t in enumerate(targets)}
    return [report[t]["ensemble_weight"] for t in targets], report


def card_weights(mode_calibration: dict, targets: Sequence[str]) -> list[float]:
    """The fractions a card stores for one mode (0 for a target without one: old cards)."""
    return [float(mode_calibration.get(t, {}).get("ensemble_weight", 0.0)) for t in targets]


def value_model_names(card: dict) -> list[str]:
    """The value models a card names: ``value_models`` (a list), or an older card's single
    ``value_model``; none for a card without."""
    if card.get("value_models"):
        return list(card["value_models"])
    return [card["value_model"]] if card.get("value_model") else []


def value_memory_names(card: dict) -> list[str | None]:
    """The residual memory file of each value model a card names (``value_memories``,
    keyed by model file; None for a model without one)."""
    memories = card.get("value_memories") or {}
    return [memories.get(name) for name in value_model_names(card)]


def weighted_values(values: np.ndarray, weights: Sequence[Sequence[float]] | None
                    ) -> np.ndarray:
    """The value of K value models' predictions (K, N, T): per target, the sum of the
    predictions with that target's K weights (``weights`` (T, K); None: equal weights)."""
    if weights is None:
        return values.mean(axis=0)
    return np.einsum("knt,tk->nt", values, np.asarray(weights, dtype=values.dtype))


def _compositions(k: int, total: int) -> list[list[int]]:
    """Every list of ``k`` non-negative integers summing to ``total``, the first largest
    first."""
    if k == 1:
        return [[total]]
    return [[first, *rest] for first in range(total, -1, -1)
            for rest in _compositions(k - 1, total - first)]


def simplex_grid(k: int, steps: int) -> np.ndarray:
    """Every way of sharing a weight of 1 among ``k`` models in steps of 1/``steps``,
    (points, k), the first model alone first."""
    return np.array(_compositions(k, steps), dtype=float) / steps


def _best_row(values: np.ndarray, y: np.ndarray, non_negative: NonNegative,
              grid: np.ndarray) -> int:
    """The grid row whose weighted values (K, N) have the lowest MAE against ``y``."""
    maes = np.empty(len(grid))
    for i in range(0, len(grid), 256):  # (chunk, N) at a time: bounded memory
        pred = floor_at_zero(grid[i:i + 256] @ values, non_negative)
        maes[i:i + 256] = np.abs(pred - y).mean(axis=1)
    return int(np.argmin(maes))  # argmin: the first of ties


def fit_value_weights(values: np.ndarray, y: np.ndarray, targets: Sequence[str],
                      non_negative: set[str] | np.ndarray, steps: int | None = None,
                      seed: int = 0) -> tuple[list[list[float]], dict[str, dict]]:
    """Per-target weights of K value models' predictions (K, N, T): the point of
    :func:`simplex_grid` with the lowest MAE (rows with a label only), and per target the
    report: the MAE on each seeded half with the weights fitted on the other (what is
    quoted), and each model's own MAE. ``steps``: 100 for a pair, 50 beyond."""
    k = values.shape[0]
    grid = simplex_grid(k, steps or (100 if k == 2 else 50))
    floors = _target_rows(non_negative, targets)
    weights, report = [], {}
    for j, t in enumerate(targets):
        known = np.flatnonzero(~np.isnan(y[:, j]))
        v, truth, floor = values[:, known, j], y[known, j], _rows(floors[j], known)
        if not len(known):
            weights.append([1.0 / k] * k)
            report[t] = {"weights": weights[-1], "held_out_mae": float("nan"),
                         "model_maes": [float("nan")] * k}
            continue
        w = grid[_best_row(v, truth, floor, grid)]
        held = np.empty(len(known))
        halves = seeded_halves(len(known), seed)
        for fit, test in (halves, halves[::-1]):
            w_half = grid[_best_row(v[:, fit], truth[fit], _rows(floor, fit), grid)]
            held[test] = floor_at_zero(w_half @ v[:, test], _rows(floor, test))
        weights.append([float(x) for x in w])
        report[t] = {"weights": weights[-1],
                     "held_out_mae": float(np.abs(held - truth).mean()),
                     "model_maes": [float(np.abs(floor_at_zero(v[m], floor) - truth).mean())
                                    for m in range(k)]}
    return weights, report


def fit_pair_weights(values: np.ndarray, y: np.ndarray, targets: Sequence[str],
                     non_negative: set[str] | np.ndarray
                     ) -> tuple[list[list[float]], dict[str, dict[str, float]]]:
    """:func:`fit_value_weights` of a value pair (2, N, T), reported as (1 - w, w): per
    target w, its held-out MAE and each model's own MAE."""
    weights, report = fit_value_weights(values, y, targets, non_negative)
    return weights, {t: {"pair_weight": r["weights"][1],
                         "pair_held_out_mae": r["held_out_mae"],
                         "pair_first_mae": r["model_maes"][0],
                         "pair_second_mae": r["model_maes"][1]} for t, r in report.items()}
