"""Dense per-example gradients from one forward and one backward per batch (private).

Every module that owns a selected parameter gets a forward hook. The hook keeps the
module's inputs and taps its output ``y``: a tensor hook on ``y`` when it is in the
graph already, else ``y + 0`` with a zero leaf (the first layers: the parameters are
detached). One ``autograd.grad`` of the (mean) batch loss with respect to the
leaves, taken of the (mean) batch loss times the batch size, then gives every module's
output gradients as each example's own ``d loss_b / d y_b``. The per-example parameter gradients then follow
from the closed forms of :mod:`dattri.func.per_example` (``nn.Linear`` of any
input rank, convolutions, embeddings, normalisation layers); a module that owns
parameters directly (relative position embeddings of an attention...) is followed
through its forward (:class:`dattri.func.per_example.ParamUses`): when its parameters
reach the activations only through matrix products, each product's output is tapped
like a module's and the gradients follow in closed form; otherwise, and for any
other module, from ``vmap(vjp)`` of that module alone over its own parameters. A
parameter shared by several modules, or a module called several times (tied
weights, weight sharing), gets the sum of its contributions.

Active ``nn.Dropout`` modules draw one mask per call for the whole batch (shape
``(1, ...)``) from the checkpoint's ensemble seed, in forward order: the same masks
as ``vmap(grad, randomness="same")`` on batches of one, so dropout ensembles keep
their meaning. The result is checked once per checkpoint against the reference
(autograd on each example of a few, by :class:`dattri.algorithm._engine.Featurizer`);
a loss that couples the examples (batch statistics, a mean over a padded batch...)
fails that check and the featurizer falls back to ``vmap(grad)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from dattri._convention import batch_scale
from dattri._loader import batch_size_of
from dattri.algorithm._loop import BufferLender, close_per_example
from dattri.errors import InvalidLossError
from dattri.func.per_example import (
    ACCUMULATES,
    WRITES_INTO,
    ParamUses,
    _batch_dim,
    _conv_patches,
    conv_grads,
    embedding_grads,
    generic_grads,
    linear_grads,
    rule_for,
    traced_grads,
)
from dattri.task import AttributionTask

__all__ = ["BatchedGrads", "ModelSizes", "lifted", "reference_grads"]


class _Unit:
    """A module whose selected parameters are computed together."""

    def __init__(self, name: str, module: nn.Module, params: dict[str, str], subtree: bool) -> None:
        self.name, self.module, self.params = name, module, params  # local -> global name
        self.rule = None if subtree else rule_for(module)
        self.calls: list[tuple] = []
        #: its own parameters are followed through each call (one ParamUses per call)
        self.traced = self.rule is None and not subtree
        self.traces: list[ParamUses] = []


def _units(task: AttributionTask, names: list[str]) -> list[_Unit]:
    model = task.get_model()
    ident = {id(p): n for n, p in model.named_parameters()}
    selected = set(names)
    units: list[_Unit] = []
    covered: set[str] = set()  # module-name prefixes handled as a whole subtree
    for mname, mod in model.named_modules(remove_duplicate=False):
        if any(mname.startswith(c + ".") for c in covered):
            continue
        subtree = isinstance(mod, nn.MultiheadAttention)  # uses out_proj's weights functionally
        own = mod.named_parameters(recurse=subtree, remove_duplicate=False)
        sel = {ln: ident[id(p)] for ln, p in own if ident.get(id(p)) in selected}
        if subtree:
            covered.add(mname)
        if sel and all(u.module is not mod for u in units):
            units.append(_Unit(mname, mod, sel, subtree))
    # a weight tied between an embedding and another layer (a language model's
    # read-out): the other layer's dense product is written first and the embedding's
    # rows are added to it (no zero fill of the (B, V, D) slice, and the product does
    # not read it); sorted() keeps the order of everything else
    owners = Counter(g for u in units for g in u.params.values())
    return sorted(units, key=lambda u: u.rule is embedding_grads
                  and any(owners[g] > 1 for g in u.params.values()))


@contextmanager
def _patched_forwards(new: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Each module's ``forward`` replaced (an instance attribute) while inside."""
    patched = []
    try:
        for mod, forward in new:
            patched.append((mod, "forward" in mod.__dict__, mod.__dict__.get("forward")))
            mod.forward = forward
        yield
    finally:
        for mod, had, old in patched:
            if had:
                mod.forward = old
            else:
                del mod.forward


def _dropout_forward(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with one mask (shape ``(1, ...)``) for all examples."""
    if p >= 1:
        return x * 0
    noise = torch.empty((1, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return x * noise.bernoulli_(1 - p).div_(1 - p)


def _same_mask_dropout(model: nn.Module) -> Any:
    """Active ``nn.Dropout`` modules draw one mask for all examples of a call."""
    return _patched_forwards([
        (mod, lambda x, p=mod.p: _dropout_forward(x, p)) for mod in model.modules()
        if type(mod) is nn.Dropout and mod.training and mod.p > 0])


@contextmanager
def replayed_rng(state: tuple[torch.Tensor, Any]) -> Iterator[None]:
    """The random state ``state`` (from :func:`rng_state`) while inside, the current
    one afterwards: a second forward pass draws the same dropout masks as the first."""
    cpu, (device, acc) = state
    gen = torch.random.default_generator
    now = gen.get_state()
    now_acc = _accelerator_state(device)
    gen.set_state(cpu)
    if acc is not None:
        torch.get_device_module(device).set_rng_state(acc, device)
    try:
        yield
    finally:
        gen.set_state(now)
        if now_acc is not None:
            torch.get_device_module(device).set_rng_state(now_acc, device)


def _accelerator_state(device: torch.device | None) -> torch.Tensor | None:
    return None if device is None or device.type == "cpu" else \
        torch.get_device_module(device).get_rng_state(device)


def rng_state(device: torch.device | None) -> tuple[torch.Tensor, Any]:
    """The CPU random state and ``device``'s (an accelerator), for :func:`replayed_rng`."""
    return torch.random.default_generator.get_state(), (device, _accelerator_state(device))


def example_alone(model: nn.Module, module: nn.Module, func: Callable,
                  params: dict[str, torch.Tensor], batch: Any, i: int) -> tuple[Any, torch.Tensor, torch.Tensor] | None:
    """Example ``i`` of ``batch`` as a batch of one: the first input, the output and
    the gradient of ``func`` there, at the last call of ``module`` (the one nearest the
    loss), ``(x (1, ...) or None, y (1, ...), dfunc/dy (1, ...))``; None when that
    call has no tensor output. The definition the batched paths are probed against
    on every batch: a loss that couples the examples (weights normalised over the
    batch's labels, a mean over the batch's unpadded tokens) gives each example of a
    batch another output gradient than it has alone."""
    from dattri._loader import slice_batch

    seen: list[tuple[Any, torch.Tensor, torch.Tensor]] = []

    def hook(_m: nn.Module, args: tuple, output: Any) -> Any:
        if not (isinstance(output, torch.Tensor) and output.is_floating_point()):
            return output
        leaf = torch.zeros_like(output, requires_grad=True)
        x = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
        seen.append((x, output.detach(), leaf))
        return output + leaf

    handle = module.register_forward_hook(hook)
    try:
        with _same_mask_dropout(model), torch.enable_grad():
            loss = func(params, slice_batch(batch, slice(i, i + 1)))
            if not seen:
                return None
            x, y, leaf = seen[-1]
            (g,) = torch.autograd.grad(loss.reshape(()), [leaf], allow_unused=True)
    finally:
        handle.remove()
    return x, y, torch.zeros_like(y) if g is None else g


def _floats(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


class RootCalls:
    """The model's outputs in one batched forward pass (a forward hook on the model
    itself) and their gradients in the backward (tensor hooks): what
    :func:`head_agrees` compares with one example alone."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.outputs: list[Any] = []  # per call: the output tree, detached
        self.grads: list[list[torch.Tensor | None]] = []  # per call: per floating output

    def hook(self) -> Any:
        def record(_m: nn.Module, _args: tuple, output: Any) -> None:
            ts = _floats(output)
            grads: list[torch.Tensor | None] = [None] * len(ts)
            for k, t in enumerate(ts):
                if t.requires_grad:
                    t.register_hook(lambda g, k=k: grads.__setitem__(k, g))
            self.outputs.append(tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                         output))
            self.grads.append(grads)
        return self.model.register_forward_hook(record)


def head_agrees(calls: RootCalls, func: Callable, params: dict[str, torch.Tensor], batch: Any,
                i: int, b: int) -> bool | None:
    """Whether example ``i`` of a batch of ``b`` gets from the loss, at the model's
    outputs, the gradient it gets alone: the loss function run on that example with
    the model's forward replaced by the example's rows of the batch's outputs (no
    forward pass of the model: the loss's own arithmetic only), against the batch's
    output gradients (times ``scale``, the batch convention) at row ``i``. A loss
    that normalises over the batch (class weights of the batch's labels, the count of
    its unpadded tokens) differs here. None when this cannot be decided (no output
    recorded, outputs without the batch axis, a different number of model calls
    alone): the caller then probes with a full forward pass (:func:`example_alone`)."""
    from dattri._loader import slice_batch

    outs = [_floats(o) for o in calls.outputs]
    if not outs or any(not ts or any(t.dim() == 0 or t.shape[0] != b for t in ts) for ts in outs):
        return None
    leaves: list[torch.Tensor] = []

    def row(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            leaves.append(t[i:i + 1].clone().requires_grad_(True))
            return leaves[-1]
        return t[i:i + 1] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == b else t

    replies = iter([tree_map(row, o) for o in calls.outputs])
    count = [0]

    def forward(*_a: Any, **_k: Any) -> Any:
        count[0] += 1
        return next(replies, None)

    model = calls.model
    try:
        with _patched_forwards([(model, forward)]), torch.enable_grad():
            loss = func(params, slice_batch(batch, slice(i, i + 1)))
            if count[0] != len(calls.outputs):
                return None
            alone = torch.autograd.grad(loss.reshape(()), leaves, allow_unused=True)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError, StopIteration):
        return None  # the loss needs more of the model than its outputs
    # an output the loss does not use (a cache of keys and values) has no gradient;
    # per output, in norm, as close_per_example (one comparison for all of them)
    errs, scales = [], []
    for (t, g), a in zip(((t, g) for ts, gs in zip(outs, calls.grads) for t, g in zip(ts, gs)), alone):
        if g is None and a is None:
            continue
        mine = t.new_zeros(t[i:i + 1].shape) if g is None else g[i:i + 1]
        ref = torch.zeros_like(mine) if a is None else a.to(mine.dtype).reshape(mine.shape)
        errs.append(torch.linalg.vector_norm(mine - ref))
        scales.append(torch.linalg.vector_norm(ref))
    if not errs:
        return True
    return bool((torch.stack(errs) <= (1e-3 + 1e-6) * torch.stack(scales)).all())


def coupled_message(what: str, compared: str, how: str) -> str:
    """The warning for a batch whose probed example differs alone: ``what`` is being
    computed, ``compared`` differed, and such batches are ``how`` instead."""
    return (f"{what}: in a batch, an example's {compared} differs from the one it has "
            "alone (a batch of one), so the loss couples the examples of some batches (a "
            "mean over unpadded tokens when padding differs, class weights normalised over "
            "a batch of mixed labels, batch statistics); such batches are "
            f"{how} (slower). To keep the batched path, return the mean of per-example "
            "losses.")


def _rows_agree(batched: torch.Tensor, alone: torch.Tensor) -> bool:
    """Row ``i`` of a batched tensor (given as ``(1, ...)``) against the same example alone."""
    return batched.shape == alone.shape and close_per_example(
        batched.reshape(1, -1), alone.reshape(1, -1).to(batched.dtype))


def lifted(t: torch.Tensor, b: int) -> torch.Tensor:
    """``t`` without the batch axis as every one of ``b`` examples sees it: ``(b, ...)``
    (a leading axis of 1 is taken for a broadcast one)."""
    return t.expand(b, *t.shape[1:]) if t.dim() and t.shape[0] == 1 else t.expand(b, *t.shape)


class ModelSizes:
    """The leading sizes (above 1) of the tensors that some modules' calls take and
    give when the model runs on ONE example of a batch: sizes of the model or of the
    example (a sequence length: position ids ``arange(T)``, a ``(T, T)`` mask), not
    of the batch. The batched paths tell a tensor's batch axis by its size, so a batch
    of one of these sizes would make such a shared tensor look like one row per
    example: they run it in parts of :meth:`part` examples instead. Cached per example
    shape; the forward runs without gradients and leaves the random state as it was.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, frozenset[int]] = {}

    def __call__(self, model: nn.Module, modules: list[nn.Module],
                 func: Callable, params: dict[str, torch.Tensor], batch: Any,
                 device: torch.device | None) -> frozenset[int]:
        """The sizes for ``batch`` (``modules``: the hooked ones of ``model``)."""
        from dattri._loader import slice_batch

        key = tuple((tuple(x.shape[1:]), x.dtype) if isinstance(x, torch.Tensor) and x.dim()
                    else type(x) for x in tree_flatten(batch)[0])
        if key not in self._cache:
            seen: set[int] = set()

            def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                seen.update(int(x.shape[0]) for x in tree_flatten((args, kwargs, out))[0]
                            if isinstance(x, torch.Tensor) and x.dim())

            handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
            try:
                with replayed_rng(rng_state(device)), _same_mask_dropout(model), torch.no_grad():
                    func(params, slice_batch(batch, slice(0, 1)))
            finally:
                for h in handles:
                    h.remove()
            seen.discard(1)
            self._cache[key] = frozenset(seen)
        return self._cache[key]

    @staticmethod
    def part(b: int, sizes: frozenset[int]) -> int:
        """The examples per part of a batch of ``b`` (the largest size below ``b`` that
        is not one of ``sizes``; 1 never is)."""
        return next(s for s in range(b - 1, 0, -1) if s not in sizes)


class BatchedGrads:
    """Per-example gradients ``(B, P)`` of a task's selected parameters.

    Args:
        task: the attribution task (its functions must call ``task.model``).
        layer_name: the selected parameters (``None`` = all trainable).
    """

    def __init__(self, task: AttributionTask, layer_name: Any) -> None:
        self.task = task
        self.spec = task.param_spec(layer_name)
        self.units = _units(task, self.spec.names)
        owned = {g for u in self.units for g in u.params.values()}
        #: every selected parameter belongs to a module we can hook
        self.supported = owned == set(self.spec.names)
        self._b = 1  # examples of the batch being run
        #: batches run (the example probed in each: :meth:`_probe`), the unit call
        #: nearest the loss in the last forward, and whether the last run's probe failed
        self._runs = 0
        self._last_call: tuple[_Unit, int] | None = None
        self.probe_failed = False
        #: the previous result, lent back by a caller that no longer needs it
        #: (:meth:`release`): the next result of the same shape is written into it
        self._lender = BufferLender()
        #: the model's own sizes, per example shape (:class:`ModelSizes`)
        self._sizes = ModelSizes()

    def run(self, func: Callable, batch: Any, params: dict[str, torch.Tensor],
            sink: Any = None) -> torch.Tensor | None:
        """``(B, P)`` gradients of ``func(params, batch)`` per example (or, with a
        ``sink``, their TensorSketch ``(B, k)``): :meth:`_run` on the batch, or on
        consecutive parts of it when its size is one of the model's own sizes
        (:class:`ModelSizes`; e.g. a batch of T sequences of length T), each part
        drawing the same dropout masks."""
        if any(isinstance(u.module, nn.modules.batchnorm._BatchNorm) and u.module.training
               for u in self.units):
            return None  # batch statistics couple the examples (and the run would update them)
        b = batch_size_of(batch)
        device = next(iter(params.values())).device if params else None
        sizes = frozenset() if b == 1 else self._sizes(
            self.task.get_model(), [u.module for u in self.units], func, params, batch, device)
        if b not in sizes:
            return self._run(func, batch, params, sink)
        from dattri._loader import slice_batch

        step = ModelSizes.part(b, sizes)
        state = rng_state(device)
        parts = []
        for start in range(0, b, step):
            with replayed_rng(state):
                part = self._run(func, slice_batch(batch, slice(start, min(b, start + step))),
                                 params, sink)
            if part is None:
                return None
            parts.append(part)
        return torch.cat(parts)

    @staticmethod
    def _tap(t: torch.Tensor, leaves: list[torch.Tensor], tapped: dict[int, torch.Tensor]
             ) -> tuple[torch.Tensor, tuple[str, int]]:
        """Make the gradient at ``t`` available: by a tensor hook when ``t`` is in the
        graph already (the gradient at this value, even if changed in place later),
        else as the gradient of a zero leaf added to it (``t + 0``)."""
        if t.requires_grad:
            key = len(tapped)
            tapped[key] = None
            t.register_hook(lambda g, k=key: tapped.__setitem__(k, g))
            return t, ("tap", key)
        leaf = torch.zeros_like(t, requires_grad=True)
        leaves.append(leaf)
        return t + leaf, ("leaf", len(leaves) - 1)

    def _traced(self, unit: _Unit, leaves: list[torch.Tensor], tapped: dict[int, torch.Tensor]) -> Callable:
        """``unit.module.forward`` under a :class:`ParamUses` of its own parameters."""
        mod = unit.module
        inner = mod.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            trace = ParamUses({ln: getattr(mod, ln) for ln in unit.params}, self._b,
                              lambda t: self._tap(t, leaves, tapped))
            with trace:
                out = inner(*args, **kwargs)
            trace.close(out)
            unit.traces.append(trace)
            return out
        return forward

    def _hook(self, unit: _Unit, leaves: list[torch.Tensor], tapped: dict[int, torch.Tensor]) -> Callable:
        """Forward hook: keep the inputs; make each floating output's gradient
        available (:meth:`_tap`)."""
        def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            slots: list[tuple[str, int]] = []
            b = self._b
            # a call on inputs without the batch axis (position ids of shape (T,) or
            # (1, T)) makes an output that the batch shares, broadcast later: it is
            # expanded to (B, ...), so that its gradient stays per example
            lift = not any(_batch_dim(t, b, _m) is not None
                                     for t in tree_flatten((args, kwargs))[0])

            def tap(t: Any) -> Any:
                if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                    return t
                if lift:
                    t = lifted(t, b)
                t, slot = self._tap(t, leaves, tapped)
                slots.append(slot)
                return t

            out = tree_map(tap, output)
            detach = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
            if lift:  # the inputs as every example saw them
                args, kwargs = tree_map(
                    lambda t: lifted(t, b) if isinstance(t, torch.Tensor) else t, (args, kwargs))
            unit.calls.append((tree_map(detach, args), tree_map(detach, kwargs),
                               tree_map(detach, out), slots))
            self._last_call = (unit, len(unit.calls) - 1)
            return out
        return hook

    def release(self, grads: torch.Tensor) -> None:
        """Lend back a result of :meth:`run` that nobody will read again (e.g. projected
        already): see :class:`~dattri.algorithm._loop.BufferLender`."""
        self._lender.release(grads)

    def provide(self, dest: torch.Tensor | None) -> None:
        """The next result goes into ``dest`` when it has its shape (see
        :meth:`~dattri.algorithm._loop.BufferLender.provide`)."""
        self._lender.provide(dest)

    def _buffer(self, b: int, ref: torch.Tensor) -> torch.Tensor:
        return self._lender.take((b, self.spec.numel), ref.dtype, ref.device)

    def _run(self, func: Callable, batch: Any, params: dict[str, torch.Tensor],
             sink: Any = None) -> torch.Tensor | None:
        """``(B, P)`` gradients of ``func(params, batch)`` (a batch mean, or a sum when
        found to be one: :func:`~dattri._convention.batch_scale`) per example, or
        ``None`` when a module's configuration is outside the batched rules.

        With a ``sink`` (:class:`~dattri.func.sketch.FactoredSketchSink`): their
        ``(B, k)`` TensorSketch instead, the layers it prefers sketched from their
        inputs and output gradients (never formed), the others formed into a buffer
        of their own parameters only and sketched from it."""
        model = self.task.get_model()
        leaves: list[torch.Tensor] = []
        tapped: dict[int, torch.Tensor | None] = {}
        self._b = batch_size_of(batch)
        self._last_call, self.probe_failed = None, False
        rng = rng_state(next(iter(params.values())).device) if params else None
        for u in self.units:
            u.calls, u.traces = [], []
        handles = [u.module.register_forward_hook(self._hook(u, leaves, tapped), with_kwargs=True)
                   for u in self.units]
        traced = [(u.module, self._traced(u, leaves, tapped)) for u in self.units if u.traced]
        root = RootCalls(model)
        handles.append(root.hook())
        try:
            with _same_mask_dropout(model), _patched_forwards(traced), torch.enable_grad():
                loss = func(params, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    msg = "the loss/target function must return a scalar batch mean."
                    raise InvalidLossError(msg)
                if not leaves:
                    return None
                # the mean times B: every tapped output gradient is then its example's
                # own d loss_b / d y_b, with no product per layer afterwards
                grads = torch.autograd.grad(loss.reshape(()) * batch_scale(func, self._b), leaves,
                                            allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        b = self._b
        total: dict[str, torch.Tensor] = {}
        ref = next(iter(params.values()))
        slot = lambda kind, i: grads[i] if kind == "leaf" else tapped[i]  # noqa: E731
        if not self._probe(func, batch, params, slot, rng, root):
            self.probe_failed = True
            for u in self.units:
                u.calls, u.traces = [], []
            return None
        sketched = self._sketched_units(sink, slot) if sink is not None else set()
        if sketched:  # only the other units' parameters are formed
            formed = {g for u in self.units if u.name not in sketched for g in u.params.values()}
            names = [n for n in self.spec.names if n in formed]
            slices, start = {}, 0
            for n, numel in zip(self.spec.names, self.spec.numels):
                if n in formed:
                    slices[n], start = slice(start, start + numel), start + numel
            flat = self._lender.take((b, start), ref.dtype, ref.device)
        else:
            names = self.spec.names
            # the result; the closed-form rules of the large layers write into it
            flat = self._buffer(b, ref)
            slices = self.spec.slices()
        last = self._last_use()
        for i, u in enumerate(self.units):
            if u.name in sketched:
                for args, _, _, slots in u.calls:
                    a, d = _factors(u.module, args[0], slot(*slots[0]), b)
                    sink.add(u.name, a, d)
                u.calls, u.traces = [], []
                continue
            for c, (args, kwargs, out, slots) in enumerate(u.calls):
                gs = [slot(*s) for s in slots]
                trace = u.traces[c] if len(u.traces) == len(u.calls) else None
                if trace is not None and trace.failed is None:
                    part = traced_grads(trace, [slot(*use[-1]) for use in trace.uses])
                else:
                    dest, acc = self._destinations(u, total, flat, slices, b, params)
                    part = self._unit_grads(u, args, kwargs, out, gs, b, params, dest, acc)
                if part is None:
                    return None
                for local, g in part.items():
                    name = u.params[local]
                    if name not in total:
                        total[name] = g
                    elif g.data_ptr() == total[name].data_ptr() and b:
                        pass  # the rule added its part into the result itself
                    elif self._in_flat(total[name], flat, slices[name], b):
                        total[name].add_(g.reshape(total[name].shape))
                    else:
                        total[name] = total[name] + g
            u.calls, u.traces = [], []
            if sink is not None:  # the parameters complete here, sketched while in cache
                for glob in u.params.values():
                    if last[glob] == i and glob in total:
                        self._stream(sink, total, glob, flat, slices[glob], b, names)
        if sink is not None:
            sketch = sink.finish(None, names, b, ref)
            self._lender.release(flat)  # sketched: the buffer takes the next batch
            return sketch
        out = self._flat(total, b, flat, slices)
        self._lender.mark(out)
        return out

    def _probe(self, func: Callable, batch: Any, params: dict[str, torch.Tensor],
               slot: Callable, rng: Any, root: RootCalls) -> bool:
        """Whether one example of this batch (the next in turn: batch ``r`` probes
        example ``r mod B``) gets from the loss what it gets alone: at the model's
        outputs (:func:`head_agrees`: the loss's arithmetic on that example's rows,
        no forward pass), or where that cannot be decided, the output and output
        gradient at the unit call nearest the loss (:func:`example_alone`: one
        example's forward pass, same dropout masks). Checked on every batch: the
        check of the first examples per checkpoint (``Featurizer.batched_ok``)
        cannot see a loss whose coupling shows only in some batches (a mean over
        padded tokens once padding appears, label weights normalised over a batch of
        mixed labels); coupling inside the model (batch statistics) shows in every
        batch, the first included."""
        b, last = self._b, self._last_call
        self._runs += 1
        if b < 2 or rng is None:  # noqa: PLR2004 - alone = the batch
            return True
        i = (self._runs - 1) % b
        head = head_agrees(root, func, params, batch, i, b)
        if head is not None:
            return head
        if last is None:
            return True
        unit, c = last
        _, _, out, slots = unit.calls[c]
        ys = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not ys or not slots or ys[0].dim() == 0 or ys[0].shape[0] != b:
            return True
        y, g = ys[0], slot(*slots[0])
        if g is None:
            return True
        with replayed_rng(rng):
            alone = example_alone(self.task.get_model(), unit.module, func, params, batch, i)
        if alone is None:
            return True
        _, y1, g1 = alone
        return _rows_agree(y[i:i + 1], y1) and _rows_agree(g[i:i + 1], g1)

    def _sketched_units(self, sink: Any, slot: Callable) -> set[str]:
        """The units whose calls ``sink`` sketches from their factors: the owners of a
        structured layer of its layout (all of that layer's selected parameters,
        nothing else), called on one tensor with closed-form factors, where its
        cost model prefers the factors (positions of the calls as run)."""
        chosen = set()
        for u in self.units:
            layer = sink.layout.layers.get(u.name)
            if (layer is None or u.rule not in (linear_grads, conv_grads) or not u.calls
                    or set(u.params) != {leaf for leaf, sel in zip(("weight", "bias"), layer[3:]) if sel}
                    or any(u.params[leaf] != f"{u.name}.{leaf}" for leaf in u.params)):
                continue
            ok, positions = True, 0
            for args, kwargs, _, slots in u.calls:
                g = slot(*slots[0]) if len(slots) == 1 else None
                if kwargs or g is None or not args or not isinstance(args[0], torch.Tensor):
                    ok = False
                    break
                positions += g[0].numel() // layer[2]  # output positions of one example
            if ok and sink.prefers_factors(u.name, positions):
                chosen.add(u.name)
        return chosen

    def _last_use(self) -> dict[str, int]:
        """The index of the last unit that owns each parameter (a tied one: several)."""
        return {glob: i for i, u in enumerate(self.units) for glob in u.params.values()}

    def _stream(self, sink: Any, total: dict[str, torch.Tensor], glob: str, flat: torch.Tensor,
                sl: slice, b: int, names: list[str]) -> None:
        """Parameter ``glob``'s whole gradient into its slice of ``flat`` (if a rule did
        not write it there) and into ``sink``'s count sketch."""
        view = flat[:, sl]
        if not self._in_flat(total[glob], flat, sl, b):
            view.copy_(total[glob].reshape(b, -1))
            total[glob] = view
        sink.add_formed(view, sl.start, names)

    @staticmethod
    def _in_flat(t: torch.Tensor, flat: torch.Tensor, sl: slice | None, b: int) -> bool:
        """Whether ``t`` is the result buffer's own slice ``sl`` (a partial sum there)."""
        return bool(b) and sl is not None and t.data_ptr() == flat[:, sl].data_ptr()

    def _destinations(self, u: _Unit, total: dict[str, torch.Tensor], flat: torch.Tensor,
                      slices: dict[str, slice], b: int, params: dict[str, torch.Tensor],
                      ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
        """Where ``u``'s rule may write: a parameter's first contribution straight into
        the result, a later one (a tied weight) added to the partial sum there when the
        rule can (``ACCUMULATES``); and the local names of the latter."""
        dest, acc = {}, set()
        for local, glob in u.params.items():
            view = lambda g=glob: flat[:, slices[g]].view(b, *params[g].shape)  # noqa: E731
            if glob not in total:
                dest[local] = view()
            elif u.rule in ACCUMULATES and self._in_flat(total[glob], flat, slices.get(glob), b):
                dest[local] = total[glob]
                acc.add(local)
        return dest, frozenset(acc)

    def _unit_grads(self, u: _Unit, args: tuple, kwargs: dict, out: Any, gs: list, b: int,
                    params: dict[str, torch.Tensor], dest: dict[str, torch.Tensor] | None = None,
                    acc: frozenset[str] = frozenset()) -> dict[str, torch.Tensor] | None:
        if all(g is None for g in gs):
            return {}
        if u.rule is not None:
            if len(gs) != 1 or not args or not isinstance(args[0], torch.Tensor) or kwargs:
                return None
            delta, x = gs[0], args[0]
            some = next(iter(dest.values()), None) if dest else None
            like = delta if u.rule is embedding_grads else x  # the dtype the rule writes
            if u.rule in WRITES_INTO and some is not None and (like.dtype, like.device) == (some.dtype, some.device):
                kw = {"accumulate": acc} if acc else {}
                return u.rule(u.module, x, delta, list(u.params), out=dest, **kw)
            return u.rule(u.module, x, delta, list(u.params))
        it = iter(gs)
        g_tree = tree_map(
            lambda t: next(it) if isinstance(t, torch.Tensor) and t.is_floating_point() else None, out)
        own = {local: params[glob] for local, glob in u.params.items()}
        return generic_grads(u.module, own, args, kwargs, out, g_tree, b)

    def _flat(self, total: dict[str, torch.Tensor], b: int, flat: torch.Tensor,
              slices: dict[str, slice]) -> torch.Tensor:
        """``(B, P)`` of the gradients' dtype: ``flat``, with every parameter's slice
        filled (those a rule wrote into it already are left as they are)."""
        dtype = next(iter(total.values())).dtype if total else flat.dtype
        out = flat if dtype == flat.dtype else torch.empty(b, flat.shape[1], dtype=dtype, device=flat.device)
        for name, sl in slices.items():
            target = out[:, sl]
            if name not in total:  # not reached by the loss
                target.zero_()
            elif out is not flat or total[name].data_ptr() != target.data_ptr() or b == 0:
                target.copy_(total[name].reshape(b, -1))
        return out


def _factors(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, b: int,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, L, d_in)`` inputs and ``(B, L, d_out)`` output gradients of one call of
    an ``nn.Linear`` (positions: every axis between the batch and the features) or of
    an ungrouped convolution (positions: output pixels; inputs: unfolded patches)."""
    if isinstance(module, nn.Linear):
        return x.reshape(b, -1, x.shape[-1]), delta.reshape(b, -1, delta.shape[-1])
    cols, _, _ = _conv_patches(module, x)
    return cols.transpose(1, 2), delta.reshape(b, module.out_channels, -1).transpose(1, 2)


def reference_grads(func: Callable, batch: Any, params: dict[str, torch.Tensor],
                    names: list[str], seed_ctx: Callable[[], Any]) -> torch.Tensor:
    """``(B, P)`` per-example gradients by autograd on each example as a batch of
    one (every example under the same random state: one dropout mask for all)."""
    from dattri._loader import slice_batch

    rows = []
    for i in range(batch_size_of(batch)):
        one = slice_batch(batch, slice(i, i + 1))
        p = {k: (v.detach().requires_grad_(True) if k in names else v) for k, v in params.items()}
        with seed_ctx(), torch.enable_grad():
            loss = func(p, one)
            g = torch.autograd.grad(loss.reshape(()), [p[n] for n in names], allow_unused=True)
        rows.append(torch.cat([
            (x if x is not None else torch.zeros_like(p[n])).reshape(-1) for x, n in zip(g, names)]))
    return torch.stack(rows)

