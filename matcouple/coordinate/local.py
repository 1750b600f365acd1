"""Run a design workflow here: FireWorks' own `rlaunch rapidfire` workers, one per slot.

Each worker is limited to the run's Fireworks (``spec.matcouple_run``) and keeps polling
(``rapidfire --nlaunches infinite``): a decide Firework adds work only when it completes,
so a worker that stopped at "nothing ready" would leave the others to do it alone. When
none of the run's Fireworks is ready, reserved or running (waiting ones then wait on a
fizzled parent), the idle workers are stopped. While they work, the run's progress is
read from MongoDB and shown. Lost runs (a killed worker) are found and rerun with
FireWorks' ``detect_lostruns``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
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
         "--loglvl", "WARNING", "rapidfire", "--nlaunches", "infinite", "--sleep",
         str(sleep_s)],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


ACTIVE_STATES = ("READY", "RESERVED", "RUNNING")


def run_active(lp: LaunchPad, run: str) -> bool:
    """Whether any Firework of the run is ready, reserved or running."""
    return lp.fireworks.count_documents({"spec.matcouple_run": run,
                                         "state": {"$in": list(ACTIVE_STATES)}}) > 0


def run_workers(launchpad_file: Path, workdir: Path, run: str, workers: int,
                on_tick: Callable[[], None] | None = None, tick_s: float = 3.0) -> list[int]:
    """Run ``workers`` rlaunch processes until the run has nothing left; their exit codes.

    A worker that dies is reported by its exit code; the others go on. Workers are stopped
    (SIGTERM, while idle) once no Firework of the run is ready, reserved or running.
    """
    from matcouple.store.connection import LaunchpadConfig, open_launchpad

    lp = open_launchpad(LaunchpadConfig.load(Path(launchpad_file)))
    procs = [start_worker(launchpad_file, workdir, run, index=k) for k in range(workers)]
    idle_checks = 0
    try:
        while any(p.poll() is None for p in procs):
            if on_tick:
                on_tick()
            idle_checks = 0 if run_active(lp, run) else idle_checks + 1
            if idle_checks >= 2:  # nothing left twice in a row: stop the idle workers
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    p.wait(timeout=60)
                return [0 if p.returncode == -signal.SIGTERM else p.returncode
                        for p in procs]
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
