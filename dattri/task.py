"""The attribution task: model, checkpoints, loss and target functions."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from dattri._convention import BatchedFunction, as_batched
from dattri._loader import batch_size_of, slice_batch
from dattri.errors import (
    CheckpointError,
    DattriValueError,
    InvalidBatchError,
    InvalidLossError,
    LayerNameError,
)
from dattri.func.utils import ParamSpec, partial_param

__all__ = ["AttributionTask", "batch_of_one", "check_state_dict", "load_state_dict_file"]

Checkpoint = Union[Mapping[str, torch.Tensor], str, os.PathLike]


#: a checkpoint file up to this size stays in memory after it is read (the last one only)
STATE_CACHE_BYTES = 1 << 30


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.safetensors`` file or a torch file (weights only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        msg = f"checkpoints: no file at {path!r}; pass an existing path or a state dict."
        raise CheckpointError(msg)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not a refused class: damaged bytes
            raise _unreadable(path, e) from e
        msg = (
            f"checkpoints: {path!r} holds objects other than tensors (a pickled model or "
            "optimizer?), which a weights-only load refuses. Save model.state_dict() "
            "instead (torch.save(model.state_dict(), path)), or load the file yourself "
            "and pass the state dict."
        )
        raise CheckpointError(msg) from e
    except Exception as e:  # noqa: BLE001 - any parse failure: not a readable checkpoint
        raise _unreadable(path, e) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(
        obj["state_dict"], Mapping,
    ):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        msg = f"checkpoints: {path!r} holds a {type(obj).__name__}, not a state dict."
        raise CheckpointError(msg)
    return dict(obj)


def _unreadable(path: str, e: Exception) -> CheckpointError:
    kind = "safetensors" if path.endswith(".safetensors") else "torch"
    first = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, pickle.UnpicklingError):  # torch's text advises an unsafe load
        first = "not a valid pickle stream"
    return CheckpointError(
        f"checkpoints: {path!r} cannot be read as a {kind} checkpoint: the file is "
        f"corrupt or truncated ({type(e).__name__}: {first[:120]}). Save it again "
        "(torch.save(model.state_dict(), path) or safetensors.torch.save_file).")


def check_state_dict(model: nn.Module, state: Mapping[str, Any], what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``model.load_state_dict(state)`` would
    load every entry: the same keys, tensors of the same shapes. Nothing is loaded,
    so the model is unchanged when the checkpoint is refused."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        msg = (
            f"{what} does not match the model: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected keys "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}). "
            "Pass a state dict of this model (model.state_dict() keys), or a "
            "checkpoints_load_func. The model was not changed."
        )
        raise CheckpointError(msg)
    for key, ref in own.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            msg = (f"{what}[{key!r}] is a {type(value).__name__}, not a tensor; pass a "
                   "state dict of tensors. The model was not changed.")
            raise CheckpointError(msg)
        if value.shape != ref.shape:
            msg = (
                f"{what}[{key!r}] has shape {tuple(value.shape)} but the model's "
                f"{key!r} has shape {tuple(ref.shape)}; pass a checkpoint of this "
                "architecture (same layer sizes). The model was not changed."
            )
            raise CheckpointError(msg)


def batch_of_one(example: Any) -> Any:
    """Add a leading batch dimension of size 1 to every tensor of one example."""
    return tree_map(
        lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example,
    )


def _reduction_of(whole: float, parts: list[float], sizes: list[int]) -> str | None:
    """``"mean"`` or ``"sum"`` when ``f(whole)`` is the size-weighted mean or the sum of
    ``f`` of its parts (not both), ``None`` when neither, ``"unknown"`` when both (the
    parts' values are zero: every reduction of zeros agrees)."""
    n = sum(sizes)
    mean = sum(v * k for v, k in zip(parts, sizes)) / n
    total = sum(parts)
    tol = 1e-4 * (sum(abs(v) for v in parts) + abs(whole)) + 1e-30
    is_mean, is_sum = abs(whole - mean) <= tol, abs(whole - total) <= tol
    if is_mean and is_sum:
        return "unknown"
    return "mean" if is_mean else "sum" if is_sum else None


def _file_key(path: Any) -> tuple | None:
    """``(path, modification time, size)`` of a checkpoint file: what tells a rewrite
    (None when it cannot be read)."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return (os.fspath(path), st.st_mtime_ns, st.st_size)


class AttributionTask:
    """Everything an attributor needs to know about the model being explained.

    Args:
        loss_func: ``loss_func(params, data) -> scalar``, the mean training loss of
            a batch; ``params`` is a name -> tensor dict used with
            ``torch.func.functional_call(model, params, ...)``, ``data`` a batch as
            the loader yields it. dattri calls it on batches of one example to get
            per-example quantities.
        model: the ``nn.Module`` the functions call.
        checkpoints: a state dict, a path to one (``.safetensors`` or a torch file),
            or a list of either (an ensemble / the TracIn checkpoints).
        target_func: the function whose value is attributed (same signature);
            defaults to ``loss_func``.
        checkpoints_load_func: ``f(model, checkpoint) -> model`` replacing the default
            ``model.load_state_dict`` (e.g. Hugging Face ``from_pretrained``).
    """

    def __init__(
        self,
        loss_func: Callable,
        model: nn.Module,
        checkpoints: Checkpoint | Sequence[Checkpoint],
        target_func: Callable | None = None,
        checkpoints_load_func: Callable | None = None,
    ) -> None:
        if not callable(loss_func):
            msg = f"loss_func must be callable loss_func(params, data), got {type(loss_func).__name__}."
            raise DattriValueError(msg)
        if target_func is not None and not callable(target_func):
            msg = f"target_func must be callable or None, got {type(target_func).__name__}."
            raise DattriValueError(msg)
        if not isinstance(model, nn.Module):
            msg = f"model must be a torch.nn.Module, got {type(model).__name__}."
            raise DattriValueError(msg)
        self.model = model
        # the user's functions as given; the original_* ones are batched whatever
        # convention the user wrote (0.3.0's single-example style is detected on the
        # first batch: dattri._convention)
        self.user_loss_func = loss_func
        self.user_target_func = target_func if target_func is not None else loss_func
        self.original_loss_func = as_batched(loss_func, "loss_func", owner=self)
        self.original_target_func = (as_batched(target_func, "target_func", owner=self)
                                     if target_func is not None else self.original_loss_func)
        if isinstance(checkpoints, (list, tuple)):
            ckpts = list(checkpoints)
        else:
            ckpts = [checkpoints]
        if not ckpts:
            msg = "checkpoints is an empty list; pass at least one state dict or path."
            raise CheckpointError(msg)
        for i, c in enumerate(ckpts):
            if not isinstance(c, (Mapping, str, os.PathLike)):
                msg = (
                    f"checkpoints[{i}] is a {type(c).__name__}; each checkpoint must "
                    "be a state dict or a path to one."
                )
                raise CheckpointError(msg)
        if len(ckpts) > 1:
            # a state dict from model.state_dict() aliases the model's tensors: loading
            # another checkpoint would overwrite it, so such entries are copied
            live = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
            ckpts = [
                {k: (v.clone() if isinstance(v, torch.Tensor) and v.numel()
                     and v.data_ptr() in live else v) for k, v in c.items()}
                if isinstance(c, Mapping) else c
                for c in ckpts
            ]
        self.checkpoints = ckpts
        self.checkpoints_load_func = checkpoints_load_func
        self.current_checkpoint_idx: int | None = None
        self.named_parameters: dict[str, torch.Tensor] = {}
        self._validated: set[str] = set()
        # the last checkpoint file read, keyed by (path, mtime, size): a forced
        # reload (the model may be shared) copies from memory instead of re-reading
        self._last_file: tuple[tuple, dict[str, torch.Tensor]] | None = None
        # restoring(): the depth of public calls, and the model as it was before the
        # first checkpoint load of the outermost one (model, checkpoint index, state)
        self._calls = 0
        self._before: tuple[nn.Module, int | None, dict[str, torch.Tensor],
                            torch.device | None] | None = None
        # the model's tensors (storage, version) right after the last load: a change
        # (another task loading into a shared model, an in-place update by the user)
        # makes the next load read the checkpoint again
        self._loaded_token: tuple | None = None

    # ------------------------------------------------------------------ checkpoints
    def get_checkpoints(self) -> list[Checkpoint]:
        """The list of checkpoints (length 1 when a single one was given)."""
        return self.checkpoints

    def get_model(self) -> nn.Module:
        """The model (with the last loaded checkpoint's weights)."""
        return self.model

    def _model_token(self) -> tuple:
        """``(storage, version)`` of every parameter and buffer of the model: equal
        while no tensor was written in place or replaced."""
        return tuple((t.data_ptr(), t._version)
                     for t in (*self.model.parameters(), *self.model.buffers()))

    def checkpoint_token(self) -> tuple:
        """What identifies the checkpoints' current contents, cheaply: for each
        in-memory state dict the storage and in-place version of its tensors, for each
        file its path, modification time and size. An attributor keeps the token of
        its ``cache`` and refuses to answer once it changed (e.g. a state dict from
        ``model.state_dict()`` shares the model's tensors: training the model further
        changes that checkpoint)."""
        out = []
        for c in self.checkpoints:
            if isinstance(c, Mapping):
                out.append(tuple((k, v.data_ptr(), v._version) for k, v in c.items()
                                 if isinstance(v, torch.Tensor)))
            else:
                out.append(_file_key(c) or (id(c),))
        return tuple(out)

    def _aliases_model(self, state: Mapping) -> bool:
        """Whether every tensor of ``state`` is the model's own tensor of that name
        (``model.state_dict()`` itself): loading it would change nothing."""
        own = self.model.state_dict()
        return own.keys() == state.keys() and all(
            isinstance(v, torch.Tensor) and v.data_ptr() == own[k].data_ptr()
            and v.shape == own[k].shape and v.stride() == own[k].stride()
            and v.dtype == own[k].dtype for k, v in state.items())

    @contextmanager
    def restoring(self) -> Iterator[None]:
        """One public call of an attributor: if it raises, the model gets back the
        weights and buffers it had when the call began (e.g. a checkpoint loaded
        before a later one was refused), on the device it was on, and the task
        forgets the checkpoint it had loaded. The state is copied once per call, just
        before the first load that changes the model. A model with BatchNorm in
        training mode is refused first."""
        self._calls += 1
        try:
            if self._calls == 1:
                self._refuse_training_batchnorm()
            yield
        except BaseException:
            if self._calls == 1 and self._before is not None:
                model, idx, state, device = self._before
                self.model = model
                if device is not None:  # a call on another device moved it there
                    model.to(device)
                model.load_state_dict(state)
                self.current_checkpoint_idx = idx
                self.named_parameters = (
                    {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
                    if self.named_parameters else {})
            raise
        finally:
            self._calls -= 1
            if self._calls == 0:
                self._before = None

    def _refuse_training_batchnorm(self) -> None:
        """A BatchNorm layer in training mode with running statistics: every forward
        pass would normalise by the batch's own statistics (coupling the examples)
        and update the user's running statistics."""
        bad = [n for n, m in self.model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               and m.track_running_stats]
        if bad:
            msg = (f"the model has BatchNorm layers in training mode ({bad[:3]}"
                   f"{' ...' if len(bad) > 3 else ''}): each forward pass would normalise "  # noqa: PLR2004
                   "by its batch's statistics, which couples the examples, and update the "
                   "model's running statistics. Call model.eval() before attributing (each "
                   "checkpoint's running statistics are then used; dropout ensembles "
                   "re-enable only the dropout layers). The model was not changed.")
            raise DattriValueError(msg)

    def _keep_before(self) -> None:
        """Inside :meth:`restoring`: copy the model's state before it first changes."""
        if self._calls and self._before is None:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            device = next((t.device for t in state.values()), None)
            self._before = (self.model, self.current_checkpoint_idx, state, device)

    def _load_checkpoints(self, ckpt_idx: int) -> None:
        if not isinstance(ckpt_idx, int) or not 0 <= ckpt_idx < len(self.checkpoints):
            msg = (
                f"ckpt_idx={ckpt_idx!r} is out of range; the task has "
                f"{len(self.checkpoints)} checkpoint(s)."
            )
            raise DattriValueError(msg)
        if (self.current_checkpoint_idx == ckpt_idx and self.named_parameters
                and self._loaded_token == self._model_token()):
            return
        ckpt = self.checkpoints[ckpt_idx]
        if self.checkpoints_load_func is not None:
            self._keep_before()
            model = self.checkpoints_load_func(self.model, ckpt)
            if isinstance(model, nn.Module):
                self.model = model
        else:
            state = self._read(ckpt) if not isinstance(ckpt, Mapping) else ckpt
            check_state_dict(self.model, state, f"checkpoints[{ckpt_idx}]")
            if not self._aliases_model(state):  # else the model holds it already
                self._keep_before()
                self.model.load_state_dict(state)
        self.named_parameters = {
            k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad
        }
        self.current_checkpoint_idx = ckpt_idx
        self._loaded_token = self._model_token()

    def _read(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The state dict in ``path``; the last one read is kept (up to
        ``STATE_CACHE_BYTES``) while the file is unchanged."""
        key = _file_key(path)
        if key is not None and self._last_file is not None and self._last_file[0] == key:
            return self._last_file[1]
        state = load_state_dict_file(path)
        self._last_file = None
        if key is not None and key[2] <= STATE_CACHE_BYTES:
            self._last_file = (key, state)
        return state

    def load_checkpoint(
        self, ckpt_idx: int, device: str | torch.device | None = None, force: bool = False,
    ) -> None:
        """Load checkpoint ``ckpt_idx`` into the model, on ``device`` if given.

        Re-reads the weights when ``force`` is set (the model may be shared with
        another task), or when the checkpoint or the parameters' device changed.
        """
        if device is not None:
            device = torch.device(device)
            first = next(self.model.parameters(), None)
            if first is not None and first.device != device:
                self._keep_before()  # inside a call: a failure moves it back
            self.model.to(device)
            force = force or any(p.device != device for p in self.named_parameters.values())
        if force:
            self.current_checkpoint_idx = None
        self._load_checkpoints(ckpt_idx)

    # ------------------------------------------------------------------ parameters
    def _resolve_layer_name(self, layer_name: str | Sequence[str] | None) -> list[str]:
        if not self.named_parameters:
            self._load_checkpoints(0)
        if layer_name is None:
            return list(self.named_parameters.keys())
        names = [layer_name] if isinstance(layer_name, str) else list(layer_name)
        unknown = [n for n in names if n not in self.named_parameters]
        if unknown or not names:
            avail = list(self.named_parameters.keys())
            msg = (
                f"layer_name={layer_name!r}: unknown parameter name(s) {unknown}. "
                f"Use keys of model.named_parameters() (trainable ones): {avail[:12]}"
                f"{' ...' if len(avail) > 12 else ''}."
            )
            raise LayerNameError(msg)
        # keep the model's order so that flat vectors match get_param
        return [n for n in self.named_parameters if n in set(names)]

    def param_spec(self, layer_name: str | Sequence[str] | None = None) -> ParamSpec:
        """Names and shapes of the (selected) trainable parameters."""
        names = self._resolve_layer_name(layer_name)
        return ParamSpec({n: self.named_parameters[n] for n in names})

    def get_param(
        self,
        ckpt_idx: int = 0,
        layer_name: str | Sequence[str] | None = None,
        layer_split: bool = False,
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], list[int] | None]:
        """Flat vector of the trainable parameters of checkpoint ``ckpt_idx``.

        Args:
            ckpt_idx: which checkpoint.
            layer_name: restrict to these ``named_parameters`` keys (a string is one
                name).
            layer_split: return one flat tensor per parameter instead of one vector.

        Returns:
            ``(flat, None)``, or with ``layer_split`` ``(tuple_of_flats, layer_map)``
            where ``layer_map[i]`` is the index of the module that owns parameter i.
        """
        self._load_checkpoints(ckpt_idx)
        names = self._resolve_layer_name(layer_name)
        params = {n: self.named_parameters[n] for n in names}
        if layer_split:
            modules = [n.rsplit(".", 1)[0] if "." in n else "" for n in names]
            layer_map, seen = [], {}
            for m in modules:
                seen.setdefault(m, len(seen))
                layer_map.append(seen[m])
            return tuple(p.reshape(-1) for p in params.values()), layer_map
        return ParamSpec(params).flatten(params), None

    # ------------------------------------------------------------------ functions
    def _flat_func(
        self, func: Callable, layer_name: str | Sequence[str] | None, ckpt_idx: int | None,
    ) -> Callable:
        if ckpt_idx is None:  # 0.3.0's default: the checkpoint loaded now
            ckpt_idx = self.current_checkpoint_idx or 0
        self._load_checkpoints(ckpt_idx)
        names = self._resolve_layer_name(layer_name)
        spec = ParamSpec({n: self.named_parameters[n] for n in names})
        if len(names) == len(self.named_parameters):
            inner = func
        else:
            inner = partial_param(self.named_parameters, names)(func)

        def flat_func(theta: torch.Tensor, data: Any) -> torch.Tensor:
            out = inner(spec.unflatten(theta), data)
            return out.reshape(()) if isinstance(out, torch.Tensor) and out.numel() == 1 else out

        return flat_func

    def get_loss_func(
        self, layer_name: str | Sequence[str] | None = None, ckpt_idx: int = 0,
    ) -> Callable:
        """``f(flat_params, batch) -> mean loss`` on the flat (selected) parameters."""
        return self._flat_func(self.original_loss_func, layer_name, ckpt_idx)

    def get_target_func(
        self, layer_name: str | Sequence[str] | None = None, ckpt_idx: int = 0,
    ) -> Callable:
        """``f(flat_params, batch) -> mean target`` on the flat (selected) parameters."""
        return self._flat_func(self.original_target_func, layer_name, ckpt_idx)

    @staticmethod
    def _per_example(flat_func: Callable, in_dims: Any) -> Callable:
        def one(theta: torch.Tensor, example: Any) -> torch.Tensor:
            return flat_func(theta, batch_of_one(example))

        # "same": a model with active dropout uses one mask for every example of a
        # call; the engine seeds each call per checkpoint (dropout ensembles).
        return vmap(grad(one), in_dims=in_dims, randomness="same")

    def get_grad_loss_func(
        self,
        in_dims: Any = None,
        layer_name: str | Sequence[str] | None = None,
        ckpt_idx: int = 0,
    ) -> Callable:
        """Per-example gradients of the loss: ``g(flat_params, batch) -> (B, P)``.

        Each example is passed to ``loss_func`` as a batch of one. Only the selected
        parameters' gradients are computed. ``in_dims`` (default ``(None, 0)``) is
        passed to ``torch.func.vmap``.
        """
        return self._per_example(
            self.get_loss_func(layer_name, ckpt_idx), in_dims or (None, 0),
        )

    def get_grad_target_func(
        self,
        in_dims: Any = None,
        layer_name: str | Sequence[str] | None = None,
        ckpt_idx: int = 0,
    ) -> Callable:
        """Per-example gradients of the target: ``g(flat_params, batch) -> (B, P)``."""
        return self._per_example(
            self.get_target_func(layer_name, ckpt_idx), in_dims or (None, 0),
        )

    # ------------------------------------------------------------------ validation
    def _fails_on(self, func: Callable, batch: Any) -> bool:
        try:
            with torch.no_grad():
                func(dict(self.named_parameters), batch)
        except Exception:  # noqa: BLE001 - only whether it fails
            return True
        return False

    def validate_batch(self, batch: Any, which: str = "loss", ckpt_idx: int = 0) -> None:
        """Check that ``loss_func`` / ``target_func`` gives a scalar on a batch of one.

        Raises:
            InvalidLossError: the function fails on a batch of one example (but not
                on the whole batch), or returns something other than a scalar tensor.
            InvalidBatchError: it fails on the whole batch too (the batch does not
                fit the model: feature size, label range).
        """
        key = f"{which}"
        func = self.original_loss_func if which == "loss" else self.original_target_func
        if key in self._validated:
            if isinstance(func, BatchedFunction) and not func.reduction_found:
                self._load_checkpoints(ckpt_idx)  # every example so far had zero loss
                self._find_reduction(func, batch)
            return
        name = "loss_func" if which == "loss" else "target_func"
        self._load_checkpoints(ckpt_idx)
        if isinstance(func, BatchedFunction):
            func.resolve(dict(self.named_parameters), batch)
        one = tree_map(
            lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch,
        )
        try:
            with torch.no_grad():
                out = func(dict(self.named_parameters), one)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            if self._fails_on(func, batch):  # the whole batch fails too: the data's fault
                loader = "the training loader" if which == "loss" else "the test loader"
                msg = (
                    f"a batch of {loader} does not fit the model: {name} fails on it "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}). "
                    "Check that its inputs have the model's feature size, dtype and device "
                    "and its labels are in range (or that the model is the one the "
                    "function calls)."
                )
                raise InvalidBatchError(msg) from e
            msg = (
                f"{name} failed on a batch of one example ({type(e).__name__}: {e}). "
                "dattri calls it on batches with a leading dimension of size 1 to get "
                "per-example gradients; make it accept any batch size and return the "
                "mean over the batch."
            )
            raise InvalidLossError(msg) from e
        if isinstance(out, torch.Tensor) and out.numel() == 1 and batch_size_of(batch) > 1:
            with torch.no_grad():
                full = func(dict(self.named_parameters), batch)
            if isinstance(full, torch.Tensor) and full.numel() != 1:
                out = full  # per-example values (reduction="none"): reject below
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            msg = (
                f"{name} returned shape {shape}; on any batch (of one example too) it must return a "
                "scalar tensor (the mean over the batch, e.g. CrossEntropyLoss() with "
                "reduction='mean')."
            )
            raise InvalidLossError(msg)
        if isinstance(func, BatchedFunction) and not func.reduction_found:
            self._find_reduction(func, batch, out)
        self._validated.add(key)

    def reduction(self, which: str = "loss") -> str | None:
        """``"mean"`` or ``"sum"``: how ``loss_func`` / ``target_func`` reduces over the
        batch, as found on the first batch that tells them apart (``f`` of two examples
        against ``f`` of each, else of the whole batch against its halves); ``None``
        when neither fits (a loss that couples the examples, a random layer), or while
        unknown (before validation, or while every batch seen had zero loss:
        :meth:`reduction_known`). Once found it is kept. The batched paths read it
        from the function (:func:`dattri._convention.batch_scale`)."""
        func = self.original_loss_func if which == "loss" else self.original_target_func
        return getattr(func, "reduction", None)

    def reduction_known(self, which: str = "loss") -> bool:
        """Whether :meth:`reduction` has been decided (a batch with a nonzero loss
        was seen)."""
        func = self.original_loss_func if which == "loss" else self.original_target_func
        return bool(getattr(func, "reduction_found", True))

    def _find_reduction(self, func: BatchedFunction, batch: Any,
                        first: torch.Tensor | None = None) -> None:
        """Set ``func.reduction`` (and ``reduction_found``) from ``batch``: ``f`` of its
        first two examples against ``f`` of each (``first``: ``f`` of the first, known
        to the caller), and when these two cannot tell (both have zero loss: a mean
        and a sum of zeros agree) ``f`` of the whole batch against its two halves
        (a mean: the size-weighted mean of the halves; a sum: their sum). A batch of
        zero loss everywhere decides nothing; the next batch is asked."""
        b = batch_size_of(batch)
        if b < 2:  # noqa: PLR2004
            return
        params = dict(self.named_parameters)
        part = lambda lo, hi: float(func(params, slice_batch(batch, slice(lo, hi))))  # noqa: E731
        try:
            with torch.no_grad():
                one = float(first) if first is not None else part(0, 1)
                verdict = _reduction_of(part(0, 2), [one, part(1, 2)], [1, 1])
                if verdict == "unknown" and b > 2:  # noqa: PLR2004
                    h = b // 2
                    verdict = _reduction_of(part(0, b), [part(0, h), part(h, b)], [h, b - h])
        except Exception:  # noqa: BLE001 - validated above; anything else: neither
            verdict = None
        if verdict != "unknown":
            func.reduction, func.reduction_found = verdict, True
