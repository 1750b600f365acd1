"""Surrogate benchmark: accuracy, calibration and end-to-end throughput of Crysformer.

For any labelled CSV (default: the MP 2018.6.1 MEGNet validation split) it prints and
writes to ``benchmarks/results/surrogate.json`` (parity plot beside it):
  * MAE per target of the shipped ensemble (or ``--models DIR``);
  * the calibration of the sigmas it reports: coverage of the 90% interval, miscalibration
    area, Spearman(|error|, sigma), NLL;
  * end-to-end throughput, structure -> value and sigma with graph building included
    (structures already parsed), on this machine's CPU or GPU.

    python benchmarks/surrogate.py                           # MP val split, CPU or GPU
    python benchmarks/surrogate.py --data my.csv --split-column none --targets band_gap
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.coordinate.policy import (  # noqa: E402
    accepted_accuracy,
    tau_keeping_promise,
)
from matcouple.datasets import ID_COLUMNS, read_table  # noqa: E402
from matcouple.errors import MatcoupleError  # noqa: E402
from matcouple.settings import get_settings  # noqa: E402
from matcouple.structures.io import structure_from_text  # noqa: E402
from matcouple.surrogate.predict import SurrogatePredictor  # noqa: E402
from matcouple.surrogate.uncertainty import calibration_metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def empirical_tau(err: np.ndarray, sig: np.ndarray, plot: Path) -> dict:
    """tau fitted on one seeded half so that >= 90% of accepted are within the bound,
    then checked on the other half; plus the curve (share accepted vs share within)."""
    order = np.random.default_rng(0).permutation(len(err))
    fit, check = order[: len(err) // 2], order[len(err) // 2:]
    tau = tau_keeping_promise(err[fit], sig[fit])
    out = {"fitted_on": len(fit), "checked_on": len(check), "tau": tau,
           "check": accepted_accuracy(err[check], sig[check], tau=tau) if tau else None}
    if tau:
        c = out["check"]
        print(f"empirical tau (fit on half): {tau:.4f} eV/atom; on the other half it accepts "
              f"{c['accepted_fraction']:.1%}, {c['within_bound_of_accepted']:.1%} of those "
              "within the bound")
    else:
        print("empirical tau: no tau keeps the 90% promise on the fitting half")
    taus = np.quantile(sig, np.linspace(0.02, 1.0, 50))
    curve = [accepted_accuracy(err, sig, tau=float(t)) for t in taus]
    out["curve"] = [{k: c[k] for k in ("tau", "accepted_fraction",
                                        "within_bound_of_accepted")} for c in curve]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot([c["accepted_fraction"] for c in curve],
                [c["within_bound_of_accepted"] for c in curve], "o-", ms=3)
        ax.axhline(0.9, color="k", ls="--", lw=1)
        ax.set_xlabel("share of predictions accepted (sigma <= tau)")
        ax.set_ylabel(f"share of accepted within {curve[0]['error_bound']} eV/atom")
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    return out


def main() -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=settings.data_dir / settings.datasets["mp2018"])
    p.add_argument("--split-column", default="megnet_split", help="'none' for all rows")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--models", type=Path, default=None, help="folder with a model card")
    p.add_argument("--mc-samples", type=int, default=None,
                   help="MC-dropout passes per member (default: Settings; 0 = dropout off)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: Settings.predict_batch_size_cpu / _gpu")
    p.add_argument("--workers", type=int, default=1, help="graph-building processes")
    p.add_argument("--out", type=Path, default=RESULTS / "surrogate.json")
    a = p.parse_args()

    t_start = time.perf_counter()
    predictor = SurrogatePredictor.default(device=a.device, mc_samples=a.mc_samples,
                                           model_dir=a.models)
    load_seconds = time.perf_counter() - t_start
    frame = read_table(a.data)
    if a.split_column != "none":
        frame = frame[frame[a.split_column] == a.split]
    if a.limit:
        frame = frame.iloc[:a.limit]
    targets = [t for t in predictor.targets if t in frame.columns]
    id_col = next((c for c in ID_COLUMNS if c in frame.columns), None)
    text_col = "cif" if "cif" in frame.columns else "poscar"
    items, labels = [], []
    for i, rec in enumerate(frame.to_dict("records")):
        try:
            s = structure_from_text(rec[text_col], text_col)
        except MatcoupleError as exc:
            s = exc
        items.append((str(rec[id_col]) if id_col else str(i), s))
        labels.append([float(rec[t]) for t in targets])
    t_warm = time.perf_counter()
    # warm-up (kernels, caches); the mode's models are built on their first use, here
    predictor.predict(items[:64], batch_size=a.batch_size)
    start_seconds = load_seconds + time.perf_counter() - t_warm
    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    rows = predictor.predict(items, batch_size=a.batch_size, workers=a.workers)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    ok = [i for i, r in enumerate(rows) if not r.error]
    y = np.array(labels)[ok]
    pred = np.array([[rows[i].values[t] for t in targets] for i in ok])
    sig = np.array([[rows[i].sigmas[t] for t in targets] for i in ok])
    result = {
        "data": str(a.data.name), "split": a.split, "n": len(items), "n_predicted": len(ok),
        "model_version": predictor.version, "uncertainty_mode": predictor.mode,
        "residual_memories": predictor.residual_memories,
        "device": str(predictor.device), "cpu_count": os.cpu_count(),
        "graph_workers": a.workers, "seconds": seconds,
        "structures_per_s": len(items) / seconds, "cpu_seconds": cpu_seconds,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        # what a user waits before the first answer: reading the model files, building
        # the models the mode runs and predicting the first 64 crystals
        "start_seconds": start_seconds, "targets": {},
    }
    if predictor.device.type == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    for j, t in enumerate(targets):
        finite = np.isfinite(y[:, j])
        err = pred[finite, j] - y[finite, j]
        result["targets"][t] = {"mae": float(np.abs(err).mean()),
                                **calibration_metrics(err, sig[finite, j])}
        m = result["targets"][t]
        print(f"{t}: MAE {m['mae']:.4f}  coverage90 {m['coverage_90']:.3f}  miscal. area "
              f"{m['miscalibration_area']:.3f}  Spearman {m['spearman_abs_error_sigma']:.3f}"
              f"  NLL {m['nll']:.3f}")
    if "formation_energy_per_atom" in targets:
        # What the design policy promises: of the predictions accepted at tau, the share
        # within the error bound (the reference labels stand in for DFT checks).
        j = targets.index("formation_energy_per_atom")
        policy = accepted_accuracy(pred[:, j] - y[:, j], sig[:, j])
        result["design_policy"] = policy
        if policy["accepted"]:
            print(f"design policy: tau {policy['tau']:.3f} eV/atom accepts "
                  f"{policy['accepted']}/{policy['n']} ({policy['accepted_fraction']:.1%}); "
                  f"{policy['within_bound_of_accepted']:.1%} of those within "
                  f"{policy['error_bound']} eV/atom (MAE {policy['mae_of_accepted']:.4f}); "
                  f"{policy['within_bound_of_all']:.1%} of all")
        else:
            print(f"design policy: tau {policy['tau']:.3f} eV/atom accepts none")
        result["design_policy_empirical"] = empirical_tau(pred[:, j] - y[:, j], sig[:, j],
                                                          a.out.with_name(
                                                              a.out.stem + "_policy.png"))
    print(f"throughput: {result['structures_per_s']:.1f} structures/s end to end "
          f"({len(items)} structures, {predictor.mode}, {result['device']}, "
          f"{a.workers} graph worker(s); {cpu_seconds:.1f} CPU-s of this process; "
          f"1-min load {load_before:.2f} -> {os.getloadavg()[0]:.2f}); start (models "
          f"read and built, first 64 predicted): {start_seconds:.1f} s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4.5))
        for ax, (j, t) in zip(np.atleast_1d(axes), enumerate(targets), strict=True):
            ax.errorbar(y[:, j], pred[:, j], yerr=sig[:, j], fmt="o", ms=2, alpha=0.3,
                        elinewidth=0.5)
            lo, hi = np.nanmin(y[:, j]), np.nanmax(y[:, j])
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_xlabel(f"{t} (reference)")
            ax.set_ylabel(f"{t} (Crysformer ± sigma)")
        fig.tight_layout()
        fig.savefig(a.out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
