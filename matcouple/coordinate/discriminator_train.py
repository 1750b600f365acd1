"""Train the match discriminator on labelled CSP samples and write model, card and plot.

Compositions never straddle a split: folds are drawn over reduced formulas, so every score
is for compositions the classifier has not seen. Reported numbers are pooled out-of-fold
predictions of a K-fold cross-validation (each fold: train on K-2 folds, early-stop and
Platt-calibrate on one, score the held-out one). The shipped model is then fitted on all
compositions but one fold, which early-stops and calibrates it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pymatgen.core import Structure
from torch import nn

from matcouple.coordinate.discriminator import MatchClassifier, save_model, shipped_surrogate
from matcouple.coordinate.discriminator_data import iter_labelled, read_sample_set
from matcouple.coordinate.discriminator_features import GEOMETRY, SURROGATE, feature_matrix
from matcouple.coordinate.discriminator_metrics import (
    at_threshold,
    calibration,
    roc_auc,
    roc_curve,
    threshold_for_precision,
)
from matcouple.errors import DatasetError
from matcouple.settings import get_settings

FEATURES_VERSION = "v2-primitive"


@dataclass
class SampleFeatures:
    """Feature rows of labelled samples with their composition (the split unit)."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    rmsd: np.ndarray
    names: list[str]
    sources: list[dict[str, Any]]

    def columns(self, names: Sequence[str]) -> np.ndarray:
        return self.x[:, [self.names.index(n) for n in names]]


def _cached_features(path: Path, records: list[dict[str, Any]], predictor, tag: str,
                     progress: bool) -> np.ndarray:
    """Feature rows of a sample set's structures, cached beside it (keyed by ``tag``).

    Without a predictor the SURROGATE columns are NaN, and any cache of this feature
    version serves (its geometry columns are the same)."""
    cache = path.with_name(path.name.replace(".jsonl.gz", "") + ".features.npz")
    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        same = str(stored["tag"]) == tag or (
            predictor is None and str(stored["tag"]).startswith(f"{FEATURES_VERSION}|"))
        if same and len(stored["x"]) == len(records):
            return stored["x"]
    structures = [Structure.from_dict(r["structure"]) for r in records]
    workers = max(1, (os.cpu_count() or 2) - 1)
    x = feature_matrix(structures, predictor=predictor, progress=progress, workers=workers)
    if predictor is None:
        x = np.concatenate([x, np.full((len(x), len(SURROGATE)), np.nan)], axis=1)
    np.savez(cache, x=x, tag=np.array(tag))
    return x


def load_sample_features(paths: Sequence[Path | str], *, rmsd_threshold: float | None = None,
                         predictor=None, surrogate: bool = True,
                         progress: bool = True) -> SampleFeatures:
    """Features and labels (RMSD < d) of every sample with a structure in ``paths``;
    ``surrogate=False`` leaves the surrogate's columns NaN (geometry-only variants)."""
    settings = get_settings()
    d = settings.discriminator_rmsd_threshold if rmsd_threshold is None else rmsd_threshold
    if surrogate:
        predictor = predictor or shipped_surrogate()
        tag = f"{FEATURES_VERSION}|{predictor.version}|{predictor.mode}"
    else:
        predictor, tag = None, f"{FEATURES_VERSION}|geometry"
    xs, ys, groups, rmsds, sources = [], [], [], [], []
    for path in map(Path, paths):
        labelled = list(iter_labelled(read_sample_set(path), d))
        if not labelled:
            raise DatasetError(f"{path} has no samples with a structure")
        records = [r for r, _ in labelled]
        xs.append(_cached_features(path, records, predictor, tag, progress))
        ys.extend(label for _, label in labelled)
        groups.extend(f"{r['dataset']}:{r['composition']}" for r in records)
        rmsds.extend(np.nan if r["rmsd"] is None else r["rmsd"] for r in records)
        first = records[0]
        sources.append({"file": path.name, "samples": len(records),
                        "dataset": first["dataset"], "sampler": first["sampler"]})
    return SampleFeatures(np.concatenate(xs), np.array(ys, dtype=bool), np.array(groups),
                          np.array(rmsds, dtype=np.float64), [*GEOMETRY, *SURROGATE], sources)


def group_folds(groups: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold index of each sample; all samples of one composition share a fold."""
    unique = sorted(set(groups.tolist()))
    if len(unique) < k:
        raise DatasetError(f"{len(unique)} compositions cannot make {k} folds; "
                           "sample more compositions")
    random.Random(seed).shuffle(unique)
    fold_of = {g: i % k for i, g in enumerate(unique)}
    return np.array([fold_of[g] for g in groups.tolist()])


def _platt(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(a, b) minimising the log loss of sigmoid(a * logit + b) on held-out data."""
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=0.5, max_iter=200)
    z, t = logits.double(), y.double()

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(params[0] * z + params[1], t)
        loss.backward()
        return loss

    opt.step(closure)
    return params.detach()


def fit_classifier(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                   y_val: np.ndarray, *, hidden: Sequence[int] = (32, 32),
                   dropout: float = 0.1, seed: int = 0, epochs: int = 600,
                   patience: int = 60) -> MatchClassifier:
    """Adam on the log loss, best validation epoch kept, then Platt scaling on validation."""
    torch.manual_seed(seed)
    model = MatchClassifier(x_train.shape[1], hidden, dropout)
    mean = np.nanmean(x_train, axis=0)
    std = np.nanstd(x_train, axis=0)
    model.mean.copy_(torch.as_tensor(np.nan_to_num(mean)))
    model.std.copy_(torch.as_tensor(np.where(np.isfinite(std) & (std > 1e-9), std, 1.0)))
    xt, yt = torch.as_tensor(x_train), torch.as_tensor(y_train, dtype=torch.float32)
    xv, yv = torch.as_tensor(x_val), torch.as_tensor(y_val, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    loss_fn = nn.functional.binary_cross_entropy_with_logits
    best, best_state, waited = float("inf"), None, 0
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        loss_fn(model.logits(xt), yt).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model.logits(xv), yv))
        if val < best - 1e-5:
            best, waited = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        model.platt.copy_(_platt(model.logits(xv), yv))
    return model


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: np.ndarray, *,
                hidden: Sequence[int], seed: int = 0) -> np.ndarray:
    """Calibrated p of every sample from the model that never saw its composition."""
    k = int(folds.max()) + 1
    p = np.full(len(y), np.nan)
    for test in range(k):
        val = (test + 1) % k
        train = (folds != test) & (folds != val)
        model = fit_classifier(x[train], y[train], x[folds == val], y[folds == val],
                               hidden=hidden, seed=seed + test)
        with torch.no_grad():
            p[folds == test] = model.probabilities(torch.as_tensor(x[folds == test])).numpy()
    return p


VARIANTS = {  # name -> (feature names, hidden layers)
    "mlp_all": ([*GEOMETRY, *SURROGATE], (32, 32)),
    "logistic_all": ([*GEOMETRY, *SURROGATE], ()),
    "mlp_geometry": (list(GEOMETRY), (32, 32)),
}


def evaluate(data: SampleFeatures, folds: np.ndarray, p_min: float, seed: int = 0,
             variants: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Cross-validated AUC, precision at ``p_min`` and calibration of each variant."""
    unknown = [v for v in variants or () if v not in VARIANTS]
    if unknown:
        raise DatasetError(f"unknown variant(s) {unknown}; use {', '.join(VARIANTS)}")
    results = {}
    for name in variants or VARIANTS:
        features, hidden = VARIANTS[name]
        p = out_of_fold(data.columns(features), data.y, folds, hidden=hidden, seed=seed)
        fpr, tpr = roc_curve(data.y, p)
        results[name] = {
            "features": features, "hidden": list(hidden), "auc": roc_auc(data.y, p),
            "fold_auc": [roc_auc(data.y[folds == f], p[folds == f])
                         for f in range(int(folds.max()) + 1)],
            "at_p_match_min": at_threshold(data.y, p, p_min),
            "threshold_precision_0.9": threshold_for_precision(data.y, p, 0.9),
            "calibration": calibration(data.y, p),
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}, "p": p}
    return results


def plot_card(results: dict[str, dict[str, Any]], chosen: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_roc, ax_cal) = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, r in results.items():
        ax_roc.plot(r["roc"]["fpr"], r["roc"]["tpr"], lw=2 if name == chosen else 1,
                    label=f"{name} (AUC {r['auc']:.3f})")
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate",
               title="ROC, out-of-fold (held-out compositions)")
    ax_roc.legend(loc="lower right", fontsize=8)
    bins = results[chosen]["calibration"]["bins"]
    ax_cal.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_cal.plot([b["mean_p"] for b in bins], [b["match_rate"] for b in bins], "o-",
                label=f"{chosen} (ECE {results[chosen]['calibration']['ece']:.3f})")
    for b in bins:
        ax_cal.annotate(str(b["n"]), (b["mean_p"], b["match_rate"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
    ax_cal.set(xlabel="predicted p_match", ylabel="observed match fraction",
               title="calibration (n per bin)", xlim=(0, 1), ylim=(0, 1))
    ax_cal.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def train_discriminator(paths: Sequence[Path | str], out: Path | str, *, folds: int = 5,
                        seed: int = 0, rmsd_threshold: float | None = None,
                        variant: str | None = None, variants: Sequence[str] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Cross-validate ``variants`` (default all), fit ``variant`` (default: the best
    cross-validated AUC), write ``out`` + card + ROC plot."""
    settings = get_settings()
    out = Path(out)
    unknown = [v for v in [*(variants or ()), *([variant] if variant else [])]
               if v not in VARIANTS]
    if unknown:
        raise DatasetError(f"unknown variant(s) {unknown}; use one of {', '.join(VARIANTS)}")
    d = settings.discriminator_rmsd_threshold if rmsd_threshold is None else rmsd_threshold
    p_min = settings.discriminator_p_match_min
    needed = [*(variants or VARIANTS), *([variant] if variant else [])]
    surrogate = any(f in SURROGATE for v in needed for f in VARIANTS[v][0])
    data = load_sample_features(paths, rmsd_threshold=d, surrogate=surrogate,
                                progress=progress)
    if data.y.all() or not data.y.any():
        raise DatasetError(f"all {len(data.y)} samples have the same label (RMSD < {d}): "
                           "nothing to discriminate; sample more compositions or change d")
    fold_of = group_folds(data.groups, folds, seed)
    if variant is not None and variants is not None and variant not in variants:
        variants = [*variants, variant]
    results = evaluate(data, fold_of, p_min, seed, variants)
    chosen = variant or max(results, key=lambda n: results[n]["auc"])
    features, hidden = VARIANTS[chosen]
    val = fold_of == 0
    model = fit_classifier(data.columns(features)[~val], data.y[~val],
                           data.columns(features)[val], data.y[val], hidden=hidden, seed=seed)
    card = {
        "name": "match discriminator (paper section 4: p_match of CSP samples)",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {"file": out.name, "variant": chosen, "features": features,
                  "hidden": list(hidden), "calibration": "Platt scaling on held-out "
                  "compositions", "platt": model.platt.tolist()},
        "label": {"rmsd_threshold_d": d, "rmsd": "StructureMatcher get_rms_dist, "
                  "normalised by (V/N)^(1/3), ltol 0.3 stol 0.5 angle_tol 10; min over the "
                  "known polymorphs of the composition; no match -> not a match"},
        "data": {"files": data.sources, "samples": int(len(data.y)),
                 "compositions": int(len(set(data.groups.tolist()))),
                 "match_fraction": float(data.y.mean()),
                 "split": f"{folds}-fold cross-validation over compositions"},
        "p_match_min": p_min,
        "metrics": {n: {k: v for k, v in r.items() if k not in ("roc", "p")}
                    for n, r in results.items()},
        "auc": results[chosen]["auc"],
        "threshold": p_min,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(out, model, features=features, hidden=hidden, dropout=0.1,
               meta={"auc": float(card["auc"]), "rmsd_threshold": float(d),
                     "samples": int(len(data.y)), "created": card["created"]})
    stem = out.with_suffix("")
    Path(f"{stem}.json").write_text(json.dumps(card, indent=1, default=float))
    plot_card(results, chosen, Path(f"{stem}_roc.png"))
    return card
