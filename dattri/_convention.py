"""Which calling convention a user's loss / target function follows (private).

dattri's functions take a *batch* (a leading batch dimension) and return the mean
over it. The published 0.3.0 release's TracIn, TRAK and RPS examples write them
for ONE example without a batch dimension (``image.unsqueeze(0)`` inside). A
:class:`BatchedFunction` wraps the user's function so that every consumer sees the
batched convention; the convention is detected once, on the first batch:

- the function is called on a batch of one (the first example, keeping the batch
  dimension); a scalar means the batched convention, used as given;
- otherwise it is called on the first example without the batch dimension; a
  scalar there, and no scalar on the whole batch or on all but one of its examples
  (a function that takes whole batches but not a batch of one is a batched one with
  a bug, reported as such),
  means the single-example convention. Then a batch of one is passed as the
  example itself, and a batch of ``B`` as ``vmap`` of the function over the batch,
  averaged: ``F(batch) = (1/B) sum_i f(example_i)``.

Scores are then identical for both forms of the same function (the batched form's
per-example gradient is taken on batches of one, which become the bare example).
"""

from __future__ import annotations

import contextlib

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "BatchedFunction", "as_batched", "capture_per_example", "is_unbatched", "model_style_task",
    "user_function",
]


def _first(batch: Any, keep_dim: bool) -> Any:
    def one(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t[:1] if keep_dim else t[0]
        return t

    return tree_map(one, batch)


def _size(args: Sequence[Any]) -> int | None:
    leaves = [t for t in tree_flatten(list(args))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    return int(leaves[0].shape[0]) if leaves else None


def _is_scalar(out: Any) -> bool:
    return isinstance(out, torch.Tensor) and out.numel() == 1


class BatchedFunction:
    """A user function seen in the batched convention, whichever it was written in.

    Args:
        func: the user's function.
        name: its argument name (``"loss_func"``, ...), for messages.
        batched_args: positions of the arguments that carry the batch (``(1,)`` for
            ``f(params, data)``; ``(0, 1)`` for RPS's ``f(pre_activation, label)``).

    Attributes:
        unbatched: ``None`` until detected, then whether ``func`` takes one example.
    """

    def __init__(self, func: Callable, name: str, batched_args: Sequence[int] = (1,),
                 owner: Any = None) -> None:
        self.func, self.name = func, name
        #: an object whose ``.model`` the function runs (the task): its modules'
        #: parameters are put back after every call (:func:`_keeping_parameters`)
        self.owner = owner
        self.batched_args = tuple(batched_args)
        self.unbatched: bool | None = None
        #: ``"mean"`` or ``"sum"`` over the batch once found (``None``: not known, or
        #: neither), and whether it was found: see ``AttributionTask.reduction``
        self.reduction: str | None = None
        self.reduction_found = False
        self.__wrapped__ = func
        self.__name__ = getattr(func, "__name__", name)
        self.__doc__ = getattr(func, "__doc__", None)

    def _run(self, *args: Any) -> Any:
        model = getattr(self.owner, "model", None)
        if not isinstance(model, torch.nn.Module):
            return self.func(*args)
        with _keeping_parameters(model):
            return self.func(*args)

    def _split(self, args: tuple) -> tuple[list[Any], list[Any]]:
        return [args[i] for i in self.batched_args], list(args)

    def _with(self, args: tuple, parts: list[Any]) -> list[Any]:
        out = list(args)
        for i, p in zip(self.batched_args, parts):
            out[i] = p
        return out

    def resolve(self, *args: Any) -> bool:
        """Detect the convention on a real batch (once); returns ``unbatched``."""
        if self.unbatched is not None:
            return self.unbatched
        batched, _ = self._split(args)
        unbatched = False
        with torch.no_grad():
            try:
                out = self._run(*self._with(args, [_first(b, True) for b in batched]))
            except Exception:  # noqa: BLE001 - the other convention is tried next
                out = None
            if not _is_scalar(out):
                try:
                    single = self._run(*self._with(args, [_first(b, False) for b in batched]))
                except Exception:  # noqa: BLE001 - the batched error is the one reported
                    single = None
                unbatched = _is_scalar(single)
            n = _size(batched) or 1
            if unbatched and n > 1:
                # a function that fails on a batch of one but takes whole batches (of
                # two sizes, so that a batch size equal to, e.g., the number of classes
                # does not pass by coincidence) is a batched one with a bug: keep it
                # batched (the validation error says why)
                sizes = [n] + ([n - 1] if n > 2 else [])  # noqa: PLR2004
                unbatched = not all(self._scalar_on(args, batched, k) for k in sizes)
        self.unbatched = unbatched
        return unbatched

    def _scalar_on(self, args: tuple, batched: list[Any], k: int) -> bool:
        """Whether the function gives a scalar on the first ``k`` examples."""
        def head(t: Any) -> Any:
            return t[:k] if isinstance(t, torch.Tensor) and t.dim() > 0 else t

        try:
            return _is_scalar(self._run(*self._with(args, [tree_map(head, b) for b in batched])))
        except Exception:  # noqa: BLE001 - expected of a single-example function
            return False

    def __call__(self, *args: Any) -> Any:
        if self.unbatched is None:
            self.resolve(*args)
        if not self.unbatched:
            return self._run(*args)
        batched, _ = self._split(args)
        n = _size(batched)
        if n == 1:  # a batch of one is the example itself (hooks see one call)
            return self._run(*self._with(args, [_first(b, False) for b in batched]))
        in_dims = tuple(0 if i in self.batched_args else None for i in range(len(args)))
        per = vmap(self._run, in_dims=in_dims, randomness="same")(*args)
        return per.mean()


def as_batched(func: Callable | None, name: str, batched_args: Sequence[int] = (1,),
               owner: Any = None):
    """Wrap ``func`` (idempotent; ``None`` stays ``None``). With ``owner`` (an object
    whose ``.model`` is the model), a function written as main's
    ``f(model, batch, device)`` is first turned into ``f(params, batch)``."""
    if func is None or isinstance(func, BatchedFunction):
        return func
    if owner is not None and _positional_count(func) == 3:  # noqa: PLR2004
        func = _params_style(func, owner)
    return BatchedFunction(func, name, batched_args, owner)


def batch_scale(func: Any, batch_size: int) -> int:
    """What the batched paths multiply ``func``'s value by so that each example's
    output gradient is its own loss's: ``batch_size`` for a batch mean (the
    convention), 1 for a function found to sum over the batch."""
    return 1 if getattr(func, "reduction", None) == "sum" else batch_size


@contextlib.contextmanager
def _keeping_parameters(model: torch.nn.Module):
    """Put every module's own parameter objects back on exit, whatever the body did:
    ``torch.func.functional_call`` (PyTorch 2.13, ``tie_weights=True``) leaves the
    tensors it was given in a module registered under two names (``Sequential(lin,
    act, lin)``), so the user's model would lose those parameters (plain tensors
    without gradients) and every later attribution would silently drop them."""
    saved = [(m, dict(m._parameters)) for m in model.modules() if m._parameters]
    try:
        yield
    finally:
        for m, params in saved:
            if any(m._parameters.get(k) is not v for k, v in params.items()):
                m._parameters.update(params)


def _params_style(func: Callable, owner: Any) -> Callable:
    """``f(params, batch)`` calling ``func(model, batch, device)`` with ``params``
    swapped into the model (as ``torch.func.functional_call`` does)."""
    def params_style(params: Any, batch: Any) -> Any:
        from torch.nn.utils.stateless import _reparametrize_module

        model = owner.model
        device = next((t.device for t in params.values()), torch.device("cpu"))
        with _reparametrize_module(model, params, strict=False):
            return func(model, batch, device)

    params_style.model_style = func
    return params_style


def user_function(func: Callable) -> Callable:
    """The function the user gave (unwraps a :class:`BatchedFunction`)."""
    return func.func if isinstance(func, BatchedFunction) else func


def is_unbatched(func: Any) -> bool:
    """Whether ``func`` is a wrapped function detected as single-example."""
    return isinstance(func, BatchedFunction) and bool(func.unbatched)


def capture_per_example(run_one: Callable[[Any], dict], batch: Any, step: int = 1) -> dict:
    """Layer captures ``{module: (a, s)}`` of a batch in consecutive parts of ``step``
    examples (1: a single-example function, since forward hooks cannot see inside
    ``vmap``), concatenated."""
    from dattri._loader import batch_size_of, slice_batch

    b = batch_size_of(batch)
    parts = [run_one(slice_batch(batch, slice(i, min(b, i + step)))) for i in range(0, b, step)]
    return {k: tuple(torch.cat([p[k][j] for p in parts]) for j in range(2)) for k in parts[0]}


def _positional_count(func: Callable) -> int | None:
    import inspect

    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
               for p in params)


def model_style_task(task: Any, device: Any) -> Any:
    """The task itself, or, when its loss is written in the published block-projected
    style ``loss_func(model, batch, device)`` (three required arguments), a new task
    whose functions call it with the task's model (the user's task is not changed).

    The parameters are swapped into the model for the call (as
    ``torch.func.functional_call`` does), so every path works: module hooks and
    ``vmap(grad)`` per-example gradients alike.
    """
    loss, target = user_function(task.original_loss_func), user_function(task.original_target_func)
    if _positional_count(loss) != 3:  # noqa: PLR2004 - (model, batch, device)
        return task
    from dattri.task import AttributionTask

    holder: list[Any] = []

    def wrap(func: Callable) -> Callable:
        def params_style(params: Any, batch: Any) -> Any:
            from torch.nn.utils.stateless import _reparametrize_module

            model = holder[0].model
            with _reparametrize_module(model, params, strict=False):
                return func(model, batch, device)
        return params_style

    new = AttributionTask(loss_func=wrap(loss), model=task.model, checkpoints=task.checkpoints,
                          target_func=None if target is loss else wrap(target),
                          checkpoints_load_func=task.checkpoints_load_func)
    holder.append(new)
    return new
