"""Training sets of the generator as packed tensors: MP 2018 (<= 20 atoms), Perov-5, Carbon-24.

Structures are read from ``$MATCOUPLE_DATA_DIR`` (through :mod:`matcouple.datasets`),
Niggli-reduced and put in the canonical orientation of their lattice parameters (a along
x, b in the xy plane), as CDVAE/DiffCSP do, so the diffusion over L sees one frame per
crystal. A parsed set is cached as tensors keyed by a hash of the source file, so the
GPU machine parses the CSV once.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from matcouple.datasets import known_dataset, read_table
from matcouple.errors import DatasetError
from matcouple.settings import get_settings

PREPROCESSING_VERSION = "niggli-canonical-v1"
# name -> (known data set, split column, value of each split)
TRAINING_SETS = {
    "mp2018": ("mp2018", "megnet_split", {"train": "train", "val": "val"}),
    "perov5": ("perov5", "split", {"train": "train", "val": "val", "test": "test"}),
    "carbon24": ("carbon24", "split", {"train": "train", "val": "val", "test": "test"}),
}


@dataclass
class CrystalSet:
    """Crystals packed end to end: atom rows of crystal k are offsets[k]:offsets[k]+n[k]."""

    lattice: torch.Tensor  # (M, 3, 3) float32, rows = a, b, c in A
    frac: torch.Tensor  # (Ntot, 3) float32 in [0, 1)
    atomic_numbers: torch.Tensor  # (Ntot,) int64
    num_atoms: torch.Tensor  # (M,) int64
    ids: list[str]
    data_hash: str

    def __len__(self) -> int:
        return len(self.num_atoms)

    @property
    def offsets(self) -> torch.Tensor:
        return torch.cumsum(self.num_atoms, 0) - self.num_atoms

    def to(self, device: torch.device | str) -> CrystalSet:
        return CrystalSet(self.lattice.to(device), self.frac.to(device),
                          self.atomic_numbers.to(device), self.num_atoms.to(device),
                          self.ids, self.data_hash)

    def as_dict(self) -> dict:
        return {"lattice": self.lattice, "frac": self.frac,
                "atomic_numbers": self.atomic_numbers, "num_atoms": self.num_atoms,
                "ids": self.ids, "data_hash": self.data_hash}

    @classmethod
    def from_dict(cls, d: dict) -> CrystalSet:
        return cls(d["lattice"], d["frac"], d["atomic_numbers"], d["num_atoms"],
                   list(d["ids"]), d["data_hash"])

    def select(self, indices: torch.Tensor, counts: torch.Tensor | None = None,
               starts: torch.Tensor | None = None) -> CrystalBatch:
        """Gather crystals ``indices`` into a batch (no Python loop).

        ``counts``/``starts``: CPU copies of ``num_atoms``/``offsets`` for data on a GPU, so
        the index arithmetic runs on the host without waiting for the device.
        """
        device = self.frac.device
        counts = self.num_atoms if counts is None else counts
        starts_all = self.offsets if starts is None else starts
        indices = indices.to(counts.device)
        n = counts[indices]
        starts = starts_all[indices]
        local = torch.arange(int(n.sum()), device=n.device) - torch.repeat_interleave(
            torch.cumsum(n, 0) - n, n)
        rows = (torch.repeat_interleave(starts, n) + local).to(device, non_blocking=True)
        batch = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)
        idx = indices.to(device, non_blocking=True)
        return CrystalBatch(self.lattice[idx], self.frac[rows], self.atomic_numbers[rows],
                            n.to(device, non_blocking=True), batch.to(device, non_blocking=True))

    def structure(self, k: int):
        """Crystal ``k`` as a pymatgen Structure."""
        from pymatgen.core import Lattice, Structure

        start = int(self.offsets[k])
        n = int(self.num_atoms[k])
        return Structure(Lattice(self.lattice[k].cpu().numpy()),
                         self.atomic_numbers[start:start + n].cpu().tolist(),
                         self.frac[start:start + n].cpu().numpy())

    def size_histogram(self, max_atoms: int) -> torch.Tensor:
        """Counts of crystals with N = 0..max_atoms atoms: the data p(N)."""
        return torch.bincount(self.num_atoms.cpu(), minlength=max_atoms + 1)[: max_atoms + 1]

    def elements(self) -> list[int]:
        return sorted(int(z) for z in torch.unique(self.atomic_numbers.cpu()))


@dataclass
class CrystalBatch:
    """A batch of crystals, flattened: ``batch[i]`` is the crystal of atom i."""

    lattice: torch.Tensor
    frac: torch.Tensor
    atomic_numbers: torch.Tensor
    num_atoms: torch.Tensor
    batch: torch.Tensor


def canonical_arrays(structure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Niggli-reduced cell in the canonical frame of its lattice parameters."""
    from pymatgen.core import Lattice

    reduced = structure.get_reduced_structure()
    lattice = Lattice.from_parameters(*reduced.lattice.parameters)
    frac = np.mod(reduced.frac_coords, 1.0)
    numbers = np.array([site.specie.Z for site in reduced], dtype=np.int64)
    return lattice.matrix.astype(np.float32), frac.astype(np.float32), numbers


def _parse_row(item: tuple[str, str, str]) -> tuple[str, tuple | None]:
    from pymatgen.core import Structure

    material_id, text, fmt = item
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(text, fmt=fmt)
        if not structure.is_ordered:
            return material_id, None
        return material_id, canonical_arrays(structure)
    except Exception:  # a row pymatgen cannot read is skipped, counted by the caller
        return material_id, None


def _pack(items: Iterable[tuple[str, tuple]], data_hash: str) -> CrystalSet:
    ids, lattices, fracs, numbers, counts = [], [], [], [], []
    for material_id, (lattice, frac, z) in items:
        ids.append(material_id)
        lattices.append(lattice)
        fracs.append(frac)
        numbers.append(z)
        counts.append(len(z))
    if not ids:
        raise DatasetError("no usable structures in the selected data")
    return CrystalSet(
        lattice=torch.from_numpy(np.stack(lattices)),
        frac=torch.from_numpy(np.concatenate(fracs)),
        atomic_numbers=torch.from_numpy(np.concatenate(numbers)),
        num_atoms=torch.tensor(counts, dtype=torch.int64), ids=ids, data_hash=data_hash)


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_split(name: str, split: str, max_atoms: int | None = None,
               limit: int | None = None, workers: int | None = None) -> CrystalSet:
    """One split of a training set, at most ``max_atoms`` atoms per cell, cached as tensors."""
    if name not in TRAINING_SETS:
        raise DatasetError(f"unknown training set {name!r}; known: {', '.join(TRAINING_SETS)}")
    dataset, column, splits = TRAINING_SETS[name]
    if split not in splits:
        raise DatasetError(f"{name} has no split {split!r}; it has {', '.join(splits)}")
    settings = get_settings()
    max_atoms = settings.generator_max_atoms if max_atoms is None else max_atoms
    path = known_dataset(dataset).path
    if not path.exists():
        raise DatasetError(f"{path}: no such file; set MATCOUPLE_DATA_DIR to the data sets")
    key = hashlib.sha256(
        f"{file_hash(path)}|{name}|{split}|{max_atoms}|{limit}|{PREPROCESSING_VERSION}".encode()
    ).hexdigest()[:16]
    cache = settings.root / settings.generator_cache_dir / f"{name}-{split}-{key}.pt"
    if cache.exists():
        return CrystalSet.from_dict(torch.load(cache, weights_only=True))
    frame = read_table(path)
    frame = frame[frame[column] == splits[split]]
    text_column = "cif" if name == "mp2018" else "poscar"
    if "natoms" in frame.columns:
        frame = frame[frame["natoms"] <= max_atoms]
    if limit:
        frame = frame.head(limit)
    items = list(zip(frame["material_id"].astype(str), frame[text_column],
                     [text_column] * len(frame), strict=True))
    workers = workers or min(16, os.cpu_count() or 1)
    if workers > 1 and len(items) > 200:
        with ProcessPoolExecutor(workers) as pool:
            parsed = list(pool.map(_parse_row, items, chunksize=64))
    else:
        parsed = [_parse_row(item) for item in items]
    kept = [(mid, arrays) for mid, arrays in parsed
            if arrays is not None and len(arrays[2]) <= max_atoms]
    crystals = _pack(kept, key)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(crystals.as_dict(), tmp)
    tmp.replace(cache)
    return crystals


def concatenate(sets: list[CrystalSet]) -> CrystalSet:
    """Several training sets as one (e.g. MP 2018 + Perov-5 + Carbon-24)."""
    if len(sets) == 1:
        return sets[0]
    key = hashlib.sha256("|".join(s.data_hash for s in sets).encode()).hexdigest()[:16]
    return CrystalSet(
        lattice=torch.cat([s.lattice for s in sets]), frac=torch.cat([s.frac for s in sets]),
        atomic_numbers=torch.cat([s.atomic_numbers for s in sets]),
        num_atoms=torch.cat([s.num_atoms for s in sets]),
        ids=[i for s in sets for i in s.ids], data_hash=key)


def load_training_data(names: list[str], split: str = "train", max_atoms: int | None = None,
                       limit: int | None = None) -> CrystalSet:
    """The named sets' ``split`` joined, e.g. ``["mp2018", "perov5"]``."""
    return concatenate([load_split(n, split, max_atoms, limit) for n in names])
