"""Scale-equivariance: multiplying the loss by c must not change what an attributor
ranks, and influence scores must scale as the formulas say (issue 13).

Hyper-parameters with the units of the loss are scaled with it (a regularization
of the Hessian by c, of a Fisher / Gram matrix by c^2, LiSSA's scaling by c,
DVEmb's learning rates by 1/c^2); tolerances must be relative for this to hold.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import correct_probability, trained_lr
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import (
    DVEmbAttributor,
    FactGraSSAttributor,
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
    LoGraAttributor,
    RPSAttributor,
    TracInAttributor,
    TRAKAttributor,
)
from dattri.linalg import arnoldi, cg_multishift_solve, cg_solve
from dattri.task import AttributionTask

SCALES = (1e-8, 1.0, 1e8)


@pytest.fixture(scope="module")
def convex():
    model, loss, (xtr, ytr), (xte, yte) = trained_lr(48, 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=16)
    test = DataLoader(TensorDataset(xte, yte), batch_size=3)
    return model, loss, state, train, test


def _scaled(f, c):
    return lambda params, data: c * f(params, data)


def _margin(model):
    def f(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        right = out.gather(1, y.reshape(-1, 1)).squeeze(1)
        others = out.masked_fill(torch.nn.functional.one_hot(y, out.shape[1]).bool(), -torch.inf)
        return (right - torch.logsumexp(others, dim=1)).mean()
    return f


def _make(name, convex, c):
    """(attributor, power): the scores at scale c are c**power times those at 1."""
    model, loss, state, _, _ = convex

    def task(f=loss, ckpts=state):
        return AttributionTask(loss_func=_scaled(f, c), model=model, checkpoints=ckpts)

    if name == "explicit":
        return IFAttributorExplicit(task(), regularization=1e-3 * c), 1
    if name == "cg":
        return IFAttributorCG(task(), max_iter=60, tol=1e-10, regularization=1e-3 * c), 1
    if name == "lissa":
        return IFAttributorLiSSA(task(), batch_size=16, recursion_depth=150, damping=1e-3,
                                 scaling=10.0 * c), 1
    if name == "arnoldi":
        return IFAttributorArnoldi(task(), proj_dim=33, max_iter=33, regularization=1e-3 * c), 1
    if name == "datainf":
        return IFAttributorDataInf(task()), 0
    if name == "ekfac":
        return IFAttributorEKFAC(task()), 0
    if name == "logra":
        return LoGraAttributor(task()), 0
    if name == "factgrass":
        return FactGraSSAttributor(task()), 0
    if name == "grad_dot":
        return TracInAttributor(task(), weight_list=[1.0], normalized_grad=False), 2
    if name == "grad_cos":
        return TracInAttributor(task(), weight_list=[1.0], normalized_grad=True), 0
    if name == "trak":
        return TRAKAttributor(task(_margin(model)), correct_probability(model),
                              proj_params={"proj_type": "identity"},
                              regularization=1e-3 * c * c), 0
    if name == "rps":
        rps_task = AttributionTask(
            loss_func=lambda pre, y: c * torch.nn.functional.cross_entropy(pre, y),
            model=model, checkpoints=state)
        return RPSAttributor(rps_task, "", l2_strength=1e-2 * c, epoch=300), 0
    if name == "dvemb":
        gen = torch.Generator().manual_seed(0)
        ckpts = [{k: v + 0.05 * t * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                  for k, v in state.items()} for t in range(4)]
        steps = [(list(range(16 * t, 16 * t + 16)), 0.5 / c**2) for t in range(3)]
        return DVEmbAttributor(task(ckpts=ckpts), steps=steps), 0
    raise AssertionError(name)


METHODS = ["explicit", "cg", "lissa", "arnoldi", "datainf", "ekfac", "logra", "factgrass",
           "grad_dot", "grad_cos", "trak", "rps", "dvemb"]


@pytest.mark.parametrize("name", METHODS)
def test_rankings_and_scores_are_scale_equivariant(convex, name):
    _, _, _, train, test = convex
    scores = {}
    for c in SCALES:
        att, power = _make(name, convex, c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fast-path fallbacks
            att.cache(train)
            scores[c] = att.attribute(train, test) / c**power
    ref = scores[1.0].flatten()
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    for c in SCALES:
        rho = spearmanr(scores[c].flatten().numpy(), ref.numpy()).statistic
        assert rho >= 0.999, (c, rho)
        torch.testing.assert_close(scores[c], scores[1.0], rtol=1e-4,
                                   atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("c", SCALES)
def test_arnoldi_keeps_the_same_basis_for_a_scaled_operator(c):
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    a = m @ m.T / 30 + 0.1 * torch.eye(30, dtype=torch.float64)
    vals1, vecs1 = arnoldi(lambda v: a @ v, 30, max_iter=30, top_k=30, dtype=torch.float64)
    vals, vecs = arnoldi(lambda v: (c * a) @ v, 30, max_iter=30, top_k=30, dtype=torch.float64)
    assert vals.numel() == vals1.numel() == 30
    torch.testing.assert_close(vals / c, vals1)
    torch.testing.assert_close(vals1.sort().values, torch.linalg.eigvalsh(a))


@pytest.mark.parametrize("c", [1e-20, 1.0, 1e20])
def test_cg_converges_at_any_scale_in_float32(c):
    # float32 with A and b at 1e-20: p^T A p ~ 1e-60 underflowed before the
    # right-hand sides were normalised, and CG returned zeros
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    a = m @ m.T / 12 + torch.eye(12, dtype=torch.float64)
    b = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(a, b.T).T
    a32, b32 = (c * a).float(), (c * b).float()
    x = cg_solve(lambda v: v @ a32, b32, max_iter=40, tol=1e-6)
    torch.testing.assert_close(x.double(), exact, rtol=1e-3, atol=1e-4)
    xs = cg_multishift_solve(lambda v: v @ a32, b32, [0.0, c], max_iter=40, tol=1e-6)
    torch.testing.assert_close(xs[0.0].double(), exact, rtol=1e-3, atol=1e-4)


def test_cg_warns_when_products_underflow():
    b = torch.ones(2, 5, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=r"cg_solve: for 2 of 2 .*underflowed"):
        x = cg_solve(lambda v: v * 1e-46, b, max_iter=5)  # float32: the products are 0
    assert torch.equal(x, torch.zeros_like(b))
