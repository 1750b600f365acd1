"""LaunchPad benchmark on the embedded server: ingest rate and Fireworks per second.

Starts its own embedded server (temporary storage, free port) so it never touches your
database. Measures:
  * ingest rate (documents/s) of a data set into the materials collection;
  * Fireworks completed per second by one `rlaunch rapidfire` worker and by two concurrent
    workers, with 1,000 and 10,000 Fireworks on the LaunchPad, for matcouple's ScreenTask
    Fireworks and for plain ScriptTask Fireworks (the ratio is matcouple's overhead), and
    the server process's CPU time per Firework (steadier than wall time on shared cores).

The server and the workers run the ``matcouple`` on ``PYTHONPATH`` when started from a
folder without one, e.g. ``cd /tmp && PYTHONPATH=/other/checkout python
/path/to/benchmarks/launchpad.py`` measures the other checkout's server and tasks.

With more Fireworks than `--window`, the workers run `--window` launches while the LaunchPad
holds all of them (throughput as a function of LaunchPad size); `--full` runs every one.

    python benchmarks/launchpad.py                       # 48k MP ingest + 1k/10k Fireworks
    python benchmarks/launchpad.py --sizes 1000 --dataset mp2018-ci
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from fireworks import Firework, ScriptTask, Workflow
from pymatgen.core import Lattice, Structure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.datasets import known_dataset  # noqa: E402
from matcouple.ingest import ingest  # noqa: E402
from matcouple.store.connection import LaunchpadConfig, open_database, open_launchpad  # noqa: E402
from matcouple.store.materials import MaterialsStore  # noqa: E402
from matcouple.store.server import EmbeddedServer  # noqa: E402
from matcouple.tasks import ScreenTask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` (the server), from /proc; 0 without it."""
    stat = Path(f"/proc/{pid}/stat")
    if pid is None or not stat.exists():
        return 0.0
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _launchpad_file(folder: Path, server: EmbeddedServer, name: str) -> LaunchpadConfig:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"host": server.host, "port": server.port, "name": name,
                                    "strm_lvl": "ERROR"}))
    return LaunchpadConfig.load(path)


def bench_ingest(folder: Path, server: EmbeddedServer, dataset: str) -> dict:
    name, _, subset = dataset.partition("-")
    spec = known_dataset(name, subset or None)
    store = MaterialsStore(open_database(_launchpad_file(folder, server, "ingest")))
    t0 = time.perf_counter()
    report = ingest(spec, store)
    seconds = time.perf_counter() - t0
    rate = report.written / seconds
    print(f"ingest {spec.name}: {report.written} documents in {seconds:.1f} s "
          f"= {rate:.0f} documents/s ({len(report.errors)} refused)")
    return {"dataset": spec.name, "documents": report.written, "refused": len(report.errors),
            "seconds": seconds, "documents_per_s": rate}


def _fireworks(kind: str, n: int, lp_file: Path) -> list[Workflow]:
    si = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    wfs = []
    for i in range(n):
        if kind == "matcouple":
            task = ScreenTask(structures=[{"id": f"si{i}", "structure": si.as_dict()}],
                              run="bench", launchpad_file=str(lp_file))
        else:
            task = ScriptTask.from_str("true")
        wfs.append(Workflow([Firework([task], name=f"{kind}-{i}")]))
    return wfs


def bench_fireworks(folder: Path, server: EmbeddedServer, kind: str, n: int, workers: int,
                    window: int | None) -> dict:
    config = _launchpad_file(folder, server, f"fw_{kind}_{n}_{workers}")
    lp = open_launchpad(config)
    lp.reset("", require_password=False)
    wfs = _fireworks(kind, n, config.path)
    for start in range(0, n, 500):
        lp.bulk_add_wfs(wfs[start:start + 500])
    launches = n if window is None else min(n, window)
    per_worker = [launches // workers + (1 if w < launches % workers else 0)
                  for w in range(workers)]
    rlaunch = shutil.which("rlaunch", path=str(Path(sys.executable).parent)) or "rlaunch"
    env = {**os.environ, "MATCOUPLE_LAUNCHPAD": str(config.path)}
    procs = []
    server_pid = server.status().pid
    cpu0, load0 = _cpu_seconds(server_pid), os.getloadavg()[0]
    t0 = time.perf_counter()
    for w, count in enumerate(per_worker):
        cwd = folder / f"launch_{kind}_{n}_{workers}_{w}"
        cwd.mkdir()
        procs.append(subprocess.Popen(
            [rlaunch, "-l", str(config.path), "--loglvl", "ERROR", "rapidfire",
             "--nlaunches", str(count), "--sleep", "1"],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        p.wait()
    seconds = time.perf_counter() - t0
    server_cpu = _cpu_seconds(server_pid) - cpu0
    load1 = (load0 + os.getloadavg()[0]) / 2
    done = lp.fireworks.count_documents({"state": "COMPLETED"})
    fizzled = lp.fireworks.count_documents({"state": "FIZZLED"})
    for w in range(workers):
        shutil.rmtree(folder / f"launch_{kind}_{n}_{workers}_{w}", ignore_errors=True)
    rate = done / seconds
    cpu_ms = 1e3 * server_cpu / max(done, 1)
    print(f"{kind:9s} {n:6d} Fireworks on the LaunchPad, {workers} worker(s): {done} completed "
          f"({fizzled} fizzled) in {seconds:.1f} s = {rate:.1f} FW/s, "
          f"{rate / workers:.1f} FW/s per worker; server CPU {cpu_ms:.1f} ms per Firework "
          f"(load average {load1:.1f})")
    lp.connection.drop_database(lp.name)
    return {"kind": kind, "fireworks_on_launchpad": n, "workers": workers, "completed": done,
            "fizzled": fizzled, "seconds": seconds, "fw_per_s": rate,
            "fw_per_s_per_worker": rate / workers, "server_cpu_s": server_cpu,
            "server_cpu_ms_per_fw": cpu_ms, "load1": load1}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("matcouple", "script"):
        for workers in (1, 2):
            rows = [r for r in results["fireworks"]
                    if r["kind"] == kind and r["workers"] == workers]
            if rows:
                ax.plot([r["fireworks_on_launchpad"] for r in rows],
                        [r["fw_per_s_per_worker"] for r in rows], marker="o",
                        label=f"{kind}, {workers} worker(s)")
    ax.set_xscale("log")
    ax.set_xlabel("Fireworks on the LaunchPad")
    ax.set_ylabel("Fireworks completed per second per worker")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mp2018", help="mp2018, mp2018-ci or none")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kinds", nargs="+", default=["matcouple", "script"])
    parser.add_argument("--window", type=int, default=2000,
                        help="launches measured when more Fireworks are queued")
    parser.add_argument("--full", action="store_true", help="run every Firework")
    parser.add_argument("--out", type=Path, default=RESULTS / "launchpad.json")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="mc-bench-"))
    server = EmbeddedServer("127.0.0.1", _free_port(), folder / "db", folder / "run")
    server.start()
    results: dict = {"server": "SecantusDB via matcouple launcher (standalone, sync-on-commit)",
                     "cpu_count": os.cpu_count(), "fireworks": []}
    try:
        if args.dataset != "none":
            results["ingest"] = bench_ingest(folder, server, args.dataset)
        for n in args.sizes:
            for workers in args.workers:
                for kind in args.kinds:
                    results["fireworks"].append(bench_fireworks(
                        folder, server, kind, n, workers, None if args.full else args.window))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    for r in results["fireworks"]:
        if r["kind"] == "matcouple":
            ref = next((x for x in results["fireworks"] if x["kind"] == "script"
                        and x["workers"] == r["workers"]
                        and x["fireworks_on_launchpad"] == r["fireworks_on_launchpad"]), None)
            if ref:
                r["ratio_to_script"] = r["fw_per_s"] / ref["fw_per_s"]
                print(f"matcouple/script throughput ratio at {r['fireworks_on_launchpad']} FWs, "
                      f"{r['workers']} worker(s): {r['ratio_to_script']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
