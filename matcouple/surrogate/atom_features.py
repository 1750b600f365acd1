"""k-hot atom embedding: each element as one-hot bins of its tabulated properties.

As in CGCNN-style crystal graphs (the paper's eq. 1 input), an atom is described by group,
period, block and binned electronegativity, radius, first ionisation energy, electron
affinity and molar volume, so chemically similar elements start close together. The table
is built from pymatgen's periodic table once and stored inside every checkpoint, so a
shipped model never depends on the installed pymatgen's data.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

MAX_Z = 94  # H..Pu: every element in the Materials Project training data

# (property, low, high, bins): values outside clip to the end bins; missing -> own bin.
BINNED = (
    ("X", 0.7, 4.0, 10),
    ("atomic_radius", 0.25, 2.6, 10),
    ("ionization_energy", 3.8, 25.0, 10),
    ("electron_affinity", -1.0, 3.7, 10),
    ("molar_volume", 4.0, 70.0, 10),
)
BLOCKS = ("s", "p", "d", "f")


def _property(el, name: str) -> float | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if name == "ionization_energy":
                value = el.ionization_energies[0] if el.ionization_energies else None
            else:
                value = getattr(el, name)
        except (AttributeError, ValueError, KeyError, IndexError, TypeError):
            return None
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _one_hot(index: int, size: int) -> list[float]:
    out = [0.0] * size
    out[index] = 1.0
    return out


def element_row(z: int) -> list[float]:
    """The k-hot vector of element ``z``."""
    from pymatgen.core import Element

    el = Element.from_Z(z)
    row = _one_hot(el.group - 1, 18) + _one_hot(el.row - 1, 7)
    row += _one_hot(BLOCKS.index(el.block), 4) if el.block in BLOCKS else [0.0] * 4
    for name, low, high, bins in BINNED:
        value = _property(el, name)
        if value is None:
            row += [0.0] * bins + [1.0]
            continue
        frac = (min(max(value, low), high) - low) / (high - low)
        row += _one_hot(min(int(frac * bins), bins - 1), bins) + [0.0]
    return row


def atom_feature_table() -> np.ndarray:
    """Rows 1..MAX_Z hold the elements' vectors; row 0 is unused (no element)."""
    rows = [element_row(z) for z in range(1, MAX_Z + 1)]
    table = np.zeros((MAX_Z + 1, len(rows[0])), dtype=np.float32)
    table[1:] = np.asarray(rows, dtype=np.float32)
    return table
