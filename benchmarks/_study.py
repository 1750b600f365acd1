"""Command-line and output helpers shared by the surrogate study scripts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.settings import get_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def base_parser(doc: str, default_data: str, out_name: str) -> argparse.ArgumentParser:
    """Options every study takes: data, device, output folder, model size, batch, lr."""
    settings = get_settings()
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path,
                   default=settings.data_dir / settings.datasets[default_data])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--out", type=Path, default=RESULTS / out_name,
                   help="folder for the JSON, the plot and the trained models")
    p.add_argument("--model", default="", help="model overrides, e.g. scalars=16,layers=1")
    p.add_argument("--batch-size", type=int, default=settings.surrogate_train_batch_size)
    p.add_argument("--lr", type=float, default=settings.surrogate_train_lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--workers", type=int, default=None, help="graph-building processes")
    p.add_argument("--cache-dir", type=Path, default=settings.graph_cache_dir)
    p.add_argument("--quiet", action="store_true")
    return p


def environment(device: str | None) -> dict:
    """Where a study ran: device name, cores and the 1-minute load (the CPU is shared)."""
    import torch

    cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    return {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
            "torch": torch.__version__, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime())}


def write_json(out_dir: Path, name: str, result: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
