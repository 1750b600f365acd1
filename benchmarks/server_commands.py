"""Server CPU per FireWorks-shaped command on the embedded server (steadier than wall time).

Starts its own embedded server (temporary storage, free port), gives a ``fireworks``
collection the ten indexes ``LaunchPad.tuneup`` creates, fills it with ``--docs`` documents,
and for each command shape a ``rlaunch`` worker sends (``find_one`` on ``fw_id``,
``update_one`` on ``fw_id``, ``find_one_and_update`` on ``fw_id``, the sorted READY claim as
``find_one``) runs ``--ops`` calls and reports the server process's CPU time (user + system,
from /proc) and the round trip per call. The machine's cores are shared; CPU time of the
server process is far less sensitive to other jobs than the round trip.

The ``matcouple`` package is the one on ``PYTHONPATH`` (run from a folder without one), so
the same command compares two checkouts:

    cd /tmp && PYTHONPATH=/path/to/checkout python /path/to/benchmarks/server_commands.py
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pymongo
from catalog_cache import _free_port, docs_ops_parser, indexed_fireworks

from matcouple.store.server import EmbeddedServer


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _shapes(coll: pymongo.collection.Collection, docs: int) -> dict[str, Callable[[int], object]]:
    def stamp() -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)

    return {
        "find_one fw_id": lambda k: coll.find_one({"fw_id": (k * 7919) % docs}),
        "update_one fw_id": lambda k: coll.update_one(
            {"fw_id": (k * 7919) % docs}, {"$set": {"updated_on": stamp()}}),
        "find_one_and_update fw_id": lambda k: coll.find_one_and_update(
            {"fw_id": (k * 7919) % docs}, {"$set": {"updated_on": stamp()}},
            return_document=pymongo.ReturnDocument.AFTER),
        "find_one READY by priority": lambda k: coll.find_one(
            {"state": "READY"}, sort=[("spec._priority", -1), ("created_on", 1)]),
    }


def run(docs: int, ops: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="mc-cmds-"))
    server = EmbeddedServer("127.0.0.1", _free_port(), folder / "db", folder / "run")
    status = server.start()
    assert status.pid is not None
    out: dict = {"docs": docs, "ops": ops, "load1_before": os.getloadavg()[0], "shapes": {}}
    try:
        client = pymongo.MongoClient(server.host, server.port)
        coll = indexed_fireworks(client)
        now = datetime.datetime.now(datetime.UTC)
        coll.insert_many([{"fw_id": i, "state": "READY" if i % 10 == 0 else "COMPLETED",
                           "name": f"fw-{i}",
                           "spec": {"_category": "", "_priority": i % 5, "task": "x" * 200},
                           "created_on": now, "updated_on": now, "launches": [i]}
                          for i in range(docs)])
        for name, call in _shapes(coll, docs).items():
            for k in range(50):  # warm: connection, catalog caches
                call(k)
            cpu0, t0 = _cpu_seconds(status.pid), time.perf_counter()
            for k in range(ops):
                call(k)
            wall, cpu = time.perf_counter() - t0, _cpu_seconds(status.pid) - cpu0
            out["shapes"][name] = {"server_cpu_ms": 1e3 * cpu / ops,
                                   "round_trip_ms": 1e3 * wall / ops}
        client.close()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    out["load1_after"] = os.getloadavg()[0]
    return out


def main() -> None:
    args = docs_ops_parser(__doc__).parse_args()
    import matcouple

    r = run(args.docs, args.ops)
    print(f"matcouple from {Path(matcouple.__file__).parent}; {r['ops']} calls per shape on "
          f"{r['docs']} documents (load average {r['load1_before']:.2f} -> "
          f"{r['load1_after']:.2f})")
    for name, s in r["shapes"].items():
        print(f"  {name:28s} server CPU {s['server_cpu_ms']:.3f} ms, "
              f"round trip {s['round_trip_ms']:.3f} ms per call")


if __name__ == "__main__":
    main()
