"""Shared plumbing of the surrogate studies (heads vs models, transfer, data size).

Each study trains several Crysformer variants under one budget and compares their
validation MAE; this module runs one variant (train, then score its best weights) and
parses the small command-line specs the study scripts share, so each script only says
what it compares.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch_geometric.loader import DataLoader

from matcouple.errors import MatcoupleError
from matcouple.surrogate.data import load_graphs
from matcouple.surrogate.graph import GraphSpec
from matcouple.surrogate.predict import load_model
from matcouple.surrogate.train import TrainConfig, evaluate, export_model, train

FLOAT_KEYS = ("dropout", "rbf_cutoff")


def parse_model_spec(text: str) -> dict:
    """``"scalars=16,layers=2"`` -> ``{"scalars": 16, "layers": 2}`` (model overrides)."""
    out: dict = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise MatcoupleError(f"model override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = float(value) if key in FLOAT_KEYS else int(value)
    return out


@dataclass
class RunResult:
    """One trained variant: its best validation MAE per target and how it got there."""

    name: str
    val_mae: dict[str, float]
    epochs: int
    best_epoch: int
    seconds: float
    graph_seconds: float
    n_train: int
    history: list[dict]

    def as_dict(self) -> dict:
        return {"name": self.name, "val_mae": self.val_mae, "epochs": self.epochs,
                "best_epoch": self.best_epoch, "seconds": self.seconds,
                "graph_seconds": self.graph_seconds,
                "n_train": self.n_train, "history": self.history}


def run_variant(name: str, cfg: TrainConfig, out_dir: Path, *, device: str | None,
                minutes: float | None = None, init_from: Path | None = None,
                cache_dir: Path | None = None, workers: int | None = None,
                progress: bool = True) -> RunResult:
    """Train ``cfg`` from scratch (a stale checkpoint of the same name is replaced), export
    its best weights and return their validation MAE (dropout off). ``seconds`` is the
    training time; building the graphs (once per data/targets, then cached) is apart."""
    ckpt = Path(out_dir) / f"{name}.ckpt.pt"
    if ckpt.exists():
        ckpt.unlink()
    t0 = time.monotonic()
    if cache_dir is not None:  # build (or find) the cached graphs first: not timed as training
        for split, limit in ((cfg.train_split, cfg.limit_train), (cfg.val_split, None)):
            load_graphs(Path(cfg.data), cfg.targets, split_column=cfg.split_column,
                        split=split, spec=GraphSpec(**cfg.graph), limit=limit,
                        cache_dir=cache_dir, workers=workers, progress=progress)
    graph_seconds = time.monotonic() - t0
    t0 = time.monotonic()
    state = train(cfg, ckpt, minutes=minutes, device=device, init_from=init_from,
                  cache_dir=cache_dir, workers=workers, progress=progress)
    seconds = time.monotonic() - t0
    info = export_model(ckpt, Path(out_dir) / f"{name}.pt")
    ckpt.unlink()  # optimizer state is not needed by the studies; keep $OUT small
    return RunResult(name=name, val_mae=info["val_mae"], epochs=state["epoch"],
                     best_epoch=info["best_epoch"], seconds=seconds,
                     graph_seconds=graph_seconds,
                     n_train=state["n_train"], history=state["history"])


def score_model(model_path: Path, cfg: TrainConfig, *, split: str, device: str | None,
                cache_dir: Path | None = None, workers: int | None = None) -> dict[str, float]:
    """MAE of an exported model on one split of ``cfg.data`` (e.g. zero-shot transfer)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, blob = load_model(model_path, dev)
    targets = tuple(blob["model_config"]["targets"])
    graphs = load_graphs(Path(cfg.data), targets, split_column=cfg.split_column, split=split,
                         spec=GraphSpec(**blob["graph_spec"]), cache_dir=cache_dir,
                         workers=workers, progress=False)
    if not graphs.graphs:
        raise MatcoupleError(f"no usable rows in split {split!r} of {cfg.data}")
    loader = DataLoader(graphs.graphs, batch_size=256)
    return evaluate(model, loader, blob["norm_mean"].to(dev), blob["norm_std"].to(dev), dev)


def with_targets(cfg: TrainConfig, targets: tuple[str, ...]) -> TrainConfig:
    return replace(cfg, targets=tuple(targets))


def seconds_per_step(cfg: TrainConfig, *, device: str | None, cache_dir: Path | None = None,
                     steps: int = 30, skip: int = 10) -> tuple[float, int]:
    """Median wall time of one training step (forward, backward, AdamW) of ``cfg``'s model
    at ``cfg.batch_size`` on ``device`` over the real training graphs, and the number of
    those graphs. The first ``skip`` steps (allocator and kernel warm-up) are not counted.
    Studies timed side by side measure the shared speed they will then train at."""
    from matcouple.surrogate.atom_features import atom_feature_table
    from matcouple.surrogate.model import Crysformer, CrysformerConfig

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    graphs = load_graphs(Path(cfg.data), cfg.targets, split_column=cfg.split_column,
                         split=cfg.train_split, spec=GraphSpec(**cfg.graph),
                         limit=cfg.limit_train, cache_dir=cache_dir, progress=False).graphs
    model = Crysformer(CrysformerConfig(**{**cfg.model, "targets": tuple(cfg.targets)}),
                       torch.from_numpy(atom_feature_table())).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    gen = torch.Generator().manual_seed(cfg.seed)
    times: list[float] = []
    for i, batch in enumerate(DataLoader(graphs, batch_size=cfg.batch_size, shuffle=True,
                                         generator=gen)):
        if i == steps:
            break
        start = time.monotonic()
        batch = batch.to(dev)
        pred = model(batch.z, batch.edge_index, batch.edge_vec, batch.batch, batch.num_graphs)
        loss = (pred - torch.nan_to_num(batch.y)).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.monotonic() - start)
    kept = sorted(times[skip:] or times)
    return kept[len(kept) // 2], len(graphs)


def epochs_within(budget_s: float, n_train: int, batch_size: int, step_s: float,
                  overhead: float = 1.15) -> int:
    """Whole epochs whose steps fit in ``budget_s`` (``overhead``: data loading and the
    validation pass after each epoch), at least one."""
    steps = -(-n_train // batch_size)
    return max(1, int(budget_s / (steps * step_s * overhead)))


@torch.no_grad()
def model_predictions(model_path: Path, graphs: list, *, device: str | None = None,
                      spec: GraphSpec | None = None, batch_size: int = 256) -> np.ndarray:
    """One exported model's dropout-off predictions, (N, targets), physical units, for
    studies that score a single model (a predictor needs an ensemble or MC passes).
    ``spec``: the graph settings ``graphs`` were built with; must be the model's."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, blob = load_model(model_path, dev)
    if spec is not None and GraphSpec(**blob["graph_spec"]) != spec:
        raise MatcoupleError(f"{model_path} was trained on other graph settings "
                             f"({blob['graph_spec']}) than these graphs ({spec})")
    mean, std = blob["norm_mean"].to(dev), blob["norm_std"].to(dev)
    out = []
    for batch in DataLoader(graphs, batch_size=batch_size):
        batch = batch.to(dev)
        pred = model(batch.z, batch.edge_index, batch.edge_vec, batch.batch, batch.num_graphs)
        out.append((pred * std + mean).cpu())
    return torch.cat(out).numpy()
