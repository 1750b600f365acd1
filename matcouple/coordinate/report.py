"""The report of a design run: unique structures, counts, per-iteration plot, JSON.

Unique structures are the candidates that meet the target, taken in the order database,
DFT, AI (the more trusted value first), without space group 1 and without a crystal that
matches an earlier one (StructureMatcher, the literature's tolerances). The plot shows the
values per iteration as the paper's Fig. 11 does: AI-accepted predictions, and for each
DFT calculation the AI's prediction next to the DFT value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pymatgen.core import Structure
from pymongo.database import Database

from matcouple.coordinate import designrun as dr
from matcouple.settings import get_settings
from matcouple.structures.filters import DuplicateFinder

SOURCE_ORDER = {"database": 0, "dft": 1, "ai": 2}
SOURCE_NAMES = {"database": "database", "dft": "DFT", "ai": "AI"}


def _final_structure(cand: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    if cand.get("value_source") == "dft" and cand.get("dft"):
        return cand["dft"]["structure"], cand["dft"]["spacegroup"]
    return cand["structure"], cand["spacegroup"]


def unique_structures(cands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates meeting the target: no space group 1, no duplicates, trusted first."""
    finder = DuplicateFinder()
    rows = []
    meeting = sorted((c for c in cands if c.get("meets_target")),
                     key=lambda c: (SOURCE_ORDER.get(c.get("value_source"), 9), c["_id"]))
    for cand in meeting:
        structure_dict, sg = _final_structure(cand)
        if int(sg["number"]) == 1:
            continue
        structure = Structure.from_dict(structure_dict)
        if not finder.is_new(structure):
            continue
        pred = cand.get("prediction") or {}
        rows.append({"id": cand["_id"], "iteration": cand["iteration"],
                     "formula": structure.composition.reduced_formula,
                     "value": cand["value"], "source": SOURCE_NAMES[cand["value_source"]],
                     "spacegroup": sg["symbol"], "spacegroup_number": int(sg["number"]),
                     "nsites": len(structure), "material_id": cand.get("material_id") or
                     (cand.get("dft") or {}).get("material_id"),
                     "ai_value": pred.get("value"), "ai_sigma": pred.get("sigma"),
                     "p_match": (cand.get("decision") or {}).get("p_match")})
    return rows


def build_report(db: Database, run: str) -> dict[str, Any]:
    """Everything `matcouple report` shows, as one JSON-ready dict."""
    doc = dr.load_run(db, run)
    cfg = dr.DesignConfig.from_dict(doc["config"])
    cands = list(dr.candidates(db).find({"run": run}).sort("_id", 1))
    generation = doc.get("generation", {})
    sampled = sum(int(g["candidates"]) for g in generation.values())
    status = [c["status"] for c in cands]
    counts = {
        "database_hits": status.count("database"),
        "generated": sampled,
        "valid": sum(1 for c in cands if c["kind"] == "generated"),
        "ai_accepted": status.count("accepted"),
        "dft_run": sum(1 for c in cands if c["status"] in ("dft_done", "dft_failed")
                       and not c.get("reused_dft")),
        "dft_pending": status.count("dft_queued"),
        "dft_reused": sum(1 for c in cands if c.get("reused_dft")),
        "skipped_budget": status.count("skipped"),
        "iterations": len(generation),
    }
    unique = unique_structures(cands)
    counts["unique"] = len(unique)
    per_iteration = []
    for it in sorted({c["iteration"] for c in cands if c["kind"] == "generated"}
                     | {int(k) for k in generation}):
        rows = [c for c in cands if c["iteration"] == it and c["kind"] == "generated"]
        per_iteration.append({
            "iteration": it, "sampled": generation.get(str(it), {}).get("candidates", 0),
            "valid": len(rows),
            "ai": [{"id": c["_id"], "value": c["prediction"]["value"],
                    "sigma": c["prediction"]["sigma"]}
                   for c in rows if c["status"] == "accepted"],
            "dft": [{"id": c["_id"], "ai_value": (c.get("prediction") or {}).get("value"),
                     "ai_sigma": (c.get("prediction") or {}).get("sigma"),
                     "dft_value": c.get("value") if c["status"] == "dft_done" else None,
                     "status": c["status"]}
                    for c in rows if c["status"] in ("dft_queued", "dft_done", "dft_failed")],
            "skipped": [{"id": c["_id"], "value": c["prediction"]["value"],
                         "sigma": c["prediction"]["sigma"]}
                        for c in rows if c["status"] == "skipped"],
        })
    wf_state = _workflow_state(db, doc.get("wf_id"))
    return {"run": run, "request": cfg.request.as_dict(),
            "target": cfg.request.target.describe(), "tau": cfg.tau,
            "engine": cfg.engine, "preset": cfg.preset, "max_iterations": cfg.max_iterations,
            "max_dft": cfg.max_dft, "loop": doc.get("loop"),
            "stop_reason": doc.get("stop_reason"), "workflow_state": wf_state,
            "counts": counts, "unique": unique, "per_iteration": per_iteration,
            "created_at": str(doc.get("created_at"))}


def _workflow_state(db: Database, wf_id: int | None) -> str | None:
    if wf_id is None:
        return None
    wf = db["workflows"].find_one({"nodes": wf_id}, {"state": 1})
    return wf.get("state") if wf else None


def plot_iterations(report: dict[str, Any], path: Path) -> Path:
    """AI vs DFT values per iteration (paper Fig. 11), with the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    ai_x, ai_y, ai_s = [], [], []
    pred_x, pred_y, pred_s, dft_x, dft_y = [], [], [], [], []
    skip_x, skip_y, skip_s = [], [], []
    for row in report["per_iteration"]:
        for a in row.get("skipped", []):
            if a["value"] is not None:
                skip_x.append(row["iteration"])
                skip_y.append(a["value"])
                skip_s.append(a["sigma"] or 0.0)
        for a in row["ai"]:
            ai_x.append(row["iteration"])
            ai_y.append(a["value"])
            ai_s.append(a["sigma"])
        for d in row["dft"]:
            if d["ai_value"] is not None:
                pred_x.append(row["iteration"])
                pred_y.append(d["ai_value"])
                pred_s.append(d["ai_sigma"] or 0.0)
            if d["dft_value"] is not None:
                dft_x.append(row["iteration"])
                dft_y.append(d["dft_value"])
    if ai_x:
        ax.errorbar(ai_x, ai_y, yerr=ai_s, fmt="o", color="tab:blue", capsize=2,
                    label=f"AI accepted ({len(ai_x)})")
    if pred_x:
        ax.errorbar(pred_x, pred_y, yerr=pred_s, fmt="o", mfc="none", color="tab:gray",
                    capsize=2, label="AI, low confidence (sent to DFT)")
    if skip_x:
        ax.errorbar(skip_x, skip_y, yerr=skip_s, fmt="x", color="tab:orange", capsize=2,
                    alpha=0.6, label=f"AI, low confidence, DFT budget spent ({len(skip_x)})")
    if dft_x:
        ax.scatter(dft_x, dft_y, marker="s", color="tab:red", zorder=3,
                   label=f"DFT ({len(dft_x)})")
    request = report["request"]
    ax.axhline(request["target"]["value"], color="k", ls="--", lw=1,
               label=report["target"])
    ax.set_xlabel("iteration")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    unit = request["target"]["unit"]
    ax.set_ylabel(f"{request['target']['label']} ({unit})")
    counts = report["counts"]
    ax.set_title(f"{request['reduced_formula']}: {counts['unique']} unique, "
                 f"{counts['ai_accepted']} AI, {counts['dft_run']} DFT, "
                 f"{counts['database_hits']} database")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_dir(run: str) -> Path:
    settings = get_settings()
    base = Path(settings.design_reports_dir)
    return (base if base.is_absolute() else settings.root / base) / run


def write_report(db: Database, run: str, out_dir: Path | None = None
                 ) -> tuple[dict[str, Any], Path, Path]:
    """Build the report, write ``report.json`` and ``iterations.png``; return all three."""
    report = build_report(db, run)
    out_dir = Path(out_dir) if out_dir else report_dir(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    png = plot_iterations(report, out_dir / "iterations.png")
    return report, json_path, png


def report_tables(report: dict[str, Any]):
    """Rich tables: unique structures, and the counts."""
    from rich.table import Table

    unit = report["request"]["target"]["unit"]
    table = Table(title=f"design {report['run']}: {report['counts']['unique']} unique "
                        f"structure(s) with {report['target']}")
    for col in ("#", "formula", f"value ({unit})", "source", "AI sigma", "p_match",
                "space group", "sites", "id"):
        table.add_column(col)

    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.3f}"

    for k, row in enumerate(report["unique"], 1):
        table.add_row(str(k), row["formula"], f"{row['value']:.3f}", row["source"],
                      number(row.get("ai_sigma")), number(row.get("p_match")),
                      f"{row['spacegroup']} ({row['spacegroup_number']})", str(row["nsites"]),
                      str(row["material_id"] or row["id"]))
    counts = Table(title="counts")
    counts.add_column("what")
    counts.add_column("n", justify="right")
    for key, value in report["counts"].items():
        counts.add_row(key.replace("_", " "), str(value))
    return table, counts
