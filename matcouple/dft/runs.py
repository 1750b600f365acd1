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
    store = MaterialsStore(lp.db)
    rows = []
    for wf in lp.workflows.find({"metadata.run": run, "metadata.matcouple": "dft"},
                                sort=[("metadata.material_id", 1)]):
        meta = wf["metadata"]
        fws = list(lp.fireworks.find({"fw_id": {"$in": wf["nodes"]}},
                                     {"fw_id": 1, "state": 1, "name": 1}))
        attempts = [fw for fw in fws if fw["name"].startswith(("dft ", "dft retry"))]
        row: dict[str, Any] = {
            "material_id": meta["material_id"], "state": wf["state"],
            "fw_id": max(fw["fw_id"] for fw in (attempts or fws)),
            "attempt": len(attempts) or None, "engine": meta["engine"],
            "preset": meta["preset"],
        }
        doc = store.get(f"{meta['engine']}-{meta['preset']}", meta["material_id"])
        if doc is not None and wf["state"] == "COMPLETED":
            lattice = doc["structure"]["lattice"]
            dft = doc["dft"]
            row.update(formula=doc["reduced_formula"], a=lattice["a"], b=lattice["b"],
                       c=lattice["c"], energy_per_atom=dft["energy_per_atom"],
                       formation_energy_per_atom=dft["formation_energy_per_atom"],
                       band_gap=dft["band_gap"], fidelity=doc["fidelity"],
                       wall_s=dft["timings"].get("total_s"))
        for fw in fws:
            if fw["state"] == "FIZZLED":
                row["error"] = _exception(lp, fw["fw_id"])
        rows.append(row)
    return rows


def _exception(lp: LaunchPad, fw_id: int) -> str:
    launch = lp.launches.find_one({"fw_id": fw_id}, sort=[("launch_id", -1)]) or {}
    exc = launch.get("action", {}).get("stored_data", {}).get("_exception", {})
    lines = str(exc.get("_stacktrace", "")).strip().splitlines()
    return lines[-1] if lines else "fizzled (no exception recorded)"
