"""The parts the surrogate's uncertainty is made of, on a labelled split, for studies of how
to combine them into the sigma the design policy trusts.

For each crystal of the split it writes to ``OUT.npz``: the reference labels, each ensemble
member's deterministic prediction (dropout off), each member's MC-dropout mean and variance
(``--mc-samples`` passes, seeded), and the number of sites. Nothing is calibrated here;
``benchmarks/sigma_study.py`` fits and checks combinations on held-out halves.

    python benchmarks/uncertainty_parts.py --device cuda --mc-samples 16   # GPU, ~1 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.settings import get_settings  # noqa: E402
from matcouple.surrogate.data import load_graphs  # noqa: E402
from matcouple.surrogate.experiments import model_predictions  # noqa: E402
from matcouple.surrogate.predict import SurrogatePredictor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=settings.data_dir / settings.datasets["mp2018"])
    p.add_argument("--split-column", default="megnet_split")
    p.add_argument("--split", default="val")
    p.add_argument("--models", type=Path, default=None, help="folder with a model card")
    p.add_argument("--mc-samples", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="graph-building processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "uncertainty_parts.npz")
    p.add_argument("--point", type=Path, default=None,
                   help="also save this exported model's dropout-off predictions (a "
                        "single model the ensemble's spread could give a sigma to)")
    a = p.parse_args()

    predictor = SurrogatePredictor.default(device=a.device, model_dir=a.models, mc_samples=0)
    graph_set = load_graphs(a.data, predictor.targets, split_column=a.split_column,
                            split=a.split, spec=predictor.spec, workers=a.workers)
    graphs = graph_set.graphs
    t0 = time.perf_counter()
    deterministic, _ = predictor.member_outputs(graphs, a.batch_size)
    predictor.mc_samples = a.mc_samples
    torch.manual_seed(a.seed)
    mc_mean, mc_var = predictor.member_outputs(graphs, a.batch_size)
    seconds = time.perf_counter() - t0
    extra = {}
    if a.point:
        extra = {"point": model_predictions(a.point, graphs, device=a.device,
                                            spec=predictor.spec),
                 "point_model": a.point.name}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        a.out, ids=np.array([g.material_id for g in graphs]),
        targets=np.array(predictor.targets), y=torch.cat([g.y for g in graphs]).numpy(),
        deterministic=deterministic, mc_mean=mc_mean, mc_var=mc_var,
        nsites=np.array([g.num_nodes for g in graphs]), mc_samples=a.mc_samples,
        model_version=predictor.version, **extra)
    print(f"{len(graphs)} structures ({len(graph_set.skipped)} skipped), "
          f"{len(predictor.models)} members x (1 + {a.mc_samples} MC passes) in "
          f"{seconds:.1f} s on {predictor.device}; wrote {a.out}")


if __name__ == "__main__":
    main()
