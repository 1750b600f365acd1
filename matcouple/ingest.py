"""Load a labelled crystal table into the materials collection.

Rows are parsed and checked in worker processes (CIF parsing and symmetry analysis are
the cost), written in ordered batches (one acknowledged bulk write each) and reported
row by row when they are refused. Loading again replaces documents by their id, so a
re-run after a crash completes the rest without duplicates.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from matcouple.datasets import DatasetSpec, RawRow, iter_rows
from matcouple.errors import MatcoupleError
from matcouple.store.materials import Label, MaterialsStore, material_document
from matcouple.structures.io import structure_from_text


@dataclass
class RowError:
    """A refused row: where it is, which material, why."""

    row: int
    material_id: str
    reason: str


@dataclass
class IngestReport:
    """Counts of one load, and every refused row with its reason."""

    dataset: str
    total: int = 0
    written: int = 0
    errors: list[RowError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.written > 0

    def summary(self) -> str:
        return (f"{self.dataset}: {self.written} of {self.total} rows stored, "
                f"{len(self.errors)} refused")


def _label_value(column: str, raw: Any) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError) as exc:
        raise MatcoupleError(f"label {column!r} is not a number: {raw!r}") from exc
    return value


def build_document(spec: DatasetSpec, raw: RawRow) -> dict[str, Any]:
    """Parse, check and describe one row; raises with the reason if it is unusable."""
    labels: dict[str, Label] = {}
    for column, unit in spec.labels.items():
        value = _label_value(column, raw.labels.get(column))
        if value is None or math.isnan(value):
            if spec.labels_required:
                raise MatcoupleError(f"label {column!r} is missing or NaN")
            continue
        if math.isinf(value):
            raise MatcoupleError(f"label {column!r} is infinite")
        labels[column] = Label(value=value, unit=unit, source=spec.source,
                               fidelity=spec.fidelity)
    structure = structure_from_text(raw.text, raw.fmt)
    return material_document(
        structure, source=spec.source, material_id=raw.material_id,
        fidelity=spec.fidelity, labels=labels, extra={"dataset": spec.name, **raw.extra},
    )


def _build_batch(spec: DatasetSpec, rows: list[RawRow]) -> list[dict[str, Any] | RowError]:
    out: list[dict[str, Any] | RowError] = []
    for raw in rows:
        try:
            out.append(build_document(spec, raw))
        except MatcoupleError as exc:
            out.append(RowError(raw.row, raw.material_id, str(exc)))
        except Exception as exc:  # one pathological row must not sink the batch
            out.append(RowError(raw.row, raw.material_id, f"{type(exc).__name__}: {exc}"))
    return out


def _chunks(rows: Iterable[RawRow], size: int) -> Iterator[list[RawRow]]:
    chunk: list[RawRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ingest(
    spec: DatasetSpec,
    store: MaterialsStore,
    *,
    batch_size: int = 256,
    workers: int | None = None,
    limit: int | None = None,
    skip_existing: bool = False,
    on_batch: Callable[[list[str]], None] | None = None,
    progress: bool = True,
) -> IngestReport:
    """Load ``spec`` into ``store``; ``on_batch`` sees the ids of each acknowledged batch."""
    rows = list(iter_rows(spec))
    if limit is not None:
        rows = rows[:limit]
    report = IngestReport(dataset=spec.name, total=len(rows))
    if skip_existing:
        have = store.existing_ids(f"{spec.source}:{r.material_id}" for r in rows)
        rows = [r for r in rows if f"{spec.source}:{r.material_id}" not in have]
        report.written += report.total - len(rows)
    store.ensure_indexes()
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    batches = list(_chunks(rows, batch_size))
    bar = tqdm(total=len(rows), desc=f"load {spec.name}", unit="row", disable=not progress)

    def consume(results: list[dict[str, Any] | RowError]) -> None:
        docs = [r for r in results if isinstance(r, dict)]
        report.errors.extend(r for r in results if isinstance(r, RowError))
        store.upsert_many(docs)
        report.written += len(docs)
        if on_batch is not None:
            on_batch([d["_id"] for d in docs])
        bar.update(len(results))

    try:
        if workers == 1 or len(batches) <= 1:
            for batch in batches:
                consume(_build_batch(spec, batch))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for results in pool.map(_build_batch, [spec] * len(batches), batches):
                    consume(results)
    finally:
        bar.close()
    return report
