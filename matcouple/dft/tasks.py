"""Thin FireTasks of the DFT workflows: read the spec, call matcouple.dft, return an FWAction.

A failed calculation (SCF or relaxation not converged, walltime) is recorded on the
Firework (``stored_data.failure``) and continued by a detour Firework with the escalated
settings of :func:`matcouple.dft.retries.escalate`; after ``Settings.dft_max_attempts``
attempts the Firework fizzles with the whole failure history in its message.
"""

from __future__ import annotations

from pathlib import Path

from fireworks import FiretaskBase, Firework, FWAction, explicit_serialize

from matcouple.dft.calculation import run_dft, store_dft_result
from matcouple.dft.engine import get_engine
from matcouple.dft.errors import DFTCalculationError
from matcouple.dft.references import ReferenceEnergies
from matcouple.dft.retries import escalate, failure_record, gave_up_message, may_retry
from matcouple.settings import get_settings
from matcouple.store.connection import LaunchpadConfig, open_database
from matcouple.tasks import as_structure


def _database(params):
    return open_database(LaunchpadConfig.load(params.get("launchpad_file")))


def _workdir() -> Path:
    return Path(get_settings().dft_workdir or ".")


@explicit_serialize
class DFTRelaxStaticTask(FiretaskBase):
    """Relax + static of one structure, formation energy, result into ``materials``."""

    required_params = ["structure", "material_id", "engine", "preset"]
    optional_params = ["input_structure", "input_id", "retry", "attempt", "failures",
                       "walltime_s", "launchpad_file"]

    def run_task(self, fw_spec: dict) -> FWAction:
        engine = get_engine(self["engine"])
        db = _database(self)
        structure = as_structure(self["structure"])
        walltime = self.get("walltime_s", get_settings().dft_walltime_s) or None
        try:
            result = run_dft(structure, engine, self["preset"], workdir=_workdir(),
                             references=ReferenceEnergies(db, engine, self["preset"],
                                                          workdir=_workdir()),
                             retry=self.get("retry"), walltime_s=walltime)
        except DFTCalculationError as exc:
            return self._retry(exc, fw_spec)
        doc_id = store_dft_result(
            db, result, material_id=self["material_id"], engine=engine,
            input_structure=as_structure(self.get("input_structure") or self["structure"]),
            input_id=self.get("input_id"))
        return FWAction(stored_data={
            "material": doc_id, "energy_per_atom": result.energy_per_atom,
            "formation_energy_per_atom": result.formation_energy_per_atom,
            "band_gap": result.band_gap, "timings": result.timings,
            "attempt": self.get("attempt", 1), "failures": self.get("failures", []),
        })

    def _retry(self, exc: DFTCalculationError, fw_spec: dict) -> FWAction:
        from matcouple.dft.presets import gpaw_preset

        attempt = int(self.get("attempt", 1))
        failure = failure_record(exc, attempt, self.get("retry"))
        failures = [*self.get("failures", []), failure]
        if not may_retry(self["engine"], attempt):
            raise DFTCalculationError(f"{self['material_id']}: {gave_up_message(failures)}")
        params = {k: v for k, v in self.items() if not k.startswith("_")}
        params.update(
            structure=exc.structure or params["structure"],
            input_structure=params.get("input_structure") or params["structure"],
            retry=escalate(exc.kind, gpaw_preset(self["preset"]), self.get("retry")),
            attempt=attempt + 1, failures=failures)
        spec = {k: v for k, v in fw_spec.items()
                if k in {"_category", "_queueadapter", "_priority", "matcouple_run",
                         "_add_launchpad_and_fw_id"}}
        retry_fw = Firework([DFTRelaxStaticTask(**params)], spec=spec,
                            name=f"dft retry {attempt + 1} {self['material_id']}")
        return FWAction(stored_data={"failure": failure}, detours=[retry_fw])


@explicit_serialize
class DFTReferenceTask(FiretaskBase):
    """Compute (or find cached) the elemental reference energy of one element."""

    required_params = ["element", "engine", "preset"]
    optional_params = ["launchpad_file"]

    def run_task(self, fw_spec: dict) -> FWAction:
        engine = get_engine(self["engine"])
        refs = ReferenceEnergies(_database(self), engine, self["preset"], workdir=_workdir())
        energy = refs.get_or_compute(self["element"])
        return FWAction(stored_data={"element": self["element"], "energy_per_atom": energy,
                                     "computed": bool(refs.computed)})
