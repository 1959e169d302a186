r"""Hessian-vector products (HVP) and inverse-Hessian-vector products (IHVP).

For a scalar function ``func(*x)`` and the argument ``a = x[argnums]`` (``P``
entries), with :math:`H = \nabla^2_a\,\mathrm{func}(x)`:

- :func:`hvp` / :func:`hvp_at_x`: :math:`(H + \lambda I) v`;
- ``ihvp_<alg>`` / ``ihvp_at_x_<alg>`` for alg in {explicit, cg, lissa, arnoldi}:
  an (approximate) :math:`(H + \lambda I)^{-1} v`.

Shapes: ``v`` is one vector with the shape of ``a`` (``(P,)`` for flat
parameters) or a batch ``(k, *a.shape)``; every result has the shape of ``v``.
Batches are handled by ``torch.func.vmap`` over the HVP, never by a Python loop.

``ihvp_<alg>(func, ...)`` returns ``f(x, v)`` with ``x`` the tuple of ``func``'s
arguments; ``ihvp_at_x_<alg>(func, *x, ...)`` returns ``f(v)`` and does the
``x``-only work once: the dense Hessian and its Cholesky factor (explicit), the
Arnoldi eigenbasis (arnoldi), the vjp closure of the gradient (cg with
``mode="rev-rev"``). The two agree exactly:
``ihvp_<alg>`` calls ``ihvp_at_x_<alg>``. This is the API of Section 3.2 / Demo 2 of
the dattri paper (Deng et al., NeurIPS 2024).

``mode``: ``"rev-rev"`` takes the HVP as a vjp of the gradient (reverse over
reverse); ``"rev-fwd"`` as a jvp of the gradient (forward over reverse), which
needs less memory but forward-mode support of every operator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import grad, hessian, jvp, vjp, vmap

from dattri._warn import warn_user
from dattri.errors import DattriValueError
from dattri.linalg import arnoldi, cg_solve, factorize, lissa_solve

__all__ = [
    "IHVPUsageError",
    "hvp",
    "hvp_at_x",
    "ihvp_arnoldi",
    "ihvp_at_x_arnoldi",
    "ihvp_at_x_cg",
    "ihvp_at_x_explicit",
    "ihvp_at_x_lissa",
    "ihvp_cg",
    "ihvp_explicit",
    "ihvp_lissa",
]

_MODES = ("rev-rev", "rev-fwd")


# --------------------------------------------------------------------- checks
class IHVPUsageError(DattriValueError):
    """The published name of the error for a misused HVP / inverse-HVP builder (a
    ``mode`` other than ``"rev-rev"`` / ``"rev-fwd"``); a :class:`DattriValueError`."""


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        msg = f"`mode` must be 'rev-rev' or 'rev-fwd', got {mode!r}."
        raise IHVPUsageError(msg)


def _check_argnums(argnums: int) -> None:
    if isinstance(argnums, bool) or not isinstance(argnums, int):
        msg = (
            f"`argnums` must be one int (the position of the argument to differentiate), "
            f"got {argnums!r}; to differentiate several tensors, concatenate them into "
            "one flat vector (dattri.func.utils.flatten_func)."
        )
        raise DattriValueError(msg)


def _as_tuple(x: object) -> tuple:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _resolve_argnums(argnums: int, x: tuple) -> int:
    n = len(x)
    if not -n <= argnums < n:
        msg = f"`argnums`={argnums} is out of range for the {n} argument(s) of func."
        raise DattriValueError(msg)
    argnums %= n
    if not isinstance(x[argnums], torch.Tensor):
        msg = f"argument {argnums} of func (`argnums`) must be a tensor, got {type(x[argnums])}."
        raise DattriValueError(msg)
    return argnums


def _partial(func: Callable, x: tuple, argnums: int) -> Callable:
    """``a -> func(*x)`` with ``a`` in position ``argnums``."""
    head, tail = x[:argnums], x[argnums + 1 :]
    return lambda a: func(*head, a, *tail)


def _v_rows(v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """``v`` (shape of ``a``, or ``(k, *a.shape)``) -> ``(k, P)`` and the inverse map."""
    if not isinstance(v, torch.Tensor):
        msg = f"`v` must be a torch.Tensor, got {type(v)}."
        raise DattriValueError(msg)
    shape = tuple(a.shape)
    if tuple(v.shape) != shape and tuple(v.shape[1:]) != shape:
        msg = (
            f"`v` must have the shape of the differentiated argument {shape} or "
            f"(k, *{shape}), got {tuple(v.shape)}."
        )
        raise DattriValueError(msg)
    rows = v.detach().to(dtype=a.dtype, device=a.device).reshape(-1, a.numel())

    def restore(out: torch.Tensor) -> torch.Tensor:
        out = out.to(dtype=v.dtype, device=v.device)
        return out.reshape(v.shape)

    return rows, restore


# ------------------------------------------------------------------------ HVP
def _hvp_rows(
    func: Callable,
    x: tuple,
    argnums: int,
    mode: str,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``V (k, P) -> V H`` (row-wise ``H v``) at ``x``, vmapped over rows.

    ``"rev-rev"`` runs the forward and first backward pass once and keeps the vjp
    closure of the gradient, so every later block costs one vmapped backward pass.
    ``"rev-fwd"`` re-runs a vmapped jvp of the gradient per block.
    ``torch.func.linearize`` is deliberately not used: in torch 2.13 its traced
    function returned wrong values (for ``binary_cross_entropy_with_logits``) on
    calls whose vmap batch size differed from the first call's, which CG (frozen
    rows) and a varying ``k`` trigger.
    """
    a = x[argnums]
    shape = a.shape
    grad_fn = grad(_partial(func, x, argnums))
    if mode == "rev-rev":
        _, vjp_fn = vjp(grad_fn, a)

        def row(v: torch.Tensor) -> torch.Tensor:
            return vjp_fn(v.reshape(shape))[0].reshape(-1)

    else:

        def row(v: torch.Tensor) -> torch.Tensor:
            return jvp(grad_fn, (a,), (v.reshape(shape),))[1].reshape(-1)

    return vmap(row)


def _split_x_v(args: tuple) -> tuple[tuple, torch.Tensor]:
    """Accept both ``f(x_tuple, v)`` (published dattri) and ``f(*x, v)``."""
    if len(args) == 2 and isinstance(args[0], (tuple, list)):  # noqa: PLR2004
        return tuple(args[0]), args[1]
    if len(args) < 2:  # noqa: PLR2004
        msg = "call the returned function as f(x, v) with x the tuple of func's arguments."
        raise DattriValueError(msg)
    return tuple(args[:-1]), args[-1]


def hvp_at_x(
    func: Callable,
    x: Sequence[torch.Tensor] | torch.Tensor,
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""Hessian-vector product at a fixed ``x``: returns ``f(v) = (H + \lambda I) v``.

    With ``mode="rev-rev"`` the vjp closure of the gradient at ``x`` is built once
    and reused for every ``v``.

    Args:
        func: scalar function of the tensors ``x``.
        x: tuple of ``func``'s arguments (a lone tensor means ``(x,)``).
        argnums: position of the argument ``a`` to differentiate.
        mode: ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: :math:`\lambda`, adds ``lambda * v``.

    Returns:
        ``f(v)``: ``v`` with the shape of ``a`` or ``(k, *a.shape)``; the result
        has the shape of ``v``.
    """
    _check_mode(mode)
    _check_argnums(argnums)
    x = _as_tuple(x)
    argnums = _resolve_argnums(argnums, x)
    rows = _hvp_rows(func, x, argnums, mode)

    def _f(v: torch.Tensor) -> torch.Tensor:
        V, restore = _v_rows(v, x[argnums])
        return restore(rows(V) + regularization * V)

    return _f


def hvp(
    func: Callable,
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[..., torch.Tensor]:
    r"""Hessian-vector product: returns ``f(x, v) = (H(x) + \lambda I) v``.

    :math:`H(x) = \nabla^2_a \mathrm{func}(x)` with ``a = x[argnums]``. The returned
    function takes ``x`` as a tuple (``f((x0, x1), v)``, as in the published dattri)
    or unpacked (``f(x0, x1, v)``).

    Args:
        func: scalar function.
        argnums: position of the argument to differentiate.
        mode: ``"rev-rev"`` (vjp of grad) or ``"rev-fwd"`` (jvp of grad).
        regularization: :math:`\lambda`, adds ``lambda * v``.

    Returns:
        ``f(x, v)`` with ``v`` of the shape of ``a`` or ``(k, *a.shape)``.
    """
    _check_mode(mode)
    _check_argnums(argnums)

    def _f(*args: object) -> torch.Tensor:
        x, v = _split_x_v(args)
        idx = _resolve_argnums(argnums, x)
        V, restore = _v_rows(v, x[idx])
        rows = _hvp_rows(func, x, idx, mode)
        return restore(rows(V) + regularization * V)

    return _f


# ------------------------------------------------------------------- explicit
def ihvp_at_x_explicit(
    func: Callable,
    *x: torch.Tensor,
    argnums: int = 0,
    regularization: float = 0.0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""IHVP with the dense Hessian: ``f(v) = (H + \lambda I)^{-1} v``.

    Builds :math:`H` (``P x P``) once with ``torch.func.hessian`` and factors
    :math:`H + \lambda I` once (Cholesky; a warned eigendecomposition
    pseudo-inverse if it is not positive definite, see
    :func:`dattri.linalg.factorize`). Memory ``O(P^2)``, time ``O(P^3)`` once.

    Args:
        func: scalar function.
        *x: the arguments of ``func``.
        argnums: position of the argument to differentiate.
        regularization: :math:`\lambda \ge 0`.

    Returns:
        ``f(v)``, result of the shape of ``v``.
    """
    _check_argnums(argnums)
    argnums = _resolve_argnums(argnums, x)
    a = x[argnums]
    H = hessian(_partial(func, x, argnums))(a).reshape(a.numel(), a.numel())
    solve = factorize(H.detach(), regularization)

    def _f(v: torch.Tensor) -> torch.Tensor:
        V, restore = _v_rows(v, a)
        return restore(solve(V))

    return _f


def ihvp_explicit(
    func: Callable,
    argnums: int = 0,
    regularization: float = 0.0,
) -> Callable[..., torch.Tensor]:
    r"""IHVP with the dense Hessian: ``f(x, v) = (H(x) + \lambda I)^{-1} v``.

    See :func:`ihvp_at_x_explicit` (called on every use).
    """
    _check_argnums(argnums)

    def _f(*args: object) -> torch.Tensor:
        x, v = _split_x_v(args)
        return ihvp_at_x_explicit(func, *x, argnums=argnums, regularization=regularization)(v)

    return _f


# ------------------------------------------------------------------------- CG
def ihvp_at_x_cg(
    func: Callable,
    *x: torch.Tensor,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
    progress: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""IHVP by conjugate gradient at a fixed ``x``.

    Solves :math:`(H + \lambda I) u_r = v_r` for all rows of ``v`` together with
    :func:`dattri.linalg.cg_solve`: one vmapped HVP per iteration, at most
    ``max_iter`` iterations, early stop once every row has
    :math:`\|r\| \le \mathrm{tol}\,\|v_r\|`. CG assumes :math:`H + \lambda I`
    positive definite (Hestenes & Stiefel 1952; Koh & Liang 2017) for its
    minimisation view, but it is run as the textbook recursion, which also solves a
    non-singular *indefinite* system (the paper's Demo 2, ``sin``): it stops only on
    convergence, ``max_iter``, or a true breakdown (``p^T (H + lambda I) p = 0`` or not
    finite), and warns (``RuntimeWarning``) when it meets negative curvature
    ``p^T (H + lambda I) p < 0``.

    ``tol`` is a target, not a guarantee: when rows of ``v`` are still above it after
    ``max_iter`` iterations (the default 10 is often too few for an ill-conditioned
    Hessian), ``f(v)`` returns CG's last iterate for them, which can be far from the
    solution, and warns once per call (``RuntimeWarning``) with their number and the
    worst relative residual; raise ``max_iter`` or ``regularization``. Calls inside
    :func:`dattri.linalg.solvers.summarize_unconverged` warn once together.

    Args:
        func: scalar function.
        *x: the arguments of ``func``.
        argnums: position of the argument to differentiate.
        max_iter: maximum CG iterations.
        tol: relative residual tolerance (a warning says when a row is still above
            it after ``max_iter`` iterations).
        mode: ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: :math:`\lambda`.
        progress: tqdm bar over the iterations.

    Returns:
        ``f(v)``, result of the shape of ``v``.
    """
    _check_mode(mode)
    _check_argnums(argnums)
    argnums = _resolve_argnums(argnums, x)
    rows = _hvp_rows(func, x, argnums, mode)

    def _f(v: torch.Tensor) -> torch.Tensor:
        V, restore = _v_rows(v, x[argnums])
        negative: list[bool] = []

        def watched(P: torch.Tensor) -> torch.Tensor:
            AP = rows(P)
            curv = (P * AP).sum(dim=-1) + regularization * (P * P).sum(dim=-1)
            if bool((curv < 0).any()):
                negative.append(True)
            return AP

        X = cg_solve(watched, V, max_iter=max_iter, tol=tol,
                     regularization=regularization, progress=progress)
        if negative:
            warn_user(
                "ihvp_cg: negative curvature p^T (H + regularization I) p < 0 met, so "
                "H + regularization*I is indefinite. CG went on (it stops only on a "
                "breakdown) and solves the indefinite system when it is non-singular; "
                "for a positive-definite system raise regularization above the most "
                "negative eigenvalue's magnitude.",
                RuntimeWarning,
            )
        return restore(X)

    return _f


def ihvp_cg(
    func: Callable,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
    progress: bool = False,
) -> Callable[..., torch.Tensor]:
    r"""IHVP by conjugate gradient: ``f(x, v)``; see :func:`ihvp_at_x_cg`."""
    _check_mode(mode)
    _check_argnums(argnums)

    def _f(*args: object) -> torch.Tensor:
        x, v = _split_x_v(args)
        return ihvp_at_x_cg(func, *x, argnums=argnums, max_iter=max_iter, tol=tol,
                            mode=mode, regularization=regularization,
                            progress=progress)(v)

    return _f


# -------------------------------------------------------------------- Arnoldi
def ihvp_at_x_arnoldi(
    func: Callable,
    *x: torch.Tensor,
    argnums: int = 0,
    max_iter: int = 100,
    top_k: int = 100,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""IHVP in the top Arnoldi eigenspace of :math:`H + \lambda I`.

    Schioppa et al. (2022): :func:`dattri.linalg.arnoldi` runs ``max_iter`` HVPs from
    a seeded start (once, at construction) and keeps the ``top_k`` eigenpairs
    :math:`(\mu_i, u_i)` of largest magnitude; then

    .. math:: f(v) = c^2\, U^\top \mathrm{diag}(1/\mu)\, U v,

    with ``c = norm_constant`` (the published scaling of the projections
    :math:`c\,U v`; ``c = 1`` gives the approximate inverse). Eigenvalues with
    :math:`|\mu_i| \le r\,\epsilon \max|\mu|` are dropped instead of inverted.

    Args:
        func: scalar function.
        *x: the arguments of ``func``.
        argnums: position of the argument to differentiate.
        max_iter: Krylov dimension (number of HVPs).
        top_k: eigenpairs kept.
        norm_constant: ``c`` above.
        tol: Arnoldi breakdown threshold.
        mode: ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: :math:`\lambda`.
        seed: seed of the Arnoldi start vector.
        progress: tqdm bar.

    Returns:
        ``f(v)``, result of the shape of ``v``.
    """
    _check_mode(mode)
    _check_argnums(argnums)
    argnums = _resolve_argnums(argnums, x)
    a = x[argnums]
    rows = _hvp_rows(func, x, argnums, mode)

    def matvec(q: torch.Tensor) -> torch.Tensor:
        return rows(q[None])[0] + regularization * q

    with torch.no_grad():
        evals, U = arnoldi(matvec, a.numel(), max_iter=max_iter, top_k=top_k, tol=tol,
                           seed=seed, dtype=a.dtype, device=a.device, progress=progress)
    cutoff = evals.abs().max() * evals.numel() * torch.finfo(evals.dtype).eps
    keep = evals.abs() > cutoff
    evals, U = evals[keep], U[keep]
    scale = norm_constant**2

    def _f(v: torch.Tensor) -> torch.Tensor:
        V, restore = _v_rows(v, a)
        return restore(scale * ((V @ U.T) / evals) @ U)

    return _f


def ihvp_arnoldi(
    func: Callable,
    argnums: int = 0,
    max_iter: int = 100,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    top_k: int = 100,
    norm_constant: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> Callable[..., torch.Tensor]:
    r"""IHVP by Arnoldi: ``f(x, v)``; see :func:`ihvp_at_x_arnoldi` (the positional
    order is the published one: ``max_iter, tol, mode, regularization``, then
    dattri's ``top_k, norm_constant, seed, progress``)."""
    _check_mode(mode)
    _check_argnums(argnums)

    def _f(*args: object) -> torch.Tensor:
        x, v = _split_x_v(args)
        return ihvp_at_x_arnoldi(func, *x, argnums=argnums, max_iter=max_iter,
                                 top_k=top_k, norm_constant=norm_constant, tol=tol,
                                 mode=mode, regularization=regularization, seed=seed,
                                 progress=progress)(v)

    return _f


# ---------------------------------------------------------------------- LiSSA
def _resolve_in_dims(x: tuple, argnums: int, in_dims: Sequence | None) -> tuple:
    """Batch dimension of every argument; the differentiated one is never batched.

    Default: dimension 0 for every tensor argument with at least one dimension
    except ``x[argnums]``; ``None`` (shared by all examples) otherwise.
    """
    if in_dims is None:
        return tuple(
            0 if i != argnums and isinstance(t, torch.Tensor) and t.ndim > 0 else None
            for i, t in enumerate(x)
        )
    in_dims = tuple(in_dims)
    if len(in_dims) != len(x):
        msg = (
            f"`in_dims` has {len(in_dims)} entries but func has {len(x)} arguments; "
            "give one entry (batch dimension or None) per argument."
        )
        raise DattriValueError(msg)
    if in_dims[argnums] is not None:
        msg = (
            f"`in_dims[{argnums}]` (the differentiated argument, `argnums`) must be None, "
            f"got {in_dims[argnums]!r}; parameters are shared by all examples."
        )
        raise DattriValueError(msg)
    return in_dims


def _num_examples(x: tuple, in_dims: tuple) -> int:
    """Common size of the batch dimensions (1 when nothing is batched)."""
    sizes = {i: x[i].shape[d] for i, d in enumerate(in_dims) if d is not None}
    if len(set(sizes.values())) > 1:
        msg = f"arguments disagree on the number of examples along `in_dims`: {sizes}."
        raise DattriValueError(msg)
    return next(iter(sizes.values()), 1)


def _take(x: tuple, in_dims: tuple, idx: torch.Tensor) -> tuple:
    """Rows ``idx`` of every batched argument (shared ones unchanged)."""
    return tuple(
        t if d is None else t.index_select(d, idx.to(t.device))
        for t, d in zip(x, in_dims)
    )


def ihvp_at_x_lissa(
    func: Callable,
    *x: torch.Tensor,
    in_dims: Sequence | None = None,
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Callable | None = None,
    mode: str = "rev-rev",
    seed: int | None = None,
    progress: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""IHVP by LiSSA on minibatches of the data held in ``x``.

    ``func(*x)`` is the mean loss over the examples in ``x``; the batched
    arguments (``in_dims``) hold the data. Each recursion step draws ``batch_size``
    examples without replacement, and :func:`dattri.linalg.lissa_solve` runs

    .. math:: h_t = v + (1-d)\,h_{t-1} - H_{B_t} h_{t-1}/s, \qquad
              f(v) = \frac{1}{R}\sum_{\text{repeats}} h_T / s
              \;\approx\; (H + d\,s\,I)^{-1} v,

    (Agarwal et al. 2017; Koh & Liang 2017), with :math:`H_{B_t}` the Hessian of
    ``func`` on the minibatch. All rows of ``v`` share the minibatch of a step (one
    vmapped HVP per step). It converges if every eigenvalue :math:`\mu` of ``H``
    has :math:`|1-d-\mu/s| < 1`; choose ``s`` so that the eigenvalues of the
    minibatch Hessians satisfy it too (every step is then a contraction). A
    recursion that diverges raises instead of returning its growing iterate (see
    :func:`dattri.linalg.lissa_solve`).

    Args:
        func: scalar (mean) loss.
        *x: the arguments of ``func``, data included.
        in_dims: batch dimension of each argument, ``None`` for shared ones; by
            default 0 for every tensor argument but ``x[argnums]``.
        argnums: position of the parameters.
        batch_size: examples per step.
        num_repeat: independent repeats averaged.
        recursion_depth: steps per repeat.
        damping: ``d``.
        scaling: ``s``.
        collate_fn: maps the sampled tuple of arguments to the tuple passed to
            ``func`` (for nested inputs); default: passed as is.
        mode: ``"rev-rev"`` or ``"rev-fwd"``.
        seed: seed of the minibatch sampler (a fixed seed gives the same batches on
            every call); ``None`` uses torch's global generator.
        progress: tqdm bar over the steps.

    Returns:
        ``f(v)``, result of the shape of ``v``. ``f`` raises
        :class:`~dattri.errors.NonFiniteError`, naming ``scaling``, when the
        recursion diverges (``scaling`` too small for the minibatch Hessians).
    """
    _check_mode(mode)
    _check_argnums(argnums)
    argnums = _resolve_argnums(argnums, x)
    dims = _resolve_in_dims(x, argnums, in_dims)
    n = _num_examples(x, dims)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        msg = (
            f"`batch_size` must be an int in [1, {n}] (the number of examples), "
            f"got {batch_size!r}."
        )
        raise DattriValueError(msg)
    a = x[argnums]

    def _f(v: torch.Tensor) -> torch.Tensor:
        V, restore = _v_rows(v, a)
        gen = None if seed is None else torch.Generator().manual_seed(seed)

        def sample_matmat(H: torch.Tensor, step: int) -> torch.Tensor:  # noqa: ARG001
            idx = torch.randperm(n, generator=gen)[:batch_size]
            batch = _take(x, dims, idx)
            if collate_fn is not None:
                batch = tuple(collate_fn(batch))
            return _hvp_rows(func, batch, argnums, mode)(H)

        X = lissa_solve(sample_matmat, V, recursion_depth, damping=damping,
                        scaling=scaling, num_repeat=num_repeat, progress=progress)
        return restore(X)

    return _f


def ihvp_lissa(
    func: Callable,
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Callable | None = None,
    mode: str = "rev-rev",
    seed: int | None = None,
    progress: bool = False,
) -> Callable[..., torch.Tensor]:
    r"""IHVP by LiSSA: ``f(x, v, in_dims=None)``; see :func:`ihvp_at_x_lissa`."""
    _check_mode(mode)
    _check_argnums(argnums)

    def _f(*args: object, in_dims: Sequence | None = None) -> torch.Tensor:
        x, v = _split_x_v(args)
        return ihvp_at_x_lissa(func, *x, in_dims=in_dims, argnums=argnums,
                               batch_size=batch_size, num_repeat=num_repeat,
                               recursion_depth=recursion_depth, damping=damping,
                               scaling=scaling, collate_fn=collate_fn, mode=mode,
                               seed=seed, progress=progress)(v)

    return _f
