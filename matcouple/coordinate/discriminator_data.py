"""Training data of the match discriminator: CSP samples labelled by RMSD to known crystals.

For compositions of a labelled set (MP 2018 or Perov-5, train/val splits only: the MEGNet
test split is held back), the shipped diffusion model draws K samples per composition with
the composition fixed (paper section 4, "Confidence Estimation for Structure Generation").
Each sample is compared with the known structures of its composition with pymatgen's
StructureMatcher (``get_rms_dist``: RMS displacement normalised by (V/N)^(1/3)); it is a
match when the smallest RMSD is below d (``Settings.discriminator_rmsd_threshold``). A
sample StructureMatcher cannot match, or that is not a valid crystal (atoms closer than
0.5 A, a flat cell), is not a match.

Records go to a gzip'd JSON-lines file batch by batch, so an interrupted run keeps what it
labelled; a summary JSON is written beside it at the end.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pymatgen.core import Composition, Structure
from tqdm import tqdm

from matcouple.datasets import known_dataset, read_table
from matcouple.errors import DatasetError, GenerationError
from matcouple.settings import get_settings

# name -> (data set, split column, structure column, default generator checkpoint)
SOURCES = {
    "mp2018": ("mp2018", "megnet_split", "cif", "models/generator/generator.pt"),
    "perov5": ("perov5", "split", "poscar", "models/generator/perov5.pt"),
}
ALLOWED_SPLITS = ("train", "val")
MIN_DISTANCE = 0.5  # A: closer atoms make a sample invalid (CDVAE/DiffCSP convention)


@dataclass
class SampleSetConfig:
    """What to sample: which compositions, how many samples each, with which sampler."""

    dataset: str = "mp2018"
    splits: tuple[str, ...] = ("train",)
    compositions: int = 200
    samples_per_composition: int | None = None
    steps: int = 100
    batch_size: int = 64
    checkpoint: str | None = None
    device: str | None = None
    seed: int = 0
    rmsd_threshold: float | None = None
    max_polymorphs: int = 8
    minutes: float | None = None
    workers: int = 1

    def resolved(self) -> SampleSetConfig:
        """Defaults filled in from settings; invalid requests get a clear error."""
        settings = get_settings()
        if self.dataset not in SOURCES:
            raise DatasetError(f"unknown data set {self.dataset!r} for discriminator data; "
                               f"use one of {', '.join(SOURCES)}")
        bad = [s for s in self.splits if s not in ALLOWED_SPLITS]
        if bad or not self.splits:
            raise DatasetError(f"splits {list(self.splits)} not allowed: use train and/or val "
                               "(the test split is held back to judge the models)")
        for name in ("compositions", "steps", "batch_size", "max_polymorphs"):
            if getattr(self, name) <= 0:
                raise DatasetError(f"{name} must be positive, got {getattr(self, name)}")
        k = self.samples_per_composition or settings.discriminator_samples_per_composition
        if k <= 0:
            raise DatasetError(f"samples per composition must be positive, got {k}")
        checkpoint = self.checkpoint or str(settings.root / SOURCES[self.dataset][3])
        d = settings.discriminator_rmsd_threshold if self.rmsd_threshold is None \
            else self.rmsd_threshold
        return SampleSetConfig(**{**asdict(self), "samples_per_composition": k,
                                  "checkpoint": checkpoint, "rmsd_threshold": float(d),
                                  "splits": tuple(self.splits)})


@dataclass
class Reference:
    """A known crystal of the labelled set."""

    material_id: str
    split: str
    structure: Structure


@dataclass
class CompositionRefs:
    """One reduced formula with its known polymorphs (smallest cells first)."""

    formula: str
    references: list[Reference] = field(default_factory=list)


# ---------------------------------------------------------------- reference crystals
def _poscar_formula(text: str) -> str:
    """Reduced formula from a VASP 5 POSCAR's species and counts lines (no full parse)."""
    lines = text.splitlines()
    species, counts = lines[5].split(), [int(c) for c in lines[6].split()]
    return Composition(dict(zip(species, counts, strict=True))).reduced_formula


def _parse(text: str, fmt: str) -> Structure | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            structure = Structure.from_str(text, fmt=fmt)
        except Exception:  # an unreadable row is skipped
            return None
    return structure if structure.is_ordered else None


def load_compositions(dataset: str, splits: tuple[str, ...], max_atoms: int,
                      max_polymorphs: int = 8) -> dict[str, list[dict[str, Any]]]:
    """Rows (id, split, natoms, text) of each reduced formula with <= ``max_atoms`` atoms.

    Polymorphs are drawn from train and val together, so a sample of a train composition
    is also compared with a val polymorph of the same formula; ``splits`` decide which
    compositions are sampled (see :func:`choose_compositions`).
    """
    name, split_column, text_column, _ = SOURCES[dataset]
    frame = read_table(known_dataset(name).path)
    frame = frame[frame[split_column].isin(ALLOWED_SPLITS)]
    if "reduced_formula" in frame.columns:
        formulas = frame["reduced_formula"].astype(str)
    else:
        formulas = frame[text_column].map(_poscar_formula)
    natoms = frame["natoms"] if "natoms" in frame.columns else \
        frame[text_column].map(lambda t: sum(int(c) for c in t.splitlines()[6].split()))
    frame = frame.assign(formula_key=formulas.values, natoms_key=natoms.values)
    frame = frame[frame["natoms_key"] <= max_atoms].sort_values(["natoms_key", "material_id"])
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in frame.itertuples(index=False):
        rows = groups.setdefault(row.formula_key, [])
        if len(rows) < max_polymorphs:
            rows.append({"material_id": str(row.material_id),
                         "split": getattr(row, split_column), "natoms": int(row.natoms_key),
                         "text": getattr(row, text_column), "fmt": text_column})
    wanted = set(splits)
    return {f: rows for f, rows in groups.items() if any(r["split"] in wanted for r in rows)}


def choose_compositions(groups: dict[str, list[dict[str, Any]]], splits: tuple[str, ...],
                        n: int, seed: int, usable: Callable[[str, int], bool]
                        ) -> list[CompositionRefs]:
    """``n`` formulas at random whose polymorph in ``splits`` the generator can place."""
    formulas = sorted(f for f, rows in groups.items()
                      if any(r["split"] in splits for r in rows))
    random.Random(seed).shuffle(formulas)
    chosen: list[CompositionRefs] = []
    for formula in formulas:
        if len(chosen) >= n:
            break
        refs = [Reference(r["material_id"], r["split"], s) for r in groups[formula]
                if (s := _parse(r["text"], r["fmt"])) is not None]
        refs = [r for r in refs if usable(formula, len(r.structure))]
        if refs:
            chosen.append(CompositionRefs(formula, refs))
    return chosen


# ---------------------------------------------------------------- RMSD labels
def valid_sample(structure: Structure | None) -> bool:
    """A crystal at all: finite, non-flat cell, no two atoms closer than 0.5 A."""
    from matcouple.structures.filters import min_distance

    return structure is not None and structure.volume > 0.1 and \
        min_distance(structure) >= MIN_DISTANCE


def rmsd_to_references(sample: Structure | None, references: list[Structure]
                       ) -> tuple[float | None, int | None]:
    """Smallest normalised RMS distance to any reference and its index; (None, None) if
    the sample is invalid or StructureMatcher matches none of them."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from matcouple.store.materials import MATCHER_TOLERANCES

    if not valid_sample(sample):
        return None, None
    matcher = StructureMatcher(**MATCHER_TOLERANCES)
    best: tuple[float | None, int | None] = (None, None)
    for k, reference in enumerate(references):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rms = matcher.get_rms_dist(sample, reference)
        except Exception:  # a cell StructureMatcher cannot reduce counts as no match
            rms = None
        if rms is not None and (best[0] is None or rms[0] < best[0]):
            best = (float(rms[0]), k)
    return best


def is_match(rmsd: float | None, threshold: float) -> bool:
    """The paper's label: RMSD < d; no RMSD (no match at all) is not a match."""
    return rmsd is not None and rmsd < threshold


def _label(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: RMSD and label of one sample (runs in a pool process)."""
    structure = Structure.from_dict(job["structure"]) if job["structure"] else None
    refs = [Structure.from_dict(r) for r in job.pop("references")]
    rmsd, index = rmsd_to_references(structure, refs)
    job["valid"] = valid_sample(structure)
    job["rmsd"] = rmsd
    job["matched_reference"] = job["reference_ids"][index] if index is not None else None
    job["match"] = is_match(rmsd, job["rmsd_threshold"])
    return job


# ---------------------------------------------------------------- sampling run
def _jobs(chosen: list[CompositionRefs], k: int, seed: int) -> list[dict[str, Any]]:
    """One job per sample; sample i of a formula takes the cell size of polymorph i % P."""
    jobs = []
    for comp in chosen:
        for i in range(k):
            ref = comp.references[i % len(comp.references)]
            jobs.append({"composition": comp.formula, "sample": i,
                         "cell_of": ref.material_id, "split": ref.split,
                         "natoms": len(ref.structure)})
    random.Random(seed + 1).shuffle(jobs)  # mixed cell sizes per batch
    return jobs


def _pool(workers: int) -> ProcessPoolExecutor | None:
    """Spawned processes for StructureMatcher (safe beside CUDA); None = in-process."""
    if workers <= 1:
        return None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _submit(pool: ProcessPoolExecutor | None, job: dict[str, Any]) -> Future:
    if pool is not None:
        return pool.submit(_label, job)
    done: Future = Future()
    done.set_result(_label(job))
    return done


def default_output(config: SampleSetConfig) -> Path:
    settings = get_settings()
    name = (f"{config.dataset}-{'+'.join(config.splits)}-c{config.compositions}"
            f"-k{config.samples_per_composition}-s{config.steps}-seed{config.seed}.jsonl.gz")
    return settings.root / settings.discriminator_data_dir / name


def generate_sample_set(config: SampleSetConfig, output: Path | None = None, *,
                        overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Sample, label and write ``config``'s sample set; returns the run summary."""
    from matcouple.directive.sample import (
        composition_numbers,
        load_generator,
        sample_crystals,
        to_structures,
    )

    config = config.resolved()
    output = Path(output) if output else default_output(config)
    if output.exists() and not overwrite:
        raise DatasetError(f"{output} exists; pass overwrite (--overwrite) or another path")
    output.parent.mkdir(parents=True, exist_ok=True)
    gen = load_generator(config.checkpoint, config.device)

    def usable(formula: str, natoms: int) -> bool:
        base = Composition(formula).num_atoms
        z = natoms / base
        if abs(z - round(z)) > 1e-6:
            return False
        try:
            composition_numbers(formula, gen, int(round(z)))
        except GenerationError:
            return False
        return True

    t0 = time.monotonic()
    groups = load_compositions(config.dataset, config.splits, gen.max_atoms,
                               config.max_polymorphs)
    chosen = choose_compositions(groups, config.splits, config.compositions, config.seed,
                                 usable)
    if not chosen:
        raise DatasetError(f"no composition of {config.dataset} {list(config.splits)} fits "
                           f"the generator {Path(config.checkpoint).name}")
    by_formula = {c.formula: c for c in chosen}
    jobs = _jobs(chosen, config.samples_per_composition, config.seed)
    sampler = {"checkpoint": Path(config.checkpoint).name, "model_version": gen.version,
               "steps": config.steps, "step_lr": gen.step_lr, "device": str(gen.device),
               "seed": config.seed}
    deadline = t0 + 60 * config.minutes if config.minutes else None
    counts = {"samples": 0, "valid": 0, "matched_any": 0, "match": 0}
    formulas: set[str] = set()
    sampled_batches = 0
    bar = tqdm(total=len(jobs), unit="sample", disable=not progress, desc="CSP samples")
    pool = _pool(config.workers)
    pending: list[Future] = []
    try:
        with gzip.open(output, "wt", encoding="utf-8") as fh:
            for index, start in enumerate(range(0, len(jobs), config.batch_size)):
                if deadline is not None and time.monotonic() > deadline:
                    break
                batch = jobs[start:start + config.batch_size]
                cells = [composition_numbers(j["composition"], gen, int(round(
                    j["natoms"] / Composition(j["composition"]).num_atoms))) for j in batch]
                num_atoms = torch.tensor([len(c) for c in cells])
                numbers = torch.tensor([z for c in cells for z in c])
                seed = config.seed * 1_000_003 + index
                structures = to_structures(sample_crystals(
                    gen, num_atoms, numbers, steps=config.steps, seed=seed))
                sampled_batches += 1
                for job, structure in zip(batch, structures, strict=True):
                    refs = by_formula[job["composition"]].references
                    pending.append(_submit(pool, {
                        **job, "dataset": config.dataset, "batch_seed": seed,
                        "structure": structure.as_dict() if structure is not None else None,
                        "reference_ids": [r.material_id for r in refs],
                        "references": [r.structure.as_dict() for r in refs],
                        "rmsd_threshold": config.rmsd_threshold, "sampler": sampler}))
                formulas.update(j["composition"] for j in batch)
                # back-pressure: labelling may not fall more than two batches behind, so
                # the time budget bounds the whole run, not just the sampling
                pending = _drain(pending, fh, counts, bar, wait=False,
                                 keep=2 * config.batch_size)
            _drain(pending, fh, counts, bar, wait=True)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    summary = {"output": str(output), "config": asdict(config), "sampler": sampler,
               "compositions": len(formulas), "compositions_chosen": len(chosen),
               "batches": sampled_batches, **counts,
               "match_rate": round(counts["match"] / max(1, counts["samples"]), 4),
               "seconds": round(time.monotonic() - t0, 1)}
    output.with_name(output.name.replace(".jsonl.gz", "") + ".summary.json").write_text(
        json.dumps(summary, indent=1))
    return summary


def _drain(pending: list[Future], fh, counts: dict[str, int], bar, *, wait: bool,
           keep: int | None = None) -> list[Future]:
    """Write finished labels in submission order; keep the rest pending (at most
    ``keep`` of them: waits for the oldest beyond that; ``wait``: none)."""
    while pending and (wait or pending[0].done() or
                       (keep is not None and len(pending) > keep)):
        record = pending.pop(0).result()
        fh.write(json.dumps(record) + "\n")
        counts["samples"] += 1
        counts["valid"] += int(record["valid"])
        counts["matched_any"] += int(record["rmsd"] is not None)
        counts["match"] += int(record["match"])
        bar.update(1)
    fh.flush()
    return pending


def read_sample_set(path: Path | str) -> list[dict[str, Any]]:
    """Every record of a sample set file (as written by :func:`generate_sample_set`)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such sample set; make one with "
                           "`matcouple discriminator data`")
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{number}: not a JSON record ({exc})") from exc
    return records


def iter_labelled(records: list[dict[str, Any]], threshold: float | None = None
                  ) -> Iterator[tuple[dict[str, Any], bool]]:
    """(record, label) of each record with a structure; ``threshold`` relabels by RMSD < d."""
    for record in records:
        if record.get("structure") is None:
            continue
        label = record["match"] if threshold is None else is_match(record["rmsd"], threshold)
        yield record, bool(label)


def cpu_count_for_labels() -> int:
    """RMSD worker processes: every core but one (the sampler keeps one busy)."""
    return max(1, (os.cpu_count() or 2) - 1)
