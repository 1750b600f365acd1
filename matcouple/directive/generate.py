"""Generation runs: sample candidates in batches, filter them, store the survivors.

Each batch is sampled, passed through the validity filters, and its survivors are written
to the materials collection (source ``generated``, with provenance: model version, seed,
p(N) strategy, filters passed) and as CIFs before the next batch starts, so a failure
loses nothing already stored. The run document in ``generation_runs`` records the request,
every finished batch and the count each filter removed; running the same run name again
continues after its last finished batch.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pymongo.database import Database
from tqdm import tqdm

from matcouple.directive.sample import (
    Generator,
    SampledBatch,
    composition_numbers,
    load_generator,
    sample_crystals,
    size_sampler,
    to_structures,
)
from matcouple.errors import GenerationError
from matcouple.settings import get_settings
from matcouple.store.materials import MaterialsStore, material_document
from matcouple.structures.filters import (
    FILTER_NAMES,
    DuplicateFinder,
    FilterReport,
    apply_filters,
)

Sampler = Callable[..., SampledBatch]


@dataclass
class GenerationRequest:
    """What to generate; ``n`` counts candidates sampled (survivors are fewer)."""

    n: int
    composition: str | None = None
    formula_units: list[int] | None = None
    strategy: str = "hybrid"
    seed: int = 0
    batch_size: int | None = None
    steps: int | None = None
    run: str | None = None
    output_dir: str | None = None
    checkpoint: str | None = None
    device: str | None = None
    workers: int = 0

    def validate(self) -> None:
        if not isinstance(self.n, int) or self.n <= 0:
            raise GenerationError(f"--n must be a positive number of candidates, got {self.n}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise GenerationError(f"batch size must be positive, got {self.batch_size}")
        if self.steps is not None and self.steps <= 0:
            raise GenerationError(f"steps must be positive, got {self.steps}")
        if self.formula_units and any(z <= 0 for z in self.formula_units):
            raise GenerationError(f"formula units must be positive, got {self.formula_units}")


@dataclass
class GenerationResult:
    run: str
    report: FilterReport
    stored: list[str] = field(default_factory=list)
    cif_files: list[str] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    model_version: str = ""

    def summary(self) -> dict[str, Any]:
        hours = max(self.seconds, 1e-9) / 3600
        return {"run": self.run, "model_version": self.model_version, **self.report.as_dict(),
                "stored": len(self.stored), "seconds": round(self.seconds, 2),
                "generated_per_hour": round(self.report.candidates / hours),
                "valid_per_hour": round(self.report.survivors / hours)}


def csp_cells(gen: Generator, composition: str,
              formula_units: list[int] | None) -> list[list[int]]:
    """Atomic numbers of each cell to try: the given Z values, or every Z that fits."""
    if formula_units:
        return [composition_numbers(composition, gen, z) for z in formula_units]
    base = composition_numbers(composition, gen, 1)
    return [composition_numbers(composition, gen, z)
            for z in range(1, gen.max_atoms // len(base) + 1)]


@contextmanager
def filter_pool(workers: int) -> Iterator[Callable]:
    """``map`` over processes for the per-structure filters (spawned: safe with CUDA)."""
    if workers <= 1:
        yield map
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda fn, items: pool.map(fn, items, chunksize=16)


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def _run_document(runs, run: str, request: GenerationRequest, gen: Generator,
                  mode: str) -> dict[str, Any]:
    existing = runs.find_one({"_id": run})
    if existing is not None:
        if existing.get("request", {}).get("n") != request.n or \
                existing.get("model", {}).get("version") != gen.version:
            raise GenerationError(f"run {run!r} exists with another request or model; "
                                  "choose a new --run name")
        runs.update_one({"_id": run}, {"$set": {"status": "running", "error": None}})
        return existing
    doc = {"_id": run, "status": "running", "mode": mode,
           "request": {k: v for k, v in asdict(request).items() if k != "run"},
           "model": gen.provenance(), "batches": [], "error": None,
           "started_at": dt.datetime.now(dt.UTC)}
    runs.insert_one(doc)
    return doc


def generate(
    request: GenerationRequest,
    db: Database,
    *,
    generator: Generator | None = None,
    sampler: Sampler = sample_crystals,
    progress: bool = True,
) -> GenerationResult:
    """Sample ``request.n`` candidates, filter, store survivors; returns the run's report."""
    request.validate()
    settings = get_settings()
    gen = generator or load_generator(request.checkpoint, request.device)
    cells = csp_cells(gen, request.composition, request.formula_units) \
        if request.composition else None
    sizer = size_sampler(request.strategy, gen.size_histogram)
    mode = "csp" if cells else "ab_initio"
    run = request.run or dt.datetime.now().strftime("gen-%Y%m%d-%H%M%S")
    store = MaterialsStore(db)
    store.ensure_indexes()
    runs = db[settings.generation_collection]
    run_doc = _run_document(runs, run, request, gen, mode)
    done = {b["index"]: b for b in run_doc.get("batches", [])}
    out_dir = Path(request.output_dir) if request.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    batch_size = request.batch_size or settings.generation_batch_size
    sizes = _batch_sizes(request.n, batch_size)
    result = GenerationResult(run=run, report=FilterReport(), model_version=gen.version)
    duplicates = DuplicateFinder(store=store)
    workers = request.workers or min(16, max(1, (os.cpu_count() or 2) - 1))
    start = time.monotonic()
    bar = tqdm(total=request.n, unit="cand", disable=not progress, desc=f"generating {run}")
    with filter_pool(workers) as map_fn:
        for index, count in enumerate(sizes):
            if index in done:  # finished in an earlier attempt of this run
                previous = done[index]
                sizer.record(previous["survivors"] / max(1, previous["candidates"]))
                result.report.add(FilterReport(previous["candidates"], previous["removed"]))
                bar.update(count)
                continue
            strategy = getattr(sizer, "current", sizer.name)
            batch = _one_batch(index, count, request, gen, sampler, sizer, cells, duplicates,
                               map_fn, run, strategy, runs)
            docs, report, seconds = batch
            store.upsert_many(docs)
            result.stored.extend(d["_id"] for d in docs)
            if out_dir:
                result.cif_files.extend(_write_cifs(docs, out_dir))
            sizer.record(report.survivors / max(1, report.candidates))
            result.report.add(report)
            entry = {"index": index, "strategy": strategy, "seconds": round(seconds, 3),
                     "seed": _batch_seed(request.seed, index), **report.as_dict(),
                     "stored": [d["_id"] for d in docs]}
            result.batches.append(entry)
            runs.update_one({"_id": run}, {"$push": {"batches": entry}})
            bar.update(count)
            bar.set_postfix(valid=result.report.survivors)
    bar.close()
    result.seconds = time.monotonic() - start
    runs.update_one({"_id": run}, {"$set": {
        "status": "completed", "finished_at": dt.datetime.now(dt.UTC),
        "report": result.report.as_dict(), "seconds": result.seconds}})
    return result


def _batch_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def _one_batch(index, count, request, gen, sampler, sizer, cells, duplicates, map_fn, run,
               strategy, runs) -> tuple[list[dict[str, Any]], FilterReport, float]:
    """Sample, filter and build the documents of one batch; a sampler failure is recorded."""
    settings = get_settings()
    seed = _batch_seed(request.seed, index)
    t0 = time.monotonic()
    numbers = None
    if cells:
        chosen = [cells[(index * count + k) % len(cells)] for k in range(count)]
        num_atoms = torch.tensor([len(c) for c in chosen])
        numbers = torch.tensor([z for c in chosen for z in c])
    else:
        num_atoms = sizer.sample(count, torch.Generator().manual_seed(seed))
    try:
        sampled = sampler(gen, num_atoms, numbers, steps=request.steps, seed=seed)
    except Exception as exc:
        stored = sum(len(b.get("stored", [])) for b in
                     (runs.find_one({"_id": run}) or {}).get("batches", []))
        message = (f"sampler failed in batch {index} of run {run!r}: {type(exc).__name__}: "
                   f"{exc}. The {stored} survivors of earlier batches are stored; run the "
                   "same command with --run to continue.")
        runs.update_one({"_id": run}, {"$set": {"status": "failed", "error": message}})
        raise GenerationError(message) from exc
    structures = to_structures(sampled)
    usable = [i for i, s in enumerate(structures) if s is not None]
    kept, report = apply_filters([structures[i] for i in usable], duplicates, map_fn)
    # A degenerate lattice (non-finite, zero volume) has no sane volume per atom.
    report.candidates = len(structures)
    report.removed["sane_volume"] += len(structures) - len(usable)
    seconds = time.monotonic() - t0
    docs = []
    for rank, i in enumerate(kept):
        k = usable[i]
        provenance = {
            "run": run, "batch": index, "index": k, "seed": seed,
            "model_version": gen.version, "model": gen.provenance(),
            "mode": "csp" if cells else "ab_initio", "composition": request.composition,
            "p_n_strategy": request.strategy if cells is None else "composition",
            "p_n_used": strategy if cells is None else "composition",
            "steps": request.steps or settings.generation_steps, "step_lr": gen.step_lr,
            "filters_passed": list(FILTER_NAMES), "filter_symprec": settings.filter_symprec,
        }
        material_id = f"{run}-{index:05d}-{rank:05d}"
        docs.append(material_document(
            structures[k], source=settings.generated_source, material_id=material_id,
            fidelity="generated", extra={"generation": provenance, "dataset": "generated"},
            symprec=settings.filter_symprec))
    return docs, report, seconds


def _write_cifs(docs: list[dict[str, Any]], out_dir: Path) -> list[str]:
    from pymatgen.io.cif import CifWriter

    paths = []
    for doc in docs:
        path = out_dir / f"{doc['material_id']}.cif"
        CifWriter(MaterialsStore.structure_of(doc)).write_file(str(path))
        paths.append(str(path))
    return paths


def generation_report(db: Database, run: str) -> dict[str, Any]:
    """The stored run document: request, model, batches and per-filter counts."""
    doc = db[get_settings().generation_collection].find_one({"_id": run})
    if doc is None:
        raise GenerationError(f"no generation run named {run!r}")
    return doc
