"""Scores of a probabilistic binary classifier: ROC AUC, ROC curve, precision, calibration."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {p.shape} must be 1-d of equal length")
    return y, p


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """P(score of a random match > score of a random miss), ties counted half
    (Mann-Whitney U / (n_pos n_neg)); NaN when one class is absent."""
    y, p = _check(y, p)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)  # average ranks: ties count half
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates as the threshold sweeps down over distinct scores."""
    y, p = _check(y, p)
    order = np.argsort(-p, kind="mergesort")
    y_sorted, p_sorted = y[order], p[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(p_sorted)), len(p_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, tp / max(1, y.sum())]
    fpr = np.r_[0.0, fp / max(1, (~y).sum())]
    return fpr, tpr


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """Precision, recall and share accepted when p >= threshold counts as a match."""
    y, p = _check(y, p)
    accepted = p >= threshold
    tp = int((accepted & y).sum())
    return {"threshold": float(threshold), "accepted": int(accepted.sum()),
            "accepted_fraction": float(accepted.mean()) if len(p) else float("nan"),
            "precision": tp / int(accepted.sum()) if accepted.any() else float("nan"),
            "recall": tp / int(y.sum()) if y.any() else float("nan")}


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability table on equal-width bins, expected calibration error and Brier score."""
    y, p = _check(y, p)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        mean_p, rate = float(p[inside].mean()), float(y[inside].mean())
        ece += inside.mean() * abs(mean_p - rate)
        table.append({"bin": [float(edges[b]), float(edges[b + 1])], "n": int(inside.sum()),
                      "mean_p": mean_p, "match_rate": rate})
    return {"ece": float(ece), "brier": float(np.mean((p - y) ** 2)), "bins": table}


def threshold_for_precision(y: np.ndarray, p: np.ndarray, target: float) -> float | None:
    """Lowest threshold whose precision reaches ``target`` (None if none does)."""
    y, p = _check(y, p)
    for t in np.unique(p):  # ascending: the first that reaches the target accepts the most
        if at_threshold(y, p, t)["precision"] >= target:
            return float(t)
    return None
