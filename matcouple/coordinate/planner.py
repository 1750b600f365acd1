"""The deterministic planner: the paper's procedure (section 3.3 / 4.3), step by step.

1. ``query_database``: known structures that meet the target are returned at once;
2. ``generate_structures`` for the composition, then the validity filters;
3. ``predict_properties`` with Crysformer and its calibrated sigma, and p_match of the
   match discriminator;
4. decide per candidate (``decide`` with tau, and a p_match gate if the run sets one):
   accept the AI value, or ``run_dft``;
5. file every DFT result into the materials database and the fine-tuning buffer;
6. iterate until N structures meet the target or the iteration cap is reached.

Each step is a plain function of the database; the design FireTasks call them, so every
step is a Firework on the LaunchPad. An LLM may choose the tools instead
(:mod:`matcouple.coordinate.llm`); without one this planner runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from pymatgen.core import Structure
from pymongo.database import Database

from matcouple.coordinate import designrun as dr
from matcouple.coordinate.tools import (
    current_model_dir,
    generate_structures,
    predict_properties,
    query_database,
)

# The plan the deterministic planner follows (also shown to an LLM as the reference).
PROCEDURE = (
    ("query_database", "return known structures of the formula that meet the target"),
    ("generate_structures", "sample candidates of the composition and filter them"),
    ("predict_properties", "predict the property and its calibrated sigma"),
    ("run_dft", "relax and compute the candidates whose sigma exceeds tau"),
)


def describe_plan(config: dr.DesignConfig) -> list[str]:
    """Human-readable plan of a run (printed by `matcouple design`)."""
    cfg = config.resolved()
    req = cfg.request
    return [
        f"query_database: {req.reduced_formula} with {req.target.describe()}",
        f"then up to {cfg.max_iterations} iterations: generate_structures ({cfg.batch_size} "
        f"candidates, {cfg.steps} steps) -> filters -> "
        + (f"pre-relax ({cfg.prerelax}) -> " if cfg.prerelax != "none" else "")
        + "predict_properties "
        f"(tau {cfg.tau:.3f} {req.target.unit}"
        + (f", p_match >= {cfg.p_match_min:g}" if cfg.p_match_min else "") + ")",
        f"run_dft ({cfg.engine}/{cfg.preset}) for candidates not accepted, at most "
        f"{cfg.max_dft} calculations",
        f"stop at {req.n} structures meeting the target",
    ]


# ---------------------------------------------------------------- step 1
def query_step(db: Database, run: str) -> dict[str, Any]:
    cfg = dr.run_config(db, run)
    hits = query_database(db, cfg.request)
    dr.record_database_hits(db, run, hits, cfg.request)
    return {"database_hits": [h["material_id"] for h in hits]}


# ---------------------------------------------------------------- step 2
def iteration_seed(seed: int, iteration: int) -> int:
    return seed * 1_000_003 + iteration


def generate_step(db: Database, run: str, iteration: int) -> dict[str, Any]:
    """Sample and filter one batch; survivors become candidates of ``iteration``."""
    cfg = dr.run_config(db, run)
    batch = generate_structures(
        db, cfg.request.formula, cfg.batch_size, seed=iteration_seed(cfg.seed, iteration),
        steps=cfg.steps, formula_units=cfg.formula_units or None,
        known=dr.known_structures(db, run, iteration), prerelax=cfg.prerelax or "none")
    ids = dr.record_generated(db, run, iteration, batch.structures, batch.provenance,
                              cfg.request.target.label, batch.prerelax)
    dr.record_generation_report(db, run, iteration, batch.report.as_dict(), batch.seconds)
    return {"iteration": iteration, "candidates": ids, **batch.report.as_dict(),
            "seconds": round(batch.seconds, 2)}


# ---------------------------------------------------------------- steps 3 and 4
@functools.lru_cache(maxsize=1)
def _discriminator():
    from matcouple.coordinate.discriminator import MatchDiscriminator

    return MatchDiscriminator.default()


def p_match_of(structures: list[Structure]) -> list[float]:
    """p_match of each generated structure (the shipped match discriminator)."""
    return _discriminator().p_match(structures) if structures else []


def lowest_known_value(db: Database, formula: str, label: str) -> float | None:
    """The lowest computed ``label`` stored for the composition (any source and fidelity
    that is a calculation), or None when none is known."""
    from matcouple.coordinate.tools import NOT_COMPUTED_SOURCES
    from matcouple.store.materials import MaterialsStore, normalise_formula

    docs = MaterialsStore(db).collection.find(
        {"reduced_formula": normalise_formula(formula),
         "source": {"$nin": list(NOT_COMPUTED_SOURCES)},
         f"labels.{label}.value": {"$exists": True}}, {f"labels.{label}.value": 1})
    values = [float(d["labels"][label]["value"]) for d in docs]
    values = [v for v in values if math.isfinite(v)]
    return min(values) if values else None


@dataclass
class DecideOutcome:
    """What one predict/decide step did, and what the workflow must add after it."""

    iteration: int
    accepted: list[str] = field(default_factory=list)
    to_dft: list[tuple[str, Structure]] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    next_iteration: int | None = None
    stop_reason: str = ""
    model_version: str = ""

    def summary(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "accepted": self.accepted,
                "dft": [cid for cid, _ in self.to_dft], "reused_dft": self.reused,
                "skipped": self.skipped, "next_iteration": self.next_iteration,
                "stop_reason": self.stop_reason, "model_version": self.model_version}


def _existing_dft(db: Database, cfg: dr.DesignConfig, cid: str,
                  structure: Structure) -> dict[str, Any] | None:
    from matcouple.dft.calculation import already_computed
    from matcouple.dft.engine import get_engine
    from matcouple.store.materials import MaterialsStore

    return already_computed(MaterialsStore(db), get_engine(cfg.engine), cfg.preset, cid,
                            structure)


def decide_step(db: Database, run: str, iteration: int, owner: str) -> DecideOutcome:
    """Predict the candidates of ``iteration``, decide each, and plan what comes next.

    A candidate another owner has already decided is left alone; a rerun of this step
    (same owner) repeats its own decisions without counting DFT slots twice.
    """
    from matcouple.coordinate.policy import decide

    cfg = dr.run_config(db, run)
    target = cfg.request.target
    out = DecideOutcome(iteration=iteration)
    mine = [c for c in dr.iteration_candidates(db, run, iteration)
            if c["status"] == "generated" or c.get("owner") == owner]
    structures = [Structure.from_dict(c["structure"]) for c in mine]
    preds = predict_properties([(c["_id"], s) for c, s in zip(mine, structures, strict=True)],
                               target.label, model_dir=current_model_dir(db))
    p_matches = p_match_of(structures)
    lowest = lowest_known_value(db, cfg.request.formula, target.label) \
        if target.label == "formation_energy_per_atom" else None
    for cand, structure, pred, p_match in zip(mine, structures, preds, p_matches,
                                              strict=True):
        cid = cand["_id"]
        out.model_version = pred.model_version
        decision = decide(pred.sigma, cfg.tau, p_match=p_match, p_match_min=cfg.p_match_min,
                          value=pred.value, lowest_known=lowest)
        record = {"prediction": {"value": pred.value, "sigma": pred.sigma,
                                 "model_version": pred.model_version, "error": pred.error},
                  "decision": {"action": decision.action, "reason": decision.reason,
                               "sigma": decision.sigma, "tau": decision.tau,
                               "p_match": decision.p_match}}
        if decision.action == "accept":
            if dr.claim_candidate(db, cid, "accepted", owner, {
                    **record, "value": pred.value, "value_source": "ai",
                    "meets_target": target.met_by(pred.value)}):
                out.accepted.append(cid)
            continue
        if cand["status"] == "dft_queued" and cand.get("owner") == owner:
            out.to_dft.append((cid, structure))  # this step's own earlier claim
            continue
        if cand["status"] != "generated":
            continue
        existing = _existing_dft(db, cfg, cid, structure)
        if existing is not None:
            if dr.claim_candidate(db, cid, "dft_queued", owner,
                                  {**record, "reused_dft": existing["_id"]}):
                dr.file_dft_result(db, cid, existing)
                out.reused.append(cid)
            continue
        if not dr.take_dft_slot(db, run, cfg.max_dft):
            reason = f"{decision.reason}; DFT budget of {cfg.max_dft} spent"
            record["decision"]["reason"] = reason
            if dr.claim_candidate(db, cid, "skipped", owner, record):
                out.skipped.append(cid)
            continue
        if dr.claim_candidate(db, cid, "dft_queued", owner, record):
            out.to_dft.append((cid, structure))
    out.next_iteration, out.stop_reason = plan_next_iteration(db, run, iteration, owner)
    return out


def plan_next_iteration(db: Database, run: str, iteration: int,
                        owner: str) -> tuple[int | None, str]:
    """Claim the next iteration if the run should go on; else stop the generate loop."""
    go_on, reason = dr.should_continue(db, run, iteration)
    if not go_on:
        dr.stop_loop(db, run, iteration, reason)
        # A DFT result filed meanwhile may have made the run short again: look once more.
        go_on, reason = dr.should_continue(db, run, iteration)
        if not go_on:
            return None, reason
    if dr.claim_iteration(db, run, iteration + 1, owner):
        return iteration + 1, reason
    return None, f"iteration {iteration + 1} already started by another step"


# ---------------------------------------------------------------- step 5
@dataclass
class FileOutcome:
    candidate: dict[str, Any]
    buffered: bool
    next_iteration: int | None


def file_step(db: Database, cid: str, material_id: str, owner: str) -> FileOutcome:
    """File a DFT result on its candidate and into the fine-tuning buffer (idempotent).

    If the run's generate loop had stopped counting on pending DFT results and this one
    misses the target, the loop is reopened (once, atomically).
    """
    from matcouple.coordinate.buffer import FineTuneBuffer

    doc = db[_materials()].find_one({"_id": material_id})
    if doc is None:
        raise dr.DesignRunError(f"DFT result {material_id!r} of candidate {cid} is not in "
                                "the materials collection; did the DFT Firework complete?")
    cand = dr.file_dft_result(db, cid, doc)
    labels = {name: float(lab["value"]) for name, lab in doc.get("labels", {}).items()
              if lab.get("value") is not None}
    buffered = False
    if labels:
        buffered = FineTuneBuffer(db).add(
            doc["_id"], Structure.from_dict(doc["structure"]), labels,
            fidelity=doc["fidelity"], source=doc["source"], run=cand["run"])
    run = dr.load_run(db, cand["run"])
    next_iteration = None
    if run.get("loop") == "stopped":
        go_on, _ = dr.should_continue(db, cand["run"], run["last_iteration"])
        if go_on and dr.claim_iteration(db, cand["run"], run["last_iteration"] + 1, owner):
            next_iteration = run["last_iteration"] + 1
    return FileOutcome(candidate=cand, buffered=buffered, next_iteration=next_iteration)


def _materials() -> str:
    from matcouple.settings import get_settings

    return get_settings().materials_collection
