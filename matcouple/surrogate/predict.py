"""Batched prediction with an uncertainty, from the shipped (or any) Crysformer models.

A predictor holds an ensemble of exported models plus the calibration scales of the
model card, and optionally a *value model*: one more accurate model whose prediction is the
value, the ensemble's samples then giving its sigma (their RMS deviation from it). A card
may name two or more value models (a *value pair* or trio, trained from different starts
or on different graphs): their weighted value is the value; with MC dropout the ensemble
still gives the sigma, and with dropout off (the fast mode) their own disagreement does,
given a fitted floor, and the ensemble is not run. Models trained on different numbers of
neighbours share one graph, built for the most (each reads its k-nearest part).
Structures that cannot be used are returned as rows with an error, so one bad file never
costs the rest of a batch.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import e3nn
import numpy as np
import torch
from pymatgen.core import Structure
from torch_geometric.data import Data

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.surrogate.collate import GraphBatch, collate_graphs
from matcouple.surrogate.graph import (
    CompactCrystal,
    GraphSpec,
    common_spec,
    compact_crystal,
    crystal_from_compact,
    structure_to_graph,
)
from matcouple.surrogate.mc_dropout import draw_masks, replaying
from matcouple.surrogate.model import Crysformer, CrysformerConfig
from matcouple.surrogate.residual_memory import ResidualMemory
from matcouple.surrogate.train import MODEL_FORMAT
from matcouple.surrogate.uncertainty import combine, spread_around
from matcouple.surrogate.value_blend import (
    blend,
    card_weights,
    value_memory_names,
    value_model_names,
    weighted_values,
)

NON_NEGATIVE = {"band_gap"}
# Never negative for a crystal of one element: MP measures formation energy from the most
# stable phase of each element (all 387 elemental crystals of MP 2018 have E_f >= 0).
NON_NEGATIVE_IF_ELEMENTAL = {"formation_energy_per_atom"}


def _element_count(graph: Data | dict) -> int:
    z = graph["z"] if isinstance(graph, dict) else graph.z
    return int(np.unique(np.asarray(z)).size)


def non_negative_rows(graphs: Sequence[Data | dict], targets: Sequence[str]) -> np.ndarray:
    """(N, targets) bool: where a value cannot be below zero, so a prediction below it is
    clipped -- the band gap of every crystal, the formation energy of a crystal of one
    element."""
    single = np.array([_element_count(g) == 1 for g in graphs], dtype=bool)
    every = np.ones(len(graphs), dtype=bool)
    cols = [every if t in NON_NEGATIVE else single if t in NON_NEGATIVE_IF_ELEMENTAL
            else ~every for t in targets]
    return np.stack(cols, axis=1) if cols else np.zeros((len(graphs), 0), dtype=bool)


@dataclass
class Prediction:
    """One structure's prediction: value and calibrated sigma per target, or an error."""

    id: str
    values: dict[str, float] = field(default_factory=dict)
    sigmas: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def load_model(path: Path, device: torch.device, *, optimize_einsums: bool = True
               ) -> tuple[Crysformer, dict]:
    """The exported model at ``path`` on ``device``, in eval mode, and its file's contents
    (see :func:`build_model`)."""
    blob = read_model_file(path)
    return build_model(blob, device, optimize_einsums=optimize_einsums), blob


def read_model_file(path: Path) -> dict:
    """The contents of an exported model file (weights, configuration, normalisation,
    graph spec), checked to be one."""
    if not Path(path).exists():
        raise MatcoupleError(f"model file {path} not found (train one with "
                             "`matcouple train surrogate` or use the shipped models)")
    blob = torch.load(path, weights_only=True, map_location="cpu")
    if blob.get("format") != MODEL_FORMAT:
        raise MatcoupleError(f"{path} is not an exported Crysformer model")
    return blob


def build_model(blob: dict, device: torch.device, *, optimize_einsums: bool = True
                ) -> Crysformer:
    """The Crysformer of an exported model file's contents on ``device``, in eval mode.

    ``optimize_einsums=False`` builds the model without e3nn's search for the best einsum
    contraction order, half the load time (the shipped seven models: 11.6 s -> 5.6 s on the
    2-core CPU). The predictor does so on CPU, where inference measured as fast either way
    (predictions within 3e-5); training steps measured slower without it (wide model, batch
    64: 3.8 -> 5.2 s), and on GPU it is not measured, so everything else keeps it."""
    with e3nn_einsum_optimisation(optimize_einsums):
        model = Crysformer(exported_config(blob), blob["state_dict"]["atom_table"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


def exported_config(blob: dict) -> CrysformerConfig:
    """The architecture recorded in an exported model file's contents."""
    cfg = blob["model_config"]
    return CrysformerConfig(**{**cfg, "targets": tuple(cfg["targets"])})


class ModelSlot:
    """One model of a predictor: its file's contents at once, the module built when a mode
    first runs it. Building costs ~0.8 s a model on a 2-core CPU, and the fast mode runs
    two of the seven shipped models."""

    def __init__(self, blob: dict, device: torch.device, *, optimize_einsums: bool = True,
                 model: Crysformer | None = None, memory: ResidualMemory | None = None,
                 name: str = "a value model") -> None:
        self.blob, self.device, self.optimize_einsums = blob, device, optimize_einsums
        self.model = model
        if memory is not None:
            memory.check_model(blob, name)
        # the value model's training residuals, added to its outputs (residual_memory.py)
        self.memory = memory

    @property
    def built(self) -> bool:
        return self.model is not None

    def get(self) -> Crysformer:
        if self.model is None:
            self.model = build_model(self.blob, self.device,
                                     optimize_einsums=self.optimize_einsums)
            self.model.set_fused(get_settings().surrogate_fused_tp)
        return self.model


_E3NN_DEFAULTS = threading.Lock()


@contextmanager
def e3nn_einsum_optimisation(on: bool) -> Iterator[None]:
    """e3nn modules built inside get (or skip) the einsum-order optimisation; e3nn keeps
    the switch in one global, restored on exit (one build at a time)."""
    with _E3NN_DEFAULTS:
        before = e3nn.get_optimization_defaults()
        e3nn.set_optimization_defaults(optimize_einsums=on)
        try:
            yield
        finally:
            e3nn.set_optimization_defaults(**before)


def _graph_or_error(structure: Structure, spec: GraphSpec) -> dict | str:
    """Graph arrays of one structure, or the reason it has none (picklable both ways)."""
    try:
        return {k: v.numpy() for k, v in structure_to_graph(structure, spec).items()}
    except MatcoupleError as exc:
        return str(exc)


def _compact_graph_or_error(item: CompactCrystal | Structure, spec: GraphSpec) -> dict | str:
    """:func:`_graph_or_error` in a worker process, fed by :func:`compact_crystal`."""
    return _graph_or_error(crystal_from_compact(item), spec)


def ensemble_value_and_sigma(means: np.ndarray, variances: np.ndarray,
                             point: np.ndarray | None, targets: Sequence[str],
                             ensemble_weight: Sequence[float] | None = None,
                             non_negative: np.ndarray | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Value and raw sigma (N, targets): the mixture's mean and spread, or, with a value
    model's ``point`` prediction, that prediction and the mixture's spread about it.
    ``ensemble_weight`` (per target, from the card; :mod:`value_blend`) first moves the
    point that fraction of the way to the mixture's mean. Values that cannot be negative
    are clipped at zero: where ``non_negative`` (:func:`non_negative_rows`) says so, else
    the targets in :data:`NON_NEGATIVE` (band gap)."""
    if point is None:
        value, sigma = combine(means, variances)
    else:
        if ensemble_weight is not None and any(ensemble_weight):
            point = blend(point, combine(means, variances)[0],
                          np.asarray(ensemble_weight, dtype=float)[None])
        value, sigma = point.copy(), spread_around(point, means, variances)
    if non_negative is None:
        non_negative = np.array([t in NON_NEGATIVE for t in targets], dtype=bool)[None]
    return np.where(non_negative, np.maximum(value, 0.0), value), sigma


def mode_name(members: int, values: int, mc_samples: int) -> str:
    """The card's name of a prediction mode, e.g. ``value+ensemble3+mc8``; a value pair
    with dropout off (its members not run) is ``value2``."""
    if values > 1 and not mc_samples:
        return f"value{values}"
    prefix = "" if not values else "value+" if values == 1 else f"value{values}+"
    return prefix + f"ensemble{members}" + (f"+mc{mc_samples}" if mc_samples else "")


def active_value_count(card: dict, n_values: int, mc_samples: int) -> int:
    """How many of a card's value models a mode runs: with dropout off only the first
    ``fast_value_count`` (the cheaper fast mode) when the card names fewer than all, else
    every one."""
    n_fast = int(card.get("fast_value_count", 0))
    return n_fast if not mc_samples and 1 < n_fast < n_values else n_values


class SurrogatePredictor:
    """An ensemble of Crysformer models with calibrated uncertainties.

    ``mc_samples`` MC-dropout passes per member (default ``Settings.surrogate_mc_samples``;
    0 = dropout off, the fast mode). The value is then the mean over members and passes
    (or the value model's prediction), the sigma the mixture's spread (about that value),
    scaled by the card's calibration for that mode."""

    def __init__(self, model_paths: Sequence[Path], *, card: dict | None = None,
                 device: str | None = None, mc_samples: int | None = None,
                 value_model: Path | Sequence[Path] | None = None,
                 value_memory: Sequence[Path | None] | None = None) -> None:
        """``value_memory``: a residual memory file (or None) for each value model, whose
        training residuals correct that model's outputs (residual_memory.py)."""
        if not model_paths:
            raise MatcoupleError("no surrogate model files given")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # inference only: on CPU the einsum-order search costs load time and buys nothing
        optimize = dev.type != "cpu"
        paths = [] if value_model is None else [value_model] if isinstance(
            value_model, str | Path) else list(value_model)
        memories = list(value_memory) if value_memory is not None else [None] * len(paths)
        if len(memories) != len(paths):
            raise MatcoupleError(f"{len(memories)} residual memories for {len(paths)} value "
                                 "models: give one (or None) per value model")
        members = [ModelSlot(read_model_file(Path(p)), dev, optimize_einsums=optimize)
                   for p in model_paths]
        values = [ModelSlot(read_model_file(Path(p)), dev, optimize_einsums=optimize,
                            memory=None if m is None else ResidualMemory.load(Path(m)),
                            name=Path(p).name)
                  for p, m in zip(paths, memories, strict=True)]
        self._setup(members, values, card, dev, mc_samples)

    @classmethod
    def from_models(cls, models: Sequence[Crysformer], blobs: Sequence[dict], *,
                    card: dict | None = None, device: torch.device,
                    mc_samples: int | None = None,
                    value: tuple[Crysformer, dict] | list[tuple[Crysformer, dict]] | None
                    = None) -> SurrogatePredictor:
        """A predictor over models already in memory (e.g. members being fine-tuned);
        ``value``: one value model (model, blob) or a list of them (a value pair)."""
        self = cls.__new__(cls)
        values = [] if value is None else list(value) if isinstance(value, list) else [value]
        fused = get_settings().surrogate_fused_tp
        self._setup([ModelSlot(b, device, model=m.set_fused(fused))
                     for m, b in zip(models, blobs, strict=True)],
                    [ModelSlot(b, device, model=m.set_fused(fused)) for m, b in values],
                    card, device, mc_samples)
        return self

    def _setup(self, members: list[ModelSlot], values: list[ModelSlot], card: dict | None,
               device: torch.device, mc_samples: int | None) -> None:
        self.device = device
        self._member_slots, self._value_slots = members, values
        self._memories = {id(s.blob): s.memory for s in values if s.memory is not None}
        self.blobs = [s.blob for s in members]
        first = self.blobs[0]
        self.targets = tuple(first["model_config"]["targets"])
        every = self.blobs + [s.blob for s in values]
        for b in every[1:]:
            if tuple(b["model_config"]["targets"]) != self.targets:
                raise MatcoupleError("ensemble members (and value models) disagree on "
                                     "targets")
        # graphs given to predict_graphs are built once, with the most neighbours any
        # model reads (a model trained on fewer reads its k-nearest subgraph,
        # GraphBatch.nearest); predict() builds only what the current mode reads
        self.spec = common_spec([GraphSpec(**b["graph_spec"]) for b in every])
        self.card = card or {}
        self.version = self.card.get("version", "uncalibrated")
        # Members trained without dropout have no MC spread: their default is the ensemble.
        self.has_dropout = all(exported_config(b).dropout > 0 for b in self.blobs)
        default = get_settings().surrogate_mc_samples if self.has_dropout else 0
        self.mc_samples = default if mc_samples is None else mc_samples

    @property
    def mc_samples(self) -> int:
        return self._mc_samples

    @mc_samples.setter
    def mc_samples(self, value: int) -> None:
        """Switching the mode switches to that mode's calibration scales."""
        if value < 0 or value == 1:
            raise MatcoupleError(f"mc_samples must be 0 (dropout off) or >= 2, got {value}")
        # the fast mode may run only the first value models (cheaper, its own weights)
        n_values = len(self._value_slots)
        active = [s.blob for s in
                  self._value_slots[:active_value_count(self.card, n_values, value)]]
        fast = len(active) < n_values
        if value and not self.has_dropout:
            raise MatcoupleError("MC dropout needs members trained with dropout > 0; these "
                                 "have none: use --mc-samples 0 (the ensemble's spread)")
        if len(self.blobs) < 2 and value < 2 and len(active) < 2:
            raise MatcoupleError("an uncertainty needs >= 2 ensemble members or "
                                 "--mc-samples >= 2")
        stored = self.card.get("fast_value_weights" if fast else "value_weights")
        self._n_active_values = len(active)
        # the fast mode need not build the neighbours only a skipped value model reads
        self.mode_spec = common_spec([GraphSpec(**b["graph_spec"]) for b in
                                      self.blobs + active])
        self.value_weights = [stored[t] for t in self.targets] if stored and \
            len(active) > 1 else None
        self._mc_samples = int(value)
        scales = self.card.get("calibration", {}).get(self.mode, {})
        self.scales = {t: float(scales.get(t, {}).get("scale", 1.0)) for t in self.targets}
        # the value pair's own spread is given this floor (uncertainty.fit_floor)
        self.floors = np.array([float(scales.get(t, {}).get("floor", 0.0))
                                for t in self.targets])
        # the fraction of the way from the value model to the ensemble's mean (value_blend)
        self.ensemble_weight = card_weights(scales, self.targets)
        self.calibrated = bool(scales)

    @property
    def models(self) -> list[Crysformer]:
        """The ensemble members (built now if not yet)."""
        return [s.get() for s in self._member_slots]

    @property
    def all_values(self) -> list[tuple[Crysformer, dict]]:
        """Every value model with its file's contents (built now if not yet)."""
        return [(s.get(), s.blob) for s in self._value_slots]

    @property
    def values(self) -> list[tuple[Crysformer, dict]]:
        """The value models the current mode runs: the card's ``fast_value_count`` first
        ones with dropout off, all of them otherwise (built now if not yet)."""
        return [(s.get(), s.blob) for s in self._value_slots[:self._n_active_values]]

    @property
    def residual_memories(self) -> int:
        """How many of the value models the current mode runs correct their outputs with a
        residual memory."""
        return sum(s.memory is not None for s in self._value_slots[:self._n_active_values])

    @property
    def built_models(self) -> int:
        """How many of the models have been built so far (a mode builds those it runs)."""
        return sum(s.built for s in self._member_slots + self._value_slots)

    @property
    def value(self) -> tuple[Crysformer, dict] | None:
        """The (first) value model, None without one."""
        return self.values[0] if self.values else None

    @property
    def values_only(self) -> bool:
        """Two or more value models with dropout off: they alone give value and sigma."""
        return self._n_active_values > 1 and not self.mc_samples

    @property
    def mode(self) -> str:
        return mode_name(len(self.blobs), self._n_active_values, self.mc_samples)

    @classmethod
    def default(cls, *, device: str | None = None, mc_samples: int | None = None,
                model_dir: Path | None = None) -> SurrogatePredictor:
        """The models shipped with matcouple (``Settings.surrogate_model_dir``)."""
        folder = Path(model_dir or get_settings().surrogate_model_dir)
        card_path = folder / "model_card.json"
        if not card_path.exists():
            raise MatcoupleError(f"no model card in {folder}: train and calibrate first")
        card = json.loads(card_path.read_text())
        settings = get_settings()
        values = value_model_names(card) if settings.surrogate_value_model else []
        memories = [folder / m if m and settings.surrogate_residual_memory else None
                    for m in value_memory_names(card)][:len(values)]
        return cls([folder / m for m in card["members"]], card=card, device=device,
                   mc_samples=mc_samples, value_model=[folder / v for v in values],
                   value_memory=memories)

    def graph(self, structure: Structure) -> Data:
        g = structure_to_graph(structure, self.spec)
        return Data(z=g["z"], edge_index=g["edge_index"], edge_vec=g["edge_vec"],
                    num_nodes=len(g["z"]))

    def _member(self, model: Crysformer, blob: dict, batch: GraphBatch,
                masks: list[list[torch.Tensor]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One ensemble member's mean and MC variance on one batch, (n, targets), physical
        units, left on the device (copying back would wait for the GPU after every job);
        ``masks``: the dropout masks of each MC pass (None: dropout off)."""
        with torch.inference_mode():
            mean_t, std_t = blob["norm_mean"].to(self.device), blob["norm_std"].to(self.device)
            args = (batch.z, batch.edge_index, batch.edge_vec, batch.batch, batch.num_graphs)
            memory = self._memories.get(id(blob))
            if memory is not None:  # a value model (dropout off) and its residuals
                out, features = model(*args, features=True)
                pred = out * std_t + mean_t + memory.correction(features)
                return pred, torch.zeros_like(pred)
            if masks is None:
                pred = model(*args) * std_t + mean_t
                return pred, torch.zeros_like(pred)
            samples = []
            for pass_masks in masks:
                with replaying(pass_masks):
                    samples.append(model(*args))
            stacked = torch.stack(samples) * std_t + mean_t
            return stacked.mean(0), stacked.var(0, unbiased=False)

    def _masks(self, jobs: list[tuple[Crysformer, dict, GraphBatch]]
               ) -> Iterator[list[list[torch.Tensor]] | None]:
        """Each job's MC-dropout masks, drawn job by job (lazily: they are big) from one
        generator seeded with ``Settings.surrogate_mc_seed``: the masks the passes drew
        when they ran one after another under that seed, so the same inputs in the same
        batches give the same values and sigmas, and the caller's random state is not
        touched."""
        if not self.mc_samples:
            yield from (None for _ in jobs)
            return
        gen = torch.Generator().manual_seed(get_settings().surrogate_mc_seed)
        value_models = {id(m) for m, _ in self.values}
        for model, _, batch in jobs:
            if id(model) in value_models:
                yield None  # a value model: one deterministic pass
                continue
            shapes = model.dropout_shapes(batch.num_nodes, batch.num_edges)
            yield [draw_masks(shapes, model.cfg.dropout, gen)
                   for _ in range(self.mc_samples)]

    @property
    def default_batch_size(self) -> int:
        s = get_settings()
        return s.predict_batch_size_cpu if self.device.type == "cpu" else \
            s.predict_batch_size_gpu

    def member_outputs(self, graphs: Sequence[Data | dict], batch_size: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Each member's mean and MC-dropout variance, each (members, N, targets), physical
        units, before calibration: the parts a sigma is made of, kept apart for studies."""
        means, variances, _ = self.outputs(graphs, batch_size, with_value=False)
        return means, variances

    def outputs(self, graphs: Sequence[Data | dict], batch_size: int | None = None, *,
                with_value: bool = True, graph_k: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`member_outputs` plus the value model's prediction (N, targets), None
        without a value model (or ``with_value=False``); a value pair's weighted value.
        In :attr:`values_only` mode the pair's predictions stand in for the members' means
        (variances zero) and the members are not run. ``graph_k``: see :meth:`raw_outputs`."""
        if self.values_only and with_value:
            _, _, values = self.raw_outputs(graphs, batch_size, members=False,
                                            graph_k=graph_k)
            return values, np.zeros_like(values), weighted_values(values, self.value_weights)
        means, variances, values = self.raw_outputs(graphs, batch_size, values=with_value,
                                                    graph_k=graph_k)
        point = None if values is None else weighted_values(values, self.value_weights)
        return means, variances, point

    def raw_outputs(self, graphs: Sequence[Data | dict], batch_size: int | None = None, *,
                    members: bool = True, values: bool = True, graph_k: int | None = None
                    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """The members' means and MC variances, each (members, N, targets), and each value
        model's prediction (value models, N, targets), in physical units, before any
        weighting or calibration; None for the parts not asked for (or absent).
        ``graph_k``: the neighbours the graphs were built with (default ``spec.k``, the
        most any model reads; :attr:`mode_spec`'s k for graphs of the current mode).

        On CPU the members run side by side, one thread each: coarse-grained parallelism
        that, unlike OpenMP threads inside each op, does not collapse when other processes
        share the cores (measured 8x faster per forward on a loaded 2-core machine). MC
        passes replay masks drawn up front (mc_dropout.py), so they run side by side too."""
        batch_size = batch_size or self.default_batch_size
        batches = [collate_graphs(graphs[i:i + batch_size]).to(self.device)
                   for i in range(0, len(graphs), batch_size)]
        # one job per (member, batch): balances 3 members over 2 cores
        models = list(zip(self.models, self.blobs, strict=True)) if members else []
        n_members = len(models)
        if values:
            models += self.values
        built_k = self.spec.k if graph_k is None else graph_k
        for _, b in models:
            if int(b["graph_spec"]["k"]) > built_k:
                raise MatcoupleError(f"graphs built with {built_k} neighbours cannot serve a "
                                     f"model trained on {b['graph_spec']['k']}")
        jobs = [(m, b, self._input(b, batch, built_k)) for m, b in models
                for batch in batches]
        parallel = min(len(jobs), os.cpu_count() or 1) if self.device.type == "cpu" else 1
        outs = self._run(jobs, parallel)
        per = len(batches)
        means = torch.stack([torch.cat([o[0] for o in outs[k:k + per]])
                             for k in range(0, len(outs), per)])
        variances = torch.stack([torch.cat([o[1] for o in outs[k:k + per]])
                                 for k in range(0, len(outs), per)])
        means, variances = means.cpu().numpy(), variances.cpu().numpy()
        value_preds = means[n_members:] if len(models) > n_members else None
        if not n_members:
            return None, None, value_preds
        return means[:n_members], variances[:n_members], value_preds

    def _input(self, blob: dict, batch: GraphBatch, built_k: int) -> GraphBatch:
        """The batch (built with ``built_k`` neighbours) as the model of ``blob`` was
        trained to read it."""
        k = int(blob["graph_spec"]["k"])
        return batch if k == built_k else batch.nearest(k, self.spec.tie_tol)

    def _run(self, jobs: list[tuple[Crysformer, dict, GraphBatch]], parallel: int
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Jobs in order, on ``parallel`` threads of one torch thread each; masks are drawn
        in the main thread, a few jobs ahead of the workers."""
        masks = self._masks(jobs)
        if parallel <= 1:
            return [self._member(*job, m) for job, m in zip(jobs, masks, strict=True)]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(parallel) as pool:
                pending: deque[Future] = deque()
                outs = []
                for job, m in zip(jobs, masks, strict=True):
                    pending.append(pool.submit(self._member, *job, m))
                    if len(pending) > 2 * parallel:
                        outs.append(pending.popleft().result())
                return outs + [f.result() for f in pending]
        finally:
            torch.set_num_threads(threads)

    def predict_graphs(self, graphs: Sequence[Data | dict], batch_size: int | None = None,
                       *, graph_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and calibrated sigma, each (N, targets), in physical units; ``graph_k``:
        see :meth:`raw_outputs`."""
        means, variances, point = self.outputs(graphs, batch_size, graph_k=graph_k)
        if self.values_only:  # the pair's spread, never below the card's floor
            variances = variances + (self.floors**2)[None, None]
        mean, sigma = ensemble_value_and_sigma(means, variances, point, self.targets,
                                               self.ensemble_weight,
                                               non_negative_rows(graphs, self.targets))
        for j, t in enumerate(self.targets):
            sigma[:, j] *= self.scales[t]
        return mean, sigma

    def predict(self, items: Sequence[tuple[str, Structure | Exception]],
                batch_size: int | None = None, workers: int = 1) -> list[Prediction]:
        """Predict ``(id, structure)`` pairs; an Exception in place of a structure (or one
        raised while building its graph) becomes that row's error. ``workers`` > 1 builds
        the graphs in that many processes (the CPU side of GPU inference); ``batch_size``
        defaults to ``Settings.predict_batch_size_cpu``/``_gpu`` for the device."""
        rows = [Prediction(id=i) for i, _ in items]
        graphs, where = [], []
        todo = [(k, s) for k, (_, s) in enumerate(items)]
        for k, s in todo:
            if isinstance(s, Exception):
                rows[k].error = str(s)
        todo = [(k, s) for k, s in todo if not isinstance(s, Exception)]
        if workers > 1 and len(todo) > 64:
            with ProcessPoolExecutor(workers) as pool:
                # a generator: the workers start on the first chunks while this process
                # is still packing the later ones
                built = list(pool.map(_compact_graph_or_error,
                                      (compact_crystal(s) for _, s in todo),
                                      itertools.repeat(self.mode_spec), chunksize=32))
        else:
            built = [_graph_or_error(s, self.mode_spec) for _, s in todo]
        for (k, _), g in zip(todo, built, strict=True):
            if isinstance(g, str):
                rows[k].error = g
            else:
                graphs.append(g)
                where.append(k)
        if graphs:
            mean, sigma = self.predict_graphs(graphs, batch_size, graph_k=self.mode_spec.k)
            for row_idx, m, s in zip(where, mean, sigma, strict=True):
                rows[row_idx].values = {t: float(v) for t, v in zip(self.targets, m,
                                                                     strict=True)}
                rows[row_idx].sigmas = {t: float(v) for t, v in zip(self.targets, s,
                                                                    strict=True)}
        return rows
