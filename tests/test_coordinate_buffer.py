"""Fine-tuning buffer on the real embedded server: idempotent filing, size and age
triggers, one claim among concurrent claimers, one queued fine-tune Firework at a time."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fireworks import Firework
from pymongo import MongoClient

from matcouple.coordinate.buffer import (
    LOCK_ID,
    BufferEntryError,
    FineTuneBuffer,
    finetune_firework_if_due,
    utcnow,
)
from matcouple.coordinate.tasks import FineTuneTask
from matcouple.store.connection import open_database


@pytest.fixture()
def db(launchpad_config):
    return open_database(launchpad_config)


def _fill(buffer, structure, n, start=0, fidelity="gpaw/PBE/fast"):
    for i in range(start, start + n):
        assert buffer.add(f"m{i}", structure, {"formation_energy_per_atom": -1.0 + 0.01 * i},
                          fidelity=fidelity, source="gpaw-fast", run="r")


def _client_db(config):
    client = MongoClient(config.host, config.port, serverSelectionTimeoutMS=3000)
    return client, client[config.data["name"]]


def test_filing_is_idempotent_per_material_and_fidelity(db, rocksalt):
    buffer = FineTuneBuffer(db)
    labels = {"formation_energy_per_atom": -3.0, "band_gap": None}
    assert buffer.add("mp-1", rocksalt, labels, fidelity="gpaw/PBE/fast", source="gpaw-fast")
    # the same result filed again (a rerun of a lost Firework) is counted once
    assert not buffer.add("mp-1", rocksalt, labels, fidelity="gpaw/PBE/fast",
                          source="gpaw-fast")
    # another level of theory is another entry
    assert buffer.add("mp-1", rocksalt, labels, fidelity="vasp/GGA+U/MP2020", source="vasp")
    assert buffer.count_pending() == 2
    doc = buffer.entries.find_one({"material_id": "mp-1", "fidelity": "gpaw/PBE/fast"})
    assert doc["labels"] == {"formation_energy_per_atom": -3.0}  # missing gap left out
    with pytest.raises(BufferEntryError, match="no finite label"):
        buffer.add("mp-2", rocksalt, {"band_gap": float("nan")}, fidelity="f", source="s")
    with pytest.raises(BufferEntryError, match="not a number"):
        buffer.add("mp-2", rocksalt, {"band_gap": "abc"}, fidelity="f", source="s")
    with pytest.raises(BufferEntryError, match="fidelity"):
        buffer.add("mp-2", rocksalt, {"band_gap": 1.0}, fidelity="", source="s")


def test_concurrent_filing_of_one_result_counts_once(db, launchpad_config, rocksalt):
    barrier = threading.Barrier(6)

    def file_it(_):
        client, cdb = _client_db(launchpad_config)
        try:
            barrier.wait()
            return FineTuneBuffer(cdb).add("mp-9", rocksalt, {"formation_energy_per_atom": -2},
                                           fidelity="gpaw/PBE/fast", source="gpaw-fast")
        finally:
            client.close()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(file_it, range(6)))
    assert results.count(True) == 1
    assert FineTuneBuffer(db).count_pending() == 1


def test_size_and_age_triggers(db, rocksalt):
    buffer = FineTuneBuffer(db)  # defaults: size 8; age 24 h with at least 2 pending
    assert not buffer.is_due()
    _fill(buffer, rocksalt, 1)
    far = utcnow() + dt.timedelta(hours=25)
    assert not buffer.is_due(now=far)  # one entry is below the minimum count for age
    _fill(buffer, rocksalt, 1, start=1)
    assert not buffer.is_due()
    assert not buffer.is_due(now=utcnow() + dt.timedelta(hours=23))
    assert buffer.is_due(now=far)
    _fill(buffer, rocksalt, 6, start=2)
    assert buffer.count_pending() == 8 and buffer.is_due()


def test_claim_snapshot_and_release(db, rocksalt):
    buffer = FineTuneBuffer(db)
    assert buffer.claim("nobody") is None  # nothing pending: no claim, lock stays idle
    assert buffer.lock_state().state == "idle"
    _fill(buffer, rocksalt, 3)
    claim = buffer.claim("w1")
    assert claim is not None and sorted(claim.material_ids) == ["m0", "m1", "m2"]
    assert buffer.claim("w2") is None  # one fine-tune at a time
    _fill(buffer, rocksalt, 1, start=3)  # filed while the fine-tune runs
    assert buffer.count_pending() == 1 and buffer.holds(claim)
    buffer.release(claim, success=False, error="RuntimeError: boom")
    state = buffer.lock_state()
    assert state.state == "idle" and state.last_error == "RuntimeError: boom"
    assert buffer.count_pending() == 4  # failure: entries pending again, error recorded
    assert buffer.entries.find_one({"material_id": "m0"})["errors"][0]["error"] == \
        "RuntimeError: boom"
    claim = buffer.claim("w2")
    assert len(claim.entries) == 4
    buffer.release(claim, success=True, version="v1")
    assert buffer.count_pending() == 0
    assert buffer.entries.count_documents({"status": "consumed", "consumed_by": "v1"}) == 4
    assert not buffer.holds(claim)


def test_expired_claim_is_taken_over(db, rocksalt):
    buffer = FineTuneBuffer(db)
    _fill(buffer, rocksalt, 2)
    dead = buffer.claim("killed-worker")
    assert buffer.count_pending() == 0
    # the worker was killed: its claim expires instead of locking the buffer forever
    buffer.lock.update_one({"_id": LOCK_ID}, {"$set": {
        "expires_at": utcnow() - dt.timedelta(seconds=1)}})
    assert buffer.count_pending() == 2
    fresh = buffer.claim("w2")
    assert fresh is not None and sorted(fresh.material_ids) == sorted(dead.material_ids)
    buffer.release(dead, success=True, version="late")  # the zombie changes nothing
    assert buffer.entries.count_documents({"status": "consumed"}) == 0
    assert buffer.lock_state().state == "running"
    buffer.release(fresh, success=True, version="v2")
    assert buffer.entries.count_documents({"consumed_by": "v2"}) == 2


def test_concurrent_claimers_get_exactly_one_claim(db, launchpad_config, rocksalt):
    _fill(FineTuneBuffer(db), rocksalt, 5)
    n = 8
    barrier = threading.Barrier(n)

    def claim(i):
        client, cdb = _client_db(launchpad_config)
        try:
            barrier.wait()
            c = FineTuneBuffer(cdb).claim(f"w{i}")
            return None if c is None else len(c.entries)
        finally:
            client.close()

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(claim, range(n)))
    assert [r for r in results if r is not None] == [5]


def test_at_most_one_finetune_firework_while_one_is_pending(db, launchpad_config, rocksalt):
    buffer = FineTuneBuffer(db)
    _fill(buffer, rocksalt, 7)
    assert finetune_firework_if_due(db) is None  # 7 < 8: not due
    n = 8
    barrier = threading.Barrier(n)

    def file_and_check(i):
        # two (here eight) workers file results at the same moment and each asks
        client, cdb = _client_db(launchpad_config)
        try:
            FineTuneBuffer(cdb).add(f"x{i}", rocksalt, {"formation_energy_per_atom": -1.5},
                                    fidelity="gpaw/PBE/fast", source="gpaw-fast")
            barrier.wait()
            return finetune_firework_if_due(cdb, launchpad_file=str(launchpad_config.path),
                                            run="design-1")
        finally:
            client.close()

    with ThreadPoolExecutor(n) as pool:
        fws = [fw for fw in pool.map(file_and_check, range(n)) if fw is not None]
    assert len(fws) == 1
    fw = fws[0]
    assert isinstance(fw, Firework) and isinstance(fw.tasks[0], FineTuneTask)
    assert fw.spec["_category"] == "ai" and fw.tasks[0]["run"] == "design-1"
    assert buffer.lock_state().state == "queued"
    _fill(buffer, rocksalt, 10, start=100)
    assert finetune_firework_if_due(db) is None  # still queued: never a second one
    # the queued Firework runs: it claims; while it runs there is still none
    claim = buffer.claim("fw", token=fw.tasks[0]["token"])
    assert claim is not None and len(claim.entries) == 25
    _fill(buffer, rocksalt, 8, start=200)
    assert finetune_firework_if_due(db) is None
    buffer.release(claim, success=False, error="boom")
    assert finetune_firework_if_due(db) is None  # retry back-off after a failure
    buffer.lock.update_one({"_id": LOCK_ID}, {"$set": {
        "failed_at": utcnow() - dt.timedelta(hours=2)}})
    assert finetune_firework_if_due(db) is not None
    # a reservation whose Firework never ran lapses after its time to live
    buffer.lock.update_one({"_id": LOCK_ID}, {"$set": {
        "expires_at": utcnow() - dt.timedelta(seconds=1)}})
    assert finetune_firework_if_due(db) is not None


def test_buffer_size_from_the_environment(db, rocksalt, monkeypatch):
    from matcouple.settings import get_settings

    monkeypatch.setenv("MATCOUPLE_FINETUNE_BUFFER_SIZE", "3")
    get_settings.cache_clear()
    try:
        buffer = FineTuneBuffer(db)
        _fill(buffer, rocksalt, 2)
        assert not buffer.is_due()
        _fill(buffer, rocksalt, 1, start=2)
        assert buffer.is_due()
    finally:
        get_settings.cache_clear()
