"""How much one Crysformer member's formation energy moves when a crystal is rotated.

Rotating a crystal must not change its prediction. In float32 it can, when the norm layers
amplify round-off in feature blocks that site symmetry makes zero (CrysformerConfig.
zero_floor is the fix). For each of the first ``--limit`` crystals of a split, this
predicts the structure and a randomly rotated copy, for each ``--floors`` value, and
reports the MAE against the labels and the rotation differences; JSON to
benchmarks/results/.

    python benchmarks/rotation_invariance.py --limit 300 --floors 0,1e-8
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Lattice, Structure
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.settings import get_settings  # noqa: E402
from matcouple.surrogate.graph import structure_to_graph  # noqa: E402
from matcouple.surrogate.model import EquivariantLayerNorm  # noqa: E402
from matcouple.surrogate.predict import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = "formation_energy_per_atom"


def main() -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=settings.data_dir / settings.datasets["mp2018"])
    p.add_argument("--split", default="val", help="value of the megnet_split column")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--member", type=Path, default=Path(__file__).resolve().parents[1]
                   / "matcouple/surrogate/models/crysformer-mp2018-s0.pt")
    p.add_argument("--floors", default="0,1e-8", help="zero_floor values to compare")
    p.add_argument("--out", type=Path, default=RESULTS / "rotation_invariance.json")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    rows = pd.read_csv(args.data)
    rows = rows[rows["megnet_split"] == args.split].head(args.limit)
    structures = [Structure.from_str(c, fmt="cif") for c in rows["cif"]]
    rotated = [Structure(Lattice(s.lattice.matrix @ Rotation.random(random_state=i)
                                 .as_matrix().T), s.species, s.frac_coords)
               for i, s in enumerate(structures)]
    truth = rows[TARGET].to_numpy()
    model, blob = load_model(args.member, torch.device("cpu"))
    k = list(blob["model_config"]["targets"]).index(TARGET)
    mean, std = float(blob["norm_mean"][k]), float(blob["norm_std"][k])
    norms = [m for m in model.modules() if isinstance(m, EquivariantLayerNorm)]

    def predict(s: Structure) -> float:
        g = structure_to_graph(s)
        with torch.inference_mode():
            out = model(g["z"], g["edge_index"], g["edge_vec"],
                        torch.zeros(len(s), dtype=torch.long), 1)
        return float(out[0, k]) * std + mean

    report = {"data": str(args.data), "split": args.split, "n": len(structures),
              "member": args.member.name, "results": []}
    for floor in (float(x) for x in args.floors.split(",")):
        for norm in norms:
            norm.zero_floor = floor
        a = np.array([predict(s) for s in structures])
        b = np.array([predict(s) for s in rotated])
        d = np.abs(a - b)
        res = {"zero_floor": floor, "mae": float(np.abs(a - truth).mean()),
               "mae_rotated": float(np.abs(b - truth).mean()),
               "rotation_mean": float(d.mean()), "rotation_max": float(d.max()),
               "frac_over_1e-3": float((d > 1e-3).mean()),
               "frac_over_1e-2": float((d > 1e-2).mean())}
        report["results"].append(res)
        print(f"zero_floor {floor:g}: MAE {res['mae']:.4f} (rotated {res['mae_rotated']:.4f}) "
              f"eV/atom; |rotated - original| mean {res['rotation_mean']:.2e}, max "
              f"{res['rotation_max']:.2e}; > 1e-3: {res['frac_over_1e-3']:.1%}, > 1e-2: "
              f"{res['frac_over_1e-2']:.1%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
