"""One DFT calculation end to end: relax + static, formation energy, stored document.

Plain functions, no FireWorks: the FireTasks, the CLI and the benchmark call these.
A result is its own ``materials`` document (source ``<engine>-<preset>``, fidelity
``<engine>/PBE/<preset>``), so it never overwrites a label of another level of theory.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pymatgen.core import Structure
from pymongo.database import Database

from matcouple.dft.engine import DFTEngine, DFTResult, formation_energy_per_atom
from matcouple.dft.errors import DFTCalculationError
from matcouple.dft.references import ReferenceEnergies
from matcouple.store.materials import Label, MaterialsStore, material_document


def run_dft(structure: Structure, engine: DFTEngine, preset: str, *, workdir: Path,
            references: ReferenceEnergies | None = None,
            retry: Mapping[str, Any] | None = None,
            walltime_s: float | None = None) -> DFTResult:
    """Relax and compute ``structure``; formation energy when references are given."""
    elements = sorted(el.symbol for el in structure.composition.elements)
    engine.check_elements(elements)
    result = engine.relax_static(structure, preset, workdir=Path(workdir), retry=retry,
                                 walltime_s=walltime_s)
    if references is not None:
        start = time.monotonic()
        mu = references.energies(elements)
        result.timings["references_s"] = time.monotonic() - start
        result.formation_energy_per_atom = formation_energy_per_atom(
            result.structure.composition, result.energy, mu)
        result.details["reference_energies_per_atom"] = mu
        result.details["references_computed_here"] = list(references.computed)
    return result


def run_dft_with_retries(structure: Structure, engine: DFTEngine, preset: str, *,
                         workdir: Path, references: ReferenceEnergies | None = None,
                         retry: Mapping[str, Any] | None = None,
                         max_attempts: int | None = None,
                         ) -> tuple[DFTResult, list[dict[str, Any]]]:
    """:func:`run_dft` with the retries a DFT Firework gets from its detours, in one call.

    A named failure (SCF or relaxation not converged, walltime) continues from the last
    geometry with :func:`matcouple.dft.retries.escalate`'s settings, up to
    ``Settings.dft_max_attempts`` attempts (GPAW; other engines have custodian and fail
    at once), so a plain caller (the design benchmark's checks) gets the value a design
    workflow would file. Returns the result and the failures on the way; after the last
    attempt raises :class:`DFTCalculationError` with the whole history."""
    from matcouple.dft.presets import gpaw_preset
    from matcouple.dft.retries import escalate, failure_record, gave_up_message, may_retry

    failures: list[dict[str, Any]] = []
    attempt = 0
    while True:
        attempt += 1
        try:
            result = run_dft(structure, engine, preset, workdir=workdir,
                             references=references, retry=retry)
            return result, failures
        except DFTCalculationError as exc:
            failures.append(failure_record(exc, attempt, retry))
            if not may_retry(engine.name, attempt, max_attempts):
                raise DFTCalculationError(gave_up_message(failures), structure=exc.structure,
                                          steps_done=exc.steps_done) from exc
            if exc.structure:
                structure = Structure.from_dict(exc.structure)
            retry = escalate(exc.kind, gpaw_preset(preset), retry)


def dft_document(result: DFTResult, *, material_id: str, engine: DFTEngine,
                 input_structure: Structure, input_id: str | None = None) -> dict[str, Any]:
    """The ``materials`` document of a DFT result (relaxed structure, labels, provenance)."""
    source = engine.source(result.preset)
    labels = {}
    if result.formation_energy_per_atom is not None:
        labels["formation_energy_per_atom"] = Label(
            result.formation_energy_per_atom, "eV/atom", source, result.fidelity)
    if result.band_gap is not None:
        labels["band_gap"] = Label(result.band_gap, "eV", source, result.fidelity)
    dft = result.as_dict()
    dft.pop("structure")
    return material_document(
        result.structure, source=source, material_id=material_id, fidelity=result.fidelity,
        labels=labels,
        extra={"dft": dft, "input": {"id": input_id or material_id,
                                     "structure": input_structure.as_dict()}},
    )


def store_dft_result(db: Database, result: DFTResult, *, material_id: str,
                     engine: DFTEngine, input_structure: Structure,
                     input_id: str | None = None) -> str:
    """Upsert the result into ``materials``; returns the document id."""
    doc = dft_document(result, material_id=material_id, engine=engine,
                       input_structure=input_structure, input_id=input_id)
    store = MaterialsStore(db)
    store.ensure_indexes()
    store.upsert_many([doc])
    return doc["_id"]


def already_computed(store: MaterialsStore, engine: DFTEngine, preset: str, material_id: str,
                     structure: Structure) -> dict[str, Any] | None:
    """An existing result at this fidelity: same id, else the same crystal (StructureMatcher)."""
    doc = store.get(engine.source(preset), material_id)
    if doc is not None:
        return doc
    for match in store.find_matching(structure, fidelity=engine.fidelity(preset)):
        return match
    for match in _matching_inputs(store, engine, preset, structure):
        return match
    return None


def _matching_inputs(store: MaterialsStore, engine: DFTEngine, preset: str,
                     structure: Structure):
    """Results whose *input* was this crystal (a relaxation may move it past the matcher)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from matcouple.store.materials import MATCHER_TOLERANCES

    matcher = StructureMatcher(**MATCHER_TOLERANCES)
    query = {"source": engine.source(preset),
             "reduced_formula": structure.composition.reduced_formula}
    for doc in store.collection.find(query):
        given = doc.get("input", {}).get("structure")
        if given and matcher.fit(structure, Structure.from_dict(given)):
            yield doc
