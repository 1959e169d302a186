"""Per-example parameter gradients of common layers from batched activations.

For a module applied to a batch, with input ``x`` (the examples along dim 0) and
``delta = d loss_b / d y_b`` the gradient of each example's own loss with respect
to the module's output, the per-example gradients of the module's parameters have
closed forms that cost about one batched weight-gradient (no loop over examples):

- ``nn.Linear`` on inputs ``(B, ..., d_in)``: ``dW_b = sum_t delta_bt a_bt^T``
  (a sum over positions for sequences), ``db_b = sum_t delta_bt``.
- ``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, padding mode, dilation,
  groups): the input unfolded into patches ``U_b`` ``(C_in k, L)``, per group
  ``dW_b = delta_b U_b^T``; ``db_b = sum_l delta_bl``.
- ``nn.Embedding``: ``dE_b[v] = sum_{t: tok_bt = v} delta_bt`` (repeated tokens add
  up; the padding index gets none).
- ``nn.LayerNorm`` / ``nn.GroupNorm`` / ``nn.BatchNorm*d`` in eval mode:
  ``dgamma_b = sum delta_b * x_hat_b``, ``dbeta_b = sum delta_b`` over the
  positions sharing a parameter, with ``x_hat`` the normalised input (per-example
  statistics for Layer/GroupNorm, running statistics for BatchNorm).
- Hugging Face ``Conv1D`` (GPT-2): the linear rule with the weight transposed.
- a module that owns parameters directly, each of which reaches the activations
  only through matrix products ``A @ D`` / ``D @ A`` with ``D = f(param)`` a function
  of that parameter alone (a slice, a transpose...; e.g. relative position
  embeddings in attention), or through ``A * D`` / ``A + D`` with ``D`` broadcast
  over the examples (a gain, RMSNorm's weight), or as ``F.layer_norm``'s affine
  parameters: :class:`ParamUses` follows the
  parameter through one call of the module's forward and taps each use's output
  ``G``; then ``dD_b = sum A_b^T G_b`` (resp. ``sum G_b A_b^T``, ``sum G_b * A_b``,
  ``sum G_b``) over the positions and ``dparam_b = vjp(f)(dD_b)``
  (:func:`traced_grads`).
- any other module with parameters: ``torch.func.vjp`` of the module alone, mapped
  over the examples with ``vmap``, for its own parameters only.

Each rule returns ``{local parameter name: (B, *param.shape)}`` for the requested
names, or ``None`` when the module's configuration is outside the rule (e.g. a
BatchNorm in training mode, whose examples are coupled by the batch statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["GRAD_RULES", "ParamUses", "generic_grads", "rule_for", "traced_grads"]

Grads = dict[str, torch.Tensor]


def _seq(t: torch.Tensor) -> torch.Tensor:
    """``(B, ..., d) -> (B, T, d)``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _into(op: Callable[..., torch.Tensor], dest: torch.Tensor | None, *args: Any) -> torch.Tensor:
    """``op(*args)``, written into ``dest`` (a preallocated ``(B, *param.shape)`` view
    of the caller's flat gradient buffer) when one is given: no temporary of the
    size of the per-example gradients (a fresh buffer of hundreds of MB costs its
    page faults on every batch, more than the product itself), no copy after."""
    return op(*args) if dest is None else op(*args, out=dest)


def linear_grads(m: nn.Linear, x: torch.Tensor, delta: torch.Tensor, names: Sequence[str],
                 out: Grads | None = None, accumulate: frozenset[str] = frozenset()) -> Grads:
    """``nn.Linear`` on inputs of any rank: sums over positions. ``out``: optional
    destinations ``{name: (B, *param.shape)}`` of ``x``'s dtype (see :func:`_into`);
    the names in ``accumulate`` are added to what their destination holds (a
    parameter used twice, e.g. a tied embedding and output head)."""
    a, d = _seq(x), _seq(delta).to(x.dtype)
    dest = out or {}
    res: Grads = {}
    if "weight" in names:
        w, acc = dest.get("weight"), "weight" in accumulate
        if a.shape[1] == 1:  # one position: an outer product
            res["weight"] = (w.addcmul_(d[:, 0, :, None], a[:, 0, None, :]) if w is not None and acc
                             else _into(torch.mul, w, d[:, 0, :, None], a[:, 0, None, :]))
        else:
            res["weight"] = _product(w, acc, d.transpose(1, 2), a)
    if "bias" in names:
        res["bias"] = _bias_sum(d, dest.get("bias"), "bias" in accumulate)
    return res


def _product(dest: torch.Tensor | None, accumulate: bool, left: torch.Tensor,
             right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` (batched): into ``dest`` (:func:`_into`), or added to it."""
    if dest is not None and accumulate:
        return dest.baddbmm_(left, right)
    return _into(torch.matmul, dest, left, right)


def _bias_sum(d: torch.Tensor, dest: torch.Tensor | None, accumulate: bool) -> torch.Tensor:
    """``d.sum(1)`` ``(B, d_out)``: into ``dest``, or added to it (``accumulate``)."""
    if dest is None:
        return d.sum(1)
    return dest.add_(d.sum(1)) if accumulate else torch.sum(d, 1, out=dest)


def _conv_patches(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple, int]:
    """Unfolded input ``(B, C_in * prod(k), L_out)``, the kernel size, the output length."""
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    if any(m._reversed_padding_repeated_twice):
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
    if isinstance(m, nn.Conv1d):  # as a 2-D convolution of height 1
        x = x.unsqueeze(2)
        k, s, dil = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
    else:
        k, s, dil = m.kernel_size, m.stride, m.dilation
    cols = F.unfold(x, k, dilation=dil, stride=s)
    return cols, k, cols.shape[-1]


#: output positions from which a convolution's per-example weight gradients come from
#: one grouped weight-gradient convolution (the examples as groups) rather than from
#: unfolded patches multiplied into the result's own memory. Measured on 2 cores,
#: ResNet-9's layers at batch 16 (grouped / unfolded): 32x32 outputs 18.9 / 27.3 ms,
#: 16x16 10.6 / 9.3 and 20.3 / 14.0 ms, 8x8 59 / 17 ms, 4x4 101 / 8.9 ms
GROUPED_MIN_POSITIONS = 512
#: a convolution with at least this many output positions and this many
#: multiply-adds per example (``C_out * C_in / groups * prod(k) * positions``) takes
#: its per-example weight gradients from PyTorch's own weight-gradient kernel (oneDNN
#: on CPU) called once per example, which runs these shapes near the rate of the
#: batched step. Measured on 2 cores (AMD EPYC, AVX-512), ResNet-9's layers at batch
#: 64, each example's result copied into the flat buffer (per example / the other
#: paths): 64->128 at 32x32 67 / 86 ms, 128->128 at 32x32 132 / 160, 128->256 at
#: 16x16 (stride 2) 121 / 154, 256->256 at 16x16 144 / 312; at 8x8 (64 positions)
#: 130 / 88 and 285 / 241, and the 1x1 shortcuts (8.4M multiply-adds) lose at batch 16.
#: CPU only: on a GPU each example's kernel would be a launch of a few microseconds.
EACH_MIN_POSITIONS = 256
EACH_MIN_MACS = 16 * 2**20


def _explicit_padding(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """``x`` padded as the module pads it when that is not a zero padding of known
    size (a padding mode, ``"same"``), and the padding left to the kernel."""
    if m.padding_mode != "zeros":
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        return x, (0,) * len(m.kernel_size)
    if isinstance(m.padding, str):  # "same" / "valid": the padding actually applied
        return F.pad(x, m._reversed_padding_repeated_twice), (0,) * len(m.kernel_size)
    return x, m.padding


def _conv_weight_grouped(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients ``(B, *weight.shape)``: the weight gradient of a
    convolution with the ``B`` examples stacked as ``B * groups`` groups."""
    b = x.shape[0]
    x, padding = _explicit_padding(m, x)
    w = m.weight.new_empty((b * m.out_channels, *m.weight.shape[1:]), dtype=x.dtype)
    grads = torch.ops.aten.convolution_backward(
        delta.to(x.dtype).reshape(1, b * m.out_channels, *delta.shape[2:]),
        x.reshape(1, b * m.in_channels, *x.shape[2:]), w, None, m.stride, padding, m.dilation,
        False, [0] * len(m.kernel_size), b * m.groups, [False, True, False])
    return grads[1].reshape(b, *m.weight.shape)


def _conv_weight_each(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor, delta: torch.Tensor,
                      dest: torch.Tensor | None) -> torch.Tensor:
    """Per-example weight gradients ``(B, *weight.shape)``: the module's own weight
    gradient of each example alone, written into ``dest`` when given."""
    b = x.shape[0]
    x, padding = _explicit_padding(m, x)
    delta = delta.to(x.dtype)
    w = m.weight.new_empty(m.weight.shape, dtype=x.dtype)  # its shape only
    out = m.weight.new_empty((b, *m.weight.shape), dtype=x.dtype) if dest is None else dest
    for i in range(b):
        grads = torch.ops.aten.convolution_backward(
            delta[i:i + 1], x[i:i + 1], w, None, m.stride, padding, m.dilation,
            False, [0] * len(m.kernel_size), m.groups, [False, True, False])
        out[i].copy_(grads[1])
    return out


def conv_grads(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor, delta: torch.Tensor, names: Sequence[str],
               out: Grads | None = None) -> Grads:
    """``nn.Conv1d`` / ``nn.Conv2d``: per-example products of output gradients and
    patches (the weight-gradient kernel once per example, a grouped weight-gradient
    convolution, or unfolded patches: :data:`EACH_MIN_POSITIONS`,
    :data:`GROUPED_MIN_POSITIONS`). ``out``: optional destinations as for
    :func:`linear_grads` (the per-example and unfolded paths write into them; the
    grouped convolution returns its own tensor)."""
    b = x.shape[0]
    d = delta.reshape(b, m.out_channels, -1).to(x.dtype)
    dest = out or {}
    res: Grads = {}
    if "weight" in names:
        length = d.shape[-1]
        w = dest.get("weight")
        if (x.device.type == "cpu" and length >= EACH_MIN_POSITIONS
                and m.weight.numel() * length >= EACH_MIN_MACS):  # multiply-adds an example
            res["weight"] = _conv_weight_each(m, x, delta, None if w is None else w.view(b, *m.weight.shape))
        elif length >= GROUPED_MIN_POSITIONS:
            res["weight"] = _conv_weight_grouped(m, x, delta)
        else:
            cols, _, length = _conv_patches(m, x)
            g = m.groups
            cols = cols.reshape(b, g, -1, length)  # (B, g, C_in/g * K, L)
            dg = d.reshape(b, g, m.out_channels // g, length)
            w = None if w is None else w.view(b, g, m.out_channels // g, -1)
            res["weight"] = _into(torch.matmul, w, dg, cols.transpose(-1, -2)).reshape(b, *m.weight.shape)
    if "bias" in names:
        res["bias"] = d.sum(-1) if dest.get("bias") is None else torch.sum(d, -1, out=dest["bias"])
    return res


def embedding_grads(m: nn.Embedding, idx: torch.Tensor, delta: torch.Tensor, names: Sequence[str],
                    out: Grads | None = None, accumulate: frozenset[str] = frozenset()) -> Grads | None:
    """``nn.Embedding``: scatter-add of each example's output gradients by token;
    into ``out["weight"]`` ``(B, V, D)`` when given (zeroed first unless ``"weight"``
    is in ``accumulate``: a weight tied to an output head)."""
    if m.scale_grad_by_freq or m.max_norm is not None or "weight" not in names:
        return None if m.scale_grad_by_freq or m.max_norm is not None else {}
    b, v, dim = idx.shape[0], m.num_embeddings, m.embedding_dim
    tok = idx.reshape(b, -1)
    vals = delta.reshape(b, -1, dim)
    dest = (out or {}).get("weight")
    if dest is not None:
        if "weight" not in accumulate:
            dest.zero_()
        if m.padding_idx is not None:  # the padding positions add nothing
            vals = torch.where((tok != m.padding_idx)[..., None], vals, 0)
        # one accumulating scatter of (example, token) rows into the strided (B, V, D)
        # view (a loop of per-example index_add_ took 15 ms at B = 1,000, this 0.8 ms)
        rows = torch.arange(b, device=tok.device)[:, None].expand_as(tok)
        dest.index_put_((rows, tok), vals.to(dest.dtype), accumulate=True)
        return {"weight": dest}
    flat = (tok + torch.arange(b, device=tok.device)[:, None] * v).reshape(-1)
    vals = vals.reshape(-1, dim)
    if m.padding_idx is not None:
        keep = tok.reshape(-1) != m.padding_idx
        flat, vals = flat[keep], vals[keep]
    res = vals.new_zeros(b * v, dim).index_add_(0, flat, vals)
    return {"weight": res.reshape(b, v, dim)}


def _affine_grads(xhat: torch.Tensor, delta: torch.Tensor, shape: tuple, names: Sequence[str],
                  channel_dim: bool) -> Grads:
    """Sum ``delta * xhat`` and ``delta`` over the positions sharing an affine parameter."""
    b = delta.shape[0]
    d = delta.to(xhat.dtype)
    if channel_dim:  # (B, C, *): one parameter per channel
        red = lambda t: t.reshape(b, shape[0], -1).sum(-1)  # noqa: E731
    else:  # (B, ..., *shape): one parameter per trailing element
        red = lambda t: t.reshape(b, -1, *shape).sum(1)  # noqa: E731
    out: Grads = {}
    if "weight" in names:
        out["weight"] = red(d * xhat)
    if "bias" in names:
        out["bias"] = red(d)
    return out


def layer_norm_grads(m: nn.LayerNorm, x: torch.Tensor, delta: torch.Tensor, names: Sequence[str]) -> Grads:
    """``nn.LayerNorm``: statistics per example and position, no coupling."""
    # the normalised input by the library's own kernel (as the forward computed it)
    xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    return _affine_grads(xhat, delta, tuple(m.normalized_shape), names, channel_dim=False)


def group_norm_grads(m: nn.GroupNorm, x: torch.Tensor, delta: torch.Tensor, names: Sequence[str]) -> Grads:
    """``nn.GroupNorm``: statistics per example and group."""
    xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
    return _affine_grads(xhat, delta, (m.num_channels,), names, channel_dim=True)


def batch_norm_grads(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, delta: torch.Tensor,
                     names: Sequence[str]) -> Grads | None:
    """``nn.BatchNorm*d`` in eval mode (running statistics); ``None`` in training mode."""
    if m.training or m.running_mean is None:
        return None  # batch statistics couple the examples
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
    return _affine_grads(xhat, delta, (m.num_features,), names, channel_dim=True)


#: exact module type -> rule(module, input, output gradient, names)
GRAD_RULES: dict[type, Callable[..., Grads | None]] = {
    nn.Linear: linear_grads,
    nn.Conv1d: conv_grads,
    nn.Conv2d: conv_grads,
    nn.Embedding: embedding_grads,
    nn.LayerNorm: layer_norm_grads,
    nn.GroupNorm: group_norm_grads,
    nn.BatchNorm1d: batch_norm_grads,
    nn.BatchNorm2d: batch_norm_grads,
    nn.BatchNorm3d: batch_norm_grads,
}


def hf_conv1d_grads(m: nn.Module, x: torch.Tensor, delta: torch.Tensor, names: Sequence[str],
                    out: Grads | None = None, accumulate: frozenset[str] = frozenset()) -> Grads:
    """Hugging Face ``transformers`` ``Conv1D`` (GPT-2's linear layer, ``y = x W + b``
    with ``W`` of shape ``(d_in, d_out)``): ``dW_b = sum_t a_bt delta_bt^T``."""
    a, d = _seq(x), _seq(delta).to(x.dtype)
    dest = out or {}
    res: Grads = {}
    if "weight" in names:
        res["weight"] = _product(dest.get("weight"), "weight" in accumulate, a.transpose(1, 2), d)
    if "bias" in names:
        res["bias"] = _bias_sum(d, dest.get("bias"), "bias" in accumulate)
    return res


#: the rules that take ``out=`` destinations (:func:`_into`)
WRITES_INTO = (linear_grads, conv_grads, hf_conv1d_grads, embedding_grads)
#: those of them that also add into a destination holding a partial sum (``accumulate``)
ACCUMULATES = (linear_grads, hf_conv1d_grads, embedding_grads)


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and hasattr(module, "nf"))


def rule_for(module: nn.Module) -> Callable[..., Grads | None] | None:
    """The closed-form rule of ``module`` (subclasses of the listed types too, when
    they own no parameters beyond ``weight`` and ``bias``), or ``None``."""
    own = {n for n, _ in module.named_parameters(recurse=False)}
    if not own <= {"weight", "bias"}:
        return None
    if _is_hf_conv1d(module):
        return hf_conv1d_grads
    for cls in type(module).__mro__:
        if cls in GRAD_RULES:
            # a subclass that overrides forward may compute something else
            if type(module).forward is not cls.forward:
                return None
            return GRAD_RULES[cls]
    return None


def _batch_dim(t: Any, b: int, module: nn.Module) -> int | None:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first and t.dim() == 3:  # noqa: PLR2004
        return 1 if t.shape[1] == b else None
    return 0 if t.shape[0] == b else None


def generic_grads(
    module: nn.Module,
    params: dict[str, torch.Tensor],
    args: tuple,
    kwargs: dict[str, Any],
    output: Any,
    out_grads: Any,
    b: int,
) -> Grads:
    """Per-example gradients of ``module``'s own ``params`` by ``vmap(vjp)``.

    Args:
        module: the module (its buffers and other parameters stay as they are).
        params: ``{local name: tensor}`` of the parameters to differentiate.
        args, kwargs: the inputs of the captured call (batched along the example axis).
        output: the captured output (a tensor or a tuple of tensors).
        out_grads: per-example gradients of the loss with respect to ``output`` (the
            same structure; ``None`` for outputs that do not reach the loss).
        b: the number of examples.

    Returns:
        ``{name: (B, *shape)}``.
    """
    from torch.func import functional_call, vjp, vmap

    leaves, spec = tree_flatten((args, kwargs))
    dims = [_batch_dim(t, b, module) for t in leaves]
    mapped = [i for i, d in enumerate(dims) if d is not None]
    out_leaves, out_spec = tree_flatten(output)
    g_leaves = tree_flatten(out_grads)[0] if out_grads is not None else [None] * len(out_leaves)
    g_dims = [_batch_dim(t, b, module) for t in out_leaves]
    keep = [i for i, g in enumerate(g_leaves) if g is not None]

    def one(p: dict[str, torch.Tensor], xs: list[torch.Tensor], gs: list[torch.Tensor]) -> Grads:
        full = list(leaves)
        for i, x in zip(mapped, xs):
            full[i] = x.unsqueeze(dims[i])
        a, kw = tree_unflatten(full, spec)

        def f(pp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            y = tree_flatten(functional_call(module, pp, a, kw, strict=False))[0]
            return tuple(y[i] for i in keep)

        _, pull = vjp(f, p)
        cot = tuple(g.unsqueeze(g_dims[i]) if g_dims[i] is not None else g
                    for i, g in zip(keep, gs))
        return pull(cot)[0]

    xs = [leaves[i] for i in mapped]
    gs = [g_leaves[i] for i in keep]
    in_dims = (None, [dims[i] for i in mapped], [g_dims[i] for i in keep])
    return vmap(one, in_dims=in_dims, randomness="same")(params, xs, gs)


#: the products whose operand may be a function of a parameter alone (``@`` calls
#: ``Tensor.matmul``)
_MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__})
#: elementwise products and sums, the parameter's side broadcast over the examples
#: (a gain or a shift: ``x * gain``, RMSNorm's ``weight * x_hat``)
_ELEMENTWISE = {torch.mul: "mul", torch.Tensor.mul: "mul", torch.Tensor.__mul__: "mul",
                torch.add: "add", torch.Tensor.add: "add", torch.Tensor.__add__: "add"}


def _in_place(func: Callable, kwargs: dict) -> bool:
    """``func`` writes into an argument (``add_``, ``x[i] = v``, ``+=``, ``out=``)."""
    name = getattr(func, "__name__", "")
    return ("out" in kwargs or name == "__setitem__" or name.startswith("__i")
            or (name.endswith("_") and not name.endswith("__")))


class ParamUses(TorchFunctionMode):
    """Follows a module's own parameters through one call of its forward.

    Entered around the call (``with ParamUses(...): module.forward(...)``), it sees
    every torch function called in the forward (not inside the torch functions
    themselves). A tensor computed from a single followed parameter alone (no other
    tensor among the arguments) becomes ``D = f(param)``, with ``f`` kept to be
    replayed; a product ``A @ D`` or ``D @ A`` (``D`` a matrix, ``A`` an activation
    with the examples along dim 0 and a matrix axis of its own), or ``A * D`` /
    ``A + D`` with ``D`` broadcast over the examples, is a *use*: its output is
    handed to ``tap``, which makes its gradient available, and ``A`` is kept. Any other function of a followed tensor, or a followed tensor among the
    module's outputs, or a followed tensor changed in place, sets :attr:`failed`
    (the caller then falls back to :func:`generic_grads`).

    Args:
        params: ``{local name: the tensor the module reads}`` (as the call sees it,
            e.g. under ``functional_call``).
        b: the number of examples.
        tap: ``tensor -> (the tensor to use instead, slot)``; the slot is handed
            back with the use.
    """

    def __init__(self, params: dict[str, torch.Tensor], b: int,
                 tap: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]) -> None:
        super().__init__()
        self.params, self.b, self.tap = params, b, tap
        #: (tensor, parameter name, f: parameter -> tensor)
        self.derived: list[tuple[torch.Tensor, str, Callable]] = [
            (t, n, lambda p: p) for n, t in params.items()]
        #: (parameter name, f, kind, A, D's shape, slot); kind: "right" for ``A @ D``,
        #: "left" for ``D @ A``, "mul" for ``A * D``, "add" for ``A + D``
        self.uses: list[tuple[str, Callable, str, torch.Tensor, torch.Size, Any]] = []
        self.failed: str | None = None

    def _find(self, t: Any) -> tuple[str, Callable] | None:
        for d, name, f in self.derived:
            if d is t:
                return name, f
        return None

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.failed is not None:
            return out
        leaves, spec = tree_flatten((args, kwargs))
        found = [(i, self._find(t)) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        hits = [(i, h) for i, h in found if h is not None]
        if not hits:
            return out
        others = [i for i, h in found if h is None]
        names = {h[0] for _, h in hits}
        if not others and len(names) == 1 and not _in_place(func, kwargs):
            return self._derive(func, leaves, spec, hits, names.pop(), out)
        kind = "matmul" if func in _MATMULS else _ELEMENTWISE.get(func)
        if kind is not None and len(hits) == 1 and len(others) == 1 and not kwargs:
            return self._use(kind, leaves, hits[0], others[0], out)
        if func is F.layer_norm and len(others) == 1:
            return self._layer_norm_use(args, kwargs, out)
        self.failed = f"{getattr(func, '__name__', func)} on a function of parameter {names}"
        return out

    def _derive(self, func: Callable, leaves: list, spec: Any, hits: list, name: str, out: Any) -> Any:
        """``out`` is a function of parameter ``name`` alone: follow it."""
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:  # a size, a dtype...
            return out
        if not isinstance(out, torch.Tensor):
            self.failed = f"{getattr(func, '__name__', func)} of parameter {name!r} gives several tensors"
            return out
        fs = dict(hits)

        def f(p: torch.Tensor) -> torch.Tensor:
            full = list(leaves)
            for i, (_, g) in fs.items():
                full[i] = g(p)
            a, kw = tree_unflatten(full, spec)
            return func(*a, **kw)

        self.derived.append((out, name, f))
        return out

    def _use(self, kind: str, leaves: list, hit: tuple, other: int, out: Any) -> Any:
        """``out = A @ D``, ``D @ A``, ``A * D`` or ``A + D``: tap it, keep ``A``."""
        (pos, (name, f)), a = hit, leaves[other]
        d = leaves[pos]
        ok = isinstance(out, torch.Tensor) and a.dim() > 0 and a.shape[0] == self.b
        if kind == "matmul":
            kind = "right" if pos > other else "left"
            ok = (ok and d.dim() == 2 and a.dim() >= (2 if kind == "right" else 3)  # noqa: PLR2004
                  and out.shape[0] == self.b)
        else:  # A itself not broadcast; D broadcast over the examples
            ok = (ok and out.shape == a.shape
                  and (d.dim() < a.dim() or (d.dim() == a.dim() and d.shape[0] == 1)))
        if not ok:
            self.failed = f"a use of parameter {name!r} that is not per example"
            return out
        out, slot = self.tap(out)
        self.uses.append((name, f, kind, a.detach(), d.shape, slot))
        return out

    def _layer_norm_use(self, args: tuple, kwargs: dict, out: Any) -> Any:
        """``F.layer_norm(x, shape, weight, bias, eps)`` with followed ``weight`` /
        ``bias``: ``weight`` is a use ``x_hat * D``, ``bias`` one ``+ D``."""
        def parse(x: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
                  eps: float = 1e-5) -> tuple:
            return x, tuple(normalized_shape), weight, bias, eps

        x, shape, weight, bias, eps = parse(*args, **kwargs)
        ok = (isinstance(out, torch.Tensor) and x.dim() > len(shape) and x.shape[0] == self.b
              and self._find(x) is None)
        if not ok:
            self.failed = "layer_norm of parameters on an input that is not per example"
            return out
        dims = tuple(range(-len(shape), 0))
        var, mean = torch.var_mean(x.detach(), dims, correction=0, keepdim=True)
        xhat = (x.detach() - mean) * torch.rsqrt(var + eps)
        out, slot = self.tap(out)
        for t, kind in ((weight, "mul"), (bias, "add")):
            hit = self._find(t) if isinstance(t, torch.Tensor) else None
            if hit is not None:
                self.uses.append((hit[0], hit[1], kind, xhat, t.shape, slot))
        return out

    def close(self, output: Any) -> None:
        """Fail when a followed tensor is among the module's outputs (used outside)."""
        if self.failed is None and any(self._find(t) is not None for t in tree_flatten(output)[0]
                                       if isinstance(t, torch.Tensor)):
            self.failed = "a function of a parameter is returned by the module"


def _sum_to_param(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(B, *S) -> (B, *shape)``: each example's sum over the axes that ``shape``
    (aligned to the trailing axes of ``S``, or with a leading 1 on the batch axis)
    broadcasts."""
    b = t.shape[0]
    if len(shape) == t.dim():  # the leading 1 sits on the batch axis
        return t.sum_to_size(b, *shape[1:]).unsqueeze(1)
    lead = t.dim() - 1 - len(shape)
    if lead:
        t = t.sum(tuple(range(1, 1 + lead)))
    return t.sum_to_size(b, *shape)


def traced_grads(trace: ParamUses, grads: Sequence[torch.Tensor | None]) -> Grads:
    """Per-example gradients ``{name: (B, *shape)}`` of the parameters followed by
    ``trace``, from each use's per-example output gradients ``grads`` (in the order
    of ``trace.uses``; ``None``: the use does not reach the loss)."""
    from torch.func import vjp, vmap

    b = trace.b
    out: Grads = {}
    for (name, f, kind, a, shape, _), g in zip(trace.uses, grads):
        if g is None:
            continue
        g = g.to(a.dtype)
        if kind == "right":  # (B, ..., n, k) @ (k, m): sum over rows of A^T G
            k, m = a.shape[-1], g.shape[-1]
            dd = a.reshape(b, -1, k).transpose(1, 2) @ g.reshape(b, -1, m)
        elif kind == "left":  # (n, k) @ (B, ..., k, m): sum over rows of G A^T
            n, k = g.shape[-2], a.shape[-2]
            dd = g.transpose(-1, -2).reshape(b, -1, n).transpose(1, 2) @ a.transpose(-1, -2).reshape(b, -1, k)
        else:
            dd = _sum_to_param(g * a if kind == "mul" else g, shape)
        _, pull = vjp(f, trace.params[name].detach())
        dp = vmap(lambda c: pull(c)[0])(dd)  # noqa: B023
        out[name] = dp if name not in out else out[name] + dp
    for name, p in trace.params.items():  # not reached by the loss in this call
        if name not in out:
            out[name] = p.new_zeros((b, *p.shape), dtype=p.dtype)
    return out
