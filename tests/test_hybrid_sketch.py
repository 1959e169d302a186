"""TensorSketch of any model's per-example gradients (SketchLayout, FactoredSketchSink):
the structured layers sketched from their inputs and output gradients, the others
formed and scattered, equal to the layout's dense (P, k) matrix applied to the
formed gradients (float64)."""

from __future__ import annotations

import pytest
import torch
from test_batched_grads import ConvNet, HeadFirst, SeqNet, _ce, _data_conv, _data_seq, _task
from torch import nn

from dattri.algorithm._engine import Featurizer
from dattri.algorithm.base import make_projection
from dattri.func.sketch import FactoredSketchSink, SketchLayout, TensorSketch, dense_buckets


pytestmark = pytest.mark.usefixtures("float64")


def _featurizer(task, k=64, seed=3, layer_name=None):
    transform = make_projection({"proj_dim": k, "proj_type": "tensorsketch", "proj_seed": seed},
                                torch.device("cpu"))
    return Featurizer(task, "loss", layer_name, torch.device("cpu"), transform), transform.sketch


def _model(make):
    torch.manual_seed(0)
    model = make().eval()
    if isinstance(model, ConvNet):
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("choice", ["factors", "formed", "cost model"])
@pytest.mark.parametrize(("make", "data"), [(ConvNet, _data_conv), (SeqNet, _data_seq),
                                           (HeadFirst, _data_seq)])
def test_sketch_equals_the_layout_matrix_times_the_formed_gradients(make, data, choice, monkeypatch):
    """ConvNet: strided / dilated-grouped (not structured: coordinate-wise) / 1-D
    convolutions, BatchNorm, GroupNorm; SeqNet: nn.Linear on sequences, a module called
    twice, attention, a weight tied to an embedding (coordinate-wise); HeadFirst: the
    tied read-out before its embedding, a layer called three times."""
    sketched: list[str] = []
    real_add = FactoredSketchSink.add

    def spy(self, name, a, d):
        sketched.append(name)
        return real_add(self, name, a, d)

    monkeypatch.setattr(FactoredSketchSink, "add", spy)
    if choice != "cost model":
        monkeypatch.setattr(FactoredSketchSink, "prefers_factors",
                            lambda self, name, positions: choice == "factors"
                            and name in self.layout.layers)
    model = _model(make)
    task = _task(model, _ce(model))
    batch = data()
    fz, ts = _featurizer(task)
    got = fz.batch(batch, 0)
    assert fz.batched_ok(batch, 0)  # the batched path ran (not the vmap fallback)
    layout = SketchLayout(model, task._resolve_layer_name(None))
    dense = fz.vmapped(batch, 0)
    want = dense @ layout.matrix(ts, 0)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if choice == "factors":
        assert sketched, "no layer was sketched from its factors"
        # a layer using a weight that another module owns is never sketched from
        # factors; HeadFirst's head owns its weight and is (the embedding's part of it
        # is formed and scattered with the same buckets: the sum above is exact)
        assert ("head" in sketched) == (make is HeadFirst)
    if choice == "formed":
        assert not sketched
    # batch-split invariance, and another checkpoint id draws another sketch
    halves = [tuple(t[s] for t in batch) for s in (slice(0, 2), slice(2, None))]
    torch.testing.assert_close(torch.cat([fz.batch(h, 0) for h in halves]), got,
                               rtol=1e-10, atol=1e-12)
    other = dense @ layout.matrix(ts, 1)
    assert not torch.allclose(other, want)


def test_structured_layers_get_the_buckets_of_the_linear_tensor_sketch():
    """On nn.Linear layers the layout is dense_buckets (the factored path of MNIST)."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False), nn.Linear(3, 2))
    names = ["0.weight", "0.bias", "2.weight", "3.bias"]  # a selection: 3.weight left out
    layout = SketchLayout(model, names)
    ts = TensorSketch(32, seed=5)
    for ens in (0, 2):
        got = layout.buckets(ts, ens)
        want = dense_buckets(ts, [(5, 4, True, True), (4, 3, True, False), (3, 2, False, True)], ens)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_conv_layer_sketched_from_patches_is_the_count_sketch_of_its_gradient():
    """The sink alone on a strided, padded convolution with bias (several positions),
    against the layout's matrix times per-example gradients formed by autograd."""
    g = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(4, 3, 7, 7, generator=g)
    delta = torch.randn(4, 5, 4, 4, generator=g)
    layout = SketchLayout(conv, ["weight", "bias"])
    ts = TensorSketch(16, seed=9)
    sink = FactoredSketchSink(ts, layout, ensemble_id=1)
    cols = nn.functional.unfold(nn.functional.pad(x, (1, 1, 1, 1)), 3, stride=2)
    sink.add("", cols.transpose(1, 2), delta.reshape(4, 5, -1).transpose(1, 2))
    got = sink.finish(None, [], 4, x)
    rows = []
    for i in range(4):
        w = conv.weight.detach().requires_grad_(True)
        b = conv.bias.detach().requires_grad_(True)
        out = nn.functional.conv2d(x[i:i + 1], w, b, stride=2, padding=1)
        gw, gb = torch.autograd.grad((out * delta[i:i + 1]).sum(), (w, b))
        rows.append(torch.cat([gw.reshape(-1), gb]))
    torch.testing.assert_close(got, torch.stack(rows) @ layout.matrix(ts, 1), rtol=1e-10, atol=1e-12)


def test_the_cost_model_sketches_deep_layers_with_few_positions():
    """ResNet-9's shapes: the 512 x 4,608 convolution at 64 positions from its
    factors, the 64 x 576 one at 1,024 positions formed."""
    deep, early = nn.Conv2d(512, 512, 3), nn.Conv2d(64, 128, 3)
    model = nn.ModuleDict({"deep": deep, "early": early})
    layout = SketchLayout(model, ["deep.weight", "early.weight"])
    sink = FactoredSketchSink(TensorSketch(2048), layout, 0)
    assert sink.prefers_factors("deep", 64)
    assert not sink.prefers_factors("early", 1024)
    assert not sink.prefers_factors("not a layer", 1)


class _SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.norm(self.conv(x))).flatten(1))


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("make", ["mlp", "conv"])
def test_tracin_with_tensorsketch_is_the_sketched_formula(make, normalized):
    """TracInCP (two checkpoints, weights 0.3 / 0.7) and Grad-Cos with
    proj_type="tensorsketch": sum_c w_c <G_i M_c, G_j M_c> (rows of G M_c unit-normalised
    for Grad-Cos), M_c the layout's matrix for checkpoint c; on an MLP (the factored
    nn.Linear path) and on a convolution with a GroupNorm (the layout's path)."""
    from cases import per_example_grads
    from torch.utils.data import DataLoader, TensorDataset

    from dattri.algorithm import TracInAttributor
    from dattri.task import AttributionTask

    torch.manual_seed(1)
    if make == "mlp":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(14, 5)
    else:
        model = _SmallConv()
        x = torch.randn(14, 2, 4, 4)
    y = torch.randint(0, 3, (14,))

    def loss(params, data):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (data[0],)), data[1])

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts = [sd, {k: v * 0.9 for k, v in sd.items()}]
    w = torch.tensor([0.3, 0.7])
    att = TracInAttributor(AttributionTask(loss, model, ckpts), weight_list=w, normalized_grad=normalized,
                           proj_params={"proj_dim": 32, "proj_type": "tensorsketch", "proj_seed": 6})
    tr = DataLoader(TensorDataset(x[:9], y[:9]), batch_size=4)
    te = DataLoader(TensorDataset(x[9:], y[9:]), batch_size=3)
    got = att.cache(tr).attribute(tr, te)
    names = [n for n, _ in model.named_parameters()]
    layout = SketchLayout(model, names)
    ts = TensorSketch(32, seed=6)
    want = torch.zeros(9, 5)
    for c, state in enumerate(ckpts):
        model.load_state_dict(state)
        m = layout.matrix(ts, c)
        a = per_example_grads(model, loss, x[:9], y[:9]) @ m
        b = per_example_grads(model, loss, x[9:], y[9:]) @ m
        if normalized:
            a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        want += w[c] * a @ b.T
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_a_coupled_loss_sketches_the_vmap_gradients_with_the_same_buckets():
    """When the batched path is refused (the loss couples the examples), the sketch
    comes from vmap(grad)'s formed gradients (FactoredSketchSink.finish(formed)) and
    is the same linear map: the layout matrix times those gradients."""
    model = _model(SeqNet)

    def coupled(params, data):
        tok, y = data
        out = torch.func.functional_call(model, params, tok)
        out = out / out.abs().amax()  # the batch's largest logit couples the examples
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    task = _task(model, coupled)
    batch = _data_seq()
    fz, ts = _featurizer(task)
    with pytest.warns(UserWarning, match="fall"):
        got = fz.batch(batch, 0)
    assert not fz.batched_ok(batch, 0)
    layout = SketchLayout(model, task._resolve_layer_name(None))
    want = fz.vmapped(batch, 0) @ layout.matrix(ts, 0)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
