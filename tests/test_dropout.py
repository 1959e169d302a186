"""Tests of dattri.model_util.dropout.activate_dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dattri.errors import DattriValueError, LayerNameError
from dattri.model_util.dropout import activate_dropout


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.ReLU(),
        nn.Sequential(nn.Linear(16, 16), nn.Dropout1d(0.3)),
        nn.Linear(16, 3),
    )


def test_all_dropouts_active_rest_eval():
    model = _model()
    assert activate_dropout(model, dropout_prob=0.2) is model
    assert not model.training and not model[1].training  # batch norm uses running stats
    for m in (model[2], model[4][1]):
        assert m.training and m.p == 0.2
    x = torch.randn(5, 6)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    torch.manual_seed(2)
    c = model(x)
    torch.testing.assert_close(a, b)  # same seed = same ensemble member
    assert not torch.allclose(a, c)  # another member


def test_dropout_masks_have_the_requested_rate():
    model = nn.Sequential(nn.Dropout(0.5))
    activate_dropout(model, dropout_prob=0.25)
    torch.manual_seed(0)
    out = model(torch.ones(200_000))
    assert abs((out == 0).float().mean().item() - 0.25) < 0.005  # 5 standard errors
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))


def test_named_positions_only():
    model = _model()
    activate_dropout(model, layer_positions=["4.1"], dropout_prob=0.4)
    assert model[4][1].training and model[4][1].p == 0.4
    assert not model[2].training and model[2].p == 0.5
    activate_dropout(model, layer_positions="2")  # a single name
    assert model[2].training and model[2].p == 0.1


@pytest.mark.parametrize("names", [["4"], ["0"], ["2", "dropout"], ["4.1 "]])
def test_bad_names_list_available_dropouts(names):
    with pytest.raises(LayerNameError, match=r"not dropout modules.*its dropout modules are \['2', '4.1'\]"):
        activate_dropout(_model(), layer_positions=names)


@pytest.mark.parametrize("prob", [-0.1, 1.0, 1.5, "0.1", True])
def test_bad_probability(prob):
    with pytest.raises(DattriValueError, match="dropout_prob must be a float in"):
        activate_dropout(_model(), dropout_prob=prob)


def test_model_without_dropout():
    with pytest.raises(DattriValueError, match="has no dropout module"):
        activate_dropout(nn.Linear(2, 2))
