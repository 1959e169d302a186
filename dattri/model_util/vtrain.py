"""Vectorised training of many small models at once (torch.func.vmap over models).

Ground truth for LOO and LDS needs hundreds of retrained models. For small models
(logistic regression, MLPs) one model barely occupies a CPU core, so
:func:`train_models_vectorized` trains ``M`` models as one batched computation:
parameters are stacked with ``torch.func.stack_module_state`` and every SGD step
is ``vmap(grad(loss))`` over the model axis, each model with its own data subset,
data order and dropout masks.

Semantics (identical for :func:`train_model`, the plain one-model loop that is the
reference and the "one at a time" baseline):

* initialisation: ``torch.manual_seed(seed); model_factory()`` (global RNG forked,
  so the caller's RNG state is untouched);
* data order: each epoch draws ``perm = randperm(n_data)`` from a generator seeded
  with ``seed`` and keeps the members of the subset in that order (so a
  leave-one-out model with the same seed sees the full model's order minus one);
  ``shuffle=False`` uses the subset in increasing order;
* minibatches of ``batch_size`` consecutive examples (last one partial unless
  ``drop_last``); ``batch_size=None`` is full-batch gradient descent;
* SGD exactly as ``torch.optim.SGD(lr, momentum, weight_decay)`` (no dampening,
  no Nesterov): ``g <- g + wd p; b <- mu b + g; p <- p - lr b``;
* ``nn.Dropout`` layers draw their masks from a per-model generator seeded from
  ``seed`` (mask ``1[u >= p] / (1 - p)``, ``u`` float32 uniform), so a model's result does not depend on
  which other models share its batch. Other random operations are refused.

Supported: any module whose forward is vmappable and has no running statistics
(no BatchNorm); inputs are one tensor ``X`` (n_data, ...) and targets ``Y``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from tqdm.auto import tqdm

from dattri.errors import DattriValueError

__all__ = [
    "VectorizedTraining",
    "train_model",
    "train_models_vectorized",
]

_DROP_SEED_SALT = 0x9E3779B97F4A7C15
_SEED_MOD = 2**63 - 1


@dataclass(frozen=True)
class VectorizedTraining:
    """Settings of the vectorised trainer, for ``retrain_*(..., vectorized=...)``.

    Attributes:
        model_factory: ``() -> nn.Module``, a fresh (randomly initialised) model.
            Must be picklable (module-level) to run in a process pool.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` mean loss of a batch,
            e.g. ``torch.nn.functional.cross_entropy``.
        epochs: passes over each model's subset.
        lr, momentum, weight_decay: ``torch.optim.SGD`` settings.
        batch_size: minibatch size; None for full-batch gradient descent.
        drop_last: drop the last partial minibatch of each epoch.
        shuffle: draw a new seeded order every epoch (else increasing order).
        chunk_size: models per vmapped call (bounds memory).
        dtype: parameter dtype (None: the model's own); float inputs are cast to it.
        device: where to train; results are returned on the CPU.
    """

    model_factory: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.0
    batch_size: int | None = 64
    weight_decay: float = 0.0
    drop_last: bool = False
    shuffle: bool = True
    chunk_size: int = 64
    dtype: torch.dtype | None = None
    device: str | torch.device = "cpu"

    def settings(self) -> dict[str, Any]:
        """JSON-able description recorded in the retrain metadata."""
        return {
            "trainer": "dattri.model_util.vtrain",
            "model_factory": _qualname(self.model_factory),
            "loss_fn": _qualname(self.loss_fn),
            "epochs": self.epochs,
            "lr": self.lr,
            "momentum": self.momentum,
            "batch_size": self.batch_size,
            "weight_decay": self.weight_decay,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "dtype": str(self.dtype) if self.dtype is not None else None,
        }

    def train(self, x: torch.Tensor, y: torch.Tensor, subsets: Any, seeds: Sequence[int],
              progress: bool | None = None) -> list[dict[str, torch.Tensor]]:
        """:func:`train_models_vectorized` with these settings."""
        return train_models_vectorized(
            self.model_factory, self.loss_fn, x, y, subsets, seeds,
            epochs=self.epochs, lr=self.lr, momentum=self.momentum,
            batch_size=self.batch_size, weight_decay=self.weight_decay,
            drop_last=self.drop_last, shuffle=self.shuffle, chunk_size=self.chunk_size,
            dtype=self.dtype, device=self.device, progress=progress,
        )

    def num_steps(self, subset_size: int) -> int:
        """SGD steps of one model trained on ``subset_size`` examples (all epochs)."""
        return self.epochs * len(_batches(int(subset_size), self.batch_size, self.drop_last))

    def train_one(self, x: torch.Tensor, y: torch.Tensor, subset: Any, seed: int,
                  on_step: Callable[[int, torch.Tensor, nn.Module], None] | None = None,
                  ) -> dict[str, torch.Tensor]:
        """:func:`train_model` (the plain loop) with these settings: the same model
        as :meth:`train` gives for ``seed`` (up to summation order), optionally
        with ``on_step`` recording its trajectory."""
        return train_model(
            self.model_factory, self.loss_fn, x, y, subset, seed, epochs=self.epochs,
            lr=self.lr, momentum=self.momentum, batch_size=self.batch_size,
            weight_decay=self.weight_decay, drop_last=self.drop_last, shuffle=self.shuffle,
            dtype=self.dtype, device=self.device, on_step=on_step,
        )


def _qualname(obj: Any) -> str:
    mod = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    return f"{mod}.{name}" if mod else name


class _MaskedDropout(nn.Module):
    """Dropout whose mask is supplied from outside (buffer ``mask``: ``1[u >= p]``
    already divided by ``1 - p``, so a step costs one product)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)
        self.register_buffer("mask", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        return x * self.mask


def _replace_dropout(model: nn.Module) -> list[str]:
    """Swap every ``nn.Dropout`` for a :class:`_MaskedDropout`; return their names."""
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, child_name, _MaskedDropout(child.p))
                names.append(f"{name}.{child_name}" if name else child_name)
    return names


def _check_supported(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            msg = (
                f"model_factory builds a model with BatchNorm ({name!r}); the "
                "vectorised trainer cannot update running statistics per model. Use "
                "the generic path (retrain_*(train_func, ...)) for this model."
            )
            raise DattriValueError(msg)
        if isinstance(module, nn.modules.dropout._DropoutNd) and type(module) is not nn.Dropout:
            msg = (
                f"model_factory builds {type(module).__name__} ({name!r}); only "
                "nn.Dropout is supported by the vectorised trainer. Use the generic path."
            )
            raise DattriValueError(msg)


def _init_model(model_factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = model_factory()
    if not isinstance(model, nn.Module):
        msg = f"model_factory must return an nn.Module, got {type(model).__name__}."
        raise DattriValueError(msg)
    return model


def _dropout_shapes(template: nn.Module, names: list[str], x1: torch.Tensor) -> list[tuple[int, ...]]:
    """Feature shape (without the batch dimension) entering each dropout layer."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:
        mod = template.get_submodule(name)
        handles.append(mod.register_forward_hook(
            lambda _m, inp, _out, name=name: shapes.__setitem__(name, tuple(inp[0].shape[1:])),
        ))
    was_training = template.training
    template.eval()
    try:
        with torch.no_grad():
            template(x1)
    finally:
        template.train(was_training)
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in shapes]
    if missing:
        msg = f"dropout layers {missing} are not used in the forward pass of the model."
        raise DattriValueError(msg)
    return [shapes[n] for n in names]


def _subset_matrix(subsets: Any, n_data: int) -> torch.Tensor:
    """Validate ``subsets`` and return the membership mask ``(M, n_data)``."""
    if isinstance(subsets, torch.Tensor) and subsets.dim() == 2 and subsets.dtype != torch.bool:
        rows = list(subsets.to(torch.int64))
    elif isinstance(subsets, torch.Tensor) and subsets.dtype == torch.bool:
        if subsets.dim() != 2 or subsets.shape[1] != n_data:
            msg = f"subsets as a mask must be (M, {n_data}), got {tuple(subsets.shape)}."
            raise DattriValueError(msg)
        return subsets.clone()
    else:
        rows = [torch.as_tensor(r if isinstance(r, torch.Tensor) else list(r), dtype=torch.int64)
                for r in subsets]
    mask = torch.zeros(len(rows), n_data, dtype=torch.bool)
    for m, r in enumerate(rows):
        r = r.reshape(-1)
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= n_data):
            msg = (
                f"subsets[{m}] holds indices in [{int(r.min())}, {int(r.max())}] but "
                f"the data has {n_data} examples."
            )
            raise DattriValueError(msg)
        mask[m, r] = True
        if int(mask[m].sum()) != r.numel():
            msg = f"subsets[{m}] repeats training indices; subsets must be sets."
            raise DattriValueError(msg)
    return mask


class _Injected(nn.Module):
    """Stands in for the lead ``nn.Linear`` of the shared-input path: returns the
    pre-activations given from outside (buffer ``h``), whatever its input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("h", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - replaced input
        return self.h


class _Found(Exception):  # noqa: N818 - control flow of the probe, never escapes
    pass


def _lead_linear(template: nn.Module, xd: torch.Tensor) -> str | None:
    """The module name of the model's lead ``nn.Linear``, or None.

    The lead is the first module with parameters that the forward calls; it must be
    a plain ``nn.Linear`` (forward not overridden) with trainable, untied
    parameters, and its input must be ``x.reshape(n, -1)`` for every training input
    ``x`` (checked on all of ``xd``). Such a layer sees the same input rows in every
    model, so one GEMM over the union of the models' minibatches replaces ``M``
    batched ones (:func:`_train_chunk`). Whatever these checks cannot see (a
    parameter used outside its module, a layer called twice, dropout before the
    layer) is caught by comparing the first step's gradients with the vmapped ones.
    """
    mods = dict(template.named_modules())
    names = {id(m): n for n, m in mods.items()}
    own = {n for n, m in mods.items() if any(True for _ in m.parameters(recurse=False))}
    if not own:
        return None
    x2 = xd.reshape(xd.shape[0], -1)
    found: list[tuple[str, torch.Tensor]] = []

    def pre(mod: nn.Module, args: Any) -> None:  # the first module with parameters
        name = names.get(id(mod))
        if name in own:
            found.append((name, args[0].detach() if args else None))
            raise _Found

    lead = None
    handles = [m.register_forward_pre_hook(pre) for m in mods.values()]
    try:
        for start in range(0, xd.shape[0], 1024):
            found.clear()
            with torch.no_grad():
                try:
                    template(xd[start:start + 1024])
                except _Found:
                    pass
            if not found or (lead is not None and found[0][0] != lead):
                return None
            if lead is None:  # the layer's own conditions, before reading more data
                lead = found[0][0]
                layer = mods[lead]
                if type(layer) is not nn.Linear or any(not p.requires_grad for p in layer.parameters()):
                    return None
                ids = [id(p) for p in layer.parameters()]
                if sum(id(p) in ids for _, p in template.named_parameters(remove_duplicate=False)) != len(ids):
                    return None  # tied to another module's parameter
                if x2.shape[1] != layer.in_features:
                    return None
            seen, chunk = found[0][1], x2[start:start + 1024]
            if seen is None or seen.shape != chunk.shape or not torch.equal(seen, chunk):
                return None
    except Exception:  # noqa: BLE001 - the probe only decides whether the path applies
        return None
    finally:
        for h in handles:
            h.remove()
    return lead


def _drop_seed(seed: int) -> int:
    return (int(seed) * 6364136223846793005 + _DROP_SEED_SALT) % _SEED_MOD


class _ModelStreams:
    """Per-model random streams: data order and dropout masks."""

    def __init__(self, seed: int, members: torch.Tensor, shuffle: bool) -> None:
        self.order_gen = torch.Generator().manual_seed(int(seed) % _SEED_MOD)
        self.drop_gen = torch.Generator().manual_seed(_drop_seed(seed))
        self.members = members
        self.sorted = torch.nonzero(members).flatten()
        self.shuffle = shuffle

    def epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return self.sorted
        perm = torch.randperm(self.members.shape[0], generator=self.order_gen)
        return perm[self.members[perm]]

    def masks(self, shapes: list[tuple[int, ...]], batch: int, p: list[float],
              dtype: torch.dtype) -> list[torch.Tensor]:
        out = []
        for shape, prob in zip(shapes, p):
            u = torch.rand((batch, *shape), generator=self.drop_gen, dtype=torch.float32)
            keep = (u >= prob).to(dtype)
            out.append(keep / (1.0 - prob) if prob < 1.0 else keep)
        return out


def _epoch_orders(streams: list[_ModelStreams], members: torch.Tensor, one_seed: bool) -> torch.Tensor:
    """``(M, k)``: every model's data order of the next epoch. Models of one seed
    draw the same permutation: drawn once and filtered for all of them at once."""
    if not (one_seed and streams[0].shuffle):
        return torch.stack([s.epoch_order() for s in streams])
    perm = torch.randperm(members.shape[1], generator=streams[0].order_gen)
    return perm.expand(members.shape[0], -1)[members[:, perm]].view(members.shape[0], -1)


def _batches(n: int, batch_size: int | None, drop_last: bool) -> list[slice]:
    if batch_size is None:
        return [slice(0, n)]
    out = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if drop_last and out and out[-1].stop - out[-1].start < batch_size:
        out = out[:-1]
    return out


def _check_common(x: torch.Tensor, y: torch.Tensor, seeds: Sequence[int], n_models: int,
                  epochs: int, batch_size: int | None, lr: float) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape[0] != y.shape[0]:
        msg = "X and Y must be tensors with the same number of examples (first dimension)."
        raise DattriValueError(msg)
    if len(seeds) != n_models:
        msg = f"seeds has {len(seeds)} entries but there are {n_models} subsets; pass one seed per model."
        raise DattriValueError(msg)
    if not isinstance(epochs, int) or epochs < 0:
        msg = f"epochs must be a non-negative int, got {epochs!r}."
        raise DattriValueError(msg)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        msg = f"batch_size must be a positive int or None (full batch), got {batch_size!r}."
        raise DattriValueError(msg)
    if not lr > 0:
        msg = f"lr must be positive, got {lr!r}."
        raise DattriValueError(msg)


def _state_dict_from(model: nn.Module, params: dict[str, torch.Tensor],
                     buffers: dict[str, torch.Tensor], index: int | None) -> dict[str, torch.Tensor]:
    out = {}
    for key in model.state_dict():
        src = params.get(key, buffers.get(key))
        if src is None:
            continue
        t = src[index] if index is not None else src
        out[key] = t.detach().to("cpu").clone()
    return out


def train_model(
    model_factory: Callable[[], nn.Module],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    subset: Any,
    seed: int,
    *,
    epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.0,
    batch_size: int | None = 64,
    weight_decay: float = 0.0,
    drop_last: bool = False,
    shuffle: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, torch.Tensor, nn.Module], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train one model with ``torch.optim.SGD``: the plain loop (reference, baseline).

    Same semantics as :func:`train_models_vectorized` for one model (see the
    module docstring), written as an ordinary ``nn.Module`` training loop.

    Args:
        model_factory: ``() -> nn.Module``.
        loss_fn: ``(outputs, targets) -> scalar`` mean loss.
        x: ``(n_data, ...)`` inputs; ``y``: ``(n_data, ...)`` targets.
        subset: indices into ``x`` of the training examples of this model.
        seed: initialisation, data-order and dropout seed.
        epochs, lr, momentum, batch_size, weight_decay, drop_last, shuffle, dtype,
            device: as in :class:`VectorizedTraining`.
        on_step: optional ``on_step(epoch, indices, model)``, called before every
            SGD step with the step's minibatch (positions in ``x``) and the model at
            the parameters the step's gradient is taken at (its dropout layers
            replaced by fixed-mask ones); it records the training trajectory
            (DVEmb's ``cache_gradients``) and must not modify the model.

    Returns:
        The trained state dict (CPU tensors).
    """
    _check_common(x, y, [seed], 1, epochs, batch_size, lr)
    members = _subset_matrix([subset], x.shape[0])[0]
    model = _init_model(model_factory, seed)
    _check_supported(model)
    keys = list(model.state_dict().keys())
    work = copy.deepcopy(model)
    drop_names = _replace_dropout(work)
    work = work.to(device=device, dtype=dtype) if dtype is not None else work.to(device)
    ref_dtype = next(work.parameters()).dtype
    xd = x.to(device=device, dtype=ref_dtype if x.is_floating_point() else x.dtype)
    yd = y.to(device)
    shapes = _dropout_shapes(work, drop_names, xd[:1]) if drop_names else []
    drop_mods = [work.get_submodule(n) for n in drop_names]
    streams = _ModelStreams(seed, members, shuffle)
    opt = torch.optim.SGD([p for p in work.parameters() if p.requires_grad], lr=lr,
                          momentum=momentum, weight_decay=weight_decay)
    work.train()
    for epoch in range(epochs):
        order = streams.epoch_order()
        for sl in _batches(order.shape[0], batch_size, drop_last):
            idx = order[sl].to(device)
            masks = streams.masks(shapes, idx.shape[0], [m.p for m in drop_mods], ref_dtype)
            for mod, mask in zip(drop_mods, masks):
                mod.mask = mask.to(device)
            if on_step is not None:
                on_step(epoch, idx, work)
            opt.zero_grad(set_to_none=True)
            loss_fn(work(xd.index_select(0, idx)), yd.index_select(0, idx)).backward()
            opt.step()
    state = work.state_dict()
    return {k: state[k].detach().to("cpu").clone() for k in keys if k in state}


class _SharedInput:
    """Gradients of a chunk whose models share their input rows (see :func:`_lead_linear`).

    The lead layer's pre-activations of every model come from one GEMM of the
    step's union rows ``X_U`` with all models' weights side by side, the rest of the
    model runs vmapped from those pre-activations (the lead layer replaced by
    :class:`_Injected`), and the lead's weight gradients come from one GEMM of
    ``X_U^T`` with the models' output gradients scattered to their rows (zero where a
    model does not use a row). Exact: the same sums as the vmapped gradients, in
    another order. A step whose union is more than twice a minibatch takes the
    vmapped path.
    """

    def __init__(self, lead: str, xd: torch.Tensor, grad_fn: Callable, has_bias: bool) -> None:
        self.lead, self.grad_fn, self.has_bias = lead, grad_fn, has_bias
        self.x2, self.x_shape = xd.reshape(xd.shape[0], -1), tuple(xd.shape[1:])
        self.checked = False

    @classmethod
    def build(cls, template: nn.Module, xd: torch.Tensor, params: dict[str, torch.Tensor],
              cfg: dict[str, Any]) -> _SharedInput | None:
        if not xd.is_floating_point():
            return None
        lead = _lead_linear(template, xd)
        if lead is None:
            return None
        prefix = f"{lead}." if lead else ""
        if f"{prefix}weight" not in params:
            return None
        injected = copy.deepcopy(template)
        if lead:
            parent, _, child = lead.rpartition(".")
            setattr(injected.get_submodule(parent) if parent else injected, child, _Injected())
        loss_fn = cfg["loss_fn"]

        def loss_rest(p, b, h, xb, yb):
            if not lead:
                return loss_fn(h, yb)
            return loss_fn(functional_call(injected, (p, {**b, f"{lead}.h": h}), (xb,)), yb)

        fn = vmap(grad(loss_rest, argnums=(0, 2)), in_dims=(0, 0, 0, None, 0), randomness="error")
        return cls(lead, xd, fn, f"{prefix}bias" in params)

    def grads(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
              idx: torch.Tensor, yb: torch.Tensor) -> dict[str, torch.Tensor] | None:
        m, b = idx.shape
        rows, pos = torch.unique(idx, return_inverse=True)
        if rows.numel() > 2 * b:
            return None
        prefix = f"{self.lead}." if self.lead else ""
        w = params[f"{prefix}weight"]  # (M, out, in)
        out = w.shape[1]
        xu = self.x2.index_select(0, rows)
        z = (xu @ w.reshape(m * out, -1).T).view(rows.numel() * m, out)
        # row (u, model) of z: u * M + model (index_select/index_copy_: far faster
        # than advanced indexing)
        where = (pos * m + torch.arange(m, device=idx.device).unsqueeze(1)).reshape(-1)
        h = z.index_select(0, where).view(m, b, out)
        if self.has_bias:
            h = h + params[f"{prefix}bias"].unsqueeze(1)
        rest = {k: v for k, v in params.items() if k not in (f"{prefix}weight", f"{prefix}bias")}
        dummy = xu.new_zeros(()).expand(b, *self.x_shape)  # the lead layer ignores it
        g_rest, dh = self.grad_fn(rest, buffers, h, dummy, yb)
        scattered = dh.new_zeros(rows.numel() * m, out).index_copy_(0, where, dh.reshape(m * b, out))
        dw = (scattered.view(rows.numel(), m * out).T @ xu).view_as(w)
        grads = dict(g_rest)
        grads[f"{prefix}weight"] = dw
        if self.has_bias:
            grads[f"{prefix}bias"] = dh.sum(1)
        return grads

    def check(self, grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
        """Whether the first step's gradients equal the vmapped ones (else: never again)."""
        self.checked = True
        if grads.keys() != reference.keys():
            return False
        tol = 1e-10 if next(iter(reference.values())).dtype == torch.float64 else 1e-4
        for k, ref in reference.items():
            scale = float(ref.abs().max()) if ref.numel() else 0.0
            if grads[k].shape != ref.shape or not torch.allclose(grads[k], ref, rtol=tol, atol=tol * scale):
                return False
        return True


def _vmapped_grads(grad_fn: Callable, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                   xb: torch.Tensor, yb: torch.Tensor) -> dict[str, torch.Tensor]:
    try:
        return grad_fn(params, buffers, xb, yb)
    except RuntimeError as e:
        if "random" in str(e).lower():
            msg = (
                "the model uses random operations other than nn.Dropout modules "
                "(e.g. F.dropout in forward), which the vectorised trainer cannot "
                "seed per model; use the generic retrain path (train_func)."
            )
            raise DattriValueError(msg) from e
        raise


def _train_chunk(model_factory, loss_fn, xd, yd, members, seeds, cfg, bar) -> list[dict[str, torch.Tensor]]:
    models = [_init_model(model_factory, s) for s in seeds]
    for m in models:
        _check_supported(m)
    template = copy.deepcopy(models[0])
    drop_names = _replace_dropout(template)
    dtype, device = cfg["dtype"], cfg["device"]
    models = [m.to(device=device, dtype=dtype) if dtype is not None else m.to(device) for m in models]
    template = template.to(device=device, dtype=dtype) if dtype is not None else template.to(device)
    template.train()
    shapes = _dropout_shapes(template, drop_names, xd[:1]) if drop_names else []
    probs = [template.get_submodule(n).p for n in drop_names]
    params, buffers = stack_module_state(models)
    trainable = {k for k, p in models[0].named_parameters() if p.requires_grad}
    frozen = {k: v for k, v in params.items() if k not in trainable}
    params = {k: v.detach() for k, v in params.items() if k in trainable}
    buffers = {**buffers, **frozen}
    ref_dtype = next(iter(params.values())).dtype
    if xd.is_floating_point():
        xd = xd.to(ref_dtype)
    streams = [_ModelStreams(s, members[i], cfg["shuffle"]) for i, s in enumerate(seeds)]

    def loss_one(p, b, xb, yb):
        return cfg["loss_fn"](functional_call(template, (p, b), (xb,)), yb)

    grad_fn = vmap(grad(loss_one), randomness="error")
    # Models with one seed (leave-one-out) draw their minibatches from the same
    # permutation: the union of a step's minibatches is about one minibatch, and a
    # lead nn.Linear on the raw input gets its products for all models from two GEMMs.
    one_seed = len(set(seeds)) == 1
    shared = _SharedInput.build(template, xd, params, cfg) if one_seed or not cfg["shuffle"] else None
    mom = {k: torch.zeros_like(v) for k, v in params.items()}
    lr, mu, wd = cfg["lr"], cfg["momentum"], cfg["weight_decay"]
    for _ in range(cfg["epochs"]):
        orders = _epoch_orders(streams, members, one_seed).to(device)
        for sl in _batches(orders.shape[1], cfg["batch_size"], cfg["drop_last"]):
            idx = orders[:, sl]
            step_buffers = dict(buffers)
            if drop_names:
                per_model = [s.masks(shapes, idx.shape[1], probs, ref_dtype) for s in streams]
                for k, name in enumerate(drop_names):
                    step_buffers[f"{name}.mask"] = torch.stack([pm[k] for pm in per_model]).to(device)
            flat = idx.reshape(-1)  # index_select: several times faster than x[idx]
            yb = yd.index_select(0, flat).view(*idx.shape, *yd.shape[1:])
            grads = shared.grads(params, step_buffers, idx, yb) if shared is not None else None
            if grads is None or not shared.checked:
                xb = xd.index_select(0, flat).view(*idx.shape, *xd.shape[1:])
                reference = _vmapped_grads(grad_fn, params, step_buffers, xb, yb)
                if grads is not None and not shared.check(grads, reference):
                    shared = None  # the path does not apply to this model: vmap from now on
                grads = reference if shared is None else grads
            for k in params:  # the in-place ops of torch.optim.SGD, in its order
                g = grads[k].add_(params[k], alpha=wd) if wd != 0 else grads[k]
                if mu != 0:
                    g = mom[k].mul_(mu).add_(g)
                params[k].add_(g, alpha=-lr)
        if bar is not None:
            bar.update(len(seeds))
    return [_state_dict_from(models[0], params, buffers, i) for i in range(len(seeds))]


def train_models_vectorized(
    model_factory: Callable[[], nn.Module],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    subsets: Any,
    seeds: Sequence[int],
    *,
    epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.0,
    batch_size: int | None = 64,
    weight_decay: float = 0.0,
    drop_last: bool = False,
    shuffle: bool = True,
    chunk_size: int = 64,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Train ``M`` models at once with functional minibatch SGD vmapped over models.

    Model ``m`` is trained on ``x[subsets[m]]`` from seed ``seeds[m]``; every
    model gets the result :func:`train_model` would give it (up to floating-point
    summation order), whatever other models share its chunk.

    Args:
        model_factory: ``() -> nn.Module`` (no BatchNorm; dropout only as nn.Dropout).
        loss_fn: ``(outputs, targets) -> scalar`` mean loss of a batch.
        x: ``(n_data, ...)`` inputs. y: ``(n_data, ...)`` targets.
        subsets: ``M`` index sets into ``x``, all of the same size (a list of
            sequences, an ``(M, k)`` index tensor, or an ``(M, n_data)`` bool mask).
        seeds: ``M`` ints.
        epochs, lr, momentum, batch_size, weight_decay, drop_last, shuffle, dtype,
            device: see :class:`VectorizedTraining`.
        chunk_size: models per vmapped call.
        progress: tqdm bar over models-epochs (None: only on a terminal).

    Returns:
        ``M`` state dicts (CPU tensors) with the keys of ``model_factory().state_dict()``.
    """
    members = _subset_matrix(subsets, x.shape[0])
    _check_common(x, y, seeds, members.shape[0], epochs, batch_size, lr)
    sizes = members.sum(dim=1)
    if members.shape[0] and not bool((sizes == sizes[0]).all()):
        msg = (
            f"subsets must all have the same size for vectorised training, got sizes "
            f"{sorted(set(sizes.tolist()))[:5]}; group them by size."
        )
        raise DattriValueError(msg)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        msg = f"chunk_size must be a positive int, got {chunk_size!r}."
        raise DattriValueError(msg)
    xd = x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else x.dtype)
    yd = y.to(device)
    cfg = {"loss_fn": loss_fn, "epochs": epochs, "lr": lr, "momentum": momentum,
           "batch_size": batch_size, "weight_decay": weight_decay, "drop_last": drop_last,
           "shuffle": shuffle, "dtype": dtype, "device": device}
    out: list[dict[str, torch.Tensor]] = []
    n = members.shape[0]
    with tqdm(total=n * epochs, disable=progress is False if progress is not None else None,
              desc="vectorised training", unit="model-epoch", leave=False) as bar:
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            out.extend(_train_chunk(model_factory, loss_fn, xd, yd, members[start:stop],
                                    [int(s) for s in seeds[start:stop]], cfg, bar))
    return out
