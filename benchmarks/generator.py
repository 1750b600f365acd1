"""Generator benchmark: CSP match rate/RMSE, throughput, valid fraction over time, statistics.

Measures, and writes to ``benchmarks/results/generator.json`` with plots beside it:
  * CSP, one sample per composition, on the Perov-5 test split (``--csp-checkpoint``, a
    model trained on Perov-5) and on MP 2018.6.1 validation crystals of <= 20 atoms
    (``--checkpoint``, the MP model): match rate and RMSE with StructureMatcher stol=0.5,
    ltol=0.3, angle_tol=10 (published: Perov-5 DiffCSP 52.02%/0.0760, EquiCSP
    52.02%/0.0707; MP-20 DiffCSP 51.49%, EquiCSP 57.59%). A prediction that is not a
    valid structure (atoms closer than 0.5 A, or volume <= 0.1 A^3) counts as no match,
    as in CDVAE/DiffCSP.
  * throughput of ab initio generation: generated structures per hour (sampler alone) and
    valid structures per hour after every filter (paper: 5,663 and 1,859 per hour);
  * valid fraction over time for the p(N) strategies data, uniform and hybrid (Fig. 6b);
    duplicates are judged against the run's earlier survivors and the model's training set;
  * element frequencies, atoms per cell and crystal systems of the valid structures (Fig. 7).

    python benchmarks/generator.py --csp-checkpoint models/generator/perov5.pt \\
        --checkpoint models/generator/generator.pt --minutes-per-strategy 2
    python benchmarks/generator.py --only csp-perov5 --csp-limit 500     # a quick look
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.directive.data import CrystalSet, load_split, load_training_data  # noqa: E402
from matcouple.directive.sample import (  # noqa: E402
    Generator,
    load_generator,
    sample_crystals,
    size_sampler,
    to_structures,
)
from matcouple.settings import get_settings  # noqa: E402
from matcouple.structures.filters import (  # noqa: E402
    DuplicateFinder,
    FilterReport,
    apply_filters,
)

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("csp-perov5", "csp-mp2018", "throughput", "strategies")


# ---------------------------------------------------------------- CSP
def _match_one(pair) -> float | None:
    """RMS distance (normalised by (V/N)^(1/3)) of a matched pair, None if no match."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from matcouple.store.materials import MATCHER_TOLERANCES
    from matcouple.structures.filters import min_distance

    pred, true = pair
    if pred is None or pred.volume <= 0.1 or min_distance(pred) < 0.5:
        return None
    try:
        rms = StructureMatcher(**MATCHER_TOLERANCES).get_rms_dist(pred, true)
    except Exception:
        return None
    return None if rms is None else float(rms[0])


def csp_benchmark(gen: Generator, data: CrystalSet, name: str, batch_size: int,
                  steps: int | None, pool: ProcessPoolExecutor, seed: int = 0) -> dict:
    """One sample per crystal of ``data`` with its composition given; match rate and RMSE."""
    predictions: list = []
    t0 = time.monotonic()
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        b = data.select(idx)
        sampled = sample_crystals(gen, b.num_atoms, b.atomic_numbers, steps=steps,
                                  seed=seed + start)
        predictions.extend(to_structures(sampled))
        print(f"  {name}: sampled {len(predictions)}/{len(data)}", flush=True)
    sample_s = time.monotonic() - t0
    truths = [data.structure(k) for k in range(len(data))]
    rms = list(pool.map(_match_one, zip(predictions, truths, strict=True), chunksize=32))
    matched = [r for r in rms if r is not None]
    result = {
        "dataset": name, "n": len(data), "matched": len(matched),
        "match_rate_percent": round(100 * len(matched) / len(data), 2),
        "rmse": round(sum(matched) / len(matched), 4) if matched else None,
        "sampling_seconds": round(sample_s, 1), "steps": steps or get_settings().generation_steps,
        "model_version": gen.version,
    }
    print(f"CSP {name}: match rate {result['match_rate_percent']}%  RMSE {result['rmse']}  "
          f"({len(data)} crystals, sampling {sample_s:.0f} s)")
    return result


# ---------------------------------------------------------------- ab initio runs
def _training_lookup(data: CrystalSet) -> dict[str, list[int]]:
    from pymatgen.core import Composition, Element

    by_formula: dict[str, list[int]] = collections.defaultdict(list)
    offsets = data.offsets.tolist()
    numbers = data.atomic_numbers.tolist()
    for k, (start, n) in enumerate(zip(offsets, data.num_atoms.tolist(), strict=True)):
        counts = collections.Counter(numbers[start:start + n])
        comp = Composition({Element.from_Z(z): c for z, c in counts.items()})
        by_formula[comp.reduced_formula].append(k)
    return by_formula


def _seed_duplicates(finder: DuplicateFinder, structures, data: CrystalSet,
                     lookup: dict[str, list[int]], loaded: set[str]) -> None:
    """Put the training crystals of the batch's formulas into the duplicate finder."""
    for s in structures:
        if s is None:
            continue
        formula = s.composition.reduced_formula
        if formula in loaded:
            continue
        loaded.add(formula)
        finder.seen[formula].extend(data.structure(k) for k in lookup.get(formula, []))


def strategy_run(gen: Generator, strategy: str, minutes: float, batch_size: int,
                 steps: int | None, pool: ProcessPoolExecutor, train: CrystalSet,
                 lookup: dict[str, list[int]], seed: int = 0) -> dict:
    """Generate for ``minutes``; per batch: time, candidates, survivors (Fig. 6b)."""
    sizer = size_sampler(strategy, gen.size_histogram)
    finder = DuplicateFinder()
    loaded: set[str] = set()
    total = FilterReport()
    series, survivors = [], []
    sample_s = 0.0
    t0 = time.monotonic()
    index = 0
    while time.monotonic() - t0 < 60 * minutes:
        used = getattr(sizer, "current", strategy)
        sizes = sizer.sample(batch_size, torch.Generator().manual_seed(seed + index))
        ts = time.monotonic()
        sampled = sample_crystals(gen, sizes, steps=steps, seed=seed + index)
        if gen.device.type == "cuda":
            torch.cuda.synchronize()
        sample_s += time.monotonic() - ts
        structures = to_structures(sampled)
        _seed_duplicates(finder, structures, train, lookup, loaded)
        usable = [s for s in structures if s is not None]
        kept, report = apply_filters(usable, finder,
                                     lambda fn, xs: pool.map(fn, xs, chunksize=16))
        report.candidates = len(structures)
        report.removed["sane_volume"] += len(structures) - len(usable)
        total.add(report)
        sizer.record(report.survivors / max(1, report.candidates))
        survivors.extend(usable[i] for i in kept)
        series.append({"t_s": round(time.monotonic() - t0, 1), "batch": index,
                       "p_n": used, "candidates": report.candidates,
                       "survivors": report.survivors,
                       "valid_fraction": round(report.survivors / report.candidates, 4)})
        print(f"  {strategy}: batch {index} ({used}) valid {series[-1]['valid_fraction']:.3f}"
              f" at {series[-1]['t_s']} s", flush=True)
        index += 1
    wall = time.monotonic() - t0
    return {"strategy": strategy, "seconds": round(wall, 1), "report": total.as_dict(),
            "series": series, "sampling_seconds": round(sample_s, 1),
            "generated_per_hour_sampler": round(total.candidates / sample_s * 3600),
            "generated_per_hour": round(total.candidates / wall * 3600),
            "valid_per_hour": round(total.survivors / wall * 3600),
            "_survivors": survivors}


def structure_statistics(structures) -> dict:
    """Element frequencies, atoms per cell and crystal systems (paper Fig. 7)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    symprec = get_settings().filter_symprec
    elements: collections.Counter = collections.Counter()
    sizes: collections.Counter = collections.Counter()
    systems: collections.Counter = collections.Counter()
    for s in structures:
        elements.update(el.symbol for el in s.composition.elements)
        sizes[len(s)] += 1
        systems[SpacegroupAnalyzer(s, symprec=symprec).get_crystal_system()] += 1
    return {"n": len(structures), "elements": dict(elements.most_common()),
            "atoms_per_cell": dict(sorted(sizes.items())), "crystal_systems": dict(systems)}


# ---------------------------------------------------------------- plots
def plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    runs = results.get("strategies", {})
    if runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, run in runs.items():
            ts = [p["t_s"] / 60 for p in run["series"]]
            ax.plot(ts, [p["valid_fraction"] for p in run["series"]], marker=".", label=name)
        ax.set_xlabel("time (min)")
        ax.set_ylabel("valid fraction per batch")
        ax.set_title("valid fraction over time by p(N) strategy")
        ax.legend()
        fig.tight_layout()
        path = out / "generator_valid_fraction.png"
        fig.savefig(path, dpi=120)
        files.append(str(path))
        plt.close(fig)
    stats = results.get("statistics")
    if stats and stats["n"]:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        top = list(stats["elements"].items())[:40]
        axes[0].bar([k for k, _ in top], [v for _, v in top])
        axes[0].tick_params(axis="x", labelrotation=90, labelsize=7)
        axes[0].set_title("element frequency (top 40)")
        sizes = stats["atoms_per_cell"]
        axes[1].bar([int(k) for k in sizes], list(sizes.values()))
        axes[1].set_title("atoms per cell")
        systems = stats["crystal_systems"]
        axes[2].bar(list(systems), list(systems.values()))
        axes[2].tick_params(axis="x", labelrotation=45)
        axes[2].set_title("crystal systems")
        fig.suptitle(f"{stats['n']} valid generated structures")
        fig.tight_layout()
        path = out / "generator_statistics.png"
        fig.savefig(path, dpi=120)
        files.append(str(path))
        plt.close(fig)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="MP 2018 generator (default: the configured checkpoint)")
    parser.add_argument("--csp-checkpoint", type=Path, default=None,
                        help="Perov-5 model for the Perov-5 CSP benchmark")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts: {', '.join(PARTS)}")
    parser.add_argument("--csp-limit", type=int, default=None, help="first N test crystals")
    parser.add_argument("--steps", type=int, default=None, help="reverse diffusion steps")
    parser.add_argument("--csp-batch-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2048, help="ab initio batch size")
    parser.add_argument("--minutes-per-strategy", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "generator.json")
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        if "csp-perov5" in parts:
            gen = load_generator(args.csp_checkpoint, args.device)
            data = load_split("perov5", "test", limit=args.csp_limit)
            results["csp_perov5"] = csp_benchmark(gen, data, "perov5-test",
                                                  args.csp_batch_size, args.steps, pool)
        gen = None
        if "csp-mp2018" in parts:
            gen = load_generator(args.checkpoint, args.device)
            data = load_split("mp2018", "val", max_atoms=20, limit=args.csp_limit)
            results["csp_mp2018"] = csp_benchmark(gen, data, "mp2018-val<=20",
                                                  args.csp_batch_size // 4, args.steps, pool)
        if "throughput" in parts or "strategies" in parts:
            gen = gen or load_generator(args.checkpoint, args.device)
            train = load_training_data(list(gen.train_config.datasets), "train",
                                       gen.max_atoms, gen.train_config.limit)
            lookup = _training_lookup(train)
            names = ["data", "uniform", "hybrid"] if "strategies" in parts else ["data"]
            runs = {name: strategy_run(gen, name, args.minutes_per_strategy, args.batch_size,
                                       args.steps, pool, train, lookup)
                    for name in names}
            valid = [s for run in runs.values() for s in run.pop("_survivors")]
            results["strategies"] = runs
            best = runs["data"]
            results["throughput"] = {
                "generated_per_hour_sampler": best["generated_per_hour_sampler"],
                "generated_per_hour": best["generated_per_hour"],
                "valid_per_hour": best["valid_per_hour"],
                "batch_size": args.batch_size, "steps": args.steps or
                get_settings().generation_steps, "model_version": gen.version,
                "paper": {"generated_per_hour": 5663, "valid_per_hour": 1859}}
            print(f"throughput: {best['generated_per_hour_sampler']} generated/h (sampler), "
                  f"{best['generated_per_hour']} generated/h and {best['valid_per_hour']} "
                  "valid/h with filters")
            results["statistics"] = structure_statistics(valid)
    results["plots"] = plot(results, out_dir)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
