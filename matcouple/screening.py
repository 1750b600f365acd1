"""The screening pattern's plumbing: choose structures, submit the workflow, read results."""

from __future__ import annotations

import collections
import datetime as dt
from pathlib import Path
from typing import Any

from pymatgen.core import Structure
from rich.table import Table

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.store.connection import LaunchpadConfig, open_database, open_launchpad
from matcouple.store.materials import MaterialsStore, normalise_chemsys, normalise_formula
from matcouple.structures.io import find_structure_files, structure_from_file
from matcouple.workflows import screening_workflow


def collect_structures(
    config: LaunchpadConfig,
    paths: list[Path],
    *,
    formula: str | None = None,
    chemsys: str | None = None,
    limit: int | None = None,
    dataset: str | None = None,
) -> tuple[list[tuple[str, Structure]], list[tuple[str, str]]]:
    """Structures from files/folders and/or the materials collection, plus refused files."""
    structures: list[tuple[str, Structure]] = []
    refused: list[tuple[str, str]] = []
    for path in find_structure_files(paths):
        try:
            structures.append((path.stem, structure_from_file(path)))
        except MatcoupleError as exc:
            refused.append((str(path), str(exc)))
    if formula or chemsys or dataset or not paths:
        query: dict[str, Any] = {}
        if formula:
            query["reduced_formula"] = normalise_formula(formula)
        if chemsys:
            query["chemsys"] = normalise_chemsys(chemsys)
        if dataset:
            query["dataset"] = dataset
        store = MaterialsStore(open_database(config))
        cursor = store.collection.find(query, {"structure": 1}).sort("_id", 1)
        if limit:
            cursor = cursor.limit(limit)
        structures.extend((d["_id"], Structure.from_dict(d["structure"])) for d in cursor)
    if not structures:
        raise MatcoupleError("no structures to screen: give files, or load data first "
                             "(`matcouple data load mp2018 --subset ci`)")
    return structures, refused


def submit_screening(
    config: LaunchpadConfig,
    structures: list[tuple[str, Structure]],
    *,
    run: str | None = None,
    batch_size: int | None = None,
    category: str | None = None,
) -> tuple[str, list[int]]:
    """Add the screening workflow; returns the run name and the new Firework ids."""
    run = run or dt.datetime.now().strftime("screen-%Y%m%d-%H%M%S")
    wf = screening_workflow(structures, run, batch_size=batch_size, category=category,
                            launchpad_file=str(config.path))
    id_map = open_launchpad(config).add_wf(wf)
    return run, sorted(id_map.values())


def screening_results(run: str, launchpad: Path | None = None) -> list[dict[str, Any]]:
    db = open_database(LaunchpadConfig.load(launchpad))
    return list(db[get_settings().screening_collection].find({"run": run}).sort("_id", 1))


def summary_table(docs: list[dict[str, Any]], title: str) -> Table:
    """Counts per crystal system with mean density and nearest-neighbour distance."""
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for d in docs:
        groups[d["symmetry"]["crystal_system"]].append(d)
    table = Table(title=title)
    for col in ("crystal system", "n", "mean density g/cm3", "mean d_min A",
                "most common space group"):
        table.add_column(col)
    for system, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        sg = collections.Counter(d["symmetry"]["symbol"] for d in items).most_common(1)[0]
        table.add_row(
            system, str(len(items)),
            f"{sum(d['density_g_cm3'] for d in items) / len(items):.2f}",
            f"{sum(d['min_interatomic_distance_A'] for d in items) / len(items):.2f}",
            f"{sg[0]} ({sg[1]})",
        )
    return table
