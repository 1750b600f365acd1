"""The planner's tools as plain functions: database, generator, surrogate, DFT.

Each tool does one thing and returns plain data, so the deterministic planner, the design
FireTasks and an LLM planner all call the same code:

- :func:`query_database` finds known structures of the formula that meet the target;
- :func:`generate_structures` samples candidates of the composition and filters them;
- :func:`predict_properties` predicts the target property with a calibrated sigma;
- :func:`run_dft` adds DFT relaxation workflows for candidates to the LaunchPad.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pymatgen.core import Structure
from pymongo.database import Database

from matcouple.coordinate.request import DesignRequest
from matcouple.settings import get_settings
from matcouple.store.materials import MaterialsStore, normalise_formula
from matcouple.structures.filters import (
    DuplicateFinder,
    FilterReport,
    apply_filters,
    space_group_number,
)

# Sources that are predictions or proposals, not computed properties: never database hits.
NOT_COMPUTED_SOURCES = ("generated",)


# ---------------------------------------------------------------- query_database
def query_database(db: Database, request: DesignRequest) -> list[dict[str, Any]]:
    """Known structures of the formula whose stored label meets the target, best first.

    Every computed source counts (a loaded data set, our own DFT), space group 1 and
    duplicates of an earlier hit (StructureMatcher) are left out, as in the paper.
    """
    store = MaterialsStore(db)
    query = {"reduced_formula": normalise_formula(request.formula),
             "source": {"$nin": list(NOT_COMPUTED_SOURCES)},
             **request.target.mongo_filter()}
    docs = list(store.collection.find(query))
    docs.sort(key=lambda d: (d["labels"][request.target.label]["value"], d["_id"]),
              reverse=request.target.op in (">", ">="))
    finder = DuplicateFinder()
    hits = []
    for doc in docs:
        structure = Structure.from_dict(doc["structure"])
        if doc.get("symmetry", {}).get("number", space_group_number(structure)) == 1:
            continue
        if not finder.is_new(structure):
            continue
        label = doc["labels"][request.target.label]
        hits.append({"material_id": doc["_id"], "formula": doc["reduced_formula"],
                     "value": float(label["value"]), "fidelity": label.get("fidelity"),
                     "source": doc["source"], "spacegroup": doc["symmetry"]["symbol"],
                     "spacegroup_number": doc["symmetry"]["number"],
                     "structure": doc["structure"]})
    return hits


# ---------------------------------------------------------------- generate_structures
@dataclass
class GeneratedBatch:
    """Survivors of one sampled batch, the per-filter counts and where they came from."""

    structures: list[Structure]
    report: FilterReport
    model_version: str
    seed: int
    steps: int
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)
    prerelax: list[dict[str, Any]] = field(default_factory=list)  # one summary per structure


@functools.lru_cache(maxsize=2)
def _generator(checkpoint: str | None, device: str | None):
    from matcouple.directive.sample import load_generator

    return load_generator(checkpoint, device)


def generate_structures(db: Database | None, formula: str, n: int, *, seed: int = 0,
                        steps: int | None = None,
                        formula_units: Sequence[int] | None = None,
                        known: Iterable[Structure] = (), checkpoint: str | None = None,
                        device: str | None = None, prerelax: str = "none") -> GeneratedBatch:
    """Sample ``n`` crystals of ``formula`` (CSP) and keep those that pass every filter.

    Duplicates are removed against the materials collection (when ``db`` is given), the
    ``known`` structures (e.g. earlier candidates of the run) and each other. With
    ``prerelax`` (e.g. "chgnet") the survivors are pre-relaxed, space group kept
    (:mod:`matcouple.directive.prerelax`), and returned relaxed.
    """
    from matcouple.directive.generate import csp_cells
    from matcouple.directive.prerelax import prerelax_structures
    from matcouple.directive.sample import sample_crystals, to_structures

    settings = get_settings()
    gen = _generator(checkpoint, device)
    cells = csp_cells(gen, formula, list(formula_units) if formula_units else None)
    steps = steps or settings.design_steps or settings.generation_steps
    chosen = [cells[k % len(cells)] for k in range(n)]
    num_atoms = torch.tensor([len(c) for c in chosen])
    numbers = torch.tensor([z for c in chosen for z in c])
    start = time.monotonic()
    sampled = sample_crystals(gen, num_atoms, numbers, steps=steps, seed=seed)
    structures = to_structures(sampled)
    usable = [s for s in structures if s is not None]
    finder = DuplicateFinder(store=MaterialsStore(db) if db is not None else None)
    for structure in known:
        finder.seen[structure.composition.reduced_formula].append(structure)
    kept, report = apply_filters(usable, finder)
    report.candidates = len(structures)
    report.removed["sane_volume"] += len(structures) - len(usable)
    relaxed = prerelax_structures([usable[i] for i in kept], prerelax)
    return GeneratedBatch(structures=[r.structure for r in relaxed], report=report,
                          model_version=gen.version, seed=seed, steps=steps,
                          seconds=time.monotonic() - start,
                          provenance={**gen.provenance(), "steps": steps, "seed": seed,
                                      "cells": [len(c) for c in cells],
                                      "prerelax": prerelax},
                          prerelax=[r.summary() for r in relaxed] if prerelax != "none"
                          else [])


# ---------------------------------------------------------------- predict_properties
@functools.lru_cache(maxsize=2)
def _predictor(model_dir: str | None):
    from matcouple.surrogate.predict import SurrogatePredictor

    return SurrogatePredictor.default(model_dir=Path(model_dir) if model_dir else None)


def current_model_dir(db: Database) -> Path | None:
    """The registry's promoted surrogate (downloaded), or None for the shipped model."""
    from matcouple.store.registry import ModelRegistry

    return ModelRegistry(db).model_dir()


@dataclass(frozen=True)
class PropertyPrediction:
    """One structure's predicted value and calibrated sigma of one property."""

    id: str
    value: float | None
    sigma: float | None
    model_version: str
    error: str | None = None


def predict_properties(items: Sequence[tuple[str, Structure]], label: str, *,
                       model_dir: Path | None = None) -> list[PropertyPrediction]:
    """Crysformer's value and calibrated sigma of ``label`` for each ``(id, structure)``."""
    predictor = _predictor(str(model_dir) if model_dir else None)
    if label not in predictor.targets:
        from matcouple.errors import MatcoupleError

        raise MatcoupleError(f"the surrogate does not predict {label!r} "
                             f"(it predicts {', '.join(predictor.targets)})")
    rows = predictor.predict(list(items))
    return [PropertyPrediction(id=r.id, value=r.values.get(label), sigma=r.sigmas.get(label),
                               model_version=predictor.version, error=r.error)
            for r in rows]


# ---------------------------------------------------------------- run_dft
def run_dft(launchpad_file: str, candidates: Sequence[tuple[str, Structure]], *, run: str,
            engine: str | None = None, preset: str | None = None) -> dict[str, list[int]]:
    """Add one DFT relaxation workflow (and the filing step) per candidate; fw ids by id.

    The candidates must be documents of the design run (``design_candidates``), so that
    the filing Firework can record the result on them.
    """
    from matcouple.coordinate.workflow import dft_and_file_workflow
    from matcouple.store.connection import LaunchpadConfig, open_launchpad

    settings = get_settings()
    lp = open_launchpad(LaunchpadConfig.load(Path(launchpad_file)))
    out = {}
    for candidate_id, structure in candidates:
        wf = dft_and_file_workflow(candidate_id, structure, run=run,
                                   engine=engine or settings.dft_engine,
                                   preset=preset or settings.dft_preset,
                                   launchpad_file=launchpad_file)
        out[candidate_id] = sorted(lp.add_wf(wf).values())
    return out
