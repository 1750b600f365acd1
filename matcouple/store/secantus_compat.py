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

A fifth fix caches the decoded index catalog: see
:mod:`matcouple.store.secantus_catalog_cache`. A sixth skips rewriting the index entries
an update leaves unchanged: see :mod:`matcouple.store.secantus_update_entries`. A seventh
memoises what each command re-derives from that catalog (index choice, collection
options): see :mod:`matcouple.store.secantus_plan_cache`.

:func:`apply` patches only the versions listed in :data:`FIXED_VERSIONS`; for any other
version it does nothing, so an upgrade can never be silently altered by a stale patch.
"""

from __future__ import annotations

import functools
from typing import Any

from matcouple.store.secantus_catalog_cache import patch_index_catalog_cache
from matcouple.store.secantus_plan_cache import patch_plan_cache
from matcouple.store.secantus_update_entries import patch_update_index_entries

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
    patch_index_catalog_cache(Storage)
    patch_update_index_entries(Storage)
    patch_plan_cache(Storage)
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
