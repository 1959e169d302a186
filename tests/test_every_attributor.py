"""One test parametrised over every attributor (float64, real 8x8 digits):

- ``self_attribute`` is the diagonal of ``attribute(train, train)``;
- the scores do not depend on the loaders' batch sizes;
- dict batches give the same scores as tuple batches;
- several checkpoints give the mean of the single-checkpoint scores (TracInCP: the
  weighted sum; TRAK: its own ensemble formula, ``Q`` averaged apart).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri import algorithm as A
from dattri.task import AttributionTask

from cases import digits


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def _funcs(model: nn.Module, keyed: bool):
    def xy(data):
        return (data["x"], data["y"]) if keyed else data

    def loss(params, data):
        x, y = xy(data)
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    def margin(params, data):
        x, y = xy(data)
        logp = -nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y,
                                            reduction="none")
        return (logp - torch.log(-torch.expm1(logp))).mean()

    def prob(params, data):
        x, y = xy(data)
        out = torch.func.functional_call(model, params, (x,))
        return torch.softmax(out, -1).gather(1, y[:, None]).squeeze(1)

    def pre(pre_activation, label):
        return nn.functional.cross_entropy(pre_activation, label)

    return loss, margin, prob, pre


#: name -> (factory(model, checkpoints, keyed) -> attributor, has self_attribute, ensemble rule)
def _factories():
    def task(model, ckpts, keyed, which="loss"):
        loss, margin, _, pre = _funcs(model, keyed)
        f = {"loss": loss, "margin": margin, "pre": pre}[which]
        return AttributionTask(loss_func=f, model=model, checkpoints=ckpts)

    return {
        "explicit": (lambda m, c, k: A.IFAttributorExplicit(task(m, c, k), regularization=0.1), "mean"),
        "cg": (lambda m, c, k: A.IFAttributorCG(task(m, c, k), max_iter=60, tol=1e-14,
                                                regularization=0.1), "mean"),
        "arnoldi": (lambda m, c, k: A.IFAttributorArnoldi(task(m, c, k), proj_dim=20, max_iter=40,
                                                          regularization=0.1), "mean"),
        "datainf": (lambda m, c, k: A.IFAttributorDataInf(task(m, c, k), regularization=0.1), "mean"),
        "ekfac": (lambda m, c, k: A.IFAttributorEKFAC(task(m, c, k), damping=0.1), "mean"),
        "tracin": (lambda m, c, k: A.TracInAttributor(task(m, c, k), weight_list=[0.3, 0.7][:len(c)],
                                                      normalized_grad=False), "sum"),
        "grad_cos": (lambda m, c, k: A.TracInAttributor(task(m, c, k), weight_list=[1.0] * len(c),
                                                        normalized_grad=True), "sum"),
        "trak": (lambda m, c, k: A.TRAKAttributor(task(m, c, k, "margin"), _funcs(m, k)[2],
                                                  proj_params={"proj_type": "identity"},
                                                  regularization=1e-2), "trak"),
        "rps": (lambda m, c, k: A.RPSAttributor(task(m, c, k, "pre"), "2", l2_strength=0.05), None),
        # projected methods draw one projection per checkpoint, so the ensemble rule
        # is checked without projection (a projected run is checked above)
        "logra": (lambda m, c, k: A.LoGraAttributor(task(m, c, k), damping=0.1,
                                                    proj_params={"proj_dim": 4}), None),
        "logra_exact": (lambda m, c, k: A.LoGraAttributor(
            task(m, c, k), damping=0.1, proj_params={"proj_type": "identity"}), "mean"),
        "trak_projected": (lambda m, c, k: A.TRAKAttributor(
            task(m, c, k, "margin"), _funcs(m, k)[2],
            proj_params={"proj_dim": 16, "proj_type": "normal"}, regularization=1e-2), None),
    }


FACTORIES = _factories()


def _loaders(bs: int, keyed: bool):
    (x, y), (xt, yt) = digits(24, 5, classes=3, dim=8)

    def mk(xx, yy, b):
        if keyed:
            rows = [{"x": xx[i:i + b], "y": yy[i:i + b]} for i in range(0, len(yy), b)]
            return rows
        return DataLoader(TensorDataset(xx, yy), batch_size=b)

    return mk(x, y, bs), mk(xt, yt, min(bs, 5))


def _ckpts():
    m = _model()
    base = m.state_dict()
    other = {k: v + 0.05 * torch.randn_like(v) for k, v in base.items()}
    return m, [base, other]


def _run(name, ckpts, bs=7, keyed=False, self_inf=False):
    model, _ = _ckpts()
    make, _ = FACTORIES[name]
    att = make(model, ckpts, keyed)
    train, test = _loaders(bs, keyed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name not in ("tracin", "grad_cos"):
            att.cache(train)
        if self_inf:
            return att.attribute(train, train), att.self_attribute(train)
        return att.attribute(train, test)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_attributor_invariants(name):
    _, ckpts = _ckpts()
    one = ckpts[:1]
    ref = _run(name, one)
    assert ref.shape == (24, 5) and torch.isfinite(ref).all()
    # batch sizes
    torch.testing.assert_close(_run(name, one, bs=24), ref, rtol=1e-7, atol=1e-10)
    # dict batches (RPS calls the model on the batch's inputs itself: tuples only)
    if name != "rps":
        torch.testing.assert_close(_run(name, one, keyed=True), ref, rtol=1e-7, atol=1e-10)
    # self-influence = the diagonal, without the n x n matrix
    full, diag = _run(name, one, self_inf=True)
    torch.testing.assert_close(diag, full.diagonal(), rtol=1e-7, atol=1e-10)
    # ensembles
    rule = FACTORIES[name][1]
    if rule is None:
        return
    both = _run(name, ckpts)
    singles = [_run(name, [c]) for c in ckpts]
    if rule == "mean":
        torch.testing.assert_close(both, (singles[0] + singles[1]) / 2, rtol=1e-7, atol=1e-10)
    elif rule == "sum":  # TracInCP: sum_c eta_c <g^c, g^c>, singles computed with eta = 0.3
        w = [0.3, 0.7] if name == "tracin" else [1.0, 1.0]
        first = singles[0] * (w[0] / (0.3 if name == "tracin" else 1.0))
        second = singles[1] * (w[1] / (0.3 if name == "tracin" else 1.0))
        torch.testing.assert_close(both, first + second, rtol=1e-7, atol=1e-10)
    else:  # TRAK: mean(Q) * mean_c(phi_c K_c^{-1} Phi_c^T); singles are Q_c * (...)_c
        model, _ = _ckpts()
        _, _, prob, _ = _funcs(model, False)
        train, _ = _loaders(7, False)
        qs = []
        for c in ckpts:
            model.load_state_dict(c)
            params = dict(model.named_parameters())
            qs.append(torch.cat([1 - prob(params, b) for b in train]).detach())
        want = (qs[0] + qs[1])[:, None] / 2 * (singles[0] / qs[0][:, None]
                                               + singles[1] / qs[1][:, None]) / 2
        torch.testing.assert_close(both, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_attributor_top_k_is_the_sorted_score_matrix(name):
    model, ckpts = _ckpts()
    make, _ = FACTORIES[name]
    att = make(model, ckpts[:1], False)
    train, test = _loaders(7, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        att.cache(train)
        scores = att.attribute(train, test)
        top = att.attribute(train, test, top_k=3)
    desc = torch.sort(scores, dim=0, descending=True, stable=True)
    asc = torch.sort(scores, dim=0, stable=True)
    assert torch.equal(top.proponents, desc.indices[:3].T)
    assert torch.equal(top.opponents, asc.indices[:3].T)
    torch.testing.assert_close(top.proponent_scores, desc.values[:3].T.to(top.proponent_scores.dtype))
