"""Exact Hessian of a loss whose selected parameters are one ``nn.Linear`` (private).

When every selected parameter belongs to one linear layer ``z_i = W a_i + b``
(logistic regression, or the last layer of a network: ``layer_name`` restricted
to it), the loss depends on ``(W, b)`` only through the outputs ``z_i``, so

    H = sum_i Lambda_i (x) a~_i a~_i^T,    Lambda_i = d^2 L / dz_i^2  (C x C)

with ``a~_i`` the input with a ones column for the bias. ``Lambda`` comes from C
extra backward passes per batch (examples are independent, so the Hessian in
``z`` is block diagonal), and ``H`` from C matrix products ``A^T (Lambda_c * A)``
over the blocks ``c' >= c``: ``n C^2 d^2`` multiply-adds (MNIST LR: 0.3 TFLOP)
instead of the ``P`` Hessian-vector products of basis vectors (2.5 TFLOP). The
result is checked against two Hessian-vector products on the whole training set
and not used when they disagree (a loss that couples examples, a layer called
twice); the caller then builds ``H`` from HVPs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dattri._convention import is_unbatched
from dattri.algorithm._engine import DataCache, ensemble_rng
from dattri.algorithm._factored import _layers
from dattri.task import AttributionTask

__all__ = ["linear_layer_hessian"]


def _batch_terms(task: AttributionTask, module: str, batch, ckpt: int, device: torch.device):
    """``(A (B, d_in), Lambda (B, C, C))`` of one batch, or None (not one 2-D call)."""
    if is_unbatched(task.original_loss_func):  # hooks cannot see inside its vmap
        return None
    mod = dict(task.model.named_modules())[module]
    seen: list = []

    def hook(_m, inputs, output):
        leaf = torch.zeros_like(output, requires_grad=True)
        seen.append((inputs[0].detach(), leaf))
        return output + leaf

    handle = mod.register_forward_hook(hook)
    try:
        with ensemble_rng(ckpt, device), torch.enable_grad():
            loss = task.original_loss_func(dict(task.named_parameters), batch)
            if len(seen) != 1 or seen[0][1].dim() != 2:
                return None
            a, z = seen[0]
            (g,) = torch.autograd.grad(loss.reshape(()), z, create_graph=True)
            if not g.requires_grad:  # the loss is linear in z: no curvature
                return a, g.new_zeros(g.shape[0], g.shape[1], g.shape[1])
            rows = [torch.autograd.grad(g[:, c].sum(), z, retain_graph=True, allow_unused=True)[0]
                    for c in range(g.shape[1])]
    finally:
        handle.remove()
    lam = torch.stack([r if r is not None else torch.zeros_like(g) for r in rows], dim=1)
    return a, lam.detach()


def linear_layer_hessian(
    task: AttributionTask, names: list[str], data: DataCache, ckpt: int,
    matmat: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor,
) -> torch.Tensor | None:
    """Hessian ``(P, P)`` of the mean loss over ``data`` in the flat layout of
    ``names`` (the selected parameters), or None when the structure does not hold.

    Args:
        task: the task, its checkpoint ``ckpt`` loaded.
        names: selected parameter names (``task._resolve_layer_name``).
        data: the cached training batches.
        ckpt: checkpoint index (dropout seed).
        matmat: ``V -> V H`` by Hessian-vector products, for the check.
        theta: the flat selected parameters (dtype, device, size).
    """
    layers = _layers(task, names)
    if layers is None or len(layers) != 1:
        return None
    module, w_sel, b_sel = layers[0]
    p = theta.numel()
    h = None
    for batch, size in zip(data.batches, data.sizes):
        terms = _batch_terms(task, module, batch, ckpt, theta.device)
        if terms is None:
            return None
        a, lam = terms
        a, lam = a.to(theta.dtype), lam.to(theta.dtype) * (size / data.n)
        cols = ([a] if w_sel else []) + ([torch.ones_like(a[:, :1])] if b_sel else [])
        a = torch.cat(cols, dim=1)  # (B, d') with d' = d_in [+ 1]
        n_out, d = lam.shape[1], a.shape[1]
        if n_out * d != p:
            return None
        if h is None:
            h = theta.new_zeros(n_out, d, n_out, d)
        for c in range(n_out):  # blocks (c, c' >= c); the others by symmetry below
            right = (lam[:, c, c:, None] * a[:, None, :]).reshape(a.shape[0], -1)
            h[c, :, c:].add_((a.T @ right).reshape(d, n_out - c, d))
    h = data.reduce(h)  # the other ranks' parts of the training set
    # blocks (c, j) x (c', j') -> the flat layout [W (C x d_in) row-major, b (C)]
    d_in = d - 1 if b_sel else d
    idx = [torch.cat(([c * d_in + torch.arange(d_in)] if w_sel else [])
                     + ([torch.tensor([n_out * d_in + c])] if b_sel else [])).to(theta.device)
           for c in range(n_out)]
    flat = theta.new_empty(p, p)
    for c in range(n_out):
        for c2 in range(c, n_out):
            flat[idx[c][:, None], idx[c2][None, :]] = h[c, :, c2]
            flat[idx[c2][:, None], idx[c][None, :]] = h[c, :, c2].T
    del h
    # the check: two Hessian-vector products on all the data
    g = torch.Generator(device="cpu").manual_seed(ckpt)
    v = torch.randn(2, p, generator=g, dtype=theta.dtype).to(theta.device)
    want, got = matmat(v), v @ flat
    scale = float(flat.abs().max())
    if not bool(((got - want).norm(dim=1) <= 1e-4 * want.norm(dim=1) + 1e-8 * scale).all()):
        return None
    return flat
