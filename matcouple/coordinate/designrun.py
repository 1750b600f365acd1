"""The state of a design run in MongoDB: the run document and one document per candidate.

A run (``design_runs``) holds the request, its limits and three counters that workers
change atomically: the last iteration started (with the Firework that started it), the
number of DFT calculations queued, and whether the generate loop is running. Every
candidate (``design_candidates``) records where it came from (database or generator),
the prediction, the decision (value, sigma, tau, action, reason), the DFT result when one
was run, and whether it meets the target. Every step checks and sets these documents with
single-document atomic updates, so a Firework that is rerun after a lost run, or two
workers on one run, never queue a candidate twice, exceed the DFT budget, or start an
iteration twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pymatgen.core import Structure
from pymongo import ASCENDING, ReturnDocument
from pymongo.database import Database

from matcouple.coordinate.request import DesignRequest
from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.structures.descriptors import symmetry


class DesignRunError(MatcoupleError):
    """A design run that does not exist, or a name reused for another request."""


@dataclass
class DesignConfig:
    """A request plus the limits and engines of one run (stored on the run document)."""

    request: DesignRequest
    run: str
    engine: str = ""
    preset: str = ""
    max_iterations: int = 0
    max_dft: int = -1
    batch_size: int = 0
    steps: int = 0
    seed: int = 0
    formula_units: list[int] = field(default_factory=list)
    tau: float | None = None
    p_match_min: float | None = None
    launchpad_file: str | None = None
    prerelax: str = ""

    def resolved(self) -> DesignConfig:
        """Defaults filled in from settings (engine, preset, limits, tau, p_match gate)."""
        from matcouple.coordinate.policy import default_tau

        s = get_settings()
        return DesignConfig(
            request=self.request, run=self.run, engine=self.engine or s.dft_engine,
            preset=self.preset or s.dft_preset,
            max_iterations=self.max_iterations or s.design_max_iterations,
            max_dft=s.design_max_dft if self.max_dft < 0 else self.max_dft,
            batch_size=self.batch_size or s.design_batch_size,
            steps=self.steps or s.design_steps or s.generation_steps, seed=self.seed,
            formula_units=list(self.formula_units or s.design_formula_units),
            tau=default_tau() if self.tau is None else float(self.tau),
            p_match_min=(s.design_p_match_min if self.p_match_min is None
                         else float(self.p_match_min)),
            launchpad_file=self.launchpad_file,
            prerelax=self.prerelax or s.design_prerelax)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["request"] = self.request.as_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DesignConfig:
        values = dict(data)
        values["request"] = DesignRequest.from_dict(values["request"])
        return cls(**values)


def runs(db: Database):
    return db[get_settings().design_runs_collection]


def candidates(db: Database):
    return db[get_settings().design_candidates_collection]


def ensure_indexes(db: Database) -> None:
    coll = candidates(db)
    coll.create_index([("run", ASCENDING), ("iteration", ASCENDING)])
    coll.create_index([("run", ASCENDING), ("status", ASCENDING)])
    coll.create_index([("reduced_formula", ASCENDING)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_run(db: Database, config: DesignConfig) -> dict[str, Any]:
    """Insert the run document; an existing run of the same request is continued."""
    ensure_indexes(db)
    cfg = config.resolved()
    existing = runs(db).find_one({"_id": cfg.run})
    if existing is not None:
        if existing["config"]["request"] != cfg.request.as_dict():
            raise DesignRunError(f"design run {cfg.run!r} exists for another request "
                                 f"({existing['config']['request'].get('text') or ''}); "
                                 "choose another --run name")
        return existing
    doc = {"_id": cfg.run, "config": cfg.as_dict(), "status": "running", "loop": "running",
           "last_iteration": 0, "iteration_owner": None, "dft_queued": 0,
           "created_at": _now(), "wf_id": None}
    runs(db).insert_one(doc)
    return doc


def load_run(db: Database, run: str) -> dict[str, Any]:
    doc = runs(db).find_one({"_id": run})
    if doc is None:
        names = [d["_id"] for d in runs(db).find({}, {"_id": 1}).sort("created_at", -1)
                 .limit(5)]
        raise DesignRunError(f"no design run named {run!r}"
                             + (f"; recent runs: {', '.join(names)}" if names else ""))
    return doc


def run_config(db: Database, run: str) -> DesignConfig:
    return DesignConfig.from_dict(load_run(db, run)["config"])


# ---------------------------------------------------------------- candidates
def candidate_id(run: str, iteration: int, index: int) -> str:
    return f"{run}-i{iteration:03d}-c{index:03d}"


def _structure_fields(structure: Structure) -> dict[str, Any]:
    sym = symmetry(structure, get_settings().filter_symprec)
    return {"structure": structure.as_dict(), "formula": structure.composition.formula,
            "reduced_formula": structure.composition.reduced_formula,
            "nsites": len(structure),
            "spacegroup": {"symbol": sym["symbol"], "number": sym["number"]}}


def record_database_hits(db: Database, run: str, hits: Sequence[dict[str, Any]],
                         request: DesignRequest) -> int:
    """Database hits become candidates of iteration 0 (source ``database``), once."""
    coll = candidates(db)
    for k, hit in enumerate(hits):
        structure = Structure.from_dict(hit["structure"])
        doc = {**_structure_fields(structure), "run": run, "iteration": 0, "kind": "database",
               "status": "database", "material_id": hit["material_id"],
               "value": hit["value"], "value_source": "database",
               "fidelity": hit.get("fidelity"), "meets_target": True,
               "label": request.target.label, "created_at": _now()}
        coll.update_one({"_id": candidate_id(run, 0, k)}, {"$setOnInsert": doc}, upsert=True)
    return len(hits)


def known_structures(db: Database, run: str, before_iteration: int) -> list[Structure]:
    """Candidates of earlier iterations (and hits): a new candidate must differ from these."""
    cursor = candidates(db).find({"run": run, "iteration": {"$lt": before_iteration}},
                                 {"structure": 1})
    return [Structure.from_dict(d["structure"]) for d in cursor]


def record_generated(db: Database, run: str, iteration: int, structures: Sequence[Structure],
                     provenance: dict[str, Any], label: str,
                     prerelax: Sequence[dict[str, Any]] = ()) -> list[str]:
    """Store the survivors of one generate step; a rerun of the step writes nothing new.
    ``prerelax``: each structure's pre-relaxation summary (stage, volume ratio, ...)."""
    coll = candidates(db)
    ids = []
    for k, structure in enumerate(structures):
        cid = candidate_id(run, iteration, k)
        doc = {**_structure_fields(structure), "run": run, "iteration": iteration,
               "kind": "generated", "status": "generated", "generation": provenance,
               "label": label, "created_at": _now()}
        if prerelax:
            doc["prerelax"] = prerelax[k]
        coll.update_one({"_id": cid}, {"$setOnInsert": doc}, upsert=True)
        ids.append(cid)
    return ids


def record_generation_report(db: Database, run: str, iteration: int,
                             report: dict[str, Any], seconds: float) -> None:
    runs(db).update_one({"_id": run}, {"$set": {f"generation.{iteration}": {
        **report, "seconds": round(seconds, 2)}}})


def iteration_candidates(db: Database, run: str, iteration: int) -> list[dict[str, Any]]:
    return list(candidates(db).find({"run": run, "iteration": iteration,
                                     "kind": "generated"}).sort("_id", 1))


# ---------------------------------------------------------------- atomic claims
def claim_candidate(db: Database, cid: str, status: str, owner: str,
                    extra: dict[str, Any] | None = None) -> bool:
    """Move a ``generated`` candidate to ``status`` for ``owner`` (or confirm its own move).

    True when this owner holds the candidate in that status afterwards: a Firework rerun
    after a lost run finds its own earlier claim and repeats its work, any other owner
    gets False.
    """
    coll = candidates(db)
    doc = coll.find_one_and_update(
        {"_id": cid, "status": "generated"},
        {"$set": {"status": status, "owner": owner, "decided_at": _now(), **(extra or {})}},
        return_document=ReturnDocument.AFTER)
    if doc is not None:
        return True
    current = coll.find_one({"_id": cid}, {"status": 1, "owner": 1})
    return bool(current and current.get("status") == status and current.get("owner") == owner)


def take_dft_slot(db: Database, run: str, max_dft: int) -> bool:
    """Count one more DFT calculation against the run's budget; False when it is spent."""
    doc = runs(db).find_one_and_update(
        {"_id": run, "dft_queued": {"$lt": max_dft}}, {"$inc": {"dft_queued": 1}})
    return doc is not None


def claim_iteration(db: Database, run: str, iteration: int, owner: str) -> bool:
    """Start ``iteration`` (the one after ``last_iteration``) once: True for its owner."""
    doc = runs(db).find_one_and_update(
        {"_id": run, "last_iteration": iteration - 1},
        {"$set": {"last_iteration": iteration, "iteration_owner": owner, "loop": "running"}})
    if doc is not None:
        return True
    current = runs(db).find_one({"_id": run}, {"last_iteration": 1, "iteration_owner": 1})
    return bool(current and current["last_iteration"] == iteration
                and current.get("iteration_owner") == owner)


def stop_loop(db: Database, run: str, iteration: int, reason: str) -> None:
    runs(db).update_one({"_id": run, "last_iteration": iteration},
                        {"$set": {"loop": "stopped", "stop_reason": reason,
                                  "stopped_at": _now()}})


# ---------------------------------------------------------------- progress
def progress(db: Database, run: str) -> dict[str, int]:
    """Counts that decide whether to go on: found (meets target), pending DFT, and so on."""
    coll = candidates(db)
    counts: dict[str, int] = {}
    for row in coll.aggregate([{"$match": {"run": run}},
                               {"$group": {"_id": "$status", "n": {"$sum": 1}}}]):
        counts[row["_id"]] = row["n"]
    found = coll.count_documents({"run": run, "meets_target": True})
    return {"found": found, "pending_dft": counts.get("dft_queued", 0),
            "database": counts.get("database", 0), "accepted": counts.get("accepted", 0),
            "dft_done": counts.get("dft_done", 0), "skipped": counts.get("skipped", 0),
            "generated": sum(v for k, v in counts.items() if k != "database")}


def should_continue(db: Database, run: str, iteration: int) -> tuple[bool, str]:
    """Go on while found + pending DFT < n and the iteration cap is not reached."""
    cfg = run_config(db, run)
    p = progress(db, run)
    if p["found"] >= cfg.request.n:
        return False, f"found {p['found']} >= {cfg.request.n} requested"
    if iteration >= cfg.max_iterations:
        return False, f"iteration cap {cfg.max_iterations} reached"
    if p["found"] + p["pending_dft"] >= cfg.request.n:
        return False, (f"{p['found']} found and {p['pending_dft']} DFT pending cover the "
                       f"{cfg.request.n} requested")
    return True, f"{p['found']} found, {p['pending_dft']} DFT pending, iteration {iteration}"


def file_dft_result(db: Database, cid: str, material_doc: dict[str, Any]) -> dict[str, Any]:
    """Record a DFT result on its candidate (idempotent) and say whether it meets the target."""
    coll = candidates(db)
    cand = coll.find_one({"_id": cid})
    if cand is None:
        raise DesignRunError(f"no design candidate {cid!r}")
    cfg = run_config(db, cand["run"])
    label = material_doc.get("labels", {}).get(cfg.request.target.label)
    value = None if label is None else float(label["value"])
    relaxed = Structure.from_dict(material_doc["structure"])
    sym = material_doc.get("symmetry") or symmetry(relaxed, get_settings().filter_symprec)
    update = {"status": "dft_done" if value is not None else "dft_failed",
              "dft": {"material_id": material_doc["_id"], "value": value,
                      "fidelity": material_doc.get("fidelity"),
                      "source": material_doc.get("source"),
                      "structure": material_doc["structure"],
                      "spacegroup": {"symbol": sym["symbol"], "number": sym["number"]}},
              "value": value, "value_source": "dft",
              "meets_target": cfg.request.target.met_by(value), "filed_at": _now()}
    coll.update_one({"_id": cid}, {"$set": update})
    return {**cand, **update}
