"""The published keyword names of the attributor methods (private).

The published package names the loaders ``train_dataloader`` / ``test_dataloader``
(``attribute``, ``self_attribute``) and ``full_train_dataloader`` (``cache``);
dattri names them ``train_loader`` / ``test_loader``. :func:`install` (run for every
attributor class by ``BaseAttributor.__init_subclass__``) wraps the methods a class
defines so that both spellings work; passing both spellings of one argument is an
error. Nothing else changes: the wrapped method gets dattri's names.

Every wrapped call runs inside its task's ``restoring()``: if it raises, the model
gets back the weights and buffers it had before the call. Its CG solves that stop at
``max_iter`` above ``tol`` give one warning for the whole call
(:func:`dattri.linalg.solvers.summarize_unconverged`). A call after ``cache`` whose
checkpoints changed since is refused (``CheckpointError``).

``attribute(..., top_k=k)`` works on every attributor: a method without its own
blocked ranking (TRAK, TracIn, the influence-function family, RPS-L2, KNN-Shapley and
DVEmb have one) ranks its score matrix here.

The same wrapper takes every method's ``process_group=`` keyword (a
``torch.distributed`` group to split the training set over, see
:mod:`dattri.distributed`): it is kept on the attributor for this and later calls.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from dattri.errors import CheckpointError, DattriValueError
from dattri.linalg.solvers import summarize_unconverged

__all__ = ["install", "projector_settings"]

#: published keyword -> dattri's, per method
ALIASES: dict[str, dict[str, str]] = {
    "attribute": {"train_dataloader": "train_loader", "test_dataloader": "test_loader"},
    "self_attribute": {"train_dataloader": "train_loader"},
    "cache": {"full_train_dataloader": "train_loader", "train_dataloader": "train_loader"},
    "decompose": {},
}


def _positional_names(func: Callable) -> list[str] | None:
    """Names of ``func``'s positional parameters after ``self``; None if it takes
    ``*args`` (then aliases are passed positionally, in the order of ALIASES)."""
    params = list(inspect.signature(func).parameters.values())[1:]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return [p.name for p in params]


def _wrap(func: Callable, aliases: dict[str, str], owner: str) -> Callable:
    names = _positional_names(func)
    ours = list(dict.fromkeys(aliases.values()))
    # attribute(..., top_k=k) for every method: natively (score blocks)
    # or here, from the (gathered) score matrix
    rank_here = func.__name__ == "attribute" and "top_k" not in inspect.signature(func).parameters

    @functools.wraps(func)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        task = getattr(self, "task", None)
        if task is None or not hasattr(task, "restoring"):
            return _call(self, *args, **kwargs)
        if func.__name__ != "cache":
            _check_checkpoints(self, task, owner)
        # a failed call leaves the model as it was; the CG solves of the call (one per
        # checkpoint and block of gradients) warn once, together, if any stopped short
        with task.restoring(), summarize_unconverged():
            out = _call(self, *args, **kwargs)
        if func.__name__ == "cache":
            self._checkpoint_token = task.checkpoint_token()
        return out

    def _call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if rank_here and "top_k" in kwargs:
            from dattri.algorithm._scored import check_top_k
            from dattri.topk import topk_from_blocks

            k = check_top_k(kwargs.pop("top_k"))
            scores = method(self, *args, **kwargs)
            return scores if k is None else topk_from_blocks([(0, scores)], k)
        if "process_group" in kwargs:
            from dattri.distributed import resolve

            group = kwargs.pop("process_group")
            resolve(group)  # a typed error now if torch.distributed is not initialised
            self._process_group = group
        given = {a: kwargs.pop(a) for a in list(kwargs) if a in aliases}
        if not given:
            return func(self, *args, **kwargs)
        for published, own in aliases.items():
            if published not in given:
                continue
            value = given[published]
            taken = own in kwargs or (names is not None and own in names
                                      and names.index(own) < len(args))
            if taken:
                msg = (f"{owner}: {published}= and {own} were both given; pass the "
                       f"loader once (dattri's name is {own}).")
                raise DattriValueError(msg)
            kwargs[own] = value
        if names is None:  # f(self, *loaders): keyword loaders become positional
            args = args + tuple(kwargs.pop(o) for o in ours if o in kwargs)
        return func(self, *args, **kwargs)

    method.__compat_wrapped__ = True
    return method


def _check_checkpoints(att: Any, task: Any, owner: str) -> None:
    """Refuse to answer from a cache whose checkpoints changed since (a state dict
    from ``model.state_dict()`` shares the model's tensors, so training or editing the
    model in place changes it; a checkpoint file rewritten)."""
    token = getattr(att, "_checkpoint_token", None)
    if token is None or not getattr(att, "_cache_uses_checkpoints", True):
        return
    now = task.checkpoint_token()
    if now == token:
        return
    changed = [i for i, (a, b) in enumerate(zip(token, now)) if a != b] or ["?"]
    msg = (f"{owner}: checkpoints{changed} changed since cache() (tensors written in "
           "place, e.g. by training a model whose model.state_dict() is the checkpoint, "
           "or a checkpoint file rewritten), so the cached training-side work belongs "
           "to other weights. Call cache(train_loader) again, or give the task a copy "
           "of the weights ({k: v.clone() for k, v in model.state_dict().items()}) "
           "to keep attributing the old ones.")
    raise CheckpointError(msg)


def install(cls: type) -> None:
    """Accept the published keyword names on the methods ``cls`` defines."""
    for name, aliases in ALIASES.items():
        func = cls.__dict__.get(name)
        if func is None or not callable(func) or getattr(func, "__compat_wrapped__", False):
            continue
        setattr(cls, name, _wrap(func, aliases, f"{cls.__name__}.{name}"))


def projector_settings(proj_params: Any, projector_kwargs: Any, owner: str) -> Any:
    """One projection setting from dattri's ``proj_params`` and 0.3.0's
    ``projector_kwargs`` (a dict of the same fields, ``device`` ignored)."""
    if projector_kwargs is None:
        return proj_params
    if proj_params is not None:
        msg = (f"{owner}: proj_params and projector_kwargs (0.3.0's name) were both "
               "given; pass one of them.")
        raise DattriValueError(msg)
    if not isinstance(projector_kwargs, dict):
        msg = (f"{owner}: projector_kwargs must be a dict of projection settings "
               f"(proj_dim, proj_max_batch_size, proj_seed, proj_type), got "
               f"{type(projector_kwargs).__name__}.")
        raise DattriValueError(msg)
    kw = {k: v for k, v in projector_kwargs.items() if k != "device"}
    return kw
