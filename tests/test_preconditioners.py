"""The precondition seam (``dattri.linalg.operators``): each operator against its dense
float64 definition, and ``attributor.preconditioner(c)`` against the inverse of a dense
Hessian."""

from __future__ import annotations

import pytest
import torch

from dattri.algorithm import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorExplicit,
    TRAKAttributor,
    TracInAttributor,
)
from dattri.errors import NotCachedError
from dattri.linalg.operators import (
    BlockDiagonalPreconditioner,
    EigenbasisPreconditioner,
    GramPreconditioner,
    KroneckerEigenPreconditioner,
    Preconditioner,
)
from dattri.task import AttributionTask

from cases import correct_probability, dense_hessian, loaders, per_example_grads, trained_lr

D = torch.float64


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=D)
    return a @ a.T + 0.5 * torch.eye(d, dtype=D)


def test_eigenbasis_is_the_low_rank_inverse():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=D))
    vecs, vals = q[:, :3].T, torch.tensor([4.0, 2.0, 0.5], dtype=D)
    op = EigenbasisPreconditioner(vecs, vals, scale=2.0)
    want = vecs.T @ torch.diag(1 / (2.0 * vals)) @ vecs
    torch.testing.assert_close(op.to_dense(), want)
    v = torch.randn(4, 6, dtype=D)
    torch.testing.assert_close((op.project(v) * op.inverse_eigenvalues) @ vecs, op.solve(v))
    torch.testing.assert_close(op.solve(v[0]), op.solve(v)[0])  # one vector


def test_block_diagonal_solves_each_block_and_keeps_identity_blocks():
    m1, m2 = _spd(3, 1), _spd(2, 2)
    op = BlockDiagonalPreconditioner([
        (slice(0, 3), lambda v: torch.linalg.solve(m1, v.T).T),
        (slice(3, 5), None),
        (slice(5, 7), lambda v: torch.linalg.solve(m2, v.T).T)])
    want = torch.block_diag(torch.linalg.inv(m1), torch.eye(2, dtype=D), torch.linalg.inv(m2))
    torch.testing.assert_close(op.to_dense(), want)
    with pytest.raises(ValueError, match="width 6, expected 7"):
        op.solve(torch.zeros(2, 6, dtype=D))


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_kronecker_eigen_equals_the_dense_kronecker_inverse(damping):
    d_out, d_a = 2, 3
    qs, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=torch.Generator().manual_seed(3), dtype=D))
    qa, _ = torch.linalg.qr(torch.randn(d_a, d_a, generator=torch.Generator().manual_seed(4), dtype=D))
    lam = torch.tensor([[1.0, 2.0, 0.0], [0.5, 3.0, 4.0]], dtype=D)  # one zero eigenvalue
    op = KroneckerEigenPreconditioner([(slice(1, 7), qa, qs, lam)], damping, chunk_bytes=8)
    # vec(V) row-major (out, a): vec(Q_S X Q_A^T) = (Q_S kron Q_A) vec(X)
    q = torch.kron(qs, qa)
    lam_d = lam.flatten() + damping
    inv = torch.where(lam_d > 1e-12, 1 / torch.where(lam_d > 1e-12, lam_d, 1.0), 0.0)
    block = q @ torch.diag(inv) @ q.T
    v = torch.randn(5, 7, dtype=D)
    out = op.solve(v)  # column 0 is outside every block (not written)
    torch.testing.assert_close(out[:, 1:], v[:, 1:] @ block)
    owned = v.clone()
    res = op.solve_owned(owned)
    assert res.data_ptr() == owned.data_ptr()
    torch.testing.assert_close(res[:, 1:], v[:, 1:] @ block)
    # in the eigenbasis: coordinates X = Q_S^T V Q_A (vec: V @ q), solved by the
    # division alone, are the coordinates of the standard solve
    rot = op.in_eigenbasis([True])
    coords = v.clone()
    coords[:, 1:] = v[:, 1:] @ q
    torch.testing.assert_close(rot.solve(coords)[:, 1:], (v[:, 1:] @ block) @ q)
    assert "1 in their eigenbasis" in repr(rot)
    with pytest.raises(ValueError, match="rotated has 2 flags for 1 layers"):
        op.in_eigenbasis([True, False])


@pytest.fixture(scope="module")
def lr_case():
    model, loss, train, test = trained_lr(60, 6, classes=3, dim=16)
    return model, loss, train, test, dense_hessian(model, loss, *train)


@pytest.mark.parametrize("make", ["explicit", "cg", "arnoldi"])
def test_attributor_preconditioner_is_the_damped_inverse_hessian(lr_case, make):
    model, loss, train, test, h = lr_case
    task = AttributionTask(loss, model, model.state_dict())
    p, reg = h.shape[0], 0.05
    att = {"explicit": lambda: IFAttributorExplicit(task, regularization=reg),
           "cg": lambda: IFAttributorCG(task, max_iter=300, tol=1e-14, regularization=reg),
           "arnoldi": lambda: IFAttributorArnoldi(task, proj_dim=p, max_iter=p, regularization=reg),
           }[make]()
    with pytest.raises(NotCachedError, match="needs cache"):
        att.preconditioner(0)
    tr, _ = loaders(train, test)
    op = att.cache(tr).preconditioner(0)
    assert isinstance(op, Preconditioner) and op.dim == p
    want = torch.linalg.inv(h + reg * torch.eye(p, dtype=D))
    g = per_example_grads(model, loss, *test)
    torch.testing.assert_close(op.solve(g), g @ want, rtol=1e-5, atol=1e-7)
    if make == "arnoldi":  # the inverse on the Krylov space it found (the gradients' span)
        assert isinstance(op, EigenbasisPreconditioner)
    else:
        torch.testing.assert_close(op.to_dense(), want, rtol=1e-5, atol=1e-7)


def test_datainf_preconditioner_is_its_block_formula(lr_case):
    # DataInf (Kwon et al. 2024): per block, (1/n sum_i (g g^T + lam I)^{-1}) by
    # Sherman-Morrison of each example's rank-one term
    model, loss, train, test, _ = lr_case
    task = AttributionTask(loss, model, model.state_dict())
    tr, _ = loaders(train, test)
    att = IFAttributorDataInf(task, regularization=0.3).cache(tr)
    op = att.preconditioner(0)
    g = per_example_grads(model, loss, *train)
    want = torch.zeros(g.shape[1], g.shape[1], dtype=D)
    for sl in task.param_spec(None).slices().values():  # one block per parameter tensor
        eye = torch.eye(sl.stop - sl.start, dtype=D)
        for gi in g[:, sl]:
            want[sl, sl] += torch.linalg.inv(torch.outer(gi, gi) + 0.3 * eye) / g.shape[0]
    torch.testing.assert_close(op.to_dense(), want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n, reg", [(60, 0.1), (16, 0.1), (16, 0.0)])
def test_trak_preconditioner_is_the_inverse_gram(lr_case, n, reg):
    # TRAK with the identity projection: Phi = the per-example gradients (n, 51);
    # 60 rows factor the primal 51 x 51 Gram matrix, 16 the dual 16 x 16 one, whose
    # operator is Woodbury's form (reg > 0) or the pseudo-inverse of Phi^T Phi (0;
    # Phi's 16 singular values span 2.3 .. 0.0085, so the pseudo-inverse is stable)
    model, loss, train, test, _ = lr_case
    task = AttributionTask(loss, model, model.state_dict())
    x, y = train[0][:n], train[1][:n]
    tr, _ = loaders((x, y), test)
    att = TRAKAttributor(task, correct_probability(model), regularization=reg,
                         proj_params={"proj_type": "identity"})
    with pytest.raises(NotCachedError, match="needs cache"):
        att.preconditioner(0)
    op = att.cache(tr).preconditioner(0)
    assert isinstance(op, GramPreconditioner) and op.form == ("primal" if n == 60 else "dual")
    phi = per_example_grads(model, loss, x, y)
    gram = phi.T @ phi
    want = (torch.linalg.inv(gram + reg * torch.eye(gram.shape[0], dtype=D)) if reg
            else torch.linalg.pinv(gram, hermitian=True))
    scale = want.abs().max()
    torch.testing.assert_close(op.to_dense() / scale, want / scale, rtol=1e-7, atol=1e-9)
    g = per_example_grads(model, loss, *test)  # rows, and one vector
    torch.testing.assert_close(op.solve(g[0]), op.solve(g)[0])


def test_a_method_without_a_preconditioner_says_so(lr_case):
    model, loss, train, test, _ = lr_case
    tr, _ = loaders(train, test)
    task = AttributionTask(loss, model, model.state_dict())
    att = TracInAttributor(task, weight_list=[1.0], normalized_grad=False).cache(tr)
    with pytest.raises(NotCachedError, match="does not exist: this method scores"):
        att.preconditioner(0)
