"""DFT benchmark: wall time per structure and formation energies against MP 2018.

For each preset (``fast``, ``standard``) relaxes a few small binary cells taken from the
MP 2018 set (its lowest-energy entry of each formula, primitive cell) with the open engine,
computes the elemental references with the same settings (cached in MongoDB, timed
separately) and compares the formation energy per atom with MP's value. MP's values are
GGA/GGA+U with MP's anion corrections; ours are plain PBE against gas-phase molecules, so
a systematic offset (mostly from O2/F2/N2/Cl2 overbinding) is expected and reported.

Starts its own embedded database (temporary storage, free port) unless ``--launchpad``
names one, so your reference cache is untouched.

    python benchmarks/dft.py                                  # fast + standard, 5 binaries
    python benchmarks/dft.py --presets fast --formulas Si MgO
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pymatgen.core import Composition, Structure
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.dft.calculation import run_dft  # noqa: E402
from matcouple.dft.engine import get_engine  # noqa: E402
from matcouple.dft.references import ReferenceEnergies  # noqa: E402
from matcouple.settings import get_settings  # noqa: E402
from matcouple.store.connection import LaunchpadConfig, open_database  # noqa: E402
from matcouple.store.server import EmbeddedServer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Non-layered references only: layered elements (black P, graphite) relax slowly without vdW.
DEFAULT_FORMULAS = ["Si", "MgO", "NaCl", "LiF", "KCl"]


def mp_entries(formulas: list[str]) -> dict[str, dict]:
    """The lowest-formation-energy MP 2018 entry of each formula (structure, E_f, gap)."""
    settings = get_settings()
    df = pd.read_csv(settings.data_dir / settings.datasets["mp2018"], keep_default_na=False,
                     na_values=[""])
    out = {}
    for formula in formulas:
        rows = df[df["reduced_formula"] == formula].sort_values("formation_energy_per_atom")
        if rows.empty:
            raise SystemExit(f"{formula} is not in the MP 2018 set")
        row = rows.iloc[0]
        structure = Structure.from_str(row["cif"], fmt="cif").get_primitive_structure()
        out[formula] = {"material_id": row["material_id"], "structure": structure,
                        "e_form": float(row["formation_energy_per_atom"]),
                        "band_gap": float(row["band_gap"])}
    return out


def mp2020_anion_correction(formula: str) -> float:
    """MP2020's anion correction per atom for a simple binary (0 if none applies).

    Applied to our plain-PBE formation energies only to show how much of the offset from
    MP is MP's fitted correction of gas-phase anion references.
    """
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    comp = Composition(formula)
    if len(comp.elements) < 2:
        return 0.0
    anion = max(comp.elements, key=lambda el: el.X)
    key = "oxide" if anion.symbol == "O" else anion.symbol
    corr = MaterialsProject2020Compatibility().comp_correction.get(key, 0.0)
    return corr * comp[anion] / comp.num_atoms


def summarize(rows: list[dict], presets: list[str]) -> dict:
    """Per preset: wall time per structure, E_f offset and MAE vs MP (compounds only)."""
    summary = {}
    for preset in presets:
        sel = [r for r in rows if r["preset"] == preset]
        for r in sel:
            r["e_form_anion_corrected"] = r["e_form"] + mp2020_anion_correction(r["formula"])
            r["e_form_corrected_diff"] = r["e_form_anion_corrected"] - r["e_form_mp"]
        compounds = [r for r in sel if len(Composition(r["formula"]).elements) > 1]
        diffs = np.array([r["e_form_diff"] for r in compounds])
        corrected = np.array([r["e_form_corrected_diff"] for r in compounds])
        summary[preset] = {
            "median_wall_s_per_structure": float(np.median([r["wall_s"] for r in sel])),
            "mean_wall_s_per_structure": float(np.mean([r["wall_s"] for r in sel])),
            "e_form_offset_mean": float(diffs.mean()) if len(diffs) else None,
            "e_form_mae": float(np.abs(diffs).mean()) if len(diffs) else None,
            "e_form_mae_after_offset": (float(np.abs(diffs - diffs.mean()).mean())
                                        if len(diffs) else None),
            "e_form_mae_with_mp2020_anion_corrections": (float(np.abs(corrected).mean())
                                                         if len(corrected) else None),
            "n_compounds": len(compounds),
        }
    return summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(args: argparse.Namespace, config: LaunchpadConfig, workdir: Path,
          partial: Path) -> dict:
    engine = get_engine(args.engine)
    entries = mp_entries(args.formulas)
    db = open_database(config)
    rows = []
    for preset in args.presets:
        refs = ReferenceEnergies(db, engine, preset, workdir=workdir)
        for formula in tqdm(args.formulas, desc=f"{args.engine}/{preset}"):
            entry = entries[formula]
            elements = sorted(el.symbol for el in entry["structure"].composition.elements)
            ref_times = {}
            for el in elements:  # references first, so their cost is not the structure's
                t0 = time.perf_counter()
                refs.get_or_compute(el)
                ref_times[el] = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = run_dft(entry["structure"], engine, preset,
                             workdir=workdir / preset / formula, references=refs)
            wall = time.perf_counter() - t0
            start, end = entry["structure"], result.structure
            row = {
                "preset": preset, "formula": formula, "mp_id": entry["material_id"],
                "nsites": len(end), "wall_s": wall, "relax_s": result.timings["relax_s"],
                "static_s": result.timings["static_s"], "ionic_steps": result.n_ionic_steps,
                "reference_s": ref_times,
                "volume_change_vs_mp": end.volume / start.volume - 1,
                "e_form": result.formation_energy_per_atom, "e_form_mp": entry["e_form"],
                "e_form_diff": result.formation_energy_per_atom - entry["e_form"],
                "band_gap": result.band_gap, "band_gap_mp": entry["band_gap"],
                "energy_per_atom": result.energy_per_atom,
            }
            rows.append(row)
            partial.write_text(json.dumps(rows, indent=1))  # kept if the run is cut short
            tqdm.write(f"{preset:8s} {formula:5s} {wall:6.1f} s  E_f {row['e_form']:+.3f} "
                       f"(MP {row['e_form_mp']:+.3f})  gap {row['band_gap']:.2f} "
                       f"(MP {row['band_gap_mp']:.2f})  "
                       f"dV {100 * row['volume_change_vs_mp']:+.1f}%")
    summary = summarize(rows, args.presets)
    return {"engine": args.engine, "rows": rows, "summary": summary,
            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    presets = list(data["summary"])
    formulas = list(dict.fromkeys(r["formula"] for r in data["rows"]))
    width = 0.8 / max(len(presets), 1)
    for i, preset in enumerate(presets):
        walls = [next((r["wall_s"] for r in data["rows"]
                       if r["preset"] == preset and r["formula"] == f), 0) for f in formulas]
        ax1.bar(np.arange(len(formulas)) + i * width, walls, width, label=preset)
        sel = [r for r in data["rows"] if r["preset"] == preset]
        ax2.scatter([r["e_form_mp"] for r in sel], [r["e_form"] for r in sel], label=preset)
        for r in sel:
            ax2.annotate(r["formula"], (r["e_form_mp"], r["e_form"]), fontsize=7)
    ax1.set_xticks(np.arange(len(formulas)) + width * (len(presets) - 1) / 2, formulas)
    ax1.set_ylabel("wall time per structure (s)")
    ax1.set_title(f"{data['engine']}: relax + static")
    ax1.legend()
    lims = [min(r["e_form_mp"] for r in data["rows"]) - 0.3, 0.3]
    ax2.plot(lims, lims, "k--", lw=0.8)
    ax2.set_xlabel("MP 2018 formation energy (eV/atom)")
    ax2.set_ylabel(f"{data['engine']} formation energy (eV/atom)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="gpaw")
    parser.add_argument("--presets", nargs="+", default=["fast", "standard"])
    parser.add_argument("--formulas", nargs="+", default=DEFAULT_FORMULAS)
    parser.add_argument("--launchpad", type=Path, help="use this database (and its cache)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="recompute summary and plot from the saved JSON")
    args = parser.parse_args()
    # A kill (SIGTERM) unwinds like Ctrl-C, so the embedded server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"dft_{args.engine}.json"
    if args.summarize_only:
        data = json.loads(out.read_text())
        data["summary"] = summarize(data["rows"], list(data["summary"]))
        report(data, out)
        return
    with tempfile.TemporaryDirectory(prefix="matcouple-dft-bench-") as tmp:
        tmp_path = Path(tmp)
        server = None
        if args.launchpad:
            config = LaunchpadConfig.load(args.launchpad)
        else:
            server = EmbeddedServer(host="127.0.0.1", port=_free_port(),
                                    storage_path=tmp_path / "db", run_dir=tmp_path / "run")
            server.start(timeout_s=60)
            path = tmp_path / "lp.yaml"
            path.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": server.port,
                                            "name": "dft_bench", "strm_lvl": "ERROR"}))
            config = LaunchpadConfig.load(path)
        try:
            data = bench(args, config, tmp_path / "calcs", out.with_suffix(".partial.json"))
        finally:
            if server is not None:
                server.stop()
    report(data, out)


def report(data: dict, out: Path) -> None:
    out.write_text(json.dumps(data, indent=1))
    plot(data, out.with_suffix(".png"))
    print(f"{'preset':8s} {'formula':7s} {'wall s':>7s} {'E_f':>7s} {'E_f+corr':>8s} "
          f"{'MP':>7s} {'gap':>5s} {'MP gap':>6s} {'dV%':>5s}")
    for r in data["rows"]:
        print(f"{r['preset']:8s} {r['formula']:7s} {r['wall_s']:7.1f} {r['e_form']:+7.3f} "
              f"{r['e_form_anion_corrected']:+8.3f} {r['e_form_mp']:+7.3f} "
              f"{r['band_gap']:5.2f} {r['band_gap_mp']:6.2f} "
              f"{100 * r['volume_change_vs_mp']:+5.1f}")
    for preset, s in data["summary"].items():
        print(f"{preset:8s} median {s['median_wall_s_per_structure']:.1f} s/structure; "
              f"E_f offset vs MP {s['e_form_offset_mean']:+.3f} eV/atom, MAE "
              f"{s['e_form_mae']:.3f} ({s['e_form_mae_after_offset']:.3f} after removing the "
              f"offset, {s['e_form_mae_with_mp2020_anion_corrections']:.3f} with MP2020 anion "
              "corrections)")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
