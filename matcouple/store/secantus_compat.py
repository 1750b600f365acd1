"""Compatibility fixes for the embedded SecantusDB server, pinned to the versions they fix.

SecantusDB 0.7.0b3 answers ``findAndModify`` by first finding the document and then
writing it back with the filter ``{"_id": X, "$and": [original query]}``. Its write path
picks candidate documents through ``Storage._candidates_iter``, which gives up on any
filter that has a ``$``-operator at the top level and scans the whole collection. A
findAndModify therefore costs O(collection size), and FireWorks issues about twelve per
Firework, so a LaunchPad slowed down as it filled (14 FW/s at 300 Fireworks, 5 FW/s at
1,500).

The fix narrows the candidates to the point lookup on ``_id`` whenever the filter pins
``_id`` to one value. It is safe because every caller of ``_candidates_iter`` re-applies
the *full* filter to each candidate before writing (see its docstring), so the result is
identical; only the scan is skipped.

A second fix serves ``find``/``findAndModify`` with an equality filter and a sort, limited
to a few documents, by walking a compound index whose leading fields are the filter's
equality fields and whose next fields are the sort (FireWorks' checkout: ``{state:
"READY"}`` sorted by ``spec._priority`` over the index (state, spec._priority,
created_on)). 0.7.0b3 instead decoded and sorted every READY document on each checkout,
so a LaunchPad with 10,000 queued Fireworks ran at 0.7 FW/s against 5.5 FW/s with 1,000.
The walk visits index entries in order, fetches documents one at a time and re-applies
the full filter, stopping at ``limit`` matches; anything it is not sure of (hint,
collation, skip, bounds, sparse/partial/multikey indexes, another direction) goes to the
original code.

A fourth fix is a durability choice rather than a bug: with ``--sync-on-commit`` every
commit fsyncs the WiredTiger log (``transaction_sync=(enabled=true,method=fsync)``), which
made every FireWorks write cost ~3-4 ms on this machine's disk (update_one 3.66 ms,
findAndModify 4.59 ms, against 0.8 and 1.2 ms without the fsync). WiredTiger's
``method=none`` still writes the log record to the operating system at each commit before
the write is acknowledged, but does not wait for the disk: an acknowledged write survives
a SIGKILL of the server (measured: 0 of 10,716 acknowledged writes lost over three kills,
against 3 and 39 lost with the log left in WiredTiger's buffer), though not a power loss
or an operating-system crash. :func:`set_commit_method` selects it; matcouple's default is
``none`` for the embedded database (``MATCOUPLE_DB_COMMIT_SYNC=fsync`` restores the fsync;
production deployments use a real MongoDB with its own journal settings).

A third fix makes index creation ignore the ``background`` option when comparing a
requested index with an existing one of the same name, as MongoDB has done since 4.2
(where the option is ignored). Without it, FireWorks' ``lpad reset`` (background indexes)
after ``lpad admin tuneup --full`` (foreground) fails with IndexKeySpecsConflict.

A fifth fix caches the decoded index catalog. 0.7.0b3 answers every question about a
collection's indexes (``_all_indexes``, ``_partial_filters``, ``_multikey_index_names``,
``_index_options_map``, ``index_is_multikey``, ``list_indexes``...) through
``Storage._iter_indexes``, a cursor walk over the catalog table plus a ``bson.decode`` per
index: ~120 us for FireWorks' ten indexes on ``fireworks``, ten times per ``update_one``
and three per ``find`` (11-13% of the server's samples under ``rlaunch rapidfire``).
:func:`apply` keeps the decoded rows per (db, coll) and answers ``_iter_indexes`` from
them (a copy per call, so no caller can alter the cache: the write paths grow the set
``_multikey_index_names`` returns, and ``list_indexes`` hands its dicts to the commands).
Measured on a shared 2-core machine (1-minute load average 0.8-2.3 over the runs,
before and after interleaved): ``benchmarks/launchpad.py --dataset none --sizes 1000
--workers 1`` went from 5.7-6.3 to 7.9-8.9 FW/s for matcouple Fireworks and from 6.4 to
9.9-10.8 FW/s for ScriptTask ones; ``benchmarks/catalog_cache.py`` (2,000 alternating
``find_one_and_update``/``update_one`` on ``fw_id``, FireWorks' ten indexes) from 5.4-6.1
/ 5.2-5.8 to 2.5-3.7 / 2.3-3.4 ms per call; one ``_iter_indexes`` call from ~120 us to
~6-15 us.

Why the cached rows are exactly what the walk would read:

* Every write to the catalog table goes through a cursor from ``Storage._cursor`` (in
  0.7.0b3: ``create_index``, ``drop_index``, ``drop_all_indexes``, ``set_index_expiry``,
  ``set_index_options``, ``_maybe_mark_multikey`` from inserts and updates,
  ``drop_collection``, ``drop_database``, ``rename_collection``, and
  ``_recover_pending_drops_locked`` at start-up; no other module touches the table, and
  oplog replay and restores go through these methods or open a new ``Storage``). Cursors
  on that table come back wrapped: each write *begins* by bumping a generation counter and
  dropping every cached entry, and *ends* the same way once it has committed or rolled
  back: at once for an autocommit write, after the enclosing ``_batch_transaction``, or
  when the user transaction's session is closed (commit or abort). Nothing is stored
  while any write is between begin and end.
* WiredTiger reads come from a snapshot, possibly older than the latest commit. Each
  thread records the generation just *before* its session's snapshot can have been taken:
  when ``_refresh_read_snapshot`` has really reset it, and when a ``_batch_transaction``
  begins (the snapshot is taken at ``begin_transaction``). Snapshots only move forward.
  So if the generation still equals the record, no catalog write began or ended after
  it, and a write begun before it and still in flight has emptied the cache and blocks
  stores: when rows are stored (under the cache's lock, only if the generation is the
  storing reader's record and no write is in flight) the reader's snapshot saw exactly
  the committed catalog, and a hit is only served under the same test, so it is what the
  walk would read on that snapshot. A reader whose snapshot may be older walks the table
  as before and stores nothing. Outside a transaction a hit leaves a catalog cursor
  positioned (pinning the snapshot, as the walk does) and then re-checks the generation.
* Inside a user transaction (pinned snapshot, its own uncommitted writes), while its
  session is installed for a commit, in ``_committed_read_scope`` (another session), and
  in a statement after its own catalog write (the generation moved), the walk runs as
  before. A user transaction that wrote the catalog and is never closed would leave the
  cache disabled (slower, never stale). The first read on a new connection walks too.

:func:`apply` patches only the versions listed in :data:`FIXED_VERSIONS`; for any other
version it does nothing, so an upgrade can never be silently altered by a stale patch.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import threading
import uuid
from typing import Any

FIXED_VERSIONS = frozenset({"0.7.0b3"})
_MARK = "_matcouple_id_narrowing"


def _pins_single_id(query: Any) -> bool:
    """True for ``{"_id": <plain value>, "$and": [...]}``-shaped filters."""
    if not isinstance(query, dict) or "_id" not in query or len(query) < 2:
        return False
    value = query["_id"]
    if isinstance(value, dict) and any(str(k).startswith("$") for k in value):
        return False
    return not isinstance(value, list)


def apply() -> bool:
    """Install the fixes if the installed SecantusDB needs them; return whether it did."""
    import secantus
    from secantus import commands
    from secantus.storage import Storage

    if secantus.__version__ not in FIXED_VERSIONS:
        return False
    commands._INDEX_NOT_OPTIONS = commands._INDEX_NOT_OPTIONS | {"background"}
    original = Storage._candidates_iter
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def candidates_iter(self: Any, db: str, coll: str, filter: dict[str, Any] | None):
        if _pins_single_id(filter):
            assert filter is not None
            return original(self, db, coll, {"_id": filter["_id"]})
        return original(self, db, coll, filter)

    setattr(candidates_iter, _MARK, True)
    Storage._candidates_iter = candidates_iter  # type: ignore[method-assign]
    _patch_ordered_find(Storage)
    _patch_index_catalog_cache(Storage)
    return True


def _sort_walk_index(storage: Any, db: str, coll: str, filter: dict[str, Any],
                     sort: Any) -> str | None:
    """Name of an index (eq fields..., sort fields...) in the sort's own directions."""
    sort_items = list(dict(sort).items())
    if not sort_items or any(d not in (1, -1) for _, d in sort_items):
        return None
    eq = {f for f, v in filter.items()
          if not f.startswith("$") and not isinstance(v, dict | list)}
    if not eq:
        return None
    partials = storage._partial_filters(db, coll)
    for name, key_spec, sparse, _unique in storage._all_indexes(db, coll):
        fields = list(key_spec.items())
        lead = fields[:len(eq)]
        rest = fields[len(eq):len(eq) + len(sort_items)]
        if sparse or name in partials or {f for f, _ in lead} != eq:
            continue
        if any(d not in (1, -1) for _, d in fields):
            continue
        if rest != [(f, int(d)) for f, d in sort_items]:
            continue
        if storage.index_is_multikey(db, coll, name):
            continue
        return name
    return None


def _first_matches_in_index_order(storage: Any, storage_mod: Any, db: str, coll: str,
                                  name: str, kb: bytes, filter: dict[str, Any], limit: int,
                                  matches: Any) -> list[dict[str, Any]]:
    """Walk the index entries under prefix ``kb`` lazily; stop at ``limit`` matches."""
    wt = storage_mod.wt
    cursor = storage._cursor(storage_mod._IDX_ENTRIES_TABLE)
    esc_kb = storage_mod._escape_kb(kb)
    cursor.set_key(db, coll, name, esc_kb)
    rc = cursor.search_near()
    if rc == wt.WT_NOTFOUND or (rc < 0 and cursor.next() != 0):
        return []
    out: list[dict[str, Any]] = []
    batch: list[int] = []
    seen: set[int] = set()
    exhausted = False
    while len(out) < limit and not exhausted:
        while len(batch) < 16:
            key = cursor.get_key()
            if (key[0], key[1], key[2]) != (db, coll, name):
                exhausted = True
                break
            row_esc, row_id = storage_mod._unpack_entry(bytes(key[3]))
            if not row_esc.startswith(esc_kb):
                exhausted = True
                break
            if row_id is not None and row_id not in seen:
                seen.add(row_id)
                batch.append(row_id)
            if cursor.next() != 0:
                exhausted = True
                break
        if batch:
            docs = storage._docs_by_recordids(db, coll, batch)
            out.extend(d for d in docs if matches(d, filter))
            batch = []
    return out


def _patch_ordered_find(storage_cls: Any) -> None:
    from secantus import storage as storage_mod
    from secantus.query import matches

    original = storage_cls.find_matching

    @functools.wraps(original)
    def find_matching(self: Any, db: str, coll: str, filter: dict[str, Any] | None = None,
                      **kw: Any):
        limit, sort = kw.get("limit", 0), kw.get("sort")
        simple = (filter and sort and 0 < limit <= 16 and not kw.get("skip")
                  and kw.get("hint") is None and kw.get("collation") is None
                  and kw.get("min_bound") is None and kw.get("max_bound") is None
                  and not coll.startswith("system."))
        if not simple:
            return original(self, db, coll, filter, **kw)
        self._refresh_read_snapshot()
        with self._lock:
            name = _sort_walk_index(self, db, coll, filter, sort)
            if name is None:
                return original(self, db, coll, filter, **kw)
            key_spec = dict(next(ks for n, ks, _s, _u in self._all_indexes(db, coll)
                                 if n == name))
            n_eq = sum(1 for f, v in filter.items()
                       if not f.startswith("$") and not isinstance(v, dict | list))
            eq_fields = list(key_spec)[:n_eq]
            parts = [storage_mod.encode_value_directed(filter[f], int(key_spec[f]))
                     for f in eq_fields]
            kb = storage_mod.COMPOUND_SEP.join(parts) + storage_mod.COMPOUND_SEP
            out = _first_matches_in_index_order(
                self, storage_mod, db, coll, name, kb, filter, limit,
                functools.partial(matches, vars=kw.get("let")))
        out = out[:limit]
        projection = kw.get("projection")
        if projection:
            out = storage_mod.apply_projection_batch(
                out, projection, filter,
                metas=self._projection_metas(db, coll, out, projection, filter, sort, None,
                                             None),
                has_sort=True)
        return out

    storage_cls.find_matching = find_matching


COMMIT_METHODS = ("fsync", "none")
_FSYNC_CONFIG = "transaction_sync=(enabled=true,method=fsync)"


def set_commit_method(method: str) -> bool:
    """Make sync-on-commit use WiredTiger's ``method`` (``fsync`` or ``none``).

    Returns whether the storage will open with it; a version outside
    :data:`FIXED_VERSIONS` keeps its own (fsync) behaviour.
    """
    if method not in COMMIT_METHODS:
        raise ValueError(f"commit sync method must be one of {COMMIT_METHODS}, not {method!r}")
    import secantus
    import wiredtiger

    if method == "fsync" or secantus.__version__ not in FIXED_VERSIONS:
        return method == "fsync"
    original = getattr(wiredtiger.wiredtiger_open, "__wrapped__", wiredtiger.wiredtiger_open)

    @functools.wraps(original)
    def wiredtiger_open(home: str, config: str) -> Any:
        return original(home, config.replace(
            _FSYNC_CONFIG, f"transaction_sync=(enabled=true,method={method})"))

    wiredtiger.wiredtiger_open = wiredtiger_open
    return True


# -- the index catalog cache -------------------------------------------------------------
#
# Vocabulary of the argument in the module docstring: a catalog *write* is any write
# through a cursor on ``_IDX_TABLE``; it *begins* just before the cursor call and *ends*
# once it is committed or rolled back (at once for an autocommit write, at the end of the
# enclosing ``_batch_transaction``, or when the user transaction's session is closed).

_CATALOG_MARK = "_matcouple_index_catalog_cache"
_CATALOG_ATTR = "_matcouple_index_catalog"
_CATALOG_INIT = threading.Lock()
# Values bson.decode returns that nobody can mutate in place; anything else is deep-copied.
_IMMUTABLE = (str, int, float, bool, type(None), bytes, datetime.datetime, uuid.UUID)


class _IndexCatalog:
    """Decoded index catalog rows per (db, coll) of one Storage, and what keeps them exact.

    ``gen`` is bumped (and every entry dropped) when a catalog write begins and again when
    it ends; ``inflight`` counts writes begun and not yet ended. An entry is only stored
    while ``inflight == 0`` and ``gen`` equals the generation recorded for the storing
    thread's snapshot (see :func:`_snapshot_gen`), and only served under the same test.
    """

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.gen = 0
        self.inflight = 0
        self.entries: dict[tuple[str, str], tuple[Any, ...]] = {}
        # id(handle) -> [handle, catalog writes made inside that user transaction]
        self.txn_writes: dict[int, list[Any]] = {}
        # Per thread: fresh = (WT session, gen recorded before its snapshot was taken),
        # depth = _batch_transaction nesting, pending = catalog writes awaiting the batch's
        # end, handles = user-transaction handles whose session is installed.
        self.local = threading.local()
        self.hits = 0  # statistics only (not updated atomically)
        self.misses = 0

    def begin_write(self) -> None:
        with self.mutex:
            self.gen += 1
            self.inflight += 1
            self.entries.clear()

    def end_writes(self, n: int) -> None:
        with self.mutex:
            self.gen += 1
            self.inflight -= n
            self.entries.clear()


def _catalog(storage: Any) -> _IndexCatalog:
    cache = storage.__dict__.get(_CATALOG_ATTR)
    if cache is None:
        with _CATALOG_INIT:
            cache = storage.__dict__.get(_CATALOG_ATTR)
            if cache is None:
                cache = _IndexCatalog()
                setattr(storage, _CATALOG_ATTR, cache)
    return cache


def catalog_cache_stats(storage: Any) -> dict[str, int]:
    """Generation, writes in flight, cached namespaces, hits and misses of ``storage``."""
    cache = _catalog(storage)
    return {"gen": cache.gen, "inflight": cache.inflight, "entries": len(cache.entries),
            "hits": cache.hits, "misses": cache.misses}


def _copy(value: Any) -> Any:
    if isinstance(value, _IMMUTABLE):
        return value
    if type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    if type(value) is list:
        return [_copy(v) for v in value]
    return copy.deepcopy(value)


def _flat(d: dict[str, Any]) -> bool:
    """True when ``dict(d)`` is a full copy (no mutable values inside)."""
    return all(isinstance(v, _IMMUTABLE) for v in d.values())


def _after_catalog_write(storage: Any, cache: _IndexCatalog) -> None:
    """End the write now if it has committed, or arrange for it to end when it does."""
    local = cache.local
    handles = getattr(local, "handles", None)
    handle = handles[-1] if handles else getattr(storage._tls, "user_txn", None)
    if handle is not None:
        with cache.mutex:
            cache.txn_writes.setdefault(id(handle), [handle, 0])[1] += 1
    elif getattr(local, "depth", 0):
        local.pending = getattr(local, "pending", 0) + 1
    else:
        cache.end_writes(1)  # autocommit: the cursor call has committed (or failed)


class _CatalogCursor:
    """A cursor on the index catalog table whose writes invalidate the cache."""

    __slots__ = ("_cursor", "_storage")

    def __init__(self, cursor: Any, storage: Any) -> None:
        self._cursor = cursor
        self._storage = storage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def _write(self, op: Any, *args: Any) -> Any:
        cache = _catalog(self._storage)
        cache.begin_write()
        try:
            return op(*args)
        finally:
            _after_catalog_write(self._storage, cache)

    def insert(self) -> Any:
        return self._write(self._cursor.insert)

    def update(self) -> Any:
        return self._write(self._cursor.update)

    def remove(self) -> Any:
        return self._write(self._cursor.remove)

    def reserve(self) -> Any:
        return self._write(self._cursor.reserve)

    def modify(self, mods: Any) -> Any:
        return self._write(self._cursor.modify, mods)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._write(self._cursor.__setitem__, key, value)

    def __delitem__(self, key: Any) -> None:
        self._write(self._cursor.__delitem__, key)

    def __getitem__(self, key: Any) -> Any:
        return self._cursor[key]

    def __iter__(self) -> Any:
        return iter(self._cursor)


def _snapshot_gen(storage: Any, cache: _IndexCatalog) -> int | None:
    """The generation recorded before this thread's WT snapshot was taken, if usable.

    None inside a user transaction (its snapshot is pinned and sees its own writes), while
    a user transaction's session is installed, and when the session is not the one the
    record was made for.
    """
    tls = storage._tls
    if getattr(tls, "user_txn", None) is not None:
        return None
    local = cache.local
    if getattr(local, "handles", None):
        return None
    fresh = getattr(local, "fresh", None)
    if fresh is None or fresh[0] is not getattr(tls, "session", None):
        return None
    return fresh[1]


def _patch_index_catalog_cache(storage_cls: Any) -> None:
    from secantus import storage as storage_mod

    if getattr(storage_cls._iter_indexes, _CATALOG_MARK, False):
        return
    idx_table = storage_mod._IDX_TABLE
    original_iter = storage_cls._iter_indexes
    original_cursor = storage_cls._cursor
    original_refresh = storage_cls._refresh_read_snapshot
    original_batch = storage_cls._batch_transaction
    original_install = storage_cls._install_txn_session
    original_close = storage_cls._close_user_txn_session

    @functools.wraps(original_cursor)
    def _cursor(self: Any, table: str, *, overwrite: bool = True) -> Any:
        c = original_cursor(self, table, overwrite=overwrite)
        return _CatalogCursor(c, self) if table == idx_table else c

    @functools.wraps(original_refresh)
    def _refresh_read_snapshot(self: Any) -> None:
        tls = self._tls
        local = _catalog(self).local
        session = getattr(tls, "session", None)
        if (session is None or getattr(tls, "user_txn", None) is not None
                or getattr(local, "depth", 0) or getattr(local, "handles", None)):
            return original_refresh(self)
        # The original's own step, minus its silence: record the generation only once
        # WiredTiger has really released the old snapshot.
        gen = _catalog(self).gen
        try:
            session.reset_snapshot()
        except Exception:
            return None
        local.fresh = (session, gen)
        return None

    @contextlib.contextmanager
    def _batch_transaction(self: Any, *, sync: bool = False) -> Any:
        if getattr(self._tls, "user_txn", None) is not None:
            with original_batch(self, sync=sync) as session:
                yield session
            return
        cache = _catalog(self)
        local = cache.local
        depth = getattr(local, "depth", 0)
        gen = cache.gen
        local.depth = depth + 1
        try:
            with original_batch(self, sync=sync) as session:
                if depth == 0:
                    # begin_transaction has taken the snapshot, after ``gen`` was read.
                    local.fresh = (session, gen)
                yield session
        finally:
            local.depth = depth
            if depth == 0:
                pending = getattr(local, "pending", 0)
                local.pending = 0
                if pending:
                    cache.end_writes(pending)  # committed or rolled back by now

    @contextlib.contextmanager
    def _install_txn_session(self: Any, handle: Any) -> Any:
        local = _catalog(self).local
        handles = getattr(local, "handles", None)
        if handles is None:
            handles = local.handles = []
        handles.append(handle)
        try:
            with original_install(self, handle) as value:
                yield value
        finally:
            handles.pop()

    @functools.wraps(original_close)
    def _close_user_txn_session(self: Any, handle: Any) -> Any:
        try:
            return original_close(self, handle)
        finally:
            cache = _catalog(self)
            with cache.mutex:
                record = cache.txn_writes.pop(id(handle), None)
            if record is not None:
                cache.end_writes(record[1])

    def _cached(self: Any, cache: _IndexCatalog, db: str, coll: str) -> Any:
        gen = _snapshot_gen(self, cache)
        if gen is None or gen != cache.gen:
            return None
        rows = cache.entries.get((db, coll))
        if rows is None:
            return None
        if getattr(cache.local, "depth", 0):
            return rows  # in a _batch_transaction: snapshot taken at its begin
        # Outside a transaction a positioned cursor pins the session's snapshot: leave one
        # positioned, as the original walk does, then check nothing changed since the
        # record (so the pinned snapshot holds exactly these rows).
        if original_cursor(self, idx_table).next() != 0 or cache.gen != gen:
            return None
        return rows

    @functools.wraps(original_iter)
    def _iter_indexes(self: Any, db: str, coll: str) -> Any:
        cache = _catalog(self)
        rows = _cached(self, cache, db, coll)
        if rows is not None:
            cache.hits += 1
            for name, key_spec, opts, key_flat, opts_flat in rows:
                yield (name, dict(key_spec) if key_flat else _copy(key_spec),
                       dict(opts) if opts_flat else _copy(opts))
            return
        cache.misses += 1
        gen = _snapshot_gen(self, cache)
        decoded = list(original_iter(self, db, coll))
        if gen is not None:
            frozen = tuple((name, _copy(key_spec), _copy(opts), _flat(key_spec), _flat(opts))
                           for name, key_spec, opts in decoded)
            with cache.mutex:
                if cache.gen == gen and cache.inflight == 0:
                    cache.entries[(db, coll)] = frozen
        yield from decoded

    setattr(_iter_indexes, _CATALOG_MARK, True)
    storage_cls._cursor = _cursor
    storage_cls._refresh_read_snapshot = _refresh_read_snapshot
    storage_cls._batch_transaction = _batch_transaction
    storage_cls._install_txn_session = _install_txn_session
    storage_cls._close_user_txn_session = _close_user_txn_session
    storage_cls._iter_indexes = _iter_indexes
