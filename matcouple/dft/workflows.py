"""Builders of DFT workflows, and throughput mode: N structures in, N workflows added.

Each structure gets its own workflow with one Firework (one unit of expensive work); VASP
structures get atomate2's double relax + static converted by jobflow. Fireworks carry
``_category`` (default ``dft``) and, when given, ``_queueadapter`` hints (walltime, cores)
that ``qlaunch`` applies per job. Structures already computed at the same fidelity are
skipped. Elemental references still missing from the cache can be computed first by a
reference workflow at higher priority, so that parallel structure Fireworks find them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fireworks import Firework, LaunchPad, Workflow
from pymatgen.core import Structure

from matcouple.dft.calculation import already_computed
from matcouple.dft.engine import DFTEngine, get_engine
from matcouple.dft.references import ReferenceEnergies
from matcouple.dft.tasks import DFTReferenceTask, DFTRelaxStaticTask
from matcouple.settings import get_settings
from matcouple.store.connection import LaunchpadConfig, open_launchpad
from matcouple.store.materials import MaterialsStore

REFERENCE_PRIORITY = 10


def _spec(run: str, category: str | None, queueadapter: Mapping[str, Any] | None,
          priority: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"matcouple_run": run,
                            "_category": category or get_settings().dft_category}
    if queueadapter:
        spec["_queueadapter"] = dict(queueadapter)
    if priority is not None:
        spec["_priority"] = priority
    return spec


def dft_workflow(material_id: str, structure: Structure, *, engine: str, preset: str,
                 run: str, category: str | None = None,
                 queueadapter: Mapping[str, Any] | None = None,
                 launchpad_file: str | None = None, input_id: str | None = None,
                 missing_references: Sequence[str] | None = None) -> Workflow:
    """The workflow that relaxes ``structure`` and stores its result.

    For VASP, ``missing_references`` (default: those not cached) are computed inside the
    workflow; pass ``[]`` when a references workflow of the same submission does it.
    """
    if engine == "vasp":
        from matcouple.dft.vasp import vasp_workflow

        return vasp_workflow(material_id, structure, preset=preset, run=run,
                             category=category, queueadapter=queueadapter,
                             launchpad_file=launchpad_file, input_id=input_id,
                             missing_references=missing_references)
    params: dict[str, Any] = {"structure": structure.as_dict(), "material_id": material_id,
                              "engine": engine, "preset": preset}
    if input_id:
        params["input_id"] = input_id
    if launchpad_file:
        params["launchpad_file"] = launchpad_file
    fw = Firework([DFTRelaxStaticTask(**params)], spec=_spec(run, category, queueadapter),
                  name=f"dft {engine}-{preset} {material_id}")
    return Workflow([fw], name=f"dft {engine}-{preset} {material_id} ({run})",
                    metadata={"matcouple": "dft", "run": run, "engine": engine,
                              "preset": preset, "material_id": material_id,
                              "formula": structure.composition.reduced_formula})


def reference_workflow(elements: Sequence[str], *, engine: str, preset: str, run: str,
                       category: str | None = None,
                       queueadapter: Mapping[str, Any] | None = None,
                       launchpad_file: str | None = None) -> Workflow:
    """One high-priority Firework per elemental reference to compute."""
    if engine == "vasp":
        from matcouple.dft.vasp import vasp_reference_workflow

        return vasp_reference_workflow(elements, preset=preset, run=run, category=category,
                                       queueadapter=queueadapter,
                                       launchpad_file=launchpad_file)
    fws = []
    for el in elements:
        params = {"element": el, "engine": engine, "preset": preset}
        if launchpad_file:
            params["launchpad_file"] = launchpad_file
        fws.append(Firework([DFTReferenceTask(**params)],
                            spec=_spec(run, category, queueadapter, REFERENCE_PRIORITY),
                            name=f"dft reference {engine}-{preset} {el}"))
    return Workflow(fws, name=f"dft references {engine}-{preset} ({run})",
                    metadata={"matcouple": "dft-references", "run": run,
                              "elements": list(elements)})


@dataclass
class Submission:
    """What a throughput submission added and what it skipped."""

    run: str
    engine: str
    preset: str
    fw_ids: dict[str, list[int]] = field(default_factory=dict)  # material id -> Fireworks
    skipped: dict[str, str] = field(default_factory=dict)  # material id -> existing doc id
    reference_fw_ids: list[int] = field(default_factory=list)
    references_to_compute: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"run {self.run}: {len(self.fw_ids)} DFT workflow(s) added, "
                f"{len(self.skipped)} skipped (already computed at {self.engine}/{self.preset})"
                + (f", references to compute: {', '.join(self.references_to_compute)}"
                   if self.references_to_compute else ""))


def default_run_name() -> str:
    return "dft-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")


def submit_dft(config: LaunchpadConfig, structures: Sequence[tuple[str, Structure]], *,
               engine: str | None = None, preset: str | None = None, run: str | None = None,
               skip_existing: bool = True, category: str | None = None,
               queueadapter: Mapping[str, Any] | None = None,
               references_first: bool = True, lp: LaunchPad | None = None) -> Submission:
    """Throughput mode: add one DFT workflow per structure not yet computed at this fidelity."""
    settings = get_settings()
    engine = engine or settings.dft_engine
    preset = preset or settings.dft_preset
    dft_engine: DFTEngine = get_engine(engine)
    if preset not in dft_engine.preset_names():
        from matcouple.dft.errors import UnknownPresetError

        raise UnknownPresetError(f"unknown preset {preset!r} for {engine}; choose one of "
                                 f"{', '.join(dft_engine.preset_names())}")
    elements = sorted({el.symbol for _, s in structures for el in s.composition.elements})
    dft_engine.check_elements(elements)
    lp = lp or open_launchpad(config)
    store = MaterialsStore(lp.db)
    sub = Submission(run=run or default_run_name(), engine=engine, preset=preset)
    todo = []
    for material_id, structure in structures:
        existing = (already_computed(store, dft_engine, preset, material_id, structure)
                    if skip_existing else None)
        if existing is not None:
            sub.skipped[material_id] = existing["_id"]
        else:
            todo.append((material_id, structure))
    lp_file = str(config.path)
    needed = sorted({el.symbol for _, s in todo for el in s.composition.elements})
    refs = ReferenceEnergies(lp.db, dft_engine, preset)
    sub.references_to_compute = refs.missing(needed)
    if references_first and sub.references_to_compute:
        wf = reference_workflow(sub.references_to_compute, engine=engine, preset=preset,
                                run=sub.run, category=category, queueadapter=queueadapter,
                                launchpad_file=lp_file)
        sub.reference_fw_ids = sorted(lp.add_wf(wf).values())
    for material_id, structure in todo:
        wf = dft_workflow(material_id, structure, engine=engine, preset=preset, run=sub.run,
                          category=category, queueadapter=queueadapter,
                          launchpad_file=lp_file, input_id=material_id,
                          missing_references=[] if sub.reference_fw_ids else None)
        sub.fw_ids[material_id] = sorted(lp.add_wf(wf).values())
    return sub
