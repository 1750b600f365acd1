"""Run a design workflow here: FireWorks' own `rlaunch rapidfire` workers, one per slot.

Each worker is limited to the run's Fireworks (``spec.matcouple_run``) and stops when
the run has nothing ready, waiting or running. While they work, the run's progress is
read from MongoDB and shown. Lost runs (a killed worker) are found and rerun with
FireWorks' ``detect_lostruns``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from fireworks import LaunchPad

from matcouple.errors import MatcoupleError


def rlaunch_executable() -> str:
    return shutil.which("rlaunch", path=str(Path(sys.executable).parent)) or "rlaunch"


def worker_file(workdir: Path, run: str, name: str = "matcouple-design") -> Path:
    """A FireWorker file whose query takes only this run's Fireworks (any category)."""
    path = workdir / "fworker.yaml"
    path.write_text(yaml.safe_dump({"name": name, "category": "",
                                    "query": json.dumps({"spec.matcouple_run": run}),
                                    "env": {}}))
    return path


def start_worker(launchpad_file: Path, workdir: Path, run: str, *, index: int = 0,
                 sleep_s: int = 2) -> subprocess.Popen:
    """One `rlaunch rapidfire` process for the run (its output in ``worker<index>.log``)."""
    workdir = (Path(workdir) / f"worker{index}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    fworker = worker_file(workdir, run)
    env = {**os.environ, "MATCOUPLE_LAUNCHPAD": str(launchpad_file)}
    env.setdefault("OMP_NUM_THREADS", "1")
    log = open(workdir / "rlaunch.log", "ab")  # noqa: SIM115 - owned by the process
    return subprocess.Popen(
        [rlaunch_executable(), "-l", str(launchpad_file), "-w", str(fworker),
         "--loglvl", "WARNING", "rapidfire", "--nlaunches", "0", "--sleep", str(sleep_s)],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_workers(launchpad_file: Path, workdir: Path, run: str, workers: int,
                on_tick: Callable[[], None] | None = None, tick_s: float = 3.0) -> list[int]:
    """Start ``workers`` rlaunch processes and wait for all; returns their exit codes."""
    procs = [start_worker(launchpad_file, workdir, run, index=k) for k in range(workers)]
    try:
        while any(p.poll() is None for p in procs):
            if on_tick:
                on_tick()
            time.sleep(tick_s)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=30)
        raise MatcoupleError(
            f"interrupted; the run is kept. Continue with `matcouple design --run {run} "
            "--recover`") from None
    if on_tick:
        on_tick()
    return [p.returncode for p in procs]


def recover_lost_runs(lp: LaunchPad, run: str, expiration_s: int = 0) -> list[int]:
    """Rerun the run's Fireworks whose worker died (FireWorks' detect_lostruns --rerun).

    Only call this when no worker of the run is alive: with ``expiration_s`` 0 every
    RUNNING Firework of the run counts as lost.
    """
    _, lost_fw_ids, _ = lp.detect_lostruns(expiration_secs=expiration_s, rerun=True,
                                           query={"spec.matcouple_run": run})
    return list(lost_fw_ids)
