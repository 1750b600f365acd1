"""Training recipes (batch size, peak learning rate) raced for the same wall time (issue 3).

Each recipe runs in its own process, all side by side on one device: it first times its
own training steps while the others do the same (so the timing includes the sharing),
picks the number of epochs whose cosine schedule fits ``--budget-s``, trains from scratch
(or ``--init-from``) and scores its best weights on the validation split. Equal wall time,
not equal epochs, is the fair comparison: a small batch makes more, cheaper steps.
Writes ``OUT/lr_race.json`` and a plot of validation MAE against training time.

    # one H200, ~8 minutes: the race behind Settings.surrogate_train_lr
    python benchmarks/lr_race.py --device cuda --budget-s 460 \\
        --model dropout=0,scalars=144,vectors=36,tensors=16 \\
        --recipe 256:5e-4 --recipe 256:2e-3 --recipe 64:1e-3 --recipe 128:1.5e-3
    # CPU smoke test on the CI subset:
    python benchmarks/lr_race.py --data .../mp2018_ci_subset_512.csv.gz --split-column \\
        ci_split --budget-s 60 --model scalars=16,vectors=8,tensors=4,layers=1 \\
        --recipe 32:1e-3 --recipe 64:2e-3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from _study import base_parser, environment, pyplot, write_json

from matcouple.surrogate.data import load_graphs
from matcouple.surrogate.experiments import (
    epochs_within,
    parse_model_spec,
    run_variant,
    seconds_per_step,
)
from matcouple.surrogate.train import TrainConfig

TARGETS = ("formation_energy_per_atom", "band_gap")


def parser():
    p = base_parser(__doc__, "mp2018", "lr_race")
    p.add_argument("--split-column", default="megnet_split")
    p.add_argument("--recipe", action="append", default=[],
                   help="BATCH:LR, repeat (at least one)")
    p.add_argument("--budget-s", type=float, default=460.0,
                   help="wall time of each recipe, timing included")
    p.add_argument("--init-from", type=Path, default=None)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: BATCH:LR
    return p


def _recipe(text: str) -> tuple[int, float]:
    batch, _, lr = text.partition(":")
    try:
        return int(batch), float(lr)
    except ValueError:
        sys.exit(f"--recipe {text!r}: expected BATCH:LR, e.g. 256:2e-3")


def run_one(a) -> None:
    """One recipe (a child process): time, fit the schedule into the budget, train."""
    start = time.monotonic()
    batch, lr = _recipe(a.one)
    cfg = TrainConfig(data=str(a.data), targets=TARGETS, split_column=a.split_column,
                      batch_size=batch, lr=lr, seed=a.seed, amp=a.amp,
                      limit_train=a.limit_train, model=parse_model_spec(a.model))
    step_s, n_train = seconds_per_step(cfg, device=a.device, cache_dir=a.cache_dir)
    left = a.budget_s - (time.monotonic() - start)
    epochs = epochs_within(left, n_train, batch, step_s)
    cfg = replace(cfg, epochs=epochs, warmup_epochs=min(1.0, epochs / 10))
    name = f"b{batch}_lr{lr:g}"
    print(f"{name}: {step_s * 1000:.0f} ms/step side by side -> {epochs} epochs", flush=True)
    run = run_variant(name, cfg, a.out, device=a.device, init_from=a.init_from,
                      minutes=(a.budget_s - (time.monotonic() - start)) / 60,
                      cache_dir=a.cache_dir, workers=a.workers, progress=False)
    (a.out / f"{name}.json").write_text(json.dumps(
        {"batch": batch, "lr": lr, "step_s": step_s, "epochs_planned": epochs,
         **run.as_dict()}, indent=1))


def main() -> None:
    a = parser().parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.one:
        run_one(a)
        return
    if not a.recipe:
        sys.exit("give at least one --recipe BATCH:LR")
    recipes = [_recipe(r) for r in a.recipe]
    for split, limit in (("train", a.limit_train), ("val", None)):  # the graph cache, once
        load_graphs(a.data, TARGETS, split_column=a.split_column, split=split, limit=limit,
                    cache_dir=a.cache_dir, workers=a.workers, progress=not a.quiet)
    children = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--one",
                                  f"{b}:{lr}"]) for b, lr in recipes]
    codes = [c.wait() for c in children]
    results = []
    for (b, lr), code in zip(recipes, codes, strict=True):
        path = a.out / f"b{b}_lr{lr:g}.json"
        if code or not path.exists():
            print(f"recipe {b}:{lr} failed (exit {code})")
            continue
        results.append(json.loads(path.read_text()))
    for r in results:
        print(f"batch {r['batch']:4d} lr {r['lr']:.1e}: {r['epochs']} epochs, "
              f"{r['step_s'] * 1000:.0f} ms/step -> val MAE " +
              "  ".join(f"{t} {v:.4f}" for t, v in r["val_mae"].items()))
    write_json(a.out, "lr_race.json", {"env": environment(a.device),
                                        "budget_s": a.budget_s, "model": a.model,
                                        "runs": results})
    _plot(results, a.out / "lr_race.png")
    sys.exit(1 if len(results) < len(recipes) else 0)


def _plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(5 * len(TARGETS), 4))
    for ax, t in zip(axes, TARGETS, strict=True):
        for r in results:
            h = r["history"]
            ax.plot([e["elapsed_s"] for e in h], [e[f"val_mae_{t}"] for e in h], "o-",
                    label=f"batch {r['batch']}, lr {r['lr']:g}")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel(f"val MAE {t}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
