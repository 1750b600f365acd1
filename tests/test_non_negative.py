"""Values that cannot be negative are clipped at zero: the band gap of every crystal and
the formation energy of a crystal of one element (measured from its most stable phase)."""

import numpy as np
from pymatgen.core import Lattice, Structure
from torch_geometric.data import Data

from matcouple.surrogate.graph import structure_to_graph
from matcouple.surrogate.predict import ensemble_value_and_sigma, non_negative_rows
from matcouple.surrogate.value_blend import cross_fitted_weight, fit_value_blend

TARGETS = ("formation_energy_per_atom", "band_gap")


def _graphs() -> list:
    si = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    mgo = Structure(Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    g_si, g_mgo = structure_to_graph(si), structure_to_graph(mgo)
    # both kinds a predictor meets: PyG Data (cached graphs) and arrays (built on the fly)
    return [Data(z=g_si["z"], num_nodes=2), {"z": g_mgo["z"].numpy()},
            {"z": np.array([26, 26, 26])}]


def test_rows_that_cannot_be_negative():
    rows = non_negative_rows(_graphs(), (*TARGETS, "bulk_modulus"))
    assert rows.tolist() == [[True, True, False], [False, True, False], [True, True, False]]


def test_elemental_formation_energy_and_every_gap_are_clipped():
    point = np.array([[-0.3, -0.2], [-2.0, 1.0], [0.1, -0.5]])
    means = np.zeros((2, 3, 2))
    variances = np.zeros((2, 3, 2))
    value, _ = ensemble_value_and_sigma(means, variances, point, TARGETS, None,
                                        non_negative_rows(_graphs(), TARGETS))
    # Si and Fe: E_f >= 0; MgO's formation energy stays negative; every gap >= 0
    np.testing.assert_allclose(value, [[0.0, 0.0], [-2.0, 1.0], [0.1, 0.0]])
    # without rows: the band gap alone, as before
    value, _ = ensemble_value_and_sigma(means, variances, point, TARGETS)
    np.testing.assert_allclose(value, [[-0.3, 0.0], [-2.0, 1.0], [0.1, 0.0]])


def test_blend_fit_clips_the_rows_it_is_given():
    rng = np.random.default_rng(0)
    n = 200
    y = np.abs(rng.normal(size=n))
    y[::2] = -y[::2]  # half the rows may be negative, half not
    floor = np.arange(n) % 2 == 1
    point = y + rng.normal(scale=0.3, size=n)
    mean = y + rng.normal(scale=0.3, size=n)
    rows = cross_fitted_weight(point, mean, y, floor)
    whole = cross_fitted_weight(point, mean, y, False)
    own = np.where(floor, np.maximum(point, 0), point)
    assert rows["value_model_mae"] == float(np.abs(own - y).mean())
    assert rows["value_model_mae"] < whole["value_model_mae"]  # clipping only helps here
    weights, report = fit_value_blend(point[:, None], mean[None, :, None],
                                      np.zeros((1, n, 1)), y[:, None], ("e",),
                                      floor[:, None])
    assert report["e"] == rows and weights == [rows["ensemble_weight"]]
