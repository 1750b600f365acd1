"""VASP through atomate2: MP GGA(+U) double relax + static, as FireWorks via jobflow.

The calculation is atomate2's own ``MPGGADoubleRelaxStaticMaker`` (pymatgen's
``MPRelaxSet``/``MPStaticSet``, run under custodian with its error handlers), converted to
Fireworks by jobflow's ``flow_to_workflow``; job outputs go to a jobflow ``JobStore`` in the
LaunchPad's own MongoDB. A last, cheap job applies the Materials Project 2020 compatibility
scheme (anion and GGA/GGA+U corrections) and stores the result in ``materials``, so VASP
results sit on the scale of the MP training data. Elemental references are computed by the
same makers and cached like the GPAW ones.

Needs the ``[vasp]`` extra (atomate2, jobflow, custodian); running needs VASP
(``VASP_CMD`` in ``~/.atomate2.yaml``) and POTCARs (``PMG_VASP_PSP_DIR`` in
``~/.config/.pmgrc.yaml``). Without them, inputs can still be written with
``potcar_spec=True`` (a ``POTCAR.spec`` naming the POTCARs) to check them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from matcouple.dft.engine import DFTEngine, DFTResult, ReferenceResult
from matcouple.dft.errors import EngineUnavailableError, UnsupportedElementError
from matcouple.dft.presets import VASP_PRESETS, VaspPreset, vasp_preset
from matcouple.settings import get_settings

MP2020 = "MP2020"


def _require_atomate2() -> None:
    try:
        import atomate2  # noqa: F401
        import jobflow  # noqa: F401
    except ImportError as exc:
        raise EngineUnavailableError(
            "the VASP engine needs atomate2 and jobflow: pip install 'matcouple[vasp]'"
        ) from exc


def input_sets(preset: VaspPreset) -> tuple[Any, Any]:
    """The (relax, static) pymatgen input sets of a preset: MP's own, or loosened ones."""
    from pymatgen.io.vasp.sets import MPRelaxSet, MPStaticSet

    common = {"force_gamma": True, "auto_metal_kpoints": True, "inherit_incar": False}
    relax_kw: dict[str, Any] = dict(common)
    static_kw: dict[str, Any] = dict(common)
    if preset.relax_reciprocal_density:
        relax_kw["user_kpoints_settings"] = {
            "reciprocal_density": preset.relax_reciprocal_density}
    if preset.static_reciprocal_density:
        static_kw["user_kpoints_settings"] = {
            "reciprocal_density": preset.static_reciprocal_density}
    if preset.ediff:
        relax_kw["user_incar_settings"] = {"EDIFF": preset.ediff}
        static_kw["user_incar_settings"] = {"EDIFF": preset.ediff}
    return MPRelaxSet(**relax_kw), MPStaticSet(**static_kw)


def relax_static_maker(preset: str):
    """atomate2's MP GGA double relax + static maker, with the preset's input sets."""
    _require_atomate2()
    from atomate2.vasp.flows.mp import MPGGADoubleRelaxMaker, MPGGADoubleRelaxStaticMaker
    from atomate2.vasp.jobs.mp import MPGGARelaxMaker, MPGGAStaticMaker

    relax_set, static_set = input_sets(vasp_preset(preset))
    copy = {"additional_vasp_files": ("WAVECAR", "CHGCAR")}
    return MPGGADoubleRelaxStaticMaker(
        name=f"matcouple vasp-{preset}",
        relax_maker=MPGGADoubleRelaxMaker(
            relax_maker1=MPGGARelaxMaker(input_set_generator=relax_set),
            relax_maker2=MPGGARelaxMaker(input_set_generator=relax_set, copy_vasp_kwargs=copy),
        ),
        static_maker=MPGGAStaticMaker(input_set_generator=static_set, copy_vasp_kwargs=copy),
    )


def write_vasp_inputs(structure: Structure, preset: str, directory: Path,
                      step: str = "relax") -> Path:
    """Write the INCAR/KPOINTS/POSCAR/POTCAR.spec the ``step`` job would run (no POTCARs)."""
    _require_atomate2()
    from atomate2.vasp.files import write_vasp_input_set

    relax_set, static_set = input_sets(vasp_preset(preset))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = relax_set if step == "relax" else static_set
    write_vasp_input_set(structure, generator, directory=directory, potcar_spec=True,
                         apply_incar_updates=False)
    return directory


def job_store(launchpad_file: str | Path | None = None):
    """A jobflow JobStore in the LaunchPad's own MongoDB (collections ``jobflow_*``)."""
    _require_atomate2()
    from jobflow import JobStore
    from maggma.stores import MongoStore

    from matcouple.store.connection import LaunchpadConfig

    config = LaunchpadConfig.load(Path(launchpad_file) if launchpad_file else None)
    data = config.data
    name = data.get("name", "fireworks")
    common: dict[str, Any] = {"database": name}
    if data.get("uri_mode"):
        common["uri"] = data["host"]
    else:
        common.update(host=config.host, port=config.port,
                      username=data.get("username") or "", password=data.get("password") or "",
                      auth_source=data.get("authsource"))
    return JobStore(MongoStore(collection_name="jobflow_outputs", **common),
                    additional_stores={"data": MongoStore(collection_name="jobflow_data",
                                                          **common)})


def corrected_entry(task_doc: Any):
    """The static's ComputedStructureEntry with MP2020 corrections applied."""
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    entry = task_doc.entry if hasattr(task_doc, "entry") else task_doc["entry"]
    structure = task_doc.structure if hasattr(task_doc, "structure") else task_doc["structure"]
    if isinstance(entry, dict):
        from monty.json import MontyDecoder

        entry = MontyDecoder().process_decoded(entry)
    if isinstance(structure, dict):
        structure = Structure.from_dict(structure)
    cse = ComputedStructureEntry(structure, entry.uncorrected_energy,
                                 parameters=entry.parameters, data=entry.data,
                                 entry_id=entry.entry_id)
    processed = MaterialsProject2020Compatibility(check_potcar=False).process_entry(cse)
    if processed is None:
        raise UnsupportedElementError(
            "MP2020 compatibility rejected the calculation (mixed or unknown run type/"
            "POTCARs); its formation energy would not be on MP's scale")
    return processed


def store_vasp_result(task_doc: Any, *, material_id: str, preset: str,
                      input_structure: dict, input_id: str | None,
                      launchpad_file: str | None, references: Sequence[Any] = ()) -> dict:
    """The last job of a VASP workflow: MP2020 formation energy, document in ``materials``."""
    from matcouple.dft.calculation import store_dft_result
    from matcouple.dft.references import ReferenceEnergies
    from matcouple.store.connection import LaunchpadConfig, open_database

    engine = VaspEngine()
    db = open_database(LaunchpadConfig.load(launchpad_file))
    result = vasp_result(task_doc, preset)
    refs = ReferenceEnergies(db, engine, preset)
    elements = [el.symbol for el in result.structure.composition.elements]
    # References come from this workflow's reference jobs (parents) or from the references
    # workflow of the same submission, which may still be running on another node.
    deadline = time.monotonic() + get_settings().dft_reference_claim_timeout_s
    while (missing := refs.missing(elements)) and time.monotonic() < deadline:
        time.sleep(30)
    if missing:
        raise UnsupportedElementError(
            f"no cached VASP reference for {', '.join(missing)} at {refs.key}; run its "
            "references workflow (`lpad get_wflows -n 'dft references*'`), then rerun this")
    from matcouple.dft.engine import formation_energy_per_atom

    mu = {el: refs.cached(el) for el in elements}
    result.formation_energy_per_atom = formation_energy_per_atom(
        result.structure.composition, result.details["corrected_energy"], mu)
    doc_id = store_dft_result(db, result, material_id=material_id, engine=engine,
                              input_structure=Structure.from_dict(input_structure),
                              input_id=input_id)
    return {"material": doc_id, "formation_energy_per_atom": result.formation_energy_per_atom}


def store_vasp_reference(task_doc: Any, *, element: str, preset: str, source: str,
                         launchpad_file: str | None) -> float:
    """Cache a VASP elemental reference (MP2020-corrected energy per atom)."""
    from matcouple.dft.references import ReferenceEnergies
    from matcouple.store.connection import LaunchpadConfig, open_database

    entry = corrected_entry(task_doc)
    refs = ReferenceEnergies(open_database(LaunchpadConfig.load(launchpad_file)),
                             VaspEngine(), preset)
    refs.store(ReferenceResult(element=element, energy_per_atom=entry.energy_per_atom,
                               structure=entry.structure, structure_source=source))
    return entry.energy_per_atom


def vasp_result(task_doc: Any, preset: str) -> DFTResult:
    """A DFTResult from atomate2's static TaskDoc (energies raw and MP2020-corrected)."""
    entry = corrected_entry(task_doc)
    output = task_doc.output if hasattr(task_doc, "output") else task_doc["output"]
    gap = getattr(output, "bandgap", None) if not isinstance(output, dict) \
        else output.get("bandgap")
    engine = VaspEngine()
    return DFTResult(
        structure=entry.structure, energy=entry.uncorrected_energy, engine="vasp",
        preset=preset, fidelity=engine.fidelity(preset), band_gap=gap,
        details={"corrected_energy": entry.energy, "correction": entry.correction,
                 "compatibility": MP2020, "run_type": entry.parameters.get("run_type"),
                 "hubbards": entry.parameters.get("hubbards")},
    )


class VaspEngine(DFTEngine):
    """VASP with Materials Project settings through atomate2 (runs where VASP is)."""

    name = "vasp"

    def preset_names(self) -> list[str]:
        return list(VASP_PRESETS)

    def fidelity(self, preset: str) -> str:
        tag = "MP2020" if vasp_preset(preset).mp_compatible else preset
        return f"vasp/GGA+U/{tag}"

    def energy_settings(self, preset: str) -> dict[str, Any]:
        p = vasp_preset(preset)
        return {"input_sets": "MPRelaxSet/MPStaticSet", "compatibility": MP2020,
                "relax_reciprocal_density": p.relax_reciprocal_density,
                "static_reciprocal_density": p.static_reciprocal_density, "ediff": p.ediff}

    def check_available(self) -> None:
        _require_atomate2()
        from atomate2 import SETTINGS

        command = str(SETTINGS.VASP_CMD).split()[-1]
        if shutil.which(command) is None:
            raise EngineUnavailableError(
                f"VASP executable {command!r} not found (VASP_CMD={SETTINGS.VASP_CMD!r}); set "
                "VASP_CMD in ~/.atomate2.yaml, or submit with --submit-only and run the "
                "Fireworks on a cluster node that has VASP")

    def check_elements(self, elements: Iterable[str]) -> None:
        from pymatgen.io.vasp.sets import MPRelaxSet

        known = MPRelaxSet.CONFIG["POTCAR"]
        missing = sorted(set(elements) - set(known))
        if missing:
            raise UnsupportedElementError(
                f"the Materials Project input set has no POTCAR for {', '.join(missing)}")

    def relax_static(self, structure: Structure, preset: str, *, workdir: Path,
                     retry: Mapping[str, Any] | None = None,
                     walltime_s: float | None = None) -> DFTResult:
        """Run the atomate2 flow here with jobflow's local manager (needs VASP)."""
        self.check_available()
        self.check_elements([el.symbol for el in structure.composition.elements])
        from jobflow import JobStore, run_locally
        from maggma.stores import MemoryStore

        flow = relax_static_maker(preset).make(structure)
        store = JobStore(MemoryStore())
        responses = run_locally(flow, store=store, root_dir=workdir, ensure_success=True)
        static_uuid = flow.jobs[-1].uuid
        task_doc = responses[static_uuid][max(responses[static_uuid])].output
        return vasp_result(task_doc, preset)

    def reference(self, element: str, preset: str, *, workdir: Path) -> ReferenceResult:
        from matcouple.dft.references import reference_phase

        phase = reference_phase(element)
        result = self.relax_static(phase.structure, preset, workdir=Path(workdir) / element)
        return ReferenceResult(element=element,
                               energy_per_atom=result.details["corrected_energy"]
                               / len(result.structure),
                               structure=result.structure, structure_source=phase.source)


# --------------------------------------------------------------------------- workflows
def _manager_config(run: str, category: str | None,
                    queueadapter: Mapping[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {"matcouple_run": run,
                              "_category": category or get_settings().dft_category}
    if queueadapter:
        config["_queueadapter"] = dict(queueadapter)
    return config


def _reference_jobs(elements: Sequence[str], preset: str, launchpad_file: str | None):
    from jobflow import job

    from matcouple.dft.references import reference_phase

    flows, outputs = [], []
    for el in elements:
        phase = reference_phase(el)
        flow = relax_static_maker(preset).make(phase.structure)
        flow.append_name(f" [{el} reference]")
        store = job(store_vasp_reference)(flow.output, element=el, preset=preset,
                                          source=phase.source, launchpad_file=launchpad_file)
        store.name = f"store vasp reference {el}"
        flows += [flow, store]
        outputs.append(store.output)
    return flows, outputs


def vasp_flow(material_id: str, structure: Structure, *, preset: str,
              launchpad_file: str | None = None, input_id: str | None = None,
              missing_references: Sequence[str] = ()):
    """The jobflow Flow: references still missing, double relax + static, store."""
    _require_atomate2()
    from jobflow import Flow, job

    ref_flows, ref_outputs = _reference_jobs(missing_references, preset, launchpad_file)
    main = relax_static_maker(preset).make(structure)
    main.append_name(f" [{material_id}]")
    store = job(store_vasp_result)(
        main.output, material_id=material_id, preset=preset,
        input_structure=structure.as_dict(), input_id=input_id,
        launchpad_file=launchpad_file, references=ref_outputs)
    store.name = f"store vasp result {material_id}"
    return Flow([*ref_flows, main, store], output=store.output,
                name=f"dft vasp-{preset} {material_id}")


def vasp_workflow(material_id: str, structure: Structure, *, preset: str, run: str,
                  category: str | None = None, queueadapter: Mapping[str, Any] | None = None,
                  launchpad_file: str | None = None, input_id: str | None = None,
                  missing_references: Sequence[str] | None = None):
    """The FireWorks workflow of :func:`vasp_flow`, via jobflow's ``flow_to_workflow``."""
    from jobflow.managers.fireworks import flow_to_workflow

    VaspEngine().check_elements([el.symbol for el in structure.composition.elements])
    if missing_references is None:
        missing_references = _missing_references(structure, preset, launchpad_file)
    flow = vasp_flow(material_id, structure, preset=preset, launchpad_file=launchpad_file,
                     input_id=input_id, missing_references=missing_references)
    flow.update_config({"manager_config": _manager_config(run, category, queueadapter)})
    wf = flow_to_workflow(flow, store=job_store(launchpad_file))
    wf.metadata.update({"matcouple": "dft", "run": run, "engine": "vasp", "preset": preset,
                        "material_id": material_id,
                        "formula": structure.composition.reduced_formula})
    wf.name = f"dft vasp-{preset} {material_id} ({run})"
    return wf


def vasp_reference_workflow(elements: Sequence[str], *, preset: str, run: str,
                            category: str | None = None,
                            queueadapter: Mapping[str, Any] | None = None,
                            launchpad_file: str | None = None):
    """Elemental references alone (the structure workflows then find them cached)."""
    from jobflow import Flow
    from jobflow.managers.fireworks import flow_to_workflow

    jobs, _ = _reference_jobs(elements, preset, launchpad_file)
    flow = Flow(jobs, name=f"dft references vasp-{preset}")
    flow.update_config({"manager_config": _manager_config(run, category, queueadapter)})
    wf = flow_to_workflow(flow, store=job_store(launchpad_file))
    wf.name = f"dft references vasp-{preset} ({run})"
    return wf


def _missing_references(structure: Structure, preset: str,
                        launchpad_file: str | None) -> list[str]:
    from matcouple.dft.references import ReferenceEnergies
    from matcouple.store.connection import LaunchpadConfig, open_database

    refs = ReferenceEnergies(open_database(LaunchpadConfig.load(launchpad_file)),
                             VaspEngine(), preset)
    return refs.missing(sorted(el.symbol for el in structure.composition.elements))
