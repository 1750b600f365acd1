"""The embedded server's compatibility fixes: the same answers as SecantusDB, less work."""

from __future__ import annotations

import contextlib
import time

import pymongo
import pymongo.errors
import pytest
import secantus

from matcouple.store import secantus_compat
from matcouple.store.secantus_catalog_cache import catalog_cache_stats


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


# -- the index catalog cache ---------------------------------------------------------------
#
# Each test warms the cache (the same reads again and again), changes the catalog, then
# checks behaviour that a stale catalog would get wrong: a dropped index would still be
# read (and find nothing, its entries are gone), a dropped unique index would still refuse
# duplicates, a new one would not, an index that became multikey would still be walked
# for a sort (and lose the document whose array is empty).


def _warm(coll, query: dict, times: int = 5) -> None:
    for _ in range(times):
        list(coll.find(query))
        coll.count_documents(query)


def test_catalog_cache_follows_drop_and_recreate_of_an_index(server):
    client = pymongo.MongoClient(server.host, server.port)
    coll = client.compat_catalog.reindex
    coll.drop()
    coll.insert_many([{"_id": i, "a": i % 10, "b": i} for i in range(100)])
    coll.create_index("a", name="ix")
    _warm(coll, {"a": 3})
    assert coll.count_documents({"a": 3}) == 10
    coll.drop_index("ix")
    # A cached catalog still naming "ix" would read its (deleted) entries: nothing.
    assert len(list(coll.find({"a": 3}))) == 10
    assert coll.count_documents({"a": 3}) == 10

    coll.create_index("b", name="ix", unique=True)  # same name, other key, unique
    _warm(coll, {"b": 5})
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        coll.insert_one({"_id": "dup-b", "a": 3, "b": 5})
    coll.insert_one({"_id": "new", "a": 3, "b": 1000})
    assert [d["_id"] for d in coll.find({"b": 1000})] == ["new"]
    assert coll.count_documents({"a": 3}) == 11
    assert coll.find_one_and_update({"b": 1000}, {"$set": {"seen": True}})["_id"] == "new"

    coll.drop_index("ix")
    coll.insert_one({"_id": "dup-b", "a": 3, "b": 5})  # the unique index is gone
    coll.create_index("a", name="ix")  # and back to the first definition, not unique
    _warm(coll, {"a": 3})
    coll.insert_one({"_id": "dup-b2", "a": 3, "b": 5})
    assert coll.count_documents({"a": 3}) == 13
    assert coll.count_documents({"b": 5}) == 3
    names = {ix["name"]: ix for ix in coll.list_indexes()}
    assert set(names) == {"_id_", "ix"} and names["ix"]["key"] == {"a": 1}
    assert not names["ix"].get("unique")
    client.close()


def test_catalog_cache_sees_an_index_become_multikey(server):
    client = pymongo.MongoClient(server.host, server.port)
    coll = client.compat_catalog.multikey
    coll.drop()
    coll.create_index("x")
    coll.insert_many([{"_id": i, "x": (i * 7) % 5} for i in range(5)])
    for _ in range(5):  # walked in index order while the index is not multikey
        assert [d["x"] for d in coll.find({}, sort=[("x", 1)])] == [0, 1, 2, 3, 4]
    plan = coll.find({}, sort=[("x", 1)]).explain()["queryPlanner"]["winningPlan"]
    assert "IXSCAN" in str(plan) and plan["stage"] != "SORT", plan
    coll.update_one({"_id": 0}, {"$set": {"x": []}})  # an update makes it multikey
    # A walk of a multikey index loses {x: []} (an empty array writes no entry).
    got = list(coll.find({}, sort=[("x", 1)]))
    assert len(got) == 5 and got[0]["_id"] == 0, got
    assert coll.find_one({}, sort=[("x", 1)])["_id"] == 0
    plan = coll.find({}, sort=[("x", 1)]).explain()["queryPlanner"]["winningPlan"]
    assert plan["stage"] == "SORT" and "IXSCAN" not in str(plan), plan  # no index walk
    client.close()


def test_catalog_cache_after_drop_collection_database_and_rename(server):
    client = pymongo.MongoClient(server.host, server.port)
    db = client.compat_catalog
    # drop_collection, then the same name with a different index
    db.c1.drop()
    db.c1.create_index("k", unique=True)
    db.c1.insert_many([{"k": i, "m": i % 3} for i in range(30)])
    _warm(db.c1, {"k": 4})
    db.c1.drop()
    db.c1.create_index("m")
    db.c1.insert_many([{"k": 1, "m": 2}, {"k": 1, "m": 2}])  # k is not unique any more
    assert db.c1.count_documents({"m": 2}) == 2
    assert db.c1.count_documents({"k": 1}) == 2

    # drop_database
    other = client.compat_catalog_other
    other.c.create_index("k", unique=True)
    other.c.insert_many([{"k": i} for i in range(10)])
    _warm(other.c, {"k": 3})
    client.drop_database("compat_catalog_other")
    other.c.insert_many([{"k": 3}, {"k": 3}])
    assert other.c.count_documents({"k": 3}) == 2
    assert [ix["name"] for ix in other.c.list_indexes()] == ["_id_"]
    client.drop_database("compat_catalog_other")

    # rename_collection over an existing target with other indexes
    db.src.drop()
    db.dst.drop()
    db.src.create_index("u", unique=True)
    db.dst.create_index("v", unique=True)
    db.src.insert_many([{"u": i, "v": 0} for i in range(10)])
    db.dst.insert_many([{"u": 0, "v": i} for i in range(10)])
    _warm(db.src, {"u": 3})
    _warm(db.dst, {"v": 3})
    db.src.rename("dst", dropTarget=True)
    assert db.dst.count_documents({"v": 0}) == 10  # the target's v index is gone
    db.dst.insert_one({"u": 100, "v": 0})  # v no longer unique
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        db.dst.insert_one({"u": 3, "v": 1})  # u is, now
    assert db.dst.count_documents({"u": 3}) == 1
    db.src.insert_many([{"u": 3}, {"u": 3}])  # a new src has no index on u
    assert db.src.count_documents({"u": 3}) == 2
    assert [ix["name"] for ix in db.src.list_indexes()] == ["_id_"]
    client.close()


def test_catalog_cache_with_concurrent_index_ddl(server):
    """One client creates and drops indexes while two others read and write; the documents
    the readers look at never change, so every read must give the same answer whatever
    indexes exist, and each DDL step must be enforced at once."""
    import threading

    ddl_client = pymongo.MongoClient(server.host, server.port)
    read_client = pymongo.MongoClient(server.host, server.port)
    coll = ddl_client.compat_catalog.race
    coll.drop()
    coll.insert_many([{"_id": i, "a": i % 20, "b": i % 7, "u": i, "state": "READY",
                       "p": i % 5} for i in range(400)])
    expect_a = {k: sum(1 for i in range(400) if i % 20 == k) for k in range(20)}
    expect_b = {k: sum(1 for i in range(400) if i % 7 == k) for k in range(7)}
    coll.create_index("a", name="ia")
    coll.create_index([("state", 1), ("p", -1)], name="sp")
    stop = threading.Event()
    errors: list[str] = []

    def reader(k: int) -> None:
        rc = read_client.compat_catalog.race
        n = k
        while not stop.is_set():
            n += 1
            ka, kb = n % 20, n % 7
            got_a = len(list(rc.find({"a": ka}, {"_id": 1})))
            got_b = rc.count_documents({"b": kb})
            top = rc.find_one({"state": "READY"}, sort=[("p", -1)])
            if got_a != expect_a[ka] or got_b != expect_b[kb] or top["p"] != 4:
                errors.append(f"a={ka}: {got_a}, b={kb}: {got_b}, top p={top['p']}")
            rc.find_one_and_update({"_id": n % 400}, {"$set": {"seen": n}})

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        for round_ in range(10):
            coll.drop_index("ia")
            coll.create_index("u", name="ia", unique=True)  # same name, other key, unique
            with pytest.raises(pymongo.errors.DuplicateKeyError):
                coll.insert_one({"_id": "dup", "u": 7})
            coll.drop_index("ia")
            coll.insert_one({"_id": "dup", "u": 7})  # no longer refused
            coll.delete_one({"_id": "dup"})
            coll.create_index("a", name="ia")
            coll.drop_index("sp")
            coll.create_index([("state", 1), ("p", -1)], name="sp")
            if round_ % 3 == 0:
                coll.create_index("b", name="ib")
                coll.drop_indexes()
                coll.create_index("a", name="ia")
                coll.create_index([("state", 1), ("p", -1)], name="sp")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:5]
    rc = read_client.compat_catalog.race
    assert sorted(ix["name"] for ix in rc.list_indexes()) == ["_id_", "ia", "sp"]
    coll.drop_index("ia")
    assert sorted(ix["name"] for ix in rc.list_indexes()) == ["_id_", "sp"]
    assert rc.count_documents({"a": 3}) == expect_a[3]
    ddl_client.close()
    read_client.close()


# The same cache, driven through the storage API of a SecantusDB in this process, for the
# interleavings a client cannot force: user transactions, a write batch that rolls back,
# and a reader whose WiredTiger snapshot predates a catalog write.


@pytest.fixture()
def storage(tmp_path):
    """A real SecantusDB storage in the test process, with the fixes applied."""
    assert secantus_compat.apply()
    from secantus.storage import Storage

    st = Storage(str(tmp_path / "db"), enable_oplog=False)
    yield st
    st.close()


def _uncached(st, db: str, coll: str, *, refresh: bool = True) -> list:
    """The catalog exactly as 0.7.0b3 reads it, on this thread's session."""
    from secantus.storage import Storage

    if refresh:
        st._refresh_read_snapshot()
    return list(Storage._iter_indexes.__wrapped__(st, db, coll))


_OTHER_THREAD = None


def _in_thread(fn):
    """Run ``fn`` on another thread, always the same one (as a server connection is), so
    its WiredTiger session and snapshot record outlive one call."""
    global _OTHER_THREAD
    from concurrent.futures import ThreadPoolExecutor

    if _OTHER_THREAD is None:
        _OTHER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="other-reader")
    return _OTHER_THREAD.submit(fn).result(timeout=60)


def test_catalog_cache_apply_is_idempotent(storage):
    from secantus.storage import Storage

    patched = (Storage._iter_indexes, Storage._cursor, Storage._batch_transaction)
    assert secantus_compat.apply()
    assert (Storage._iter_indexes, Storage._cursor, Storage._batch_transaction) == patched


def test_catalog_cache_callers_cannot_mutate_it(storage):
    st = storage
    st.insert("d", "c", [{"_id": 1, "a": 1, "b": 1}])
    st.create_index("d", "c", "a_1", {"a": 1}, {"unique": True})
    st.create_index("d", "c", "b_p", {"b": 1},
                    {"partialFilterExpression": {"b": {"$gt": 0}},
                     "collation": {"locale": "en", "strength": 2}})
    st._refresh_read_snapshot()
    before = list(st._iter_indexes("d", "c"))
    assert before == _uncached(st, "d", "c")
    hits = catalog_cache_stats(st)["hits"]
    for _name, key_spec, opts in st._iter_indexes("d", "c"):
        key_spec["zzz"] = 1
        opts.get("partialFilterExpression", {}).get("b", {})["$gt"] = 99
        opts.get("collation", {}).clear()
        opts.clear()
    st._multikey_index_names("d", "c").add("a_1")  # the write paths grow this set
    for _name, key_spec, _sparse, _unique in st._all_indexes("d", "c"):
        key_spec.clear()
    st._partial_filters("d", "c")["b_p"]["b"] = 5
    st._index_options_map("d", "c")["a_1"]["unique"] = False
    for ix in st.list_indexes("d", "c"):
        ix["key"].clear()
        ix.pop("unique", None)
    assert catalog_cache_stats(st)["hits"] > hits + 5  # served from cache
    assert list(st._iter_indexes("d", "c")) == before == _uncached(st, "d", "c")
    assert st._multikey_index_names("d", "c") == set()
    with pytest.raises(Exception, match="11000|duplicate|E11000"):
        st.update_matching("d", "c", {"_id": 2}, {"$set": {"a": 1}}, upsert=True)


def test_catalog_cache_and_user_transactions(storage):
    st = storage
    st.insert("d", "c", [{"_id": i, "x": i} for i in range(5)])
    st.create_index("d", "c", "x_1", {"x": 1})
    st._refresh_read_snapshot()
    assert not st.index_is_multikey("d", "c", "x_1")  # cached

    def committed_view() -> bool:
        st._refresh_read_snapshot()
        try:
            return st.index_is_multikey("d", "c", "x_1")
        finally:
            st.release_thread_snapshot()

    for outcome in ("abort", "commit"):
        h = st.begin_user_transaction()
        with st.use_user_transaction(h):
            st.insert("d", "c", [{"_id": f"arr-{outcome}", "x": [1, 2]}])
            assert st.index_is_multikey("d", "c", "x_1")  # its own write
        # Others still see the committed catalog while the transaction is open ...
        assert _in_thread(committed_view) is False
        assert committed_view() is False
        assert catalog_cache_stats(st)["inflight"] == 1
        if outcome == "abort":
            st.abort_user_transaction(h)
            expect = False
        else:
            st.commit_user_transaction(h)
            expect = True
        # ... and after it ends, exactly what it left behind.
        assert catalog_cache_stats(st)["inflight"] == 0
        for _ in range(3):
            assert committed_view() is expect
            assert _in_thread(committed_view) is expect
        assert _uncached(st, "d", "c") == list(st._iter_indexes("d", "c"))


def test_catalog_cache_and_a_write_batch_that_commits_or_rolls_back(storage):
    """A statement that marks an index multikey: while it runs, other threads read (and may
    cache) the committed catalog; once it commits they must see the flag, and once it
    rolls back they must not."""
    st = storage
    for coll, outcome in (("c", "rollback"), ("c2", "commit")):

        def committed_names(coll: str = coll) -> set:
            st._refresh_read_snapshot()
            try:
                return st._multikey_index_names("d", coll)
            finally:
                st.release_thread_snapshot()

        st.insert("d", coll, [{"_id": i, "x": i} for i in range(5)])
        st.create_index("d", coll, "x_1", {"x": 1})
        assert committed_names() == set()
        with contextlib.suppress(RuntimeError), st._coll_lock("d", coll), \
                st._batch_transaction():
            indexes = st._all_indexes("d", coll)
            st._maybe_mark_multikey("d", coll, {"x": [1, 2]}, indexes, set())
            assert st._multikey_index_names("d", coll) == {"x_1"}  # its own write
            for _ in range(3):
                assert _in_thread(committed_names) == set()
            if outcome == "rollback":
                raise RuntimeError("the statement fails after marking the index")
        assert catalog_cache_stats(st)["inflight"] == 0
        expect = {"x_1"} if outcome == "commit" else set()
        for _ in range(3):
            assert committed_names() == expect
            assert _in_thread(committed_names) == expect
        assert _uncached(st, "d", coll) == list(st._iter_indexes("d", coll))


def test_catalog_cache_never_stores_a_catalog_from_an_older_snapshot(storage):
    """A reader whose snapshot predates a catalog write reads the old catalog (as 0.7.0b3
    does) but must not leave it in the cache, even though the write ended before it read."""
    import threading

    from secantus import storage as storage_mod

    st = storage
    st.insert("d", "c", [{"_id": i, "x": i} for i in range(5)])
    st.create_index("d", "c", "x_1", {"x": 1})
    pinned, written = threading.Event(), threading.Event()
    seen: dict = {}

    def old_reader() -> None:
        st._refresh_read_snapshot()
        c = st._cursor(storage_mod._COLL_TABLE)
        c.next()  # a positioned cursor pins this session's snapshot
        pinned.set()
        written.wait(30)
        seen["names"] = st._multikey_index_names("d", "c")
        seen["exact"] = _uncached(st, "d", "c", refresh=False)
        seen["cached"] = list(st._iter_indexes("d", "c"))
        st.release_thread_snapshot()

    t = threading.Thread(target=old_reader)
    t.start()
    pinned.wait(30)
    _in_thread(lambda: st.insert("d", "c", [{"_id": "arr", "x": [1, 2]}]))  # commits
    written.set()
    t.join(30)
    assert seen["names"] == set()  # the old snapshot's catalog, as without the cache
    assert seen["cached"] == seen["exact"]
    st._refresh_read_snapshot()
    for _ in range(3):
        assert st._multikey_index_names("d", "c") == {"x_1"}
        assert _in_thread(lambda: st._multikey_index_names("d", "c")) == {"x_1"}


# Unchanged index entries are kept on update (matcouple.store.secantus_update_entries):
# the same operations on a patched and an unpatched storage leave identical tables.


def _table_rows(st, table: str) -> list:
    st._refresh_read_snapshot()
    cur = st._cursor(table)
    cur.reset()
    rows = []
    while cur.next() == 0:
        rows.append((tuple(bytes(k) if isinstance(k, bytes | memoryview) else k
                           for k in (cur.get_key() if isinstance(cur.get_key(), tuple)
                                     else (cur.get_key(),))),
                     bytes(cur.get_value()) if not isinstance(cur.get_value(), int)
                     else cur.get_value()))
    cur.reset()
    return rows


def _all_tables(st, db: str, coll: str) -> dict:
    from secantus import storage as storage_mod

    return {t: _table_rows(st, t) for t in (
        storage_mod._IDX_ENTRIES_TABLE, storage_mod._UNIQ_TABLE, storage_mod._IDX_TABLE,
        storage_mod._doc_table_for(db, coll))}


_FW_LIKE_INDEXES = [
    ("fw_id_1", {"fw_id": 1}, {"unique": True}),
    ("state_1", {"state": 1}, {}),
    ("claim", {"state": -1, "spec._priority": -1, "created_on": 1}, {}),
    ("launches_1", {"launches": 1}, {}),
    ("name_ci", {"name": 1}, {"collation": {"locale": "en", "strength": 2}}),
    ("tag_sparse", {"tag": 1}, {"sparse": True}),
    ("hot_partial", {"n": 1}, {"partialFilterExpression": {"n": {"$gt": 10}}}),
    ("uniq_pair", {"a": 1, "b": -1}, {"unique": True}),
    ("geo", {"loc": "2dsphere"}, {}),
]

_UPDATES = [
    # (filter, update, kwargs): FireWorks-shaped and edge cases for every kind of index.
    ({"state": "READY"}, {"$set": {"state": "RESERVED", "updated_on": 1}}, {}),
    ({"fw_id": 3}, {"$set": {"updated_on": 2}}, {}),  # no indexed field changes
    ({"fw_id": 3}, {"$set": {"updated_on": 2}}, {}),  # nothing changes at all
    ({"fw_id": 4}, {"$push": {"launches": 40}}, {}),  # becomes multikey
    ({"fw_id": 4}, {"$push": {"launches": 41}}, {}),
    ({"fw_id": 5}, {"$set": {"name": "FW-5"}}, {}),  # same key under the collation
    ({"fw_id": 5}, {"$set": {"name": "other"}}, {}),
    ({"fw_id": 6}, {"$unset": {"tag": ""}}, {}),  # leaves the sparse index
    ({"fw_id": 7}, {"$set": {"tag": "t"}}, {}),  # enters it
    ({"fw_id": 8}, {"$set": {"n": 11}}, {}),  # enters the partial index
    ({"fw_id": 9}, {"$set": {"n": 3}}, {}),  # leaves it
    ({"fw_id": 10}, {"$set": {"n": 12}}, {}),  # stays in it, key changes
    ({"fw_id": 11}, {"$set": {"fw_id": 111}}, {}),  # unique key changes
    ({"fw_id": 12}, {"$set": {"fw_id": 13}}, {}),  # unique conflict: DuplicateKey
    ({"fw_id": 14}, {"$set": {"a": 0, "b": 0}}, {}),  # compound unique key changes
    ({"fw_id": 15}, {"$set": {"a": 0, "b": 0}}, {}),  # taken by fw_id 14 now
    ({"fw_id": 16}, {"$set": {"loc": {"type": "Point", "coordinates": [1, 2]}}}, {}),
    ({"fw_id": 17}, {"$set": {"spec._priority": 5, "x": 1}}, {}),
    ({"fw_id": 1}, {"$set": {"created_on": 1.0}}, {}),  # same number, another type
    ({"fw_id": 1}, {"$set": {"created_on": True}}, {}),
    ({"fw_id": 13}, {"$set": {"spec._priority": 0.0}}, {}),
    ({"fw_id": 13}, {"$set": {"spec._priority": -0.0}}, {}),
    ({"fw_id": 2}, {"$set": {"spec": [{"_priority": 1}, {"_priority": 2}]}}, {}),  # array
    ({"fw_id": 2}, {"$set": {"spec.1._priority": 3}}, {}),  # inside it
    ({"fw_id": 2}, {"$set": {"spec.1.other": 3}}, {}),  # beside it
    ({"fw_id": 18}, {"$set": {"state": "COMPLETED"}}, {"return_post_images": True}),
    ({"_id": 999, "fw_id": 999}, {"$set": {"state": "NEW"}}, {"upsert": True}),
    ({"state": "WAITING"}, {"$set": {"state": "READY"}}, {"multi": True}),
    ({"fw_id": {"$in": [1, 2]}}, [{"$set": {"state": "PIPE", "n": 20}}], {}),
]


def _run_update_sequence(st) -> list:
    db, coll = "d", "fw"
    docs = [{"_id": i, "fw_id": i, "state": "READY" if i % 3 else "WAITING",
             "spec": {"_priority": i % 4}, "created_on": i, "updated_on": 0,
             "launches": [], "name": f"fw-{i}", "n": i, "a": i, "b": i,
             **({"tag": f"t{i % 2}"} if i % 2 else {}),
             "loc": {"type": "Point", "coordinates": [i, 0]}} for i in range(1, 20)]
    st.insert(db, coll, docs)
    for name, key_spec, options in _FW_LIKE_INDEXES:
        st.create_index(db, coll, name, key_spec, options)
    outcomes = []
    for filt, update, kwargs in _UPDATES:
        try:
            res = st.update_matching(db, coll, filt, update, **kwargs)
            outcomes.append(("ok", {k: v for k, v in res.items()}))
        except Exception as exc:  # the same refusal, of the same type, on both
            outcomes.append(("error", type(exc).__name__, str(exc)))
    outcomes.append(st.find_matching(db, coll, {}, sort={"_id": 1}))
    outcomes.append(st.find_matching(db, coll, {"state": "RESERVED"}, sort={"spec._priority": -1},
                                     limit=3))
    outcomes.append(st.find_matching(db, coll, {"launches": 41}))
    outcomes.append(st.find_matching(db, coll, {"n": {"$gt": 10}}))
    return outcomes


def test_update_keeps_unchanged_index_entries_with_identical_results(tmp_path, monkeypatch):
    assert secantus_compat.apply()
    from secantus import storage as storage_mod
    from secantus.storage import Storage

    from matcouple.store import secantus_update_entries as sue

    calls = {"skipped": 0}
    original_unchanged = sue.unchanged_indexes

    def counting(*args, **kwargs):
        same = original_unchanged(*args, **kwargs)
        calls["skipped"] += len(same)
        return same

    def run_and_dump(folder: str) -> tuple[list, dict]:
        store = Storage(str(tmp_path / folder), enable_oplog=False)
        try:
            return _run_update_sequence(store), _all_tables(store, "d", "fw")
        finally:
            store.close()

    monkeypatch.setattr(sue, "unchanged_indexes", counting)
    got, got_tables = run_and_dump("patched")
    assert calls["skipped"] > 20  # the fix did skip work

    with monkeypatch.context() as m:  # the same SecantusDB without this fix
        for name in ("_update_matching_single_txn", "_delete_index_entries",
                     "_write_index_entries"):
            m.setattr(Storage, name, getattr(Storage, name).__wrapped__)
        m.setattr(storage_mod, "apply_update", storage_mod.apply_update.__wrapped__)
        want, want_tables = run_and_dump("plain")
    assert got == want
    assert got_tables == want_tables
    assert any(o[0] == "error" for o in want[:len(_UPDATES)])  # conflicts were exercised


def test_update_entries_patch_is_idempotent(storage):
    from secantus import storage as storage_mod
    from secantus.storage import Storage

    before = (Storage._update_matching_single_txn, Storage._delete_index_entries,
              Storage._write_index_entries, storage_mod.apply_update)
    assert secantus_compat.apply()
    assert before == (Storage._update_matching_single_txn, Storage._delete_index_entries,
                      Storage._write_index_entries, storage_mod.apply_update)


def test_update_entries_value_comparison_is_type_strict():
    import datetime

    from bson import Decimal128, Int64, ObjectId

    from matcouple.store.secantus_update_entries import _same_paths, _same_value

    assert _same_value({"a": [1, "x", None]}, {"a": [1, "x", None]})
    assert not _same_value(1, 1.0) and not _same_value(1, True) and not _same_value(1, Int64(1))
    assert not _same_value(0.0, -0.0) and not _same_value(float("nan"), float("nan"))
    assert not _same_value({"a": 1, "b": 2}, {"b": 2, "a": 1})  # field order is a value
    assert _same_value(Decimal128("1.0"), Decimal128("1.0"))
    assert not _same_value(Decimal128("1.0"), Decimal128("1.00"))
    oid = ObjectId()
    assert _same_value(oid, ObjectId(str(oid)))
    now = datetime.datetime(2026, 1, 1)
    assert _same_value(now, datetime.datetime(2026, 1, 1))
    assert not _same_value(object(), object())  # unknown types count as changed
    spec = {"spec._priority": 1}
    assert _same_paths({"spec": {"_priority": 1, "x": 1}}, {"spec": {"_priority": 1}}, spec)
    assert not _same_paths({"spec": {}}, {"spec": {"_priority": None}}, spec)
    assert not _same_paths({"spec": [{"_priority": 1}]}, {"spec": [{"_priority": 2}]}, spec)
    assert not _same_paths({"spec": 5}, {}, spec)


# Catalog-derived answers memoised (matcouple.store.secantus_plan_cache): the same answers
# as without the memo, after every kind of index and collection DDL.

_PLAIN_INDEXES = [
    ("fw_id_1", {"fw_id": 1}, {"unique": True}),
    ("state_1", {"state": 1}, {}),
    ("claim", {"state": -1, "spec._priority": -1, "created_on": 1}, {}),
    ("launches_1", {"launches": 1}, {}),
]
_PICKS = [  # (filter, collation): asked of both pickers on both collections
    ({"fw_id": 3}, None), ({"state": "READY"}, None),
    ({"state": "READY", "spec._priority": 1}, None), ({"launches": 3, "state": "X"}, None),
    ({"tag": "t1"}, None), ({"tag": None}, None),  # sparse: usable for one, not the other
    ({"n": 11}, None), ({"n": 3}, None),  # partial: implied by one, not the other
    ({"name": "fw-5"}, None), ({"name": "fw-5"}, {"locale": "en", "strength": 2}),
]


def _catalog_answers(st, colls: tuple[str, ...] = ("fw", "plain")) -> list:
    """Every memoised answer, each asked twice (the second may come from the memo); the
    caller's copies are then scribbled on, which must not reach the next answer."""
    from secantus.storage import _parse_index_collation

    out = []
    st._refresh_read_snapshot()
    for coll in colls:
        for _ in range(2):
            answers = [st._all_indexes("d", coll), st._partial_filters("d", coll),
                       st._index_options_map("d", coll), st._multikey_index_names("d", coll),
                       st._coll_options("d", coll), st.get_collection_options("d", coll),
                       st._is_timeseries("d", coll),
                       [st.index_is_multikey("d", coll, n) for n in ("launches_1", "state_1")]]
            for filt, coll_spec in _PICKS:
                collation = _parse_index_collation(coll_spec)
                answers.append(st._pick_compound_eq_index("d", coll, filt,
                                                          collation=collation))
                field = next(iter(filt))
                answers.append(st._find_leading_field_index("d", coll, field, filt,
                                                            collation=collation))
                answers.append(sorted(st.find_matching("d", coll, filt),
                                      key=lambda doc: repr(doc["_id"])))
            # A collection's uuid is random: compare its type, not its value.
            out.append(repr([{k: type(v).__name__ if k == "uuid" else v for k, v in a.items()}
                             if isinstance(a, dict) else a for a in answers]))
            for value in answers:  # the callers' own copies
                if isinstance(value, dict | set):
                    value.clear()
                elif isinstance(value, list):
                    for item in value:
                        if isinstance(item, tuple) and len(item) == 4:
                            item[1].clear()
                elif isinstance(value, tuple) and len(value) == 2:
                    value[1].clear()
    st.release_thread_snapshot()
    return out


def _run_ddl_sequence(st) -> list:
    docs = [{"_id": i, "fw_id": i, "state": "READY" if i % 3 else "WAITING",
             "spec": {"_priority": i % 4}, "created_on": i, "launches": i, "name": f"fw-{i}",
             "n": i, "a": i, "b": i, **({"tag": f"t{i % 2}"} if i % 2 else {})}
            for i in range(1, 20)]
    st.insert("d", "fw", docs)
    st.insert("d", "plain", docs)
    for name, key_spec, options in _FW_LIKE_INDEXES:
        st.create_index("d", "fw", name, key_spec, options)
    for name, key_spec, options in _PLAIN_INDEXES:
        st.create_index("d", "plain", name, key_spec, options)
    steps = [
        lambda: None,
        lambda: st.drop_index("d", "plain", "state_1"),  # {state} now picks "claim"
        lambda: st.create_index("d", "plain", "state_1", {"state": 1}, {}),
        lambda: st.create_index("d", "plain", "tag_1", {"tag": 1}, {"sparse": True}),
        lambda: st.drop_index("d", "plain", "tag_1"),
        lambda: st.insert("d", "plain", [{"_id": 50, "fw_id": 50, "launches": [1, 2]}]),
        lambda: st.set_collection_options("d", "plain", validator={"n": {"$gte": 0}}),
        lambda: st.set_collection_options("d", "plain", validationLevel="off"),
        lambda: st.drop_collection("d", "plain"),
        lambda: st.create_collection("d", "plain", {"capped": True, "size": 4096}),
        lambda: st.create_index("d", "plain", "fw_id_1", {"fw_id": 1}, {"unique": True}),
        lambda: st.rename_collection("d", "plain", "d", "renamed"),
        lambda: st.rename_collection("d", "renamed", "d", "plain"),
        lambda: st.drop_database("d"),
    ]
    out = []
    for step in steps:
        step()
        out.extend(_catalog_answers(st))
    return out


def test_plan_cache_answers_equal_the_unmemoised_ones_across_ddl(tmp_path, monkeypatch):
    assert secantus_compat.apply()
    from secantus.storage import Storage

    from matcouple.store.secantus_plan_cache import memo_stats

    def run(folder: str) -> list:
        store = Storage(str(tmp_path / folder), enable_oplog=False)
        try:
            answers = _run_ddl_sequence(store)
            store.insert("d", "again", [{"_id": 1, "a": 1}])
            store.create_index("d", "again", "a_1", {"a": 1}, {})
            _catalog_answers(store, ("again",))
            return answers, memo_stats(store)["values"]
        finally:
            store.close()

    got, memoised = run("memo")
    assert memoised > 5  # the memo was filled (and, by the asking twice, used)
    with monkeypatch.context() as m:  # the same SecantusDB without this fix
        for name in ("_all_indexes", "_partial_filters", "_index_options_map",
                     "_multikey_index_names", "_coll_options", "_pick_compound_eq_index",
                     "_find_leading_field_index", "index_is_multikey",
                     "get_collection_options"):
            m.setattr(Storage, name, getattr(Storage, name).__wrapped__)
        want, _ = run("plain")
    assert got == want


def test_plan_cache_is_not_used_or_filled_from_an_older_snapshot(storage):
    """A reader whose snapshot predates an index drop gets the old choice of index (as
    0.7.0b3 does); neither it nor later readers may see a memo from the other catalog."""
    import threading

    from secantus import storage as storage_mod

    st = storage
    st.insert("d", "c", [{"_id": i, "state": "R", "p": i} for i in range(5)])
    st.create_index("d", "c", "state_1", {"state": 1}, {})
    st.create_index("d", "c", "state_p", {"state": 1, "p": 1}, {})
    st._refresh_read_snapshot()
    for _ in range(2):
        assert st._pick_compound_eq_index("d", "c", {"state": "R"})[0] == "state_1"
    pinned, written = threading.Event(), threading.Event()
    seen: dict = {}

    def old_reader() -> None:
        st._refresh_read_snapshot()
        st._cursor(storage_mod._COLL_TABLE).next()  # pins this session's snapshot
        pinned.set()
        written.wait(30)
        seen["old"] = [st._pick_compound_eq_index("d", "c", {"state": "R"})
                       for _ in range(2)]
        st.release_thread_snapshot()

    t = threading.Thread(target=old_reader)
    t.start()
    pinned.wait(30)
    _in_thread(lambda: st.drop_index("d", "c", "state_1"))
    written.set()
    t.join(30)
    assert [p[0] for p in seen["old"]] == ["state_1", "state_1"]
    st._refresh_read_snapshot()
    for _ in range(3):
        assert st._pick_compound_eq_index("d", "c", {"state": "R"})[0] == "state_p"
        assert _in_thread(
            lambda: st._pick_compound_eq_index("d", "c", {"state": "R"})[0]) == "state_p"
