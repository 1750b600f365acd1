"""Micro-benchmark of FireWorks-shaped writes on the embedded server (index catalog cache).

Starts its own embedded server (temporary storage, free port), gives a ``fireworks``
collection the indexes ``LaunchPad.tuneup`` creates (ten, one of them multikey), fills it
with ``--docs`` documents and times ``--ops`` writes, alternating ``find_one_and_update``
and ``update_one`` on ``fw_id`` as a worker does. Prints milliseconds per call and the
1-minute load average before and after (the machine's cores are shared).

The ``matcouple`` package is the one on ``PYTHONPATH`` (run from a folder without one), so
the same command compares two checkouts:

    cd /tmp && PYTHONPATH=/path/to/checkout python /path/to/benchmarks/catalog_cache.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pymongo

from matcouple.store.server import EmbeddedServer

FW_INDEXES: list = [
    ("fw_id", {"unique": True}), "state", "spec._category", "created_on", "updated_on",
    "name", "launches",
    [("state", pymongo.DESCENDING), ("_id", pymongo.DESCENDING)],
    [("state", pymongo.DESCENDING), ("spec._priority", pymongo.DESCENDING),
     ("created_on", pymongo.DESCENDING)],
    [("state", pymongo.DESCENDING), ("spec._priority", pymongo.DESCENDING),
     ("created_on", pymongo.ASCENDING)],
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def indexed_fireworks(client: pymongo.MongoClient) -> pymongo.collection.Collection:
    """A ``fireworks`` collection with the indexes FireWorks creates."""
    coll = client.bench.fireworks
    for spec in FW_INDEXES:
        keys, opts = spec if isinstance(spec, tuple) else (spec, {})
        coll.create_index(keys, **opts)
    return coll


def run(docs: int, ops: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="mc-catalog-"))
    server = EmbeddedServer("127.0.0.1", _free_port(), folder / "db", folder / "run")
    server.start()
    try:
        client = pymongo.MongoClient(server.host, server.port)
        coll = indexed_fireworks(client)
        now = datetime.datetime.now(datetime.UTC)
        coll.insert_many([{"fw_id": i, "state": "READY", "name": f"fw-{i}",
                           "spec": {"_category": "", "_priority": i % 5, "task": "x" * 200},
                           "created_on": now, "updated_on": now, "launches": [i]}
                          for i in range(docs)])
        load_before = os.getloadavg()[0]
        fam = upd = 0.0
        for k in range(ops):
            fw_id = (k * 7919) % docs
            stamp = datetime.datetime.now(datetime.UTC)
            t0 = time.perf_counter()
            if k % 2 == 0:
                coll.find_one_and_update({"fw_id": fw_id}, {"$set": {"updated_on": stamp}},
                                         return_document=pymongo.ReturnDocument.AFTER)
                fam += time.perf_counter() - t0
            else:
                coll.update_one({"fw_id": fw_id}, {"$set": {"state": "RUNNING",
                                                            "updated_on": stamp}})
                upd += time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        client.close()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    n_fam, n_upd = (ops + 1) // 2, ops // 2
    return {"docs": docs, "ops": ops, "find_one_and_update_ms": 1e3 * fam / n_fam,
            "update_one_ms": 1e3 * upd / n_upd, "total_s": fam + upd,
            "load1_before": load_before, "load1_after": load_after}


def docs_ops_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of the per-command server benchmarks: collection size and calls."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--ops", type=int, default=2000)
    return parser


def main() -> None:
    args = docs_ops_parser(__doc__).parse_args()
    import matcouple

    r = run(args.docs, args.ops)
    print(f"matcouple from {Path(matcouple.__file__).parent}")
    print(f"{r['ops']} writes on {r['docs']} documents in {r['total_s']:.2f} s: "
          f"find_one_and_update {r['find_one_and_update_ms']:.3f} ms, "
          f"update_one {r['update_one_ms']:.3f} ms per call "
          f"(load average {r['load1_before']:.2f} -> {r['load1_after']:.2f})")


if __name__ == "__main__":
    main()
