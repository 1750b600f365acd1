"""EMA of the weights: the arithmetic, the swap for evaluation, and a training run that
averages (resumable, exports the average, records the raw weights' MAE beside it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.surrogate.ema import WeightAverage
from matcouple.surrogate.train import TrainConfig, export_model, train

CI = get_settings().data_dir / get_settings().datasets["mp2018-ci"]


def test_average_moves_by_one_minus_decay_and_swaps_back():
    lin = nn.Linear(3, 2)
    w0 = lin.weight.detach().clone()
    avg = WeightAverage(lin, 0.9)
    with torch.no_grad():
        lin.weight.add_(1.0)
    avg.update(step=10_000)  # the ramp (1+s)/(10+s) is above 0.9 here
    assert torch.allclose(avg.shadow["weight"], w0 + 0.1)
    avg.update(step=0)  # first step: decay 0.1, mostly the new weights
    assert torch.allclose(avg.shadow["weight"], 0.1 * (w0 + 0.1) + 0.9 * (w0 + 1.0))
    trained = lin.weight.detach().clone()
    with avg.swapped_in(lin):
        assert torch.equal(lin.weight, avg.shadow["weight"])
    assert torch.equal(lin.weight, trained)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(lin, 1.0)


def test_config_refuses_an_ema_decay_outside_0_1():
    with pytest.raises(MatcoupleError, match="EMA decay"):
        TrainConfig(data="x.csv", ema_decay=1.5)


@pytest.mark.skipif(not CI.exists(), reason="data sets not present")
def test_training_with_ema_resumes_seamlessly_and_exports_the_average(tmp_path):
    cfg = TrainConfig(data=str(CI), split_column="ci_split", epochs=3, batch_size=8, lr=3e-3,
                      limit_train=24, seed=7, ema_decay=0.9,
                      model={"scalars": 8, "vectors": 4, "tensors": 4, "layers": 1,
                             "heads": 4, "rbf": 8})
    full = train(cfg, tmp_path / "a.pt", progress=False, workers=1)
    train(cfg, tmp_path / "b.pt", progress=False, workers=1, chunk_epochs=2)
    resumed = train(cfg, tmp_path / "b.pt", progress=False, workers=1)
    for a, b in zip(full["history"], resumed["history"], strict=True):
        for key in ("train_loss", "val_mae_band_gap", "val_raw_mae_band_gap"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert torch.allclose(full["ema_state_dict"]["head.3.weight"],
                          resumed["ema_state_dict"]["head.3.weight"], atol=1e-6)
    # the average is not the last step's weights, and it is what the best/exported set is
    assert not torch.equal(full["ema_state_dict"]["head.3.weight"],
                           full["state_dict"]["head.3.weight"])
    best = min(full["history"], key=lambda h: h["val_mae_formation_energy_per_atom"]
               / float(full["norm_std"][0]) + h["val_mae_band_gap"] / float(full["norm_std"][1]))
    if best["epoch"] == 3:
        assert torch.equal(full["best_state_dict"]["head.3.weight"],
                           full["ema_state_dict"]["head.3.weight"])
    info = export_model(tmp_path / "a.pt", tmp_path / "m.pt")
    assert info["val_mae"]["band_gap"] == pytest.approx(best["val_mae_band_gap"])
