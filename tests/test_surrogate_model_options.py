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


def test_element_embedding_option_parses_as_a_switch():
    assert parse_model_overrides(["element_embedding=1"]) == {"element_embedding": True}
    assert parse_model_overrides(["element_embedding=false"]) == {"element_embedding": False}
    with pytest.raises(MatcoupleError, match="element_embedding: 'maybe' is not one of"):
        parse_model_overrides(["element_embedding=maybe"])


def _rock_salt(cation: str):
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.0), [cation, "O"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])


def _predict(model: Crysformer, structure) -> torch.Tensor:
    from matcouple.surrogate.graph import structure_to_graph

    g = structure_to_graph(structure)
    with torch.no_grad():
        return model(g["z"], g["edge_index"], g["edge_vec"],
                     torch.zeros(len(g["z"]), dtype=torch.long), 1)


def test_element_embedding_separates_elements_the_k_hot_table_cannot(tmp_path):
    """Nd and Sm have the same k-hot row: without the learned embedding NdO and SmO get
    the same prediction whatever the weights; with it they can differ. It starts at zero,
    so --init-from a model without it keeps that model's predictions exactly."""
    from matcouple.surrogate.train import _init_from

    table = torch.from_numpy(atom_feature_table())
    assert torch.equal(table[60], table[62])  # Nd, Sm: the collision this option is for
    torch.manual_seed(3)
    small = dict(scalars=8, vectors=4, tensors=4, layers=1, heads=4, rbf=8, dropout=0.0)
    plain = Crysformer(CrysformerConfig(**small), table).eval()
    nd, sm = _rock_salt("Nd"), _rock_salt("Sm")
    torch.testing.assert_close(_predict(plain, nd), _predict(plain, sm), rtol=0, atol=0)

    path = tmp_path / "plain.pt"
    torch.save({"model_config": plain.cfg.as_dict(), "state_dict": plain.state_dict()}, path)
    with_table = Crysformer(CrysformerConfig(**small, element_embedding=True), table).eval()
    _init_from(with_table, path)
    for s in (nd, sm):
        torch.testing.assert_close(_predict(with_table, s), _predict(plain, s))

    # one gradient step reaches the rows of the elements present, and only those
    with_table.train()
    out = with_table(torch.tensor([60, 8]), torch.tensor([[0, 1], [1, 0]]),
                     torch.tensor([[2.5, 0.0, 0.0], [-2.5, 0.0, 0.0]]),
                     torch.zeros(2, dtype=torch.long), 1)
    out.sum().backward()
    grad = with_table.element_embed.weight.grad
    assert grad[60].abs().sum() > 0 and grad[8].abs().sum() > 0
    assert grad[62].abs().sum() == 0
    with torch.no_grad():
        with_table.element_embed.weight[60].normal_()
    with_table.eval()
    assert not torch.allclose(_predict(with_table, nd), _predict(with_table, sm))


def test_train_cli_passes_the_warm_up_on_and_refuses_a_negative_one(tmp_path):
    from typer.testing import CliRunner

    from matcouple.cli import app

    result = CliRunner().invoke(app, ["train", "surrogate", "--out", str(tmp_path / "c.pt"),
                                      "--data", str(tmp_path / "missing.csv"),
                                      "--warmup-epochs", "-0.5"])
    assert result.exit_code == 2
    assert "warm-up epochs must not be negative" in result.output
    assert not (tmp_path / "c.pt").exists()


def test_a_short_warm_up_reaches_the_peak_early_and_the_cosine_ends_low():
    """A fine-tune with 5% warm-up: full rate after 5 of 100 steps, then a cosine to 2%."""
    from matcouple.surrogate.train import _lr_factor

    warmup = int(0.05 * 100)
    assert _lr_factor(0, 100, warmup) == pytest.approx(0.2)
    assert _lr_factor(warmup - 1, 100, warmup) == pytest.approx(1.0)
    assert _lr_factor(warmup, 100, warmup) == pytest.approx(1.0)
    assert _lr_factor(99, 100, warmup) < 0.03
    factors = [_lr_factor(s, 100, warmup) for s in range(warmup, 100)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))
