"""Sixth SecantusDB 0.7.0b3 fix (applied by :func:`matcouple.store.secantus_compat.apply`).

0.7.0b3 rewrites a document's entries in *every* index on each update: the single-statement
update path (``Storage._update_matching_single_txn``, which serves ``update_one`` and
``findAndModify``) calls ``_delete_index_entries(old)`` for all the collection's indexes,
writes the new row, then ``_write_index_entries(new)`` for all of them again, releasing and
re-claiming the keys of unique indexes on the way. A FireWorks update changes one to three
indexed fields (``state``, ``updated_on``, ``launches``...) out of the ten indexes of
``fireworks``, so most of that work removes an entry and puts the same one back: 31% of the
server's command time under ``rlaunch rapidfire`` was spent in those two methods.

The fix keeps the per-index work for the indexes whose entries change and skips the
others. For an index whose entries for the old and the new document are the same list of
keys, the original code removes each entry and inserts the identical one again in the same
WiredTiger transaction (a unique index's claim, owned by this row, is removed and inserted
again with the same row id), so skipping both leaves the tables exactly as they were.
How it finds the pair: while ``_update_matching_single_txn`` runs on a thread, the
``apply_update`` it calls records ``(old, new)``; when ``_delete_index_entries`` is then
called with that very ``old`` object, the fix compares, per index, the keys the original
code would delete and write (same partial-filter test, collation and
``_index_key_variants``), passes the changed indexes to the original method, and the next
``_write_index_entries`` call with that very ``new`` object and row id gets the same
reduced list. Only plain ascending/descending indexes are compared; geo, text, hashed and
wildcard indexes always take the original path, as does every other caller (inserts,
deletes, multi-document updates, upserts, capped-collection eviction). Anything that
raises while comparing sends that index through the original code.

Measured on the shared 2-core machine (1-minute load average 4-5 from other users), one
``rlaunch rapidfire`` worker, 300 ScriptTask Fireworks of 1,000: the server's CPU was
20.0, 18.3 and 18.8 s before, 17.7, 17.7 and 15.5 s after. ``benchmarks/catalog_cache.py``
(alternating ``find_one_and_update``/``update_one`` on ``fw_id``): 3.38 / 3.14 to 2.13 /
2.18 ms per call. ``benchmarks/launchpad.py --dataset none
--sizes 1000 --workers 1 2``: one worker 8.2-8.5 -> 8.1-9.6 FW/s (matcouple) and 9.1-9.7
-> 8.6-11.3 (ScriptTask), two workers together 9.3-9.6 -> 10.0-11.0 and 10.1-10.9 ->
9.6-12.5, two runs each: within the machine's run-to-run spread.
"""

from __future__ import annotations

import datetime
import functools
import math
import threading
import uuid
from typing import Any

_MARK = "_matcouple_update_entries"
_state = threading.local()


def _plain_key_spec(key_spec: dict[str, Any]) -> bool:
    for field, direction in key_spec.items():
        if "$" in str(field) or isinstance(direction, bool):
            return False
        if not isinstance(direction, int | float) or direction not in (1, -1):
            return False
    return True


_MISSING = object()
# Types whose ``==`` between two values of the same type implies the same BSON value (and
# so the same index key); anything else counts as changed.
_SCALARS = (str, int, bytes, bool, type(None), datetime.datetime, uuid.UUID)


def _same_value(a: Any, b: Any) -> bool:
    """Type-strict deep equality: True only if ``a`` and ``b`` are the same BSON value."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(_same_value, a, b))
    if isinstance(a, float):  # 0.0 == -0.0 but they are different values; nan != nan
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, _SCALARS) or type(a).__module__.startswith("bson"):
        return bool(a == b)
    return False


def _walk(doc: Any, parts: list[str]) -> tuple[int, Any]:
    """Follow a dotted path through sub-documents; stop at the first non-document.

    Returns how deep it got and what it found there (``_MISSING`` for an absent field).
    Everything an index derives from the path is a function of that pair."""
    cur = doc
    for depth, part in enumerate(parts):
        if not isinstance(cur, dict):
            return depth, cur
        cur = cur.get(part, _MISSING)
        if cur is _MISSING:
            return depth, _MISSING
    return len(parts), cur


def _same_paths(old: Any, new: Any, key_spec: dict[str, Any]) -> bool:
    for field in key_spec:
        parts = str(field).split(".")
        d_old, v_old = _walk(old, parts)
        d_new, v_new = _walk(new, parts)
        if d_old != d_new or (v_old is _MISSING) != (v_new is _MISSING):
            return False
        if v_old is not _MISSING and not _same_value(v_old, v_new):
            return False
    return True


def _entry_keys(storage_mod: Any, matches: Any, doc: Any, name: str, key_spec: dict[str, Any],
                sparse: bool, partials: dict[str, Any], options: dict[str, Any]) -> list[bytes]:
    """The index keys the original delete/write code handles for ``doc`` in one index."""
    partial = partials.get(name)
    if partial is not None and not matches(doc, partial):
        return []
    collation = storage_mod._parse_index_collation(options.get(name, {}).get("collation"))
    return storage_mod._index_key_variants(doc, key_spec, sparse=sparse, collation=collation)


def unchanged_indexes(storage: Any, db: str, coll: str, old: Any, new: Any,
                      indexes: list[tuple[str, dict[str, Any], bool, bool]],
                      partials: dict[str, Any] | None) -> set[str]:
    """Names of plain indexes in which ``old`` and ``new`` have exactly the same entries.

    Without a partial filter, an index whose fields hold the same values (type-strict) in
    both documents has the same keys, so no key is computed; with one, the keys (and the
    filter's verdict) are compared as the original code computes them."""
    from secantus import storage as storage_mod
    from secantus.query import matches

    if partials is None:
        partials = storage._partial_filters(db, coll)
    options: dict[str, Any] | None = None
    same: set[str] = set()
    for name, key_spec, sparse, _unique in indexes:
        if not _plain_key_spec(key_spec):
            continue
        try:
            if name not in partials:
                if _same_paths(old, new, key_spec):
                    same.add(name)
                continue
            if options is None:
                options = storage._index_options_map(db, coll)
            before = _entry_keys(storage_mod, matches, old, name, key_spec, sparse, partials,
                                 options)
            after = _entry_keys(storage_mod, matches, new, name, key_spec, sparse, partials,
                                options)
        except Exception:  # noqa: BLE001 - the original code raises it where it would
            continue
        if before == after:
            same.add(name)
    return same


def patch_update_index_entries(storage_cls: Any) -> None:
    """Install the fix on ``storage_cls`` (SecantusDB 0.7.0b3's ``Storage``)."""
    from secantus import storage as storage_mod

    if getattr(storage_cls._update_matching_single_txn, _MARK, False):
        return
    original_txn = storage_cls._update_matching_single_txn
    original_delete = storage_cls._delete_index_entries
    original_write = storage_cls._write_index_entries
    original_apply = storage_mod.apply_update

    @functools.wraps(original_apply)
    def apply_update(doc: Any, *args: Any, **kwargs: Any) -> Any:
        new = original_apply(doc, *args, **kwargs)
        if getattr(_state, "depth", 0):
            _state.pair = (doc, new)
        return new

    @functools.wraps(original_txn)
    def _update_matching_single_txn(self: Any, *args: Any, **kwargs: Any) -> Any:
        _state.depth = getattr(_state, "depth", 0) + 1
        _state.pair = _state.skip = None
        try:
            return original_txn(self, *args, **kwargs)
        finally:
            _state.depth -= 1
            _state.pair = _state.skip = None

    @functools.wraps(original_delete)
    def _delete_index_entries(self: Any, db: str, coll: str, doc: Any, indexes: Any,
                              partials: Any = None, *, recordid: int) -> Any:
        pair = getattr(_state, "pair", None)
        _state.pair = _state.skip = None
        if getattr(_state, "depth", 0) and pair is not None and pair[0] is doc and indexes:
            same = unchanged_indexes(self, db, coll, doc, pair[1], indexes, partials)
            if same:
                _state.skip = (pair[1], recordid, same)
                indexes = [ix for ix in indexes if ix[0] not in same]
        return original_delete(self, db, coll, doc, indexes, partials, recordid=recordid)

    @functools.wraps(original_write)
    def _write_index_entries(self: Any, db: str, coll: str, doc: Any, indexes: Any,
                             partials: Any = None, *, recordid: int) -> Any:
        skip = getattr(_state, "skip", None)
        _state.pair = _state.skip = None
        if skip is not None and skip[0] is doc and skip[1] == recordid:
            indexes = [ix for ix in indexes if ix[0] not in skip[2]]
        return original_write(self, db, coll, doc, indexes, partials, recordid=recordid)

    setattr(_update_matching_single_txn, _MARK, True)
    storage_mod.apply_update = apply_update
    storage_cls._update_matching_single_txn = _update_matching_single_txn
    storage_cls._delete_index_entries = _delete_index_entries
    storage_cls._write_index_entries = _write_index_entries
