"""Design requests: "up to N structures of FORMULA with PROPERTY < VALUE unit", parsed.

A request in words (the paper's section 4.3 query and close variants) or in structured
form (``--formula --n --max-formation-energy``) becomes one :class:`DesignRequest`. A
sentence the parser cannot read is refused with examples of sentences it can.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from pymatgen.core import Composition, Element

from matcouple.errors import MatcoupleError


class RequestError(MatcoupleError, ValueError):
    """A design request that cannot be read or cannot be met; the message shows examples."""


EXAMPLES = (
    'Please generate up to 50 structures of Fe2O3 materials with a formation energy of '
    'less than 1 eV/atom',
    "generate 20 structures of TiO2 with formation energy below -2 eV/atom",
    "up to 10 structures of GaN with a band gap greater than 1.5 eV",
    "matcouple design --formula Fe2O3 --n 50 --max-formation-energy 1.0",
)

# Property name -> (canonical label, unit its value is stored in).
PROPERTIES: dict[str, tuple[str, str]] = {
    "formation energy": ("formation_energy_per_atom", "eV/atom"),
    "formation enthalpy": ("formation_energy_per_atom", "eV/atom"),
    "e_form": ("formation_energy_per_atom", "eV/atom"),
    "band gap": ("band_gap", "eV"),
    "bandgap": ("band_gap", "eV"),
    "gap": ("band_gap", "eV"),
}
OPERATORS: dict[str, str] = {
    "<": "<", "<=": "<=", "≤": "<=", ">": ">", ">=": ">=", "≥": ">=",
    "less than": "<", "lower than": "<", "smaller than": "<", "below": "<", "under": "<",
    "at most": "<=", "no more than": "<=", "not more than": "<=",
    "less than or equal to": "<=", "greater than": ">", "more than": ">", "higher than": ">",
    "larger than": ">", "above": ">", "over": ">", "at least": ">=", "no less than": ">=",
    "greater than or equal to": ">=",
}
UNITS = {"ev/atom": "eV/atom", "ev per atom": "eV/atom", "ev/at": "eV/atom",
         "mev/atom": "meV/atom", "ev": "eV", "mev": "meV"}

_NUMBER = r"[-+−]?\d+(?:\.\d+)?"
_OPS = "|".join(sorted((re.escape(o) for o in OPERATORS), key=len, reverse=True))
_PROPS = "|".join(sorted((re.escape(p) for p in PROPERTIES), key=len, reverse=True))
_UNITS = "|".join(sorted((re.escape(u) for u in UNITS), key=len, reverse=True))
_COUNT = re.compile(
    r"(?:up\s+to|at\s+most|no\s+more\s+than|generate|find|design|give\s+me|propose)?\s*"
    r"(?P<n>\d+)\s+(?:new\s+|novel\s+|unique\s+|distinct\s+|crystal\s+)*"
    r"(?:structures?|crystals?|candidates?|materials?)\s+(?:of|for|with\s+composition)\s+"
    r"(?P<formula>[A-Z][A-Za-z0-9().]*)", re.IGNORECASE)
_CONDITION = re.compile(
    rf"(?P<prop>{_PROPS})(?:\s+per\s+atom)?\s*(?:of|is|that\s+is|which\s+is|:)?\s*"
    rf"(?P<op>{_OPS})\s*(?P<value>{_NUMBER})\s*(?P<unit>{_UNITS})?(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """A property condition, in the unit the database stores (eV/atom or eV)."""

    label: str
    op: str
    value: float
    unit: str

    def met_by(self, value: float | None) -> bool:
        if value is None or value != value:  # NaN: nothing to compare
            return False
        return {"<": value < self.value, "<=": value <= self.value,
                ">": value > self.value, ">=": value >= self.value}[self.op]

    def describe(self) -> str:
        return f"{self.label} {self.op} {self.value:g} {self.unit}"

    def mongo_filter(self) -> dict[str, Any]:
        op = {"<": "$lt", "<=": "$lte", ">": "$gt", ">=": "$gte"}[self.op]
        return {f"labels.{self.label}.value": {op: self.value}}


@dataclass(frozen=True)
class DesignRequest:
    """What to design: ``n`` unique structures of ``formula`` that meet ``target``."""

    formula: str
    n: int
    target: Target
    text: str = ""

    @property
    def reduced_formula(self) -> str:
        return Composition(self.formula).reduced_formula

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reduced_formula": self.reduced_formula}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DesignRequest:
        return cls(formula=data["formula"], n=int(data["n"]), target=Target(**data["target"]),
                   text=data.get("text", ""))


def _examples() -> str:
    return "\n".join(f"  - {e}" for e in EXAMPLES)


def check_formula(formula: str) -> str:
    """The formula as given if pymatgen reads it and every element exists."""
    try:
        composition = Composition(formula)
    except Exception as exc:
        raise RequestError(f"cannot read the formula {formula!r}: {exc}") from exc
    for el in composition.elements:
        symbol = getattr(el, "symbol", str(el))
        if not Element.is_valid_symbol(symbol):
            raise RequestError(f"unknown element {symbol!r} in formula {formula!r}")
    if not composition.num_atoms:
        raise RequestError(f"the formula {formula!r} has no atoms")
    return formula


def _convert(value: float, unit: str, label: str) -> tuple[float, str]:
    """Value in the stored unit of ``label``; meV -> eV, and eV vs eV/atom checked."""
    stored = "eV/atom" if label == "formation_energy_per_atom" else "eV"
    if unit.startswith("meV"):
        value, unit = value / 1000.0, unit[1:]
    if label == "formation_energy_per_atom" and unit == "eV":
        unit = "eV/atom"  # "formation energy < 1 eV" is per atom in every database we read
    if unit != stored:
        raise RequestError(f"{label} is given in {stored}, not {unit}")
    return value, stored


def make_request(formula: str, n: int, *, label: str = "formation_energy_per_atom",
                 op: str = "<", value: float, unit: str | None = None,
                 text: str = "") -> DesignRequest:
    """A request from structured values (the CLI flags), checked."""
    if not isinstance(n, int) or n <= 0:
        raise RequestError(f"the number of structures must be a positive integer, got {n!r}")
    if op not in {"<", "<=", ">", ">="}:
        raise RequestError(f"unknown comparison {op!r}; use <, <=, > or >=")
    if label not in {lab for lab, _ in PROPERTIES.values()}:
        raise RequestError(f"unknown property {label!r}; use formation_energy_per_atom or "
                           "band_gap")
    unit = unit or ("eV/atom" if label == "formation_energy_per_atom" else "eV")
    value, unit = _convert(float(value), unit, label)
    return DesignRequest(formula=check_formula(formula), n=n,
                         target=Target(label=label, op=op, value=value, unit=unit), text=text)


def parse_request(text: str) -> DesignRequest:
    """Read a request sentence; :class:`RequestError` with examples when it cannot."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"empty design request. Examples:\n{_examples()}")
    clean = " ".join(text.replace("−", "-").replace("_", "").split())
    count = _COUNT.search(clean)
    if count is None:
        raise RequestError(
            f"cannot find 'N structures of FORMULA' in the request {text!r}. Examples:\n"
            f"{_examples()}")
    condition = _CONDITION.search(clean, count.end())
    if condition is None:
        raise RequestError(
            f"cannot find a property condition (formation energy or band gap, a comparison "
            f"and a value) in the request {text!r}. Examples:\n{_examples()}")
    label, default_unit = PROPERTIES[condition["prop"].lower()]
    unit = UNITS[condition["unit"].lower()] if condition["unit"] else default_unit
    formula = count["formula"].rstrip(".")
    return make_request(formula, int(count["n"]), label=label,
                        op=OPERATORS[" ".join(condition["op"].lower().split())],
                        value=float(condition["value"]), unit=unit, text=text)
