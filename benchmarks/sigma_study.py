"""Which sigma should the design policy trust? Compares the ways the surrogate's uncertainty
can be made, on the parts ``benchmarks/uncertainty_parts.py`` saved for a labelled split:

  * ``ensemble``: mean and spread of the members with dropout off (fast);
  * ``mc``: mean over members and MC-dropout passes, sigma from the MC variance alone;
  * ``ensemble+mc``: same mean, sigma from the mixture (MC variance + spread of members);
  * with a ``point`` model in the parts (``uncertainty_parts.py --point MODEL.pt``), also
    ``point+ensemble`` and ``point+ensemble+mc``: that model's value, sigma = the RMS
    deviation of the ensemble's samples from it (``uncertainty.spread_around``), and
    ``blend+ensemble(+mc)``: the value moved towards the ensemble's mean by the fraction
    fitted on the other seeded half (``value_blend``, what the card ships), sigma about it.

For each, with every sigma scaled by the calibration fitted on the other seeded half: the
MAE, Spearman(|error|, sigma), the calibration scale and the 90% coverage it gives, and
what the design policy does with it: tau = bound / z (0.12 eV/atom at 90%) accepts a share
of predictions, and the share of those within the bound is what tau promises (>= 90%).
Prints a table, writes JSON and a plot of share-within vs share-accepted.

    python benchmarks/sigma_study.py benchmarks/results/uncertainty_parts.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.coordinate.policy import accepted_accuracy, default_tau  # noqa: E402
from matcouple.surrogate.uncertainty import (  # noqa: E402
    calibration_metrics,
    combine,
    fit_scale,
    held_out_sigmas,
    spread_around,
)
from matcouple.surrogate.value_blend import held_out_values  # noqa: E402

TARGET = "formation_energy_per_atom"


def candidate_sigmas(parts: dict, j: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(mean, raw sigma) of each way of making the uncertainty, for target column j."""
    det = parts["deterministic"][..., j]
    mc_mean, mc_var = parts["mc_mean"][..., j], parts["mc_var"][..., j]
    ens_mean, ens_sigma = combine(det, np.zeros_like(det))
    mix_mean, mix_sigma = combine(mc_mean, mc_var)
    out = {"ensemble": (ens_mean, ens_sigma),
           "mc": (mix_mean, np.sqrt(mc_var.mean(axis=0))),
           "ensemble+mc": (mix_mean, mix_sigma)}
    if "point" in parts:
        point = parts["point"][:, j]
        out["point+ensemble"] = (point, spread_around(point, det, np.zeros_like(det)))
        out["point+ensemble+mc"] = (point, spread_around(point, mc_mean, mc_var))
        # the point moved towards the ensemble's mean (value_blend), each half by the
        # fraction fitted on the other half
        for name, mean, var in (("blend+ensemble", det, np.zeros_like(det)),
                                ("blend+ensemble+mc", mc_mean, mc_var)):
            value = held_out_values(point, combine(mean, var)[0], parts["y"][:, j])
            value = np.where(np.isnan(value), point, value)  # unlabelled rows: unscored
            out[name] = (value, spread_around(value, mean, var))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", type=Path, help="npz written by uncertainty_parts.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: beside the npz, sigma_study.json)")
    a = p.parse_args()
    parts = dict(np.load(a.parts))
    targets = [str(t) for t in parts["targets"]]
    j = targets.index(TARGET)
    y = parts["y"][:, j]
    finite = np.isfinite(y)
    tau = default_tau()
    out = a.out or a.parts.with_name("sigma_study.json")
    result: dict = {"parts": a.parts.name, "n": int(finite.sum()),
                    "mc_samples": int(parts["mc_samples"]), "tau": tau,
                    "model_version": str(parts["model_version"]),
                    "point_model": str(parts.get("point_model", "")), "modes": {}}
    print(f"{TARGET}, {result['n']} structures, tau {tau:.4f} eV/atom, "
          f"{result['mc_samples']} MC passes per member; held-out halves")
    print(f"{'mode':17s} {'MAE':>7s} {'Spearman':>8s} {'cover90':>7s} {'accepted':>8s} "
          f"{'within':>7s}")
    curves = {}
    for mode, (mean, sigma) in candidate_sigmas(parts, j).items():
        err, sigma = mean[finite] - y[finite], sigma[finite]
        scaled, _ = held_out_sigmas(err, sigma, a.seed)
        cal = calibration_metrics(err, scaled)
        pol = accepted_accuracy(err, scaled, tau=tau)
        result["modes"][mode] = {"mae": float(np.abs(err).mean()),
                                 "scale_all": fit_scale(err, sigma),
                                 "held_out_calibration": cal, "held_out_policy": pol}
        print(f"{mode:17s} {result['modes'][mode]['mae']:7.4f} "
              f"{cal['spearman_abs_error_sigma']:8.3f} {cal['coverage_90']:7.3f} "
              f"{pol['accepted_fraction']:8.1%} {pol['within_bound_of_accepted']:7.1%}")
        taus = np.quantile(scaled, np.linspace(0.02, 1.0, 50))
        curves[mode] = [accepted_accuracy(err, scaled, tau=float(t)) for t in taus]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for mode, curve in curves.items():
        ax.plot([c["accepted_fraction"] for c in curve],
                [c["within_bound_of_accepted"] for c in curve], "o-", ms=3, label=mode)
    ax.axhline(0.9, color="k", ls="--", lw=1)
    ax.set_xlabel("share of predictions accepted (sigma <= tau)")
    ax.set_ylabel("share of accepted within 0.12 eV/atom")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
