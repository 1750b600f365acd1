"""Validation MAE per epoch of several training runs, side by side (issue 3).

Reads the JSON a GPU run brings back (``{"name", "train_config", "history"}``, or a whole
training checkpoint), prints each run's best epoch and writes a plot with one panel per
target, next to ``--out`` as PNG, and the summary as JSON.

    python benchmarks/plot_histories.py benchmarks/records/2026-12-03/gpu_race_s20/*.json \\
        --out benchmarks/records/2026-12-03/gpu_race_s20/race
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _study import pyplot

TARGETS = ("formation_energy_per_atom", "band_gap")


def load_run(path: Path) -> dict:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    state = torch.load(path, weights_only=True, map_location="cpu")
    return {"name": path.stem, "train_config": state["train_config"],
            "history": state["history"]}


def summarise(run: dict) -> dict:
    """The epoch with the lowest E_f MAE and the recipe that differs between runs."""
    h = run["history"]
    best = min(h, key=lambda r: r["val_mae_formation_energy_per_atom"])
    tc = run.get("train_config", {})
    return {"name": run.get("name"), "epochs": len(h), "best_epoch": best["epoch"],
            **{f"best_{t}": best[f"val_mae_{t}"] for t in TARGETS},
            **{k: tc.get(k) for k in ("batch_size", "lr", "weight_decay", "ema_decay",
                                      "strain_noise", "displacement_noise", "epochs")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output stem (.json, .png)")
    a = p.parse_args()
    runs = [load_run(f) for f in a.runs]
    rows = [summarise(r) for r in runs]
    for r in rows:
        print(f"{r['name']}: best epoch {r['best_epoch']}/{r['epochs']}  E_f "
              f"{r['best_formation_energy_per_atom']:.4f}  gap {r['best_band_gap']:.4f}  "
              f"(batch {r['batch_size']}, lr {r['lr']}, wd {r['weight_decay']}, strain "
              f"{r['strain_noise']}, displacement {r['displacement_noise']})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(11, 4))
    for run in runs:
        ep = [r["epoch"] for r in run["history"]]
        for ax, t in zip(axes, TARGETS, strict=True):
            ax.plot(ep, [r[f"val_mae_{t}"] for r in run["history"]], marker="o", ms=3,
                    label=run.get("name"))
    for ax, t, unit in zip(axes, TARGETS, ("eV/atom", "eV"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"val MAE {t} [{unit}]")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=120)
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
