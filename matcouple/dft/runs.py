"""Run a submitted DFT run here with FireWorks' own launcher, and read its results back."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

from fireworks import FWorker, LaunchPad
from fireworks.core.rocket_launcher import rapidfire

from matcouple.store.materials import MaterialsStore


@contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def launch_run_here(lp: LaunchPad, run: str, workdir: Path) -> None:
    """``rlaunch rapidfire`` restricted to this run's Fireworks (retries included)."""
    worker = FWorker(name="matcouple-dft-run", query={"spec.matcouple_run": run})
    # FireWorks logs to stdout; keep stdout for the results table / JSON.
    with _cwd(workdir), redirect_stdout(sys.stderr):
        rapidfire(lp, worker, nlaunches=0, sleep_time=0, strm_lvl="WARNING")


def run_results(lp: LaunchPad, run: str) -> list[dict[str, Any]]:
    """One row per structure of the run: state, relaxed lattice, energies, failures."""
    rows = []
    store = MaterialsStore(lp.db)
    fws = lp.fireworks.find({"spec.matcouple_run": run,
                             "spec._tasks.0._fw_name": {"$regex": "DFTRelaxStaticTask"}},
                            {"fw_id": 1, "state": 1, "spec._tasks": 1})
    latest: dict[str, dict[str, Any]] = {}
    for fw in sorted(fws, key=lambda d: d["fw_id"]):
        task = fw["spec"]["_tasks"][0]
        latest[task["material_id"]] = {"fw_id": fw["fw_id"], "state": fw["state"],
                                       "task": task}
    for material_id, info in latest.items():
        task = info["task"]
        source = f"{task['engine']}-{task['preset']}"
        doc = store.get(source, material_id) if info["state"] == "COMPLETED" else None
        row: dict[str, Any] = {"material_id": material_id, "state": info["state"],
                               "fw_id": info["fw_id"], "attempt": task.get("attempt", 1)}
        if doc is not None:
            lattice = doc["structure"]["lattice"]
            dft = doc["dft"]
            row.update(formula=doc["reduced_formula"], a=lattice["a"], b=lattice["b"],
                       c=lattice["c"], energy_per_atom=dft["energy_per_atom"],
                       formation_energy_per_atom=dft["formation_energy_per_atom"],
                       band_gap=dft["band_gap"], fidelity=doc["fidelity"],
                       wall_s=dft["timings"].get("total_s"))
        elif info["state"] == "FIZZLED":
            launch = lp.launches.find_one({"fw_id": info["fw_id"]}, sort=[("launch_id", -1)])
            exc = (launch or {}).get("action", {}).get("stored_data", {}).get("_exception", {})
            row["error"] = str(exc.get("_stacktrace", "")).strip().splitlines()[-1:] or ["?"]
        rows.append(row)
    return rows
