"""Where is the value model's formation-energy error on the val split? By chemistry.

Reads the parts ``benchmarks/uncertainty_parts.py --point MODEL.pt`` saved (the point
model's predictions and the labels, by material id) and the data set, and splits the E_f
error of the point model by: the number of elements; whether the crystal's reduced formula
occurs in the training split (a polymorph of a training compound) or not; and, for
polymorphs, how far the label sits from the closest training label of the same formula
(a val label far from every training polymorph of its formula is either a genuinely
high-energy structure or a label that no longer fits the structure stored with it; the
structures are MP's c.2023 relaxations, the labels 2018's). Prints a table, writes JSON.

    python benchmarks/ef_error_split.py benchmarks/results/uncertainty_parts_mc8_point_s24.npz
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.datasets import read_table  # noqa: E402
from matcouple.errors import MatcoupleError  # noqa: E402
from matcouple.settings import get_settings  # noqa: E402

TARGET = "formation_energy_per_atom"


def n_elements(formula: str) -> int:
    """Elements in a reduced formula ("Li2O" -> 2), without pymatgen's slow parser."""
    return len(set(re.findall(r"[A-Z][a-z]?", formula)))


def closest_label_gap(formulas: pd.Series, labels: np.ndarray,
                      train: pd.DataFrame) -> np.ndarray:
    """|label - closest training label of the same reduced formula| (NaN: formula new)."""
    by_formula = train.groupby("reduced_formula")[TARGET].apply(np.asarray)
    gaps = np.full(len(labels), np.nan)
    for k, (f, y) in enumerate(zip(formulas, labels, strict=True)):
        if f in by_formula.index:
            gaps[k] = float(np.min(np.abs(by_formula[f] - y)))
    return gaps


def group_rows(frame: pd.DataFrame, column: str) -> list[dict]:
    """MAE, median and share of the summed error of each value of ``column``."""
    total = float(frame.err.sum())
    return [{"group": str(key), "n": int(len(g)), "mae": float(g.err.mean()),
             "median": float(g.err.median()), "share_of_error": float(g.err.sum() / total)}
            for key, g in frame.groupby(column)]


def main(argv: list[str] | None = None) -> dict:
    settings = get_settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("parts", type=Path, help="npz from uncertainty_parts.py --point")
    p.add_argument("--data", type=Path, default=settings.data_dir / settings.datasets["mp2018"])
    p.add_argument("--split-column", default="megnet_split")
    p.add_argument("--worst", type=int, default=100, help="size of the tail to describe")
    p.add_argument("--out", type=Path, default=None, help="JSON (default: beside the npz)")
    a = p.parse_args(argv)
    parts = np.load(a.parts, allow_pickle=True)
    if "point" not in parts.files:
        raise MatcoupleError(f"{a.parts}: no point model's predictions (run "
                             "uncertainty_parts.py with --point MODEL.pt)")
    targets = [str(t) for t in parts["targets"]]
    j = targets.index(TARGET)
    ids = [str(i) for i in parts["ids"]]
    table = read_table(a.data)
    train = table[table[a.split_column] == "train"]
    rows = table.set_index("material_id").loc[ids]
    labels = parts["y"][:, j]
    err = np.abs(parts["point"][:, j] - labels)
    frame = pd.DataFrame({"formula": rows["reduced_formula"].to_numpy(),
                          "natoms": rows["natoms"].to_numpy(), "err": err}, index=ids)
    frame["elements"] = [n_elements(f) for f in frame.formula]
    frame["polymorph_of_train"] = frame.formula.isin(set(train.reduced_formula))
    frame["closest_train_label_gap"] = closest_label_gap(frame.formula, labels, train)
    worst = frame.sort_values("err", ascending=False).head(a.worst)
    poly = frame[frame.polymorph_of_train]
    out = {
        "parts": str(a.parts), "point_model": str(parts["point_model"]),
        "n": int(len(frame)), "mae": float(err.mean()), "median": float(np.median(err)),
        "by_elements": group_rows(frame, "elements"),
        "by_polymorph_of_train": group_rows(frame, "polymorph_of_train"),
        "polymorphs_closest_train_label_gap": {
            "mean": float(poly.closest_train_label_gap.mean()),
            "median": float(poly.closest_train_label_gap.median())},
        "worst": {"n": int(len(worst)), "mae": float(worst.err.mean()),
                  "share_of_error": float(worst.err.sum() / err.sum()),
                  "mae_without": float(frame.drop(worst.index).err.mean()),
                  "polymorph_of_train": int(worst.polymorph_of_train.sum()),
                  "their_closest_train_label_gap_mean": float(
                      worst.closest_train_label_gap.mean()),
                  "natoms_median": float(worst.natoms.median()),
                  "rows": [{"material_id": i, "formula": r.formula, "natoms": int(r.natoms),
                            "abs_error": float(r.err)} for i, r in worst.head(15).iterrows()]},
    }
    print(f"E_f MAE {out['mae']:.4f} eV/atom (median {out['median']:.4f}) on {out['n']} "
          f"crystals, point model {out['point_model']}")
    for name in ("by_elements", "by_polymorph_of_train"):
        print(f"-- {name}: group, n, MAE, median, share of the summed error")
        for r in out[name]:
            print(f"   {r['group']:>6}  {r['n']:5d}  {r['mae']:.4f}  {r['median']:.4f}  "
                  f"{r['share_of_error']:.3f}")
    g = out["polymorphs_closest_train_label_gap"]
    print(f"polymorphs of training compounds: |label - closest same-formula training label| "
          f"mean {g['mean']:.4f}, median {g['median']:.4f} eV/atom")
    w = out["worst"]
    print(f"worst {w['n']}: MAE {w['mae']:.3f}, {w['share_of_error']:.1%} of the summed error "
          f"(MAE without them {w['mae_without']:.4f}); {w['polymorph_of_train']} are polymorphs "
          f"of training compounds, whose labels sit {w['their_closest_train_label_gap_mean']:.3f}"
          f" eV/atom from the closest training polymorph on average; median "
          f"{w['natoms_median']:.0f} atoms")
    for r in w["rows"]:
        print(f"   {r['material_id']:>12}  {r['formula']:>12}  {r['natoms']:4d} atoms  "
              f"|error| {r['abs_error']:.3f}")
    path = a.out or a.parts.with_name(a.parts.stem + "_ef_error_split.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
