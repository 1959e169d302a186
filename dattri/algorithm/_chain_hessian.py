"""Exact minibatch Hessians of an MLP: a chain of ``nn.Linear`` layers (private).

For a model that is a chain ``z_l = W_l a_{l-1} + b_l``, ``a_l = s_l(z_l)`` with
elementwise activations ``s_l`` and a loss of the last output ``z_L`` (the MNIST
MLP: 784-128-64-10 with ReLU, and dropout in eval mode), the Hessian-vector
product of one example's loss in a direction ``V = (V_l, u_l)`` is the R-operator
(Pearlmutter 1994) of backpropagation:

    forward   R(z_l) = W_l R(a_{l-1}) + V_l a_{l-1} + u_l,   R(a_l) = s_l' * R(z_l),  R(a_0) = 0
    backward  R(d_L) = Lambda R(z_L),
              q_l = W_{l+1}^T d_{l+1},  R(q_l) = W_{l+1}^T R(d_{l+1}) + V_{l+1}^T d_{l+1},
              R(d_l) = s_l'' * R(z_l) * q_l + s_l' * R(q_l)
    product   (H V)_{W_l} = R(d_l) a_{l-1}^T + d_l R(a_{l-1})^T,   (H V)_{b_l} = R(d_l)

with ``d_l`` the example's loss gradient in ``z_l`` and ``Lambda`` its Hessian in
``z_L``. Everything that does not depend on ``V`` (the inputs ``a_l``, ``s_l'``,
``s_l''``, ``d_l``, ``Lambda``) is recorded once per training example; a block of
``k`` directions on ``b`` examples then costs a few GEMMs whose long side is
``k x width`` (``~4 k b P`` flops) and reads each ``V_l`` once, where autograd
replays a double-backward graph once per direction (LiSSA on the MNIST MLP: 500
directions x 500 steps per solve).

The structure is assumed from the hooks (each ``nn.Linear`` called once on 2-D
inputs, consecutive layers joined by a map of the same shape) and then checked:
:func:`chain_rows` is used by the caller only after its first product equals the
autograd one on two random vectors (:func:`dattri.algorithm._linear_hessian.calibrated`),
so a residual connection, a normalisation or any non-elementwise map between the
layers falls back to autograd.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dattri.algorithm._engine import DataCache, ensemble_rng
from dattri.algorithm._linear_hessian import output_hessians, resolved_loss
from dattri.model_util.dropout import active_dropout
from dattri.task import AttributionTask

__all__ = ["ChainRows", "chain_rows"]


class _Layer:
    """One ``nn.Linear`` of the chain: its weight (selected or not) and where its
    selected weight / bias sit in the flat parameter vector (None: not selected)."""

    def __init__(self, name: str, weight: torch.Tensor, w_slice: slice | None,
                 b_slice: slice | None) -> None:
        self.name, self.weight = name, weight
        self.w_slice, self.b_slice = w_slice, b_slice


def _record(task: AttributionTask, linear: dict[str, nn.Module], batch: Any, ckpt: int,
            device: torch.device) -> tuple[list[str], list[torch.Tensor]] | None:
    """The ``nn.Linear`` modules the loss calls on one batch, in call order, and their
    per-example terms: for each layer ``l`` its input ``a_{l-1}`` and gradient ``d_l``
    (of the example's own loss), for ``l < L`` ``s_l'`` and ``s_l''``, then
    ``Lambda (B, C, C)``. None when the hooks do not see a chain."""
    func = resolved_loss(task, batch)
    if func is None:
        return None
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook_for(name: str):
        def hook(_m, inputs, output):
            leaf = torch.zeros_like(output, requires_grad=True)
            seen.append((name, inputs[0], leaf))
            return output + leaf
        return hook

    handles = [mod.register_forward_hook(hook_for(name)) for name, mod in linear.items()]
    try:
        with ensemble_rng(ckpt, device), torch.enable_grad():
            loss = func(dict(task.named_parameters), batch).reshape(())
            order = [name for name, _, _ in seen]
            if not order or len(set(order)) != len(order):  # each layer called once
                return None
            ins = [a for _, a, _ in seen]
            leaves = [z for _, _, z in seen]
            if any(t.dim() != 2 for t in ins + leaves):
                return None
            m = leaves[0].shape[0]
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            if any(g is None for g in grads):
                return None
            out: list[torch.Tensor] = []
            for layer in range(len(order)):
                out.append(ins[layer].detach())
                out.append(grads[layer].detach() * m)  # the example's own loss
            for layer in range(len(order) - 1):  # s_l between layer l and l + 1
                z, a = leaves[layer], ins[layer + 1]
                if a.shape != z.shape or not a.requires_grad:
                    return None
                # a.sum(), not grad_outputs=ones: see influence_function._RevRev._one
                (s1,) = torch.autograd.grad(a.sum(), z, create_graph=True, allow_unused=True)
                if s1 is None:
                    return None
                s2 = (torch.autograd.grad(s1.sum(), z, retain_graph=True, allow_unused=True)[0]
                      if s1.requires_grad else None)
                out.append(s1.detach())
                out.append(torch.zeros_like(z) if s2 is None else s2.detach())
            out.append(output_hessians(grads[-1], leaves[-1]) * m)
    finally:
        for h in handles:
            h.remove()
    return order, out


class ChainRows:
    """The per-example terms of the chain over this rank's training examples:
    :meth:`matmat` of a set of rows is ``V -> V H_B`` for their mean loss (weighted
    ``weight`` each), summed over the ranks (the LiSSA minibatch products). Built by
    :func:`chain_rows`."""

    #: directions per product in LiSSA: each product writes ``k x P`` temporaries,
    #: which stay in cache for small ``k`` (MNIST MLP, 500 directions, minibatch 10,
    #: one thread: 0.22 s a step at 64, 0.35 s at 512)
    chunk = 64

    def __init__(self, data: DataCache, layers: list[_Layer], terms: list[torch.Tensor],
                 p: int) -> None:
        self.data, self.layers, self.p = data, layers, p
        n = len(layers)
        self.a = terms[0:2 * n:2]
        self.d = terms[1:2 * n:2]
        self.s1 = terms[2 * n:2 * n + 2 * (n - 1):2]
        self.s2 = terms[2 * n + 1:2 * n + 2 * (n - 1):2]
        self.lam = terms[-1]
        self.shift = 0.0
        covered = sum((sl.stop - sl.start) for layer in layers
                      for sl in (layer.w_slice, layer.b_slice) if sl is not None)
        self.covers = covered == p  # every coordinate of a product is written

    def matmat(self, rows: torch.Tensor, weight: float) -> _ChainMatmat:
        op = _ChainMatmat(self, rows, weight)
        op.shift = self.shift
        return op


class _ChainMatmat:
    """``V (k, P) -> V H_B + shift V`` for one set of rows (see the module docstring)."""

    def __init__(self, rows_of: ChainRows, rows: torch.Tensor, weight: float) -> None:
        pick = (lambda t: t.index_select(0, rows))  # noqa: E731
        self.c = rows_of
        # the product is linear in (d_l, Lambda) together: the weight goes in there
        self.a, self.d = [pick(t) for t in rows_of.a], [pick(t) * weight for t in rows_of.d]
        self.s1, self.s2 = [pick(t) for t in rows_of.s1], [pick(t) for t in rows_of.s2]
        self.lam = pick(rows_of.lam) * weight
        self.shift = 0.0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        vv = v.unsqueeze(0) if v.dim() == 1 else v
        # a rank holding none of the step's rows adds zero to the sum
        out = self._local(vv) if self.lam.shape[0] else vv.new_zeros(vv.shape[0], self.c.p)
        out = self.c.data.reduce(out)
        if self.shift:
            out.add_(vv, alpha=self.shift)
        return out.reshape(v.shape)

    def _local(self, vv: torch.Tensor) -> torch.Tensor:
        """``V H_B`` of this rank's rows (``b > 0`` of them)."""
        layers = self.c.layers
        k, b = vv.shape[0], self.lam.shape[0]
        dirs = []
        for layer in layers:
            out_f, in_f = layer.weight.shape
            w = vv[:, layer.w_slice].view(k, out_f, in_f) if layer.w_slice else None
            u = vv[:, layer.b_slice] if layer.b_slice else None
            dirs.append((w, u))
        # forward: R(z_l) (k, b, out), R(a_l) (k, b, out) for l < L
        rz, ra = [], [None]
        for i, layer in enumerate(layers):
            w, u = dirs[i]
            t = None
            if w is not None:  # V_l a_{l-1}: a batched GEMM over the k strided V_l
                t = torch.bmm(w, self.a[i].T.unsqueeze(0).expand(k, -1, -1)).transpose(1, 2)
            if ra[i] is not None:
                t2 = ra[i] @ layer.weight.T
                t = t2 if t is None else t + t2
            if u is not None:
                t = u[:, None, :].expand(k, b, -1) if t is None else t + u[:, None, :]
            if t is None:
                t = vv.new_zeros(k, b, layer.weight.shape[0])
            rz.append(t)
            if i < len(layers) - 1:
                ra.append(self.s1[i] * t)
        # backward
        out = vv.new_empty(k, self.c.p) if self.c.covers else vv.new_zeros(k, self.c.p)
        rd = torch.bmm(rz[-1].transpose(0, 1), self.lam.transpose(1, 2)).transpose(0, 1)  # (k, b, C)
        for i in range(len(layers) - 1, -1, -1):
            layer, (w, u) = layers[i], dirs[i]
            if layer.w_slice is not None:
                # R(d_l)^T a_{l-1} summed over the rows: one GEMM (k out, b) x (b, in)
                # (a strided in-place baddbmm into ``out`` runs as k small GEMMs: 8x slower)
                hw = (rd.transpose(1, 2).reshape(-1, b) @ self.a[i]).view(k, -1)
                if ra[i] is not None:
                    hw.add_((self.d[i].T @ ra[i]).reshape(k, -1))  # d_l R(a_{l-1})^T
                out[:, layer.w_slice] = hw
            if layer.b_slice is not None:
                out[:, layer.b_slice] = rd.sum(dim=1)
            if i == 0:
                break
            rq = rd @ layer.weight  # (k, b, in)
            if w is not None:
                rq = rq + self.d[i] @ w  # V_l^T d_l: (b, out) x (k, out, in)
            q = self.d[i] @ layer.weight  # (b, in)
            rd = self.s1[i - 1] * rq + self.s2[i - 1] * rz[i - 1] * q
        return out


def chain_rows(task: AttributionTask, names: list[str], data: DataCache, ckpt: int,
               theta: torch.Tensor) -> ChainRows | None:
    """:class:`ChainRows` of every local example, or None when the model is not seen
    as a chain of ``nn.Linear`` layers holding every selected parameter (or has an
    active dropout layer, whose masks would differ from the autograd products'). The
    caller checks the first product it uses against autograd
    (:func:`~dattri.algorithm._linear_hessian.calibrated`)."""
    model = task.model
    if active_dropout(model):
        return None
    params = dict(task.named_parameters)
    linear = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    offsets, start = {}, 0
    for n in names:
        size = params[n].numel()
        offsets[n] = slice(start, start + size)
        start += size
    if start != theta.numel():
        return None
    mods = {n.rpartition(".")[0] for n in names}
    if not mods <= set(linear) or any(n.rpartition(".")[2] not in ("weight", "bias") for n in names):
        return None
    order, parts, ok = None, [], True
    for batch in data.batches:
        rec = _record(task, linear, batch, ckpt, theta.device)
        if rec is None or (order is not None and rec[0] != order):
            ok = False
            break
        order = rec[0]
        parts.append(rec[1])
    if data.shard is not None:  # every rank takes the same path
        ok = bool(data.reduce(torch.tensor([0.0 if ok else 1.0], device=theta.device)) == 0)
    if not ok or order is None or not mods <= set(order):
        return None
    layers = []
    for name in order:
        w = params.get(f"{name}.weight", linear[name].weight)
        # a copy: the model's parameters are overwritten in place when another
        # checkpoint is loaded, and this checkpoint's products must keep its weights
        layers.append(_Layer(name, w.detach().to(theta.dtype, copy=True),
                             offsets.get(f"{name}.weight"), offsets.get(f"{name}.bias")))
    terms = [torch.cat(col).to(theta.dtype) for col in zip(*parts)]
    return ChainRows(data, layers, terms, theta.numel())
