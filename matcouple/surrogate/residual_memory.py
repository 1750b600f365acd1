"""A value model's residuals on its training crystals, looked up by neighbours.

A trained model still errs on its own training crystals (the shipped value models by about
0.02 eV/atom on E_f), and crystals that the model represents alike tend to share those
errors. A residual memory keeps, for one value model, each training crystal's residual
(label minus the model's prediction) keyed by the model's own pooled head features
(:meth:`Crysformer.forward` with ``features=True``), standardised and projected on their
leading principal axes. A new crystal's correction is the inverse-distance weighted mean
residual of its ``k`` nearest training crystals; the corrected value is the model's value
plus that. A crystal already in the training set gets (almost exactly) its own residual,
i.e. nearly its label back. On the MEGNet val split (k=3, 32 axes) this took the shipped value
models' E_f MAE from 0.0352 / 0.0348 (k=16 and k=24 graphs) to 0.0319 / 0.0312 eV/atom
(benchmarks/records/2026-12-05/cpu_s33).

The memory belongs to one set of weights (``model_sha``): a memory for other weights (after a
fine-tune) is refused, never silently applied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data
from tqdm import tqdm

from matcouple.errors import MatcoupleError
from matcouple.surrogate.collate import collate_graphs
from matcouple.surrogate.graph import GraphSpec
from matcouple.surrogate.model import Crysformer

MEMORY_FORMAT = "matcouple-residual-memory-1"


def weights_sha(blob: dict) -> str:
    """A digest of an exported model's weights: which model a memory was made for."""
    digest = hashlib.sha256()
    for name in sorted(blob["state_dict"]):
        tensor = blob["state_dict"][name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class ResidualMemory:
    """Training residuals of one value model keyed by its projected pooled features."""

    model_sha: str
    targets: tuple[str, ...]
    center: torch.Tensor     # (features,) mean of the training features
    scale: torch.Tensor      # (features,) their standard deviation
    axes: torch.Tensor       # (features, dims) leading principal axes
    keys: torch.Tensor       # (crystals, dims) float16
    residuals: torch.Tensor  # (crystals, targets) float32, NaN where a label is missing
    k: int
    eps: float

    def __post_init__(self) -> None:
        self._placed: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """center, scale, axes, keys (float32) and residuals on ``device``, copied once."""
        if device not in self._placed:
            self._placed[device] = tuple(t.float().to(device) for t in (
                self.center, self.scale, self.axes, self.keys, self.residuals))
        return self._placed[device]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        center, scale, axes, _, _ = self._on(features.device)
        return ((features.float() - center) / scale) @ axes

    def correction(self, features: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """(n, targets) on the features' device: each crystal's weighted mean residual of
        its ``k`` nearest training crystals (weights 1 / (distance + eps); missing labels
        left out)."""
        if features.ndim != 2 or features.shape[1] != self.center.shape[0]:
            raise MatcoupleError(f"residual memory expects (n, {self.center.shape[0]}) "
                                 f"features, got {tuple(features.shape)}")
        _, _, _, keys, residuals = self._on(features.device)
        out = []
        for start in range(0, features.shape[0], chunk):
            query = self.project(features[start:start + chunk])
            dist, idx = self._nearest(query, keys)
            weight = 1.0 / (dist + self.eps)                       # (n, k)
            res = residuals[idx]                                   # (n, k, targets)
            known = torch.isfinite(res)
            w = weight[..., None] * known
            total = (w * torch.nan_to_num(res)).sum(1)
            out.append(total / w.sum(1).clamp_min(1e-12))
        return torch.cat(out)

    def _nearest(self, query: torch.Tensor, keys: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances and indices of each query's ``k`` nearest keys. The matrix-product
        distances that find candidates lose digits near zero (|q|^2 + |k|^2 - 2 q.k), so a
        crystal's distance to itself would be round-off of order 0.01; the few candidates
        are re-measured directly, so the weights and predictions stay smooth."""
        k = min(self.k, len(keys))
        wide = min(len(keys), k + 8)
        _, cand = torch.cdist(query, keys).topk(wide, largest=False)
        exact = (keys[cand] - query[:, None, :]).norm(dim=-1)     # (n, wide)
        dist, pick = exact.topk(k, largest=False)
        return dist, cand.gather(1, pick)

    def state(self) -> dict:
        return {"format": MEMORY_FORMAT, "model_sha": self.model_sha,
                "targets": list(self.targets), "center": self.center, "scale": self.scale,
                "axes": self.axes, "keys": self.keys, "residuals": self.residuals,
                "k": self.k, "eps": self.eps}

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ResidualMemory:
        path = Path(path)
        if not path.exists():
            raise MatcoupleError(f"residual memory {path} not found")
        blob = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(blob, dict) or blob.get("format") != MEMORY_FORMAT:
            raise MatcoupleError(f"{path} is not a matcouple residual memory")
        return cls(model_sha=blob["model_sha"], targets=tuple(blob["targets"]),
                   center=blob["center"], scale=blob["scale"], axes=blob["axes"],
                   keys=blob["keys"], residuals=blob["residuals"].float(),
                   k=int(blob["k"]), eps=float(blob["eps"]))

    def check_model(self, blob: dict, name: str = "the value model") -> None:
        """Refuse a memory made for other weights or targets than ``blob``'s."""
        targets = tuple(blob["model_config"]["targets"])
        if targets != self.targets:
            raise MatcoupleError(f"residual memory for targets {self.targets} cannot serve "
                                 f"{name} (targets {targets})")
        sha = weights_sha(blob)
        if sha != self.model_sha:
            raise MatcoupleError(f"residual memory was made for weights {self.model_sha}, "
                                 f"{name} has {sha} (fine-tuned since?): rebuild it with "
                                 "`matcouple train memory`")


def fit_residual_memory(features: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                        targets: Sequence[str], model_sha: str, *, dims: int, k: int,
                        eps: float) -> ResidualMemory:
    """The memory of training crystals with pooled ``features`` (N, F), ``labels`` and the
    model's ``predictions`` (N, targets; NaN labels allowed): features standardised, then
    projected on their ``dims`` leading principal axes."""
    features = np.asarray(features, dtype=np.float64)
    labels, predictions = np.asarray(labels, float), np.asarray(predictions, float)
    if features.ndim != 2 or len(features) < 2:
        raise MatcoupleError("a residual memory needs pooled features of >= 2 crystals")
    if labels.shape != predictions.shape or labels.shape != (len(features), len(targets)):
        raise MatcoupleError(f"labels {labels.shape} and predictions {predictions.shape} "
                             f"must both be ({len(features)}, {len(targets)})")
    if not np.isfinite(features).all() or not np.isfinite(predictions).all():
        raise MatcoupleError("pooled features or predictions are not finite")
    if not 1 <= dims <= features.shape[1]:
        raise MatcoupleError(f"dims must be in 1..{features.shape[1]}, got {dims}")
    if k < 1 or eps <= 0:
        raise MatcoupleError(f"k must be >= 1 and eps > 0, got k={k}, eps={eps}")
    center, scale = features.mean(0), features.std(0) + 1e-6
    standard = (features - center) / scale
    _, _, vt = np.linalg.svd(standard, full_matrices=False)
    axes = vt[:dims].T
    keys = standard @ axes
    return ResidualMemory(
        model_sha=model_sha, targets=tuple(targets),
        center=torch.tensor(center, dtype=torch.float32),
        scale=torch.tensor(scale, dtype=torch.float32),
        axes=torch.tensor(axes, dtype=torch.float32),
        keys=torch.tensor(keys, dtype=torch.float16),
        residuals=torch.tensor(labels - predictions, dtype=torch.float32), k=k, eps=eps)


def pooled_outputs(model: Crysformer, blob: dict, graphs: Sequence[Data], *,
                   batch_size: int = 16, graph_k: int | None = None, progress: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A (dropout-free) model's predictions in physical units (N, targets) and pooled head
    features (N, F) on ``graphs`` built with ``graph_k`` neighbours (default: the model's
    own; with more, the model reads each batch's k-nearest part)."""
    device = next(model.parameters()).device
    spec = GraphSpec(**blob["graph_spec"])
    mean, std = blob["norm_mean"].to(device), blob["norm_std"].to(device)
    preds, feats = [], []
    starts = range(0, len(graphs), batch_size)
    model.eval()
    for start in tqdm(starts, desc="pooled features", unit="batch", disable=not progress):
        batch = collate_graphs(graphs[start:start + batch_size]).to(device)
        if graph_k is not None and graph_k > spec.k:
            batch = batch.nearest(spec.k, spec.tie_tol)
        with torch.inference_mode():
            out, feat = model(batch.z, batch.edge_index, batch.edge_vec, batch.batch,
                              batch.num_graphs, features=True)
        preds.append((out * std + mean).cpu().numpy())
        feats.append(feat.cpu().numpy())
    return np.concatenate(preds), np.concatenate(feats)


def build_residual_memory(model_path: Path, data: Path, *, split_column: str | None,
                          split: str | None, k: int, dims: int, eps: float,
                          limit: int | None = None, device: str | None = None,
                          batch_size: int | None = None, cache_dir: Path | None = None,
                          progress: bool = True) -> tuple[ResidualMemory, dict]:
    """The residual memory of the exported value model at ``model_path`` over the labelled
    rows of ``data`` (one split of it), and a summary (crystals, rows skipped, the model's
    MAE on them)."""
    from matcouple.settings import get_settings
    from matcouple.surrogate.data import load_graphs
    from matcouple.surrogate.predict import exported_config, load_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, blob = load_model(Path(model_path), dev, optimize_einsums=dev.type != "cpu")
    model.set_fused(get_settings().surrogate_fused_tp)  # as the predictor runs it
    if exported_config(blob).dropout > 0:
        raise MatcoupleError(f"{model_path} has dropout: a residual memory is for the "
                             "dropout-free value models")
    targets = tuple(blob["model_config"]["targets"])
    graph_set = load_graphs(Path(data), targets, split_column=split_column, split=split,
                            spec=GraphSpec(**blob["graph_spec"]), limit=limit,
                            cache_dir=cache_dir, progress=progress)
    graphs = graph_set.graphs
    if len(graphs) < 2:
        raise MatcoupleError(f"{data} has {len(graphs)} usable rows"
                             + (f" in {split_column}={split}" if split else "")
                             + ": a residual memory needs >= 2")
    preds, feats = pooled_outputs(model, blob, graphs, progress=progress,
                                  batch_size=batch_size or (
                                      get_settings().predict_batch_size_cpu
                                      if dev.type == "cpu"
                                      else get_settings().predict_batch_size_gpu))
    labels = np.stack([g.y.numpy().reshape(-1) for g in graphs])
    memory = fit_residual_memory(feats, labels, preds, targets, weights_sha(blob),
                                 dims=dims, k=k, eps=eps)
    summary = {"crystals": len(graphs), "skipped": len(graph_set.skipped),
               "model_mae": {t: float(np.nanmean(np.abs(preds[:, j] - labels[:, j])))
                             for j, t in enumerate(targets)}}
    return memory, summary

