"""The materials collection: ingest of the real CI subset, idempotent reload, queries."""

from __future__ import annotations

import numpy as np
import pytest

from matcouple.datasets import iter_rows, known_dataset
from matcouple.ingest import ingest
from matcouple.settings import get_settings
from matcouple.store.connection import open_database
from matcouple.store.materials import MaterialsStore, normalise_chemsys, normalise_formula

pytestmark = pytest.mark.skipif(
    not get_settings().data_dir.joinpath("mp2018").exists(), reason="data sets not present")


@pytest.fixture()
def store(launchpad_config) -> MaterialsStore:
    return MaterialsStore(open_database(launchpad_config))


def test_ingest_is_idempotent_and_documents_are_complete(store):
    spec = known_dataset("mp2018", "ci")
    first = ingest(spec, store, limit=120, workers=2, progress=False)
    assert first.written == 120 and not first.errors
    again = ingest(spec, store, limit=120, workers=1, progress=False)
    assert again.written == 120
    assert store.count() == 120  # no duplicates
    doc = store.get("mp2018", next(iter_rows(spec)).material_id)
    for key in ("structure", "formula", "reduced_formula", "chemsys", "elements", "nsites",
                "symmetry", "labels", "fidelity", "split", "created_at"):
        assert key in doc
    fe = doc["labels"]["formation_energy_per_atom"]
    assert fe["unit"] == "eV/atom" and fe["fidelity"] == "mp2018/GGA+U"
    assert fe["source"] == "mp2018" and np.isfinite(fe["value"])
    names = {ix["name"] for ix in store.collection.list_indexes()}
    assert {"reduced_formula_1", "chemsys_1", "source_1_material_id_1"} <= names


def test_queries_by_formula_chemsys_and_structure(store):
    ingest(known_dataset("mp2018", "ci"), store, limit=200, workers=1, progress=False)
    doc = store.collection.find_one({"nelements": 2})
    by_formula = store.find_by_formula(doc["reduced_formula"])
    assert doc["_id"] in {d["_id"] for d in by_formula}
    els = list(reversed(doc["elements"]))
    assert doc["_id"] in {d["_id"] for d in store.find_by_chemsys("-".join(els))}
    # Same crystal, other description: rotated axes, shifted origin, a supercell.
    s = store.structure_of(doc).copy()
    s.translate_sites(list(range(len(s))), [0.13, 0.07, 0.31])
    s.make_supercell([1, 1, 2])
    s.perturb(0.01, min_distance=0.0)
    matches = list(store.find_matching(s))
    assert doc["_id"] in {m["_id"] for m in matches}
    # A different crystal of the same formula is not matched: stretch one axis threefold.
    other = store.structure_of(doc).copy()
    other.lattice = other.lattice.__class__(other.lattice.matrix * [[3.0], [1], [1]])
    assert doc["_id"] not in {m["_id"] for m in store.find_matching(other)}


def test_formula_normalisation():
    assert normalise_formula("O3Fe2") == "Fe2O3"
    assert normalise_formula("Fe4O6") == "Fe2O3"
    assert normalise_chemsys("O-Fe") == "Fe-O"
    assert normalise_chemsys(["O", "Fe", "Li"]) == "Fe-Li-O"
