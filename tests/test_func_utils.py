"""flatten_params / unflatten_params / flatten_func / partial_param."""

from __future__ import annotations

import torch
from torch import nn

from dattri.func.utils import ParamSpec, flatten_func, flatten_params, partial_param, unflatten_params


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_flatten_unflatten_round_trip():
    m = _model()
    params = dict(m.named_parameters())
    flat = flatten_params(params)
    assert flat.shape == (3 * 4 + 4 + 4 * 2 + 2,)
    back = unflatten_params(flat, m)
    assert list(back) == list(params)
    for k in params:
        assert torch.equal(back[k], params[k])
    # leading batch dimensions are kept
    batch = torch.stack([flat, 2 * flat])
    twice = ParamSpec(params).unflatten(batch)
    assert torch.equal(twice["2.weight"][1], 2 * params["2.weight"])
    assert ParamSpec(params).slices()["0.bias"] == slice(12, 16)


def test_flatten_func_matches_dict_call():
    m = _model()
    x = torch.randn(5, 3, dtype=torch.float64)

    def f(params, data):
        return torch.func.functional_call(m, params, (data,)).square().sum()

    flat = flatten_params(dict(m.named_parameters())).detach()
    g = flatten_func(m)(f)
    torch.testing.assert_close(g(flat, x), f(dict(m.named_parameters()), x))
    # gradient w.r.t. the flat vector is the flattened dict gradient
    gf = torch.func.grad(g)(flat, x)
    gd = torch.func.grad(f)({k: v.detach() for k, v in m.named_parameters()}, x)
    torch.testing.assert_close(gf, flatten_params(gd))
    # param_num selects the argument
    h = flatten_func(m, param_num=1)(lambda data, params: f(params, data))
    torch.testing.assert_close(h(x, flat), g(flat, x))


def test_partial_param_freezes_the_rest():
    m = _model()
    x = torch.randn(5, 3, dtype=torch.float64)
    full = {k: v.detach() for k, v in m.named_parameters()}

    def f(params, data):
        return torch.func.functional_call(m, params, (data,)).square().sum()

    g = partial_param(full, "2.bias")(f)
    sub = {"2.bias": full["2.bias"].clone()}
    torch.testing.assert_close(g(sub, x), f(full, x))
    grad_sub = torch.func.grad(g)(sub, x)
    assert list(grad_sub) == ["2.bias"]
    torch.testing.assert_close(grad_sub["2.bias"], torch.func.grad(f)(full, x)["2.bias"])
    # a changed selected parameter changes the value; the frozen ones come from full
    sub2 = {"2.bias": full["2.bias"] + 1}
    assert not torch.allclose(g(sub2, x), f(full, x))


def test_all_finite_including_an_overflowing_sum():
    from dattri.func.utils import all_finite

    big = torch.full((4,), 3e38)  # finite entries whose float32 sum is inf
    assert all_finite(big)
    assert all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(5)
        t[2] = bad
        assert not all_finite(t)
        assert not all_finite(torch.cat([big, t]))
