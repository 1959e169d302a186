"""Parameter flattening helpers in the ``torch.func`` style.

Attribution methods work on a flat parameter vector ``theta`` of length ``P``;
models are called with ``torch.func.functional_call(model, params, x)`` where
``params`` is a name -> tensor dict. These helpers convert between the two
without copying more than a ``torch.cat``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "get_parameter_chunk_sizes",
    "ParamSpec",
    "all_finite",
    "close_per_example",
    "flatten_func",
    "flatten_params",
    "partial_param",
    "unflatten_params",
]


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, with one reduction in the usual case:
    a finite sum implies finite entries (NaN and inf propagate through it); only a
    sum that overflows, or a tensor that is not finite, needs the element-wise test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def close_per_example(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether two ``(B, P)`` sets of per-example gradients agree, per example in norm.

    A structural mismatch (coupled examples, a shared layer, dropout) is O(1); float32
    rounding of two computation orders is not, but reaches ~1e-4 through an
    ill-conditioned output function (the TRAK margin ``log(p / (1 - p))`` at
    ``p ~ 1``: 5.7e-5 measured on one checkpoint of 50), hence ``rtol = 1e-3``.
    """
    if got.shape != ref.shape:
        return False
    ref = ref.to(got.dtype)
    err = (got - ref).norm(dim=1)
    scale = ref.norm(dim=1)
    return bool((err <= 1e-3 * scale + 1e-6 * float(scale.max().clamp_min(1e-30))).all())


class ParamSpec:
    """Names and shapes of a set of parameters; maps flat <-> dict.

    Args:
        named: mapping name -> tensor (only the shapes are kept).
    """

    def __init__(self, named: Mapping[str, torch.Tensor]) -> None:
        self.names = list(named.keys())
        self.shapes = [tuple(t.shape) for t in named.values()]
        self.numels = [int(t.numel()) for t in named.values()]
        self.numel = int(sum(self.numels))

    def flatten(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the tensors of ``named`` (in this spec's order) into ``(P,)``."""
        return torch.cat([named[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``flat`` (``(..., P)``) into a dict of ``(..., *shape)`` views."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.numels, dim=-1)
        return {
            n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes)
        }

    def slices(self) -> dict[str, slice]:
        """Position of each parameter inside the flat vector."""
        out, start = {}, 0
        for n, k in zip(self.names, self.numels):
            out[n] = slice(start, start + k)
            start += k
        return out


def flatten_params(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Flatten a name -> tensor dict into one ``(P,)`` vector (insertion order).

    Args:
        tensors: parameters, e.g. ``dict(model.named_parameters())``.

    Returns:
        The concatenation of the flattened tensors.
    """
    return ParamSpec(tensors).flatten(tensors)


def unflatten_params(
    flat: torch.Tensor,
    template: nn.Module | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_params`.

    Args:
        flat: ``(P,)`` (or ``(..., P)``) vector.
        template: a module (its trainable named parameters) or a name -> tensor dict
            giving names and shapes.

    Returns:
        name -> tensor dict of views into ``flat``.
    """
    if isinstance(template, nn.Module):
        template = {k: p for k, p in template.named_parameters() if p.requires_grad}
    return ParamSpec(template).unflatten(flat)


def flatten_func(
    model: nn.Module | Mapping[str, torch.Tensor],
    param_num: int = 0,
) -> Callable[[Callable], Callable]:
    """Decorator: turn ``f(..., params_dict, ...)`` into ``f(..., flat, ...)``.

    Args:
        model: module (its trainable parameters) or name -> tensor dict that fixes
            the names and shapes of the flat vector.
        param_num: position of the parameter argument of ``f``.

    Returns:
        A decorator. The wrapped function takes a flat ``(P,)`` tensor in position
        ``param_num``.
    """
    if isinstance(model, nn.Module):
        model = {k: p for k, p in model.named_parameters() if p.requires_grad}
    spec = ParamSpec(model)

    def decorator(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            args = list(args)
            args[param_num] = spec.unflatten(args[param_num])
            return func(*args, **kwargs)

        return wrapped

    return decorator


def partial_param(
    full_param: Mapping[str, torch.Tensor],
    layer_name: Sequence[str] | str,
    param_num: int = 0,
) -> Callable[[Callable], Callable]:
    """Decorator: let ``f(full_params_dict, ...)`` take only some parameters.

    The parameters not named in ``layer_name`` are taken from ``full_param`` as
    constants (detached), so no gradient is computed for them.

    Args:
        full_param: name -> tensor of every parameter of the model.
        layer_name: the names (``model.named_parameters()`` keys) of the parameters
            the wrapped function takes; a single string means that one name.
        param_num: position of the parameter argument.

    Returns:
        A decorator; the wrapped function takes a dict of the named parameters
        only, in position ``param_num``.
    """
    names = [layer_name] if isinstance(layer_name, str) else list(layer_name)
    frozen = {k: v.detach() for k, v in full_param.items() if k not in names}

    def decorator(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            args = list(args)
            merged = dict(frozen)
            merged.update(args[param_num])
            args[param_num] = merged
            return func(*args, **kwargs)

        return wrapped

    return decorator


def get_parameter_chunk_sizes(param_shape_list: Sequence[int], batch_size: int) -> tuple[int, list[int]]:
    """Group per-module feature sizes into chunks a projection can take at once
    (the published helper of the chunked projectors).

    A chunk of ``c`` features for ``batch_size`` examples must keep
    ``2 * batch_size * c`` below ``2**32`` (the index range of the published CUDA
    projector); consecutive sizes are summed into a chunk while they fit, and a
    size that alone does not fit is split into full chunks and a remainder.

    Args:
        param_shape_list: feature counts, e.g. the parameter count of each module.
        batch_size: examples per projected batch (>= 1).

    Returns:
        ``(max_chunk_size, sizes)``: the chunk bound and the chunk sizes, which sum
        to ``sum(param_shape_list)`` (``[0]`` when there is nothing to project).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        from dattri.errors import DattriValueError

        msg = f"batch_size={batch_size!r} must be an int >= 1."
        raise DattriValueError(msg)
    max_chunk = (2**32 - 1) // (2 * batch_size)
    sizes, current = [], 0
    for size in (int(p) for p in param_shape_list):
        if current + size >= max_chunk:
            if current:
                sizes.append(current)
            current = 0
        while size >= max_chunk:
            sizes.append(max_chunk)
            size -= max_chunk
        current += size
    if current:
        sizes.append(current)
    return max_chunk, sizes or [0]
