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

A second fix makes index creation ignore the ``background`` option when comparing a
requested index with an existing one of the same name, as MongoDB has done since 4.2
(where the option is ignored). Without it, FireWorks' ``lpad reset`` (background indexes)
after ``lpad admin tuneup --full`` (foreground) fails with IndexKeySpecsConflict.

:func:`apply` patches only the versions listed in :data:`FIXED_VERSIONS`; for any other
version it does nothing, so an upgrade can never be silently altered by a stale patch.
"""

from __future__ import annotations

import functools
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
    return True
