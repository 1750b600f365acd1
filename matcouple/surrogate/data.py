"""Labelled crystal tables -> crystal graphs for Crysformer, built in parallel and cached.

Rows whose structure cannot be used or whose labels are missing are skipped with their id
and reason (never a silent NaN in the loss).
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch_geometric.data import Data
from tqdm import tqdm

from matcouple.datasets import read_table
from matcouple.errors import DatasetError, MatcoupleError
from matcouple.structures.io import structure_from_text
from matcouple.surrogate.graph import GraphSpec, structure_to_graph

ID_COLUMNS = ("material_id", "id")


@dataclass
class GraphSet:
    """Graphs of one split plus the ids of the rows that were skipped and why."""

    graphs: list[Data]
    skipped: list[tuple[str, str]]


def _row_graph(args: tuple) -> dict | tuple[str, str]:
    """Worker: one row -> numpy arrays (torch tensors would travel as file descriptors)."""
    material_id, text, fmt, labels, spec = args
    try:
        if any(v is None or not math.isfinite(v) for v in labels):
            raise MatcoupleError("missing or NaN label")
        g = structure_to_graph(structure_from_text(text, fmt), spec)
    except MatcoupleError as exc:
        return (material_id, str(exc))
    except Exception as exc:  # a pathological row must not sink the whole table
        return (material_id, f"{type(exc).__name__}: {exc}")
    return {"id": material_id, "labels": labels, **{k: v.numpy() for k, v in g.items()}}


def _to_data(row: dict) -> Data:
    return Data(z=torch.from_numpy(row["z"]), edge_index=torch.from_numpy(row["edge_index"]),
                edge_vec=torch.from_numpy(row["edge_vec"]),
                y=torch.tensor([row["labels"]], dtype=torch.float32),
                num_nodes=len(row["z"]), material_id=row["id"])


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def table_hash(path: Path) -> str:
    """sha256 of the table file: stored in checkpoints to tie a model to its data."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_graphs(
    path: Path,
    targets: tuple[str, ...],
    *,
    split_column: str | None = None,
    split: str | None = None,
    spec: GraphSpec | None = None,
    limit: int | None = None,
    workers: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    sample: int | None = None,
    seed: int = 0,
    max_atoms: int | None = None,
) -> GraphSet:
    """Graphs of the rows of ``path`` (optionally one split), with labels ``targets``;
    ``max_atoms`` drops rows whose ``natoms`` column is larger, then ``limit`` keeps the
    first rows and ``sample`` a random draw of that many (``seed``)."""
    spec = spec or GraphSpec()
    cache = None
    if cache_dir is not None:
        extra = ((sample, seed) if sample else ()) + ((max_atoms,) if max_atoms else ())
        key = hashlib.sha256(repr((table_hash(path), targets, split_column, split,
                                   asdict(spec), limit, *extra)).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"graphs-{key}.pt"
        if cache.exists():
            blob = torch.load(cache, weights_only=False)
            return GraphSet(blob["graphs"], blob["skipped"])
    frame = read_table(path)
    missing = [t for t in targets if t not in frame.columns]
    if missing:
        raise DatasetError(f"{path} has no label column(s) {missing}")
    if split_column and split:
        if split_column not in frame.columns:
            raise DatasetError(f"{path} has no split column {split_column!r}")
        frame = frame[frame[split_column] == split]
    if max_atoms and "natoms" in frame.columns:
        frame = frame[frame["natoms"] <= max_atoms]
    if limit:
        frame = frame.iloc[:limit]
    if sample and sample < len(frame):
        frame = frame.sample(n=sample, random_state=seed)
    id_col = next((c for c in ID_COLUMNS if c in frame.columns), None)
    text_col = "cif" if "cif" in frame.columns else "poscar"
    if text_col not in frame.columns:
        raise DatasetError(f"{path} has no 'cif' or 'poscar' column")
    jobs = []
    for i, rec in enumerate(frame.to_dict("records")):
        mid = str(rec[id_col]) if id_col else f"row{i}"
        text = rec.get(text_col)
        fmt = text_col
        if (not isinstance(text, str) or not text.strip()) and isinstance(rec.get("poscar"), str):
            text, fmt = rec["poscar"], "poscar"
        jobs.append((mid, text if isinstance(text, str) else "", fmt,
                     [_float(rec[t]) for t in targets], spec))
    workers = workers or min(8, os.cpu_count() or 1)
    results: list = []
    bar = tqdm(total=len(jobs), desc=f"graphs {Path(path).name}:{split or 'all'}",
               disable=not progress, unit="crystal")
    if workers > 1 and len(jobs) > 256:
        with ProcessPoolExecutor(workers) as pool:
            for r in pool.map(_row_graph, jobs, chunksize=64):
                results.append(r)
                bar.update()
    else:
        for job in jobs:
            results.append(_row_graph(job))
            bar.update()
    bar.close()
    graphs = [_to_data(r) for r in results if isinstance(r, dict)]
    skipped = [r for r in results if not isinstance(r, dict)]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"graphs": graphs, "skipped": skipped}, cache)
    return GraphSet(graphs, skipped)
