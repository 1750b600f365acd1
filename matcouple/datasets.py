"""The labelled crystal tables matcouple knows, and how to read any other one.

A table is a CSV (optionally gzipped) with a ``cif`` or ``poscar`` column, an id column
and numeric label columns. The known sets in ``$MATCOUPLE_DATA_DIR`` (default
``../shared/data`` beside the checkout) carry their units and fidelity; any other CSV is
described on the command line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from matcouple.errors import DatasetError
from matcouple.settings import get_settings

ID_COLUMNS = ("material_id", "id", "name")
STRUCTURE_COLUMNS = ("cif", "poscar")


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one table: where it is, what its labels mean, where its split is."""

    name: str
    path: Path
    source: str
    fidelity: str
    labels: dict[str, str]  # column -> unit
    split_column: str | None = None
    labels_required: bool = True
    extra_columns: tuple[str, ...] = ()
    row_filter: dict[str, str] = field(default_factory=dict)


def _data_path(relative: str) -> Path:
    return get_settings().data_dir / relative


def known_dataset(name: str, subset: str | None = None) -> DatasetSpec:
    """The spec of a data set shipped in the data directory (``mp2018``, ``perov5``, ...)."""
    datasets = get_settings().datasets
    if name == "mp2018":
        if subset == "ci":
            return DatasetSpec(
                name="mp2018-ci", path=_data_path(datasets["mp2018-ci"]), source="mp2018",
                fidelity="mp2018/GGA+U",
                labels={"formation_energy_per_atom": "eV/atom", "band_gap": "eV"},
                split_column="ci_split", extra_columns=("megnet_split",),
            )
        if subset not in (None, "all"):
            raise DatasetError(f"unknown subset {subset!r} of mp2018 (use 'ci' or 'all')")
        return DatasetSpec(
            name="mp2018", path=_data_path(datasets["mp2018"]), source="mp2018",
            fidelity="mp2018/GGA+U",
            labels={"formation_energy_per_atom": "eV/atom", "band_gap": "eV"},
            split_column="megnet_split",
        )
    if name == "perov5":
        return DatasetSpec(
            name="perov5", path=_data_path(datasets["perov5"]), source="perov5",
            fidelity="castelli2012/GPAW-RPBE",
            labels={"heat_ref": "eV", "heat_all": "eV", "dir_gap": "eV", "ind_gap": "eV"},
            split_column="split", labels_required=False,
        )
    if name == "carbon24":
        return DatasetSpec(
            name="carbon24", path=_data_path(datasets["carbon24"]), source="carbon24",
            fidelity="pickard2020/AIRSS-PBE", labels={"energy_per_atom": "eV/atom"},
            split_column="split", labels_required=False,
        )
    raise DatasetError(
        f"unknown data set {name!r}; known: mp2018, perov5, carbon24, or give a CSV path"
    )


def csv_dataset(
    path: Path, *, source: str | None = None, fidelity: str | None = None,
    labels: list[str] | None = None, labels_required: bool = True,
) -> DatasetSpec:
    """A spec for a user CSV; label columns default to every numeric non-meta column."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    head = read_table(path, nrows=50)
    if not any(c in head.columns for c in STRUCTURE_COLUMNS):
        raise DatasetError(f"{path} has no 'cif' or 'poscar' column (columns: {list(head)})")
    if labels is None:
        meta = {*ID_COLUMNS, *STRUCTURE_COLUMNS, "natoms", "nsites", "split"}
        labels = [c for c in head.columns
                  if c not in meta and pd.api.types.is_numeric_dtype(head[c])]
    missing = [c for c in labels if c not in head.columns]
    if missing:
        raise DatasetError(f"{path} has no label column(s) {missing}")
    stem = path.name.split(".")[0]
    return DatasetSpec(
        name=stem, path=path, source=source or stem, fidelity=fidelity or f"{source or stem}",
        labels={c: "" for c in labels},
        split_column="split" if "split" in head.columns else None,
        labels_required=labels_required,
    )


def read_table(path: Path, nrows: int | None = None) -> pd.DataFrame:
    """Read a CSV the safe way: the formula "NaN" (sodium nitride) stays a string."""
    if not Path(path).exists():
        raise DatasetError(
            f"{path}: no such file. Set MATCOUPLE_DATA_DIR to the folder holding the data sets "
            f"(now {get_settings().data_dir})."
        )
    return pd.read_csv(path, keep_default_na=False, na_values=[""], nrows=nrows)


@dataclass(frozen=True)
class RawRow:
    """One table row, before parsing: id, structure text and format, labels, extras."""

    row: int
    material_id: str
    text: str
    fmt: str
    labels: dict[str, Any]
    extra: dict[str, Any]


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def iter_rows(spec: DatasetSpec) -> Iterator[RawRow]:
    """Yield the rows of a table with their structure text (cif preferred, else poscar)."""
    frame = read_table(spec.path)
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    extra_cols = [c for c in (spec.split_column, *spec.extra_columns) if c and c in frame]
    for i, rec in enumerate(frame.to_dict("records")):
        text, fmt = "", "cif"
        for column in STRUCTURE_COLUMNS:
            value = _cell(rec.get(column))
            if isinstance(value, str) and value.strip():
                text, fmt = value, column
                break
        material_id = str(rec[id_column]) if id_column and _cell(rec[id_column]) else f"row{i}"
        yield RawRow(
            row=i, material_id=material_id, text=text, fmt=fmt,
            labels={c: rec.get(c) for c in spec.labels},
            extra={("split" if c == spec.split_column else c): _cell(rec[c]) for c in extra_cols},
        )
