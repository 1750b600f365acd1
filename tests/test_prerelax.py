"""Guarded CHGNet pre-relaxation of generated crystals (matcouple.directive.prerelax)."""

from __future__ import annotations

import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from matcouple.directive.prerelax import PreRelaxError, PreRelaxMaker, prerelax_structures

pytest.importorskip("chgnet", reason="the [mlip] extra is not installed")


def _nacl(a: float) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_a_squeezed_cell_expands_and_keeps_its_space_group():
    squeezed = _nacl(5.45)  # CHGNet's equilibrium is 5.68 A: 1.135 x the volume
    result = PreRelaxMaker(cell_steps=120).relax(squeezed)
    assert result.stage == "cell" and not result.reason
    assert 1.1 < result.volume_ratio < 1.17
    assert result.structure.volume == pytest.approx(squeezed.volume * result.volume_ratio)
    assert SpacegroupAnalyzer(result.structure, symprec=0.01).get_space_group_number() == 225
    assert result.energy_per_atom is not None and result.steps > 0


def test_the_volume_guard_keeps_the_fixed_cell_stage():
    swollen = _nacl(6.6)  # equilibrium is 0.72 x this volume: below the default 0.75
    swollen.perturb(0.05, min_distance=0.01)  # something for stage 1 to do
    result = PreRelaxMaker(cell_steps=200).relax(swollen)
    assert result.stage == "positions"
    assert "volume bounds" in result.reason
    assert result.volume_ratio == pytest.approx(1.0)  # the stage-1 (fixed-cell) structure
    assert result.structure.lattice.abc == pytest.approx(swollen.lattice.abc)


def test_atoms_on_top_of_each_other_are_returned_untouched():
    crowded = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.1, 0, 0]])
    result = PreRelaxMaker(min_distance=0.5).relax(crowded)
    assert result.stage == "input" and "closer than 0.5" in result.reason
    assert result.structure == crowded


def test_engine_none_and_unknown_engines():
    s = _nacl(5.6)
    (unchanged,) = prerelax_structures([s], "none")
    assert unchanged.structure is s and unchanged.stage == "input"
    with pytest.raises(PreRelaxError, match="unknown pre-relaxation engine 'mace'"):
        prerelax_structures([s], "mace")
