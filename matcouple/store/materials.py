"""The ``materials`` collection: crystal structures with their labels and provenance.

One document per (source, material id): the pymatgen structure dict, composition keys
(formula, reduced formula, chemical system, elements, nsites), space group, and a
``labels`` mapping ``name -> {value, unit, source, fidelity}``. Results of another fidelity
(e.g. our own DFT) are separate documents of their own source, so a label never silently
replaces one of another level of theory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure
from pymongo import ASCENDING, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database

from matcouple.settings import get_settings
from matcouple.structures.descriptors import composition_keys, symmetry

# The tolerances the generation literature uses (CDVAE/DiffCSP/EquiCSP) for "same crystal".
MATCHER_TOLERANCES = {"ltol": 0.3, "stol": 0.5, "angle_tol": 10.0}

INDEXES: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
    ([("source", ASCENDING), ("material_id", ASCENDING)], {"unique": True}),
    ([("reduced_formula", ASCENDING)], {}),
    ([("chemsys", ASCENDING)], {}),
    ([("elements", ASCENDING)], {}),
    ([("nsites", ASCENDING)], {}),
    ([("symmetry.number", ASCENDING)], {}),
    ([("fidelity", ASCENDING)], {}),
    ([("labels.formation_energy_per_atom.value", ASCENDING)], {"sparse": True}),
    ([("labels.band_gap.value", ASCENDING)], {"sparse": True}),
]


@dataclass(frozen=True)
class Label:
    """A property value with the level of theory it came from."""

    value: float
    unit: str
    source: str
    fidelity: str

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "source": self.source,
                "fidelity": self.fidelity}


def normalise_formula(formula: str) -> str:
    """Reduced formula in pymatgen's canonical form ("O3Fe2" -> "Fe2O3")."""
    return Composition(formula).reduced_formula


def normalise_chemsys(chemsys: str | Iterable[str]) -> str:
    """Sorted, dash-joined element symbols ("O-Fe" -> "Fe-O")."""
    parts = chemsys.split("-") if isinstance(chemsys, str) else list(chemsys)
    return "-".join(sorted(p.strip() for p in parts if p.strip()))


def material_document(
    structure: Structure,
    *,
    source: str,
    material_id: str,
    fidelity: str,
    labels: dict[str, Label] | None = None,
    extra: dict[str, Any] | None = None,
    symprec: float | None = None,
) -> dict[str, Any]:
    """Build the stored document of one material (no database access; safe in workers)."""
    symprec = get_settings().symprec if symprec is None else symprec
    doc: dict[str, Any] = {
        "_id": f"{source}:{material_id}",
        "source": source,
        "material_id": material_id,
        "fidelity": fidelity,
        **composition_keys(structure),
        "symmetry": symmetry(structure, symprec),
        "density_g_cm3": float(structure.density),
        "volume_per_atom_A3": float(structure.volume / len(structure)),
        "structure": structure.as_dict(),
        "labels": {name: lab.as_dict() for name, lab in (labels or {}).items()},
    }
    if extra:
        doc.update(extra)
    return doc


class MaterialsStore:
    """Write and query the materials collection."""

    def __init__(self, db: Database, collection: str | None = None) -> None:
        self.collection: Collection = db[collection or get_settings().materials_collection]

    def ensure_indexes(self) -> None:
        for keys, options in INDEXES:
            self.collection.create_index(keys, **options)

    def upsert_many(self, docs: list[dict[str, Any]]) -> int:
        """Insert or replace documents by ``_id`` in one ordered bulk write; returns the count.

        Each document is written whole by one update, so a crash leaves every document
        either absent or complete. ``created_at`` survives re-loads.
        """
        if not docs:
            return 0
        now = dt.datetime.now(dt.UTC)
        ops = []
        for doc in docs:
            body = {k: v for k, v in doc.items() if k != "_id"}
            body["updated_at"] = now
            ops.append(
                UpdateOne({"_id": doc["_id"]},
                          {"$set": body, "$setOnInsert": {"created_at": now}}, upsert=True)
            )
        self.collection.bulk_write(ops, ordered=True)
        return len(ops)

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        ids = list(ids)
        found: set[str] = set()
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            cursor = self.collection.find({"_id": {"$in": chunk}}, {"_id": 1})
            found.update(d["_id"] for d in cursor)
        return found

    def count(self, query: dict[str, Any] | None = None) -> int:
        return self.collection.count_documents(query or {})

    def get(self, source: str, material_id: str) -> dict[str, Any] | None:
        return self.collection.find_one({"_id": f"{source}:{material_id}"})

    def find_by_formula(self, formula: str, **filters: Any) -> list[dict[str, Any]]:
        return list(self.collection.find({"reduced_formula": normalise_formula(formula),
                                          **filters}))

    def find_by_chemsys(self, chemsys: str | Iterable[str], **filters: Any) -> list[dict]:
        return list(self.collection.find({"chemsys": normalise_chemsys(chemsys), **filters}))

    def find_matching(
        self,
        structure: Structure,
        *,
        fidelity: str | None = None,
        matcher: StructureMatcher | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Entries that are the same crystal as ``structure`` (StructureMatcher).

        Candidates are narrowed through the reduced-formula index first, so this stays
        fast on a large collection.
        """
        matcher = matcher or StructureMatcher(**MATCHER_TOLERANCES)
        query: dict[str, Any] = {"reduced_formula": structure.composition.reduced_formula}
        if fidelity:
            query["fidelity"] = fidelity
        for doc in self.collection.find(query):
            if matcher.fit(structure, Structure.from_dict(doc["structure"])):
                yield doc

    @staticmethod
    def structure_of(doc: dict[str, Any]) -> Structure:
        return Structure.from_dict(doc["structure"])
