"""Thin FireTasks: read the spec, call a library function, return an FWAction.

Tasks find the database through the LaunchPad file named in the spec (``launchpad_file``)
or the default one (``$MATCOUPLE_LAUNCHPAD`` / ``fw_configs/my_launchpad.yaml``), the
same file ``rlaunch``/``qlaunch`` use, so results land next to the workflow that made them.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fireworks import FiretaskBase, FWAction, explicit_serialize
from pymatgen.core import Structure

from matcouple.settings import get_settings
from matcouple.store.connection import LaunchpadConfig, open_database
from matcouple.store.results import store_results
from matcouple.structures.descriptors import screening_summary
from matcouple.surrogate.records import prediction_document


def as_structure(value: Structure | dict) -> Structure:
    """FireWorks revives ``Structure.as_dict()`` into a Structure when it loads a spec."""
    return value if isinstance(value, Structure) else Structure.from_dict(value)


@functools.lru_cache(maxsize=4)
def _database_for(launchpad_file: str | None):
    # One client per worker process and LaunchPad file: a Firework costs milliseconds, a new
    # connection (handshake, ping) would be a large part of that.
    return open_database(LaunchpadConfig.load(launchpad_file))


def _database(spec: dict):
    return _database_for(spec.get("launchpad_file"))


@explicit_serialize
class ScreenTask(FiretaskBase):
    """Symmetry, density and nearest-neighbour distance for a batch of structures."""

    required_params = ["structures", "run"]
    optional_params = ["collection", "symprec", "launchpad_file"]

    def run_task(self, fw_spec: dict) -> FWAction:
        settings = get_settings()
        symprec = self.get("symprec", settings.symprec)
        results = [
            {"structure_id": item["id"],
             **screening_summary(as_structure(item["structure"]), symprec)}
            for item in self["structures"]
        ]
        collection = self.get("collection", settings.screening_collection)
        n = store_results(_database(self), collection, self["run"], results)
        return FWAction(stored_data={"stored": n, "collection": collection, "run": self["run"]})


@functools.lru_cache(maxsize=2)
def _predictor(model_dir: str | None, mc_samples: int | None):
    from matcouple.surrogate.predict import SurrogatePredictor

    return SurrogatePredictor.default(mc_samples=mc_samples,
                                      model_dir=Path(model_dir) if model_dir else None)


@explicit_serialize
class PredictTask(FiretaskBase):
    """Crysformer predictions (value, calibrated sigma, model version) for a batch."""

    required_params = ["structures"]
    optional_params = ["collection", "mc_samples", "model_dir", "launchpad_file", "run"]

    def run_task(self, fw_spec: dict) -> FWAction:
        mc = self.get("mc_samples")
        predictor = _predictor(self.get("model_dir"), None if mc is None else int(mc))
        items = [(item["id"], as_structure(item["structure"])) for item in self["structures"]]
        rows = predictor.predict(items)
        collection = self.get("collection", get_settings().predictions_collection)
        docs = [prediction_document(r, predictor, self.get("run")) for r in rows]
        n = store_results(_database(self), collection, predictor.version, docs)
        failed = [r.id for r in rows if r.error]
        return FWAction(stored_data={"stored": n, "failed": failed,
                                     "model_version": predictor.version},
                        update_spec={"predictions": {d["structure_id"]: d for d in docs}})
