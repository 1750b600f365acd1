"""How the design policy's two confidences judge *known* crystals: Crysformer's calibrated
sigma and the match discriminator's p_match of MP ground states.

A gate "p_match >= 0.5" is only useful if real, sound structures pass it. This takes the
lowest-energy structure of each reduced formula in the MP 2018 train/val splits (the MEGNet
test split is never used), within a size and element window (default: 3-8 sites, 2+
elements, E_f < 0, main-group elements plus Zn and Cd: the compositions whose GPAW checks
this machine can afford), and reports how many have sigma <= tau, p_match >= 0.5, and
both. Prints the counts and the best of each, writes JSON and a sigma-vs-p_match plot.

    python benchmarks/p_match_known.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Structure
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.coordinate.discriminator import MatchDiscriminator  # noqa: E402
from matcouple.coordinate.policy import default_tau  # noqa: E402
from matcouple.datasets import read_table  # noqa: E402
from matcouple.settings import get_settings  # noqa: E402
from matcouple.surrogate.predict import SurrogatePredictor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = "formation_energy_per_atom"
MAIN_GROUP_ZN_CD = ("H Li Be B C N O F Na Mg Al Si P S Cl K Ca Ga Ge As Se Br Rb Sr In Sn Sb "
                    "Te I Cs Ba Zn Cd")


def ground_states(path: Path, elements: set[str], min_sites: int, max_sites: int):
    """Lowest-E_f row per reduced formula of the train/val splits inside the window."""
    frame = read_table(path)
    frame = frame[frame["megnet_split"].isin(["train", "val"])]
    frame = frame[(frame["natoms"] >= min_sites) & (frame["natoms"] <= max_sites)
                  & (frame[TARGET] < 0)]

    def inside(formula: str) -> bool:
        symbols = {el.symbol for el in Composition(formula)}
        return len(symbols) >= 2 and symbols <= elements

    frame = frame[frame["reduced_formula"].map(inside)]
    return frame.sort_values(TARGET).drop_duplicates("reduced_formula")


def main() -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=settings.data_dir / settings.datasets["mp2018"])
    p.add_argument("--min-sites", type=int, default=3)
    p.add_argument("--max-sites", type=int, default=8)
    p.add_argument("--elements", default=MAIN_GROUP_ZN_CD, help="space-separated symbols")
    p.add_argument("--p-match-min", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=RESULTS / "p_match_known.json")
    a = p.parse_args()

    rows = ground_states(a.data, set(a.elements.split()), a.min_sites, a.max_sites)
    structures = [Structure.from_str(cif, fmt="cif")
                  for cif in tqdm(rows["cif"], desc="parse", unit="crystal")]
    predictor = SurrogatePredictor.default()
    preds = predictor.predict(list(zip(rows["material_id"], structures, strict=True)))
    p_match = np.array(MatchDiscriminator.default().p_match(structures))
    sigma = np.array([r.sigmas.get(TARGET, np.nan) for r in preds])
    value = np.array([r.values.get(TARGET, np.nan) for r in preds])
    tau = default_tau()
    confident, trusted = sigma <= tau, p_match >= a.p_match_min
    table = [{"material_id": m, "formula": f, "nsites": int(n), "e_form": float(y),
              "ai": float(v), "sigma": float(s), "p_match": float(q)}
             for m, f, n, y, v, s, q in zip(rows["material_id"], rows["reduced_formula"],
                                            rows["natoms"], rows[TARGET], value, sigma,
                                            p_match, strict=True)]
    summary = {"data": a.data.name, "window": {"sites": [a.min_sites, a.max_sites],
                                               "elements": a.elements},
               "model_version": predictor.version, "uncertainty_mode": predictor.mode,
               "tau": tau, "p_match_min": a.p_match_min, "n": len(table),
               "sigma_le_tau": int(confident.sum()), "p_match_ge_min": int(trusted.sum()),
               "both": int((confident & trusted).sum()),
               "p_match_median": float(np.median(p_match)),
               "p_match_median_by_sites": {int(n): float(np.median(p_match[rows["natoms"] == n]))
                                           for n in sorted(set(rows["natoms"]))},
               "crystals": table}
    print(f"{len(table)} MP ground states ({a.min_sites}-{a.max_sites} sites): sigma <= tau "
          f"{tau:.3f}: {summary['sigma_le_tau']}; p_match >= {a.p_match_min}: "
          f"{summary['p_match_ge_min']}; both: {summary['both']}; median p_match "
          f"{summary['p_match_median']:.3f}")
    for n, med in summary["p_match_median_by_sites"].items():
        print(f"  {n} sites: median p_match {med:.3f} "
              f"({int((rows['natoms'] == n).sum())} crystals)")
    for row in sorted(table, key=lambda r: -r["p_match"])[:10]:
        print(f"  {row['material_id']:12s} {row['formula']:10s} {row['nsites']} sites  sigma "
              f"{row['sigma']:.3f}  p_match {row['p_match']:.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(sigma, p_match, s=8, alpha=0.5)
    ax.axvline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:.3f}")
    ax.axhline(a.p_match_min, color="r", ls=":", lw=1, label=f"p_match = {a.p_match_min}")
    ax.set(xscale="log", xlabel="calibrated sigma of E_f (eV/atom)", ylabel="p_match",
           title=f"{len(table)} MP ground states, {a.min_sites}-{a.max_sites} sites")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=120)
    print(f"written: {a.out} and {a.out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
