"""Elemental reference energies: computed with the same engine and preset, cached in MongoDB.

A formation energy is only meaningful against references of the same level of theory,
so each (engine, preset, exact settings, element) is computed once, stored in the
``dft_references`` collection and reused by every later calculation. Workers running in
parallel coordinate through a claim document: the first computes, the others wait for
its result instead of computing it again.

Reference phases follow the Materials Project convention: the diatomic gases (H, N, O, F,
Cl) are isolated molecules, every other element its ground-state crystal from the MP 2018
data set (``$MATCOUPLE_DATA_DIR``), or ASE's reference crystal when that set lacks it.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pymatgen.core import Lattice, Structure
from pymongo import ASCENDING
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from matcouple.dft.engine import DFTEngine, ReferenceResult
from matcouple.dft.errors import UnsupportedElementError
from matcouple.settings import get_settings

# Bond lengths (A) and spin of the diatomic gas references; O2 is a triplet.
DIATOMIC_GASES: dict[str, tuple[float, float]] = {
    "H": (0.74, 0.0), "N": (1.10, 0.0), "O": (1.21, 1.0), "F": (1.42, 0.0), "Cl": (1.99, 0.0),
}
# An MP elemental entry this close to zero formation energy is MP's own reference phase.
MP_REFERENCE_TOL = 1e-3


@dataclass(frozen=True)
class ReferencePhase:
    """The starting geometry of an elemental reference."""

    element: str
    structure: Structure
    source: str
    molecule: bool = False
    magmom_per_atom: float = 0.0


def molecule_in_box(element: str, box: float) -> ReferencePhase:
    """A diatomic molecule centred in a cubic box with ``box`` A edges."""
    bond, magmom = DIATOMIC_GASES[element]
    centre = box / 2
    coords = [[centre - bond / 2, centre, centre], [centre + bond / 2, centre, centre]]
    structure = Structure(Lattice.cubic(box), [element, element], coords,
                          coords_are_cartesian=True)
    return ReferencePhase(element, structure, f"diatomic {element}2 molecule", True, magmom)


@lru_cache(maxsize=1)
def _mp_elemental_rows() -> dict[str, list[tuple[float, int, str, str]]]:
    """Elemental rows of the MP 2018 set: element -> [(e_form, natoms, material_id, cif)]."""
    import pandas as pd

    settings = get_settings()
    path = settings.data_dir / settings.datasets["mp2018"]
    if not path.exists():
        return {}
    df = pd.read_csv(path, keep_default_na=False, na_values=[""],
                     usecols=["material_id", "reduced_formula", "natoms",
                              "formation_energy_per_atom", "cif"])
    df = df[df["reduced_formula"].str.fullmatch(r"[A-Z][a-z]?")]
    rows: dict[str, list[tuple[float, int, str, str]]] = {}
    for r in df.itertuples():
        rows.setdefault(r.reduced_formula, []).append(
            (float(r.formation_energy_per_atom), int(r.natoms), r.material_id, r.cif))
    return {el: sorted(v) for el, v in rows.items()}


def _ase_reference_crystal(element: str) -> Structure | None:
    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor

    try:
        return AseAtomsAdaptor.get_structure(bulk(element))
    except (ValueError, KeyError, NotImplementedError, RuntimeError):
        return None


def reference_phase(element: str, molecule_box: float = 9.0) -> ReferencePhase:
    """The phase whose energy per atom is the chemical potential of ``element``."""
    if element in DIATOMIC_GASES:
        return molecule_in_box(element, molecule_box)
    rows = _mp_elemental_rows().get(element, [])
    if rows and abs(rows[0][0]) <= MP_REFERENCE_TOL:
        e_form, _, mpid, cif = rows[0]
        return ReferencePhase(element, _primitive(cif), f"mp2018:{mpid} (MP reference phase)")
    crystal = _ase_reference_crystal(element)
    if crystal is not None:
        return ReferencePhase(element, crystal, "ase.build.bulk reference state")
    if rows:
        e_form, _, mpid, cif = rows[0]
        return ReferencePhase(element, _primitive(cif),
                              f"mp2018:{mpid} (lowest elemental entry, {e_form:+.3f} eV/atom "
                              "above MP's reference)")
    raise UnsupportedElementError(
        f"no reference phase for {element}: it is not a diatomic gas, ASE has no reference "
        f"crystal for it and the MP 2018 set ({get_settings().data_dir}) has no elemental "
        f"entry. Add one by computing {element}'s ground state yourself and storing it."
    )


def _primitive(cif: str) -> Structure:
    structure = Structure.from_str(cif, fmt="cif")
    return structure.get_primitive_structure()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class ReferenceEnergies:
    """Elemental energies per atom for one engine and preset, cached in MongoDB."""

    def __init__(self, db: Database, engine: DFTEngine, preset: str, *,
                 workdir: Path | None = None, collection: str | None = None) -> None:
        settings = get_settings()
        self.engine = engine
        self.preset = preset
        self.key = engine.reference_key(preset)
        self.collection = db[collection or settings.dft_references_collection]
        self.collection.create_index([("key", ASCENDING), ("element", ASCENDING)])
        self.workdir = Path(workdir or settings.dft_workdir) / "references"
        self.claim_timeout_s = settings.dft_reference_claim_timeout_s
        self.computed: list[str] = []  # elements this object computed (not cache hits)

    def _id(self, element: str) -> str:
        return f"{self.key}:{element}"

    def cached(self, element: str) -> float | None:
        doc = self.collection.find_one({"_id": self._id(element), "state": "done"})
        return None if doc is None else float(doc["energy_per_atom"])

    def missing(self, elements: list[str]) -> list[str]:
        return [el for el in elements if self.cached(el) is None]

    def energies(self, elements: list[str]) -> dict[str, float]:
        """Energy per atom of each element, computing (once, anywhere) what is missing."""
        return {el: self.get_or_compute(el) for el in sorted(set(elements))}

    def get_or_compute(self, element: str) -> float:
        deadline = time.monotonic() + self.claim_timeout_s
        while True:
            value = self.cached(element)
            if value is not None:
                return value
            if self._claim(element):
                return self._compute(element)
            if time.monotonic() > deadline:
                # The claimant died or hangs: take the claim over and compute.
                self.collection.delete_one({"_id": self._id(element), "state": "running"})
                continue
            time.sleep(2.0)

    def _claim(self, element: str) -> bool:
        try:
            self.collection.insert_one({
                "_id": self._id(element), "key": self.key, "element": element,
                "state": "running", "claimed_by": f"{socket.gethostname()}:{os.getpid()}",
                "claimed_at": _now(),
            })
        except DuplicateKeyError:
            return False
        return True

    def _compute(self, element: str) -> float:
        try:
            result = self.engine.reference(element, self.preset,
                                           workdir=self.workdir / self.key.replace("/", "_"))
        except BaseException:
            self.collection.delete_one({"_id": self._id(element), "state": "running"})
            raise
        self.collection.update_one({"_id": self._id(element)}, {"$set": self._doc(result)})
        self.computed.append(element)
        return result.energy_per_atom

    def _doc(self, result: ReferenceResult) -> dict[str, Any]:
        return {
            "state": "done", "engine": self.engine.name, "preset": self.preset,
            "fidelity": self.engine.fidelity(self.preset),
            "settings": self.engine.energy_settings(self.preset),
            "energy_per_atom": result.energy_per_atom,
            "structure": result.structure.as_dict(),
            "structure_source": result.structure_source,
            "timings": result.timings, "computed_at": _now(),
        }

    def store(self, result: ReferenceResult) -> None:
        """Record a reference computed elsewhere (e.g. by a VASP workflow)."""
        self.collection.update_one(
            {"_id": self._id(result.element)},
            {"$set": {"key": self.key, "element": result.element, **self._doc(result)}},
            upsert=True)
