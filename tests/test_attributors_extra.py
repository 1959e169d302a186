"""DataInf, EK-FAC, LoGra, FactGraSS and KNN-Shapley against float64 references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import (
    DVEmbAttributor,
    FactGraSSAttributor,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    KNNShapleyAttributor,
    LoGraAttributor,
    TracInAttributor,
)
from dattri.params.projection import FactGrassProjectionParams, LoGraProjectionParams
from dattri.errors import DattriValueError, LayerNameError, NotCachedError
from dattri.task import AttributionTask

from cases import MLP, digits, loaders, make_lr, per_example_grads

D64 = torch.float64


def ce_loss_factory(model: nn.Module):
    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return loss


@pytest.fixture(scope="module")
def lr():
    (xtr, ytr), (xte, yte) = digits(40, 6, classes=3, dim=12)
    model = make_lr(12, 3, seed=1)
    loss = ce_loss_factory(model)
    return {"model": model, "loss": loss, "train": (xtr, ytr), "test": (xte, yte),
            "g_tr": per_example_grads(model, loss, xtr, ytr),
            "g_te": per_example_grads(model, loss, xte, yte)}


@pytest.fixture(scope="module")
def mlp():
    (xtr, ytr), (xte, yte) = digits(30, 5, classes=3, dim=10)
    torch.manual_seed(3)
    model = MLP(10, 6, 3).double()
    loss = ce_loss_factory(model)
    return {"model": model, "loss": loss, "train": (xtr, ytr), "test": (xte, yte),
            "g_tr": per_example_grads(model, loss, xtr, ytr),
            "g_te": per_example_grads(model, loss, xte, yte)}


def _task(case):
    return AttributionTask(loss_func=case["loss"], model=case["model"],
                           checkpoints=case["model"].state_dict())


def _blocks(model):
    out, start = [], 0
    for _, p in model.named_parameters():
        out.append(slice(start, start + p.numel()))
        start += p.numel()
    return out


def _layer_mats(model, g, modules):
    """Flat per-example grads -> per-module ``(n, d_out, d_in + 1)`` ``[dW | db]``."""
    named = dict(zip([k for k, _ in model.named_parameters()], _blocks(model)))
    out = {}
    for m in modules:
        pre = f"{m}." if m else ""
        w = g[:, named[pre + "weight"]]
        b = g[:, named[pre + "bias"]]
        d_out = b.shape[1]
        out[m] = torch.cat([w.reshape(g.shape[0], d_out, -1), b[:, :, None]], dim=2)
    return out


# -------------------------------------------------------------------- DataInf
def _datainf_dense(g_tr, g_te, blocks, lams, m):
    """Average of exact per-example damped inverses, block by block (dense)."""
    x = torch.zeros_like(g_te)
    for sl, lam in zip(blocks, lams):
        gl = g_tr[:m, sl]
        eye = torch.eye(gl.shape[1], dtype=D64)
        inv = sum(torch.linalg.inv(torch.outer(g, g) + lam * eye) for g in gl) / m
        x[:, sl] = g_te[:, sl] @ inv
    return g_tr @ x.T


@pytest.mark.parametrize("reg", [0.05, 0.0])
def test_datainf_matches_dense_average_of_inverses(mlp, reg):
    tr, te = loaders(mlp["train"], mlp["test"], bs_train=8)
    att = IFAttributorDataInf(_task(mlp), regularization=reg, fim_estimate_data_ratio=0.5).cache(tr)
    blocks, m = _blocks(mlp["model"]), 15
    if reg:
        lams = [reg] * len(blocks)
    else:
        lams = [0.1 * float((mlp["g_tr"][:m, sl] ** 2).sum(1).mean()) / (sl.stop - sl.start)
                for sl in blocks]
    torch.testing.assert_close(torch.tensor(att.block_lambdas(), dtype=D64), torch.tensor(lams, dtype=D64))
    expect = _datainf_dense(mlp["g_tr"], mlp["g_te"], blocks, lams, m)
    torch.testing.assert_close(att.attribute(tr, te), expect, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)))


def test_datainf_one_example_is_exact_inverse(lr):
    x, y = lr["train"]
    tr = DataLoader(TensorDataset(x[:1], y[:1]), batch_size=1)
    _, te = loaders(lr["train"], lr["test"])
    att = IFAttributorDataInf(_task(lr), layer_name="weight", regularization=0.01).cache(tr)
    g, gt = lr["g_tr"][:1, :36], lr["g_te"][:, :36]
    expect = g @ torch.linalg.solve(g.T @ g + 0.01 * torch.eye(36, dtype=D64), gt.T)
    torch.testing.assert_close(att.attribute(tr, te), expect, rtol=1e-9, atol=1e-12)


def test_datainf_large_lambda_tends_to_exact_inverse(lr):
    tr, te = loaders(lr["train"], lr["test"])
    g, gt = lr["g_tr"][:, :36], lr["g_te"][:, :36]
    scale = float((g ** 2).sum(1).mean())
    errs = []
    for mult in (0.1, 10.0, 1000.0):
        lam = mult * scale
        att = IFAttributorDataInf(_task(lr), layer_name="weight", regularization=lam).cache(tr)
        exact = g @ torch.linalg.solve(g.T @ g / len(g) + lam * torch.eye(36, dtype=D64), gt.T)
        errs.append(float((att.attribute(tr, te) - exact).norm() / exact.norm()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5, errs


def test_datainf_relatif(mlp):
    tr, te = loaders(mlp["train"], mlp["test"])
    att = IFAttributorDataInf(_task(mlp), regularization=0.1).cache(tr)
    raw = att.attribute(tr, te)
    blocks = _blocks(mlp["model"])
    xi = _datainf_dense(mlp["g_tr"], torch.eye(mlp["g_tr"].shape[1], dtype=D64), blocks,
                        [0.1] * len(blocks), 30)  # rows: g_i^T H^-1
    norm = (xi * mlp["g_tr"]).sum(1).sqrt()
    torch.testing.assert_close(att.attribute(tr, te, relatif_method="l"), raw / norm[:, None])


def test_datainf_errors(lr):
    with pytest.raises(DattriValueError, match="fim_estimate_data_ratio=0"):
        IFAttributorDataInf(_task(lr), fim_estimate_data_ratio=0)
    with pytest.raises(DattriValueError, match="regularization=-1"):
        IFAttributorDataInf(_task(lr), regularization=-1)
    with pytest.raises(NotCachedError, match="cache"):
        IFAttributorDataInf(_task(lr)).block_lambdas()


# --------------------------------------------------------------------- EK-FAC
def _lr_factors(lr, x, y):
    """Inputs [x, 1] and per-example output gradients p - onehot(y) of the LR layer."""
    model = lr["model"]
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    s = p - nn.functional.one_hot(y, 3).to(D64)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=D64)], dim=1)
    return a, s


def test_ekfac_matches_dense_kronecker_eigenbasis(lr):
    tr, te = loaders(lr["train"], lr["test"], bs_train=16)
    damping = 1e-3
    att = IFAttributorEKFAC(_task(lr), damping=damping).cache(tr)
    a, s = _lr_factors(lr, *lr["train"])
    n = len(a)
    A, S = a.T @ a / n, s.T @ s / n
    qa, qs = torch.linalg.eigh(A)[1], torch.linalg.eigh(S)[1]
    G = _layer_mats(lr["model"], lr["g_tr"], [""])[""]
    Gt = _layer_mats(lr["model"], lr["g_te"], [""])[""]
    torch.testing.assert_close(G, s[:, :, None] * a[:, None, :])  # G = s a^T
    Q = torch.kron(qs, qa)  # columns: Kronecker eigenbasis of S (x) A, row-major vec
    lam = ((G.flatten(1) @ Q) ** 2).mean(0)  # corrected eigenvalues
    finv = Q @ torch.diag(1 / (lam + damping)) @ Q.T
    expect = G.flatten(1) @ finv @ Gt.flatten(1).T
    torch.testing.assert_close(att.attribute(tr, te), expect, rtol=1e-7, atol=1e-9)
    _, _, lam_att = att.factors()[""]
    torch.testing.assert_close(lam_att.flatten().sort().values, lam.sort().values)
    torch.testing.assert_close(att.self_attribute(tr), torch.diagonal(G.flatten(1) @ finv @ G.flatten(1).T))
    norm = (G.flatten(1) @ finv).norm(dim=1)  # RelatIF "theta": ||F^-1 g_i||
    torch.testing.assert_close(att.attribute(tr, te, relatif_method="theta"), expect / norm[:, None],
                               rtol=1e-7, atol=1e-9)


def test_ekfac_one_example_is_exact_damped_fisher_inverse(lr):
    x, y = lr["train"]
    tr = DataLoader(TensorDataset(x[:1], y[:1]), batch_size=1)
    _, te = loaders(lr["train"], lr["test"])
    att = IFAttributorEKFAC(_task(lr), module_name="", damping=0.05).cache(tr)
    G = _layer_mats(lr["model"], lr["g_tr"][:1], [""])[""].flatten(1)
    Gt = _layer_mats(lr["model"], lr["g_te"], [""])[""].flatten(1)
    F = G.T @ G + 0.05 * torch.eye(G.shape[1], dtype=D64)
    torch.testing.assert_close(att.attribute(tr, te), G @ torch.linalg.solve(F, Gt.T),
                               rtol=1e-8, atol=1e-10)


class _SeqNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x: (B, T, 4) -> mean over positions
        return self.head(torch.tanh(self.emb(x))).mean(dim=1)


def test_hook_gradients_of_sequence_model_equal_autograd():
    torch.manual_seed(0)
    model = _SeqNet().double()
    loss = ce_loss_factory(model)
    x, y = torch.randn(7, 6, 4, dtype=D64), torch.randint(0, 3, (7,))
    tr = DataLoader(TensorDataset(x, y), batch_size=3)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    att = IFAttributorEKFAC(task, damping=0.1)
    mats = _layer_mats(model, per_example_grads(model, loss, x, y), ["emb", "head"])
    expect = torch.cat([mats["emb"].flatten(1), mats["head"].flatten(1)], dim=1)
    torch.testing.assert_close(att.train_features.all(tr, 0), expect, rtol=1e-10, atol=1e-12)
    att.cache(tr)
    s = att.attribute(tr, tr)
    torch.testing.assert_close(s, s.T, rtol=1e-8, atol=1e-10)  # same loss: symmetric
    assert bool((torch.diagonal(s) > 0).all())


def test_ekfac_errors(lr, mlp):
    with pytest.raises(LayerNameError, match="not nn.Linear"):
        IFAttributorEKFAC(_task(mlp), module_name="drop")
    with pytest.raises(DattriValueError, match="damping=-1"):
        IFAttributorEKFAC(_task(lr), damping=-1)
    conv = nn.Sequential(nn.Conv1d(2, 2, 3, groups=2)).double()  # grouped: not a K-FAC layer
    task = AttributionTask(loss_func=lambda p, d: d[0].sum(), model=conv,
                           checkpoints=conv.state_dict())
    with pytest.raises(DattriValueError, match="no nn.Linear"):
        IFAttributorEKFAC(task)


# ---------------------------------------------------------- LoGra / FactGraSS
def _projected_reference(att, case, damping, hessian="eFIM"):
    """Explicit per-example grads times kron(P_out, P_in) [P2], then the damped IF."""
    mods = att.module_name
    mats = att.projection_matrices()
    g_tr = _layer_mats(case["model"], case["g_tr"], mods)
    g_te = _layer_mats(case["model"], case["g_te"], mods)
    total = 0
    for m in mods:
        p_out, p_in, p2 = mats[m]
        proj = torch.kron(p_out, p_in) if p2 is None else torch.kron(p_out, p_in) @ p2
        f_tr, f_te = g_tr[m].flatten(1) @ proj, g_te[m].flatten(1) @ proj
        if hessian == "Identity":
            total = total + f_tr @ f_te.T
            continue
        fisher = f_tr.T @ f_tr / len(f_tr)
        # relative damping (the published meaning): lambda_l = damping * trace(F_l) / k_l
        lam = (0.1 if damping is None else damping) * float(torch.diagonal(fisher).mean())
        eye = torch.eye(len(fisher), dtype=D64)
        total = total + f_tr @ torch.linalg.solve(fisher + lam * eye, f_te.T)
    return total


@pytest.mark.parametrize(("damping", "hessian"), [(1e-3, "eFIM"), (None, "eFIM"), (None, "Identity")])
def test_logra_matches_explicit_kronecker_projection(mlp, damping, hessian):
    tr, te = loaders(mlp["train"], mlp["test"], bs_train=8)
    pp = LoGraProjectionParams(proj_dim=9, proj_type="normal", proj_seed=2)
    att = LoGraAttributor(_task(mlp), hessian=hessian, damping=damping, proj_params=pp).cache(tr)
    p_out, p_in, _ = att.projection_matrices()["fc1"]
    assert p_out.shape == (6, 3) and p_in.shape == (11, 3)  # 10 inputs + bias
    assert att.projection_matrices()["fc2"][0].shape == (3, 3)  # 3 outputs: not projected
    torch.testing.assert_close(att.projection_matrices()["fc2"][0], torch.eye(3, dtype=D64))
    expect = _projected_reference(att, mlp, damping, hessian)
    torch.testing.assert_close(att.attribute(tr, te), expect, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)))


def test_logra_identity_projection_is_grad_dot(mlp):
    tr, te = loaders(mlp["train"], mlp["test"])
    att = LoGraAttributor(_task(mlp), hessian="Identity", proj_params={"proj_type": "identity"})
    got = att.cache(tr).attribute(tr, te)
    ref = TracInAttributor(_task(mlp), weight_list=[1.0], normalized_grad=False).attribute(tr, te)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)


def test_factgrass_matches_explicit_masks_and_sjlt(mlp):
    tr, te = loaders(mlp["train"], mlp["test"], bs_train=8)
    pp = FactGrassProjectionParams(proj_dim=4, proj_type="sjlt", proj_seed=1)
    att = FactGraSSAttributor(_task(mlp), damping=1e-2, proj_params=pp, blowup_factor=4).cache(tr)
    p_out, p_in, p2 = att.projection_matrices()["fc1"]
    assert p_in.shape == (11, 4) and p_out.shape == (6, 4) and p2.shape == (16, 4)
    assert bool(((p_in != 0).sum(0) == 1).all())  # a mask: one coordinate per column
    expect = _projected_reference(att, mlp, 1e-2)
    torch.testing.assert_close(att.attribute(tr, te), expect, rtol=1e-7, atol=1e-9)


def test_projected_attributor_errors(mlp):
    with pytest.raises(DattriValueError, match="proj_dim_per_layer=10 must be a perfect square"):
        LoGraAttributor(_task(mlp), proj_params={"proj_dim": 10})
    with pytest.raises(DattriValueError, match="hessian='exact'"):
        LoGraAttributor(_task(mlp), hessian="exact")
    with pytest.raises(DattriValueError, match="damping=-0.5"):
        FactGraSSAttributor(_task(mlp), damping=-0.5)
    with pytest.raises(DattriValueError, match="blowup_factor=0"):
        FactGraSSAttributor(_task(mlp), blowup_factor=0)
    with pytest.raises(DattriValueError, match="unknown field"):
        LoGraAttributor(_task(mlp), proj_params={"dim": 4})


# ---------------------------------------------------------------- KNN-Shapley
def _brute_force_shapley(dist, y_tr, y_te, k):
    n = len(y_tr)

    def utility(subset):
        if not subset:
            return 0.0
        near = sorted(subset, key=lambda i: (float(dist[i]), i))[:k]
        return sum(float(y_tr[i] == y_te) for i in near) / k

    vals = [0.0] * n
    perms = list(itertools.permutations(range(n)))
    for perm in perms:
        prefix = []
        for i in perm:
            vals[i] += utility([*prefix, i]) - utility(prefix)
            prefix.append(i)
    return torch.tensor(vals, dtype=D64) / len(perms)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_knn_shapley_equals_permutation_enumeration(k):
    gen = torch.Generator().manual_seed(k)
    x_tr, y_tr = torch.randn(6, 3, generator=gen, dtype=D64), torch.randint(0, 2, (6,), generator=gen)
    x_te, y_te = torch.randn(3, 3, generator=gen, dtype=D64), torch.tensor([0, 1, 1])
    tr, te = loaders((x_tr, y_tr), (x_te, y_te), bs_train=4, bs_test=2)
    got = KNNShapleyAttributor(k_neighbors=k).cache(tr).attribute(tr, te)
    assert got.shape == (6, 3)
    dist = torch.cdist(x_tr, x_te)
    for j in range(3):
        expect = _brute_force_shapley(dist[:, j], y_tr, y_te[j], k)
        torch.testing.assert_close(got[:, j], expect, rtol=1e-12, atol=1e-12)
        # efficiency: the values sum to U(all) - U(empty)
        near = torch.argsort(dist[:, j])[:k]
        assert math.isclose(float(got[:, j].sum()), float((y_tr[near] == y_te[j]).double().sum()) / k,
                            abs_tol=1e-12)


def test_knn_shapley_feature_func_and_errors():
    x = torch.randn(8, 2, 2, dtype=D64)
    y = torch.arange(8) % 2
    tr = DataLoader(TensorDataset(x, y), batch_size=3)
    att = KNNShapleyAttributor(3, feature_func=lambda b: b[0].sum(-1)).cache(tr)
    got = att.attribute(tr, tr)
    flat = DataLoader(TensorDataset(x.sum(-1), y), batch_size=8)
    torch.testing.assert_close(got, KNNShapleyAttributor(3).cache(flat).attribute(flat, flat))
    with pytest.raises(DattriValueError, match="k_neighbors=0"):
        KNNShapleyAttributor(0)
    bad = KNNShapleyAttributor(2, distance_func=lambda u, v: u @ v.T[:, :1]).cache(tr)
    with pytest.raises(DattriValueError, match="distance_func returned shape"):
        bad.attribute(tr, tr)
    with pytest.raises(DattriValueError, match="label_func"):
        KNNShapleyAttributor(2).cache(DataLoader(TensorDataset(x), batch_size=4))


def test_float32_models_run_and_stay_float32():
    torch.manual_seed(0)
    model = MLP(5, 4, 3)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    tr = DataLoader(TensorDataset(x, y), batch_size=5)
    task = AttributionTask(loss_func=ce_loss_factory(model), model=model,
                           checkpoints=model.state_dict())
    for att in (IFAttributorDataInf(task), IFAttributorEKFAC(task, damping=1e-3),
                LoGraAttributor(task, proj_params={"proj_dim": 4}),
                FactGraSSAttributor(task, proj_params={"proj_dim": 4})):
        s = att.cache(tr).attribute(tr, tr)
        assert s.dtype == torch.float32 and s.shape == (12, 12) and bool(torch.isfinite(s).all())


# ---------------------------------------------------------------------- DVEmb
@pytest.fixture(scope="module")
def sgd_run():
    """A 15-parameter LR trained by 6 minibatch SGD steps; checkpoints before each step."""
    (x, y), (xte, yte) = digits(10, 4, classes=3, dim=4)
    model = make_lr(4, 3, seed=2)
    loss = ce_loss_factory(model)
    gen = torch.Generator().manual_seed(0)
    steps, ckpts = [], []
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    for t in range(6):
        idx = torch.randperm(10, generator=gen)[:3].tolist()
        lr = 0.5 / (1 + t)
        ckpts.append({k: v.clone() for k, v in params.items()})
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        gs = torch.autograd.grad(loss(p, (x[idx], y[idx])), list(p.values()))
        params = {k: v - lr * g for (k, v), g in zip(params.items(), gs)}
        steps.append((idx, lr))
    ckpts.append(params)
    return {"model": model, "loss": loss, "train": (x, y), "test": (xte, yte),
            "steps": steps, "ckpts": ckpts}


def _grads_at(run, params, x, y):
    m = run["model"]
    m.load_state_dict(params)
    return per_example_grads(m, run["loss"], x, y)


def test_dvemb_matches_dense_product_of_step_operators(sgd_run):
    (x, y), (xte, yte) = sgd_run["train"], sgd_run["test"]
    steps, ckpts = sgd_run["steps"], sgd_run["ckpts"]
    task = AttributionTask(loss_func=sgd_run["loss"], model=sgd_run["model"], checkpoints=ckpts)
    tr, te = loaders(sgd_run["train"], sgd_run["test"], bs_train=4)
    got = DVEmbAttributor(task, steps).cache(tr).attribute(tr, te)
    g_te = _grads_at(sgd_run, ckpts[-1], xte, yte)
    eye = torch.eye(15, dtype=D64)
    ops = []
    for (idx, lr), ck in zip(steps, ckpts[:-1]):
        g = _grads_at(sgd_run, ck, x[idx], y[idx])
        ops.append((g, eye - lr / len(idx) * g.T @ g))
    expect = torch.zeros(10, 4, dtype=D64)
    for t, (idx, lr) in enumerate(steps):
        prod = eye
        for k in range(t + 1, len(steps)):
            prod = ops[k][1] @ prod
        e = lr / len(idx) * ops[t][0] @ prod.T  # rows: e_t(z)
        expect.index_add_(0, torch.tensor(idx), e @ g_te.T)
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-12)
    unused = sorted(set(range(10)) - {i for idx, _ in steps for i in idx})
    assert all(float(got[i].abs().max()) == 0 for i in unused)
    att = DVEmbAttributor(task, steps, proj_params={"proj_dim": 8, "proj_type": "normal"})
    assert att.cache(tr).embeddings().shape == (10, 8)


def test_dvemb_errors(sgd_run):
    task = AttributionTask(loss_func=sgd_run["loss"], model=sgd_run["model"],
                           checkpoints=sgd_run["ckpts"])
    with pytest.raises(DattriValueError, match="steps has 5 entries"):
        DVEmbAttributor(task, sgd_run["steps"][:5])
    bad = [([0, 99], 0.1)] + sgd_run["steps"][1:]
    tr, _ = loaders(sgd_run["train"], sgd_run["test"])
    with pytest.raises(DattriValueError, match="outside 0..9"):
        DVEmbAttributor(task, bad).cache(tr)
    with pytest.raises(NotCachedError, match="cache"):
        DVEmbAttributor(task, sgd_run["steps"]).embeddings()
