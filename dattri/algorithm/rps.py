"""Representer point selection, RPS-L2 (Yeh et al. 2018).

The final linear layer ``Phi(x) = W~ h~(x)`` (``h~ = [h, 1]`` folds the bias in) is
fine-tuned to the minimiser of

    F(W~) = (1/n) sum_j L(W~ h~_j, y_j) + lambda ||W~||^2,

where ``W~ = sum_j alpha_j h~_j^T`` with ``alpha_j = -1/(2 lambda n) dL_j/dPhi_j``
(a vector over classes). The pre-activation of a test point decomposes as
``Phi(x_t) = sum_j alpha_j (h~_j . h~_t)`` and the score of training point j for
test point t is the term of the test label's class:

    tau(j, t) = alpha_j[y_t] * (h~_j . h~_t).

The fit. ``F`` is strongly convex for a convex per-example loss (cross-entropy:
multinomial logistic regression with an L2 penalty) in the ``C x (d + 1)``
parameters of the layer (640 for the MNIST MLP, 7,850 for MNIST LR), so it is
solved by damped Newton from the trained layer: the Hessian is

    (1/n) sum_j Lambda_j (x) h~_j h~_j^T + 2 lambda I,

``Lambda_j`` the loss's ``C x C`` Hessian in the pre-activation of example j (from C
backward passes of the batch loss, checked on the first examples against the loss of
each alone; a loss that couples the examples gets ``torch.func.hessian`` of each
example alone, so any batch loss works). The unknowns are ``W~ = Z Q^T`` with ``Q`` an orthonormal basis of the row
space of the features (the optimum lies there; the other components only feel the
penalty and vanish), so a layer of ``C x (d + 1)`` weights fitted on ``n < d``
examples has ``C n`` unknowns. Up to ``DENSE_NEWTON_MAX_PARAMS`` unknowns the
Hessian is formed densely in float64 and factored by Cholesky; above (MNIST LR's
7,850), each Newton system is solved by conjugate gradients on Hessian-vector
products, which costs far less than forming the Hessian. A formed
Hessian's factor preconditions CG on the next Newton systems, and a new one is
formed only when that CG does not converge within 25 steps. Steps are
damped by a backtracking (Armijo) line search. The fit stops at stationarity,
``||grad F|| <= rtol * (||grad of the loss term|| + ||2 lambda W~||)`` (the two
terms that cancel at the optimum; ``rtol = 1e-10``), where the representer
decomposition reproduces the pre-activations up to
``h~_t . grad F / (2 lambda)``. A fit that does not get there within ``epoch``
Newton iterations warns with the residual reached.

Under ``torch.distributed`` each rank reads the final-layer inputs of its share of
the training loader; the ranks' features ``(n, d + 1)`` and labels are gathered
(small next to the model), every rank runs the same fit on all of them, and each
scores its own training rows (the rows are gathered): the scores of one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from dattri._warn import warn_user
from dattri._convention import as_batched
from dattri._loader import check_loader
from dattri.algorithm._loop import LoaderFeatures, map_batches
from dattri.algorithm._scored import (
    block_rows,
    check_store_args,
    check_top_k,
    checkpoint_digest,
    fill,
)
from dattri.algorithm.base import BaseAttributor
from dattri.distributed import all_gather_rows, row_range
from dattri.errors import DattriValueError, NonFiniteError, NotCachedError
from dattri.func.utils import all_finite
from dattri.task import AttributionTask
from dattri.topk import TopK

__all__ = ["DENSE_NEWTON_MAX_PARAMS", "RPSAttributor"]

#: largest problem (C x rank of the features) whose Newton Hessian is formed densely;
#: larger layers solve each Newton system by CG on Hessian-vector products. Measured
#: on MNIST LR (7,850 unknowns, 5,000 digits, 2 cores): dense Newton 35 s and 1.6 GB
#: at l2_strength = 0.003, CG 8.7 s and 0.48 GB (18 s at 1e-3, 63 s at 1e-4, where
#: L-BFGS took ~600 s); the MLP's last layer (650 unknowns) 0.8 s either way.
#: Tried on the whole LR search (24 fits, paper grid, LDS + AUC, one process alone:
#: 227 s as is): forming the Hessian once plain CG needs > 200 steps, 227 s; CG
#: preconditioned by the per-class diagonal blocks, 484 s (the blocks go stale)
DENSE_NEWTON_MAX_PARAMS = 2_000
_RTOL = 1e-10
_CG_MAX_ITER = 1000
_NEWTON_TOL = 1e-10  # the tightest relative residual of a Newton system
_FORCING_MAX = 1e-1  # the loosest (early steps; inexact Newton, see ``_fit``)
_PCG_MAX_ITER = 25  # steps preconditioned by an earlier Hessian before forming a new one


def _labels(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        for key in ("label", "labels", "y", "target", "targets"):
            if key in batch:
                return batch[key]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    msg = ("RPSAttributor needs labels: batches must be (x, y) tuples/lists or dicts "
           "with a 'label'/'labels' key.")
    raise DattriValueError(msg)


def _batch_output_hessians(loss_fn: Callable, pre: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(n, C, C)``: row c of example j's block is ``d/dpre_j`` of ``dL/dpre[:, c]``
    summed over the batch, ``L = loss_fn(pre, y)`` (the per-example Hessians of ``L``
    when the examples are independent)."""
    from dattri.algorithm._linear_hessian import output_hessians

    p = pre.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(p, y), p, create_graph=True)
        return output_hessians(g, p)


class _L2Problem:
    """``F(W) = loss_fn(h W^T, y) + lam ||W||^2`` with its gradient and Newton systems."""

    def __init__(self, loss_fn: Callable, h: torch.Tensor, y: torch.Tensor, lam: float) -> None:
        self.loss_fn, self.h, self.y, self.lam = loss_fn, h, y, lam
        self.chol: torch.Tensor | None = None  # upper Cholesky factor of a formed Hessian
        self.factorizations = 0
        self._scale: float | None = None  # see _check_scale

    def loss_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """``F(w)``, the loss term's gradient (C, d) and ``dL/dPhi`` (n, C), mean-scaled."""
        pre = (self.h @ w.T).requires_grad_(True)
        loss = self.loss_fn(pre, self.y)
        (g_pre,) = torch.autograd.grad(loss, pre)
        g_loss = g_pre.T @ self.h
        return float(loss.detach()) + self.lam * float((w * w).sum()), g_loss, g_pre

    def value(self, w: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.loss_fn(self.h @ w.T, self.y)) + self.lam * float((w * w).sum())

    def output_hessians(self, w: torch.Tensor) -> torch.Tensor:
        """``(n, C, C)``: block j of the Hessian of ``loss_fn(pre, y)`` in ``pre_j`` (for
        a batch mean, the Hessian of example j's loss times 1/n; for a sum, itself).

        From C backward passes of the batch loss (row c of every example's Hessian
        at once: examples are independent), checked to be a multiple of the
        Hessian of one example's loss (a batch of one, by autograd) on the first
        examples; a loss that couples the examples falls back to ``vmap(hessian)``
        over batches of one, times 1/n (the batch-mean convention). No torch.func on the usual path: its
        first use in a process costs ~1.4 s of imports (MNIST MLP 1,000 x 100:
        the whole RPS-L2 ``cache`` took 1.6 s, of which the fit is 0.1 s)."""
        pre = (self.h @ w.T).detach()
        loss_fn, n = self.loss_fn, pre.shape[0]
        if self._scale != 0.0:  # not known to couple the examples
            lam_j = _batch_output_hessians(loss_fn, pre, self.y)
            if self._scale is None:  # checked at the first Newton step, then known
                self._scale = self._check_scale(pre, lam_j)
            if self._scale:  # the batch loss's own blocks, whatever its reduction
                return lam_j

        def one(p: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return loss_fn(p.unsqueeze(0), yi.unsqueeze(0))

        return torch.func.vmap(torch.func.hessian(one))(pre, self.y) / n

    def _check_scale(self, pre: torch.Tensor, batch_rows: torch.Tensor) -> float:
        """The factor from the batch loss's Hessian rows ``batch_rows`` (n, C, C) to one
        example's Hessian (``n`` for a batch mean), checked on the first examples;
        ``0.0`` when the loss couples the examples (``vmap(hessian)`` of batches of one
        then). The coupling is a property of ``loss_fn``, not of the weights: one
        check per fit."""
        loss_fn = self.loss_fn
        head = min(pre.shape[0], 3)
        lam_j = batch_rows[:head]
        want = torch.stack([_batch_output_hessians(loss_fn, pre[j:j + 1], self.y[j:j + 1])[0]
                            for j in range(head)])
        scale = float((want * lam_j).sum() / (lam_j ** 2).sum().clamp_min(1e-300))
        tol = 1e-5 if pre.dtype == torch.float32 else 1e-10
        ok = torch.allclose(scale * lam_j, want, rtol=tol,
                            atol=tol * float(want.abs().max().clamp_min(1e-30)))
        return scale if ok else 0.0

    def dense_hessian(self, lam_j: torch.Tensor) -> torch.Tensor:
        """``sum_j Lambda_j (x) h_j h_j^T + 2 lam I`` as (C d, C d), row-major in (class,
        feature); only the block upper triangle (class b >= a) is filled, the rest is 0.

        One matmul per class row ``a``: ``h^T [Lambda_j[a, b] h_j]_{b >= a}``, i.e.
        ``n d^2 C (C + 1)`` flops in all (MNIST LR, n = 5,000: 0.34 TFLOP).
        """
        h = self.h
        n, c, d = h.shape[0], lam_j.shape[1], h.shape[1]
        hess = torch.zeros(c * d, c * d, dtype=h.dtype, device=h.device)
        for a in range(c):
            right = (lam_j[:, a, a:, None] * h[:, None, :]).reshape(n, (c - a) * d)
            hess[a * d:(a + 1) * d, a * d:] = h.T @ right
        hess.diagonal().add_(2 * self.lam)
        return hess

    def hvp(self, lam_j: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Rows of ``v`` (m, C d) times the data part of the Hessian (without 2 lam I)."""
        c, d = lam_j.shape[1], self.h.shape[1]
        u = torch.einsum("nd,mcd->mnc", self.h, v.reshape(-1, c, d))
        t = torch.einsum("nab,mnb->mna", lam_j, u)
        return torch.einsum("mna,nd->mad", t, self.h).reshape(v.shape[0], c * d)

    def newton_direction(self, w: torch.Tensor, grad: torch.Tensor,
                         tol: float = _NEWTON_TOL) -> torch.Tensor:
        """``-H(w)^{-1} grad`` (to a relative residual of ``tol``; exact where a
        Hessian is formed and factored).

        Dense: preconditioned CG on ``H(w)`` (Hessian-vector products, ~4 n C r flops
        each) with the Cholesky factor of the last Hessian formed; when that does not
        converge within ``_PCG_MAX_ITER`` steps (early, damped iterations move the
        Hessian), ``H(w)`` itself is formed and factored (``factorizations`` counts
        them). A positive shift is added where ``H`` is not definite.
        """
        from dattri.linalg import cg_solve

        lam_j = self.output_hessians(w)
        b = -grad.reshape(-1)
        if grad.numel() > DENSE_NEWTON_MAX_PARAMS:
            step = cg_solve(lambda v: self.hvp(lam_j, v), b.reshape(1, -1),
                            max_iter=_CG_MAX_ITER, tol=tol,
                            regularization=2 * self.lam)
            return step.reshape(grad.shape)
        if self.chol is not None:
            step = _pcg(lambda v: self.hvp(lam_j, v.reshape(1, -1)).reshape(-1)
                        + 2 * self.lam * v,
                        b, lambda r: torch.cholesky_solve(r.reshape(-1, 1), self.chol,
                                                          upper=True).reshape(-1), tol)
            if step is not None:
                return step.reshape(grad.shape)
        hess = self.dense_hessian(lam_j)
        chol, info = torch.linalg.cholesky_ex(hess, upper=True)
        shift = 2 * self.lam
        while int(info) != 0:  # a non-convex loss: Levenberg-Marquardt shift
            shift *= 10
            hess.diagonal().add_(shift)
            chol, info = torch.linalg.cholesky_ex(hess, upper=True)
        self.chol, self.factorizations = chol, self.factorizations + 1
        return torch.cholesky_solve(b.reshape(-1, 1), chol, upper=True).reshape(grad.shape)


def _pcg(apply_a: Callable, b: torch.Tensor, apply_m: Callable,
         tol: float = _NEWTON_TOL) -> torch.Tensor | None:
    """Preconditioned CG for ``A x = b`` from 0 to ``||r|| <= tol ||b||``;
    None when it needs more than ``_PCG_MAX_ITER`` steps or ``A`` is not definite."""
    x, r = torch.zeros_like(b), b.clone()
    z = apply_m(r)
    p, rz, bound = z.clone(), float(r @ z), tol * float(b.norm())
    for _ in range(_PCG_MAX_ITER):
        ap = apply_a(p)
        curv = float(p @ ap)
        if curv <= 0:
            return None
        alpha = rz / curv
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        if float(r.norm()) <= bound:
            return x
        z = apply_m(r)
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return None


def _row_basis(h: torch.Tensor) -> torch.Tensor:
    """``(d, r)`` orthonormal basis of the row space of ``h`` (numerical rank r)."""
    _, sv, vh = torch.linalg.svd(h, full_matrices=False)
    keep = sv > sv[0] * max(h.shape) * torch.finfo(h.dtype).eps
    return vh[keep].T.contiguous()


class RPSAttributor(BaseAttributor):
    """RPS-L2.

    Args:
        task: its ``loss_func(pre_activation, label)`` is the loss of the final
            layer's output (e.g. ``nn.functional.cross_entropy``), mean over a batch.
            The fit minimises ``loss_func(h W^T, y) + l2_strength ||W||^2`` as given:
            a loss summed over the batch is the same fit as its mean with
            ``l2_strength / n`` (n training examples), and the representer values
            still add up to the fitted layer's outputs.
        final_linear_layer_name: module name of the final ``nn.Linear``.
        normalize_preactivate: L2-normalise the intermediate features ``h``.
        l2_strength: lambda of the L2 penalty.
        epoch: maximum number of Newton iterations of the fine-tuning (a cap: the
            fit stops at stationarity, typically within a few tens of iterations;
            it warns when the cap is reached first).
        device: computation device.
        offload: where the final-layer inputs of the training set live after the
            fit: ``"none"`` (gathered on the device, ``h_train``), ``"cpu"`` (this
            rank's rows in host memory) or ``"disk"`` (this rank's rows in a
            resumable :mod:`dattri.store` under ``cache_dir``, keyed by the weights
            and the loader: a rerun runs no forward pass over the training set).
            The fit gathers them once (it needs every row); scores read this rank's
            rows in blocks.
        cache_dir: the folder of ``offload="disk"``.

    After ``cache``: ``alpha`` (n_train, C), ``weight`` (C, d + 1, the fine-tuned
    layer, bias last), ``newton_iterations``, ``hessian_factorizations`` (dense
    Hessians formed; the other Newton systems were solved by CG preconditioned
    with the last one) and ``stationarity`` (the relative gradient norm reached,
    see the module docstring).
    """

    _shardable = True

    def __init__(
        self,
        task: AttributionTask,
        final_linear_layer_name: str,
        normalize_preactivate: bool = False,
        l2_strength: float = 0.003,
        epoch: int = 3000,
        device: str | torch.device = "cpu",
        offload: str = "none",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(task, None, device)
        check_store_args("RPSAttributor", offload, cache_dir)
        self.offload, self.cache_dir = offload, cache_dir
        self._kept: Any = None
        modules = dict(task.get_model().named_modules())
        layer = modules.get(final_linear_layer_name)
        if not isinstance(layer, nn.Linear):
            linears = [k for k, m in modules.items() if isinstance(m, nn.Linear)]
            msg = (f"final_linear_layer_name={final_linear_layer_name!r} is not an nn.Linear "
                   f"module of the model; linear modules: {linears}.")
            raise DattriValueError(msg)
        if not l2_strength > 0:
            msg = f"l2_strength={l2_strength!r} must be > 0 (the representer theorem needs it)."
            raise DattriValueError(msg)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            msg = f"epoch={epoch!r}: expected a positive integer (the Newton iteration cap)."
            raise DattriValueError(msg)
        self.final_linear_layer_name = final_linear_layer_name
        self.normalize_preactivate = bool(normalize_preactivate)
        self.l2_strength, self.epoch = float(l2_strength), int(epoch)
        self.alpha: torch.Tensor | None = None
        self.h_train: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.newton_iterations: int | None = None
        self.hessian_factorizations: int | None = None
        self.stationarity: float | None = None

    def _features(self, loader: Iterable, name: str = "train_loader") -> tuple[torch.Tensor, torch.Tensor]:
        from dattri.model_util.hook import get_final_layer_io

        self.task._load_checkpoints(0)
        model = self.task.get_model().to(self.device)
        was_training = model.training
        model.eval()
        labels: list[torch.Tensor] = []
        try:  # one pass over the loader gives the features and the labels
            h, _ = get_final_layer_io(model, self.final_linear_layer_name, loader,
                                      device=self.device, on_batch=lambda b: labels.append(_labels(b)),
                                      name=name)
        finally:
            model.train(was_training)
        h = h.to(self.device, torch.float64).flatten(1)
        if not all_finite(h):
            rows = int((~torch.isfinite(h)).any(1).sum())
            msg = (f"RPS-L2: the inputs of the final layer {self.final_linear_layer_name!r} "
                   f"contain NaN or inf for {rows} example(s) (NaN/inf in the data, or an "
                   "overflow in the model); remove or repair those examples.")
            raise NonFiniteError(msg)
        if self.normalize_preactivate:
            h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], 1)
        return h, torch.cat(labels).to(self.device)

    def _fit(self, problem: _L2Problem, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Damped Newton from ``w`` to stationarity; returns ``(w, dL/dPhi)``."""
        lam = problem.lam
        for it in range(self.epoch + 1):
            value, g_loss, g_pre = problem.loss_grad(w)
            grad = g_loss + 2 * lam * w
            scale = float(g_loss.norm()) + float(2 * lam * w.norm())
            self.stationarity = float(grad.norm()) / max(scale, torch.finfo(w.dtype).tiny)
            self.newton_iterations = it
            if self.stationarity <= _RTOL or it == self.epoch:
                break
            # inexact Newton (Eisenstat & Walker's forcing term): each system is solved
            # to a relative residual of min(0.1, stationarity), so the iteration keeps
            # its quadratic convergence, but never tighter than the target needs: the
            # next relative gradient is about eta times this one (plus the quadratic term)
            eta = min(_FORCING_MAX, max(self.stationarity, 0.1 * _RTOL / self.stationarity))
            step = problem.newton_direction(w, grad, eta)
            slope = float((grad * step).sum())
            if slope >= 0:  # rounding: no descent direction left
                break
            t = 1.0
            # Armijo backtracking; once the predicted decrease is below what float64
            # resolves in F (the quadratic phase), the full Newton step is taken
            resolvable = -slope > 1e-12 * (1.0 + abs(value))
            while (resolvable and t > 1e-12
                   and problem.value(w + t * step) > value + 1e-4 * t * slope):
                t *= 0.5
            if t <= 1e-12:  # no decrease at the precision of float64
                break
            w = w + t * step
        self.hessian_factorizations = problem.factorizations
        if self.stationarity > _RTOL:
            warn_user(
                f"RPSAttributor: the L2 fine-tuning stopped after {self.newton_iterations} Newton "
                f"iteration(s) at relative gradient norm {self.stationarity:.2e} (target "
                f"{_RTOL:.0e}); the representer decomposition is off by that much. Raise "
                f"epoch={self.epoch} or l2_strength={self.l2_strength}.",
                RuntimeWarning)
        return w, g_pre

    def _cache(self, train_loader: Iterable) -> None:
        shard = self._shard()
        if self.offload == "none":
            h, y = self._features(train_loader)  # this rank's share
        else:
            settings = {"method": "RPS-L2", "layer": self.final_linear_layer_name,
                        "normalize": self.normalize_preactivate}
            self._kept = fill(self, _FinalInputs(self), train_loader, settings,
                              desc="final-layer inputs", keys=[checkpoint_digest(self.task, 0, None)])[0]
            h = torch.cat([b for _, b in self._kept.blocks(device=self.device)])
            y = torch.cat(map_batches(train_loader, _labels, "train_loader", None)).to(self.device)
        self._held = row_range(h.shape[0], shard)[:2]
        h, y = all_gather_rows(h, shard), all_gather_rows(y, shard)
        layer = dict(self.task.get_model().named_modules())[self.final_linear_layer_name]
        b = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        w0 = torch.cat([layer.weight.detach(), b.detach().reshape(-1, 1)], 1)
        self._binary = layer.out_features == 1  # one logit: BCE-with-logits style
        if self._binary:  # the loss compares (n, 1) logits with (n, 1) float labels
            y = y.to(h.dtype).reshape(-1, 1)
        # the user's loss in either convention (batch, or 0.3.0's single example)
        loss = as_batched(self.task.user_loss_func, "loss_func", batched_args=(0, 1))
        w0, lam = w0.to(self.device, torch.float64), self.l2_strength
        # the optimum lies in the row space of h (the representer theorem; the other
        # components only see the penalty): solve for W = Z Q^T, Q an orthonormal basis
        # of it (rank <= min(n, d); e.g. 200 x 785 features give 10 x 200 unknowns)
        q = _row_basis(h)
        z, _ = self._fit(_L2Problem(loss, h @ q, y, lam), w0 @ q)
        w = z @ q.T
        _, g_loss, g_pre = _L2Problem(loss, h, y, lam).loss_grad(w)
        scale = float(g_loss.norm()) + float(2 * lam * w.norm())
        self.stationarity = (float((g_loss + 2 * lam * w).norm())
                             / max(scale, torch.finfo(w.dtype).tiny))
        self.alpha = (-g_pre / (2 * lam)).detach()  # g_pre = (1/n) dL_j/dPhi_j
        self.h_train = h if self._kept is None else None  # kept: read back in blocks
        self.weight = w.detach()
        self._dtype = layer.weight.dtype

    def attribute(self, train_loader: Iterable, test_loader: Iterable,
                  top_k: int | None = None) -> torch.Tensor | TopK:
        """Representer values ``(n_train, n_test)`` for the test labels' classes; with
        ``top_k=k`` the :class:`~dattri.topk.TopK` of each test example, ranked from
        blocks of training rows (no ``n_train x n_test`` matrix), merged over ranks."""
        k = check_top_k(top_k)
        self._check_pair(train_loader, test_loader)
        self._ensure_cached(train_loader)
        h_t, y_t = self._features(test_loader, "test_loader")
        blocks = self._score_blocks(h_t, y_t, None if k is None else block_rows(h_t.shape[1], len(y_t)))
        return self._finish(blocks, k)

    def _score_blocks(self, h_t: torch.Tensor, y_t: torch.Tensor,
                      rows: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(global_row_start, values (b, m))`` of this rank's training rows, ``rows``
        at a time (None: one block)."""
        lo, hi = self._held  # this rank's training rows
        if self._kept is None:
            step = rows or max(1, hi - lo)
            pieces = ((s, self.h_train[s:min(s + step, hi)]) for s in range(lo, hi, step))
        else:
            pieces = self._kept.blocks(device=self.device, rows=rows)
        for start, h in pieces:
            terms = self._label_terms(y_t, slice(start, start + h.shape[0]))
            yield start, (terms * (h @ h_t.T)).to(self._dtype)

    def _label_terms(self, y: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """``alpha_j`` for each label's class, ``(n_train, len(y))`` (the training
        ``rows``); a one-logit (binary) model's logit speaks for class 1, so class 0
        takes ``-alpha_j``."""
        alpha = self.alpha[rows]
        if getattr(self, "_binary", False):
            return alpha[:, :1] * (2 * y.reshape(1, -1).to(alpha.dtype) - 1)
        return alpha[:, y.long().reshape(-1)]

    def self_attribute(self, train_loader: Iterable) -> torch.Tensor:
        """``alpha_j[y_j] * ||h~_j||^2`` as ``(n_train,)``."""
        check_loader(train_loader, "train_loader")
        self._ensure_cached(train_loader)
        h, y = self._features(self._local(train_loader))  # this rank's rows
        lo, hi = self._held
        alpha = self.alpha[lo:hi]
        if getattr(self, "_binary", False):
            a = alpha[:, 0] * (2 * y.reshape(-1).to(alpha.dtype) - 1)
        else:
            a = alpha.gather(1, y.long().reshape(-1, 1)).squeeze(1)
        return self._gather((a * (h * h).sum(1)).to(self._dtype))

    def decompose(self, test_loader: Iterable) -> torch.Tensor:
        """Per-class representer decomposition ``(n_train, n_test, C)`` (small data only)."""
        if self.alpha is None:
            msg = "call cache(train_loader) before decompose()."
            raise NotCachedError(msg)
        h_t, _ = self._features(test_loader, "test_loader")
        h = self.h_train
        if h is None:  # kept rows: every rank's, gathered
            h = all_gather_rows(torch.cat([b for _, b in self._kept.blocks(device=self.device)]),
                                self._shard())
        return self.alpha[:, None, :] * (h @ h_t.T)[:, :, None]


class _FinalInputs(LoaderFeatures):
    """RPS-L2's training features: the final layer's inputs ``[h, 1]`` ``(B, d + 1)``."""

    which = "loss"

    def __init__(self, att: RPSAttributor) -> None:
        self.att, self.device, self.show_progress = att, att.device, att.show_progress

    def batch(self, batch: Any, ckpt: int) -> torch.Tensor:  # noqa: ARG002 - the model's weights
        return self.att._features([batch])[0]
