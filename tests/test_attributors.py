"""Attributors against dense float64 references and invariants."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from dattri.algorithm import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
    TracInAttributor,
    TRAKAttributor,
)
from dattri.errors import (
    DattriValueError,
    InvalidLossError,
    LayerNameError,
    MemoryBudgetError,
    NonFiniteError,
    ShuffledLoaderError,
)
from dattri.task import AttributionTask

from cases import (
    dense_hessian,
    digits,
    l2_loss_factory,
    loaders,
    make_lr,
    per_example_grads,
    train_full_batch,
    trained_lr,
)

REG = 1e-3


@pytest.fixture(scope="module")
def lr_case():
    (xtr, ytr), (xte, yte) = digits(120, 12, classes=3)
    model = make_lr(xtr.shape[1], 3)
    loss = l2_loss_factory(model)
    train_full_batch(model, loss, xtr, ytr)
    g_tr = per_example_grads(model, loss, xtr, ytr)
    g_te = per_example_grads(model, loss, xte, yte)
    h = dense_hessian(model, loss, xtr, ytr)
    return {
        "model": model, "loss": loss, "train": (xtr, ytr), "test": (xte, yte),
        "g_tr": g_tr, "g_te": g_te, "H": h,
    }


def _task(case, checkpoints=None):
    return AttributionTask(loss_func=case["loss"], model=case["model"],
                           checkpoints=checkpoints or case["model"].state_dict())


def _exact_if(case, reg=REG):
    h = case["H"] + reg * torch.eye(case["H"].shape[0], dtype=torch.float64)
    return case["g_tr"] @ torch.linalg.solve(h, case["g_te"].T)


def test_explicit_matches_dense_solve(lr_case):
    tr, te = loaders(lr_case["train"], lr_case["test"])
    att = IFAttributorExplicit(_task(lr_case), regularization=REG).cache(tr)
    torch.testing.assert_close(att.attribute(tr, te), _exact_if(lr_case), rtol=1e-8, atol=1e-10)


def test_cg_matches_dense_solve(lr_case):
    tr, te = loaders(lr_case["train"], lr_case["test"])
    att = IFAttributorCG(_task(lr_case), max_iter=200, tol=1e-12, regularization=REG).cache(tr)
    torch.testing.assert_close(att.attribute(tr, te), _exact_if(lr_case), rtol=1e-6, atol=1e-8)


def test_cg_rev_fwd_equals_rev_rev(lr_case):
    tr, te = loaders(lr_case["train"], lr_case["test"])
    a = IFAttributorCG(_task(lr_case), max_iter=5, mode="rev-rev").cache(tr).attribute(tr, te)
    b = IFAttributorCG(_task(lr_case), max_iter=5, mode="rev-fwd").cache(tr).attribute(tr, te)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module")
def small_case():
    """A 51-parameter LR (16 pixels, 3 classes) for the iterative solvers."""
    model, loss, (xtr, ytr), (xte, yte) = trained_lr(60, 6, classes=3, dim=16)
    return {
        "model": model, "loss": loss, "train": (xtr, ytr), "test": (xte, yte),
        "g_tr": per_example_grads(model, loss, xtr, ytr),
        "g_te": per_example_grads(model, loss, xte, yte),
        "H": dense_hessian(model, loss, xtr, ytr),
    }


def test_lissa_converges_to_dense_solve(small_case):
    tr, te = loaders(small_case["train"], small_case["test"], bs_train=60)
    top = torch.linalg.eigvalsh(small_case["H"]).max().item()
    scaling = 1.2 * top
    damping = 0.2 / scaling  # solves (H + 0.2 I)^-1; contraction <= 1 - 0.2/scaling
    att = IFAttributorLiSSA(_task(small_case), batch_size=60, recursion_depth=300,
                            damping=damping, scaling=scaling).cache(tr)
    torch.testing.assert_close(att.attribute(tr, te), _exact_if(small_case, 0.2), rtol=1e-5, atol=1e-7)


def test_lissa_row_blocks_share_each_steps_minibatch(small_case, monkeypatch):
    tr, te = loaders(small_case["train"], small_case["test"], bs_train=60)
    top = torch.linalg.eigvalsh(small_case["H"]).max().item()

    def run():
        att = IFAttributorLiSSA(_task(small_case), batch_size=20, recursion_depth=40,
                                damping=0.2 / (1.5 * top), scaling=1.5 * top).cache(tr)
        return att.attribute(tr, te)

    whole = run()
    monkeypatch.setattr("dattri.algorithm.influence_function.LISSA_CHUNK", 2)
    torch.testing.assert_close(run(), whole, rtol=1e-10, atol=1e-12)


def test_lissa_minibatch_is_unbiased_estimate(small_case):
    """Small minibatches: noisy, but still close to the exact solve on average."""
    tr, te = loaders(small_case["train"], small_case["test"], bs_train=60)
    top = torch.linalg.eigvalsh(small_case["H"]).max().item()
    att = IFAttributorLiSSA(_task(small_case), batch_size=20, recursion_depth=150, num_repeat=2,
                            damping=0.2 / (1.5 * top), scaling=1.5 * top).cache(tr)
    got, exact = att.attribute(tr, te), _exact_if(small_case, 0.2)
    assert torch.corrcoef(torch.stack([got.flatten(), exact.flatten()]))[0, 1] > 0.95


def test_arnoldi_full_rank_matches(small_case):
    tr, te = loaders(small_case["train"], small_case["test"])
    p = small_case["H"].shape[0]
    att = IFAttributorArnoldi(_task(small_case), proj_dim=p, max_iter=p, regularization=REG).cache(tr)
    torch.testing.assert_close(att.attribute(tr, te), _exact_if(small_case), rtol=1e-5, atol=1e-7)


def test_self_attribute_is_diagonal(lr_case):
    tr, _ = loaders(lr_case["train"], lr_case["test"])
    att = IFAttributorExplicit(_task(lr_case), regularization=REG).cache(tr)
    full = att.attribute(tr, tr)
    torch.testing.assert_close(att.self_attribute(tr), torch.diagonal(full), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["l", "theta"])
def test_relatif(lr_case, method):
    tr, te = loaders(lr_case["train"], lr_case["test"])
    h = lr_case["H"] + REG * torch.eye(lr_case["H"].shape[0], dtype=torch.float64)
    x = torch.linalg.solve(h, lr_case["g_tr"].T).T  # H^-1 g_i
    norm = (x * lr_case["g_tr"]).sum(1).sqrt() if method == "l" else x.norm(dim=1)
    expect = _exact_if(lr_case) / norm[:, None]
    for cls in (IFAttributorExplicit, IFAttributorCG):
        kw = {"max_iter": 150, "tol": 1e-13} if cls is IFAttributorCG else {}
        att = cls(_task(lr_case), regularization=REG, **kw).cache(tr)
        torch.testing.assert_close(att.attribute(tr, te, relatif_method=method), expect,
                                   rtol=1e-6, atol=1e-8)


def test_if_predicts_leave_one_out(lr_case):
    """IF on a convex model predicts actual LOO retraining (Pearson > 0.9)."""
    xtr, ytr = lr_case["train"]
    xte, yte = lr_case["test"]
    tr, te = loaders(lr_case["train"], lr_case["test"])
    score = IFAttributorExplicit(_task(lr_case)).cache(tr).attribute(tr, te)
    base = lr_case["model"]
    loss = lr_case["loss"]
    params0 = {k: p.detach() for k, p in base.named_parameters()}
    full = torch.stack([loss(params0, (xte[j:j + 1], yte[j:j + 1])) for j in range(len(yte))])
    removed = list(range(0, 120, 4))
    deltas = []
    for i in removed:
        keep = torch.ones(len(ytr), dtype=torch.bool)
        keep[i] = False
        m = make_lr(xtr.shape[1], 3)
        m.load_state_dict(base.state_dict())
        train_full_batch(m, l2_loss_factory(m), xtr[keep], ytr[keep])
        p = {k: v.detach() for k, v in m.named_parameters()}
        deltas.append(torch.stack([loss(p, (xte[j:j + 1], yte[j:j + 1])) for j in range(len(yte))]) - full)
    deltas = torch.stack(deltas)  # (n_removed, n_test): loss increase when removed
    pred = score[removed] / len(ytr)
    for j in range(len(yte)):
        r = torch.corrcoef(torch.stack([pred[:, j], deltas[:, j]]))[0, 1]
        assert r > 0.9, (j, r)


def test_grad_dot_equals_explicit_dot_products(lr_case):
    tr, te = loaders(lr_case["train"], lr_case["test"])
    att = TracInAttributor(_task(lr_case), weight_list=torch.ones(1), normalized_grad=False)
    torch.testing.assert_close(att.attribute(tr, te), lr_case["g_tr"] @ lr_case["g_te"].T)
    torch.testing.assert_close(att.self_attribute(tr), (lr_case["g_tr"] ** 2).sum(1))


def test_grad_cos_self_influence_is_one(lr_case):
    tr, te = loaders(lr_case["train"], lr_case["test"])
    att = TracInAttributor(_task(lr_case), weight_list=[1.0], normalized_grad=True)
    torch.testing.assert_close(att.self_attribute(tr), torch.ones(120, dtype=torch.float64))
    gtr = torch.nn.functional.normalize(lr_case["g_tr"], dim=1)
    gte = torch.nn.functional.normalize(lr_case["g_te"], dim=1)
    torch.testing.assert_close(att.attribute(tr, te), gtr @ gte.T)


def test_tracin_weighted_sum_over_checkpoints(lr_case):
    tr, te = loaders(lr_case["train"], lr_case["test"])
    sd1 = {k: v.clone() for k, v in lr_case["model"].state_dict().items()}
    sd2 = {k: v * 0.5 for k, v in sd1.items()}
    task = _task(lr_case, [sd1, sd2])
    w = torch.tensor([0.3, 0.7])
    got = TracInAttributor(task, weight_list=w, normalized_grad=False).attribute(tr, te)
    parts = []
    for sd in (sd1, sd2):
        parts.append(TracInAttributor(_task(lr_case, [sd]), [1.0], False).attribute(tr, te))
    torch.testing.assert_close(got, 0.3 * parts[0] + 0.7 * parts[1])
    # order of checkpoints (with their weights) does not matter
    swapped = TracInAttributor(_task(lr_case, [sd2, sd1]), w.flip(0), False).attribute(tr, te)
    torch.testing.assert_close(got, swapped)


def _margin_task(case):
    model = case["model"]

    def margin(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        logp = torch.log_softmax(out, dim=-1)
        p = logp.gather(1, y[:, None]).squeeze(1).exp()
        return (torch.log(p) - torch.log1p(-p)).mean()

    def prob(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        return torch.softmax(out, -1).gather(1, y[:, None]).squeeze(1)

    return AttributionTask(loss_func=margin, model=model, checkpoints=model.state_dict()), prob, margin


def test_trak_identity_projection_closed_form(lr_case):
    task, prob, margin = _margin_task(lr_case)
    tr, te = loaders(lr_case["train"], lr_case["test"])
    att = TRAKAttributor(task, prob, proj_params={"proj_type": "identity"}).cache(tr)
    got = att.attribute(te)
    model = lr_case["model"]
    phi = per_example_grads(model, margin, *lr_case["train"])
    phi_t = per_example_grads(model, margin, *lr_case["test"])
    params = {k: v.detach() for k, v in model.named_parameters()}
    q = 1 - prob(params, lr_case["train"])
    expect = q[:, None] * (phi @ torch.linalg.pinv(phi.T @ phi) @ phi_t.T)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(att.attribute(tr, te), got)


@pytest.mark.parametrize(("n", "k"), [(40, 9), (9, 40)])  # primal and dual forms
@pytest.mark.parametrize("block", [1 << 21, 20])  # float64 casts in one block / in blocks
def test_trak_kernel_factor_matches_dense_float64(n, k, block, monkeypatch):
    monkeypatch.setattr("dattri.linalg.gram.BLOCK_ELEMENTS", block)
    from dattri.algorithm.trak import kernel_factor, kernel_scores

    g = torch.Generator().manual_seed(n * k)
    phi = torch.randn(n, k, generator=g)
    test = torch.randn(5, k, generator=g)
    f, t = phi.double(), test.double()
    lam = 0.3
    expect = f @ torch.linalg.solve(f.T @ f + lam * torch.eye(k, dtype=torch.float64), t.T)
    form, factor = kernel_factor(phi, lam)
    assert form == ("primal" if k <= n else "dual")
    got = kernel_scores(phi, form, factor, test)
    assert got.dtype == phi.dtype
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)


def test_trak_projected_self_attribute_is_diagonal(lr_case):
    task, prob, _ = _margin_task(lr_case)
    tr, _ = loaders(lr_case["train"], lr_case["test"])
    for dim in (8, 400):  # fewer / more features than the 120 examples: primal / dual
        att = TRAKAttributor(task, prob, regularization=1e-3,
                             proj_params={"proj_dim": dim, "proj_type": "normal"}).cache(tr)
        full = att.attribute(tr, tr)
        torch.testing.assert_close(att.self_attribute(tr), torch.diagonal(full),
                                   rtol=1e-6, atol=1e-9)


def test_invariance_batch_size_and_dict_batches(lr_case):
    tr, te = loaders(lr_case["train"], lr_case["test"])
    ref = IFAttributorExplicit(_task(lr_case), regularization=REG).cache(tr).attribute(tr, te)
    tr2, te2 = loaders(lr_case["train"], lr_case["test"], bs_train=7, bs_test=12)
    got = IFAttributorExplicit(_task(lr_case), regularization=REG).cache(tr2).attribute(tr2, te2)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)

    class DictDS(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"x": self.x[i], "y": self.y[i]}

    model, loss = lr_case["model"], lr_case["loss"]

    def dict_loss(params, data):
        return loss(params, (data["x"], data["y"]))

    task = AttributionTask(dict_loss, model, model.state_dict())
    dtr = DataLoader(DictDS(*lr_case["train"]), batch_size=16)
    dte = DataLoader(DictDS(*lr_case["test"]), batch_size=4)
    got = IFAttributorExplicit(task, regularization=REG).cache(dtr).attribute(dtr, dte)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)


def test_layer_name_restriction(lr_case):
    tr, te = loaders(lr_case["train"], lr_case["test"])
    att = TracInAttributor(_task(lr_case), [1.0], False, layer_name="weight")
    n_w = lr_case["model"].weight.numel()
    expect = lr_case["g_tr"][:, :n_w] @ lr_case["g_te"][:, :n_w].T
    torch.testing.assert_close(att.attribute(tr, te), expect)


def test_shuffled_loader_rejected(lr_case):
    ds = TensorDataset(*lr_case["train"])
    bad = DataLoader(ds, batch_size=8, shuffle=True)
    _, te = loaders(lr_case["train"], lr_case["test"])
    att = TracInAttributor(_task(lr_case), [1.0], False)
    with pytest.raises(ShuffledLoaderError, match="shuffle=False"):
        att.attribute(bad, te)
    with pytest.raises(ShuffledLoaderError, match="test_loader"):
        att.attribute(te, DataLoader(ds, sampler=RandomSampler(ds)))


def test_weight_list_length_mismatch(lr_case):
    with pytest.raises(DattriValueError, match="weight_list has 2"):
        TracInAttributor(_task(lr_case), weight_list=[1.0, 2.0], normalized_grad=False)


def test_explicit_refuses_when_too_big(lr_case):
    tr, _ = loaders(lr_case["train"], lr_case["test"])
    att = IFAttributorExplicit(_task(lr_case), max_bytes=1000)
    with pytest.raises(MemoryBudgetError, match="IFAttributorCG"):
        att.cache(tr)


def test_nonfinite_gradients_raise(lr_case):
    sd = {k: v.clone() for k, v in lr_case["model"].state_dict().items()}
    sd["weight"][0, 0] = float("nan")
    tr, te = loaders(lr_case["train"], lr_case["test"])
    case = dict(lr_case, model=copy.deepcopy(lr_case["model"]))  # loading mutates the model
    case["loss"] = l2_loss_factory(case["model"])
    att = TracInAttributor(_task(case, [sd]), [1.0], False)
    with pytest.raises(NonFiniteError, match="NaN"):
        att.attribute(tr, te)


def test_non_scalar_loss_rejected(lr_case):
    model = lr_case["model"]

    def bad(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    tr, te = loaders(lr_case["train"], lr_case["test"])
    att = TracInAttributor(AttributionTask(bad, model, model.state_dict()), [1.0], False)
    with pytest.raises(InvalidLossError, match="scalar"):
        att.attribute(tr, te)


def test_unknown_layer_name(lr_case):
    with pytest.raises(LayerNameError, match="nope"):
        IFAttributorCG(_task(lr_case), layer_name=["nope"])


def test_attribute_caches_with_warning(lr_case):
    tr, te = loaders(lr_case["train"], lr_case["test"])
    att = IFAttributorExplicit(_task(lr_case), regularization=REG)
    with pytest.warns(UserWarning, match="cache"):
        att.attribute(tr, te)
    assert att.is_cached


def _mlp_case(seed=0):
    from cases import MLP

    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte) = digits(40, 7, classes=4, dim=20)
    model = MLP(20, 8, 4).double().eval()
    return model, (xtr, ytr), (xte, yte)


@pytest.mark.parametrize("normalized", [False, True])
def test_factored_fast_path_equals_dense(normalized):
    model, train, test = _mlp_case()
    loss = l2_loss_factory(model, 0.0)
    sd1 = {k: v.clone() for k, v in model.state_dict().items()}
    sd2 = {k: v * 0.7 for k, v in sd1.items()}
    tr, te = loaders(train, test, bs_train=9, bs_test=3)
    task = AttributionTask(loss, model, [sd1, sd2])
    fast = TracInAttributor(task, [0.2, 0.5], normalized)
    assert fast.train_features.factored is not None
    slow = TracInAttributor(task, [0.2, 0.5], normalized, fast_path=False)
    torch.testing.assert_close(fast.attribute(tr, te), slow.attribute(tr, te))
    assert fast.train_features.factored._verified == {0: True, 1: True}  # the fast path ran
    torch.testing.assert_close(fast.self_attribute(tr), slow.self_attribute(tr))
    sub = TracInAttributor(task, [0.2, 0.5], normalized, layer_name=["fc2.bias", "fc1.weight"])
    ref = TracInAttributor(task, [0.2, 0.5], normalized, layer_name=["fc2.bias", "fc1.weight"],
                           fast_path=False)
    torch.testing.assert_close(sub.attribute(tr, te), ref.attribute(tr, te))
    assert sub.train_features.factored._verified == {0: True, 1: True}


def test_factored_falls_back_when_loss_couples_examples():
    model, train, test = _mlp_case()

    def coupled(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        # batch-normalising the logits couples the examples of a batch
        out = out - out.mean(0, keepdim=True) if out.shape[0] > 1 else out
        return torch.nn.functional.cross_entropy(out, y)

    tr, te = loaders(train, test, bs_train=10, bs_test=7)
    task = AttributionTask(coupled, model, model.state_dict())
    att = TracInAttributor(task, [1.0], False)
    got = att.attribute(tr, te)
    assert att.train_features.factored._verified == {0: False}
    expect = per_example_grads(model, coupled, *train) @ per_example_grads(model, coupled, *test).T
    torch.testing.assert_close(got, expect)


@pytest.mark.parametrize(("perturb", "accepted"), [(3e-4, True), (0.05, False)])
def test_factored_check_tolerates_rounding_not_mismatch(perturb, accepted):
    # the fast path is compared with dense gradients per example, in norm: float32
    # rounding of the two computation orders (up to ~1e-4 through an ill-conditioned
    # output function) passes; a mismatch in one example's gradient does not
    from dattri.algorithm._factored import FactoredLinearFeaturizer

    model, train, _ = _mlp_case()
    task = AttributionTask(l2_loss_factory(model, 0.0), model, model.state_dict())
    fz = FactoredLinearFeaturizer(task, "loss", None, torch.device("cpu"))
    batch = (train[0][:4], train[1][:4])
    exact = fz.try_batch(batch, 0).dense()
    g = torch.Generator().manual_seed(0)

    def dense(_batch, _ckpt):
        noise = torch.randn(exact.shape, generator=g)
        noise[1:] = 0  # only the first example differs
        return exact + perturb * exact[0].norm() * noise / noise.norm()

    assert fz.verify(batch, 0, dense) is accepted


def test_factored_falls_back_when_loss_calls_another_model_instance():
    # published-dattri style: the loss closes over its own copy of the architecture;
    # the task's model is never called, so its hooks capture nothing -> dense path
    model, train, test = _mlp_case()
    twin = copy.deepcopy(model)

    def loss(params, data):
        x, y = data
        return torch.nn.functional.cross_entropy(torch.func.functional_call(twin, params, (x,)), y)

    tr, te = loaders(train, test, bs_train=10, bs_test=7)
    att = TracInAttributor(AttributionTask(loss, model, model.state_dict()), [1.0], False)
    got = att.attribute(tr, te)
    assert att.train_features.factored._verified == {0: False}
    expect = per_example_grads(model, loss, *train) @ per_example_grads(model, loss, *test).T
    torch.testing.assert_close(got, expect)


def test_rps_representer_decomposition():
    """After L2 fine-tuning, sum_j alpha_j k(h_j, h_t) reproduces the pre-activation."""
    from dattri.algorithm import RPSAttributor

    model, train, test = _mlp_case(1)
    tr, te = loaders(train, test, bs_train=16, bs_test=4)
    task = AttributionTask(lambda pre, y: torch.nn.functional.cross_entropy(pre, y), model,
                           model.state_dict())
    att = RPSAttributor(task, "fc2", l2_strength=0.05, epoch=500).cache(tr)
    parts = att.decompose(te)  # (n_train, n_test, C)
    h_t = torch.tanh(model.fc1(test[0])).detach()
    h_t = torch.cat([h_t, torch.ones(len(h_t), 1, dtype=h_t.dtype)], 1)
    pre = h_t @ att.weight.T
    # exact at a stationary point; L-BFGS stops within ~1e-7 of it
    torch.testing.assert_close(parts.sum(0), pre, rtol=1e-5, atol=1e-6)
    scores = att.attribute(tr, te)
    torch.testing.assert_close(scores, parts[:, torch.arange(len(test[1])), test[1]])
    self_inf = att.self_attribute(tr)
    assert self_inf.shape == (len(train[1]),)
    with pytest.raises(DattriValueError, match="fc1.*nn.Linear|not an nn.Linear"):
        RPSAttributor(task, "drop")


@pytest.mark.parametrize("method", [None, "l", "theta"])
def test_arnoldi_low_rank_scoring_equals_generic(small_case, method):
    """The projected fast path equals the generic P-dimensional IHVP path."""
    from dattri.algorithm.influence_function import _IFBase

    tr, te = loaders(small_case["train"], small_case["test"])
    att = IFAttributorArnoldi(_task(small_case), proj_dim=10, max_iter=30, regularization=REG,
                              norm_constant=2.0).cache(tr)
    fast = att.attribute(tr, te, relatif_method=method)
    generic = _IFBase.attribute(att, tr, te, relatif_method=method)
    torch.testing.assert_close(fast, generic, rtol=1e-7, atol=1e-9)


def test_arnoldi_eigen_store_runs_one_iteration_for_a_regularization_search(small_case, monkeypatch):
    import dattri.linalg.solvers as S

    tr, te = loaders(small_case["train"], small_case["test"])
    calls = []
    real = S.arnoldi
    monkeypatch.setattr(S, "arnoldi", lambda *a, **k: calls.append(1) or real(*a, **k))
    store = {}
    for reg in (1e-3, 1e-1):
        kw = {"proj_dim": 10, "max_iter": 30, "regularization": reg}
        shared = IFAttributorArnoldi(_task(small_case), eigen_store=store, **kw).cache(tr)
        plain = IFAttributorArnoldi(_task(small_case), **kw).cache(tr)
        torch.testing.assert_close(shared.attribute(tr, te), plain.attribute(tr, te),
                                   rtol=1e-10, atol=1e-12)
    assert len(calls) == 3  # the shared one once, the plain ones twice
    with pytest.raises(DattriValueError, match="eigen_store"):
        IFAttributorArnoldi(_task(small_case), eigen_store=[])


def test_explicit_hessian_store_reuses_the_hessian(lr_case, monkeypatch):
    import dattri.algorithm.influence_function as IF

    tr, te = loaders(lr_case["train"], lr_case["test"])
    calls = []
    real = IF.dense_hessian
    monkeypatch.setattr(IF, "dense_hessian", lambda *a, **k: calls.append(1) or real(*a, **k))
    store = {}
    for reg in (1e-3, 1e-1):
        att = IFAttributorExplicit(_task(lr_case), regularization=reg, hessian_store=store)
        torch.testing.assert_close(att.cache(tr).attribute(tr, te), _exact_if(lr_case, reg),
                                   rtol=1e-8, atol=1e-10)
    assert len(calls) == 1
    with pytest.raises(DattriValueError, match="hessian_store"):
        IFAttributorExplicit(_task(lr_case), hessian_store=[])
