"""Pool the DFT checks of several design benchmark runs into one figure for tau's promise.

Each ``benchmarks/design.py`` run checks a few candidates with DFT; one run's sample is
too small to say whether >= 90% of them are within 0.12 eV/atom. This reads the JSON of
several runs (e.g. one per composition), prints each run's checks and the pooled share
within the bound with its 95% Wilson interval, and writes ``design_checks.json`` and a
parity plot (AI vs DFT, the +-0.12 band) beside it.

    python benchmarks/design_checks.py benchmarks/results/scan5_*.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from design import ERROR_BOUND, plot_checks

RESULTS = Path(__file__).resolve().parent / "results"


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion that stays inside [0, 1] for small samples."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def pooled_checks(paths: list[Path]) -> dict:
    """Every successful check of the runs, with the run it came from, and the totals."""
    rows, failures, runs = [], 0, []
    for path in paths:
        data = json.loads(path.read_text())
        ok = [r for r in data.get("checks", []) if isinstance(r.get("error"), float)]
        failures += len(data.get("checks", [])) - len(ok)
        runs.append({"file": path.name, "request": data.get("request"),
                     "pool": data.get("check_pool", "accepted"), "checked": len(ok),
                     "counts": data.get("counts")})
        rows += [{**r, "run": path.stem} for r in ok]
    within = sum(abs(r["error"]) <= ERROR_BOUND for r in rows)
    low, high = wilson_interval(within, len(rows))
    return {"runs": runs, "checks": rows, "checked": len(rows), "check_failures": failures,
            "within": within, "within_fraction": within / len(rows) if rows else None,
            "wilson95": [low, high],
            "mae": sum(abs(r["error"]) for r in rows) / len(rows) if rows else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="design.py JSON files")
    parser.add_argument("--out", type=Path, default=RESULTS / "design_checks.json")
    args = parser.parse_args()
    summary = pooled_checks(args.runs)
    for r in summary["checks"]:
        print(f"{r['run']:24s} {r['id']}: AI {r['ai']:+.3f} ± {r['sigma']:.3f}, DFT "
              f"{r['dft']:+.3f}, |error| {abs(r['error']):.3f}, p_match "
              f"{r.get('p_match') if r.get('p_match') is None else round(r['p_match'], 2)}")
    if summary["checked"]:
        low, high = summary["wilson95"]
        print(f"pooled: {summary['within']}/{summary['checked']} within {ERROR_BOUND} "
              f"eV/atom ({summary['within_fraction']:.0%}, 95% interval {low:.0%}-{high:.0%}),"
              f" MAE {summary['mae']:.3f} eV/atom; {summary['check_failures']} failed checks")
        plot_checks(summary["checks"], None, args.out.with_suffix(".png"),
                    group="run")
    else:
        print(f"no successful checks in {len(args.runs)} run(s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
