"""The shipped Crysformer ensemble: physical sanity, the CLI, and PredictTask via rlaunch."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from matcouple.errors import MatcoupleError
from matcouple.store.connection import open_database, open_launchpad
from matcouple.surrogate.predict import SurrogatePredictor
from matcouple.workflows import prediction_workflow

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def predictor() -> SurrogatePredictor:
    """The default mode: the value model, sigma from 3 members x 8 MC-dropout passes."""
    return SurrogatePredictor.default()


@pytest.fixture(scope="module")
def fast_predictor() -> SurrogatePredictor:
    """Dropout off: deterministic, what --mc-samples 0 gives."""
    return SurrogatePredictor.default(mc_samples=0)


def test_shipped_models_are_calibrated_and_physical(predictor, silicon, rocksalt):
    assert predictor.calibrated and predictor.mode == "value4+ensemble3+mc8"
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])
    rows = {r.id: r for r in predictor.predict([("si", silicon), ("mgo", rocksalt),
                                                 ("nacl", nacl)])}
    # MP (GGA): Si E_f = 0 and gap ~0.6 eV; MgO E_f ~ -3.0 eV/atom, gap ~4.5 eV;
    # NaCl E_f ~ -2.1 eV/atom, gap ~5 eV. The model's val MAE is ~0.1 eV/atom / ~0.33 eV.
    assert abs(rows["si"].values["formation_energy_per_atom"]) < 0.4
    assert rows["mgo"].values["formation_energy_per_atom"] < -2.0
    assert rows["nacl"].values["formation_energy_per_atom"] < -1.2
    assert rows["mgo"].values["band_gap"] > 2.5 and rows["nacl"].values["band_gap"] > 2.5
    assert rows["si"].values["band_gap"] < 2.0
    assert all(r.sigmas[t] > 0 for r in rows.values() for t in predictor.targets)


def test_batch_size_does_not_change_predictions(fast_predictor, silicon, rocksalt):
    """The CPU default batch (small, for cache) and a big one give the same numbers, and
    graphs of different sizes batched together do not leak into each other."""
    predictor = fast_predictor
    assert predictor.calibrated and predictor.mode == "value2"
    # the fast pair reads 16 neighbours, so that is all its graphs are built with (the
    # card's third value model, skipped in this mode, reads 24)
    assert (predictor.mode_spec.k, predictor.spec.k) == (16, 24)
    items = [(f"s{k}", s) for k, s in enumerate([silicon, rocksalt, silicon * (2, 1, 1),
                                                  rocksalt * (1, 2, 2), silicon] * 3)]
    assert predictor.default_batch_size == 16  # CPU in tests
    small = predictor.predict(items, batch_size=1)
    default = predictor.predict(items)
    big = predictor.predict(items, batch_size=256)
    for a, b, c in zip(small, default, big, strict=True):
        for t in predictor.targets:
            assert a.values[t] == pytest.approx(b.values[t], abs=1e-5)
            assert a.values[t] == pytest.approx(c.values[t], abs=1e-5)
            assert a.sigmas[t] == pytest.approx(c.sigmas[t], abs=1e-5)
    # supercells are the same crystal: same prediction (float32 sums: 1e-3)
    for k in (0, 2, 4):
        t = "formation_energy_per_atom"
        assert default[k].values[t] == pytest.approx(default[0].values[t], abs=1e-3)


def test_symmetric_crystals_do_not_depend_on_orientation_or_cell(fast_predictor, silicon,
                                                                 rocksalt):
    """Site symmetry zeroes the l>0 features of these crystals; in float32 they are
    round-off, which the norm layers once blew up to O(1) (a random rotation moved the
    E_f of 15% of the first 300 val crystals by > 0.01 eV/atom, diamond Si by 0.03)."""
    from scipy.spatial.transform import Rotation

    rutile = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.59, 2.96),
                                       ["Ti", "O"], [[0, 0, 0], [0.305, 0.305, 0]])
    perovskite = Structure(Lattice.cubic(3.905), ["Sr", "Ti", "O", "O", "O"],
                           [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                            [0, 0.5, 0.5]])
    items = []
    for name, s in [("si", silicon), ("mgo", rocksalt), ("rutile", rutile),
                    ("srtio3", perovskite)]:
        items.append((name, s))
        for seed in range(3):
            rot = Rotation.random(random_state=seed).as_matrix()
            items.append((name, Structure(Lattice(s.lattice.matrix @ rot.T), s.species,
                                          s.frac_coords)))
        items.append((name, s.get_primitive_structure()))
        items.append((name, s * (2, 1, 1)))
    rows = fast_predictor.predict(items)
    for name in ("si", "mgo", "rutile", "srtio3"):
        group = [r for r in rows if r.id == name]
        for t in fast_predictor.targets:
            values = [r.values[t] for r in group]
            assert max(values) - min(values) < 1e-4, (name, t, values)


def test_mc_dropout_is_seeded_and_leaves_the_callers_random_state(predictor, fast_predictor,
                                                                   silicon, rocksalt):
    """MC predictions repeat exactly for the same inputs, do not consume the caller's
    random numbers, differ from dropout-off only by MC noise, and carry their own
    calibration (a different scale from the dropout-off mode)."""
    import torch

    items = [("si", silicon), ("mgo", rocksalt), ("si2", silicon * (2, 1, 1))]
    state = torch.random.get_rng_state()
    first = predictor.predict(items)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = predictor.predict(items)
    off = fast_predictor.predict(items)
    t = "formation_energy_per_atom"
    for a, b, c in zip(first, again, off, strict=True):
        assert a.values == b.values and a.sigmas == b.sigmas
        assert abs(a.values[t] - c.values[t]) < 0.15
        assert a.sigmas[t] > 0
    assert predictor.scales[t] != pytest.approx(fast_predictor.scales[t], rel=0.05)
    with pytest.raises(MatcoupleError, match="mc_samples"):
        SurrogatePredictor.default(mc_samples=1)


def test_cli_predict_files_folder_and_csv(tmp_path, silicon, rocksalt):
    folder = tmp_path / "in"
    folder.mkdir()
    silicon.to(filename=str(folder / "si.cif"))
    (folder / "broken.cif").write_text("data_broken\n")
    table = tmp_path / "t.csv"
    pd.DataFrame([{"material_id": "mp-mgo", "cif": rocksalt.to(fmt="cif")},
                  {"material_id": "mp-xx", "cif": silicon.to(fmt="cif").replace("Si", "Xx")},
                  ]).to_csv(table, index=False)
    out = tmp_path / "pred.csv"
    proc = subprocess.run([sys.executable, "-m", "matcouple.cli", "predict", str(folder),
                           str(table), "--output", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"si.cif", "broken.cif", "mp-mgo", "mp-xx"}
    assert float(rows["mp-mgo"]["formation_energy_per_atom"]) < -2.0
    assert float(rows["mp-mgo"]["band_gap_sigma"]) > 0
    assert "malformed CIF" in rows["broken.cif"]["error"]
    assert "unknown element" in rows["mp-xx"]["error"]
    assert rows["si.cif"]["model_version"] == SurrogatePredictor.default().version


def test_predict_task_through_rlaunch(launchpad_config, cli_env, tmp_path, silicon,
                                      rocksalt):
    wf = prediction_workflow([("si", silicon), ("mgo", rocksalt)], batch_size=1,
                             launchpad_file=str(launchpad_config.path), run="t")
    open_launchpad(launchpad_config).add_wf(wf)
    rlaunch = shutil.which("rlaunch", path=str(BIN)) or "rlaunch"
    proc = subprocess.run([rlaunch, "-l", str(launchpad_config.path), "rapidfire"],
                          cwd=tmp_path, env=cli_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    docs = {d["structure_id"]: d for d in open_database(launchpad_config).predictions.find()}
    assert set(docs) == {"si", "mgo"}
    mgo = docs["mgo"]["predictions"]["formation_energy_per_atom"]
    assert mgo["value"] < -2.0 and mgo["sigma"] > 0
    assert docs["si"]["model_version"] == SurrogatePredictor.default().version
    assert docs["si"]["uncertainty_mode"] == "value4+ensemble3+mc8" and docs["si"]["calibrated"]


def test_fused_inference_path_matches_e3nn_on_shipped_models(fast_predictor, silicon,
                                                             rocksalt):
    """The shipped members give the same numbers through the fused value path as through
    e3nn, in float64. (In float32 both paths sit up to ~1e-2 from the float64 value on
    symmetric cells such as Si: the models amplify rounding noise, see Settings.)"""
    import copy

    import torch

    items = [silicon, rocksalt, silicon * (2, 1, 1)]
    graphs = [fast_predictor.graph(s) for s in items]
    for dtype, rtol in ((torch.float64, 1e-6),):
        for model in fast_predictor.models:
            m = copy.deepcopy(model).to(dtype)
            outs = []
            for fused in (True, False):
                m.set_fused(fused)
                with torch.inference_mode():
                    outs.append(torch.cat([
                        m(g.z, g.edge_index, g.edge_vec.to(dtype),
                          torch.zeros(g.num_nodes, dtype=torch.long), 1) for g in graphs]))
            torch.testing.assert_close(outs[0], outs[1], rtol=rtol, atol=rtol)


def test_models_built_without_einsum_search_give_the_same_numbers(silicon, rocksalt):
    """The predictor's CPU models skip e3nn's einsum-order search (half the load time):
    through e3nn's own path, in float64, a shipped member and value model give the numbers
    of the default build, and e3nn's global switch is left as it was."""
    import e3nn
    import torch

    from matcouple.settings import get_settings
    from matcouple.surrogate.graph import GraphSpec, structure_to_graph
    from matcouple.surrogate.predict import load_model

    folder = Path(get_settings().surrogate_model_dir)
    before = e3nn.get_optimization_defaults()
    for name in ("crysformer-mp2018-s0.pt", "value-crysformer-wide-k24.pt"):
        outs = []
        for optimize in (True, False):
            model, blob = load_model(folder / name, torch.device("cpu"),
                                     optimize_einsums=optimize)
            assert e3nn.get_optimization_defaults() == before
            model = model.to(torch.float64).set_fused(False)
            spec = GraphSpec(**blob["graph_spec"])
            with torch.inference_mode():
                for s in (silicon, rocksalt):
                    g = structure_to_graph(s, spec)
                    outs.append(model(g["z"], g["edge_index"], g["edge_vec"].to(torch.float64),
                                      torch.zeros(len(g["z"]), dtype=torch.long), 1))
        half = len(outs) // 2
        torch.testing.assert_close(torch.cat(outs[:half]), torch.cat(outs[half:]),
                                   rtol=1e-9, atol=1e-9)


def test_a_mode_builds_only_the_models_it_runs(predictor, fast_predictor, silicon, rocksalt):
    """A predictor reads every model file at once but builds a model when a mode first runs
    it: the fast mode builds the card's fast value models only; switching to the default
    mode builds the rest and gives the numbers of a predictor made in that mode."""
    import numpy as np

    card_fast = int(fast_predictor.card["fast_value_count"])
    fresh = SurrogatePredictor.default(mc_samples=0)
    assert fresh.built_models == 0 and fresh.mode == f"value{card_fast}"
    fast_rows = fresh.predict([("si", silicon), ("nacl", rocksalt)])
    assert fresh.built_models == card_fast
    assert [r.values for r in fast_rows] == [r.values for r in fast_predictor.predict(
        [("si", silicon), ("nacl", rocksalt)])]
    fresh.mc_samples = predictor.mc_samples
    rows = fresh.predict([("si", silicon), ("nacl", rocksalt)])
    assert fresh.built_models == len(fresh.blobs) + len(fresh.card["value_models"])
    for a, b in zip(rows, predictor.predict([("si", silicon), ("nacl", rocksalt)]),
                    strict=True):
        assert a.values == b.values
        np.testing.assert_allclose(list(a.sigmas.values()), list(b.sigmas.values()),
                                   rtol=1e-6)


def test_mc_passes_in_threads_equal_the_sequential_train_mode_passes(predictor, silicon,
                                                                      rocksalt):
    """MC passes replay masks drawn up front and run side by side; the numbers are those
    of the straightforward way: train mode, global RNG seeded once, one pass after the
    other (members in order, batches in order), each member on graphs built for its own k
    (the predictor's graphs have the most neighbours any of its models reads)."""
    import numpy as np
    import torch
    from torch_geometric.data import Batch

    from matcouple.surrogate.graph import GraphSpec

    items = [silicon, rocksalt, silicon * (2, 1, 1), rocksalt * (1, 1, 2), silicon] * 2
    graphs = [predictor.graph(s) for s in items]
    means, variances = predictor.member_outputs(graphs, batch_size=4)
    spec = GraphSpec(**predictor.blobs[0]["graph_spec"])
    assert all(GraphSpec(**b["graph_spec"]) == spec for b in predictor.blobs)
    assert spec.k < predictor.spec.k  # the members read a cut of the predictor's graphs
    members_only = SurrogatePredictor.from_models(predictor.models, predictor.blobs,
                                                  device=predictor.device, mc_samples=8)
    own = [members_only.graph(s) for s in items]  # built with the members' own k
    batches = [Batch.from_data_list(own[i:i + 4]) for i in range(0, len(own), 4)]
    ref_means, ref_vars = [], []
    with torch.random.fork_rng():
        torch.manual_seed(0)  # Settings.surrogate_mc_seed
        for model, blob in zip(predictor.models, predictor.blobs, strict=True):
            m_out, v_out = [], []
            model.train()
            try:
                with torch.inference_mode():
                    for b in batches:
                        s = torch.stack([model(b.z, b.edge_index, b.edge_vec, b.batch,
                                               b.num_graphs) for _ in range(8)])
                        s = s * blob["norm_std"] + blob["norm_mean"]
                        m_out.append(s.mean(0))
                        v_out.append(s.var(0, unbiased=False))
            finally:
                model.eval()
            ref_means.append(torch.cat(m_out).numpy())
            ref_vars.append(torch.cat(v_out).numpy())
    np.testing.assert_allclose(means, np.stack(ref_means), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(variances, np.stack(ref_vars), rtol=1e-5, atol=1e-9)


def test_graph_workers_match_the_in_process_path(fast_predictor, silicon, rocksalt):
    """``workers`` > 1 sends crystals to graph-building processes as plain arrays
    (compact_crystal); rows, values and errors must be those of the in-process path, for
    ions, disordered cells and elements the embedding lacks too."""
    from matcouple.surrogate.graph import (
        compact_crystal,
        crystal_from_compact,
        structure_to_graph,
    )

    ionic = rocksalt.copy()
    ionic.add_oxidation_state_by_element({"Mg": 2, "O": -2})
    disordered = silicon.copy()
    disordered.replace_species({"Si": {"Si": 0.5, "Ge": 0.5}})
    uncovered = Structure(Lattice.cubic(5.0), ["Og", "Si"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    pool = [silicon, rocksalt, ionic, disordered, uncovered, silicon * (2, 1, 1)]
    items = [(f"s{k}", pool[k % len(pool)]) for k in range(70)]  # > 64: the worker path
    for s in pool[:3]:  # ordered: the same lattice, atoms and order, so the same graph
        graph, back = structure_to_graph(s), structure_to_graph(
            crystal_from_compact(compact_crystal(s)))
        assert all(bool((graph[k] == back[k]).all()) for k in graph)
    serial = fast_predictor.predict(items, workers=1)
    parallel = fast_predictor.predict(items, workers=2)
    assert "disordered" in serial[3].error and "not covered" in serial[4].error
    assert not any(r.error for k, r in enumerate(serial) if k % len(pool) not in (3, 4))
    for a, b in zip(serial, parallel, strict=True):
        assert (a.id, a.error) == (b.id, b.error)
        assert a.values == b.values and a.sigmas == b.sigmas
