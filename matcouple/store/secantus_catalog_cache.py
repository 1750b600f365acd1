"""Fifth SecantusDB 0.7.0b3 fix (applied by :func:`matcouple.store.secantus_compat.apply`).

0.7.0b3 answers every question about a
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
  while any write is between begin and end. Writes to the collections table (options per
  collection; all through ``Storage._cursor`` too) are treated the same way, so that
  :mod:`matcouple.store.secantus_plan_cache` can memoise collection options on the rows.
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
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import threading
import uuid
from typing import Any

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
# Storage class -> (its unwrapped ``_cursor``, the catalog table's name), set when patched.
_RAW_CATALOG_CURSOR: dict[type, tuple[Any, str]] = {}


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


class _Rows(tuple):
    """The cached rows of one (db, coll): a new object per store, even when empty (``()`` is
    a shared singleton), so that identity tells one stored catalog from another."""

    __slots__ = ()


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


def cached_rows(storage: Any, db: str, coll: str) -> tuple[Any, ...] | None:
    """The cached catalog rows of (db, coll) if this thread's snapshot may use them, else None.

    A non-None answer means: the snapshot this thread reads from saw exactly the committed
    catalog (and collections table) of the current generation, and outside a transaction a
    catalog cursor is left positioned to keep that snapshot. The same tuple object is
    served until the next catalog write, so values derived from it may be memoised on it.
    """
    cache = _catalog(storage)
    gen = _snapshot_gen(storage, cache)
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
    raw = _RAW_CATALOG_CURSOR.get(type(storage))
    if raw is None or raw[0](storage, raw[1]).next() != 0 or cache.gen != gen:
        return None
    return rows


def patch_index_catalog_cache(storage_cls: Any) -> None:
    from secantus import storage as storage_mod

    if getattr(storage_cls._iter_indexes, _CATALOG_MARK, False):
        return
    idx_table = storage_mod._IDX_TABLE
    # The collections table (options per collection) is watched too, so that the same
    # generation argument covers the collection options cached by secantus_plan_cache.
    watched = (idx_table, storage_mod._COLL_TABLE)
    original_iter = storage_cls._iter_indexes
    original_cursor = storage_cls._cursor
    original_refresh = storage_cls._refresh_read_snapshot
    original_batch = storage_cls._batch_transaction
    original_install = storage_cls._install_txn_session
    original_close = storage_cls._close_user_txn_session
    _RAW_CATALOG_CURSOR[storage_cls] = (original_cursor, idx_table)

    @functools.wraps(original_cursor)
    def _cursor(self: Any, table: str, *, overwrite: bool = True) -> Any:
        c = original_cursor(self, table, overwrite=overwrite)
        return _CatalogCursor(c, self) if table in watched else c

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

    @functools.wraps(original_iter)
    def _iter_indexes(self: Any, db: str, coll: str) -> Any:
        cache = _catalog(self)
        rows = cached_rows(self, db, coll)
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
            frozen = _Rows((name, _copy(key_spec), _copy(opts), _flat(key_spec), _flat(opts))
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
