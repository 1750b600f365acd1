"""The findAndModify fix of the embedded server: same answers, no full scans."""

from __future__ import annotations

import time

import pymongo
import pymongo.errors
import pytest
import secantus

from matcouple.store import secantus_compat


def test_filter_shapes():
    pins = secantus_compat._pins_single_id
    assert pins({"_id": 5, "$and": [{"state": "READY"}]})
    assert not pins({"_id": 5})  # already a point lookup
    assert not pins({"_id": {"$in": [1, 2]}, "$and": [{}]})
    assert not pins({"state": "READY", "$and": [{}]})
    assert not pins(None)


def test_only_pinned_versions_are_patched(monkeypatch):
    monkeypatch.setattr(secantus, "__version__", "9.9.9")
    assert secantus_compat.apply() is False


def test_find_and_modify_semantics_and_scaling(server):
    """The fixture's server runs through our launcher, i.e. with the fix."""
    client = pymongo.MongoClient(server.host, server.port)
    coll = client.compat.jobs
    coll.drop()
    coll.create_index("state")

    def fill(n: int) -> None:
        start = coll.count_documents({})
        coll.insert_many([{"_id": i, "state": "WAITING", "n": i} for i in range(start, n)])

    def time_claims(k: int = 40) -> float:
        # As on a LaunchPad: a few READY documents among many finished ones.
        coll.update_many({}, {"$set": {"state": "COMPLETED"}})
        coll.update_many({"_id": {"$lt": k}}, {"$set": {"state": "READY"}})
        t0 = time.perf_counter()
        for _ in range(k):
            doc = coll.find_one_and_update({"state": "READY", "n": {"$gte": 0}},
                                           {"$set": {"state": "RUNNING"}})
            assert doc is not None and doc["state"] == "READY"
        return (time.perf_counter() - t0) / k

    fill(200)
    small = time_claims()
    fill(4000)
    large = time_claims()
    # Unfixed 0.7.0b3 grows ~linearly (20x the documents: ~15-20x slower).
    assert large < 4 * small + 0.002, (small, large)
    # The re-asserted query still guards the write: no claim of a non-matching document.
    assert coll.find_one_and_update({"_id": 7, "state": "NOPE"}, {"$set": {"x": 1}}) is None
    assert "x" not in coll.find_one({"_id": 7})
    assert coll.count_documents({"state": "RUNNING"}) == 40
    client.close()


def test_background_option_does_not_conflict(server):
    client = pymongo.MongoClient(server.host, server.port)
    coll = client.compat.idx
    coll.drop()
    coll.create_index("fw_id", unique=True, background=False)
    coll.create_index("fw_id", unique=True, background=True)  # lpad reset after tuneup --full
    with pytest.raises(pymongo.errors.OperationFailure):
        coll.create_index("fw_id", unique=False)  # a real conflict is still one
    client.close()


def test_sorted_claim_walks_the_compound_index(server):
    """FireWorks' checkout: {state: READY} sorted by priority, as the queue grows."""
    client = pymongo.MongoClient(server.host, server.port)
    coll = client.compat.queue
    coll.drop()
    coll.create_index([("state", -1), ("p", -1), ("t", 1)])

    def fill(n_ready: int) -> None:
        coll.delete_many({})
        docs = [{"_id": i, "state": "READY", "p": i % 7, "t": (i * 37) % 1000, "k": i % 2}
                for i in range(n_ready)]
        docs += [{"_id": 10**6 + i, "state": "COMPLETED", "p": 9, "t": 0, "k": 0}
                 for i in range(200)]
        coll.insert_many(docs)

    fill(300)
    ready = sorted((d for d in coll.find({"state": "READY"})), key=lambda d: (-d["p"], d["t"]))
    got = coll.find_one_and_update({"state": "READY"}, {"$set": {"state": "RUNNING"}},
                                   sort=[("p", -1), ("t", 1)])
    assert got["_id"] == ready[0]["_id"]
    proj = coll.find_one({"state": "READY"}, {"t": 1}, sort=[("p", -1), ("t", 1)])
    assert proj == {"_id": ready[1]["_id"], "t": ready[1]["t"]}
    only_k1 = [d for d in ready[1:] if d["k"] == 1]
    assert coll.find_one({"state": "READY", "k": 1}, sort=[("p", -1), ("t", 1)])["_id"] == \
        only_k1[0]["_id"]
    top = coll.find_one({"state": "READY"}, sort=[("p", -1)])
    assert top["p"] == 6

    def time_claims(k: int = 30) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            coll.find_one_and_update({"state": "READY"}, {"$set": {"state": "RUNNING"}},
                                     sort=[("p", -1)])
        return (time.perf_counter() - t0) / k

    small = time_claims()
    fill(6000)
    large = time_claims()
    # Unfixed 0.7.0b3 decodes and sorts every READY document per claim (20x slower here).
    assert large < 4 * small + 0.003, (small, large)
    client.close()


def _write_until_killed(server, seconds: float) -> list[str]:
    """Three writer threads insert + update until the server is SIGKILLed; acked ids."""
    import os
    import signal
    import threading

    client = pymongo.MongoClient(server.host, server.port, serverSelectionTimeoutMS=2000,
                                 retryWrites=False)
    coll = client.durability.docs
    acked: list[str] = []

    def writer(k: int) -> None:
        i = 0
        try:
            while True:
                doc_id = f"{k}-{i}"
                coll.insert_one({"_id": doc_id, "pad": "x" * 200})
                coll.update_one({"_id": doc_id}, {"$set": {"updated": True}})
                acked.append(doc_id)
                i += 1
        except pymongo.errors.PyMongoError:
            return

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    os.kill(server.status().pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=30)
    client.close()
    return acked


@pytest.mark.parametrize("method", ["none", "fsync"])
def test_acknowledged_writes_survive_sigkill(tmp_path, method):
    """Both commit methods keep every acknowledged write (and its update) across a kill."""
    from matcouple.store.server import EmbeddedServer
    from tests.conftest import free_port

    srv = EmbeddedServer("127.0.0.1", free_port(), tmp_path / "db", tmp_path / "run",
                         commit_sync=method)
    srv.start()
    try:
        acked = _write_until_killed(srv, 2.5)
        assert len(acked) > 200
        time.sleep(0.3)
        srv.start()
        client = pymongo.MongoClient(srv.host, srv.port)
        stored = {d["_id"]: d for d in client.durability.docs.find()}
        lost = [i for i in acked if i not in stored or not stored[i].get("updated")]
        assert lost == [], f"{len(lost)} of {len(acked)} acknowledged writes lost ({method})"
    finally:
        srv.stop()


def test_commit_method_is_validated():
    with pytest.raises(ValueError, match="commit sync"):
        secantus_compat.set_commit_method("sometimes")
