"""Resumable training of the crystal denoiser, in wall-clock chunks.

``python -m matcouple.directive.train --dataset perov5 --minutes 8 --out ckpt/perov5.pt``
trains for at most 8 minutes and saves; the same command again resumes from the
checkpoint (weights, optimizer, EMA, step, RNG states, hyper-parameters and the hash of
the training data, which must match). The learning rate follows a cosine over the total
training-time budget (``--budget-minutes``), so chunks add up to one schedule.
``--export`` writes the small release file (EMA weights + metadata, no optimizer) that
``matcouple generate`` loads. CUDA with bf16 autocast when present, else CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from matcouple.directive.data import CrystalSet, load_training_data
from matcouple.directive.diffusion import LossWeights, Schedules, add_noise, diffusion_loss
from matcouple.directive.model import (
    CrystalDenoiser,
    DenoiserConfig,
    fully_connected_edges,
    parameter_count,
)
from matcouple.distributed import current, scaled_lr
from matcouple.errors import CheckpointError
from matcouple.settings import get_settings

CHECKPOINT_FORMAT = "matcouple-generator-v1"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run; stored in the checkpoint."""

    datasets: list[str] = field(default_factory=lambda: ["perov5"])
    max_atoms: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 300
    budget_minutes: float = 15.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # Share of crystals trained with their composition given (CSP); the rest ab initio.
    csp_fraction: float = 1.0
    loss_lattice: float = 1.0
    loss_frac: float = 1.0
    loss_types: float = 20.0
    diffusion_steps: int = 1000
    sigma_min: float = 0.005
    sigma_max: float = 0.5
    # Langevin step of the F corrector at sampling time (DiffCSP's per-data-set values).
    step_lr: float = 5e-7
    seed: int = 0
    limit: int | None = None
    # Data-parallel: batch_size is per GPU; lr is scaled for the global batch by this rule.
    lr_scaling: str = field(default_factory=lambda: get_settings().ddp_lr_scaling)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_step_lr(datasets: list[str]) -> float:
    """DiffCSP's corrector step sizes: Perov-5 5e-7, Carbon-24 5e-6, MP-20 1e-5."""
    if datasets == ["perov5"]:
        return 5e-7
    if datasets == ["carbon24"]:
        return 5e-6
    return 1e-5


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def learning_rate(config: TrainConfig, step: int, elapsed_s: float) -> float:
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    progress = min(1.0, elapsed_s / (60.0 * config.budget_minutes))
    cosine = config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
    return warm * cosine


@dataclass
class TrainState:
    """Everything that changes while training, so a chunk can resume where one stopped."""

    model: CrystalDenoiser
    ema: CrystalDenoiser
    optimizer: torch.optim.Optimizer
    step: int = 0
    elapsed_s: float = 0.0
    net: torch.nn.Module | None = None  # the DDP wrapper of `model` in a data-parallel run


def _build(config: TrainConfig, model_config: DenoiserConfig,
           device: torch.device) -> TrainState:
    model = CrystalDenoiser(model_config).to(device)
    ema = CrystalDenoiser(model_config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    return TrainState(model, ema, optimizer)


def _metadata(config: TrainConfig, model_config: DenoiserConfig,
              data: CrystalSet) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": model_config.as_dict(),
        "train_config": asdict(config),
        "data_hash": data.data_hash,
        "max_atoms": config.max_atoms,
        "size_histogram": data.size_histogram(config.max_atoms).tolist(),
        "elements": data.elements(),
        "n_train": len(data),
        "lattice_abs_max": float(data.lattice.abs().max()),
    }


def save_checkpoint(path: Path, state: TrainState, meta: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a kill mid-save keeps the previous one."""
    payload = {
        **meta,
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "step": state.step,
        "elapsed_s": state.elapsed_s,
        "rng_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        payload["rng_cuda"] = torch.cuda.get_rng_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a clear error if missing or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"generator checkpoint {path} not found; train one with `matcouple train "
            "generator` or set MATCOUPLE_GENERATOR_CHECKPOINT to an existing file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read generator checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a matcouple generator checkpoint "
                              f"(expected format {CHECKPOINT_FORMAT})")
    return payload


def _resume(path: Path, config: TrainConfig, data: CrystalSet,
            device: torch.device) -> tuple[TrainState, TrainConfig, DenoiserConfig]:
    payload = read_checkpoint(path)
    if "optimizer" not in payload:
        raise CheckpointError(f"{path} is an exported release file; resume from the "
                              "training checkpoint instead")
    if payload["data_hash"] != data.data_hash:
        raise CheckpointError(
            f"{path} was trained on other data (hash {payload['data_hash']}, now "
            f"{data.data_hash}); use a new --out or the same --dataset/--max-atoms")
    saved = TrainConfig.from_dict(payload["train_config"])
    model_config = DenoiserConfig(**payload["model_config"])
    state = _build(saved, model_config, device)
    state.model.load_state_dict(payload["model"])
    state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.step = int(payload["step"])
    state.elapsed_s = float(payload["elapsed_s"])
    torch.set_rng_state(payload["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in payload:
        torch.cuda.set_rng_state(payload["rng_cuda"])
    # The budget may be extended on resume; the rest of the recipe is the checkpoint's.
    saved.budget_minutes = config.budget_minutes
    return state, saved, model_config


class _StopRequest:
    """SIGTERM/SIGINT end the chunk after the current step, and the checkpoint is saved."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_step(state: TrainState, data: CrystalSet, schedules: Schedules,
               config: TrainConfig, weights: LossWeights, device: torch.device,
               generator: torch.Generator, counts_cpu: torch.Tensor,
               starts_cpu: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimisation step on a random batch; returns the loss terms (as tensors)."""
    model = state.model
    idx = torch.randint(0, len(data), (config.batch_size,), generator=generator)
    b = data.select(idx, counts_cpu, starts_cpu)
    edges = tuple(e.to(device, non_blocking=True)
                  for e in fully_connected_edges(counts_cpu[idx]))
    n_types = model.config.n_types
    onehot = torch.nn.functional.one_hot(b.atomic_numbers - 1, n_types).float()
    t = torch.randint(1, schedules.steps + 1, (len(idx),), device=device)
    known = torch.rand(len(idx), device=device) < config.csp_fraction
    noised = add_noise(schedules, t, b.lattice, b.frac, onehot, b.batch, known)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = (state.net or model)(noised.lattice, noised.frac, noised.types,
                                   t.float() / schedules.steps, b.batch, b.num_atoms, known,
                                   edges)
    losses = diffusion_loss(*out, noised, b.batch, known, weights)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(config, state.step, state.elapsed_s)
    state.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    state.optimizer.step()
    # EMA with warm-up: early on the average must not hold on to the random init.
    decay = min(config.ema_decay, (1 + state.step) / (10 + state.step))
    with torch.no_grad():
        for p_ema, p in zip(state.ema.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p, 1 - decay)
    state.step += 1
    return {k: v.detach() for k, v in losses.items()}


def train(
    out: Path,
    config: TrainConfig | None = None,
    model_config: DenoiserConfig | None = None,
    *,
    minutes: float = 8.0,
    max_steps: int | None = None,
    device: str | None = None,
    save_every_minutes: float = 2.0,
    data: CrystalSet | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) until ``minutes`` pass, ``max_steps`` is reached or the budget ends.

    ``minutes`` is wall time from the call, data loading included, so a chunk fits a
    fixed job length; the learning-rate budget counts training time only.

    Returns a summary: steps, elapsed time, mean losses of the first and last log windows.
    In a data-parallel run (:mod:`matcouple.distributed`) every rank calls this with its own
    random batches; the losses logged are averaged over ranks, rank 0's clock sets the
    learning rate and the stop for all, and only rank 0 writes the checkpoint and log.
    """
    start = time.monotonic()  # the chunk's wall clock includes loading the data
    out = Path(out)
    config = config or TrainConfig()
    ctx = current()
    dev = ctx.device if ctx.enabled else pick_device(device)
    progress = progress and ctx.is_main
    if data is None:
        with ctx.main_first():  # rank 0 parses and caches the set, the others read it
            data = load_training_data(config.datasets, "train", config.max_atoms,
                                      config.limit)
    if out.exists():
        state, config, model_config = _resume(out, config, data, dev)
    else:
        torch.manual_seed(config.seed)
        model_config = model_config or DenoiserConfig()
        state = _build(config, model_config, dev)
    meta = {**_metadata(config, model_config, data), "device": _device_name(dev)}
    counts_cpu, starts_cpu = data.num_atoms.clone(), data.offsets.clone()
    data = data.to(dev)
    schedules = Schedules.build(config.diffusion_steps, config.sigma_min,
                                config.sigma_max).to(dev)
    weights = LossWeights(config.loss_lattice, config.loss_frac, config.loss_types)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + state.step
                                              + ctx.rank * 7_919_993)
    state.net = ctx.wrap(state.model)
    if ctx.enabled:  # each rank its own noise draws
        torch.manual_seed(ctx.seed(config.seed, state.step))
    step_config = replace(config, lr=scaled_lr(config.lr, ctx.world_size, config.lr_scaling))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    log_path = out.with_name(out.stem + ".log.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    last_save = start
    budget_s = 60.0 * config.budget_minutes
    window: list[dict[str, float]] = []
    first_window: dict[str, float] | None = None
    last_window: dict[str, float] | None = None
    bar = tqdm(total=int(minutes * 60), unit="s", disable=not progress,
               desc=f"training {out.name} from step {state.step}")
    state.model.train()
    stop = _StopRequest()
    with stop, open(log_path if ctx.is_main else os.devnull, "a") as log:
        while True:
            now = time.monotonic()
            chunk_s = now - start
            done = chunk_s >= minutes * 60 or state.elapsed_s >= budget_s or stop.requested
            if ctx.enabled:  # rank 0's clock and signals decide for every rank
                done, state.elapsed_s = ctx.from_main([done, state.elapsed_s])
            if done:
                break
            if max_steps is not None and state.step >= max_steps:
                break
            t0 = time.monotonic()
            losses = train_step(state, data, schedules, step_config, weights, dev, generator,
                                counts_cpu, starts_cpu)
            window.append(losses)
            if len(window) == 50 or (max_steps is not None and state.step >= max_steps):
                sums = ctx.sum(torch.stack([sum(w[k] for w in window) for k in window[0]]))
                mean = {k: float(v) / (len(window) * ctx.world_size)
                        for k, v in zip(window[0], sums, strict=True)}
                first_window = first_window or mean
                last_window = mean
                log.write(json.dumps({"step": state.step, "elapsed_s": round(state.elapsed_s, 3),
                                      "lr": state.optimizer.param_groups[0]["lr"], **mean}) + "\n")
                log.flush()
                bar.set_postfix(step=state.step, loss=f"{mean['loss']:.3f}")
                window = []
            state.elapsed_s += time.monotonic() - t0
            bar.n = int(min(minutes * 60, time.monotonic() - start))
            if state.step % 20 == 0:
                bar.refresh()
            if time.monotonic() - last_save > 60 * save_every_minutes:
                if ctx.is_main:
                    save_checkpoint(out, state, meta)
                last_save = time.monotonic()
    bar.close()
    if ctx.is_main:
        save_checkpoint(out, state, meta)
    return {"checkpoint": str(out), "step": state.step, "elapsed_s": state.elapsed_s,
            "budget_s": budget_s, "parameters": parameter_count(state.model),
            "first_losses": first_window, "last_losses": last_window, "log": str(log_path),
            "device": str(dev), "n_train": len(data), "gpus": ctx.world_size,
            "global_batch": config.batch_size * ctx.world_size}


def export_release(checkpoint: Path, release: Path, half: bool = False) -> dict[str, Any]:
    """Write the EMA weights and metadata (no optimizer) as the file generation loads."""
    payload = read_checkpoint(checkpoint)
    weights = payload["ema"] if "ema" in payload else payload["model"]
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    keep = ("format", "model_config", "train_config", "data_hash", "max_atoms",
            "size_histogram", "elements", "n_train", "lattice_abs_max", "step", "elapsed_s",
            "device")
    slim = {k: payload[k] for k in keep if k in payload}
    slim["model"] = weights
    release = Path(release)
    release.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, release)
    return {"release": str(release), "bytes": release.stat().st_size, "step": slim["step"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="perov5",
                        help="training set(s), '+'-joined: perov5, mp2018, carbon24")
    parser.add_argument("--out", type=Path, required=True, help="training checkpoint path")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall time of this chunk")
    parser.add_argument("--budget-minutes", type=float, default=15.0,
                        help="total training time the learning-rate schedule spans")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--csp-fraction", type=float, default=None,
                        help="share of crystals trained with composition given "
                             "(default 1 for perov5, 0.5 otherwise)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="first N training rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs of this node in data parallel (0: CPU); batch is per GPU")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None,
                        help="process-group backend (gloo: CPU processes, for tests)")
    parser.add_argument("--export", type=Path, default=None,
                        help="after training, write the release file here")
    args = parser.parse_args(argv)
    datasets = args.dataset.split("+")
    config = TrainConfig(datasets=datasets, budget_minutes=args.budget_minutes,
                         seed=args.seed, limit=args.limit, step_lr=default_step_lr(datasets),
                         csp_fraction=(args.csp_fraction if args.csp_fraction is not None
                                       else 1.0 if datasets == ["perov5"] else 0.5))
    if args.batch_size:
        config.batch_size = args.batch_size
    if args.lr:
        config.lr = args.lr
    model_config = DenoiserConfig(hidden=args.hidden, layers=args.layers)
    if args.gpus is None and args.backend is None:
        summary = train(args.out, config, model_config, minutes=args.minutes,
                        max_steps=args.max_steps, device=args.device)
    else:
        from matcouple.directive.parallel import train_on_gpus

        summary = train_on_gpus(args.out, config, model_config, gpus=args.gpus or 0,
                                backend=args.backend, device=args.device,
                                minutes=args.minutes, max_steps=args.max_steps)
    if args.export:
        summary["export"] = export_release(args.out, args.export)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
