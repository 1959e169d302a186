"""TensorSketch of factored linear-layer gradients (dattri.func.sketch) and TRAK with it."""

from __future__ import annotations

import pytest
import torch
from cases import loaders, per_example_grads
from test_attributors import _margin_task, lr_case  # noqa: F401 - a pytest fixture
from torch import nn

from dattri.algorithm import TRAKAttributor
from dattri.errors import DattriValueError
from dattri.func.sketch import TensorSketch, tensor_sketch_matrix
from dattri.task import AttributionTask


def _factors(b: int, sizes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, i, generator=g, dtype=torch.float64),
             torch.randn(b, o, generator=g, dtype=torch.float64)) for i, o in sizes]


def _vec(factors):
    return torch.cat([(d[:, :, None] * a[:, None, :]).reshape(a.shape[0], -1) for a, d in factors], 1)


def test_sketch_is_the_structured_count_sketch_matrix():
    sizes = [(6, 4), (5, 3), (3, 1)]
    f = _factors(9, sizes)
    ts = TensorSketch(32, seed=7)
    for ens in (0, 3):
        m = tensor_sketch_matrix(ts, sizes, ensemble_id=ens)
        # every coordinate goes to exactly one bucket with sign +-1 (a count sketch)
        assert torch.equal(m.abs().sum(1), torch.ones(m.shape[0], dtype=m.dtype))
        torch.testing.assert_close(ts.project(f, ens), _vec(f) @ m, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ts.project(f, 0), ts.project(f, 1))


def test_sketch_independent_of_batch_split_and_instance():
    f = _factors(10, [(7, 5)])
    whole = TensorSketch(16, seed=1).project(f, 2)
    halves = [TensorSketch(16, seed=1).project([(a[s], d[s]) for a, d in f], 2)
              for s in (slice(0, 4), slice(4, 10))]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-12, atol=1e-12)


def test_sketch_inner_products_unbiased():
    # E<Sx, Sy> = <x, y>: the mean over 2,000 independent sketches is within a few
    # standard errors of the exact inner products (fixed seeds: deterministic)
    f = _factors(3, [(8, 6), (4, 3)], seed=5)
    x = _vec(f)
    exact = x @ x.T
    ts = TensorSketch(8, seed=0)
    sketches = [ts.project(f, e) for e in range(2000)]
    est = torch.stack([s @ s.T for s in sketches])
    err = (est.mean(0) - exact).abs()
    se = est.std(0) / 2000 ** 0.5
    assert bool((err < 5 * se + 1e-9).all()), (err, se)


def test_sketch_bad_input():
    with pytest.raises(DattriValueError, match="proj_dim"):
        TensorSketch(0)
    ts = TensorSketch(8)
    with pytest.raises(DattriValueError, match="factors"):
        ts.project([])
    with pytest.raises(DattriValueError, match=r"factors\[0\]"):
        ts.project([(torch.zeros(3, 2), torch.zeros(4, 2))])


def test_trak_tensorsketch_equals_dense_formula(lr_case):  # noqa: F811 - the fixture
    task, prob, margin = _margin_task(lr_case)
    tr, te = loaders(lr_case["train"], lr_case["test"])
    lam = 1e-3
    att = TRAKAttributor(task, prob, regularization=lam,
                         proj_params={"proj_dim": 24, "proj_type": "tensorsketch", "proj_seed": 4})
    got = att.cache(tr).attribute(te)
    model = lr_case["model"]
    c, d = model.weight.shape

    def aug(g):  # dense layout [W (c x d) row-major, b] -> augmented [W | b] row-major
        return torch.cat([g[:, :c * d].reshape(-1, c, d), g[:, c * d:, None]], 2).reshape(len(g), -1)

    m = tensor_sketch_matrix(TensorSketch(24, seed=4), [(d + 1, c)], ensemble_id=0)
    phi = aug(per_example_grads(model, margin, *lr_case["train"])) @ m
    phi_t = aug(per_example_grads(model, margin, *lr_case["test"])) @ m
    params = {k: v.detach() for k, v in model.named_parameters()}
    q = 1 - prob(params, lr_case["train"])
    kern = phi.T @ phi + lam * torch.eye(24, dtype=phi.dtype)
    expect = q[:, None] * (phi @ torch.linalg.solve(kern, phi_t.T))
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-9)


def test_trak_tensorsketch_dense_fallback_is_the_same_sketch():
    # when the factors are unavailable (failed numerical check, or turned off), the
    # same sketch is applied to dense gradients: identical scores
    from test_attributors import _mlp_case

    model, train, test = _mlp_case()

    def margin(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        logp = torch.log_softmax(out, -1).gather(1, data[1][:, None]).squeeze(1)
        return (logp - torch.log(-torch.expm1(logp))).mean()

    def prob(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        return torch.softmax(out, -1).gather(1, data[1][:, None]).squeeze(1)

    tr, te = loaders(train, test, bs_train=10, bs_test=7)
    proj = {"proj_dim": 16, "proj_type": "tensorsketch", "proj_seed": 2}
    sd = model.state_dict()  # aliases the model: the task copies it (several checkpoints)
    ckpts = [sd, {k: v * 1.1 for k, v in sd.items()}]
    fast = TRAKAttributor(AttributionTask(margin, model, ckpts), prob, regularization=1e-3,
                          proj_params=proj)
    slow = TRAKAttributor(AttributionTask(margin, model, ckpts), prob, regularization=1e-3,
                          proj_params=proj)
    slow.train_features.use_factored = slow.test_features.use_factored = False
    got = slow.attribute(tr, te)
    torch.testing.assert_close(got, fast.attribute(tr, te), rtol=1e-6, atol=1e-9)
    assert fast.train_features.factored._verified == {0: True, 1: True}
    assert slow.train_features.factored._verified == {}  # the dense path ran


def test_trak_tensorsketch_of_a_model_with_other_parameters_is_the_layout_sketch():
    """A parameter outside nn.Linear / convolutions is hashed coordinate by coordinate
    (dattri.func.sketch.SketchLayout): TRAK's scores are its formula on the features
    ``G M`` (M: the layout's dense matrix, G: autograd's per-example gradients)."""
    from dattri.func.sketch import SketchLayout

    class ScaledLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
            self.fc = nn.Linear(4, 3).double()

        def forward(self, x):
            return self.fc(torch.tanh(x * self.w))

    torch.manual_seed(0)
    model = ScaledLinear()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)

    def margin(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        logp = torch.log_softmax(out, -1).gather(1, data[1][:, None]).squeeze(1)
        return (logp - torch.log(-torch.expm1(logp))).mean()

    def prob(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        return torch.softmax(out, -1).gather(1, data[1][:, None]).squeeze(1)

    lam = 1e-3
    task = AttributionTask(margin, model, model.state_dict())
    tr, te = loaders((x[:8], y[:8]), (x[8:], y[8:]), bs_train=3, bs_test=2)
    att = TRAKAttributor(task, prob, regularization=lam,
                         proj_params={"proj_dim": 16, "proj_type": "tensorsketch", "proj_seed": 4})
    got = att.cache(tr).attribute(tr, te)
    m = SketchLayout(model, ["w", "fc.weight", "fc.bias"]).matrix(TensorSketch(16, seed=4), 0)
    phi = per_example_grads(model, margin, x[:8], y[:8]) @ m
    phi_t = per_example_grads(model, margin, x[8:], y[8:]) @ m
    q = 1 - prob({k: v.detach() for k, v in model.named_parameters()}, (x[:8], y[:8]))
    expect = q[:, None] * (phi @ torch.linalg.solve(phi.T @ phi + lam * torch.eye(16, dtype=phi.dtype),
                                                    phi_t.T))
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-9)
