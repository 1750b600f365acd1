"""`make demo`: the main job once, on the embedded database.

Start the embedded server, load the MP 2018 CI subset (and the MP 2018 entries of the
requested formula) into the materials collection, then run the paper's design request
(section 4.3) with demo-sized limits through the design workflow and local `rlaunch`
workers, and show the report (table, counts, JSON and the per-iteration plot under
launchpad/design/<run>/). `run_screening_demo` is the earlier plumbing demo (screening).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from rich.console import Console

from matcouple.datasets import known_dataset
from matcouple.errors import MatcoupleError
from matcouple.ingest import ingest
from matcouple.screening import (
    collect_structures,
    screening_results,
    submit_screening,
    summary_table,
)
from matcouple.settings import get_settings
from matcouple.store.connection import LaunchpadConfig, embedded_server, open_database
from matcouple.store.materials import MaterialsStore


def _rlaunch(config: LaunchpadConfig, workdir: Path, category: str) -> None:
    """Run FireWorks' `rlaunch rapidfire` on the demo's Fireworks only (by category)."""
    fworker = workdir / "fworker.yaml"
    fworker.write_text(yaml.safe_dump(
        {"name": "matcouple-demo", "category": category, "query": "{}", "env": {}}))
    exe = shutil.which("rlaunch", path=str(Path(sys.executable).parent)) or "rlaunch"
    env = {**os.environ, "MATCOUPLE_LAUNCHPAD": str(config.path)}
    proc = subprocess.run(
        [exe, "-l", str(config.path), "-w", str(fworker), "--loglvl", "WARNING",
         "rapidfire", "--nlaunches", "0"],
        cwd=workdir, env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise MatcoupleError(f"rlaunch failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def _plot(docs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.scatter([d["volume_per_atom_A3"] for d in docs], [d["density_g_cm3"] for d in docs],
                s=8, alpha=0.6)
    ax1.set_xlabel("volume per atom (A^3)")
    ax1.set_ylabel("density (g/cm^3)")
    systems: dict[str, int] = {}
    for d in docs:
        key = d["symmetry"]["crystal_system"]
        systems[key] = systems.get(key, 0) + 1
    ax2.bar(list(systems), list(systems.values()))
    ax2.set_ylabel("structures")
    ax2.tick_params(axis="x", rotation=45)
    fig.suptitle(f"screening of {len(docs)} structures")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_screening_demo(n: int = 512, launchpad: Path | None = None,
                       console: Console | None = None):
    console = console or Console()
    settings = get_settings()
    config = LaunchpadConfig.load(launchpad)
    if config.is_local:
        status = embedded_server(config).start(timeout_s=settings.db_start_timeout_s)
        console.print(status.describe())
    store = MaterialsStore(open_database(config))
    spec = known_dataset("mp2018", "ci")
    report = ingest(spec, store)
    console.print(report.summary())
    structures, _ = collect_structures(config, [], limit=n, dataset=spec.name)
    category = "matcouple-demo"
    run, fw_ids = submit_screening(config, structures, category=category)
    console.print(f"submitted run {run}: {len(structures)} structures in {len(fw_ids)} "
                  "Fireworks; running `rlaunch rapidfire` ...")
    workdir = settings.root / "launchpad" / "demo" / run
    workdir.mkdir(parents=True, exist_ok=True)
    _rlaunch(config, workdir, category)
    docs = screening_results(run, config.path)
    console.print(summary_table(docs, title=f"screening {run}: {len(docs)} structures"))
    out = workdir / "screening.json"
    out.write_text(json.dumps([{k: v for k, v in d.items() if k != "updated_at"}
                               for d in docs], indent=1, default=str))
    _plot(docs, workdir / "screening.png")
    console.print(f"results: {out} and {workdir / 'screening.png'}")
    console.print(f"inspect: lpad -l {config.path} get_wflows -d more")
    if len(docs) != len(structures):
        raise MatcoupleError(f"only {len(docs)} of {len(structures)} screening results stored")
    return docs


DEMO_REQUEST = ("Please generate up to 50 structures of Fe2O3 materials with a formation "
                "energy of less than 1 eV/atom")


def load_formula_rows(store: MaterialsStore, formula: str) -> int:
    """Load the MP 2018 entries of one formula (the full set's rows, not only the subset)."""
    import dataclasses
    import tempfile

    from matcouple.datasets import read_table
    from matcouple.store.materials import normalise_formula

    spec = known_dataset("mp2018")
    frame = read_table(spec.path)
    rows = frame[frame["reduced_formula"] == normalise_formula(formula)]
    if rows.empty:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.csv"
        rows.to_csv(path, index=False)
        report = ingest(dataclasses.replace(spec, path=path), store, progress=False)
    return report.written


def run_demo(request: str = DEMO_REQUEST, *, max_iterations: int = 3, max_dft: int = 0,
             batch_size: int = 16, steps: int = 100, formula_units: tuple[int, ...] = (1,),
             workers: int = 2, run: str | None = None, launchpad: Path | None = None,
             console: Console | None = None) -> dict:
    """Load data, run the design request with demo limits, print and return its report."""
    import time

    from matcouple.coordinate import designrun as dr
    from matcouple.coordinate.cli import _launch
    from matcouple.coordinate.planner import describe_plan
    from matcouple.coordinate.report import report_tables, write_report
    from matcouple.coordinate.request import parse_request
    from matcouple.coordinate.workflow import default_run_name, submit_design

    console = console or Console()
    start = time.monotonic()
    settings = get_settings()
    config = LaunchpadConfig.load(launchpad)
    if config.is_local:
        status = embedded_server(config).start(timeout_s=settings.db_start_timeout_s)
        console.print(status.describe())
    db = open_database(config)
    store = MaterialsStore(db)
    console.print(ingest(known_dataset("mp2018", "ci"), store).summary())
    req = parse_request(request)
    console.print(f"loaded {load_formula_rows(store, req.formula)} MP 2018 entries of "
                  f"{req.reduced_formula}")
    cfg = dr.DesignConfig(request=req, run=run or default_run_name(req.reduced_formula),
                          max_iterations=max_iterations, max_dft=max_dft,
                          batch_size=batch_size, steps=steps,
                          formula_units=list(formula_units),
                          launchpad_file=str(config.path.resolve()))
    console.print(f"request: {request}")
    for line in describe_plan(cfg):
        console.print(f"  - {line}")
    name, _ = submit_design(cfg, config)
    _launch(config.path.resolve(), db, name, workers)
    report, json_path, png = write_report(db, name)
    table, counts = report_tables(report)
    console.print(table)
    console.print(counts)
    console.print(f"stopped: {report['stop_reason']}; workflow {report['workflow_state']}; "
                  f"{time.monotonic() - start:.0f} s in all")
    console.print(f"report: {json_path} and {png}")
    console.print(f"inspect: lpad -l {config.path} get_wflows -d more; "
                  f"matcouple report {name}")
    if max_dft == 0:
        console.print("DFT budget 0: low-confidence candidates are recorded as skipped. "
                      "`matcouple demo --max-dft 1` runs GPAW (fast) on one of them; a "
                      "generated Fe2O3 cell (5 atoms, spin-polarised) takes well over 30 "
                      "minutes on 2 cores, a 2-atom Li cell about a minute.")
    if report["workflow_state"] != "COMPLETED":
        raise MatcoupleError(f"design run {name} ended in state {report['workflow_state']}; "
                             f"see launchpad/design/{name}/launches/")
    return report
