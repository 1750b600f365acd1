"""Seventh SecantusDB 0.7.0b3 fix (applied by :func:`matcouple.store.secantus_compat.apply`).

0.7.0b3 re-derives, on every command, the same facts from a collection's index catalog and
collections-table row: the index list (``_all_indexes``), partial filters, the options map,
the multikey set and one index's multikey flag, which index serves an equality filter
(``_pick_compound_eq_index``) or a leading field (``_find_leading_field_index``), and the
decoded collection options (``_coll_options`` and ``get_collection_options``, read several
times per ``find``/``update``). Under ``rlaunch rapidfire`` that was ~15% of the server's
samples, although none of it changes between two index or collection DDL commands.

The values are memoised on the catalog rows that
:mod:`matcouple.store.secantus_catalog_cache` caches per (db, coll), and served only while
:func:`~matcouple.store.secantus_catalog_cache.cached_rows` hands back that very tuple.
That tuple is served only when the calling thread's snapshot sees exactly the committed
catalog and collections table of the current generation (the argument of that module; its
cursor wrapper now also watches the collections table), and every write to either table
drops it, and with it every value memoised on it. A value is stored only if, after it was
computed, the same tuple is still cached (no catalog write began meanwhile), so it is what
the original code returns on any snapshot that may use the tuple. Index pickers are
memoised only for queries without a collation on collections without sparse or partial
indexes: only then does their answer depend on nothing but the catalog and the filter's
field names (a sparse index's usability and a partial filter's implication depend on the
filter's values). Callers get their own copies, as from the original (the write paths grow
the multikey set).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from matcouple.store.secantus_catalog_cache import _catalog, _copy, cached_rows

_MARK = "_matcouple_plan_cache"
_MEMO_ATTR = "_matcouple_catalog_memo"


def _memo_slots(storage: Any) -> dict[tuple[str, str], tuple[Any, dict[Any, Any]]]:
    """(db, coll) -> (the catalog rows tuple the values belong to, key -> value)."""
    slots = storage.__dict__.get(_MEMO_ATTR)
    if slots is None:
        slots = storage.__dict__.setdefault(_MEMO_ATTR, {})
    return slots


def memo_stats(storage: Any) -> dict[str, int]:
    """Namespaces and values memoised on ``storage`` (for tests and benchmarks)."""
    slots = _memo_slots(storage)
    return {"namespaces": len(slots), "values": sum(len(v) for _r, v in slots.values())}


def _memoised(storage: Any, db: str, coll: str, key: Any, compute: Callable[[], Any],
              copy: Callable[[Any], Any], rows: tuple[Any, ...] | None = None) -> Any:
    """``compute()``, or a copy of the value memoised for ``key`` on the current catalog.

    ``rows``: what :func:`cached_rows` has just answered for this call, if the caller
    asked it already.
    """
    if rows is None:
        rows = cached_rows(storage, db, coll)
        if rows is None:
            return compute()
    slots = _memo_slots(storage)
    slot = slots.get((db, coll))
    if slot is not None and slot[0] is rows:
        values = slot[1]
        if key in values:
            return copy(values[key])
    value = compute()
    cache = _catalog(storage)
    with cache.mutex:
        if cache.entries.get((db, coll)) is rows:  # no catalog write began since
            slot = slots.get((db, coll))
            if slot is None or slot[0] is not rows:
                slot = slots[(db, coll)] = (rows, {})
            slot[1][key] = copy(value)
    return value


def _plain_catalog(storage: Any, db: str, coll: str, rows: tuple[Any, ...]) -> bool:
    """No sparse and no partial index: pickers depend on field names only."""
    return _memoised(storage, db, coll, "plain", lambda: not any(
        opts.get("sparse") or opts.get("partialFilterExpression")
        for _name, _key, opts, _kf, _of in rows), _same, rows)


def _copy_all_indexes(value: list[tuple[str, dict[str, Any], bool, bool]]) -> list:
    return [(name, _copy(key_spec), sparse, unique) for name, key_spec, sparse, unique in value]


def _copy_map(value: dict[str, Any]) -> dict[str, Any]:
    return {name: _copy(v) for name, v in value.items()}


def _copy_pick(value: tuple[str, dict[str, Any]] | None) -> tuple[str, dict[str, Any]] | None:
    return None if value is None else (value[0], dict(value[1]))


def _same(value: Any) -> Any:
    return value  # tuples of str/int/bool: nothing to copy


def patch_plan_cache(storage_cls: Any) -> None:
    """Memoise the catalog-derived answers of ``storage_cls`` (idempotent)."""
    if getattr(storage_cls._coll_options, _MARK, False):
        return

    def per_collection(name: str, copy: Callable[[Any], Any]) -> None:
        original = getattr(storage_cls, name)

        @functools.wraps(original)
        def wrapper(self: Any, db: str, coll: str) -> Any:
            return _memoised(self, db, coll, name, lambda: original(self, db, coll), copy)

        setattr(wrapper, _MARK, True)
        setattr(storage_cls, name, wrapper)

    per_collection("_all_indexes", _copy_all_indexes)
    per_collection("_partial_filters", _copy_map)
    per_collection("_index_options_map", _copy_map)
    per_collection("_multikey_index_names", set)

    original_eq = storage_cls._pick_compound_eq_index
    original_lead = storage_cls._find_leading_field_index

    @functools.wraps(original_eq)
    def _pick_compound_eq_index(self: Any, db: str, coll: str, filter: dict[str, Any], *,
                                collation: Any = None) -> Any:
        rows = cached_rows(self, db, coll) if collation is None else None
        if rows is None or not _plain_catalog(self, db, coll, rows):
            return original_eq(self, db, coll, filter, collation=collation)
        return _memoised(self, db, coll, ("eq", frozenset(filter)),
                         lambda: original_eq(self, db, coll, filter), _copy_pick, rows)

    @functools.wraps(original_lead)
    def _find_leading_field_index(self: Any, db: str, coll: str, field: str,
                                  query: Any = None, *, collation: Any = None) -> Any:
        rows = cached_rows(self, db, coll) if collation is None else None
        if rows is None or not _plain_catalog(self, db, coll, rows):
            return original_lead(self, db, coll, field, query, collation=collation)
        return _memoised(self, db, coll, ("lead", field),
                         lambda: original_lead(self, db, coll, field, query), _same, rows)

    original_multikey = storage_cls.index_is_multikey
    original_options = storage_cls.get_collection_options

    @functools.wraps(original_multikey)
    def index_is_multikey(self: Any, db: str, coll: str, name: str) -> bool:
        return _memoised(self, db, coll, ("multikey", name),
                         lambda: original_multikey(self, db, coll, name), _same)

    @functools.wraps(original_options)
    def get_collection_options(self: Any, db: str, coll: str) -> dict[str, Any]:
        if self.enable_oplog and db == "local":
            return original_options(self, db, coll)  # synthetic oplog.rs options
        self._refresh_read_snapshot()  # as the original does first
        return _memoised(self, db, coll, "get_collection_options",
                         lambda: original_options(self, db, coll), _copy)

    storage_cls._pick_compound_eq_index = _pick_compound_eq_index
    storage_cls._find_leading_field_index = _find_leading_field_index
    storage_cls.index_is_multikey = index_is_multikey
    storage_cls.get_collection_options = get_collection_options
    # Last, so the mark says every wrapper above is installed.
    per_collection("_coll_options", _copy)
