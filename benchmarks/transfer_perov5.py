"""Transfer learning (Crysformer-TL): fine-tune the shipped MP model on Perov-5 (issue 3).

Perov-5's heat of formation (``heat_ref``, eV; GPAW/RPBE, another fidelity than MP's
PBE formation energies) is labelled only on the CDVAE val and test splits, and the test
split is kept aside, so the labelled CDVAE *val* rows are divided (seeded) into a
fine-tuning train part and a validation part; the CDVAE test rows are never read. Two
arms train the same architecture for the same epochs: from scratch, and initialised from
the shipped model (``--init-from``; the output head is new since the target is new).
Writes ``OUT/transfer_perov5.json`` and a learning-curve plot.

    # GPU, ~3 minutes:
    python benchmarks/transfer_perov5.py --device cuda --epochs 30 --batch-size 128 \
        --lr 1e-3 --out $OUT/transfer
    # fewer labels (where transfer matters most): add --n-train 500
    # CPU smoke test:
    python benchmarks/transfer_perov5.py --device cpu --epochs 1 --n-train 64 --n-val 32
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _study import base_parser, environment, pyplot, write_json

from matcouple.datasets import read_table
from matcouple.errors import DatasetError
from matcouple.settings import get_settings
from matcouple.surrogate.experiments import run_variant
from matcouple.surrogate.train import TrainConfig

TARGET = "heat_ref"
SPLIT_COLUMN = "tl_split"


def fine_tuning_table(source: Path, out_dir: Path, *, n_train: int | None,
                      n_val: int | None, seed: int) -> Path:
    """The labelled CDVAE-val rows of Perov-5 with a seeded ``tl_split`` (train/val) column,
    written beside the results (never into the repository)."""
    frame = read_table(source)
    if TARGET not in frame.columns or "split" not in frame.columns:
        raise DatasetError(f"{source} is not the Perov-5 table (needs 'split', {TARGET!r})")
    frame = frame[(frame["split"] == "val") & frame[TARGET].notna()].reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(frame))
    n_val = n_val or len(frame) // 5
    val_idx, train_idx = order[:n_val], order[n_val:]
    if n_train:
        train_idx = train_idx[:n_train]
    frame[SPLIT_COLUMN] = ""
    frame.loc[train_idx, SPLIT_COLUMN] = "train"
    frame.loc[val_idx, SPLIT_COLUMN] = "val"
    frame = frame[frame[SPLIT_COLUMN] != ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"perov5_tl_seed{seed}_{len(train_idx)}_{len(val_idx)}.csv.gz"
    frame[["material_id", "cif", "poscar", TARGET, SPLIT_COLUMN]].to_csv(path, index=False)
    return path


def main() -> None:
    settings = get_settings()
    p = base_parser(__doc__, "perov5", "transfer_perov5")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n-train", type=int, default=None, help="fine-tuning rows (default all)")
    p.add_argument("--n-val", type=int, default=None, help="validation rows (default 20%%)")
    p.add_argument("--init-from", type=Path,
                   default=settings.surrogate_model_dir / "crysformer-mp2018-s0.pt")
    p.add_argument("--ft-lr", type=float, default=None,
                   help="learning rate of the fine-tuned arm (default: --lr)")
    a = p.parse_args()
    table = fine_tuning_table(a.data, a.out, n_train=a.n_train, n_val=a.n_val, seed=a.seed)
    source = torch.load(a.init_from, weights_only=True, map_location="cpu")
    model = {k: v for k, v in source["model_config"].items() if k != "targets"}
    cfg = TrainConfig(data=str(table), targets=(TARGET,), split_column=SPLIT_COLUMN,
                      epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                      amp=a.amp, model=model, graph=dict(source["graph_spec"]))
    common = dict(device=a.device, cache_dir=a.cache_dir, workers=a.workers,
                  progress=not a.quiet)
    scratch = run_variant("scratch", cfg, a.out, **common)
    tuned = run_variant("fine_tuned", replace(cfg, lr=a.ft_lr or a.lr), a.out,
                        init_from=a.init_from, **common)
    result = {
        "env": environment(a.device), "data": a.data.name, "target": TARGET,
        "protocol": "CDVAE val rows split into fine-tuning train/val; CDVAE test unused",
        "n_train": scratch.n_train, "epochs": a.epochs, "init_from": a.init_from.name,
        "val_mae": {"scratch": scratch.val_mae[TARGET], "fine_tuned": tuned.val_mae[TARGET]},
        "runs": {"scratch": scratch.as_dict(), "fine_tuned": tuned.as_dict()},
    }
    print(f"Perov-5 {TARGET} val MAE (eV), {scratch.n_train} training rows, {a.epochs} "
          f"epochs: scratch {scratch.val_mae[TARGET]:.4f}  fine-tuned "
          f"{tuned.val_mae[TARGET]:.4f}")
    write_json(a.out, "transfer_perov5.json", result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, run in (("from scratch", scratch), ("fine-tuned from MP", tuned)):
        ax.plot([h["epoch"] for h in run.history],
                [h[f"val_mae_{TARGET}"] for h in run.history], "o-", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"Perov-5 {TARGET} validation MAE (eV)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "transfer_perov5.png", dpi=110)
    print(f"wrote {a.out / 'transfer_perov5.png'}")


if __name__ == "__main__":
    main()
