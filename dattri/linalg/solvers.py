"""Solvers for linear systems whose matrix is only available as a product.

Every solver here works on a symmetric operator ``A`` of size ``P x P`` that is
given as a callable, never as a matrix (except :func:`explicit_inverse` /
:func:`explicit_solve`, which take the dense matrix). Right-hand sides are the
rows of ``B``: ``B`` is ``(k, P)`` (or ``(P,)`` for one vector) and every solver
treats the ``k`` rows together, with one call of the operator on a ``(k, P)``
block per iteration, never a Python loop over the rows.

- :func:`cg_solve`: block of independent conjugate-gradient runs
  (Hestenes & Stiefel 1952; Martens 2010 for Hessian-free use).
- :func:`cg_multishift_solve`: the same CG for several shifts
  :math:`A + s_j I` from one sequence of products (Jegerlehner 1996; Frommer 2003).
- :func:`lissa_solve`: the stochastic Neumann-series recursion LiSSA
  (Agarwal, Bullins & Hazan 2017; Koh & Liang 2017).
- :func:`arnoldi`: top eigenpairs from an Arnoldi / Krylov basis
  (Schioppa, Zablotskaia, Vilar & Sokolov 2022, "Scaling up influence functions").
- :func:`explicit_inverse`, :func:`explicit_solve`: dense Cholesky with a
  symmetric-eigendecomposition fallback.

The iterative solvers do not fail silently: CG warns (``RuntimeWarning``) when it
stops at ``max_iter`` with residuals above ``tol`` (:func:`summarize_unconverged`
folds the warnings of many solves into one), and LiSSA raises
:class:`~dattri.errors.NonFiniteError` when its recursion diverges.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dattri._warn import warn_user
from dattri.errors import DattriValueError, NonFiniteError
from dattri.func.utils import all_finite

__all__ = [
    "ConvergenceSummary",
    "arnoldi",
    "cg_multishift_solve",
    "cg_solve",
    "explicit_inverse",
    "explicit_solve",
    "factorize",
    "lissa_solve",
    "summarize_unconverged",
]


def _as_rows(B: torch.Tensor, name: str = "B") -> tuple[torch.Tensor, bool]:
    """Return ``B`` as a ``(k, P)`` block and whether it was a single ``(P,)`` vector."""
    if not isinstance(B, torch.Tensor):
        msg = f"`{name}` must be a torch.Tensor of shape (P,) or (k, P), got {type(B)}."
        raise DattriValueError(msg)
    if B.ndim == 1:
        return B.unsqueeze(0), True
    if B.ndim == 2:  # noqa: PLR2004
        return B, False
    msg = (
        f"`{name}` must have shape (P,) or (k, P), got shape {tuple(B.shape)}; "
        "stack the right-hand sides as the rows of a 2-D tensor."
    )
    raise DattriValueError(msg)


def _check_nonneg(name: str, value: float) -> None:
    if not value >= 0:
        msg = f"`{name}` must be >= 0, got {value!r}; pass a non-negative number."
        raise DattriValueError(msg)


def _check_posint(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"`{name}` must be a positive integer, got {value!r}."
        raise DattriValueError(msg)


def _unit_rows(Bm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B / s, s)`` with ``s`` the row norms (1 for zero rows): the solvers work on
    unit right-hand sides, so their step sizes do not underflow when B is tiny (a
    well-fit model's gradients) and every solution is ``s * X``."""
    m = Bm.abs().amax(dim=1, keepdim=True)  # first by the largest entry: the
    m = torch.where(m > 0, m, torch.ones_like(m))  # norm's squares neither under-
    u = Bm / m  # nor overflow
    n = u.norm(dim=1, keepdim=True)
    n = torch.where(n > 0, n, torch.ones_like(n))
    return u / n, m * n


def _warn_breakdown(count: int, total: int, solver: str) -> None:
    if count:
        warn_user(
            f"{solver}: for {count} of {total} right-hand side(s) p^T (A + lambda I) p "
            "was 0 or not finite before convergence (the operator's products underflowed "
            "or overflowed, or A is singular along the residual); those rows stopped "
            "early and are incomplete. Rescale the loss (e.g. a sum instead of a tiny "
            "mean), use float64, or add regularization.",
            RuntimeWarning,
        )


@dataclass
class ConvergenceSummary:
    """What the CG solves run inside :func:`summarize_unconverged` reported.

    Attributes:
        solves: CG solves run.
        unconverged_solves: those that stopped at ``max_iter`` with a system above ``tol``.
        systems: linear systems of those solves: right-hand sides (``cg_solve``) or
            (shift, right-hand side) pairs (``cg_multishift_solve``).
        unconverged: the systems of those solves still above ``tol`` at ``max_iter``.
        worst: the largest relative residual ``||(A + lambda I) x - b|| / ||b||`` among
            them (as CG's recursion tracks it).
        settings: ``(solver, max_iter, tol)`` of the unconverged solves.
        shifts: the shifts with an unconverged system (``cg_multishift_solve``).
    """

    solves: int = 0
    unconverged_solves: int = 0
    systems: int = 0
    unconverged: int = 0
    worst: float = 0.0
    settings: set[tuple[str, int, float]] = field(default_factory=set)
    shifts: set[float] = field(default_factory=set)

    def add(self, other: ConvergenceSummary) -> None:
        """Count ``other``'s solves in this summary too."""
        self.solves += other.solves
        self.unconverged_solves += other.unconverged_solves
        self.systems += other.systems
        self.unconverged += other.unconverged
        self.worst = max(self.worst, other.worst)
        self.settings |= other.settings
        self.shifts |= other.shifts

    def message(self) -> str:
        """The warning text (empty when every solve converged)."""
        if not self.unconverged:
            return ""
        solvers = sorted({name for name, _, _ in self.settings})
        iters = ", ".join(str(m) for m in sorted({m for _, m, _ in self.settings}))
        tols = ", ".join(f"{t:g}" for t in sorted({t for _, _, t in self.settings}))
        multi = solvers == ["cg_multishift_solve"]
        what = ("(shift, right-hand side) pair(s)" if multi
                else "right-hand side(s)" if solvers == ["cg_solve"] else "linear system(s)")
        where = "" if self.solves == 1 else (
            f" in {self.unconverged_solves} of {self.solves} solves")
        at = f" (at shifts {sorted(self.shifts)})" if self.shifts else ""
        damp = ("larger `shifts`" if multi else "a larger `regularization`"
                if solvers == ["cg_solve"] else "a larger `regularization` or `shifts`")
        return (
            f"{' / '.join(solvers)} did not converge{where}: {self.unconverged} of "
            f"{self.systems} {what}{at} still had a relative residual "
            f"||(A + lambda I) x - b|| / ||b|| above tol={tols} after max_iter={iters} "
            f"iterations (worst {self.worst:.3g}); the result is CG's last iterate, not a "
            f"solution to that tolerance. Raise `max_iter`, or add damping ({damp}): a "
            "better-conditioned system converges in fewer iterations."
        )


_SUMMARIES = threading.local()  # this thread's open summarize_unconverged() blocks


def _summary_stack() -> list[ConvergenceSummary]:
    stack = getattr(_SUMMARIES, "stack", None)
    if stack is None:
        stack = _SUMMARIES.stack = []
    return stack


@contextlib.contextmanager
def summarize_unconverged(warn: bool = True) -> Iterator[ConvergenceSummary]:
    """Fold the non-convergence warnings of the CG solves in a block into one.

    Alone, :func:`cg_solve` and :func:`cg_multishift_solve` warn once per solve that
    stops at ``max_iter`` above ``tol``. A caller that solves many times (an
    attributor: once per checkpoint and block of gradients, with the paper's
    ``max_iter=10`` that often does not converge) runs them in this block instead:
    they warn nothing, and at the end of the block one warning counts the
    unconverged solves and systems with the worst residual. Blocks nest: an inner
    block's solves also count in the enclosing one, and only the outermost warns.

    Args:
        warn: warn at the end of the block (False: only fill the summary).

    Yields:
        The :class:`ConvergenceSummary`, filled as the solves run.
    """
    stack = _summary_stack()
    summary = ConvergenceSummary()
    stack.append(summary)
    try:
        yield summary
    finally:
        stack.pop()
    if stack:
        stack[-1].add(summary)
    elif warn and summary.unconverged:
        warn_user(summary.message(), RuntimeWarning)


def _report_convergence(solver: str, max_iter: int, tol: float, systems: int,
                        unconverged: torch.Tensor, relres: torch.Tensor,
                        shifts: list[float] | None = None) -> None:
    """Count one solve (``unconverged``: its systems still above ``tol`` after
    ``max_iter`` iterations, ``relres`` their relative residuals, already tracked by
    CG: no extra product) in the open summary, or warn once for it."""
    count = int(unconverged.sum())
    one = ConvergenceSummary(solves=1, systems=systems)
    if count:
        one.unconverged_solves, one.unconverged = 1, count
        one.worst = float(relres[unconverged].max())
        one.settings.add((solver, max_iter, tol))
        if shifts is not None:
            one.shifts = {shifts[j] for j in unconverged.any(dim=1).nonzero().flatten().tolist()}
    stack = _summary_stack()
    if stack:
        stack[-1].add(one)
    elif count:
        warn_user(one.message(), RuntimeWarning)


def _cg_step(op, Pdir, R, rs, idx, tiny):
    """One CG step on the rows ``idx``: ``(P_a, ok, alpha, R_a, rs_new, beta)``;
    ``ok`` is False where ``p^T A p`` is zero or not finite (breakdown: alpha = 0)."""
    P_a = Pdir[idx]
    AP = op(P_a)
    pAp = (P_a * AP).sum(dim=1)
    ok = (pAp != 0) & torch.isfinite(pAp)
    rs_a = rs[idx]
    alpha = torch.where(ok, rs_a / torch.where(ok, pAp, 1.0), 0.0)
    R_a = R[idx] - alpha[:, None] * AP
    rs_new = (R_a * R_a).sum(dim=1)
    beta = torch.where(rs_a > 0, rs_new / rs_a.clamp_min(tiny), 0.0)
    return P_a, ok, alpha, R_a, rs_new, beta


def cg_solve(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    B: torch.Tensor,
    max_iter: int = 10,
    tol: float = 1e-7,
    regularization: float = 0.0,
    x0: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    r"""Solve :math:`(A + \lambda I) x_r = b_r` for every row of ``B`` by CG.

    Runs ``k`` independent conjugate-gradient recursions side by side, each with its
    own step sizes :math:`\alpha_r = \|r_r\|^2 / p_r^\top (A+\lambda I) p_r` and
    :math:`\beta_r = \|r_r^{new}\|^2 / \|r_r\|^2`. A row stops (is frozen) once its
    residual satisfies :math:`\|r_r\| \le \mathrm{tol}\cdot\max(\|b_r\|, \epsilon)`,
    and ``matmat`` is then called only on the rows still running. The loop ends when
    every row has converged or after ``max_iter`` calls of ``matmat``. In the second
    case the rows still above ``tol`` are CG's last iterates, which can be far from the
    solution (their residual can even exceed ``||b||``): the solve then warns once
    (``RuntimeWarning``) with their number, the worst relative residual, ``max_iter``
    and ``tol`` (from the residuals CG tracks: no extra product). Many solves in a
    :func:`summarize_unconverged` block warn once together.

    Args:
        matmat: maps a ``(m, P)`` block to ``(m, P)``, row ``r`` to ``A @ row_r``
            (``A`` symmetric positive semi-definite; ``m`` varies between calls).
        B: right-hand sides, ``(k, P)`` or ``(P,)``.
        max_iter: maximum number of CG iterations (= calls of ``matmat``).
        tol: relative residual tolerance (the right-hand sides are normalised to
            unit rows inside, so tiny or huge ``B`` converge alike; a warning says
            when a step's ``p^T A p`` underflows or overflows, and when a row is
            still above ``tol`` after ``max_iter`` iterations).
        regularization: :math:`\lambda`, added as ``lambda * x`` to every product.
        x0: optional start, shape of ``B`` (default zeros).
        progress: show a tqdm bar over the iterations.

    Returns:
        ``X`` with the shape of ``B``.

    Raises:
        DattriValueError: for a bad shape or setting.
    """
    _check_posint("max_iter", max_iter)
    _check_nonneg("tol", tol)
    _check_nonneg("regularization", regularization)
    Bm, single = _as_rows(B)
    scale = None
    if Bm.is_floating_point():
        Bm, scale = _unit_rows(Bm)

    def op(V: torch.Tensor) -> torch.Tensor:
        out = matmat(V)
        return out + regularization * V if regularization else out

    if x0 is None:
        X = torch.zeros_like(Bm)
        R = Bm.clone()
    else:
        X = _as_rows(x0, "x0")[0].to(Bm).clone()
        if X.shape != Bm.shape:
            msg = f"`x0` must have the shape of B {tuple(B.shape)}, got {tuple(x0.shape)}."
            raise DattriValueError(msg)
        if scale is not None:
            X = X / scale
        R = Bm - op(X)
    tiny = torch.finfo(Bm.dtype).tiny if Bm.is_floating_point() else 1e-30
    bnorm = Bm.norm(dim=1).clamp_min(tiny)
    thresh = tol * bnorm
    rs = (R * R).sum(dim=1)
    Pdir = R.clone()
    active = rs.sqrt() > thresh
    broke = torch.zeros_like(active)
    for _ in tqdm(range(max_iter), desc="CG", disable=not progress):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        P_a, ok, alpha, R_a, rs_new, beta = _cg_step(op, Pdir, R, rs, idx, tiny)
        broke[idx] |= ~ok
        X[idx] = X[idx] + alpha[:, None] * P_a
        R[idx] = R_a
        Pdir[idx] = R_a + beta[:, None] * P_a
        rs[idx] = rs_new
        active[idx] = ok & (rs_new.sqrt() > thresh[idx])
    _warn_breakdown(int(broke.sum()), Bm.shape[0], "cg_solve")
    # rows still active ran out of iterations (a converged or broken-down row is not)
    _report_convergence("cg_solve", max_iter, tol, Bm.shape[0], active, rs.sqrt() / bnorm)
    if scale is not None:
        X = X * scale
    return X[0] if single else X


def _check_shifts(shifts: Iterable[float]) -> list[float]:
    """``shifts`` as a list of distinct non-negative floats (order kept)."""
    try:
        vals = [float(s) for s in shifts]
    except (TypeError, ValueError):
        msg = f"`shifts` must be a sequence of numbers, got {shifts!r}; pass e.g. (1e-2, 1e-3)."
        raise DattriValueError(msg) from None
    if not vals:
        msg = f"`shifts` must not be empty, got {shifts!r}; pass at least one shift."
        raise DattriValueError(msg)
    for i, s in enumerate(vals):
        _check_nonneg(f"shifts[{i}]", s)
    dup = sorted({s for s in vals if vals.count(s) > 1})
    if dup:
        msg = f"`shifts` contains duplicates {dup} (got {shifts!r}); pass each shift once."
        raise DattriValueError(msg)
    return vals


def cg_multishift_solve(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    B: torch.Tensor,
    shifts: Iterable[float],
    max_iter: int = 10,
    tol: float = 1e-7,
    progress: bool = False,
) -> dict[float, torch.Tensor]:
    r"""Solve :math:`(A + s_j I) x_{j,r} = b_r` for every shift and row by one CG run.

    Krylov spaces are shift invariant, :math:`\mathcal K_m(A + sI, b) = \mathcal K_m(A, b)`,
    so with :math:`x_0 = 0` the CG iterates of every shift come from the products of
    one base CG on :math:`A_0 = A + s_0 I`, :math:`s_0 = \min_j s_j` (Jegerlehner 1996;
    Frommer 2003). With the base step sizes :math:`\alpha_k, \beta_k` (as in
    :func:`cg_solve`) and :math:`\sigma = s_j - s_0 \ge 0`, the shifted residual is
    :math:`r^\sigma_k = \zeta_k r_k` with :math:`\zeta_k = 1/R_k(-\sigma)` (``R_k`` the
    base residual polynomial), :math:`\zeta_{-1} = \zeta_0 = 1`, and

    .. math:: \zeta_{k+1} = \frac{\zeta_k \zeta_{k-1}}
              {\zeta_{k-1}(1 + \alpha_k \sigma) + c_k (\zeta_{k-1} - \zeta_k)},
              \qquad c_k = \beta_{k-1}\alpha_k / \alpha_{k-1}\ (c_0 = 0),

    .. math:: x^\sigma_{k+1} = x^\sigma_k + \alpha_k \tfrac{\zeta_{k+1}}{\zeta_k} p^\sigma_k,
              \qquad p^\sigma_{k+1} = \zeta_{k+1} r_{k+1}
              + \beta_k \big(\tfrac{\zeta_{k+1}}{\zeta_k}\big)^2 p^\sigma_k.

    In exact arithmetic ``X[s]`` equals ``cg_solve(matmat, B, max_iter, tol,
    regularization=s)``, including its stopping rule: shift ``s`` of row ``r`` stops
    once :math:`|\zeta|\,\|r_r\| \le \mathrm{tol}\cdot\max(\|b_r\|, \epsilon)`; the base
    recursion of a row runs while any of its shifts does, and ``matmat`` is called
    only on those rows (``max_iter`` calls at most). A breakdown of the base
    (:math:`p^\top A_0 p` zero or non-finite) freezes every shift of that row. Memory:
    one solution and one direction per shift, plus four blocks, all of ``B``'s size.
    As :func:`cg_solve`, it warns once per solve when (shift, row) pairs are still
    above ``tol`` after ``max_iter`` iterations (the smallest shifts converge
    slowest).

    Args:
        matmat: maps a ``(m, P)`` block to ``(m, P)``, row ``r`` to ``A @ row_r``
            (``A`` symmetric positive semi-definite; ``m`` varies between calls).
        B: right-hand sides, ``(k, P)`` or ``(P,)``.
        shifts: the distinct :math:`s_j \ge 0`, in any order.
        max_iter: maximum number of CG iterations (= calls of ``matmat``).
        tol: relative residual tolerance.
        progress: show a tqdm bar over the iterations.

    Returns:
        ``{float(s): X_s}`` for every shift, each ``X_s`` with the shape of ``B``.

    Raises:
        DattriValueError: for a bad shape or setting (empty, negative or duplicate shifts).
    """
    _check_posint("max_iter", max_iter)
    _check_nonneg("tol", tol)
    vals = _check_shifts(shifts)
    Bm, single = _as_rows(B)
    scale = None
    if Bm.is_floating_point():
        Bm, scale = _unit_rows(Bm)
    base = min(vals)

    def op(V: torch.Tensor) -> torch.Tensor:
        out = matmat(V)
        return out + base * V if base else out

    sigma = torch.tensor([s - base for s in vals], dtype=Bm.dtype, device=Bm.device)[:, None]
    tiny = torch.finfo(Bm.dtype).tiny if Bm.is_floating_point() else 1e-30
    bnorm = Bm.norm(dim=1).clamp_min(tiny)
    thresh = tol * bnorm
    R, rs = Bm.clone(), (Bm * Bm).sum(dim=1)
    Pdir = R.clone()
    Xs = [torch.zeros_like(Bm) for _ in vals]
    Ps = [Bm.clone() for _ in vals]
    zeta = torch.ones(len(vals), Bm.shape[0], dtype=Bm.dtype, device=Bm.device)
    zeta_old = zeta.clone()
    alpha_old, beta_old = torch.ones_like(rs), torch.zeros_like(rs)
    active = (rs.sqrt() > thresh).expand_as(zeta).clone()  # (shift, row)
    broke = torch.zeros_like(rs, dtype=torch.bool)
    for _ in tqdm(range(max_iter), desc="multi-shift CG", disable=not progress):
        idx = active.any(dim=0).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        P_a, ok, alpha, R_a, rs_new, beta = _cg_step(op, Pdir, R, rs, idx, tiny)
        broke[idx] |= ~ok
        z, zo = zeta[:, idx], zeta_old[:, idx]
        c = beta_old[idx] * alpha / alpha_old[idx]
        z_new = z * zo / (zo * (1 + alpha * sigma) + c * (zo - z))
        ratio = z_new / z
        a_s, b_s = alpha * ratio, beta * ratio * ratio
        run = active[:, idx] & ok & torch.isfinite(a_s) & torch.isfinite(b_s)
        for j in range(len(vals)):  # a few shifts; the rows stay one block
            sel = run[j]
            if idx.numel() == Bm.shape[0] and bool(sel.all()):  # the usual case: in place
                Xs[j].add_(a_s[j, :, None] * Ps[j])
                Ps[j].mul_(b_s[j, :, None]).add_(z_new[j, :, None] * R_a)
                continue
            rows = idx[sel]
            P_j = Ps[j][rows]
            Xs[j][rows] = Xs[j][rows] + a_s[j, sel, None] * P_j
            Ps[j][rows] = z_new[j, sel, None] * R_a[sel] + b_s[j, sel, None] * P_j
        R[idx], rs[idx] = R_a, rs_new
        Pdir[idx] = R_a + beta[:, None] * P_a
        zeta_old[:, idx], zeta[:, idx] = z, z_new
        alpha_old[idx], beta_old[idx] = alpha, beta
        active[:, idx] = run & (z_new.abs() * rs_new.sqrt() > thresh[idx])
    _warn_breakdown(int(broke.sum()), Bm.shape[0], "cg_multishift_solve")
    # pairs still active ran out of iterations; shift s's residual is |zeta| r
    _report_convergence("cg_multishift_solve", max_iter, tol, active.numel(), active,
                        zeta.abs() * (rs.sqrt() / bnorm), vals)
    if scale is not None:
        Xs = [X * scale for X in Xs]
    return {s: (X[0] if single else X) for s, X in zip(vals, Xs)}


def lissa_solve(
    sample_matmat: Callable[[torch.Tensor, int], torch.Tensor],
    B: torch.Tensor,
    recursion_depth: int,
    damping: float = 0.0,
    scaling: float = 50.0,
    num_repeat: int = 1,
    progress: bool = False,
    chunk: int | None = None,
    rows_first: bool = False,
) -> torch.Tensor:
    r"""LiSSA: stochastic Neumann series for :math:`(A + d\,s\,I)^{-1} b`.

    For each repeat, with ``h_0 = b`` and a fresh stochastic estimate
    :math:`\tilde A_t` of ``A`` per step (Agarwal et al. 2017, Koh & Liang 2017):

    .. math:: h_t = b + (1 - d)\,h_{t-1} - \tilde A_t h_{t-1} / s,
              \qquad \text{result} = h_T / s,

    averaged over ``num_repeat`` repeats. With the exact ``A`` the recursion's fixed
    point is :math:`h^* = (d I + A/s)^{-1} b`, so the result converges to

    .. math:: h^*/s = (A + d\,s\,I)^{-1} b,

    provided every eigenvalue :math:`\mu` of ``A`` satisfies
    :math:`|1 - d - \mu/s| < 1` (choose ``scaling`` above the largest eigenvalue).
    The error after ``T`` steps decays like :math:`\max_\mu |1-d-\mu/s|^T`.

    Divergence is an error, not a result. When every step's
    :math:`M_t = (1-d) I - \tilde A_t/s` is a contraction (:math:`\|M_t\| \le 1`:
    every eigenvalue of every sampled :math:`\tilde A_t` in :math:`[-d s, (2-d) s]`),
    :math:`h_t = b + M_t h_{t-1}` gives :math:`\|h_t\| \le \|b\| + \|h_{t-1}\|`, so
    :math:`\|h_t\| \le (t+1)\|b\|` for every row. A row above ten times that bound
    (checked at the steps :math:`t = 1, 2, 4, 8, \dots` and ``T``, on norms that
    cost one pass over the rows; the factor 10 leaves room for minibatch steps that
    expand now and then in a recursion that still converges) or not finite proves
    that steps were not contractions, i.e. ``scaling`` is too small for the sampled
    Hessians, and raises ``NonFiniteError`` instead of returning growing garbage. A
    divergence too slow to pass the bound within ``T`` steps is not detected.

    Args:
        sample_matmat: ``sample_matmat(V, step)`` returns a stochastic estimate of
            ``V @ A`` (row-wise ``A v``) for ``V`` of shape ``(k, P)``; the caller
            draws the minibatch of step ``step``. Steps are numbered
            ``repeat * recursion_depth + t`` (``t`` = 1..T), so every repeat sees
            different minibatches.
        B: right-hand sides, ``(k, P)`` or ``(P,)``.
        recursion_depth: ``T``, the number of steps per repeat.
        damping: ``d`` in ``[0, 1)``.
        scaling: ``s > 0``.
        num_repeat: number of independent repeats averaged.
        progress: show a tqdm bar over the steps.
        chunk: rows of ``B`` per ``sample_matmat`` call (None: all). The rows'
            recursions are independent, so each step then calls ``sample_matmat``
            once per block of rows with the same ``step`` (it must return the same
            minibatch's product for a step) and updates the block in place: no
            temporaries of the size of ``B`` (MNIST MLP, 500 x 109,386: they cost
            0.6 s a step in page faults and memory traffic).
        rows_first: with ``chunk``, run every step of one block of rows before the
            next block (the same result: the blocks' recursions are independent and
            see the same minibatches), so that one block's recursion stays in cache
            instead of a pass over all of ``B`` per step; for a ``sample_matmat``
            whose product for a step is cheap to set up again per block.

    Returns:
        The estimate, with the shape of ``B``.

    Raises:
        DattriValueError: for a bad shape or setting.
        NonFiniteError: if the recursion diverges (``scaling`` too small, or the
            products ``sample_matmat`` returns not finite): some row's iterate is
            inf/NaN or grew past ten times the bound :math:`(t+1)\|b\|` that no
            recursion of contractions exceeds.
    """
    _check_posint("recursion_depth", recursion_depth)
    _check_posint("num_repeat", num_repeat)
    _check_nonneg("damping", damping)
    if not scaling > 0:
        msg = f"`scaling` must be > 0, got {scaling!r}; use a value above the largest eigenvalue."
        raise DattriValueError(msg)
    if chunk is not None:
        _check_posint("chunk", chunk)
    Bm, single = _as_rows(B)
    rows = Bm.shape[0]
    block = rows if chunk is None else chunk
    total = torch.zeros_like(Bm)
    starts = list(range(0, rows, block))
    bar = tqdm(total=num_repeat * recursion_depth * (len(starts) if rows_first else 1),
               desc="LiSSA", disable=not progress)
    # row norms relative to each row's largest entry: neither under- nor overflow
    # (float32 gradients of 1e-22, float64 ones of 1e-200)
    bmax = Bm.abs().amax(dim=1, keepdim=True)
    bmax = torch.where(bmax > 0, bmax, torch.ones_like(bmax))
    bnorm = (Bm / bmax).norm(dim=1)

    def step(h: torch.Tensor, s: int, t: int) -> None:
        hs = h[s:s + block]
        ahs = sample_matmat(hs, t)
        # h <- b + (1 - d) h - A h / s, in place
        hs.mul_(1.0 - damping).add_(Bm[s:s + block]).sub_(ahs.to(hs.dtype), alpha=1.0 / scaling)

    def check(h: torch.Tensor, s: int, t: int, rep: int) -> None:
        """Raise if a row of ``h[s:s+block]`` after ``t`` steps is not finite or above
        ``LISSA_GROWTH_SLACK * (t+1) * ||b||``: with contractions ``M_t`` (each
        sampled Hessian's spectrum in [-d s, (2-d) s]), ``||h_t|| <= ||b|| +
        ||h_{t-1}||`` holds step by step whatever the minibatch, hence ``(t+1)||b||``.
        A minibatch Hessian above (2-d) s expands its step and voids the proof, so a
        recursion that converges in the mean may pass the bound for a while: the
        slack covers that (and rounding), and costs a divergent recursion, which
        grows geometrically, only log(slack)/log(rate) more steps to be caught."""
        if t & (t - 1) and t != recursion_depth:  # steps 1, 2, 4, 8, ... and T
            return
        hs = h[s:s + block]
        ratio = (hs / bmax[s:s + block]).norm(dim=1) / ((t + 1) * bnorm[s:s + block])
        bad = ~(ratio <= LISSA_GROWTH_SLACK)  # NaN too (inf/NaN entries; 0/0 of zero rows)
        bad &= (bnorm[s:s + block] > 0) | ~torch.isfinite(hs).all(dim=1)  # a zero b stays 0
        if not bool(bad.any()):
            return
        bar.close()
        r = int(bad.nonzero()[0, 0]) + s
        finite = bool(torch.isfinite(h[r]).all())
        what = (f"row {r}'s iterate grew to {float(ratio[r - s]):.3g} x (t+1)||b||" if finite
                else f"row {r}'s iterate became inf/NaN")
        msg = (
            f"LiSSA diverged: at step t={t} of recursion_depth={recursion_depth} (repeat "
            f"{rep + 1} of {num_repeat}), {what}, while a converging recursion (every step a contraction) "
            f"stays below (t+1)||b||. `scaling`={scaling!r} is too small (or the Hessian "
            "products are not finite): the recursion needs every eigenvalue mu of the "
            "sampled Hessians to satisfy |1 - damping - mu/scaling| < 1, i.e. `scaling` "
            "above lambda_max / (2 - damping) of the sampled (minibatch) Hessians; "
            "estimate lambda_max with a few power iterations (or dattri.linalg.arnoldi) "
            "on a minibatch Hessian and pass a larger `scaling`, and enough `damping` "
            "(damping * scaling above the most negative eigenvalue's magnitude) for a "
            "non-convex loss."
        )
        raise NonFiniteError(msg)

    for rep in range(num_repeat):
        h = Bm.clone()
        if rows_first and chunk is not None:
            for s in starts:
                for t in range(1, recursion_depth + 1):
                    step(h, s, rep * recursion_depth + t)
                    check(h, s, t, rep)
                    bar.update(1)
        else:
            for t in range(1, recursion_depth + 1):
                for s in starts:
                    step(h, s, rep * recursion_depth + t)
                    check(h, s, t, rep)
                bar.update(1)
        total += h / scaling
    bar.close()
    X = total / num_repeat
    return X[0] if single else X


#: slack of LiSSA's divergence test ``||h_t|| > slack * (t+1) * ||b||`` (see
#: :func:`lissa_solve`)
LISSA_GROWTH_SLACK = 10.0


def _mgs_step(Q: torch.Tensor, n: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonalise ``w`` against rows ``0..n`` of ``Q``.

    One modified Gram-Schmidt sweep, then one block re-orthogonalisation pass
    (``w -= Q^T (Q w)``) that removes the rounding left by the first sweep.
    """
    coef = torch.zeros(n + 1, dtype=w.dtype, device=w.device)
    for j in range(n + 1):
        c = torch.dot(Q[j], w)
        w = w - c * Q[j]
        coef[j] = c
    basis = Q[: n + 1]
    c2 = basis @ w
    return coef + c2, w - c2 @ basis


def arnoldi(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    max_iter: int = 100,
    top_k: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top eigenpairs of a symmetric operator by Arnoldi iteration.

    Following Schioppa et al. (2022), build an orthonormal basis
    :math:`Q = [q_1..q_m]` of the Krylov space
    :math:`\mathcal K_m(A, q_1) = \mathrm{span}\{q_1, A q_1, \dots, A^{m-1} q_1\}`
    from a seeded Gaussian start, with modified Gram-Schmidt and a second
    re-orthogonalisation pass, and the Hessenberg matrix
    :math:`H_m = Q^\top A Q` (``m x m``). Stops early at breakdown, when the new
    residual has norm ``<= tol * max_n ||A q_n||`` (relative to the operator's
    scale, so ``A`` and ``c A`` give the same basis; the space is then invariant
    to that precision). The
    eigendecomposition :math:`H_m = U \Lambda U^\top` (symmetrised) gives Ritz pairs
    :math:`(\lambda_i, Q u_i)`; the ``top_k`` of largest :math:`|\lambda_i|` are kept.
    With ``max_iter >= dim`` and ``top_k >= dim`` this is the full eigendecomposition
    (up to breakdown), so :math:`U_r^\top \Lambda_r^{-1} U_r` is the exact inverse.

    Args:
        matvec: maps ``(dim,)`` to ``A @ v``.
        dim: ``P``, the size of ``A``.
        max_iter: maximum Krylov dimension ``m`` (= calls of ``matvec``); capped at
            ``dim``.
        top_k: number of eigenpairs returned (at most ``m``).
        tol: breakdown threshold on the residual norm, relative to the largest
            ``||A q_n||`` seen.
        seed: seed of the random start vector (drawn on the CPU, then moved, so the
            same seed gives the same start on every device).
        dtype: dtype of the basis.
        device: device of the basis.
        progress: show a tqdm bar.

    Returns:
        ``(eigvals (r,), eigvecs (r, dim))`` with ``r = min(top_k, m)``, eigenvalues
        sorted by decreasing magnitude, eigenvectors as orthonormal rows.
    """
    _check_posint("dim", dim)
    _check_posint("max_iter", max_iter)
    _check_posint("top_k", top_k)
    _check_nonneg("tol", tol)
    m = min(max_iter, dim)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    Q = torch.zeros(m, dim, dtype=dtype, device=device)
    Hm = torch.zeros(m, m, dtype=dtype, device=device)
    Q[0] = q / q.norm()
    size = m
    scale = torch.zeros((), dtype=dtype, device=device)  # ||A|| estimate: max ||A q_n||
    for n in tqdm(range(m), desc="Arnoldi", disable=not progress):
        w = matvec(Q[n]).reshape(dim).to(dtype)
        scale = torch.maximum(scale, w.norm())
        coef, w = _mgs_step(Q, n, w)
        Hm[: n + 1, n] = coef
        if n + 1 == m:
            break
        beta = w.norm()
        if beta <= tol * scale:  # relative: the same basis for A and c * A
            size = n + 1
            break
        Hm[n + 1, n] = beta
        Q[n + 1] = w / beta
    Hs = Hm[:size, :size]
    Hs = 0.5 * (Hs + Hs.T)
    evals, evecs = torch.linalg.eigh(Hs)
    order = torch.argsort(evals.abs(), descending=True)[: min(top_k, size)]
    return evals[order], evecs[:, order].T @ Q[:size]


def _eig_inverse(Hr: torch.Tensor) -> torch.Tensor:
    """Symmetric eigendecomposition (pseudo-)inverse; drops near-zero eigenvalues."""
    evals, evecs = torch.linalg.eigh(Hr)
    cutoff = evals.abs().max() * Hr.shape[0] * torch.finfo(Hr.dtype).eps
    keep = evals.abs() > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)
    return (evecs * inv) @ evecs.T


def _regularized(H: torch.Tensor, regularization: float) -> torch.Tensor:
    if H.ndim != 2 or H.shape[0] != H.shape[1]:  # noqa: PLR2004
        msg = f"`H` must be a square (P, P) matrix, got shape {tuple(H.shape)}."
        raise DattriValueError(msg)
    _check_nonneg("regularization", regularization)
    if not all_finite(H):
        msg = "`H` contains inf/NaN; check the loss and the parameters it was built at."
        raise NonFiniteError(msg)
    Hr = torch.add(H, H.T).mul_(0.5)  # one new matrix (P = 7,850: 1.3 s -> 0.3 s)
    if regularization:
        Hr.diagonal().add_(regularization)
    return Hr


def _warn_fallback() -> None:
    warn_user(
        "explicit inverse: H + regularization*I is not positive definite (Cholesky "
        "failed); using a symmetric eigendecomposition pseudo-inverse instead. "
        "Increase `regularization` for a well-posed inverse.",
        RuntimeWarning,
    )


def factorize(
    H: torch.Tensor,
    regularization: float = 0.0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""Factor :math:`H + \lambda I` once; return ``solve(B)`` for ``(k, P)`` rows.

    Cholesky when :math:`H + \lambda I` is positive definite, otherwise (with a
    warning) the symmetric-eigendecomposition pseudo-inverse of
    :func:`explicit_inverse`. The returned function computes
    :math:`(H + \lambda I)^{-1} b_r` for every row ``b_r``.

    Args:
        H: ``(P, P)`` symmetric matrix.
        regularization: :math:`\lambda \ge 0`.

    Returns:
        ``solve``: ``(k, P)`` -> ``(k, P)``.
    """
    Hr = _regularized(H, regularization)
    L, info = torch.linalg.cholesky_ex(Hr)
    if int(info) == 0:
        return lambda Bm: torch.cholesky_solve(Bm.to(L).T, L).T
    _warn_fallback()
    inv = _eig_inverse(Hr)
    return lambda Bm: Bm.to(inv) @ inv


def explicit_inverse(H: torch.Tensor, regularization: float = 0.0) -> torch.Tensor:
    r"""Dense :math:`(H + \lambda I)^{-1}` in the dtype of ``H``.

    Uses a Cholesky factorisation; if it fails (``H`` indefinite or singular)
    warns and returns :math:`V\,\mathrm{diag}(1/\mu_i)\,V^\top` from the symmetric
    eigendecomposition, dropping eigenvalues with
    :math:`|\mu_i| \le P\,\epsilon\,\max|\mu|` (a pseudo-inverse).

    Args:
        H: ``(P, P)`` symmetric matrix (symmetrised as ``(H + H^T)/2``).
        regularization: :math:`\lambda \ge 0`.

    Returns:
        ``(P, P)`` inverse.
    """
    Hr = _regularized(H, regularization)
    L, info = torch.linalg.cholesky_ex(Hr)
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    _warn_fallback()
    return _eig_inverse(Hr)


def explicit_solve(
    H: torch.Tensor,
    B: torch.Tensor,
    regularization: float = 0.0,
) -> torch.Tensor:
    r"""Rows of :math:`B (H + \lambda I)^{-1}`, i.e. :math:`(H+\lambda I)^{-1} b_r`.

    Same factorisation and fallback as :func:`explicit_inverse`.

    Args:
        H: ``(P, P)`` symmetric matrix.
        B: ``(k, P)`` or ``(P,)``.
        regularization: :math:`\lambda \ge 0`.

    Returns:
        The solution, shape of ``B``.
    """
    Bm, single = _as_rows(B)
    X = factorize(H, regularization)(Bm)
    return X[0] if single else X
