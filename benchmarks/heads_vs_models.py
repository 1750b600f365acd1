"""One Crysformer with two heads vs two single-target Crysformers (issue 3).

Trains, on the same data and under the same total budget, (a) the default two-head model
(formation energy per atom + band gap) for ``--epochs`` epochs and (b) one model per target
for ``--single-epochs`` epochs each (default: half, so both arms cost the same number of
training epochs: the models differ only in their last layer). Writes the validation MAE of
each arm, their training curves and wall times to ``OUT/heads_vs_models.json`` and a plot.

    # GPU, ~5 minutes (MP 2018.6.1 MEGNet split):
    python benchmarks/heads_vs_models.py --device cuda --epochs 6 --batch-size 256 \
        --lr 1.5e-3 --out $OUT/heads
    # CPU smoke test on the CI subset:
    python benchmarks/heads_vs_models.py --data .../mp2018_ci_subset_512.csv.gz \
        --split-column ci_split --epochs 2 --model scalars=16,vectors=8,tensors=4,layers=1
"""

from __future__ import annotations

from _study import base_parser, environment, pyplot, write_json

from matcouple.surrogate.experiments import parse_model_spec, run_variant
from matcouple.surrogate.train import TrainConfig

TARGETS = ("formation_energy_per_atom", "band_gap")


def main() -> None:
    p = base_parser(__doc__, "mp2018", "heads_vs_models")
    p.add_argument("--split-column", default="megnet_split")
    p.add_argument("--epochs", type=int, default=6, help="epochs of the two-head model")
    p.add_argument("--single-epochs", type=int, default=None,
                   help="epochs of each single-target model (default: --epochs / 2)")
    p.add_argument("--limit-train", type=int, default=None)
    a = p.parse_args()
    single_epochs = a.single_epochs or max(1, a.epochs // 2)
    base = TrainConfig(data=str(a.data), split_column=a.split_column, batch_size=a.batch_size,
                       lr=a.lr, seed=a.seed, amp=a.amp, limit_train=a.limit_train,
                       model=parse_model_spec(a.model))
    common = dict(device=a.device, cache_dir=a.cache_dir, workers=a.workers,
                  progress=not a.quiet)
    runs = {"two_heads": run_variant("two_heads", _cfg(base, TARGETS, a.epochs), a.out,
                                     **common)}
    for t in TARGETS:
        runs[t] = run_variant(f"only_{t}", _cfg(base, (t,), single_epochs), a.out, **common)
    two = runs["two_heads"]
    result = {
        "env": environment(a.device), "data": a.data.name, "epochs_two_heads": a.epochs,
        "epochs_single": single_epochs,
        "two_heads": {"val_mae": two.val_mae, "seconds": two.seconds},
        "two_models": {"val_mae": {t: runs[t].val_mae[t] for t in TARGETS},
                       "seconds": sum(runs[t].seconds for t in TARGETS)},
        "runs": {k: r.as_dict() for k, r in runs.items()},
    }
    for t in TARGETS:
        print(f"{t}: two heads {two.val_mae[t]:.4f}  vs  own model {runs[t].val_mae[t]:.4f}")
    print(f"wall: two heads {two.seconds:.0f}s, two models "
          f"{result['two_models']['seconds']:.0f}s")
    write_json(a.out, "heads_vs_models.json", result)
    _plot(runs, a.out / "heads_vs_models.png")


def _cfg(base: TrainConfig, targets: tuple[str, ...], epochs: int) -> TrainConfig:
    from dataclasses import replace

    return replace(base, targets=targets, epochs=epochs)


def _plot(runs: dict, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, t in zip(axes, TARGETS, strict=True):
        for name in ("two_heads", t):
            h = runs[name].history
            ax.plot([r["epoch"] for r in h], [r[f"val_mae_{t}"] for r in h], "o-",
                    label="two-head model" if name == "two_heads" else "single-target model")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation MAE, {t}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
