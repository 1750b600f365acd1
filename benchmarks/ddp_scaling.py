"""Data-parallel scaling of training on the GPUs of one node (Crysformer and the generator).

For each N in ``--gpus`` (default: 1, 2, 4, 8 up to the GPUs present) it runs the real
training code (``train_on_gpus``; N = 1 is the plain single-process run, no DDP) and
measures:
  * surrogate throughput, graphs/s: a first epoch warms up (kernels, allocator, loader
    workers), the second, of ``--steps`` steps per GPU at the per-GPU batch, is timed
    (training loop only, validation excluded);
  * generator throughput, structures/s: ``--gen-warmup`` steps, then ``--gen-steps`` timed
    steps (from the training log, whose entries every 50 steps follow a device sync);
  * scaling efficiency = thr(N) / (N x thr(1)) (target >= 0.85 at 4 GPUs);
  * validation MAE of Crysformer after ``--mae-epochs`` epochs on N GPUs (per-GPU batch
    fixed, global batch N times larger, learning rate by the sqrt rule) vs the 1-GPU run,
    with the seed-to-seed spread of two 1-GPU runs as the noise level.
Prints the figures and writes ``benchmarks/results/ddp_scaling.json`` with a plot beside.

    python3 benchmarks/ddp_scaling.py --gpus 1                # one GPU now
    python3 benchmarks/ddp_scaling.py --gpus 1 2 4 8          # a node with 8 GPUs
    python3 benchmarks/ddp_scaling.py --device cpu --backend gloo --gpus 2   # tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.directive.model import DenoiserConfig  # noqa: E402
from matcouple.directive.parallel import train_on_gpus as train_generator  # noqa: E402
from matcouple.directive.train import TrainConfig as GeneratorConfig  # noqa: E402
from matcouple.settings import get_settings  # noqa: E402
from matcouple.surrogate.parallel import train_on_gpus as train_surrogate  # noqa: E402
from matcouple.surrogate.train import TrainConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TINY_SURROGATE = {"scalars": 8, "vectors": 4, "tensors": 4, "layers": 1, "heads": 4, "rbf": 8}
TINY_GENERATOR = {"hidden": 16, "layers": 1, "frequencies": 4, "time_dim": 8}


def _gpus(a: argparse.Namespace) -> int:
    """What ``train_on_gpus`` is told: 0 means CPU for the plain single-process run."""
    return 0 if a.device == "cpu" else 1


def _train_surrogate(a, cfg: TrainConfig, n: int, out: Path) -> dict:
    backend = a.backend if n > 1 else None
    return train_surrogate(cfg, out, gpus=n if n > 1 else _gpus(a), backend=backend,
                           progress=False, cache_dir=a.cache_dir)


def surrogate_throughput(a, n: int, limit: int, folder: Path) -> dict:
    cfg = TrainConfig(data=str(a.data), split_column=a.split_column, epochs=2,
                      batch_size=a.batch_size, limit_train=limit, seed=0, model=a.model,
                      amp=a.amp)
    state = _train_surrogate(a, cfg, n, folder / f"thr-{n}.pt")
    timed = state["history"][-1]
    return {"gpus": n, "graphs": timed["graphs"], "train_s": timed["train_s"],
            "steps_per_gpu": -(-timed["graphs"] // (a.batch_size * n)),
            "graphs_per_s": timed["graphs"] / timed["train_s"]}


def surrogate_mae(a, n: int, seed: int, folder: Path) -> dict:
    cfg = TrainConfig(data=str(a.data), split_column=a.split_column, epochs=a.mae_epochs,
                      batch_size=a.batch_size, limit_train=a.mae_limit, seed=seed,
                      model=a.model, amp=a.amp)
    t0 = time.monotonic()
    state = _train_surrogate(a, cfg, n, folder / f"mae-{n}-{seed}.pt")
    last = state["history"][-1]
    return {"gpus": n, "seed": seed, "epochs": state["epoch"], "wall_s": time.monotonic() - t0,
            "val_mae": {k[len("val_mae_"):]: v for k, v in last.items()
                        if k.startswith("val_mae_")}}


def generator_throughput(a, n: int, folder: Path) -> dict:
    config = GeneratorConfig(datasets=[a.gen_dataset], batch_size=a.gen_batch_size,
                             budget_minutes=1e6, seed=0, limit=a.gen_limit)
    out = folder / f"gen-{n}.pt"
    summary = train_generator(out, config, DenoiserConfig(**a.gen_model),
                              gpus=n if n > 1 else _gpus(a), backend=a.backend if n > 1 else None,
                              minutes=a.gen_minutes, max_steps=a.gen_warmup + a.gen_steps,
                              progress=False)
    log = [json.loads(line) for line in Path(summary["log"]).read_text().splitlines()]
    start = next(r for r in log if r["step"] >= a.gen_warmup)
    end = log[-1]
    structures = (end["step"] - start["step"]) * a.gen_batch_size * n
    seconds = end["elapsed_s"] - start["elapsed_s"]
    return {"gpus": n, "steps": end["step"] - start["step"], "seconds": seconds,
            "structures_per_s": structures / seconds if seconds > 0 else float("nan")}


def _efficiency(rows: list[dict], key: str) -> None:
    base = next((r[key] for r in rows if r["gpus"] == 1), None)
    for r in rows:
        r["efficiency"] = r[key] / (r["gpus"] * base) if base else None


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, key in (("surrogate", "graphs_per_s"), ("generator", "structures_per_s")):
        rows = result.get(name, {}).get("throughput", [])
        if rows:
            ns = [r["gpus"] for r in rows]
            axes[0].plot(ns, [r["efficiency"] or 0 for r in rows], "o-", label=name)
            axes[1].plot(ns, [r[key] / rows[0][key] for r in rows], "o-", label=name)
    for ax, label in ((axes[0], "scaling efficiency"), (axes[1], "speed-up over 1 GPU")):
        ax.set_xlabel("GPUs")
        ax.set_xticks(result["gpus"])
        ax.set_ylabel(label)
        ax.legend()
    axes[0].axhline(0.85, color="k", ls="--", lw=1)
    fig.suptitle(f"data-parallel training, {result['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=None)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None)
    p.add_argument("--only", choices=["surrogate", "generator"], default=None)
    p.add_argument("--data", type=Path, default=settings.data_dir / settings.datasets["mp2018"])
    p.add_argument("--split-column", default="megnet_split")
    p.add_argument("--batch-size", type=int, default=64, help="surrogate batch per GPU")
    p.add_argument("--steps", type=int, default=60, help="timed surrogate steps per GPU")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--mae-epochs", type=int, default=4)
    p.add_argument("--mae-limit", type=int, default=8192, help="training rows for the MAE runs")
    p.add_argument("--no-mae", action="store_true")
    p.add_argument("--gen-dataset", default="perov5")
    p.add_argument("--gen-batch-size", type=int, default=512, help="generator batch per GPU")
    p.add_argument("--gen-warmup", type=int, default=50, help="multiple of 50")
    p.add_argument("--gen-steps", type=int, default=300, help="multiple of 50")
    p.add_argument("--gen-minutes", type=float, default=8.0)
    p.add_argument("--gen-limit", type=int, default=None)
    p.add_argument("--cache-dir", type=Path, default=settings.graph_cache_dir)
    p.add_argument("--smoke", action="store_true",
                   help="tiny models and data (checks the script); the default on CPU")
    p.add_argument("--full", action="store_true", help="full sizes even on the CPU")
    p.add_argument("--out", type=Path, default=RESULTS / "ddp_scaling.json")
    a = p.parse_args()
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.backend = a.backend or ("nccl" if a.device == "cuda" else "gloo")
    a.model, a.gen_model = {}, {}
    a.smoke = a.smoke or (a.device == "cpu" and not a.full)
    if a.smoke:
        a.data = settings.data_dir / settings.datasets["mp2018-ci"]
        a.split_column, a.batch_size, a.steps = "ci_split", 8, 3
        a.mae_epochs, a.mae_limit = 1, 48
        a.gen_batch_size, a.gen_warmup, a.gen_steps, a.gen_limit = 8, 50, 50, 64
        a.model, a.gen_model = TINY_SURROGATE, TINY_GENERATOR
    available = torch.cuda.device_count() if a.device == "cuda" else os.cpu_count() or 1
    gpus = sorted(set(a.gpus or [n for n in (1, 2, 4, 8) if n <= max(available, 1)]))
    if 1 not in gpus:
        gpus = [1, *gpus]  # efficiency needs the 1-GPU throughput
    result: dict = {
        "device": a.device, "backend": a.backend, "gpus": gpus,
        "device_name": torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor()
        or "cpu", "gpus_present": torch.cuda.device_count(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "smoke": a.smoke, "lr_scaling": settings.ddp_lr_scaling,
    }
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        folder = Path(tmp)
        if a.only in (None, "surrogate"):
            limit = a.steps * a.batch_size * max(gpus)
            rows = []
            for n in gpus:
                rows.append(surrogate_throughput(a, n, limit, folder))
                print(f"surrogate {n} GPU(s): {rows[-1]['graphs_per_s']:.1f} graphs/s "
                      f"({rows[-1]['graphs']} graphs in {rows[-1]['train_s']:.1f} s)", flush=True)
            _efficiency(rows, "graphs_per_s")
            result["surrogate"] = {"per_gpu_batch": a.batch_size, "train_rows": limit,
                                   "model": a.model or "default", "amp": a.amp,
                                   "throughput": rows}
            if not a.no_mae:
                base = [surrogate_mae(a, 1, seed, folder) for seed in (0, 1)]
                mae = [*base, *(surrogate_mae(a, n, 0, folder) for n in gpus if n > 1)]
                targets = list(base[0]["val_mae"])
                noise = {t: abs(base[0]["val_mae"][t] - base[1]["val_mae"][t]) for t in targets}
                for r in mae:
                    r["diff_vs_1gpu"] = {t: r["val_mae"][t] - base[0]["val_mae"][t]
                                         for t in targets}
                    r["within_noise"] = all(abs(r["diff_vs_1gpu"][t]) <= 2 * noise[t]
                                            for t in targets)
                    print(f"surrogate MAE {r['gpus']} GPU(s) seed {r['seed']}: " + "  ".join(
                        f"{t} {v:.4f}" for t, v in r["val_mae"].items()), flush=True)
                result["surrogate"]["mae"] = {"epochs": a.mae_epochs, "train_rows": a.mae_limit,
                                              "seed_noise": noise, "runs": mae}
        if a.only in (None, "generator"):
            rows = []
            for n in gpus:
                rows.append(generator_throughput(a, n, folder))
                print(f"generator {n} GPU(s): {rows[-1]['structures_per_s']:.1f} structures/s",
                      flush=True)
            _efficiency(rows, "structures_per_s")
            result["generator"] = {"per_gpu_batch": a.gen_batch_size, "dataset": a.gen_dataset,
                                   "model": a.gen_model or "default", "throughput": rows}
    for name in ("surrogate", "generator"):
        for r in result.get(name, {}).get("throughput", []):
            print(f"{name}: {r['gpus']} GPU(s) efficiency {r['efficiency']:.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    _plot(result, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
