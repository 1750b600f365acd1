"""Crystal -> periodic k-nearest-neighbour graph (the input of Crysformer).

Edges point from neighbour j (source) to atom i (target) and carry the Cartesian vector
r_ij = x_j + n·L - x_i to the periodic image n of j, so images across the cell boundary
are distinct neighbours and tiny or skewed cells are handled exactly (the neighbour search
is pymatgen's periodic sphere search, grown until every atom has k neighbours).

Neighbours tied with the k-th (same distance within ``tie_tol``) are all kept: a plain
top-k would pick among equidistant atoms arbitrarily, and the prediction would then
depend on atom order and on the choice of unit cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from pymatgen.core import Element, Lattice, Species, Structure

from matcouple.errors import MatcoupleError, StructureInputError
from matcouple.surrogate.atom_features import MAX_Z


@dataclass(frozen=True)
class GraphSpec:
    """How graphs are built; stored in checkpoints so training and inference agree."""

    k: int = 12
    tie_tol: float = 1e-3
    initial_radius: float = 6.0
    max_radius: float = 30.0


def parse_graph_options(items: list[str]) -> dict:
    """``["k=16"]`` -> ``{"k": 16}``: graph settings for a training run, typed like
    :class:`GraphSpec`; a clear error for an unknown name or a value out of range."""
    defaults = GraphSpec()
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults.__dataclass_fields__:
            raise MatcoupleError(
                f"graph option {item!r}: expected NAME=VALUE with NAME one of "
                f"{', '.join(defaults.__dataclass_fields__)}")
        kind = type(getattr(defaults, key))
        try:
            value = kind(raw)
        except ValueError:
            raise MatcoupleError(
                f"graph option {key}: {raw!r} is not a {kind.__name__}") from None
        if value < 0 or (value == 0 and key != "tie_tol"):
            raise MatcoupleError(f"graph option {key}: {raw!r} must be positive")
        out[key] = value
    spec = GraphSpec(**{**vars(defaults), **out})
    if spec.initial_radius > spec.max_radius:
        raise MatcoupleError(
            f"graph option initial_radius {spec.initial_radius} exceeds max_radius "
            f"{spec.max_radius}")
    return out


def knn_edges(structure: Structure, spec: GraphSpec) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray]:
    """(src, dst, vec): the k nearest periodic neighbours of each atom, ties included."""
    n = len(structure)
    radius = spec.initial_radius
    while True:
        centers, points, images, dists = structure.get_neighbor_list(
            radius, numerical_tol=1e-8, exclude_self=True)
        counts = np.bincount(centers, minlength=n)
        if counts.min() >= spec.k or radius >= spec.max_radius:
            break
        radius = min(radius * 1.5, spec.max_radius)
    if counts.min() < spec.k:
        raise StructureInputError(
            f"fewer than {spec.k} neighbours within {spec.max_radius} A: the cell is too "
            "sparse for the model (isolated atoms?)")
    order = np.lexsort((dists, centers))
    centers, points, images, dists = centers[order], points[order], images[order], dists[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(centers, minlength=n))[:-1]])
    kth = dists[starts + spec.k - 1]
    keep = dists <= kth[centers] + spec.tie_tol
    centers, points, images = centers[keep], points[keep], images[keep]
    cart = structure.cart_coords
    vec = cart[points] + images @ structure.lattice.matrix - cart[centers]
    return points.astype(np.int64), centers.astype(np.int64), vec.astype(np.float32)


def common_spec(specs: Sequence[GraphSpec]) -> GraphSpec:
    """The one graph that serves models trained with different k: the largest k, since a
    k-nearest graph holds every smaller k's edges (:func:`nearest_edges_mask` picks them
    out); every other setting must agree."""
    widest = max(specs, key=lambda spec: spec.k)
    for spec in specs:
        if replace(spec, k=widest.k) != widest:
            raise MatcoupleError(f"models disagree on graph settings other than k: {spec} "
                                 f"and {widest}")
    return widest


def nearest_edges_mask(edge_index: torch.Tensor, edge_vec: torch.Tensor, num_nodes: int,
                       k: int, tie_tol: float) -> torch.Tensor:
    """Which edges of a wider k-nearest graph (or a batch of them) form its k-nearest
    subgraph: each atom's k nearest incoming edges and those tied with the k-th, the rule
    of :func:`knn_edges`, so a model trained on k neighbours can read a graph built for a
    model with more."""
    dst = edge_index[1]
    dist = edge_vec.double().norm(dim=1)
    order = torch.argsort(dist, stable=True)
    order = order[torch.argsort(dst[order], stable=True)]
    counts = torch.bincount(dst, minlength=num_nodes)
    if num_nodes and int(counts.min()) < k:
        raise MatcoupleError(f"a graph with fewer than {k} neighbours per atom cannot give "
                             f"a {k}-nearest subgraph")
    starts = torch.cumsum(counts, 0) - counts
    kth = dist[order[starts + k - 1]]
    return dist <= kth[dst] + tie_tol


def nearest_graphs(graphs: list, k: int, tie_tol: float) -> list:
    """PyG graphs cut down to their k-nearest subgraphs (the other attributes kept): the
    training input of a model on k neighbours when the graphs were built with more."""
    out = []
    for g in graphs:
        keep = nearest_edges_mask(g.edge_index, g.edge_vec, g.num_nodes, k, tie_tol)
        cut = g.clone()
        cut.edge_index, cut.edge_vec = g.edge_index[:, keep], g.edge_vec[keep]
        out.append(cut)
    return out


def atomic_numbers(structure: Structure) -> np.ndarray:
    if not structure.is_ordered:
        mixed = next(site for site in structure if not site.is_ordered)
        raise StructureInputError(
            f"disordered cell: a site holds {mixed.species.formula} (partial occupancy); "
            "the model needs one element per site (order it first, e.g. with pymatgen's "
            "OrderDisorderedStructureTransformation)")
    z = np.array([site.specie.Z for site in structure], dtype=np.int64)
    bad = sorted({structure[i].specie.symbol for i in np.flatnonzero(z > MAX_Z)})
    if bad:
        raise StructureInputError(
            f"element(s) {', '.join(bad)} not covered by the model's atom embedding "
            f"(Z <= {MAX_Z})")
    return z


def structure_to_graph(structure: Structure, spec: GraphSpec | None = None) -> dict:
    """Tensors of one crystal graph: atomic numbers, edge index (2, E) and edge vectors."""
    spec = spec or GraphSpec()
    if len(structure) == 0:
        raise StructureInputError("empty cell: the structure has no atoms")
    z = atomic_numbers(structure)
    src, dst, vec = knn_edges(structure, spec)
    return {
        "z": torch.from_numpy(z),
        "edge_index": torch.from_numpy(np.stack([src, dst])),
        "edge_vec": torch.from_numpy(vec),
    }


# What a graph-building process needs of an ordered crystal: (lattice matrix, atomic
# numbers, fractional coordinates).
CompactCrystal = tuple[np.ndarray, list[int], np.ndarray]


def compact_crystal(structure: Structure) -> CompactCrystal | Structure:
    """A crystal as plain arrays for sending to another process.

    Pickling a pymatgen Structure costs ~1.6 ms on a 2-core laptop-class CPU (every site
    is an object), as much as building its graph, and the parent process does all the
    pickling; the arrays cost ~0.2 ms (3,653 MEGNet val crystals in 2 graph processes:
    15.5 s -> 11.1 s). Disordered cells, and cells with anything but elements or ions, are
    passed whole so they fail exactly as they would in-process.
    """
    species = structure.species if structure.is_ordered else []
    if not species or not all(isinstance(sp, Element) or type(sp) is Species
                              for sp in species):
        return structure
    return (structure.lattice.matrix, [sp.Z for sp in species], structure.frac_coords)


def crystal_from_compact(item: CompactCrystal | Structure) -> Structure:
    """The Structure back from :func:`compact_crystal` (same lattice, order and sites)."""
    if isinstance(item, Structure):
        return item
    matrix, numbers, frac = item
    return Structure(Lattice(matrix), numbers, frac)
