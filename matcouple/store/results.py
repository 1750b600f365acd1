"""Per-structure results written by workflows (one document per structure and run)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ASCENDING, UpdateOne
from pymongo.database import Database


def store_results(db: Database, collection: str, run: str, results: list[dict[str, Any]]) -> int:
    """Upsert ``results`` (each with a ``structure_id``) under ``run``; idempotent on re-run."""
    coll = db[collection]
    coll.create_index([("run", ASCENDING)])
    coll.create_index([("reduced_formula", ASCENDING)])
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
