"""Training mechanics on CPU with a tiny model on the CI subset: resumable, seeded, safe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch_geometric.data import Batch

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.surrogate.atom_features import atom_feature_table
from matcouple.surrogate.data import load_graphs
from matcouple.surrogate.model import Crysformer, CrysformerConfig
from matcouple.surrogate.predict import SurrogatePredictor
from matcouple.surrogate.train import (
    TrainConfig,
    _init_from,
    export_model,
    parse_target_weights,
    train,
)

CI = get_settings().data_dir / get_settings().datasets["mp2018-ci"]
pytestmark = pytest.mark.skipif(not CI.exists(), reason="data sets not present")
TINY = {"scalars": 8, "vectors": 4, "tensors": 4, "layers": 1, "heads": 4, "rbf": 8}


def _cfg(**kw) -> TrainConfig:
    base = dict(data=str(CI), split_column="ci_split", epochs=3, batch_size=8, lr=3e-3,
                limit_train=24, model=TINY, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_seamless_and_seeded(tmp_path):
    full = train(_cfg(), tmp_path / "a.pt", progress=False, workers=1)
    part = train(_cfg(), tmp_path / "b.pt", progress=False, workers=1, chunk_epochs=2)
    assert part["epoch"] == 2
    # as if the first chunk had run an hour: the log's clock runs on from there
    saved = torch.load(tmp_path / "b.pt", weights_only=True)
    saved["history"][-1]["elapsed_s"] = 3600.0
    torch.save(saved, tmp_path / "b.pt")
    resumed = train(_cfg(), tmp_path / "b.pt", progress=False, workers=1)
    assert resumed["epoch"] == 3
    assert [h["train_loss"] for h in full["history"]] == pytest.approx(
        [h["train_loss"] for h in resumed["history"]], rel=1e-5)
    clock = [h["elapsed_s"] for h in resumed["history"]]
    assert clock[1] == 3600.0
    assert clock[2] > 3600.0 + resumed["history"][2]["train_s"]
    state = torch.load(tmp_path / "a.pt", weights_only=True)  # safe loading works
    assert state["data_hash"] and state["train_config"]["seed"] == 7
    assert full["history"][-1]["train_loss"] < full["history"][0]["train_loss"]


def test_resume_may_switch_to_fused_tensor_products(tmp_path):
    """Fused TPs are a speed choice, not a model choice: a run resumed with them on takes
    the same steps as the e3nn run (float32 rounding apart) and records the switch."""
    full = train(_cfg(fused_tp=False), tmp_path / "a.pt", progress=False, workers=1)
    train(_cfg(fused_tp=False), tmp_path / "b.pt", progress=False, workers=1, chunk_epochs=2)
    resumed = train(_cfg(fused_tp=True), tmp_path / "b.pt", progress=False, workers=1)
    assert resumed["train_config"]["fused_tp"] is True
    assert [h["train_loss"] for h in full["history"]] == pytest.approx(
        [h["train_loss"] for h in resumed["history"]], rel=1e-4)


def test_export_and_predict_with_two_members(tmp_path, silicon):
    for seed in (1, 2):
        train(_cfg(seed=seed, epochs=1), tmp_path / f"c{seed}.pt", progress=False, workers=1)
        export_model(tmp_path / f"c{seed}.pt", tmp_path / f"m{seed}.pt")
    predictor = SurrogatePredictor([tmp_path / "m1.pt", tmp_path / "m2.pt"])
    rows = predictor.predict([("si", silicon), ("bad", ValueError("unreadable"))])
    assert rows[1].error == "unreadable" and rows[0].error is None
    assert rows[0].sigmas["band_gap"] > 0 and rows[0].values["band_gap"] >= 0
    assert predictor.mode == "ensemble2+mc8" and not predictor.calibrated  # no card
    with pytest.raises(MatcoupleError, match="needs >= 2"):
        SurrogatePredictor([tmp_path / "m1.pt"], mc_samples=0)
    mc = SurrogatePredictor([tmp_path / "m1.pt"], mc_samples=2)
    assert mc.mode == "ensemble1+mc2"
    with pytest.raises(MatcoupleError, match="not found"):
        SurrogatePredictor([tmp_path / "nope.pt", tmp_path / "m1.pt"])


def test_nan_labels_and_bad_rows_are_skipped_with_reasons(tmp_path, silicon):
    path = tmp_path / "t.csv"
    pd.DataFrame([
        {"material_id": "ok", "cif": silicon.to(fmt="cif"), "e": 0.1},
        {"material_id": "nan", "cif": silicon.to(fmt="cif"), "e": float("nan")},
        {"material_id": "junk", "cif": "not a cif", "e": 1.0},
    ]).to_csv(path, index=False)
    gs = load_graphs(Path(path), ("e",), progress=False, workers=1)
    assert [g.material_id for g in gs.graphs] == ["ok"]
    reasons = dict(gs.skipped)
    assert "NaN" in reasons["nan"] and "malformed" in reasons["junk"]


def test_transfer_learning_to_a_new_target(tmp_path):
    train(_cfg(epochs=1), tmp_path / "base.pt", progress=False, workers=1)
    base = torch.load(tmp_path / "base.pt", weights_only=True)["best_state_dict"]
    new = Crysformer(CrysformerConfig(**TINY, targets=("heat_ref",)),
                     torch.from_numpy(atom_feature_table()))
    _init_from(new, tmp_path / "base.pt")
    own = new.state_dict()
    assert torch.equal(own["blocks.0.lin_val.weight"], base["blocks.0.lin_val.weight"])
    assert own["head.3.weight"].shape[0] == 1  # a fresh head for the new target
    perov = get_settings().data_dir / get_settings().datasets["perov5"]
    cfg = TrainConfig(data=str(perov), targets=("heat_ref",), split_column="split",
                      train_split="val", val_split="test", epochs=1, batch_size=16,
                      limit_train=32, model=TINY)
    tl = train(cfg, tmp_path / "tl.pt", init_from=tmp_path / "base.pt", progress=False,
               workers=1)
    assert tl["epoch"] == 1 and tl["model_config"]["targets"] == ["heat_ref"]
    # a new target is scaled by the new set's labels, not by an unrelated source target
    heat = torch.cat([g.y for g in load_graphs(
        perov, ("heat_ref",), split_column="split", split="val", limit=32, workers=1,
        progress=False).graphs])
    assert float(tl["norm_mean"][0]) == pytest.approx(float(heat.mean()), rel=1e-5)


def test_graph_cache_round_trip_is_exact(tmp_path, monkeypatch):
    from matcouple.surrogate import data

    targets = ("formation_energy_per_atom", "band_gap")
    kw = dict(split_column="ci_split", split="val", limit=20, workers=1, progress=False)
    fresh = load_graphs(CI, targets, **kw)
    built = load_graphs(CI, targets, cache_dir=tmp_path, **kw)
    monkeypatch.setattr(data, "_MEMO", {})  # force a read of the file written above
    cached = load_graphs(CI, targets, cache_dir=tmp_path, **kw)
    assert len(list(tmp_path.glob("graphs-v2-*.pt"))) == 1
    assert cached is not built and len(cached.graphs) == len(fresh.graphs) == 20
    for a, b in zip(fresh.graphs, cached.graphs, strict=True):
        assert a.material_id == b.material_id and a.num_nodes == b.num_nodes
        for key in ("z", "edge_index", "edge_vec", "y"):
            assert torch.equal(a[key], b[key]), key
    assert load_graphs(CI, targets, cache_dir=tmp_path, **kw) is cached  # in-process memo


def test_step_timing_sizes_a_schedule_that_fits_the_budget(tmp_path):
    from matcouple.surrogate.experiments import epochs_within, seconds_per_step

    step_s, n_train = seconds_per_step(_cfg(), device="cpu", cache_dir=tmp_path, steps=4,
                                       skip=1)
    assert n_train == 24 and 0 < step_s < 30
    epochs = epochs_within(60 * step_s, n_train, 8, step_s)  # 3 steps per epoch
    assert epochs == int(60 / (3 * 1.15))
    assert epochs_within(0.0, n_train, 8, step_s) == 1  # always at least one


def test_training_defaults_come_from_settings(monkeypatch):
    from dataclasses import replace

    import matcouple.surrogate.train as train_module

    custom = replace(get_settings(), surrogate_train_lr=1.25e-3, surrogate_train_batch_size=48,
                     surrogate_train_fused_tp=False, surrogate_train_weight_decay=0.03,
                     surrogate_train_strain_noise=0.005,
                     surrogate_train_displacement_noise=0.01)
    monkeypatch.setattr(train_module, "get_settings", lambda: custom)
    cfg = TrainConfig(data=str(CI))
    assert (cfg.lr, cfg.batch_size, cfg.fused_tp) == (1.25e-3, 48, False)
    assert (cfg.weight_decay, cfg.strain_noise, cfg.displacement_noise) == (0.03, 0.005, 0.01)


def test_model_predictions_of_one_exported_model(tmp_path):
    from matcouple.surrogate.experiments import model_predictions
    from matcouple.surrogate.graph import GraphSpec

    train(_cfg(epochs=1), tmp_path / "c.pt", progress=False, workers=1)
    export_model(tmp_path / "c.pt", tmp_path / "m.pt")
    spec = GraphSpec()
    graphs = load_graphs(CI, ("formation_energy_per_atom", "band_gap"),
                         split_column="ci_split", split="val", spec=spec, limit=10,
                         progress=False).graphs
    values = model_predictions(tmp_path / "m.pt", graphs, device="cpu", spec=spec,
                               batch_size=4)
    pair = SurrogatePredictor([tmp_path / "m.pt"] * 2, device="cpu", mc_samples=0)
    members, _ = pair.member_outputs(graphs, batch_size=3)
    assert values.shape == (len(graphs), 2)
    assert values == pytest.approx(members[0], abs=1e-5)
    with pytest.raises(MatcoupleError, match="other graph settings"):
        model_predictions(tmp_path / "m.pt", graphs, device="cpu", spec=GraphSpec(k=8))


def test_model_card_calibrates_each_mode_with_and_without_a_value_model(tmp_path):
    from matcouple.surrogate.card import build_model_card

    folder = tmp_path / "models"
    for seed, dropout, name in ((1, 0.1, "crysformer-t-s1.pt"), (2, 0.1, "crysformer-t-s2.pt"),
                                (3, 0.0, "value-t.pt")):
        cfg = _cfg(epochs=1, seed=seed, model={**TINY, "dropout": dropout})
        train(cfg, tmp_path / f"{seed}.ckpt", progress=False, workers=1)
        export_model(tmp_path / f"{seed}.ckpt", folder / name)
    card = build_model_card(folder, CI, split_column="ci_split", mc_samples=2, device="cpu",
                            value_model="value-t.pt", progress=False)
    assert card["members"] == ["crysformer-t-s1.pt", "crysformer-t-s2.pt"]
    assert card["value_model"] == "value-t.pt"
    assert set(card["calibration"]) == {"ensemble2", "ensemble2+mc2", "value+ensemble2",
                                        "value+ensemble2+mc2"}
    assert card["default_mode"] == "value+ensemble2+mc2"
    predictor = SurrogatePredictor.default(model_dir=folder, device="cpu", mc_samples=2)
    assert predictor.mode == "value+ensemble2+mc2" and predictor.calibrated
    value_only = SurrogatePredictor([folder / "value-t.pt"] * 2, device="cpu", mc_samples=0)
    graphs = load_graphs(CI, ("formation_energy_per_atom", "band_gap"),
                         split_column="ci_split", split="val", spec=predictor.spec,
                         progress=False).graphs
    truth = torch.cat([g.y for g in graphs]).numpy()
    point = value_only.member_outputs(graphs)[0][0]
    ef = card["calibration"]["value+ensemble2"]["formation_energy_per_atom"]
    assert ef["value_model_mae"] == pytest.approx(
        float(np.nanmean(np.abs(point[:, 0] - truth[:, 0]))), rel=1e-5)
    # the step towards the ensemble is fitted on these rows with 0 among the choices
    assert 0.0 <= ef["ensemble_weight"] <= 0.5
    assert card["val_mae"]["value+ensemble2"]["formation_energy_per_atom"] <= \
        ef["value_model_mae"] + 1e-9


def test_init_from_a_shallower_model_grows_it_without_changing_its_predictions(tmp_path):
    train(_cfg(epochs=1), tmp_path / "base.pt", progress=False, workers=1)
    blob = torch.load(tmp_path / "base.pt", weights_only=True)
    table = torch.from_numpy(atom_feature_table())
    base = Crysformer(CrysformerConfig(**TINY), table)
    base.load_state_dict(blob["best_state_dict"])
    deeper = Crysformer(CrysformerConfig(**{**TINY, "layers": 3}), table)
    _init_from(deeper, tmp_path / "base.pt")
    graphs = load_graphs(CI, ("formation_energy_per_atom", "band_gap"),
                         split_column="ci_split", split="val", limit=12, workers=1,
                         progress=False).graphs
    b = Batch.from_data_list(graphs)
    args = (b.z, b.edge_index, b.edge_vec, b.batch, b.num_graphs)
    base.eval()
    deeper.eval()
    with torch.no_grad():
        assert torch.allclose(deeper(*args), base(*args), atol=1e-6)
    assert float(deeper.blocks[2].lin_out.weight.detach().abs().sum()) == 0.0
    # training then uses the added blocks: their output projections leave zero
    grown = train(_cfg(epochs=1, model={**TINY, "layers": 3}), tmp_path / "g.pt",
                  init_from=tmp_path / "base.pt", progress=False, workers=1)
    assert grown["model_config"]["layers"] == 3
    assert float(grown["state_dict"]["blocks.2.lin_out.weight"].abs().sum()) > 0.0


def test_a_target_weighted_zero_teaches_its_head_nothing(tmp_path):
    train(_cfg(epochs=1), tmp_path / "base.pt", progress=False, workers=1)
    base = torch.load(tmp_path / "base.pt", weights_only=True)["best_state_dict"]
    run = train(_cfg(epochs=1, target_weights=(1.0, 0.0), weight_decay=0.0),
                tmp_path / "ef.pt", init_from=tmp_path / "base.pt", progress=False, workers=1)
    head, bias = run["state_dict"]["head.3.weight"], run["state_dict"]["head.3.bias"]
    assert torch.equal(head[1], base["head.3.weight"][1])  # band gap: no gradient
    assert torch.equal(bias[1], base["head.3.bias"][1])
    assert not torch.equal(head[0], base["head.3.weight"][0])  # E_f trained
    assert run["train_config"]["target_weights"] == [1.0, 0.0]
    resumed = train(_cfg(epochs=2), tmp_path / "ef.pt", progress=False, workers=1)
    assert torch.equal(resumed["state_dict"]["head.3.weight"][1], base["head.3.weight"][1])


def test_target_weights_are_checked_and_rescaled_to_mean_one():
    assert parse_target_weights("3,1") == (3.0, 1.0) and parse_target_weights("") == ()
    assert _cfg(target_weights=(3.0, 1.0)).loss_weights().tolist() == [1.5, 0.5]
    assert _cfg().loss_weights().tolist() == [1.0, 1.0]
    for bad in ((1.0,), (-1.0, 1.0), (0.0, 0.0)):
        with pytest.raises(MatcoupleError, match="target weights"):
            _cfg(target_weights=bad)
    with pytest.raises(MatcoupleError, match="target weights"):
        parse_target_weights("2,x")


def test_init_from_builds_the_named_models_architecture_and_refuses_to_drop_weights(
        tmp_path):
    """`--init-from` a model without `--model` options fine-tunes that model (here wider
    than the defaults, with the element embedding) on its own target scale, so it starts
    from the model's predictions even on a small set; options that leave some of its
    weights without a place are an error, not a silently different starting network."""
    wide = {**TINY, "scalars": 12, "element_embedding": True}
    train(_cfg(epochs=1, model=wide), tmp_path / "base.pt", progress=False, workers=1)
    source = torch.load(tmp_path / "base.pt", weights_only=True)
    base = source["best_state_dict"]
    # 6 rows have other label statistics than the 24 the source was trained on
    still = train(_cfg(epochs=1, model={}, lr=1e-12, ema_decay=0.0, limit_train=6),
                  tmp_path / "ft.pt", init_from=tmp_path / "base.pt", progress=False,
                  workers=1)
    assert torch.equal(still["norm_mean"], source["norm_mean"])
    assert torch.equal(still["norm_std"], source["norm_std"])
    assert still["model_config"]["scalars"] == 12
    assert still["model_config"]["element_embedding"] is True
    assert still["train_config"]["model"]["scalars"] == 12  # saved for a resume
    for name, weight in base.items():  # at a vanishing lr it starts from every weight
        assert torch.allclose(still["state_dict"][name], weight, atol=1e-8), name
    resumed = train(_cfg(epochs=2, model={}, limit_train=6), tmp_path / "ft.pt",
                    progress=False, workers=1)
    assert resumed["epoch"] == 2 and resumed["model_config"]["scalars"] == 12
    with pytest.raises(MatcoupleError, match="element_embed.weight"):
        train(_cfg(epochs=1, model={**wide, "element_embedding": False}), tmp_path / "x.pt",
              init_from=tmp_path / "base.pt", progress=False, workers=1)
    with pytest.raises(MatcoupleError, match=r"do not fit the model being trained \(blocks"):
        train(_cfg(epochs=1, model={**wide, "scalars": 16}), tmp_path / "y.pt",
              init_from=tmp_path / "base.pt", progress=False, workers=1)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()
    with pytest.raises(MatcoupleError, match="no such file"):
        train(_cfg(epochs=1), tmp_path / "z.pt", init_from=tmp_path / "nope.pt",
              progress=False, workers=1)


def test_model_card_fits_a_value_pair_and_its_fast_mode_skips_the_members(tmp_path):
    from matcouple.surrogate.card import build_model_card
    from matcouple.surrogate.uncertainty import with_floor

    folder = tmp_path / "models"
    # value-u is trained on 14 neighbours, the rest on 12: one graph serves them all
    for seed, dropout, name, k in ((1, 0.1, "crysformer-t-s1.pt", 12),
                                   (2, 0.1, "crysformer-t-s2.pt", 12),
                                   (3, 0.0, "value-t.pt", 12), (4, 0.0, "value-u.pt", 14)):
        cfg = _cfg(epochs=1, seed=seed, model={**TINY, "dropout": dropout}, graph={"k": k})
        train(cfg, tmp_path / f"{seed}.ckpt", progress=False, workers=1)
        export_model(tmp_path / f"{seed}.ckpt", folder / name)
    card = build_model_card(folder, CI, split_column="ci_split", mc_samples=2, device="cpu",
                            value_model=["value-t.pt", "value-u.pt"], progress=False)
    assert card["members"] == ["crysformer-t-s1.pt", "crysformer-t-s2.pt"]
    assert card["value_models"] == ["value-t.pt", "value-u.pt"] and "value_model" not in card
    assert set(card["calibration"]) == {"ensemble2", "ensemble2+mc2", "value2",
                                        "value2+ensemble2+mc2"}
    assert card["default_mode"] == "value2+ensemble2+mc2"
    assert card["graph_spec"]["k"] == 14 and card["model_graph_k"] == {
        "crysformer-t-s1.pt": 12, "crysformer-t-s2.pt": 12, "value-t.pt": 12, "value-u.pt": 14}
    for t in ("formation_energy_per_atom", "band_gap"):
        w = card["value_weights"][t]
        assert len(w) == 2 and sum(w) == pytest.approx(1.0) and min(w) >= 0
        assert card["calibration"]["value2"][t]["floor"] >= 0
        assert "floor" not in card["calibration"]["value2+ensemble2+mc2"][t]
    fast = SurrogatePredictor.default(model_dir=folder, device="cpu", mc_samples=0)
    assert fast.mode == "value2" and fast.calibrated
    graphs = load_graphs(CI, ("formation_energy_per_atom", "band_gap"),
                         split_column="ci_split", split="val", spec=fast.spec,
                         progress=False).graphs
    truth = torch.cat([g.y for g in graphs]).numpy()
    mean, sigma = fast.predict_graphs(graphs)
    # the card's value2 figures are what the predictor gives on the same rows
    for j, t in enumerate(("formation_energy_per_atom", "band_gap")):
        entry = card["calibration"]["value2"][t]
        assert entry["mae"] == pytest.approx(float(np.abs(mean[:, j] - truth[:, j]).mean()),
                                             rel=1e-4)
        preds = fast.raw_outputs(graphs, members=False)[2][:, :, j]
        point = preds.T @ np.array(card["value_weights"][t])
        spread = np.sqrt(((preds - point[None]) ** 2).mean(0))
        assert sigma[:, j] == pytest.approx(entry["scale"] * with_floor(
            spread, entry["floor"]), rel=1e-4)
    slow = SurrogatePredictor.default(model_dir=folder, device="cpu", mc_samples=2)
    assert slow.mode == "value2+ensemble2+mc2" and slow.calibrated


def test_model_card_with_three_value_models_and_a_cheaper_fast_mode(tmp_path):
    """Three value models in the MC mode; with dropout off only the first two run, with
    their own weights and calibration (the card's ``fast_value_count``)."""
    from matcouple.surrogate.card import build_model_card

    folder = tmp_path / "models"
    for seed, dropout, name, k in ((1, 0.1, "crysformer-t-s1.pt", 12),
                                   (2, 0.1, "crysformer-t-s2.pt", 12),
                                   (3, 0.0, "value-a.pt", 14), (4, 0.0, "value-b.pt", 12),
                                   (5, 0.0, "value-c.pt", 12)):
        cfg = _cfg(epochs=1, seed=seed, model={**TINY, "dropout": dropout}, graph={"k": k})
        train(cfg, tmp_path / f"{seed}.ckpt", progress=False, workers=1)
        export_model(tmp_path / f"{seed}.ckpt", folder / name)
    trio = ["value-a.pt", "value-b.pt", "value-c.pt"]
    with pytest.raises(MatcoupleError, match="fast_value_count 3"):
        build_model_card(folder, CI, split_column="ci_split", mc_samples=2, device="cpu",
                         value_model=trio, fast_value_count=3, progress=False)
    card = build_model_card(folder, CI, split_column="ci_split", mc_samples=2, device="cpu",
                            value_model=trio, fast_value_count=2, progress=False)
    assert set(card["calibration"]) == {"ensemble2", "ensemble2+mc2", "value3", "value2",
                                        "value3+ensemble2+mc2"}
    assert card["default_mode"] == "value3+ensemble2+mc2" and card["fast_value_count"] == 2
    for t in ("formation_energy_per_atom", "band_gap"):
        assert len(card["value_weights"][t]) == 3 and len(card["fast_value_weights"][t]) == 2
        assert sum(card["fast_value_weights"][t]) == pytest.approx(1.0)
    fast = SurrogatePredictor.default(model_dir=folder, device="cpu", mc_samples=0)
    assert fast.mode == "value2" and fast.calibrated and len(fast.values) == 2
    assert fast.spec.k == 14
    calls = []
    fast.all_values[2][0].register_forward_hook(lambda *_: calls.append(1))
    graphs = load_graphs(CI, ("formation_energy_per_atom", "band_gap"),
                         split_column="ci_split", split="val", spec=fast.spec,
                         progress=False).graphs
    truth = torch.cat([g.y for g in graphs]).numpy()
    mean, _ = fast.predict_graphs(graphs)
    assert not calls  # the third value model is not run in the fast mode
    for j, t in enumerate(("formation_energy_per_atom", "band_gap")):
        assert card["calibration"]["value2"][t]["mae"] == pytest.approx(
            float(np.abs(mean[:, j] - truth[:, j]).mean()), rel=1e-4)
    fast.mc_samples = 2  # switching modes switches the value models and their weights
    assert fast.mode == "value3+ensemble2+mc2" and len(fast.values) == 3 and fast.calibrated
    assert fast.value_weights == [card["value_weights"][t] for t in fast.targets]
    fast.predict_graphs(graphs[:2])
    assert calls
