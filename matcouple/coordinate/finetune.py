"""Fine-tune the surrogate on the buffer's DFT results and promote it only if not worse.

Every ensemble member of the current model (the promoted registry version, else the
shipped one) continues training from its own weights for a few epochs on the claimed
buffer entries (repeated, so eight results are not drowned) mixed with a random replay
sample of the MP 2018 (MEGNet) train split, which keeps the model from forgetting what it
knew. The member's target normalisation is kept, so the new files are drop-in
replacements.

Validation data: a fixed slice (the first ``val_size`` rows of at most ``max_atoms``
atoms) of the MEGNet val split plus a held-out share of the buffer (chosen by a hash of
each entry, so it is stable). On them the new ensemble's sigma is recalibrated
(``surrogate.uncertainty``) and both the current and the new model are scored, in the mode
the design policy predicts with (``Settings.surrogate_mc_samples`` MC-dropout passes).

Promotion rule (``promotion_decision``; tolerances in ``Settings.finetune_*``): with MAE
the formation-energy mean absolute error of the ensemble mean, the new version is
promoted iff every metric is finite and

* MAE_new(val slice) <= MAE_current(val slice) * (1 + finetune_val_tolerance) (0.02), and
* MAE_new(held-out buffer) <= MAE_current(held-out buffer) + finetune_holdout_tolerance
  (0.02 eV/atom), when the buffer had entries to hold out (4 or more entries).

Otherwise the version is registered with status ``refused`` and its reason; a fine-tune
that raises is registered as ``failed`` with the error. In both cases the promoted model
stays what it was.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pymatgen.core import Structure
from pymongo.database import Database
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from tqdm import tqdm

from matcouple.coordinate.buffer import FineTuneBuffer, FineTuneClaim
from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.store.registry import REFUSED, ModelRegistry
from matcouple.surrogate.data import load_graphs
from matcouple.surrogate.graph import (
    GraphSpec,
    common_spec,
    nearest_graphs,
    structure_to_graph,
)
from matcouple.surrogate.model import have_dropout
from matcouple.surrogate.predict import (
    SurrogatePredictor,
    active_value_count,
    ensemble_value_and_sigma,
    load_model,
    mode_name,
    non_negative_rows,
)
from matcouple.surrogate.train import _atomic_save, _lr_factor, train_epoch
from matcouple.surrogate.uncertainty import cross_fitted_calibration
from matcouple.surrogate.value_blend import card_weights, fit_value_blend, value_model_names

log = logging.getLogger(__name__)
PROMOTION_TARGET = "formation_energy_per_atom"


class FineTuneError(MatcoupleError):
    """A fine-tune cannot run (no usable entries, data set missing); names why."""


@dataclass(frozen=True)
class FineTuneConfig:
    """Hyper-parameters of one fine-tune (defaults: ``Settings.finetune_*``)."""

    epochs: int
    lr: float
    batch_size: int
    buffer_repeat: int
    replay_size: int
    val_size: int
    holdout_fraction: float
    val_tolerance: float
    holdout_tolerance: float
    replay_data: str
    max_atoms: int | None = None
    mc_samples: int = 0  # MC passes of the mode scored and recalibrated (from_settings: 8)
    seed: int = 0
    device: str | None = None
    progress: bool = False

    @classmethod
    def from_settings(cls, **overrides: Any) -> FineTuneConfig:
        s = get_settings()
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise FineTuneError(f"unknown fine-tune option(s) {sorted(unknown)}")
        base = cls(epochs=s.finetune_epochs, lr=s.finetune_lr,
                   batch_size=s.finetune_batch_size, buffer_repeat=s.finetune_buffer_repeat,
                   replay_size=s.finetune_replay_size, val_size=s.finetune_val_size,
                   holdout_fraction=s.finetune_holdout_fraction,
                   val_tolerance=s.finetune_val_tolerance,
                   holdout_tolerance=s.finetune_holdout_tolerance,
                   replay_data=str(s.data_dir / s.datasets["mp2018"]),
                   max_atoms=s.finetune_max_atoms, mc_samples=s.surrogate_mc_samples)
        return replace(base, **overrides)


@dataclass
class FineTuneOutcome:
    """What one fine-tune did: ``promoted``, ``refused``, ``failed`` or ``skipped``."""

    status: str
    reason: str
    version: str | None = None
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    n_entries: int = 0
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- data
def _holdout(entry: dict[str, Any]) -> float:
    """A stable pseudo-random number in [0, 1) per entry: which ones are held out."""
    key = f"{entry['fidelity']}|{entry['material_id']}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) / 16**8


def split_entries(entries: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held out): ``fraction`` of them (at least one) once there are 4 or more."""
    if len(entries) < 4 or fraction <= 0:
        return list(entries), []
    n_hold = max(1, int(round(fraction * len(entries))))
    order = sorted(entries, key=_holdout)
    held = order[:n_hold]
    held_ids = {id(e) for e in held}
    return [e for e in entries if id(e) not in held_ids], held


def entry_graphs(entries: list[dict], spec: GraphSpec, targets: tuple[str, ...]
                 ) -> tuple[list[Data], list[tuple[str, str]]]:
    """Graphs of buffer entries (a target an entry has no label for is NaN, masked in the
    loss) and the (material_id, reason) of entries that cannot be used."""
    graphs, skipped = [], []
    for e in entries:
        y = [float(e["labels"].get(t, math.nan)) for t in targets]
        if all(math.isnan(v) for v in y):
            skipped.append((e["material_id"], f"no label for any of {list(targets)}"))
            continue
        try:
            g = structure_to_graph(Structure.from_dict(e["structure"]), spec)
        except MatcoupleError as exc:
            skipped.append((e["material_id"], str(exc)))
            continue
        graphs.append(Data(z=g["z"], edge_index=g["edge_index"], edge_vec=g["edge_vec"],
                           y=torch.tensor([y], dtype=torch.float32), num_nodes=len(g["z"]),
                           material_id=e["material_id"]))
    return graphs, skipped


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def ensemble_outputs(models: list, blobs: list[dict], values: list[tuple],
                     graphs: list[Data], device: torch.device, mc_samples: int,
                     batch_size: int = 128, card: dict | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Each member's mean and MC variance in physical units, (M, N, T) each, in the mode
    the design policy predicts with (``mc_samples`` MC-dropout passes; 0 = dropout off),
    and the value model's (a value pair's, weighted as ``card`` says) prediction (N, T)
    when there is one (else None); :meth:`SurrogatePredictor.outputs`."""
    predictor = SurrogatePredictor.from_models(models, blobs, device=device, card=card,
                                               mc_samples=mc_samples, value=list(values))
    return predictor.outputs(graphs, batch_size)


def _mae(pred: np.ndarray, truth: np.ndarray, targets: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for j, t in enumerate(targets):
        known = ~np.isnan(truth[:, j])
        out[t] = float(np.abs(pred[known, j] - truth[known, j]).mean()) if known.any() \
            else float("nan")
    return out


def score(mean: np.ndarray, truth: np.ndarray, n_val: int, targets: tuple[str, ...]
          ) -> dict[str, dict[str, float]]:
    """MAE of the predicted values (N, T) on the val slice (first ``n_val`` rows) and on
    the rest."""
    metrics = {"val": _mae(mean[:n_val], truth[:n_val], targets)}
    metrics["holdout"] = _mae(mean[n_val:], truth[n_val:], targets) if len(truth) > n_val \
        else {}
    return metrics


def promotion_decision(current: dict, new: dict, *, val_tolerance: float,
                       holdout_tolerance: float, target: str = PROMOTION_TARGET
                       ) -> tuple[bool, str]:
    """The promotion rule of the module docstring: (promote?, reason)."""
    old_val, new_val = current["val"][target], new["val"][target]
    if not (math.isfinite(new_val) and math.isfinite(old_val)):
        return False, f"val MAE not finite (new {new_val}, current {old_val})"
    limit = old_val * (1 + val_tolerance)
    if new_val > limit:
        return False, (f"val MAE {new_val:.4f} > current {old_val:.4f} x (1 + "
                       f"{val_tolerance:g}) = {limit:.4f} eV/atom")
    reason = f"val MAE {new_val:.4f} <= {limit:.4f}"
    new_h, old_h = new.get("holdout", {}).get(target), current.get("holdout", {}).get(target)
    if new_h is not None and old_h is not None and not math.isnan(old_h):
        if not math.isfinite(new_h):
            return False, f"held-out buffer MAE not finite ({new_h})"
        if new_h > old_h + holdout_tolerance:
            return False, (f"held-out buffer MAE {new_h:.4f} > current {old_h:.4f} + "
                           f"{holdout_tolerance:g} eV/atom")
        reason += f"; held-out buffer MAE {new_h:.4f} <= {old_h + holdout_tolerance:.4f}"
    return True, reason


# ---------------------------------------------------------------- the fine-tune
def _base_model(registry: ModelRegistry) -> tuple[Path, dict, str]:
    """(model dir, card, parent name) of the model the fine-tune starts from."""
    current = registry.current()
    folder = registry.model_dir() if current else get_settings().surrogate_model_dir
    card_path = Path(folder) / "model_card.json"
    if not card_path.exists():
        raise FineTuneError(f"no model card in {folder}: nothing to fine-tune from")
    card = json.loads(card_path.read_text())
    parent = current["version"] if current else f"shipped:{card.get('version', 'unknown')}"
    return Path(folder), card, parent


def _replay_seed(claim: FineTuneClaim, seed: int) -> int:
    return seed + int(claim.claim_id[:6], 16) % 100_000


def finetune(db: Database, claim: FineTuneClaim, config: FineTuneConfig | None = None, *,
             buffer: FineTuneBuffer | None = None) -> FineTuneOutcome:
    """Fine-tune the current model on ``claim``'s entries, register the result and promote
    it if the promotion rule allows. Raises on failure (the caller records it)."""
    start = time.monotonic()
    timing: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU time of this process: wall time on an idle machine
    mark = [start, time.process_time()]

    def lap(name: str) -> None:
        now, now_cpu = time.monotonic(), time.process_time()
        timing[name], cpu[name] = now - mark[0], now_cpu - mark[1]
        mark[0], mark[1] = now, now_cpu

    config = config or FineTuneConfig.from_settings()
    settings = get_settings()
    registry = ModelRegistry(db)
    base_dir, card, parent = _base_model(registry)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    members = [load_model(base_dir / m, device) for m in card["members"]]
    models, blobs = [m for m, _ in members], [b for _, b in members]
    value_names = value_model_names(card)
    values = [load_model(base_dir / name, device) for name in value_names]
    targets = tuple(blobs[0]["model_config"]["targets"])
    # one set of graphs, with the most neighbours any model reads (GraphBatch.nearest)
    spec = common_spec([GraphSpec(**b["graph_spec"]) for b in blobs + [v[1] for v in values]])
    lap("load_model")
    replay_path = Path(config.replay_data)
    if not replay_path.exists():
        raise FineTuneError(f"replay/validation data {replay_path} not found: set "
                            "MATCOUPLE_DATA_DIR to the folder holding the data sets")
    train_entries, held_entries = split_entries(claim.entries, config.holdout_fraction)
    buffer_train, skipped = entry_graphs(train_entries, spec, targets)
    held, skipped_held = entry_graphs(held_entries, spec, targets)
    skipped += skipped_held
    if not buffer_train:
        raise FineTuneError("no usable buffer entries to train on: " + "; ".join(
            f"{mid}: {why}" for mid, why in skipped))
    replay_seed = _replay_seed(claim, config.seed)
    replay = []
    if config.replay_size > 0:
        replay = load_graphs(replay_path, targets, split_column="megnet_split",
                             split="train", spec=spec, sample=config.replay_size,
                             seed=replay_seed, workers=1, max_atoms=config.max_atoms,
                             progress=False).graphs
    val = load_graphs(replay_path, targets, split_column="megnet_split", split="val",
                      spec=spec, limit=config.val_size, workers=1, progress=False,
                      max_atoms=config.max_atoms, cache_dir=settings.graph_cache_dir).graphs
    if not val:
        raise FineTuneError(f"no validation rows (megnet_split=val) in {replay_path}")
    eval_graphs = val + held
    lap("graphs")
    truth = torch.cat([g.y for g in eval_graphs]).numpy()
    if config.mc_samples and not have_dropout(models):  # no MC spread: score the ensemble
        config = replace(config, mc_samples=0)
    # with dropout off the card may run only its first value models (the fast mode)
    active = active_value_count(card, len(values), config.mc_samples)
    mode = mode_name(len(models), active, config.mc_samples)
    pair_only = not config.mc_samples and active > 1
    floors = non_negative_rows(eval_graphs, targets)
    current_mean, _ = ensemble_value_and_sigma(*ensemble_outputs(
        models, blobs, values, eval_graphs, device, config.mc_samples, card=card), targets,
        card_weights(card.get("calibration", {}).get(mode, {}), targets), floors)
    current_metrics = score(current_mean, truth, len(val), targets)
    lap("evaluate_current")

    train_graphs = buffer_train * max(config.buffer_repeat, 1) + replay
    torch.manual_seed(config.seed)
    new_blobs = []
    jobs = list(zip(models, blobs, card["members"], strict=True))
    # the value models learn from the buffer like the members
    jobs += [(v[0], v[1], name) for v, name in zip(values, value_names, strict=True)]
    # each model trains on the graph it reads, cut once per k (GraphBatch.nearest's rule)
    graphs_for_k = {spec.k: train_graphs}
    bar = tqdm(jobs, desc="fine-tune", unit="model", disable=not config.progress)
    for k, (model, blob, _name) in enumerate(bar):
        gen = torch.Generator().manual_seed(config.seed + k)
        k_model = int(blob["graph_spec"]["k"])
        if k_model not in graphs_for_k:
            graphs_for_k[k_model] = nearest_graphs(train_graphs, k_model, spec.tie_tol)
        loader = DataLoader(graphs_for_k[k_model], batch_size=config.batch_size,
                            shuffle=True, generator=gen)
        wd = float(blob.get("train_config", {}).get("weight_decay", 1e-5))
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=wd)
        total = config.epochs * len(loader)
        step, losses = 0, []
        mean, std = blob["norm_mean"].to(device), blob["norm_std"].to(device)
        for _ in range(config.epochs):
            loss, _, step = train_epoch(
                model, loader, opt, mean=mean, std=std, device=device, step=step,
                lr_at=lambda s, total=total: config.lr * _lr_factor(s, total, 0),
                progress=False)
            losses.append(loss)
        model.eval()
        new_blobs.append({**blob, "state_dict": {k2: v.detach().cpu().clone()
                                                 for k2, v in model.state_dict().items()},
                          "epochs_trained": int(blob.get("epochs_trained", 0)) + config.epochs,
                          "finetune": {"parent": parent, "epochs": config.epochs,
                                       "lr": config.lr, "train_losses": losses}})
    lap("train")
    new_values = [(v[0], b) for v, b in zip(values, new_blobs[len(models):], strict=True)]
    new_blobs = new_blobs[:len(models)]
    # a value pair keeps its card weights; with dropout off it is also the "ensemble"
    preds, variances, point = ensemble_outputs(models, new_blobs, new_values, eval_graphs,
                                               device, config.mc_samples, card=card)
    # the value model's step towards the ensemble is refitted on the val slice only, so the
    # buffer's hold-out still judges the new models on data nothing was fitted to
    weights, blends = fit_value_blend(
        point[: len(val)], preds[:, : len(val)], variances[:, : len(val)],
        truth[: len(val)], targets, floors[: len(val)]) \
        if point is not None and not pair_only else (None, {})
    mean, sigma = ensemble_value_and_sigma(preds, variances, point, targets, weights, floors)
    new_metrics = score(mean, truth, len(val), targets)
    calibration: dict[str, Any] = {"n": len(eval_graphs)}
    for j, t in enumerate(targets):
        known = ~np.isnan(truth[:, j])
        errors = mean[known, j] - truth[known, j]
        cal = cross_fitted_calibration(errors, sigma[known, j], floor=pair_only)
        calibration[t] = {**{k: v for k, v in cal.items() if k in ("scale", "floor")},
                          "mae": float(np.abs(errors).mean()),
                          "held_out": cal["held_out"], "uncalibrated": cal["uncalibrated"],
                          **blends.get(t, {})}
    metrics = {"val": new_metrics["val"], "holdout": new_metrics["holdout"],
               "current": current_metrics, "n_val": len(val), "n_holdout": len(held),
               "n_buffer_train": len(buffer_train), "n_replay": len(replay),
               "skipped_entries": [{"material_id": m, "reason": r} for m, r in skipped],
               "replay_seed": replay_seed,
               "calibration_scale": {t: calibration[t]["scale"] for t in targets},
               "device": str(device), "timing_s": timing, "cpu_time_s": cpu}
    lap("evaluate_new")
    data = {**claim.summary(), "holdout": [e["material_id"] for e in held_entries],
            "replay": {"file": replay_path.name, "split": "megnet_split=train",
                       "n": len(replay), "seed": replay_seed, "max_atoms": config.max_atoms},
            "validation": {"file": replay_path.name, "split": "megnet_split=val",
                           "first_rows": len(val), "max_atoms": config.max_atoms}}
    new_card = {
        **card, "members": card["members"], "calibration": {mode: calibration},
        "calibration_note": f"recalibrated after fine-tuning ({mode} only; other modes "
                            "are uncalibrated)",
        # the value models' residual memories belong to the weights before this fine-tune
        "value_memories": {},
        "val_mae": {mode: new_metrics["val"]}, "default_mode": mode,
        # with a value pair and dropout off the members were not run
        "member_val_mae": card.get("member_val_mae") if pair_only else [
            _mae(p[: len(val)], truth[: len(val)], targets) for p in preds],
        "member_epochs": [b["epochs_trained"] for b in new_blobs],
        **({"value_model_val_mae": _mae(point[: len(val)], truth[: len(val)], targets)}
           if point is not None else {}),
        "finetune": {"parent": parent, "config": asdict(config), "metrics": metrics,
                     "data": data, "created": dt.datetime.now(dt.UTC).isoformat()},
    }
    with tempfile.TemporaryDirectory(prefix="matcouple-ft-") as tmp:
        out = Path(tmp)
        for name, blob in zip(card["members"], new_blobs, strict=True):
            _atomic_save(blob, out / name)
        for name, (_, blob) in zip(value_names, new_values, strict=True):
            _atomic_save(blob, out / name)
        (out / "model_card.json").write_text(json.dumps(new_card, indent=1, default=str))
        metrics["elapsed_s"] = time.monotonic() - start
        version = registry.register(out, metrics=metrics, parent=parent, data=data)
    lap("register")
    promote, reason = promotion_decision(current_metrics, new_metrics,
                                         val_tolerance=config.val_tolerance,
                                         holdout_tolerance=config.holdout_tolerance)
    if promote and buffer is not None and not buffer.holds(claim):
        promote, reason = False, "the claim expired and was taken over before promotion"
    if promote:  # the files were just evaluated: the download's checksums suffice
        registry.promote(version, reason=reason, check_load=False)
        status = "promoted"
    else:
        registry.mark(version, REFUSED, reason)
        status = "refused"
    lap("promote")
    return FineTuneOutcome(status=status, reason=reason, version=version, parent=parent,
                           metrics=metrics, n_entries=len(claim.entries),
                           elapsed_s=time.monotonic() - start)


def finetune_now(db: Database, *, owner: str, token: str | None = None,
                 config: FineTuneConfig | None = None) -> FineTuneOutcome:
    """Claim the buffer, fine-tune, release. A failure is recorded in the registry (status
    ``failed``) and on the entries, which stay pending; the promoted model is untouched."""
    buffer = FineTuneBuffer(db)
    claim = buffer.claim(owner, token=token)
    if claim is None:
        return FineTuneOutcome(status="skipped", reason="another fine-tune is running or "
                               "nothing is pending in the buffer")
    start = time.monotonic()
    try:
        outcome = finetune(db, claim, config, buffer=buffer)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.exception("fine-tune %s failed", claim.claim_id)
        registry = ModelRegistry(db)
        current = registry.current()
        version = registry.record_failure(
            error=error, parent=current["version"] if current else "shipped",
            data=claim.summary())
        buffer.release(claim, success=False, error=error)
        return FineTuneOutcome(status="failed", reason="the fine-tune raised; the promoted "
                               "model is unchanged", version=version, error=error,
                               n_entries=len(claim.entries),
                               elapsed_s=time.monotonic() - start)
    buffer.release(claim, success=True, version=outcome.version)
    return outcome
