"""Data-size study (paper Fig. 5): validation MAE of Crysformer vs training-set size.

Trains the two-head model on the first N rows (a seeded shuffle, nested subsets) of the MP
2018.6.1 MEGNet train split for each N in ``--sizes`` under one budget per size (the same
number of optimizer steps, ``--steps``, so small sets get more epochs, as in a fixed-compute
study; or ``--epochs`` per size), evaluates on the MEGNet validation split, and writes
``OUT/data_size.json`` and the log-log plot of MAE vs N.

    # GPU, ~6 minutes in total:
    python benchmarks/data_size.py --device cuda --sizes 5000,10000,20000,40000 \
        --steps 500 --batch-size 256 --lr 1.5e-3 --out $OUT/data_size
    # CPU smoke test on the CI subset:
    python benchmarks/data_size.py --data .../mp2018_ci_subset_512.csv.gz \
        --split-column ci_split --sizes 64,128 --steps 4 --batch-size 32 \
        --model scalars=16,vectors=8,tensors=4,layers=1
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from _study import base_parser, environment, pyplot, write_json

from matcouple.datasets import read_table
from matcouple.surrogate.experiments import parse_model_spec, run_variant
from matcouple.surrogate.train import TrainConfig

TARGETS = ("formation_energy_per_atom", "band_gap")
SUBSET_COLUMN = "size_study_split"


def nested_subsets_table(source: Path, split_column: str, out_dir: Path, seed: int) -> Path:
    """The train and val rows of ``source`` with train rows in a seeded random order, so
    ``limit_train=N`` takes a random N-subset and larger subsets contain smaller ones."""
    frame = read_table(source)
    train = frame[frame[split_column] == "train"]
    train = train.iloc[np.random.default_rng(seed).permutation(len(train))]
    val = frame[frame[split_column] == "val"]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{Path(source).name.split('.')[0]}_shuffled_seed{seed}.csv.gz"
    if not path.exists():
        keep = ["material_id", "cif", *TARGETS, split_column]
        train[keep].to_csv(path, index=False)
        val[keep].to_csv(path, index=False, mode="a", header=False)
    return path


def main() -> None:
    p = base_parser(__doc__, "mp2018", "data_size")
    p.add_argument("--split-column", default="megnet_split")
    p.add_argument("--sizes", default="5000,10000,20000,40000")
    p.add_argument("--steps", type=int, default=500,
                   help="optimizer steps per size (epochs = steps * batch / N, at least 1)")
    p.add_argument("--epochs", type=int, default=None, help="fixed epochs per size instead")
    p.add_argument("--shuffled-dir", type=Path, default=None,
                   help="where the shuffled table goes (default: the graph cache folder)")
    a = p.parse_args()
    sizes = sorted(int(s) for s in a.sizes.split(","))
    table = nested_subsets_table(a.data, a.split_column, a.shuffled_dir or a.cache_dir,
                                 a.seed)
    base = TrainConfig(data=str(table), targets=TARGETS, split_column=a.split_column,
                       batch_size=a.batch_size, lr=a.lr, seed=a.seed, amp=a.amp,
                       model=parse_model_spec(a.model))
    runs = []
    for n in sizes:
        epochs = a.epochs or max(1, round(a.steps * a.batch_size / n))
        run = run_variant(f"n{n}", replace(base, limit_train=n, epochs=epochs), a.out,
                          device=a.device, cache_dir=a.cache_dir, workers=a.workers,
                          progress=not a.quiet)
        runs.append(run)
        print(f"N={run.n_train}: {epochs} epochs ({math.ceil(run.n_train / a.batch_size) * epochs}"
              f" steps, {run.seconds:.0f}s)  val MAE " +
              "  ".join(f"{t} {v:.4f}" for t, v in run.val_mae.items()), flush=True)
    result = {
        "env": environment(a.device), "data": a.data.name, "budget":
        {"epochs": a.epochs} if a.epochs else {"steps_per_size": a.steps},
        "batch_size": a.batch_size,
        "sizes": [r.n_train for r in runs],
        "val_mae": {t: [r.val_mae[t] for r in runs] for t in TARGETS},
        "runs": [r.as_dict() for r in runs],
    }
    write_json(a.out, "data_size.json", result)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, t in zip(axes, TARGETS, strict=True):
        ax.loglog(result["sizes"], result["val_mae"][t], "o-")
        ax.set_xlabel("training structures")
        ax.set_ylabel(f"validation MAE, {t}")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out / "data_size.png", dpi=110)
    print(f"wrote {a.out / 'data_size.png'}")


if __name__ == "__main__":
    main()
