"""Model card of the shipped Crysformer ensemble: data, hyper-parameters, accuracy and the
calibration of its uncertainty, measured on the validation split (never the test split).

The calibration scales it stores are what :class:`SurrogatePredictor` applies; metrics are
quoted on held-out halves of the validation set (cross-fitted), so the coverage reported
was not used to fit the scale.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.surrogate.data import load_graphs
from matcouple.surrogate.predict import (
    SurrogatePredictor,
    ensemble_value_and_sigma,
    mode_name,
    non_negative_rows,
)
from matcouple.surrogate.uncertainty import cross_fitted_calibration, with_floor
from matcouple.surrogate.value_blend import (
    fit_value_blend,
    fit_value_weights,
    weighted_values,
)


def _plot(errors: np.ndarray, sigma: np.ndarray, truth: np.ndarray, pred: np.ndarray,
          targets, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    fig, axes = plt.subplots(2, len(targets), figsize=(5 * len(targets), 9))
    levels = np.linspace(0.01, 0.99, 50)
    for j, t in enumerate(targets):
        ax = axes[0, j]
        ax.scatter(truth[:, j], pred[:, j], s=3, alpha=0.4)
        lo, hi = truth[:, j].min(), truth[:, j].max()
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"{t} (DFT)")
        ax.set_ylabel(f"{t} (Crysformer)")
        z = np.abs(errors[:, j]) / np.maximum(sigma[:, j], 1e-12)
        observed = [(z <= stats.norm.ppf(0.5 + p / 2)).mean() for p in levels]
        ax = axes[1, j]
        ax.plot(levels, observed, label="observed")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
        ax.set_xlabel("expected fraction in central interval")
        ax.set_ylabel("observed fraction")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mode_calibration(errors: np.ndarray, sigma: np.ndarray, targets, n: int,
                      extras: dict, floor: bool = False) -> dict:
    """One mode's card entry: per target the scale (and floor), MAE, held-out and
    uncalibrated figures, and what else was fitted for it (``extras``, per target)."""
    entry: dict = {"n": n}
    for j, t in enumerate(targets):
        cal = cross_fitted_calibration(errors[:, j], sigma[:, j], floor=floor)
        entry[t] = {**{k: v for k, v in cal.items() if k in ("scale", "floor")},
                    "mae": float(np.abs(errors[:, j]).mean()), "held_out": cal["held_out"],
                    "uncalibrated": cal["uncalibrated"], **extras.get(t, {})}
    return entry


def build_model_card(model_dir: Path, data: Path, *, split_column: str = "megnet_split",
                     split: str = "val", mc_samples: int | None = None,
                     mc_limit: int | None = None, device: str | None = None,
                     value_model: str | Sequence[str] | None = None,
                     fast_value_count: int | None = None,
                     value_memory: Sequence[str | None] | None = None,
                     progress: bool = True) -> dict:
    """Evaluate the ensemble in ``model_dir`` on a split and write ``model_card.json``:
    dropout off and with ``mc_samples`` MC passes (default ``Settings.surrogate_mc_samples``)
    on the first ``mc_limit`` rows (default all), each mode with its calibration scales.
    ``value_model``: a file in ``model_dir`` (not a member) whose prediction is the value,
    the members giving its sigma; each mode is then calibrated with and without it. Two or
    more files make a value pair or trio: their weights are fitted on the split
    (:func:`fit_value_weights`), and with dropout off they alone give value and sigma
    (mode ``value2``/``value3``, their spread given a floor). ``fast_value_count``: with
    dropout off only the first that many value models run (the fast mode, cheaper), with
    their own weights (``fast_value_weights``) and calibration. ``value_memory``: a
    residual memory file in ``model_dir`` (or None) for each value model, applied in every
    mode the card measures (residual_memory.py)."""
    values = [] if value_model is None else [value_model] if isinstance(value_model, str) \
        else list(value_model)
    if fast_value_count is not None and not 1 < fast_value_count < len(values):
        raise MatcoupleError(f"fast_value_count {fast_value_count}: the fast mode needs at "
                             f"least 2 and fewer than the {len(values)} value models")
    members = sorted(p.name for p in model_dir.glob("crysformer-*.pt") if p.name not in values)
    mc_samples = get_settings().surrogate_mc_samples if mc_samples is None else mc_samples
    memories = list(value_memory) if value_memory is not None else [None] * len(values)
    predictor = SurrogatePredictor([model_dir / m for m in members], device=device,
                                   mc_samples=0, value_model=[model_dir / v for v in values],
                                   value_memory=[model_dir / m if m else None
                                                 for m in memories])
    targets = predictor.targets
    graphs = load_graphs(data, targets, split_column=split_column, split=split,
                         spec=predictor.spec, progress=progress).graphs
    truth = torch.cat([g.y for g in graphs]).numpy()
    card: dict = {
        "name": "Crysformer ensemble, MP 2018.6.1",
        "version": dt.date.today().isoformat() + "-" + "-".join(
            b["data_hash"][:6] for b in predictor.blobs[:1]),
        "members": members, "targets": list(targets),
        "data": {"file": data.name, "data_hash": predictor.blobs[0]["data_hash"],
                 "train_split": "megnet train", "evaluated_on": f"{split_column}={split}",
                 "n_eval": len(graphs)},
        "model_config": predictor.blobs[0]["model_config"],
        # the graphs the predictor builds; a model trained on fewer neighbours reads
        # its k-nearest part (``model_graph_k``)
        "graph_spec": asdict(predictor.spec),
        "model_graph_k": {name: int(b["graph_spec"]["k"]) for name, b in zip(
            members + values, predictor.blobs + [v[1] for v in predictor.values],
            strict=True)},
        "train_config": predictor.blobs[0]["train_config"],
        "member_val_mae": [b["val_mae"] for b in predictor.blobs],
        "member_epochs": [b["epochs_trained"] for b in predictor.blobs],
        "calibration": {}, "val_mae": {},
    }
    if len(values) == 1:
        card["value_model"] = values[0]
    elif values:
        card["value_models"] = values
    if any(memories):
        card["value_memories"] = {v: m for v, m in zip(values, memories, strict=True) if m}
    if values:
        card["value_model_config"] = predictor.values[0][1]["model_config"]
        card["value_model_val_mae"] = predictor.values[0][1]["val_mae"]
    value_weights = None
    modes = [(0, None)] + ([(mc_samples, mc_limit)] if mc_samples else [])
    for mc, limit in modes:
        predictor.mc_samples = mc
        subset = graphs[:limit] if limit else graphs
        means, variances, preds = predictor.raw_outputs(subset)
        y = truth[: len(subset)]
        floors = non_negative_rows(subset, targets)
        if len(values) > 1 and value_weights is None:  # the values' weights, fitted once
            value_weights, fit_report = fit_value_weights(preds, y, targets, floors)
            card["value_weights"] = {t: w for t, w in zip(targets, value_weights,
                                                          strict=True)}
            card["value_weights_fit"] = fit_report
        point = None if preds is None else weighted_values(preds, value_weights)
        runs = [(mode_name(len(members), 0, mc), None, preds)] + (
            [(mode_name(len(members), len(values), mc), point, preds)] if values else [])
        if fast_value_count and not mc:  # the fast mode: the first value models only
            fast = preds[:fast_value_count]
            fast_weights, fast_report = fit_value_weights(fast, y, targets, floors)
            card["fast_value_count"] = fast_value_count
            card["fast_value_weights"] = {t: w for t, w in zip(targets, fast_weights,
                                                               strict=True)}
            card["fast_value_weights_fit"] = fast_report
            runs.append((mode_name(len(members), fast_value_count, 0),
                         weighted_values(fast, fast_weights), fast))
        for mode, value, value_preds in runs:
            # two or more value models with dropout off: they alone give value and sigma
            pair_only = value is not None and len(value_preds) > 1 and not mc
            if pair_only:
                mean, sigma = ensemble_value_and_sigma(value_preds, np.zeros_like(value_preds),
                                                       value, targets, None, floors)
                blends: dict = {}
            else:
                weights, blends = fit_value_blend(value, means, variances, y, targets,
                                                  floors) if value is not None else (None, {})
                mean, sigma = ensemble_value_and_sigma(means, variances, value, targets,
                                                       weights, floors)
            errors = mean - y
            card["calibration"][mode] = _mode_calibration(errors, sigma, targets,
                                                          len(subset), blends, pair_only)
            card["val_mae"][mode] = {t: float(np.abs(errors[:, j]).mean())
                                     for j, t in enumerate(targets)}
            # the default mode (MC passes, the value model if any) on the whole split
            if mc == mc_samples and len(subset) == len(graphs) and \
                    (value is not None) == bool(values):
                entry = card["calibration"][mode]
                scaled = np.stack([entry[t]["scale"] * with_floor(
                    sigma[:, j], entry[t].get("floor", 0.0)) for j, t in enumerate(targets)], 1)
                _plot(errors, scaled, y, mean, targets, model_dir / "model_card.png")
                card["default_mode"] = mode
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=1))
    return card
