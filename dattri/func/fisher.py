r"""Empirical Fisher products and K-FAC / EK-FAC factor math.

Empirical Fisher (explicit). For a loss ``func(*x)`` (a mean negative
log-likelihood over the examples in ``x``) and the parameters ``a = x[argnums]``,

.. math:: F = \frac1N \sum_{n=1}^N g_n g_n^\top, \qquad
          g_n = \nabla_a \mathrm{func}(\text{example } n),

an outer product of per-example gradients (``P x P``). Per-example gradients are
obtained by calling ``func`` on batches of one example (``torch.func.vmap`` over
the batch dimensions ``in_dims``). With the ground-truth labels this is the
empirical Fisher; with labels sampled from the model it is the true Fisher.
:func:`ifvp_explicit` / :func:`ifvp_at_x_explicit` return
:math:`v \mapsto (F + \lambda I)^{-1} v`.

K-FAC / EK-FAC (Martens & Grosse 2015; George et al. 2018; Grosse et al. 2023).
For a linear layer ``y = W a (+ b)`` with ``W`` of shape ``(d_out, d_in)``, the
per-example gradient is :math:`G_n = \sum_t s_{n,t} a_{n,t}^\top` (``s`` the
gradient of the example's loss w.r.t. the output, ``t`` the sequence positions;
with a bias, ``a`` is extended by a constant 1 and ``G`` is ``(d_out, d_in+1)``).
With row-major ``vec``, :math:`F \approx S \otimes A` and, from the
eigendecompositions :math:`A = Q_A \Lambda_A Q_A^\top`,
:math:`S = Q_S \Lambda_S Q_S^\top`,

.. math:: (F + \delta I)^{-1}\,\mathrm{vec}(V)
          = \mathrm{vec}\big(Q_S\,[(Q_S^\top V Q_A) \oslash (\Lambda + \delta)]\,Q_A^\top\big),

where :math:`\Lambda_{oi} = \lambda^S_o \lambda^A_i` (K-FAC) or the EK-FAC corrected
eigenvalues :math:`\Lambda_{oi} = \frac1N\sum_n (Q_S^\top G_n Q_A)_{oi}^2`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.func import grad, vmap

from dattri.errors import DattriValueError
from dattri.func.hessian import (
    _as_tuple,
    _check_argnums,
    _num_examples,
    _resolve_argnums,
    _resolve_in_dims,
    _split_x_v,
    _take,
    _v_rows,
)
from dattri.linalg import factorize
from dattri.linalg.gram import symmetric_gram

__all__ = [
    "IFVPUsageError",
    "ekfac_corrected_eigenvalues",
    "ekfac_corrected_eigenvalues_from_activations",
    "ekfac_rotated_grads",
    "empirical_fisher",
    "estimate_covariance",
    "estimate_eigenvector",
    "estimate_lambda",
    "ifvp_at_x_explicit",
    "ifvp_explicit",
    "kfac_covariances",
    "kfac_eigen",
    "kfac_eigenvalues",
    "kfac_ifvp",
    "linear_per_example_grads",
    "rotation_costs",
]


# ------------------------------------------------------------ explicit Fisher
def empirical_fisher(
    func: Callable,
    *x: torch.Tensor,
    argnums: int = 0,
    in_dims: Sequence | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    r"""Dense empirical Fisher :math:`F = \frac1N\sum_n g_n g_n^\top` (``P x P``).

    Args:
        func: scalar mean loss of the examples in ``x``.
        *x: the arguments of ``func``.
        argnums: position of the parameters ``a``.
        in_dims: batch dimension of each argument (``None`` = shared); default 0 for
            every tensor argument but ``x[argnums]``. With nothing batched,
            ``N = 1`` and :math:`F = g g^\top`.
        chunk_size: examples per vmapped chunk (bounds the ``(chunk, P)`` memory).

    Returns:
        ``(P, P)`` matrix in the dtype of ``a``.
    """
    _check_argnums(argnums)
    argnums = _resolve_argnums(argnums, x)
    dims = _resolve_in_dims(x, argnums, in_dims)
    a = x[argnums]
    grad_fn = grad(func, argnums=argnums)
    if all(d is None for d in dims):
        g = grad_fn(*x).reshape(1, -1).detach()
        return g.T @ g
    n = _num_examples(x, dims)

    def one(*xs: torch.Tensor) -> torch.Tensor:
        xs = tuple(t if d is None else t.unsqueeze(d) for t, d in zip(xs, dims))
        return grad_fn(*xs).reshape(-1)

    per_example = vmap(one, in_dims=dims)
    F = torch.zeros(a.numel(), a.numel(), dtype=a.dtype, device=a.device)
    for start in range(0, n, chunk_size):
        idx = torch.arange(start, min(n, start + chunk_size))
        G = per_example(*_take(x, dims, idx)).detach()
        F += G.T @ G
    return F / n


def ifvp_at_x_explicit(
    func: Callable,
    *x: torch.Tensor,
    argnums: int = 0,
    regularization: float = 0.0,
    in_dims: Sequence | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""Inverse empirical-Fisher-vector product at fixed ``x``: :math:`(F+\lambda I)^{-1} v`.

    :math:`F` is built once by :func:`empirical_fisher` and factored once
    (Cholesky; a warned pseudo-inverse when singular, e.g. ``N < P`` with
    ``regularization=0``).

    Args:
        func: scalar mean loss (negative log-likelihood) of the examples in ``x``.
        *x: the arguments of ``func``.
        argnums: position of the parameters.
        regularization: :math:`\lambda \ge 0`.
        in_dims: see :func:`empirical_fisher`.

    Returns:
        ``f(v)``: ``v`` of the shape of the parameters or ``(k, *shape)``; result
        of the shape of ``v``.
    """
    F = empirical_fisher(func, *x, argnums=argnums, in_dims=in_dims)
    solve = factorize(F, regularization)
    a = x[_resolve_argnums(argnums, x)]

    def _f(v: torch.Tensor) -> torch.Tensor:
        V, restore = _v_rows(v, a)
        return restore(solve(V))

    return _f


def ifvp_explicit(
    func: Callable,
    argnums: int = 0,
    regularization: float = 0.0,
) -> Callable[..., torch.Tensor]:
    r"""Inverse empirical-Fisher-vector product: ``f(x, v, in_dims=None)``.

    See :func:`ifvp_at_x_explicit`, called on every use.
    """
    _check_argnums(argnums)

    def _f(*args: object, in_dims: Sequence | None = None) -> torch.Tensor:
        x, v = _split_x_v(args)
        return ifvp_at_x_explicit(func, *_as_tuple(x), argnums=argnums,
                                  regularization=regularization, in_dims=in_dims)(v)

    return _f


# ------------------------------------------------------------- K-FAC / EK-FAC
def _seq(activations: torch.Tensor, grad_outputs: torch.Tensor, bias: bool,
         mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and bring to ``(N, T, d_in[+1])``, ``(N, T, d_out)``, masked."""
    a, s = activations, grad_outputs
    if a.ndim not in (2, 3) or s.ndim != a.ndim or a.shape[:-1] != s.shape[:-1]:
        msg = (
            "`activations` and `grad_outputs` must be (N, d_in) and (N, d_out), or "
            f"(N, T, d_in) and (N, T, d_out); got {tuple(a.shape)} and {tuple(s.shape)}."
        )
        raise DattriValueError(msg)
    if a.ndim == 2:  # noqa: PLR2004
        a, s = a[:, None], s[:, None]
    if bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    if mask is not None:
        if tuple(mask.shape) != tuple(a.shape[:2]):
            msg = f"`mask` must have shape (N, T) = {tuple(a.shape[:2])}, got {tuple(mask.shape)}."
            raise DattriValueError(msg)
        m = mask.to(a)[..., None]
        a, s = a * m, s * m
    return a, s


def kfac_covariances(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    bias: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""K-FAC factors ``A`` (inputs) and ``S`` (output gradients) of a linear layer.

    .. math:: A = \frac{1}{N_{tok}} \sum_{n,t} a_{n,t} a_{n,t}^\top, \qquad
              S = \frac{1}{N} \sum_{n,t} s_{n,t} s_{n,t}^\top,

    with ``a`` extended by 1 when ``bias``. For non-sequence inputs (``T = 1``) both
    are plain means over the ``N`` examples. For sequences this is the K-FAC-expand
    convention (Eschenhagen et al. 2023): positions are treated as independent, ``A``
    averages over the ``N_tok`` (unmasked) tokens and ``S`` sums over positions and
    averages over examples, so that :math:`S \otimes A \approx \frac1N\sum_n
    \sum_t (s s^\top) \otimes (a a^\top)`, the Fisher of :math:`G_n = \sum_t s a^\top`
    without its cross-position terms. ``s`` must be the gradient of the example's
    own loss (a sum-reduced loss), not of a batch mean.

    Args:
        activations: ``(N, d_in)`` or ``(N, T, d_in)`` layer inputs.
        grad_outputs: ``(N, d_out)`` or ``(N, T, d_out)`` output gradients.
        bias: append the constant 1 input of the bias.
        mask: optional ``(N, T)`` 0/1 mask of the positions that count (padding 0).
        reduction: ``"mean"`` (above) or ``"sum"`` (the un-normalised sums, for
            streaming over batches: divide ``A`` by the total tokens, ``S`` by the
            total examples).

    Returns:
        ``(A (d_in[+1], d_in[+1]), S (d_out, d_out))``.
    """
    if reduction not in ("mean", "sum"):
        msg = f"`reduction` must be 'mean' or 'sum', got {reduction!r}."
        raise DattriValueError(msg)
    a, s = _seq(activations, grad_outputs, bias, mask)
    a2, s2 = a.reshape(-1, a.shape[-1]), s.reshape(-1, s.shape[-1])
    A, S = symmetric_gram(a2), symmetric_gram(s2)
    if reduction == "sum":
        return A, S
    tokens = a.shape[0] * a.shape[1] if mask is None else mask.sum().clamp_min(1).to(A)
    return A / tokens, S / a.shape[0]


def kfac_eigen(
    A: torch.Tensor,
    S: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Eigendecompositions :math:`A = Q_A \Lambda_A Q_A^\top`, :math:`S = Q_S \Lambda_S Q_S^\top`.

    Computed in float64 (the factors can be badly conditioned) and returned in the
    input dtype; eigenvectors are the columns of ``Q``.

    Returns:
        ``(eigvals_A (d_a,), Q_A (d_a, d_a), eigvals_S (d_s,), Q_S (d_s, d_s))``.
    """
    la, qa = torch.linalg.eigh(A.double())
    ls, qs = torch.linalg.eigh(S.double())
    return la.to(A.dtype), qa.to(A.dtype), ls.to(S.dtype), qs.to(S.dtype)


def kfac_eigenvalues(eigvals_A: torch.Tensor, eigvals_S: torch.Tensor) -> torch.Tensor:
    r"""K-FAC eigenvalues of :math:`S \otimes A`, ``(d_out, d_a)``.

    :math:`\Lambda_{oi} = \lambda^S_o \lambda^A_i`, i.e. ``torch.outer(eigvals_S, eigvals_A)``.
    """
    return torch.outer(eigvals_S, eigvals_A)


def linear_per_example_grads(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    bias: bool = True,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-example gradients :math:`G_n = \sum_t s_{n,t} a_{n,t}^\top` of a linear layer.

    Args:
        out: optional destination ``(N, d_out, d_in[+1])`` of the activations' dtype,
            which may be a strided view (e.g. of a flat ``(N, P)`` buffer): the
            product is written into it, with no temporary of its size.

    Returns:
        ``(N, d_out, d_in[+1])``: ``[dW | db]`` (bias last) for ``y = W a + b``.
    """
    a, s = _seq(activations, grad_outputs, False, mask)
    s = s.to(a.dtype)
    n, d_in, d_out = a.shape[0], a.shape[-1], s.shape[-1]
    if out is None:
        out = torch.empty(n, d_out, d_in + bool(bias), dtype=a.dtype, device=a.device)
    torch.matmul(s.transpose(1, 2), a, out=out[..., :d_in])
    if bias:  # the column of the constant input 1 (times the mask, as the input's)
        if mask is None:
            torch.sum(s, 1, out=out[..., d_in])
        else:
            out[..., d_in] = torch.einsum("nto,nt->no", s, mask.to(s))
    return out


def ekfac_corrected_eigenvalues(
    per_example_grads: torch.Tensor,
    Q_A: torch.Tensor,
    Q_S: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""EK-FAC eigenvalues :math:`\frac1N\sum_n (Q_S^\top G_n Q_A)^{\odot 2}` (George et al. 2018).

    They are the diagonal of the Fisher in the Kronecker eigenbasis, the best
    (Frobenius) diagonal fit there.

    Args:
        per_example_grads: ``(N, d_out, d_a)``.
        Q_A: ``(d_a, d_a)``; Q_S: ``(d_out, d_out)``.
        reduction: ``"mean"`` or ``"sum"`` over examples.

    Returns:
        ``(d_out, d_a)``.
    """
    G = per_example_grads
    if G.ndim != 3 or G.shape[1] != Q_S.shape[0] or G.shape[2] != Q_A.shape[0]:  # noqa: PLR2004
        msg = (
            f"`per_example_grads` must be (N, {Q_S.shape[0]}, {Q_A.shape[0]}) to match "
            f"Q_S and Q_A, got {tuple(G.shape)}."
        )
        raise DattriValueError(msg)
    out = (Q_S.T @ G @ Q_A).square().sum(dim=0)
    return out / G.shape[0] if reduction == "mean" else out


def ekfac_corrected_eigenvalues_from_activations(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    Q_A: torch.Tensor,
    Q_S: torch.Tensor,
    bias: bool = True,
    mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    reduction: str = "mean",
    order: str = "auto",
) -> torch.Tensor:
    r"""EK-FAC eigenvalues from layer inputs and output gradients.

    :math:`Q_S^\top G_n Q_A` in the cheaper of two orders (``order="auto"``, by
    multiply-adds per example; ``T`` positions):

    - ``"factors"``: rotate first, :math:`\tilde a = Q_A^\top a`,
      :math:`\tilde s = Q_S^\top s`, then :math:`\sum_t \tilde s_{n,t} \tilde a_{n,t}^\top`
      (``T (d_out^2 + d_a^2) + T d_out d_a``: few positions, a deep layer);
    - ``"gradients"``: form :math:`G_n = \sum_t s_{n,t} a_{n,t}^\top`, then rotate it
      (``T d_out d_a + d_out d_a (d_out + d_a)``: many positions and small factors,
      an early convolution: 30x fewer on ResNet-9's first layer).

    Either way ``chunk_size`` examples at a time (memory ``chunk_size * d_out * d_a``).

    Returns:
        ``(d_out, d_a)``, as :func:`ekfac_corrected_eigenvalues`.
    """
    a, s = _seq(activations, grad_outputs, bias, mask)
    order = _rotation_order(order, a.shape[1], s.shape[-1], a.shape[-1])
    d_o, d_a = s.shape[-1], a.shape[-1]
    if order == "factors":
        a, s = a @ Q_A, s @ Q_S
    out = torch.zeros(d_o, d_a, dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        g = torch.einsum("nto,nti->noi", s[sl], a[sl])
        if order == "gradients":
            g = Q_S.T @ g @ Q_A
        out += g.square().sum(dim=0)
    return out / a.shape[0] if reduction == "mean" else out


def rotation_costs(positions: float, d_out: int, d_a: int) -> tuple[float, float]:
    r"""Multiply-adds per example of :math:`Q_S^\top G Q_A` from the factors (rotate
    ``a`` and ``s``, then the sum over ``positions``) and from the formed gradient
    (form it, then rotate it)."""
    by_factors = positions * (d_out * d_out + d_a * d_a) + positions * d_out * d_a
    by_grads = positions * d_out * d_a + d_out * d_a * (d_out + d_a)
    return by_factors, by_grads


def _rotation_order(order: str, positions: int, d_out: int, d_a: int) -> str:
    if order not in ("auto", "factors", "gradients"):
        msg = f"order={order!r} must be 'auto', 'factors' or 'gradients'."
        raise DattriValueError(msg)
    if order != "auto":
        return order
    by_factors, by_grads = rotation_costs(positions, d_out, d_a)
    return "factors" if by_factors <= by_grads else "gradients"


def ekfac_rotated_grads(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    Q_A: torch.Tensor,
    Q_S: torch.Tensor,
    bias: bool = True,
    mask: torch.Tensor | None = None,
    order: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-example gradients in the Kronecker eigenbasis, :math:`Q_S^\top G_n Q_A`
    ``(N, d_out, d_a)``, in the cheaper order (as
    :func:`ekfac_corrected_eigenvalues_from_activations`): an orthogonal change of
    coordinates of :func:`linear_per_example_grads`, in which the EK-FAC inverse is a
    division by the eigenvalues. ``out``: an optional destination, as for
    :func:`linear_per_example_grads`."""
    a, s = _seq(activations, grad_outputs, False, mask)
    s = s.to(a.dtype)
    n, d_in, d_out = a.shape[0], a.shape[-1], s.shape[-1]
    d_a = d_in + bool(bias)
    if out is None:
        out = torch.empty(n, d_out, d_a, dtype=a.dtype, device=a.device)
    if _rotation_order(order, a.shape[1], d_out, d_a) == "factors":
        ar = torch.matmul(a, Q_A[:d_in])
        if bias:  # the constant input's row of Q_A (times the mask, as the input's)
            ar += Q_A[d_in] if mask is None else mask.to(a)[..., None] * Q_A[d_in]
        return torch.matmul((s @ Q_S).transpose(1, 2), ar, out=out)
    g = linear_per_example_grads(activations, grad_outputs, bias, mask)
    # a batched product (Q_A expanded, not copied): a 3-D times 2-D product is folded
    # into one matrix product, which cannot write into a strided view
    return torch.bmm(Q_S.T @ g, Q_A.expand(n, d_a, d_a), out=out)


def kfac_ifvp(
    V: torch.Tensor,
    Q_A: torch.Tensor,
    Q_S: torch.Tensor,
    eig: torch.Tensor,
    damping: float = 0.0,
) -> torch.Tensor:
    r"""Inverse Kronecker-factored Fisher product per layer.

    .. math:: V \mapsto Q_S\,[(Q_S^\top V Q_A) \oslash (\Lambda + \delta)]\,Q_A^\top,

    i.e. :math:`(Q_S \otimes Q_A)\,\mathrm{diag}(\Lambda+\delta)^{-1}(Q_S \otimes Q_A)^\top
    \mathrm{vec}(V)`; with :math:`\Lambda` = :func:`kfac_eigenvalues` this is
    :math:`(S \otimes A + \delta I)^{-1}\mathrm{vec}(V)`.

    Args:
        V: ``(k, d_out, d_a)`` or ``(d_out, d_a)``.
        Q_A: ``(d_a, d_a)``; Q_S: ``(d_out, d_out)``.
        eig: ``(d_out, d_a)`` K-FAC or EK-FAC eigenvalues.
        damping: :math:`\delta`.

    Returns:
        The shape of ``V``.
    """
    if V.shape[-2:] != eig.shape:
        msg = f"`V` must end in (d_out, d_a) = {tuple(eig.shape)}, got {tuple(V.shape)}."
        raise DattriValueError(msg)
    return Q_S @ ((Q_S.T @ V @ Q_A) / (eig + damping)) @ Q_A.T


# ------------------------------------------- the published EK-FAC estimation API
class IFVPUsageError(DattriValueError):
    """Bad arguments to the Fisher functions (the published release's name)."""


def _hooked_pass(func: Callable, batch: Any, layer_cache: Mapping[str, tuple],
                 device: str | torch.device, what: str):
    """One forward of ``func`` on ``batch`` (which fills ``layer_cache`` by hooks) and
    the per-example output gradients of every cached layer.

    Yields ``(name, inputs, output_grads, mask)`` per cached layer, where
    ``output_grads`` is the gradient of ``N * loss`` (``N`` the batch size): for a
    mean loss, the gradient of each example's own loss. The gradients are taken with
    :func:`torch.autograd.grad`, so no ``.grad`` of a parameter is touched.
    """
    from dattri._loader import batch_size_of, to_device

    batch = to_device(batch, device)
    if isinstance(batch, list):
        batch = tuple(batch)
    n = batch_size_of(batch)
    out = func(batch)
    loss, mask = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        msg = (f"{what}: func(batch) must return the batch's mean loss (a scalar), or "
               f"(loss, mask); it returned {type(loss).__name__}"
               f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}.")
        raise IFVPUsageError(msg)
    if not layer_cache:
        msg = (f"{what}: layer_cache is empty after func(batch); register forward hooks "
               "on the layers that store layer_cache[name] = (inputs, outputs) (inputs "
               "with a column of ones appended for a bias).")
        raise IFVPUsageError(msg)
    names = list(layer_cache)
    outputs = [layer_cache[k][1] for k in names]
    if not all(isinstance(o, torch.Tensor) and o.requires_grad for o in outputs):
        bad = [k for k, o in zip(names, outputs) if not (isinstance(o, torch.Tensor) and o.requires_grad)]
        msg = (f"{what}: the cached outputs of {bad} do not require grad; func must use "
               "parameters that require grad (e.g. task.get_param()).")
        raise IFVPUsageError(msg)
    grads = torch.autograd.grad(loss * n, outputs, allow_unused=True)
    for k, g in zip(names, grads):
        a = layer_cache[k][0]
        if g is None:
            g = torch.zeros_like(layer_cache[k][1])
        m = mask
        if m is not None:
            m = m.reshape(a.shape[0], -1) if a.ndim == 3 else m.reshape(a.shape[0], 1)  # noqa: PLR2004
        yield k, a.detach(), g.detach(), m


def _batches(dataloader: Iterable, max_iter: int | None) -> Iterable:
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int)
                                 or max_iter < 1):
        msg = f"max_iter={max_iter!r} must be None (every batch) or an int >= 1."
        raise IFVPUsageError(msg)
    for i, batch in enumerate(dataloader):
        if max_iter is not None and i >= max_iter:
            return
        yield batch


def estimate_covariance(
    func: Callable,
    dataloader: Iterable,
    layer_cache: dict[str, tuple[torch.Tensor, torch.Tensor]],
    max_iter: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    r"""The K-FAC factors of every hooked layer over a loader (the published API).

    For each layer in ``layer_cache`` (``name -> (inputs, outputs)``, filled by
    forward hooks while ``func`` runs; ``inputs`` already carry the bias column of
    ones when the layer has a bias),

    .. math:: A = \frac{1}{N_{tok}} \sum_{n,t} a_{n,t} a_{n,t}^\top, \qquad
              S = \frac{1}{N} \sum_{n,t} s_{n,t} s_{n,t}^\top,

    with ``s`` the gradient of example ``n``'s own loss w.r.t. the layer output
    (that of ``N * func(batch)``, ``func`` returning the batch's mean loss), summed
    over the first ``max_iter`` batches (all by default) and divided by the totals,
    as :func:`kfac_covariances` defines them.

    Args:
        func: ``func(batch) -> loss`` (mean over the batch), or ``(loss, mask)``
            with a 0/1 ``(N, T)`` mask of the positions that count.
        dataloader: training batches (a tuple/list of tensors, or a dict).
        layer_cache: the dict the hooks fill; read after each forward.
        max_iter: number of batches used (``None``: all).
        device: where batches are moved.

    Returns:
        ``{name: (A, S)}``.

    Raises:
        IFVPUsageError: ``func`` does not return a scalar, no layer was cached, or
            the cached outputs carry no gradient.
    """
    sums: dict[str, list] = {}  # name -> [sum a a^T, sum s s^T, tokens, examples]
    for batch in _batches(dataloader, max_iter):
        for k, a, s, m in _hooked_pass(func, batch, layer_cache, device, "estimate_covariance"):
            A, S = kfac_covariances(a, s, bias=False, mask=m, reduction="sum")
            t = a.shape[0] * (a.shape[1] if a.ndim == 3 else 1)  # noqa: PLR2004
            new = [A, S, t if m is None else float(m.sum()), a.shape[0]]
            sums[k] = new if k not in sums else [x + y for x, y in zip(sums[k], new)]
    if not sums:
        msg = "estimate_covariance: dataloader yielded no batches."
        raise IFVPUsageError(msg)
    return {k: (A / max(t, 1), S / n) for k, (A, S, t, n) in sums.items()}


def estimate_eigenvector(
    covariances: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eigenvectors ``(Q_A, Q_S)`` (columns) of each layer's ``(A, S)`` (the published API).

    ``A = Q_A diag(l_A) Q_A^T`` and ``S = Q_S diag(l_S) Q_S^T`` (:func:`kfac_eigen`,
    float64 inside).
    """
    out = {}
    for k, pair in covariances.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:  # noqa: PLR2004
            msg = f"covariances[{k!r}] must be a pair (A, S), got {type(pair).__name__}."
            raise IFVPUsageError(msg)
        _, qa, _, qs = kfac_eigen(pair[0], pair[1])
        out[k] = (qa, qs)
    return out


def estimate_lambda(
    func: Callable,
    dataloader: Iterable,
    eigenvectors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    layer_cache: dict[str, tuple[torch.Tensor, torch.Tensor]],
    max_iter: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    r"""EK-FAC corrected eigenvalues of every hooked layer (the published API).

    .. math:: \Lambda = \frac1N \sum_n (Q_S^\top G_n Q_A)^{\odot 2}, \qquad
              G_n = \sum_t s_{n,t} a_{n,t}^\top,

    over the first ``max_iter`` batches, ``(Q_A, Q_S)`` from
    :func:`estimate_eigenvector` (eigenvectors as columns; the published code
    multiplies ``Q_S G_n Q_A^T``, the transposed rotation, which is not the EK-FAC
    basis unless ``Q`` is symmetric). ``func`` / ``layer_cache`` as in
    :func:`estimate_covariance`.

    Returns:
        ``{name: Lambda (d_out, d_in[+1])}``, ready for :func:`kfac_ifvp`.
    """
    sums: dict[str, torch.Tensor] = {}
    examples = 0
    for batch in _batches(dataloader, max_iter):
        n = 0
        for k, a, s, m in _hooked_pass(func, batch, layer_cache, device, "estimate_lambda"):
            if k not in eigenvectors:
                msg = (f"estimate_lambda: eigenvectors has no entry for the cached layer "
                       f"{k!r}; pass the output of estimate_eigenvector for the same layers.")
                raise IFVPUsageError(msg)
            qa, qs = eigenvectors[k]
            lam = ekfac_corrected_eigenvalues_from_activations(
                a, s, qa.to(a), qs.to(s), bias=False, mask=m, reduction="sum")
            sums[k] = sums[k] + lam if k in sums else lam
            n = a.shape[0]
        examples += n
    if not sums:
        msg = "estimate_lambda: dataloader yielded no batches."
        raise IFVPUsageError(msg)
    return {k: v / examples for k, v in sums.items()}
