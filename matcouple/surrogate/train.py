"""Train Crysformer in resumable chunks.

A training checkpoint holds weights, optimizer and scheduler state, the normalisation of
the targets, all hyper-parameters, the data hash, the loss history and the best weights
so far; ``--minutes`` bounds one chunk so long runs survive 10-minute job limits, and a
re-run with the same ``--out`` continues where the last chunk stopped. Everything in it
loads with ``torch.load(weights_only=True)``. ``export_model`` writes the small file that
is shipped and used for prediction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch_geometric.loader import DataLoader
from tqdm import tqdm

from matcouple.distributed import current, scaled_lr
from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.surrogate.atom_features import atom_feature_table
from matcouple.surrogate.augment import StructureNoise
from matcouple.surrogate.batching import GlobalBatchSampler
from matcouple.surrogate.data import load_graphs, table_hash
from matcouple.surrogate.ema import WeightAverage
from matcouple.surrogate.graph import GraphSpec, parse_graph_options
from matcouple.surrogate.model import (
    TUNABLE_FIELDS,
    Crysformer,
    CrysformerConfig,
    parse_model_overrides,
)

CHECKPOINT_FORMAT = "crysformer-train-v1"
MODEL_FORMAT = "crysformer-model-v1"


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in the checkpoint)."""

    data: str
    targets: tuple[str, ...] = ("formation_energy_per_atom", "band_gap")
    split_column: str = "megnet_split"
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = field(default_factory=lambda: get_settings().surrogate_train_epochs)
    batch_size: int = field(default_factory=lambda: get_settings().surrogate_train_batch_size)
    lr: float = field(default_factory=lambda: get_settings().surrogate_train_lr)
    weight_decay: float = field(
        default_factory=lambda: get_settings().surrogate_train_weight_decay)
    warmup_epochs: float = field(
        default_factory=lambda: get_settings().surrogate_train_warmup_epochs)
    seed: int = 0
    limit_train: int | None = None
    amp: bool = False
    # Fused message/value tensor products (matcouple/surrogate/fused.py) in training too:
    # same math as e3nn's modules, fewer kernels; the parameters stay e3nn's.
    fused_tp: bool = field(default_factory=lambda: get_settings().surrogate_train_fused_tp)
    # EMA of the weights (0 = off): the average is evaluated, kept as best and exported.
    ema_decay: float = field(default_factory=lambda: get_settings().surrogate_train_ema_decay)
    # Structure noise in training (surrogate/augment.py): strain (fraction) and atomic
    # displacement (Å) standard deviations applied to each batch; 0 = off.
    strain_noise: float = field(
        default_factory=lambda: get_settings().surrogate_train_strain_noise)
    displacement_noise: float = field(
        default_factory=lambda: get_settings().surrogate_train_displacement_noise)
    # Weight of each target in the loss (and in choosing the best epoch), in the order of
    # ``targets``; empty = equal. Rescaled to mean 1, so the learning rate keeps its meaning.
    target_weights: tuple[float, ...] = ()
    model: dict = field(default_factory=dict)
    graph: dict = field(default_factory=dict)
    # Data-parallel: batch_size is per GPU; lr is scaled for the global batch by this rule.
    lr_scaling: str = field(default_factory=lambda: get_settings().ddp_lr_scaling)

    def __post_init__(self) -> None:
        """Refuse settings that would train nothing or diverge silently, naming the field."""
        if self.epochs < 1 or self.batch_size < 1:
            raise MatcoupleError(f"epochs ({self.epochs}) and batch size ({self.batch_size}) "
                                 "must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise MatcoupleError(f"learning rate must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise MatcoupleError("weight decay and warm-up epochs must not be negative")
        if not 0.0 <= self.ema_decay < 1.0:
            raise MatcoupleError(f"EMA decay must lie in [0, 1), got {self.ema_decay}")
        self.noise()  # checks the noise levels
        w = self.target_weights
        if w and (len(w) != len(self.targets) or not all(math.isfinite(x) and x >= 0 for x in w)
                  or sum(w) <= 0):
            raise MatcoupleError(f"target weights {list(w)}: need one non-negative number per "
                                 f"target ({', '.join(self.targets)}), not all zero")

    def loss_weights(self) -> torch.Tensor:
        return loss_weights(self.target_weights, len(self.targets))

    def noise(self) -> StructureNoise:
        return StructureNoise(self.strain_noise, self.displacement_noise)


def loss_weights(target_weights, n_targets: int) -> torch.Tensor:
    """Per-target loss weights with mean 1 (all ones when none are set)."""
    w = torch.tensor(list(target_weights) or [1.0] * n_targets, dtype=torch.float32)
    return w * (len(w) / w.sum())


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def next_epoch_fits(elapsed_s: float, epochs_this_chunk: int, budget_s: float) -> bool:
    """Whether one more epoch fits in a chunk's time budget. Epochs are timed from this
    chunk alone: a resumed run's earlier epochs ran in other chunks, and counting them
    would make epochs look short and overrun the job's limit."""
    per_epoch = elapsed_s / max(epochs_this_chunk, 1)
    return elapsed_s + per_epoch <= budget_s


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


@torch.no_grad()
def evaluate(model: Crysformer, loader: DataLoader, mean: torch.Tensor, std: torch.Tensor,
             device: torch.device) -> dict[str, float]:
    """MAE per target in physical units (dropout off); NaN labels (a target a structure
    has no value for, e.g. a DFT result without a band gap) are left out."""
    model.eval()
    err = torch.zeros(len(model.cfg.targets), device=device)
    n = torch.zeros(len(model.cfg.targets), device=device)
    for batch in loader:
        batch = batch.to(device)
        pred = model(batch.z, batch.edge_index, batch.edge_vec, batch.batch, batch.num_graphs)
        known = ~torch.isnan(batch.y)
        err += torch.where(known, (pred * std + mean) - batch.y, 0.0).abs().sum(0)
        n += known.sum(0)
    totals = current().sum(torch.cat([err, n.to(err.dtype)]))  # ranks evaluate disjoint shards
    k = len(model.cfg.targets)
    err, n = totals[:k], totals[k:]
    return {t: float(e / c) if c > 0 else float("nan")
            for t, e, c in zip(model.cfg.targets, err, n, strict=True)}


def masked_l1(pred: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
              std: torch.Tensor) -> torch.Tensor:
    """L1 loss on normalised targets over the labels that are present (not NaN)."""
    target = (y - mean) / std
    known = ~torch.isnan(target)
    if not known.any():  # a batch without labels teaches nothing (and must not be NaN)
        return pred.float().sum() * 0.0
    return (pred.float() - target)[known].abs().mean()


def train_epoch(model: Crysformer, loader: DataLoader, opt: torch.optim.Optimizer, *,
                mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                lr_at: Callable[[int], float], step: int = 0, use_amp: bool = False,
                progress: bool = True, desc: str = "epoch") -> tuple[float, int, int]:
    """One pass over ``loader``: returns (mean training loss, graphs seen, next step).

    ``lr_at(step)`` sets the learning rate of every step (warm-up/cosine in training,
    the fine-tune's own schedule when continuing from a shipped model).
    """
    model.train()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    running, count = 0.0, 0
    for batch in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred = model(batch.z, batch.edge_index, batch.edge_vec, batch.batch,
                         batch.num_graphs)
        loss = masked_l1(pred, batch.y, mean, std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        running += float(loss.detach()) * batch.num_graphs
        count += batch.num_graphs
        bar.set_postfix(loss=f"{running / count:.4f}")
    return running / max(count, 1), count, step


def _score(mae: dict[str, float], std: torch.Tensor, targets,
           weights: torch.Tensor | None = None) -> float:
    """Best-epoch score: the normalised MAEs, weighted like the loss."""
    w = [1.0] * len(targets) if weights is None else weights.tolist()
    return sum(wt * mae[t] / float(s) for t, s, wt in zip(targets, std, w, strict=True))


def train(cfg: TrainConfig, out: Path, *, minutes: float | None = None,
          device: str | None = None, init_from: Path | None = None,
          cache_dir: Path | None = None, workers: int | None = None,
          progress: bool = True, chunk_epochs: int | None = None) -> dict:
    """Run (or continue) training until ``cfg.epochs``, the time budget or ``chunk_epochs``
    more epochs, whichever comes first; return the checkpointed state.

    Inside a data-parallel run (:mod:`matcouple.distributed`) every rank calls this: rank r
    trains on its slice of each global batch, only rank 0 writes the checkpoint and prints.
    """
    ctx = current()
    dev = ctx.device if ctx.enabled else _device(device)
    progress = progress and ctx.is_main
    torch.manual_seed(cfg.seed)
    start_time = time.monotonic()
    state = torch.load(out, weights_only=True, map_location="cpu") if out.exists() else None
    if state is not None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise MatcoupleError(f"{out} is not a Crysformer training checkpoint")
        saved = state["train_config"]
        # The data file may have moved (another machine): the caller's path is used and
        # checked against the saved content hash below. Fused tensor products are the same
        # math, only a speed choice for this machine: the caller's choice holds too.
        cfg = replace(cfg, **{k: (tuple(v) if k in ("targets", "target_weights") else v)
                              for k, v in saved.items()
                              if k not in ("epochs", "data", "fused_tp")})
        if state.get("data_hash") and state["data_hash"] != table_hash(Path(cfg.data)):
            raise MatcoupleError(f"{cfg.data} is not the data set {out} was trained on "
                                 "(content hash differs)")
    # the model a fresh run fine-tunes, read once (a resumed run has its own weights)
    source = _source(init_from) if state is None and init_from is not None else None
    if source is not None:
        # fine-tuning a model means its architecture unless --model says otherwise; the
        # merged options are saved, so a resumed run rebuilds the same model
        cfg = replace(cfg, model={**inherited_architecture(source), **cfg.model})
    model_cfg = CrysformerConfig(**{**cfg.model, "targets": tuple(cfg.targets)})
    spec = GraphSpec(**cfg.graph)
    data_path = Path(cfg.data)
    with ctx.main_first():  # rank 0 builds the graph cache, the others read it
        train_set = load_graphs(data_path, cfg.targets, split_column=cfg.split_column,
                                split=cfg.train_split, spec=spec, limit=cfg.limit_train,
                                cache_dir=cache_dir, workers=workers, progress=progress)
        val_set = load_graphs(data_path, cfg.targets, split_column=cfg.split_column,
                              split=cfg.val_split, spec=spec, cache_dir=cache_dir,
                              workers=workers, progress=progress)
    if not train_set.graphs or not val_set.graphs:
        raise MatcoupleError(f"no usable training/validation rows in {data_path}")
    ys = torch.cat([g.y for g in train_set.graphs])
    if state is not None:
        mean, std = state["norm_mean"], state["norm_std"]
    else:
        mean, std = ys.mean(0), ys.std(0).clamp_min(1e-6)
        if source is not None:
            mean, std = inherited_normalisation(source, cfg.targets, mean, std)
    table = torch.from_numpy(atom_feature_table())
    model = Crysformer(model_cfg, table).to(dev).set_fused(cfg.fused_tp, training=cfg.fused_tp)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = GlobalBatchSampler(len(train_set.graphs), cfg.batch_size, gen, ctx.rank,
                                 ctx.world_size)
    steps_per_epoch = len(sampler)
    lr = scaled_lr(cfg.lr, ctx.world_size, cfg.lr_scaling)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    epoch, step, history, best, best_score = 0, 0, [], None, float("inf")
    if state is not None:
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        epoch, step, history = state["epoch"], state["step"], state["history"]
        best, best_score = state["best_state_dict"], state["best_score"]
        gen.set_state(state["generator"])
        if "torch_rng" in state:  # dropout masks continue as if unbroken
            torch.set_rng_state(state["torch_rng"])
    elif source is not None:
        _init_from(model, init_from, source)
    # A run resumed with EMA newly on starts its average from the current weights.
    ema = None if cfg.ema_decay == 0 else WeightAverage(
        model, cfg.ema_decay, state.get("ema_state_dict") if state is not None else None)
    on_gpu = dev.type == "cuda"
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    net = ctx.wrap(model)  # DDP over the ranks; `model` stays the bare one that is saved
    loader = DataLoader(train_set.graphs, batch_sampler=sampler,
                        num_workers=3 if on_gpu else 0, persistent_workers=on_gpu,
                        pin_memory=on_gpu)
    val_loader = DataLoader(val_set.graphs[ctx.rank::ctx.world_size], batch_size=256)
    mean_d, std_d = mean.to(dev), std.to(dev)
    use_amp = cfg.amp and dev.type == "cuda"
    noise = cfg.noise()
    weights = cfg.loss_weights()
    weights_d = weights.to(dev)
    budget = None if minutes is None else minutes * 60
    stopped_early, first_epoch = False, epoch  # this chunk's epochs time the next one
    # the history's clock runs on across chunks (the generator's does too), so a resumed
    # run's log reads as one run; budgets use this chunk's own time (start_time)
    clock_before = history[-1]["elapsed_s"] if history else 0.0
    last_epoch = cfg.epochs if chunk_epochs is None else min(cfg.epochs, epoch + chunk_epochs)
    while epoch < last_epoch:
        model.train()
        step = epoch * steps_per_epoch  # the schedule is per epoch on any number of GPUs
        if ctx.enabled:  # each rank its own dropout masks, reproducible on resume
            torch.manual_seed(ctx.seed(cfg.seed, epoch))
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False)
        running, count, epoch_start = torch.zeros((), device=dev), 0, time.monotonic()
        for i, batch in enumerate(bar):
            for g in opt.param_groups:
                g["lr"] = lr * _lr_factor(step, total_steps, warmup)
            batch = batch.to(dev, non_blocking=True)
            edge_vec = noise(batch.edge_vec, batch.edge_index, batch.batch, batch.num_graphs)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                pred = net(batch.z, batch.edge_index, edge_vec, batch.batch, batch.num_graphs)
            err = (pred.float() - (batch.y - mean_d) / std_d).abs() * weights_d
            loss = err.sum() * sampler.loss_scale(i, err.shape[1])  # mean over global batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            if ema is not None:
                ema.update(step)
            step += 1
            if sampler.local_size(i):  # the running loss stays on the device: no sync
                running += err.detach().sum() / err.shape[1]
                count += batch.num_graphs
            if progress and i % 50 == 0:
                bar.set_postfix(loss=f"{float(running) / max(count, 1):.4f}")
        running, count = ctx.sum(torch.tensor([float(running), count],
                                              dtype=torch.float64)).tolist()
        epoch_s = time.monotonic() - epoch_start
        train_loss = running / max(count, 1)
        epoch += 1
        mae = evaluate(model, val_loader, mean_d, std_d, dev)
        raw = {}
        if ema is not None:  # the average is the model; the raw weights for comparison
            raw = {f"val_raw_mae_{t}": v for t, v in mae.items()}
            with ema.swapped_in(model):
                mae = evaluate(model, val_loader, mean_d, std_d, dev)
        score = _score(mae, std, cfg.targets, weights)
        history.append({"epoch": epoch, "train_loss": train_loss,
                        "elapsed_s": clock_before + time.monotonic() - start_time,
                        "train_s": epoch_s, "graphs": int(count), "gpus": ctx.world_size,
                        **{f"val_mae_{t}": v for t, v in mae.items()}, **raw})
        if progress:
            print(f"epoch {epoch}: train L1 {train_loss:.4f}  val MAE " +
                  "  ".join(f"{t} {v:.4f}" for t, v in mae.items()) +
                  ("  (last step's weights: " + "  ".join(
                      f"{v:.4f}" for v in raw.values()) + ")" if raw else ""), flush=True)
        if score < best_score:
            best_score = score
            best = ema.state_dict() if ema is not None else {
                k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state = {
            "format": CHECKPOINT_FORMAT, "train_config": _plain(asdict(cfg)),
            "model_config": _plain(model_cfg.as_dict()), "graph_spec": asdict(spec),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "epoch": epoch,
            "step": step, "history": history, "best_state_dict": best,
            "best_score": best_score, "norm_mean": mean, "norm_std": std,
            **({"ema_state_dict": ema.state_dict()} if ema is not None else {}),
            "data_hash": table_hash(data_path), "n_train": len(train_set.graphs),
            "n_val": len(val_set.graphs), "skipped_train": len(train_set.skipped),
        }
        if ctx.is_main:
            _atomic_save(state, out)
        if budget is not None and epoch < cfg.epochs:
            late = not next_epoch_fits(time.monotonic() - start_time, epoch - first_epoch,
                                       budget)
            stopped_early = bool(ctx.from_main([late])[0])  # rank 0's clock decides for all
            if stopped_early:
                break
    if progress and stopped_early:
        print(f"time budget reached after epoch {epoch}; run again to continue", flush=True)
    return state


def parse_target_weights(text: str) -> tuple[float, ...]:
    """``"2,1"`` -> ``(2.0, 1.0)``; empty -> equal weights; a clear error otherwise."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MatcoupleError(f"target weights {text!r}: expected numbers separated by "
                             "commas, e.g. 2,1") from None


def _plain(d: dict) -> dict:
    """Tuples -> lists, so the dict survives ``weights_only=True`` loading unchanged."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _source(path: Path) -> dict:
    """The model or checkpoint named by ``--init-from``, or a clear error."""
    if not Path(path).exists():
        raise MatcoupleError(f"--init-from {path}: no such file")
    blob = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(blob.get("model_config"), dict):
        raise MatcoupleError(f"--init-from {path}: not a Crysformer model or checkpoint "
                             "(no model_config)")
    return blob


def inherited_architecture(blob: dict) -> dict:
    """The architecture options (``--model`` names) of a loaded model or checkpoint."""
    saved = blob["model_config"]
    return {k: saved[k] for k in TUNABLE_FIELDS if k in saved}


def inherited_normalisation(blob: dict, targets: tuple[str, ...], mean: torch.Tensor,
                            std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean``/``std`` with the source model's values for the targets it already predicts:
    its heads learned that scale, so a fine-tune on a small set starts from the source's
    predictions instead of shifted ones; a new target keeps the new set's statistics."""
    if "norm_mean" not in blob:
        return mean, std
    known = list(blob["model_config"]["targets"])
    mean, std = mean.clone(), std.clone()
    for j, target in enumerate(targets):
        if target in known:
            mean[j] = blob["norm_mean"][known.index(target)]
            std[j] = blob["norm_std"][known.index(target)]
    return mean, std


def _init_from(model: Crysformer, path: Path, blob: dict | None = None) -> None:
    """Transfer learning: copy every matching weight, keep new heads for new targets.

    A deeper model than the checkpoint's (``--model layers=N``) grows it: the blocks the
    checkpoint has are copied and the added ones start as identities (their two residual
    output projections zeroed), so training starts from the checkpoint's predictions
    instead of from a perturbed network, and the new blocks learn what is left.
    ``blob``: the file at ``path`` when the caller has already read it.
    """
    blob = blob if blob is not None else _source(path)
    source = blob.get("best_state_dict") or blob["state_dict"]
    own = model.state_dict()
    new_targets = list(blob["model_config"]["targets"]) != list(model.cfg.targets)
    # the output layer of other targets is replaced on purpose, not copied
    replaced = {k for k in source if new_targets and k.startswith("head.3.")}
    copied = {k: v for k, v in source.items() if k not in replaced and k in own
              and own[k].shape == v.shape}
    # a weight of the source with no place in the model would be dropped silently and
    # the fine-tune would start from a different network than the one named
    left = sorted(k for k in source if k not in copied and k not in replaced)
    if left:
        raise MatcoupleError(
            f"--init-from {path}: {len(left)} of its weights do not fit the model being "
            f"trained ({', '.join(left[:4])}{', ...' if len(left) > 4 else ''}); its --model "
            f"options are {blob['model_config']}, leave out the --model options that differ")
    model.load_state_dict(copied, strict=False)
    have = int(blob["model_config"].get("layers", len(model.blocks)))
    with torch.no_grad():
        for block in list(model.blocks)[have:]:
            block.lin_out.weight.zero_()
            block.ffn_out.weight.zero_()


def export_model(checkpoint: Path, out: Path, extra: dict | None = None) -> dict:
    """Write the small inference file (best weights + everything needed to use them)."""
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    history = state["history"]
    targets = state["model_config"]["targets"]
    weights = loss_weights(state["train_config"].get("target_weights", ()), len(targets))
    best_epoch = min(history, key=lambda h: _score(
        {t: h[f"val_mae_{t}"] for t in targets}, state["norm_std"], targets, weights))
    model = {
        "format": MODEL_FORMAT, "model_config": state["model_config"],
        "graph_spec": state["graph_spec"], "state_dict": state["best_state_dict"],
        "norm_mean": state["norm_mean"], "norm_std": state["norm_std"],
        "data_hash": state["data_hash"], "train_config": state["train_config"],
        "epochs_trained": state["epoch"], "best_epoch": best_epoch["epoch"],
        "val_mae": {t: best_epoch[f"val_mae_{t}"]
                    for t in state["model_config"]["targets"]},
        **(extra or {}),
    }
    _atomic_save(model, out)
    return model


def main(argv: list[str] | None = None) -> None:
    """``python -m matcouple.surrogate.train``: the same as ``matcouple train surrogate``."""
    import argparse

    from matcouple.settings import get_settings

    p = argparse.ArgumentParser(description="Train Crysformer (resumable).")
    p.add_argument("--data", default=str(get_settings().data_dir / get_settings().datasets[
        "mp2018"]))
    p.add_argument("--targets", default="formation_energy_per_atom,band_gap")
    p.add_argument("--split-column", default="megnet_split")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=get_settings().surrogate_train_epochs)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--batch-size", type=int,
                   default=get_settings().surrogate_train_batch_size)
    p.add_argument("--lr", type=float, default=get_settings().surrogate_train_lr)
    p.add_argument("--warmup-epochs", type=float,
                   default=get_settings().surrogate_train_warmup_epochs,
                   help="epochs of linear warm-up before the cosine decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--fused-tp", action=argparse.BooleanOptionalAction,
                   default=get_settings().surrogate_train_fused_tp,
                   help="fused tensor products in training (same math as e3nn, faster; "
                   "default: Settings.surrogate_train_fused_tp)")
    p.add_argument("--ema", type=float, default=get_settings().surrogate_train_ema_decay,
                   help="EMA decay of the weights (0 = off; e.g. 0.999): the average is "
                   "evaluated, kept and exported")
    p.add_argument("--target-weights", default="",
                   help="loss weight per target, in --targets order, e.g. 2,1 (default equal)")
    p.add_argument("--weight-decay", type=float,
                   default=get_settings().surrogate_train_weight_decay, help="AdamW weight decay")
    p.add_argument("--strain-noise", type=float,
                   default=get_settings().surrogate_train_strain_noise,
                   help="std of random strains in training (fraction, e.g. 0.01; 0 = off)")
    p.add_argument("--displacement-noise", type=float,
                   default=get_settings().surrogate_train_displacement_noise,
                   help="std of random atomic displacements in training (Å; 0 = off)")
    p.add_argument("--device", default=None)
    p.add_argument("--init-from", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=get_settings().graph_cache_dir)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--model", default="", help="e.g. scalars=128,vectors=32,layers=4")
    p.add_argument("--graph", default="",
                   help="graph settings, e.g. k=16 (neighbours per atom; default "
                   "GraphSpec's, 12); stored in the checkpoint and the exported model")
    p.add_argument("--export", type=Path, default=None, help="also write the model file")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    model = parse_model_overrides([i for i in a.model.split(",") if i])
    cfg = TrainConfig(data=a.data, targets=tuple(a.targets.split(",")),
                      split_column=a.split_column, train_split=a.train_split,
                      val_split=a.val_split, epochs=a.epochs, batch_size=a.batch_size,
                      lr=a.lr, warmup_epochs=a.warmup_epochs, seed=a.seed,
                      limit_train=a.limit_train, amp=a.amp, model=model,
                      fused_tp=a.fused_tp, ema_decay=a.ema, weight_decay=a.weight_decay,
                      strain_noise=a.strain_noise, displacement_noise=a.displacement_noise,
                      target_weights=parse_target_weights(a.target_weights),
                      graph=parse_graph_options([i for i in a.graph.split(",") if i]))
    train(cfg, a.out, minutes=a.minutes, device=a.device, init_from=a.init_from,
          cache_dir=a.cache_dir, workers=a.workers, progress=not a.quiet)
    if a.export:
        info = export_model(a.out, a.export)
        print(f"exported {a.export}: best epoch {info['best_epoch']}, val MAE {info['val_mae']}")


if __name__ == "__main__":
    main()
