"""Model hyper-parameters from the command line, and members trained without dropout."""

from __future__ import annotations

import pytest
import torch

from matcouple.errors import MatcoupleError
from matcouple.surrogate.atom_features import atom_feature_table
from matcouple.surrogate.graph import GraphSpec
from matcouple.surrogate.model import Crysformer, CrysformerConfig, parse_model_overrides
from matcouple.surrogate.predict import SurrogatePredictor
from matcouple.surrogate.train import next_epoch_fits


def test_overrides_are_typed_like_the_config():
    out = parse_model_overrides(["dropout=0", "scalars=144", "rbf_cutoff=6", "tensors=16"])
    assert out == {"dropout": 0.0, "scalars": 144, "rbf_cutoff": 6.0, "tensors": 16}
    assert isinstance(out["dropout"], float) and isinstance(out["scalars"], int)
    assert parse_model_overrides([]) == {}


@pytest.mark.parametrize("item, message", [
    ("widht=3", "NAME=VALUE"), ("dropout", "NAME=VALUE"), ("targets=x", "NAME=VALUE"),
    ("scalars=1.5", "not a int"), ("dropout=high", "not a float"),
    ("dropout=1", "out of range"), ("layers=0", "out of range"), ("vectors=-4", "out of range"),
    ("tensors=18", "divisible by heads=4"),
])
def test_bad_overrides_are_refused_by_name(item, message):
    with pytest.raises(MatcoupleError, match=message):
        parse_model_overrides([item])


def _member(dropout: float) -> tuple[Crysformer, dict]:
    cfg = CrysformerConfig(scalars=8, vectors=4, tensors=4, layers=1, heads=4, rbf=8,
                           dropout=dropout)
    model = Crysformer(cfg, torch.from_numpy(atom_feature_table())).eval()
    blob = {"model_config": cfg.as_dict(), "graph_spec": GraphSpec().__dict__,
            "norm_mean": torch.zeros(2), "norm_std": torch.ones(2)}
    return model, blob


def test_members_without_dropout_default_to_the_ensemble_spread(silicon):
    torch.manual_seed(0)
    members = [_member(0.0) for _ in range(2)]
    models, blobs = [m for m, _ in members], [b for _, b in members]
    predictor = SurrogatePredictor.from_models(models, blobs, device=torch.device("cpu"))
    assert predictor.mc_samples == 0 and predictor.mode == "ensemble2"
    row = predictor.predict([("si", silicon)])[0]
    assert row.error is None and row.sigmas["formation_energy_per_atom"] > 0
    with pytest.raises(MatcoupleError, match="trained with dropout > 0"):
        SurrogatePredictor.from_models(models, blobs, device=torch.device("cpu"), mc_samples=4)
    with_dropout = [_member(0.1) for _ in range(2)]
    predictor = SurrogatePredictor.from_models([m for m, _ in with_dropout],
                                               [b for _, b in with_dropout],
                                               device=torch.device("cpu"))
    assert predictor.mc_samples > 0  # the settings' default MC passes


def test_train_cli_refuses_a_bad_model_option_before_reading_data(tmp_path):
    from typer.testing import CliRunner

    from matcouple.cli import app

    result = CliRunner().invoke(app, ["train", "surrogate", "--out", str(tmp_path / "c.pt"),
                                      "--data", str(tmp_path / "missing.csv"),
                                      "--model", "dropout=0", "--model", "tensors=18"])
    assert result.exit_code == 2
    assert "tensors=18 must be divisible by heads=4" in result.output
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("bad", [{"lr": 0.0}, {"lr": float("nan")}, {"lr": -1e-3},
                                 {"epochs": 0}, {"batch_size": 0}, {"weight_decay": -1.0}])
def test_training_settings_out_of_range_are_refused(bad):
    from matcouple.surrogate.train import TrainConfig

    with pytest.raises(MatcoupleError, match="learning rate|at least 1|negative"):
        TrainConfig(data="x.csv", **bad)


def test_train_cli_refuses_a_zero_learning_rate_before_reading_data(tmp_path):
    from typer.testing import CliRunner

    from matcouple.cli import app

    result = CliRunner().invoke(app, ["train", "surrogate", "--out", str(tmp_path / "c.pt"),
                                      "--data", str(tmp_path / "missing.csv"), "--lr", "0"])
    assert result.exit_code == 2
    assert "learning rate must be a positive number" in result.output
    assert not (tmp_path / "c.pt").exists()


def test_chunk_budget_times_epochs_of_this_chunk_only() -> None:
    """A resumed run (say 40 epochs behind it) must not count earlier chunks' epochs when it
    estimates how long the next one takes: 10 epochs in 300 s leave no room in 320 s."""
    assert not next_epoch_fits(300.0, 10, 320.0)
    assert next_epoch_fits(300.0, 10, 330.0)
    assert next_epoch_fits(0.0, 0, 1.0)  # nothing timed yet: try one epoch
