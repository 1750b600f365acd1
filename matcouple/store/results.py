"""Per-structure results written by workflows (one document per structure and run)."""

from __future__ import annotations

import datetime as dt
import weakref
from typing import Any

from pymongo import ASCENDING, MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database

# Per client (clients of the same servers compare equal): the collections whose indexes
# this process has already ensured.
_INDEXED: weakref.WeakKeyDictionary[MongoClient, set[str]] = weakref.WeakKeyDictionary()


def _ensure_indexes(coll: Collection) -> None:
    """Create the results indexes once per process and collection, not on every store: each
    `create_index` is a round trip, two of them per Firework under `rlaunch rapidfire`.
    (A collection dropped while a worker runs gets them back when the worker restarts.)"""
    done = _INDEXED.setdefault(coll.database.client, set())
    if coll.full_name in done:
        return
    coll.create_index([("run", ASCENDING)])
    coll.create_index([("reduced_formula", ASCENDING)])
    done.add(coll.full_name)


def store_results(db: Database, collection: str, run: str, results: list[dict[str, Any]]) -> int:
    """Upsert ``results`` (each with a ``structure_id``) under ``run``; idempotent on re-run."""
    coll = db[collection]
    _ensure_indexes(coll)
    now = dt.datetime.now(dt.UTC)
    ops = [
        UpdateOne(
            {"_id": f"{run}:{r['structure_id']}"},
            {"$set": {**r, "run": run, "updated_at": now}},
            upsert=True,
        )
        for r in results
    ]
    if ops:
        coll.bulk_write(ops, ordered=True)
    return len(ops)
