"""Tests of dattri.model_util.hook.get_final_layer_io."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.errors import LayerNameError, ShuffledLoaderError
from dattri.model_util.hook import get_final_layer_io


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Linear(7, 4), nn.Linear(4, 3))

    def forward(self, x=None, pixels=None):
        x = pixels if x is None else x
        return self.head(self.body(x))


def _data(n=11):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_features_and_outputs_match_a_manual_forward_in_loader_order():
    torch.manual_seed(0)
    model = _Net().double().train()
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # last batch partial
    feats, outs = get_final_layer_io(model, "head.1", loader)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        ref_feat = model.head[0](model.body(x))
        ref_out = model(x)
    torch.testing.assert_close(feats, ref_feat, rtol=0, atol=1e-14)
    torch.testing.assert_close(outs, ref_out, rtol=0, atol=1e-14)
    # the final linear layer of the whole model: output = W phi + b
    lin = model.head[1]
    torch.testing.assert_close(outs, feats @ lin.weight.detach().T + lin.bias.detach())


def test_tensor_and_dict_batches_and_a_top_level_layer_name():
    torch.manual_seed(1)
    model = _Net().double()
    x, _ = _data(6)
    feats_t, _ = get_final_layer_io(model, "head", DataLoader(x, batch_size=4))
    dict_loader = [{"pixels": x[:3], "labels": torch.zeros(3)}, {"pixels": x[3:], "labels": torch.zeros(3)}]
    feats_d, outs_d = get_final_layer_io(model, "head", dict_loader)
    with torch.no_grad():
        phi = model.eval().body(x)
    torch.testing.assert_close(feats_t, phi)
    torch.testing.assert_close(feats_d, phi)
    assert outs_d.shape == (6, 3)


def test_bad_layer_name_and_shuffled_loader():
    model = _Net()
    x, y = _data()
    with pytest.raises(LayerNameError, match=r"final_linear_layer_name='fc' is not a module .*'head\.1'"):
        get_final_layer_io(model, "fc", DataLoader(TensorDataset(x.float(), y)))
    with pytest.raises(ShuffledLoaderError, match="shuffles"):
        get_final_layer_io(model, "head.1", DataLoader(TensorDataset(x.float(), y), shuffle=True))
