"""The one loop over loaders: featurize, then score in blocks (private).

Every attributor is ``score(i, j) = < T(feat(train_i)), S(feat(test_j)) >``
averaged (or summed) over checkpoints. This module owns the loops over data
loaders, device moves, seeding of stochastic models, progress bars, finiteness
checks and blocked matrix products; attributor classes only compose them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from dattri._warn import warn_user
from dattri._loader import batch_size_of, batches, check_loader, to_device
from dattri.algorithm._batched import BatchedGrads, coupled_message, reference_grads
from dattri.algorithm._factored import FactoredLinearFeaturizer
from dattri.algorithm._loop import (  # noqa: F401 - re-exported for the attributors
    ENSEMBLE_SEED,
    BufferLender,
    LoaderFeatures,
    _check_finite,
    _disable,
    _head,
    close_per_example,
    ensemble_rng,
    gathered,
    resolve_device,
)
from dattri.distributed import ShardedLoader, all_reduce, broadcast, row_range
from dattri.errors import DattriValueError
from dattri.task import AttributionTask

__all__ = [
    "DataCache",
    "Featurizer",
    "LoaderFeatures",
    "replayable",
    "resolve_device",
    "score_rows",
    "score_stream",
]

class Featurizer(LoaderFeatures):
    """Per-example gradient features of a task on one checkpoint.

    Args:
        task: the attribution task.
        which: ``"loss"`` (training side) or ``"target"`` (test side).
        layer_name: restrict to these parameters.
        device: where the model, data and features live.
        transform: optional ``f(G (B, P), ckpt_idx) -> (B, k)`` applied per batch
            (a random projection, a normalisation, ...).

    Per-example gradients come from ``vmap(grad)`` on batches of one, or, when
    every selected parameter sits in an ``nn.Linear`` and a check against the dense
    gradients passes (once per checkpoint), from layer inputs and output gradients
    captured in one batched forward/backward (``dattri.algorithm._factored``),
    several times cheaper. ``use_factored = False`` turns the fast path off.
        show_progress: tqdm bars over batches.
    """

    def __init__(
        self,
        task: AttributionTask,
        which: str,
        layer_name: str | Sequence[str] | None,
        device: torch.device,
        transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        show_progress: bool | None = None,
    ) -> None:
        self.task, self.which, self.layer_name = task, which, layer_name
        self.device, self.transform = device, transform
        self.show_progress = show_progress
        self.use_factored = True
        self.use_batched = True
        self._factored: Any = False  # built lazily (False = not yet)
        self._batched: Any = False
        self._batched_ok: dict[int, bool] = {}
        self._warned = False
        self._warned_probe = False
        self._vmap_fails = False
        self._fn: dict[int, tuple[Callable, torch.Tensor]] = {}
        self._layout: Any = None  # the TensorSketch layout of the selected parameters
        self._sink: Any = None  # the current checkpoint's FactoredSketchSink
        self._lender = BufferLender()  # the factored path's formed gradients, lent back

    def _grad_fn(self, ckpt_idx: int) -> tuple[Callable, torch.Tensor]:
        if ckpt_idx not in self._fn:
            task = self.task
            task.load_checkpoint(ckpt_idx, self.device, force=True)
            theta, _ = task.get_param(ckpt_idx, self.layer_name)
            get = task.get_grad_loss_func if self.which == "loss" else task.get_grad_target_func
            fn = get(layer_name=self.layer_name, ckpt_idx=ckpt_idx)
            self._fn = {ckpt_idx: (fn, theta.to(self.device))}  # one ckpt at a time
        return self._fn[ckpt_idx]

    def _func(self) -> Callable:
        t = self.task
        return t.original_loss_func if self.which == "loss" else t.original_target_func

    def raw(self, batch: Any, ckpt_idx: int, sink: Any = None) -> torch.Tensor:
        """Dense per-example gradients ``(B, P)``: from one batched forward and
        backward when verified for this checkpoint, else ``vmap(grad)`` on batches
        of one. With a ``sink`` (:class:`~dattri.func.sketch.FactoredSketchSink`):
        their ``(B, k)`` sketch instead (the batched path never forms the layers the
        sink takes from their factors)."""
        self._grad_fn(ckpt_idx)  # loads the checkpoint on the device
        self.task.validate_batch(batch, self.which, ckpt_idx)
        if self.batched_ok(batch, ckpt_idx):
            task = self.task
            task.load_checkpoint(ckpt_idx, self.device)
            with ensemble_rng(ckpt_idx, self.device):
                g = self.batched.run(self._func(), batch, dict(task.named_parameters), sink=sink)
            if g is not None:
                return g if sink is not None else _check_finite(
                    g, f"{self.which} gradients (checkpoint {ckpt_idx})")
            if self.batched.probe_failed:
                self._coupled_batch()
        g = self.vmapped(batch, ckpt_idx)
        return g if sink is None else sink.finish(g, sink.layout.names, g.shape[0], g)

    def vmapped(self, batch: Any, ckpt_idx: int) -> torch.Tensor:
        """Dense per-example gradients ``(B, P)`` by ``vmap(grad)`` on batches of one
        (a model that ``vmap`` cannot trace, e.g. data-dependent control flow in a
        Hugging Face mask, gets autograd on each example in turn)."""
        fn, theta = self._grad_fn(ckpt_idx)
        self.task.validate_batch(batch, self.which, ckpt_idx)
        if not self._vmap_fails:
            try:
                with ensemble_rng(ckpt_idx, self.device):
                    g = fn(theta, batch).detach()
                return _check_finite(g, f"{self.which} gradients (checkpoint {ckpt_idx})")
            except RuntimeError as e:
                if "vmap" not in str(e):
                    raise
                self._vmap_fails = True
                warn_user(
                    f"{self.which} gradients: vmap cannot trace this model ({str(e)[:120]}...); "
                    "computing per-example gradients one example at a time (slow)."
                )
        return self.reference(batch, ckpt_idx)

    def reference(self, batch: Any, ckpt_idx: int) -> torch.Tensor:
        """Per-example gradients ``(B, P)`` by autograd on each example as a batch of
        one: the definition, for checking the batched paths on a few examples."""
        self._grad_fn(ckpt_idx)
        self.task.validate_batch(batch, self.which, ckpt_idx)
        task = self.task
        task.load_checkpoint(ckpt_idx, self.device)
        names = task._resolve_layer_name(self.layer_name)
        g = reference_grads(self._func(), batch, dict(task.named_parameters), names,
                            lambda: ensemble_rng(ckpt_idx, self.device))
        return _check_finite(g, f"{self.which} gradients (checkpoint {ckpt_idx})")

    def _coupled_batch(self) -> None:
        """A batch whose probed example differs alone (see ``BatchedGrads._probe``):
        it is computed by vmap(grad) on batches of one; the first time, a warning."""
        if not self._warned_probe:
            self._warned_probe = True
            warn_user(coupled_message(f"{self.which} gradients", "gradient",
                                      "computed by vmap(grad) on single examples"))

    @property
    def batched(self):
        """The hook-based batched per-example gradients (``BatchedGrads``) or None."""
        if self._batched is False:
            bg = BatchedGrads(self.task, self.layer_name)
            self._batched = bg if bg.supported and not _unbatched(self._func()) else None
        return self._batched

    def batched_ok(self, batch: Any, ckpt_idx: int) -> bool:
        """Whether the batched path agrees with the reference on the first few
        examples of ``batch`` (checked once per checkpoint)."""
        if not self.use_batched or self.batched is None:
            return False
        if ckpt_idx not in self._batched_ok:
            small = _head(batch)
            task = self.task
            task.load_checkpoint(ckpt_idx, self.device)
            try:
                with ensemble_rng(ckpt_idx, self.device):
                    got = self.batched.run(self._func(), small, dict(task.named_parameters))
            except (RuntimeError, ValueError, TypeError, IndexError):
                got = None  # the hooks do not fit this model (the reference path decides)
            ok = got is not None and close_per_example(got, self.reference(small, ckpt_idx))
            self._batched_ok[ckpt_idx] = ok
            if not ok and not self._warned:
                self._warned = True
                warn_user(
                    f"{self.which} gradients: the batched per-example gradients (one forward "
                    "and backward per batch) differ from autograd on single examples, so "
                    "this task falls back to vmap(grad) over examples (slower). Usual "
                    "causes: the loss couples the examples of a batch (batch statistics, "
                    "a mean over padded positions), BatchNorm in training mode, or random "
                    "layers other than nn.Dropout."
                )
        return self._batched_ok[ckpt_idx]

    @property
    def factored(self):
        """The verified ``nn.Linear`` fast path (``FactoredLinearFeaturizer``) or None."""
        if self._factored is False:
            fz = FactoredLinearFeaturizer(self.task, self.which, self.layer_name, self.device)
            self._factored = fz if fz.supported else None
        return self._factored

    def factored_ok(self, batch: Any, ckpt_idx: int) -> bool:
        """Whether the fast path holds for this checkpoint (checked once on ``batch``)."""
        fz = self.factored if self.use_factored else None
        return fz is not None and fz.verify(batch, ckpt_idx, self.reference)

    def grads(self, batch: Any, ckpt_idx: int) -> torch.Tensor:
        """Per-example gradients ``(B, P)``: from layer factors when verified, else dense."""
        if self.factored_ok(batch, ckpt_idx):
            fg = self.factored.try_batch(batch, ckpt_idx)
            if fg is not None:
                return fg.dense(self._lender)
        return self.raw(batch, ckpt_idx)

    def release(self, features: torch.Tensor) -> None:
        """Lend a batch's dense gradients back to the path that formed them (ignored
        unless they are its last result itself): one buffer for every batch of a
        stream."""
        self._lender.release(features)
        if self._batched:
            self._batched.release(features)

    def provide(self, dest: torch.Tensor | None) -> None:
        """The next batch's dense gradients go into ``dest`` where they are formed into
        a buffer of this featurizer's (the batched and the factored paths), when it
        has their shape."""
        self._lender.provide(dest)
        if self._batched:
            self._batched.provide(dest)

    def batch(self, batch: Any, ckpt_idx: int) -> torch.Tensor:
        """Features ``(B, d)`` of one batch (already on the device)."""
        sketch = getattr(self.transform, "project_factored", None)
        ts = getattr(self.transform, "sketch", None)
        if sketch is not None and self.factored_ok(batch, ckpt_idx):
            fg = self.factored.batch(batch, ckpt_idx)  # validates the loss on the batch
            return self._after_sketch(sketch(fg, ckpt_idx), ckpt_idx)
        if ts is not None:
            # any other model (or linear layers whose factors failed the numerical
            # check on this checkpoint): the same sketch, from the batched path with
            # the layers' factors where cheaper, else from dense gradients
            return self._after_sketch(self._tensor_sketch(ts, batch, ckpt_idx), ckpt_idx)
        g = self.grads(batch, ckpt_idx)
        if self.transform is not None:
            f = self.transform(g, ckpt_idx)
            if not _shares_memory(f, g):
                self.release(g)  # only projected: its buffer takes the next batch's gradients
            return f
        return g

    def iterate(
        self, loader: Iterable, ckpt_idx: int, desc: str = "", with_batch: bool = False,
    ) -> Iterator[Any]:
        """:meth:`LoaderFeatures.iterate`; a dense random projection (a transform
        marked ``blockable``) of batches smaller than half a block (``PROJECT_ROWS``
        rows, at most ``PROJECT_BYTES``) projects the gradients of consecutive batches
        together (:meth:`_projected_blocks`)."""
        if not getattr(self.transform, "blockable", False):
            return super().iterate(loader, ckpt_idx, desc, with_batch)
        return self._projected_blocks(loader, ckpt_idx, desc, with_batch)

    def _projected_blocks(self, loader: Iterable, ckpt_idx: int, desc: str,
                          with_batch: bool) -> Iterator[Any]:
        """The features of each batch in order, the dense gradients of small batches
        written into the rows of one block (in place where the featurizer forms
        them: :meth:`provide`) and projected together when the block is full: one
        product of ``PROJECT_ROWS`` rows instead of several small ones (a dense
        projection of 64 rows ran ~15% below the rate of 256 on MNIST LR). Each batch's
        features are its rows of the projected block, as :meth:`batch` gives them
        up to the rounding of the product."""
        items = self._each(loader, lambda b: (b, self.grads(b, ckpt_idx)), desc)
        for rows, parts in gathered(self, items, _project_rows):
            f = self.transform(rows, ckpt_idx)
            for b, start, n in parts:
                yield (b, f[start:start + n]) if with_batch else f[start:start + n]

    def _after_sketch(self, f: torch.Tensor, ckpt_idx: int) -> torch.Tensor:
        """A sketch checked for finiteness, then the transform's ``after`` (e.g. the
        row normalisation of Grad-Cos), if it has one."""
        f = _check_finite(f, f"{self.which} gradient sketches (checkpoint {ckpt_idx})")
        after = getattr(self.transform, "after", None)
        return f if after is None else after(f, ckpt_idx)

    def _tensor_sketch(self, ts: Any, batch: Any, ckpt_idx: int) -> torch.Tensor:
        """``(B, k)`` TensorSketch of the per-example gradients under the task's
        :class:`~dattri.func.sketch.SketchLayout` (:meth:`raw` with this checkpoint's
        :class:`~dattri.func.sketch.FactoredSketchSink`)."""
        from dattri.func.sketch import FactoredSketchSink, SketchLayout

        if self._layout is None:
            self._layout = SketchLayout(self.task.get_model(),
                                        self.task._resolve_layer_name(self.layer_name))
        if self._sink is None or self._sink.ensemble_id != ckpt_idx or self._sink.sketch is not ts:
            self._sink = FactoredSketchSink(ts, self._layout, ckpt_idx)
        return self.raw(batch, ckpt_idx, self._sink)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` may view ``b``'s memory (an identity or slicing transform)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return True
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _unbatched(func: Callable) -> bool:
    """A loss written for one example (the published 0.3.0 style): hooks see no batch."""
    try:
        from dattri._convention import is_unbatched
    except ImportError:  # pragma: no cover
        return False
    return bool(is_unbatched(func))


#: a dense random projection multiplies at least this many gradient rows at once: the
#: rows of consecutive smaller batches are gathered first (``Featurizer.iterate``), in
#: a block of at most ``PROJECT_BYTES`` (ResNet-9's 4.83M parameters: 55 rows)
PROJECT_ROWS = 256
PROJECT_BYTES = 1 << 30


def _project_rows(g: torch.Tensor) -> int:
    """Rows of a projected block of gradients like ``g`` (``PROJECT_ROWS``, fewer
    where they would pass ``PROJECT_BYTES``)."""
    return min(PROJECT_ROWS, max(1, PROJECT_BYTES // max(1, g[0].numel() * g.element_size())))

#: loaders whose batches fit in this many bytes are kept on the device between the
#: passes of a multi-checkpoint loop (the loader collates each batch only once)
REPLAY_BYTES = 256 << 20


def _nbytes(batch: Any) -> int:
    from torch.utils._pytree import tree_flatten

    return sum(t.numel() * t.element_size() for t in tree_flatten(batch)[0]
               if isinstance(t, torch.Tensor))


def replayable(loader: Iterable, device: torch.device, passes: int,
               budget: int = REPLAY_BYTES) -> Iterable:
    """``loader``'s batches on ``device`` as a list when it will be iterated
    ``passes > 1`` times and its batches fit in ``budget`` bytes; else ``loader``.

    The list is read once from the loader (the batches as it yields them, in order),
    so later passes skip the loader's indexing and collation."""
    if passes <= 1 or isinstance(loader, (list, tuple)):
        return loader
    kept, total = [], 0
    for b in batches(loader):
        total += _nbytes(b)
        if total > budget:
            return loader
        kept.append(to_device(b, device))
    return kept


#: training rows gathered per product with the test side (see :func:`score_rows`)
SCORE_ROWS = 256


def score_rows(right: torch.Tensor) -> int:
    """How many training rows to gather (:meth:`LoaderFeatures.stream_rows`) per
    product with ``right`` ``(m, d)``: a product of 64 rows runs at 210-220 GFLOP/s
    on this library's 2-core CPU, of 256 rows at 260-280 (d from 25k to 4.8M, m =
    500: the small dimension of the product, not the cache, limits it). The
    gathered block takes at most a third of the memory of ``right`` and 4 GiB
    (64 MiB whatever ``right``'s size): 166 rows of ResNet-9's 4.83M gradients
    against 500 test rows, two batches of 64 (2.5 GB beside the test side's 9.7)."""
    row = right.shape[1] * right.element_size()
    budget = max(64 << 20, min(right.numel() * right.element_size() // 3, 4 << 30))
    return max(1, min(SCORE_ROWS, budget // max(row, 1)))


def score_stream(left: Iterable[torch.Tensor], right: torch.Tensor) -> torch.Tensor:
    """``cat_b(L_b @ right.T)``: scores ``(n, m)`` from left blocks ``(B, d)``."""
    out = [lb @ right.T.to(lb.dtype) for lb in left]
    return torch.cat(out) if out else right.new_zeros((0, right.shape[0]))


class DataCache:
    """The cached training set: batches on the device and their sizes.

    Curvature operators sum over these batches (weighted by size) to get the
    curvature of the mean loss over the whole training set.

    Given one rank's part of a loader (:class:`dattri.distributed.ShardedLoader`),
    it holds that rank's batches; ``n`` is then the size of the whole training set,
    ``n_local`` this rank's, and :meth:`reduce` sums a tensor over the ranks.
    """

    def __init__(self, loader: Iterable, device: torch.device, name: str = "train_loader") -> None:
        check_loader(loader, name)
        self.batches = [to_device(b, device) for b in batches(loader)]
        if not self.batches:
            msg = f"{name} yielded no batches; pass a non-empty loader."
            raise DattriValueError(msg)
        self.sizes = [batch_size_of(b) for b in self.batches]
        self.n_local = int(sum(self.sizes))
        self.shard = loader.shard if isinstance(loader, ShardedLoader) else None
        self.first_batch = loader.batches[0] if self.shard is not None else 0
        self.num_batches = loader.num_batches if self.shard is not None else len(self.batches)
        self.row_start, _, self.n = row_range(self.n_local, self.shard)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks holding the other parts (``t`` for one process)."""
        return all_reduce(t, self.shard)

    def same(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank (``t`` for one process)."""
        return broadcast(t, self.shard)

    def local_batches(self, first: int | None = None) -> list[int]:
        """Indices into :attr:`batches` of this rank's batches among the first
        ``first`` batches of the whole loader (all of them for ``None``)."""
        stop = len(self.batches) if first is None else max(0, min(len(self.batches),
                                                                 first - self.first_batch))
        return list(range(stop))

    def count(self, batches: Sequence[int]) -> int:
        """Examples in ``batches`` (local indices) summed over the ranks."""
        local = sum(self.sizes[i] for i in batches)
        if self.shard is None:
            return int(local)
        return int(self.reduce(torch.tensor([local], dtype=torch.int64)))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
