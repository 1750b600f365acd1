"""How far the fused CPU value path is from e3nn's on real crystals (float32, shipped models).

Predicts the first ``--limit`` crystals of a split with the shipped ensemble (dropout off)
once with ``Settings.surrogate_fused_tp`` off and once on, and reports the largest and mean
difference per target; JSON to benchmarks/results/.

    python benchmarks/fused_agreement.py --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Structure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.settings import get_settings  # noqa: E402
from matcouple.surrogate.predict import SurrogatePredictor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=settings.data_dir / settings.datasets["mp2018"])
    p.add_argument("--split", default="val", help="value of the megnet_split column")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--out", type=Path, default=RESULTS / "fused_agreement.json")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    rows = pd.read_csv(args.data)
    rows = rows[rows["megnet_split"] == args.split].head(args.limit)
    items = [(str(i), Structure.from_str(c, fmt="cif"))
             for i, c in zip(rows["material_id"], rows["cif"], strict=True)]
    values = {}
    for fused in (False, True):
        os.environ["MATCOUPLE_FUSED_TP"] = "1" if fused else "0"
        get_settings.cache_clear()
        predictor = SurrogatePredictor.default(mc_samples=0)
        out = predictor.predict(items)
        values[fused] = np.array([[r.values[t] for t in predictor.targets] for r in out])
    get_settings.cache_clear()
    diff = np.abs(values[True] - values[False])
    report = {"n": len(items), "split": args.split, "targets": {
        t: {"max_abs_diff": float(diff[:, j].max()), "mean_abs_diff": float(diff[:, j].mean())}
        for j, t in enumerate(predictor.targets)}}
    for t, r in report["targets"].items():
        print(f"{t}: |fused - e3nn| max {r['max_abs_diff']:.2e}, mean {r['mean_abs_diff']:.2e}"
              f" ({len(items)} structures)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
