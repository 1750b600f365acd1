"""Fine-tune benchmark: wall time of one fine-tune of the shipped ensemble, by phase.

Files ``--entries`` results into the buffer (structures and labels of MP 2018 CI-subset
rows from the MEGNet train split, filed under the fidelity ``bench/mp2018``: real labels,
so the held-out MAE means something), runs the fine-tune with the settings' defaults
(``Settings.finetune_*``) and reports its phases, the formation-energy MAE before/after
on the MEGNet val slice and held-out entries, and whether the promotion rule promoted it.

Starts its own embedded database (temporary storage, free port) and model cache, so
nothing of yours is touched.

    python benchmarks/finetune.py                    # 8 entries, CPU (or CUDA if present)
    python benchmarks/finetune.py --entries 32 --repeats 2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.settings import get_settings  # noqa: E402
from matcouple.store.connection import LaunchpadConfig, open_database  # noqa: E402
from matcouple.store.server import EmbeddedServer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FE = "formation_energy_per_atom"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_entries(db, n: int, offset: int) -> None:
    from matcouple.coordinate.buffer import FineTuneBuffer
    from matcouple.structures.io import structure_from_text

    settings = get_settings()
    df = pd.read_csv(settings.data_dir / settings.datasets["mp2018-ci"],
                     keep_default_na=False, na_values=[""])
    df = df[df["megnet_split"] == "train"].iloc[offset:offset + n]
    buffer = FineTuneBuffer(db)
    for row in df.itertuples():
        buffer.add(row.material_id, structure_from_text(row.cif, "cif"),
                   {FE: row.formation_energy_per_atom, "band_gap": row.band_gap},
                   fidelity="bench/mp2018", source="bench")


def bench(config: LaunchpadConfig, args: argparse.Namespace) -> list[dict]:
    from matcouple.coordinate.finetune import FineTuneConfig, finetune_now

    db = open_database(config)
    rows = []
    overrides = {k: v for k, v in {"device": args.device, "lr": args.lr,
                                   "epochs": args.epochs}.items() if v is not None}
    for k in range(args.repeats):
        file_entries(db, args.entries, k * args.entries)
        t0 = time.perf_counter()
        outcome = finetune_now(db, owner="benchmark",
                               config=FineTuneConfig.from_settings(progress=True, **overrides))
        wall = time.perf_counter() - t0
        if outcome.status == "failed":
            raise SystemExit(f"fine-tune failed: {outcome.error}")
        m = outcome.metrics
        rows.append({"repeat": k, "entries": outcome.n_entries, "status": outcome.status,
                     "reason": outcome.reason, "version": outcome.version, "wall_s": wall,
                     "timing_s": m["timing_s"], "cpu_time_s": m["cpu_time_s"],
                     "cpu_s": sum(m["cpu_time_s"].values()), "device": m["device"],
                     "val_mae_before": m["current"]["val"][FE], "val_mae_after": m["val"][FE],
                     "holdout_mae_before": m["current"]["holdout"].get(FE),
                     "holdout_mae_after": m["holdout"].get(FE),
                     "n_val": m["n_val"], "n_holdout": m["n_holdout"],
                     "n_replay": m["n_replay"], "calibration_scale": m["calibration_scale"]})
        print(f"repeat {k}: {outcome.status} in {wall:.1f} s ({outcome.reason})", flush=True)
    return rows


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    phases = list(rows[0]["timing_s"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    left = [0.0] * len(rows)
    for phase in phases:
        widths = [r["timing_s"].get(phase, 0.0) for r in rows]
        ax.barh([f"repeat {r['repeat']}" for r in rows], widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("seconds")
    ax.set_title(f"fine-tune of the shipped ensemble, {rows[0]['entries']} buffer entries, "
                 f"{rows[0]['device']}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--lr", type=float, default=None, help="default Settings.finetune_lr")
    p.add_argument("--epochs", type=int, default=None, help="default Settings.finetune_epochs")
    p.add_argument("--out", type=Path, default=RESULTS / "finetune.json")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    with tempfile.TemporaryDirectory(prefix="matcouple-ft-bench-") as tmp:
        tmp_path = Path(tmp)
        os.environ["MATCOUPLE_MODEL_CACHE"] = str(tmp_path / "models")
        get_settings.cache_clear()
        server = EmbeddedServer(host="127.0.0.1", port=_free_port(),
                                storage_path=tmp_path / "db", run_dir=tmp_path / "run")
        server.start(timeout_s=60)
        try:
            path = tmp_path / "lp.yaml"
            path.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": server.port,
                                            "name": "finetune_bench", "strm_lvl": "ERROR"}))
            rows = bench(LaunchpadConfig.load(path), args)
        finally:
            server.stop()
    import torch

    s = get_settings()
    data = {"rows": rows, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), "overrides": {"lr": args.lr, "epochs": args.epochs},
            "settings": {k: getattr(s, k) for k in (
                "finetune_epochs", "finetune_lr", "finetune_batch_size",
                "finetune_buffer_repeat", "finetune_replay_size", "finetune_val_size",
                "finetune_holdout_fraction", "finetune_val_tolerance",
                "finetune_holdout_tolerance")}}
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    plot(data, out.with_suffix(".png"))
    for r in rows:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["timing_s"].items())
        print(f"{r['entries']} entries on {r['device']} ({data['torch_threads']} threads): "
              f"{r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU [{phases}]; "
              f"val MAE {r['val_mae_before']:.4f} -> "
              f"{r['val_mae_after']:.4f}, held-out MAE {r['holdout_mae_before']:.4f} -> "
              f"{r['holdout_mae_after']:.4f} eV/atom; {r['status']}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
