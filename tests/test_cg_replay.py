"""IF-CG's recorded Hessian-vector graph outlives a checkpoint reload: loading a
checkpoint copies into the model's frozen parameters and buffers in place, which the
recorded graph saved; the products then record it again instead of failing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import IFAttributorCG
from dattri.task import AttributionTask

pytestmark = pytest.mark.usefixtures("float64")


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.gain = nn.Parameter(torch.full((5,), 1.3), requires_grad=False)  # frozen
        self.register_buffer("shift", torch.linspace(-0.2, 0.2, 5))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) * self.gain + self.shift))


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_self_attribute_after_attribute_is_the_diagonal(mode):
    torch.manual_seed(0)
    model = _Scaled().eval()
    x, y = torch.randn(14, 4), torch.randint(0, 3, (14,))

    def loss(params, data):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (data[0],)),
                                           data[1])

    train = DataLoader(TensorDataset(x, y), batch_size=7)
    att = IFAttributorCG(AttributionTask(loss, model, model.state_dict()), max_iter=200,
                         tol=1e-12, regularization=0.1, mode=mode).cache(train)
    full = att.attribute(train, train)
    torch.testing.assert_close(att.self_attribute(train), full.diagonal(), rtol=1e-6, atol=1e-9)
