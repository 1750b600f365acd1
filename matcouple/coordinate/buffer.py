"""The fine-tuning buffer: DFT results waiting to fine-tune the surrogate, and its trigger.

Every DFT result of a design run is filed here once per (material_id, fidelity): a unique
index makes filing idempotent, so a Firework that is rerun after a lost run (``lpad
detect_lostruns --rerun``) never counts its result twice. A fine-tune is due when enough
results are pending (size) or the oldest pending one has waited long enough (age).

At most one fine-tune is queued or running at a time, across every worker and process:
a single lock document moves ``idle -> queued`` (a Firework was handed out) ``->
running`` (a fine-tune claimed the pending entries) ``-> idle`` (released). Each move is
one conditional ``find_one_and_update`` on the server, with an upsert whose duplicate key
error means "someone else holds it". Reservations and claims carry an expiry, so a killed
worker never locks the buffer forever; a later claim takes over the entries of an expired
one.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pymatgen.core import Structure
from pymongo import ASCENDING, ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings

if TYPE_CHECKING:
    from fireworks import Firework

log = logging.getLogger(__name__)

LOCK_ID = "surrogate-finetune"
PENDING, CLAIMED, CONSUMED = "pending", "claimed", "consumed"
IDLE, QUEUED, RUNNING = "idle", "queued", "running"


class BufferEntryError(MatcoupleError, ValueError):
    """A result cannot be filed into the fine-tuning buffer; the message says why."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """pymongo hands back naive datetimes that are UTC; make them comparable."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


@dataclass
class FineTuneClaim:
    """The entries one fine-tune consumes, frozen at the moment it claimed them."""

    claim_id: str
    owner: str
    entries: list[dict[str, Any]]
    claimed_at: dt.datetime
    expires_at: dt.datetime
    token: str | None = None

    def structures(self) -> list[Structure]:
        return [Structure.from_dict(e["structure"]) for e in self.entries]

    @property
    def material_ids(self) -> list[str]:
        return [e["material_id"] for e in self.entries]

    def summary(self) -> dict[str, Any]:
        """What the registry records as the data a version was fine-tuned on."""
        return {"claim_id": self.claim_id, "n_entries": len(self.entries),
                "entries": [{"material_id": e["material_id"], "fidelity": e["fidelity"],
                             "source": e.get("source"), "run": e.get("run")}
                            for e in self.entries],
                "fidelities": sorted({e["fidelity"] for e in self.entries})}


@dataclass
class LockState:
    """The lock document as read (``idle`` when it does not exist yet)."""

    state: str = IDLE
    expires_at: dt.datetime | None = None
    claim_id: str | None = None
    token: str | None = None
    failed_at: dt.datetime | None = None
    last_error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def live(self, now: dt.datetime) -> bool:
        """Queued or running and not expired."""
        return self.state != IDLE and self.expires_at is not None and self.expires_at > now


class FineTuneBuffer:
    """Pending DFT results and the one-fine-tune-at-a-time lock, in MongoDB."""

    def __init__(self, db: Database, collection: str | None = None) -> None:
        self.settings = get_settings()
        self.db = db
        self.entries = db[collection or self.settings.finetune_buffer_collection]
        self.lock = db[self.settings.finetune_lock_collection]
        self.entries.create_index([("material_id", ASCENDING), ("fidelity", ASCENDING)],
                                  unique=True, name="material_fidelity_unique")
        self.entries.create_index([("status", ASCENDING), ("created_at", ASCENDING)])
        self.entries.create_index([("claim_id", ASCENDING)])

    # ------------------------------------------------------------ filing
    def add(self, material_id: str, structure: Structure, labels: dict[str, float], *,
            fidelity: str, source: str, run: str | None = None) -> bool:
        """File one DFT result; False if this (material_id, fidelity) is already filed."""
        if not material_id or not fidelity:
            raise BufferEntryError("a buffer entry needs a material_id and a fidelity, got "
                              f"{material_id!r} / {fidelity!r}")
        if not isinstance(structure, Structure) or len(structure) == 0:
            raise BufferEntryError(f"{material_id}: the structure is missing or empty")
        clean: dict[str, float] = {}
        for name, value in (labels or {}).items():
            if value is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise BufferEntryError(f"{material_id}: label {name}={value!r} is not a "
                                  "number") from exc
            if math.isfinite(number):
                clean[name] = number
        if not clean:
            raise BufferEntryError(f"{material_id}: no finite label among {sorted(labels or {})}; "
                              "a result without labels cannot fine-tune anything")
        doc = {
            "_id": f"{fidelity}|{material_id}", "material_id": material_id,
            "fidelity": fidelity, "source": source, "run": run,
            "formula": structure.composition.reduced_formula, "nsites": len(structure),
            "structure": structure.as_dict(), "labels": clean, "status": PENDING,
            "created_at": utcnow(),
        }
        try:
            self.entries.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    # ------------------------------------------------------------ trigger
    def lock_state(self) -> LockState:
        doc = self.lock.find_one({"_id": LOCK_ID})
        if doc is None:
            return LockState()
        return LockState(
            state=doc.get("state", IDLE),
            expires_at=as_utc(doc["expires_at"]) if doc.get("expires_at") else None,
            claim_id=doc.get("claim_id"), token=doc.get("token"),
            failed_at=as_utc(doc["failed_at"]) if doc.get("failed_at") else None,
            last_error=doc.get("last_error"), raw=doc)

    def _available(self, now: dt.datetime) -> dict[str, Any]:
        """Entries a new claim would take: pending ones, and those of a dead claim."""
        lock = self.lock_state()
        if lock.state == RUNNING and lock.live(now) and lock.claim_id:
            return {"$or": [{"status": PENDING},
                            {"status": CLAIMED, "claim_id": {"$ne": lock.claim_id}}]}
        return {"status": {"$in": [PENDING, CLAIMED]}}

    def count_pending(self) -> int:
        """Results not yet consumed by a fine-tune nor held by a running one."""
        return self.entries.count_documents(self._available(utcnow()))

    def oldest_pending(self, now: dt.datetime | None = None) -> dt.datetime | None:
        doc = self.entries.find_one(self._available(now or utcnow()), {"created_at": 1},
                                    sort=[("created_at", ASCENDING)])
        return as_utc(doc["created_at"]) if doc else None

    def is_due(self, now: dt.datetime | None = None) -> bool:
        """Size or age threshold from settings (``finetune_buffer_size``, ``_max_age_h``)."""
        now = as_utc(now) if now else utcnow()
        n = self.entries.count_documents(self._available(now))
        if n >= self.settings.finetune_buffer_size:
            return True
        if n < max(self.settings.finetune_min_count_for_age, 1):
            return False
        oldest = self.oldest_pending(now)
        max_age = dt.timedelta(hours=self.settings.finetune_max_age_h)
        return oldest is not None and now - oldest >= max_age

    # ------------------------------------------------------------ lock
    def _take_lock(self, allowed_states: list[str], update: dict[str, Any],
                   now: dt.datetime) -> dict[str, Any] | None:
        """Move the lock from an allowed (or expired) state in one server-side step."""
        try:
            return self.lock.find_one_and_update(
                {"_id": LOCK_ID, "$or": [{"state": {"$in": allowed_states}},
                                         {"expires_at": {"$lte": now}}]},
                {"$set": update}, upsert=True, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:
            return None  # the lock exists and is held: the upsert's insert collided

    def reserve(self, run: str | None = None) -> str | None:
        """Reserve the lock for a fine-tune Firework about to be queued; its token or None."""
        now = utcnow()
        token = uuid.uuid4().hex
        ttl = dt.timedelta(seconds=self.settings.finetune_queue_ttl_s)
        doc = self._take_lock([IDLE], {"state": QUEUED, "token": token, "claim_id": None,
                                       "owner": None, "since": now, "expires_at": now + ttl,
                                       "run": run}, now)
        return token if doc is not None and doc.get("token") == token else None

    def claim(self, owner: str, token: str | None = None) -> FineTuneClaim | None:
        """Atomically become the one running fine-tune and snapshot the entries it consumes.

        None when another fine-tune is running (and not expired) or nothing is pending.
        A queued reservation is taken over whoever made it: what matters is that only one
        fine-tune runs.
        """
        now = utcnow()
        claim_id = uuid.uuid4().hex
        expires = now + dt.timedelta(seconds=self.settings.finetune_claim_ttl_s)
        doc = self._take_lock([IDLE, QUEUED], {
            "state": RUNNING, "claim_id": claim_id, "owner": owner, "since": now,
            "expires_at": expires, "token": token}, now)
        if doc is None or doc.get("claim_id") != claim_id:
            return None
        # We hold the lock, so entries still marked claimed belong to a dead claim.
        self.entries.update_many({"status": {"$in": [PENDING, CLAIMED]}},
                                 {"$set": {"status": CLAIMED, "claim_id": claim_id,
                                           "claimed_at": now}})
        entries = list(self.entries.find({"status": CLAIMED, "claim_id": claim_id},
                                         sort=[("created_at", ASCENDING)]))
        if not entries:
            self.lock.update_one({"_id": LOCK_ID, "claim_id": claim_id},
                                 {"$set": {"state": IDLE, "released_at": utcnow(),
                                           "expires_at": None}})
            return None
        return FineTuneClaim(claim_id=claim_id, owner=owner, entries=entries, claimed_at=now,
                             expires_at=expires, token=token)

    def holds(self, claim: FineTuneClaim) -> bool:
        """Whether ``claim`` still holds the lock; if so its expiry starts again (a
        heartbeat for long fine-tunes, and the check before promoting a result)."""
        now = utcnow()
        query = {"_id": LOCK_ID, "state": RUNNING, "claim_id": claim.claim_id,
                 "expires_at": {"$gt": now}}
        ttl = dt.timedelta(seconds=self.settings.finetune_claim_ttl_s)
        return self.lock.update_one(query, {"$set": {"expires_at": now + ttl}}
                                    ).matched_count == 1

    def release(self, claim: FineTuneClaim, *, success: bool, version: str | None = None,
                error: str | None = None) -> None:
        """End a claim: its entries become consumed (success) or pending again with the
        error recorded (failure); the lock returns to idle."""
        now = utcnow()
        owned = {"status": CLAIMED, "claim_id": claim.claim_id}
        if success:
            self.entries.update_many(owned, {"$set": {"status": CONSUMED, "consumed_by": version,
                                                      "consumed_at": now}})
        else:
            self.entries.update_many(owned, {
                "$set": {"status": PENDING, "claim_id": None},
                "$push": {"errors": {"claim_id": claim.claim_id, "error": error, "at": now}}})
        outcome: dict[str, Any] = {"state": IDLE, "released_at": now, "expires_at": None,
                                   "last_claim_id": claim.claim_id,
                                   "last_outcome": "success" if success else "failed",
                                   "last_version": version}
        if success:
            outcome.update(last_error=None, failed_at=None)
        else:
            outcome.update(last_error=error, failed_at=now)
        result = self.lock.update_one({"_id": LOCK_ID, "state": RUNNING,
                                       "claim_id": claim.claim_id}, {"$set": outcome})
        if result.matched_count == 0:
            log.warning("fine-tune claim %s had expired and was taken over before its "
                        "release; its entries now belong to the newer claim", claim.claim_id)


def finetune_firework_if_due(db: Database, *, launchpad_file: str | None = None,
                             run: str | None = None) -> Firework | None:
    """A Firework running FineTuneTask when the buffer is due and no fine-tune is active
    or already queued (the guard holds across processes); None otherwise.

    After a failed fine-tune none is queued for ``Settings.finetune_retry_after_s``, so a
    fine-tune that keeps failing is not retried on every filed result.
    """
    buffer = FineTuneBuffer(db)
    now = utcnow()
    lock = buffer.lock_state()
    if lock.live(now):
        return None
    retry_after = dt.timedelta(seconds=buffer.settings.finetune_retry_after_s)
    if lock.failed_at is not None and now - lock.failed_at < retry_after:
        return None
    if not buffer.is_due(now):
        return None
    return finetune_firework(db, launchpad_file=launchpad_file, run=run)


def finetune_firework(db: Database, *, launchpad_file: str | None = None,
                      run: str | None = None, config: dict[str, Any] | None = None
                      ) -> Firework | None:
    """Reserve the lock and return the fine-tune Firework whether or not the buffer is due
    (``matcouple models finetune-now --submit``); None while another is queued/running."""
    from fireworks import Firework

    from matcouple.coordinate.tasks import FineTuneTask

    buffer = FineTuneBuffer(db)
    token = buffer.reserve(run)
    if token is None:
        return None
    params: dict[str, Any] = {"token": token}
    if launchpad_file:
        params["launchpad_file"] = str(launchpad_file)
    if run:
        params["run"] = run
    if config:
        params["config"] = config
    category = buffer.settings.finetune_category
    return Firework([FineTuneTask(**params)], spec={"_category": category} if category else {},
                    name=f"finetune surrogate{' ' + run if run else ''}")
