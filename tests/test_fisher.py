"""Tests of dattri.func.fisher: empirical Fisher products and K-FAC / EK-FAC math."""

import pytest
import torch

from dattri.errors import DattriValueError
from dattri.func.fisher import (
    ekfac_corrected_eigenvalues,
    ekfac_corrected_eigenvalues_from_activations,
    ekfac_rotated_grads,
    empirical_fisher,
    ifvp_at_x_explicit,
    ifvp_explicit,
    kfac_covariances,
    kfac_eigen,
    kfac_eigenvalues,
    kfac_ifvp,
    linear_per_example_grads,
)

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dense_fisher(G):
    """(1/N) sum_n vec(G_n) vec(G_n)^T with row-major vec."""
    flat = G.reshape(G.shape[0], -1)
    return flat.T @ flat / G.shape[0]


def _lr(n=40, d=6, seed=0):
    g = _gen(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    y = (torch.rand(n, generator=g) > 0.5).to(D)
    w = torch.randn(d + 1, generator=g, dtype=D)

    def loss(w, X, y):
        logits = X @ w[:-1] + w[-1]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y)

    return loss, w, X, y


# ---------------------------------------------------------- explicit Fisher
def test_empirical_fisher_is_mean_of_outer_products():
    loss, w, X, y = _lr()
    G = []
    for i in range(X.shape[0]):  # reference: one autograd call per example
        p = w.clone().requires_grad_()
        G.append(torch.autograd.grad(loss(p, X[i : i + 1], y[i : i + 1]), p)[0])
    G = torch.stack(G)
    F_ref = G.T @ G / X.shape[0]
    torch.testing.assert_close(empirical_fisher(loss, w, X, y, chunk_size=7), F_ref)
    V = torch.randn(3, 7, generator=_gen(1), dtype=D)
    ref = torch.linalg.solve(F_ref + 0.1 * torch.eye(7, dtype=D), V.T).T
    f = ifvp_at_x_explicit(loss, w, X, y, regularization=0.1)
    torch.testing.assert_close(f(V), ref)
    torch.testing.assert_close(f(V[0]), ref[0])
    torch.testing.assert_close(ifvp_explicit(loss, regularization=0.1)((w, X, y), V), ref)


def test_single_gradient_fisher_is_rank_one_outer_product():
    loss, w, X, y = _lr()
    g = torch.func.grad(loss)(w, X, y)
    F = empirical_fisher(loss, w, X, y, in_dims=(None, None, None))
    torch.testing.assert_close(F, torch.outer(g, g))
    assert torch.linalg.matrix_rank(F) == 1
    # (g g^T + l I)^{-1} g = g / (|g|^2 + l)  (Sherman-Morrison)
    out = ifvp_at_x_explicit(loss, w, X, y, regularization=0.5,
                             in_dims=(None, None, None))(g)
    torch.testing.assert_close(out, g / (g @ g + 0.5))


def test_fisher_errors():
    loss, w, X, y = _lr()
    with pytest.raises(DattriValueError, match=r"`in_dims\[0\]`"):
        empirical_fisher(loss, w, X, y, in_dims=(0, 0, 0))
    with pytest.raises(DattriValueError, match="`argnums` must be one int"):
        ifvp_explicit(loss, argnums=(0,))


# -------------------------------------------------------------- K-FAC math
def test_linear_grads_match_autograd_layout():
    g = _gen(2)
    layer = torch.nn.Linear(4, 3).double()
    a = torch.randn(5, 2, 4, generator=g, dtype=D)  # N=5, T=2
    target = torch.randn(5, 2, 3, generator=g, dtype=D)
    out = layer(a)
    s = torch.autograd.grad(((out - target) ** 2).sum(), out)[0]
    G = linear_per_example_grads(a, s, bias=True)
    for n in range(5):
        layer.zero_grad()
        ((layer(a[n]) - target[n]) ** 2).sum().backward()
        ref = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
        torch.testing.assert_close(G[n], ref)


def test_kfac_covariances_conventions():
    g = _gen(3)
    a = torch.randn(6, 4, 3, generator=g, dtype=D)
    s = torch.randn(6, 4, 2, generator=g, dtype=D)
    mask = (torch.rand(6, 4, generator=g) > 0.3).to(D)
    A, S = kfac_covariances(a, s, bias=True, mask=mask)
    a1 = torch.cat([a, torch.ones(6, 4, 1, dtype=D)], -1) * mask[..., None]
    sm = s * mask[..., None]
    torch.testing.assert_close(A, torch.einsum("nti,ntj->ij", a1, a1) / mask.sum())
    torch.testing.assert_close(S, torch.einsum("nti,ntj->ij", sm, sm) / 6)
    # non-sequence input: plain means; "sum" gives the sums
    A2, S2 = kfac_covariances(a[:, 0], s[:, 0], bias=False)
    torch.testing.assert_close(A2, a[:, 0].T @ a[:, 0] / 6)
    As, Ss = kfac_covariances(a[:, 0], s[:, 0], bias=False, reduction="sum")
    torch.testing.assert_close(As, A2 * 6)
    torch.testing.assert_close(Ss, S2 * 6)


def test_kfac_ifvp_equals_dense_kronecker_solve():
    g = _gen(4)
    Ma, Ms = torch.randn(5, 5, generator=g, dtype=D), torch.randn(3, 3, generator=g, dtype=D)
    A, S = Ma @ Ma.T + 0.1 * torch.eye(5, dtype=D), Ms @ Ms.T + 0.1 * torch.eye(3, dtype=D)
    la, qa, ls, qs = kfac_eigen(A, S)
    torch.testing.assert_close((qa * la) @ qa.T, A)
    V = torch.randn(4, 3, 5, generator=g, dtype=D)
    out = kfac_ifvp(V, qa, qs, kfac_eigenvalues(la, ls), damping=0.3)
    dense = torch.kron(S, A) + 0.3 * torch.eye(15, dtype=D)
    ref = torch.linalg.solve(dense, V.reshape(4, 15).T).T.reshape(4, 3, 5)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(kfac_ifvp(V[1], qa, qs, kfac_eigenvalues(la, ls), 0.3), ref[1])


def _check_exact(a, s, damping):
    """K-FAC and EK-FAC inverses equal the dense inverse of the empirical Fisher."""
    G = linear_per_example_grads(a, s, bias=True)
    F = _dense_fisher(G)
    A, S = kfac_covariances(a, s, bias=True)
    la, qa, ls, qs = kfac_eigen(A, S)
    ek = ekfac_corrected_eigenvalues(G, qa, qs)
    torch.testing.assert_close(ek, kfac_eigenvalues(la, ls), atol=1e-10, rtol=1e-8)
    V = torch.randn(3, *G.shape[1:], generator=_gen(9), dtype=D)
    dense = F + damping * torch.eye(F.shape[0], dtype=D)
    ref = torch.linalg.solve(dense, V.reshape(3, -1).T).T.reshape(V.shape)
    for eig in (ek, kfac_eigenvalues(la, ls)):
        torch.testing.assert_close(kfac_ifvp(V, qa, qs, eig, damping), ref)


def test_one_example_rank_one_is_exact():
    g = _gen(5)
    _check_exact(torch.randn(1, 4, generator=g, dtype=D), torch.randn(1, 3, generator=g, dtype=D),
                 damping=0.2)


def test_kronecker_factored_fisher_is_exact():
    # all pairs (a_i, s_j): the Fisher is exactly S (x) A
    g = _gen(6)
    acts, outs = torch.randn(5, 3, generator=g, dtype=D), torch.randn(4, 2, generator=g, dtype=D)
    a = acts.repeat_interleave(4, dim=0)
    s = outs.repeat(5, 1)
    _check_exact(a, s, damping=1e-3)


def test_ekfac_is_best_diagonal_in_eigenbasis():
    """George et al. 2018: EK-FAC fits F better than K-FAC in Frobenius norm."""
    g = _gen(7)
    a = torch.randn(30, 4, generator=g, dtype=D) * torch.linspace(0.5, 2, 4, dtype=D)
    s = torch.randn(30, 3, generator=g, dtype=D) + a[:, :3] ** 2  # correlated with a
    G = linear_per_example_grads(a, s)
    F = _dense_fisher(G)
    la, qa, ls, qs = kfac_eigen(*kfac_covariances(a, s))
    Q = torch.kron(qs, qa)
    err = {name: torch.linalg.norm(F - (Q * eig.reshape(-1)) @ Q.T)
           for name, eig in (("kfac", kfac_eigenvalues(la, ls)),
                             ("ekfac", ekfac_corrected_eigenvalues(G, qa, qs)))}
    assert err["ekfac"] < err["kfac"]
    torch.testing.assert_close(ekfac_corrected_eigenvalues(G, qa, qs),
                               torch.diagonal(Q.T @ F @ Q).reshape(3, 5))


@pytest.mark.parametrize("order", ["auto", "factors", "gradients"])
def test_ekfac_from_activations_matches_grads(order):
    g = _gen(8)
    a = torch.randn(9, 5, 4, generator=g, dtype=D)
    s = torch.randn(9, 5, 3, generator=g, dtype=D)
    mask = (torch.rand(9, 5, generator=g) > 0.2).to(D)
    la, qa, ls, qs = kfac_eigen(*kfac_covariances(a, s, mask=mask))
    G = linear_per_example_grads(a, s, mask=mask)
    ref = ekfac_corrected_eigenvalues(G, qa, qs)
    out = ekfac_corrected_eigenvalues_from_activations(a, s, qa, qs, mask=mask, chunk_size=2,
                                                       order=order)
    torch.testing.assert_close(out, ref)
    out_sum = ekfac_corrected_eigenvalues_from_activations(a, s, qa, qs, mask=mask,
                                                           reduction="sum", order=order)
    torch.testing.assert_close(out_sum, ref * 9)
    rotated = ekfac_rotated_grads(a, s, qa, qs, mask=mask, order=order)
    torch.testing.assert_close(rotated, qs.T @ G @ qa)


@pytest.mark.parametrize("order", ["factors", "gradients"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_per_example_grads_write_into_a_strided_view_of_a_flat_buffer(order, bias, masked):
    """``out=``: the products land in the columns of a ``(N, P)`` buffer (a strided
    view, other columns untouched), equal to the float64 definition
    ``sum_t (m_t s_t) (m_t [a_t, 1])^T`` (a non-binary mask weighs both factors)."""
    g = _gen(9)
    a = torch.randn(6, 5, 4, generator=g, dtype=D)
    s = torch.randn(6, 5, 3, generator=g, dtype=D)
    mask = torch.rand(6, 5, generator=g, dtype=D) if masked else None
    m = mask if masked else torch.ones(6, 5, dtype=D)
    a_aug = torch.cat([a, torch.ones(6, 5, 1, dtype=D)], -1) if bias else a
    ref = torch.einsum("nto,nti->noi", s * m[..., None], a_aug * m[..., None])
    d_a = 5 if bias else 4
    qa = torch.linalg.qr(torch.randn(d_a, d_a, generator=g, dtype=D))[0]
    qs = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=D))[0]
    flat = torch.full((6, 2 + 2 * 3 * d_a), 7.0, dtype=D)
    first = flat[:, 2:2 + 3 * d_a].view(6, 3, d_a)
    second = flat[:, 2 + 3 * d_a:].view(6, 3, d_a)
    got = linear_per_example_grads(a, s, bias, mask=mask, out=first)
    rot = ekfac_rotated_grads(a, s, qa, qs, bias, mask=mask, order=order, out=second)
    assert got.data_ptr() == first.data_ptr() and rot.data_ptr() == second.data_ptr()
    torch.testing.assert_close(first, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second, qs.T @ ref @ qa, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear_per_example_grads(a, s, bias, mask=mask), ref, rtol=1e-12, atol=1e-12)
    assert bool((flat[:, :2] == 7.0).all())


def test_kfac_errors():
    z = torch.zeros
    with pytest.raises(DattriValueError, match="`activations` and `grad_outputs`"):
        kfac_covariances(z(4, 3), z(5, 2))
    with pytest.raises(DattriValueError, match="`mask` must have shape"):
        kfac_covariances(z(4, 2, 3), z(4, 2, 2), mask=z(4, 3))
    with pytest.raises(DattriValueError, match="`reduction`"):
        kfac_covariances(z(4, 3), z(4, 2), reduction="max")
    with pytest.raises(DattriValueError, match="`per_example_grads` must be"):
        ekfac_corrected_eigenvalues(z(4, 2, 3), torch.eye(4), torch.eye(2))
    with pytest.raises(DattriValueError, match="`V` must end in"):
        kfac_ifvp(z(2, 3), torch.eye(3), torch.eye(2), z(2, 4))


@pytest.mark.parametrize("d", [3, 512, 513, 700, 1030])
def test_gram_from_block_upper_triangle_equals_the_full_product(d):
    from dattri.linalg.gram import symmetric_gram

    x = torch.randn(37, d, generator=_gen(d), dtype=D)
    got = symmetric_gram(x, block=128)
    torch.testing.assert_close(got, x.T @ x, rtol=1e-12, atol=1e-12)
