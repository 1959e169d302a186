r"""Data value embedding (Wang et al. 2024, "Capturing the Temporal Dependence of
Training Data Influence").

Training is ``T`` SGD steps :math:`\theta_{t+1} = \theta_t - \eta_t \frac{1}{|B_t|}
\sum_{z \in B_t} g_t(z)` with :math:`g_t(z) = \nabla \ell(z; \theta_t)`. To first
order, dropping ``z`` from step ``t`` changes the final test loss by
:math:`g_{test}(\theta_T)^\top e_t(z)`, the *data value embedding*

.. math::
    e_t(z) = \frac{\eta_t}{|B_t|}\, \prod_{k=T-1}^{t+1} (I - \eta_k H_k)\; g_t(z),
    \qquad H_k \approx \frac{1}{|B_k|} \sum_{z' \in B_k} g_k(z') g_k(z')^\top

(the Hessian of each step replaced by its empirical Fisher / Gauss-Newton term).
With :math:`K_t = \sum_{k > t} \sum_{z' \in B_k} e_k(z') g_k(z')^\top` the product is
exactly :math:`I - K_t`, so one backward pass over the steps gives every embedding:
:math:`e_t(z) = \frac{\eta_t}{|B_t|}(g_t(z) - K_t g_t(z))`, then
:math:`K_{t-1} = K_t + \sum_{z \in B_t} e_t(z) g_t(z)^\top`. An example used in several
steps gets the sum of its embeddings; ``tau(i, j) = <e(z_i), g_target(z_j; theta_T)>``
(positive = proponent). Gradients may be randomly projected to ``k`` dimensions
first (one fixed projection for every step), which makes ``K`` ``k x k``; a
projection dimension given means a projection (``proj_type="identity"`` with a
dimension is taken as ``"normal"``).

Two ways to give the trajectory: ``steps`` (the minibatch indices and learning
rate of each step) with the task's checkpoints ``theta_0..theta_T``; or, as the
published package does, record it during training: call
``cache_gradients(epoch, batch_data, indices, learning_rate)`` (or enter
``cache_gradients_context(...)``) before each optimizer step, then ``cache()``
and ``attribute(test_loader, epoch=None, train_data_indices=None)``; gradients are
then taken at the model's current parameters (the task's checkpoints are not used)
and the embeddings are kept per epoch (``epoch=None`` sums them). The published
package omits the ``1/|B_t|`` of a mean loss's SGD step: pass
``learning_rate * batch_size`` to reproduce its values.

Under ``torch.distributed`` (with ``steps``) each rank computes the step gradients
of the minibatch examples it holds (its share of the training loader), their
embeddings with the shared ``K_t``, and its part of ``K``'s update, which is
summed over the ranks at every step (one ``k x k`` all-reduce per step); each rank
keeps and scores the embeddings of its own rows, and the rows are gathered. The
recording workflow (``cache_gradients``) is not split: every rank holds what it
recorded.

The per-example gradients of each step come from one batched forward and backward
(:class:`dattri.algorithm._batched.BatchedGrads`: closed forms for ``nn.Linear``,
convolutions, ...), at the step's parameters (``theta_t``, or the model's current
ones when recording). Whether that path agrees with autograd on single examples
depends on the model and loss, not on the parameter values, so it is checked once
(on the first step with two or more examples, and again only if a module's
train/eval mode changes), not at every step. A loss that couples the examples, a
0.3.0 single-example loss, a module outside the batched rules, or (when recording)
an active dropout layer (whose per-example masks differ) keeps ``vmap(grad)`` on
batches of one; ``use_batched = False`` turns the batched path off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from dattri._warn import warn_user
from dattri._loader import batch_size_of, slice_batch
from dattri.algorithm._batched import BatchedGrads, reference_grads
from dattri.algorithm._engine import DataCache
from dattri.algorithm._loop import _check_finite, _head, close_per_example, ensemble_rng, map_batches
from dattri.algorithm._scored import block_rows, check_top_k, ranked
from dattri.algorithm.base import BaseAttributor
from dattri.distributed import all_gather_rows, row_range
from dattri.errors import DattriValueError, NotCachedError
from dattri.func.utils import ParamSpec
from dattri.model_util.dropout import active_dropout
from dattri.task import AttributionTask
from dattri.topk import TopK

__all__ = ["DEFAULT_PROJECTOR_KWARGS", "DVEmbAttributor"]

#: the published name of DVEmb's projection defaults (those of
#: :class:`dattri.params.projection.DVEmbProjectionParams`)
DEFAULT_PROJECTOR_KWARGS = {"proj_max_batch_size": 64}


def _check_steps(steps: Any, num_ckpts: int) -> list[tuple[list[int], float]]:
    if not isinstance(steps, (list, tuple)) or len(steps) != num_ckpts - 1:
        got = len(steps) if isinstance(steps, (list, tuple)) else type(steps).__name__
        msg = (f"steps has {got} entries but the task has {num_ckpts} checkpoints; pass one "
               "(indices, learning_rate) per SGD step, with checkpoints = the parameters "
               "before each step followed by the final model (len(steps) + 1).")
        raise DattriValueError(msg)
    out = []
    for t, st in enumerate(steps):
        try:
            idx, lr = st
            idx = [int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)]
            lr = float(lr)
        except (TypeError, ValueError) as e:
            msg = f"steps[{t}]={st!r} must be (indices of the minibatch, learning_rate)."
            raise DattriValueError(msg) from e
        if not idx or lr < 0:
            msg = f"steps[{t}]: the minibatch must be non-empty and learning_rate >= 0, got {st!r}."
            raise DattriValueError(msg)
        out.append((idx, lr))
    return out


class _LiveParams:
    """What :class:`BatchedGrads` reads of a task, without loading a checkpoint: the
    model and the selected parameters' names and shapes, in ``names``' order (the
    columns of the gradients)."""

    def __init__(self, task: AttributionTask, names: list[str]) -> None:
        self.task, self.names = task, names

    def get_model(self) -> torch.nn.Module:
        return self.task.get_model()

    def param_spec(self, layer_name: Any = None) -> ParamSpec:
        shapes = dict(self.get_model().named_parameters())
        return ParamSpec({n: shapes[n] for n in self.names})


class _StepGrads:
    """Per-example gradients ``(B, P)`` of SGD steps at the parameters passed to each
    call, from one batched forward and backward.

    The batched path is compared with autograd on each of the first few examples
    once, on the first batch of two or more examples (a batch of one cannot show a
    loss that couples the examples), and again only when a module's ``training``
    flag changes; every call then runs at the parameters it is given. A call
    returns ``None`` where the path is declined (the caller's ``vmap(grad)`` then;
    ``refuted`` after a call: declined because the check failed). ``counts`` says
    how many calls were computed batched / declined.
    """

    def __init__(self, task: AttributionTask, names: list[str]) -> None:
        self.view, self.names = _LiveParams(task, names), names
        self._bg: Any = False  # built on first use (False = not yet)
        self._ok: dict[tuple[bool, ...], bool] = {}
        self._warned = False
        self.refuted = False
        self.counts = {"batched": 0, "declined": 0}

    def __call__(self, func: Any, batch: Any, params: dict[str, torch.Tensor],
                 seed: Any) -> torch.Tensor | None:
        self.refuted = False
        g = self._run(func, batch, params, seed)
        self.counts["declined" if g is None else "batched"] += 1
        return g

    def _run(self, func: Any, batch: Any, params: dict[str, torch.Tensor],
             seed: Any) -> torch.Tensor | None:
        from dattri._convention import is_unbatched

        if is_unbatched(func):  # hooks cannot see inside a per-example vmap
            return None
        if self._bg is False:
            bg = BatchedGrads(self.view, None)
            self._bg = bg if bg.supported else None
        if self._bg is None:
            return None
        key = tuple(m.training for m in self.view.get_model().modules())
        if key not in self._ok:
            small = _head(batch)
            if batch_size_of(small) < 2:
                return None  # decided on a later step
            self._ok[key] = self._verify(func, small, params, seed)
        if not self._ok[key]:
            self.refuted = True
            return None
        with seed():
            return self._bg.run(func, batch, params)

    def _verify(self, func: Any, small: Any, params: dict[str, torch.Tensor], seed: Any) -> bool:
        try:
            with seed():
                got = self._bg.run(func, small, params)
        except (RuntimeError, ValueError, TypeError, IndexError):
            got = None  # the hooks do not fit this model
        ok = got is not None and close_per_example(
            got, reference_grads(func, small, params, self.names, seed))
        if not ok and not self._warned:
            self._warned = True
            warn_user(
                "DVEmb step gradients: the batched per-example gradients differ from "
                "autograd on single examples (a loss coupling the examples of a batch, "
                "BatchNorm in training mode...), so every step uses vmap(grad) over "
                "examples (slower).")
        return ok


class DVEmbAttributor(BaseAttributor):
    """Data value embeddings of an SGD trajectory (see the module docstring).

    Args:
        task: checkpoints ``[theta_0, ..., theta_{T-1}, theta_T]``: the parameters
            before each of the ``T`` steps, then the final model; its loss is the
            per-batch mean that SGD minimised.
        steps: ``T`` pairs ``(indices, learning_rate)``: the positions (in the
            training loader's order) of step ``t``'s minibatch and its learning rate.
        proj_params: ``DVEmbProjectionParams`` / dict / ``None``; a ``proj_dim``
            (``proj_dim_per_layer``) projects the whole gradient to that many
            dimensions, ``None`` or ``proj_type="identity"`` keeps it exact.
        layer_name: restrict to these parameters.
        device: computation device.
    """

    _shardable = True

    @property
    def _cache_uses_checkpoints(self) -> bool:
        # the recording workflow scores with the model's live parameters, not the
        # task's checkpoints (which the training loop changes)
        return self.steps is not None

    def __init__(
        self, task: AttributionTask, steps: Sequence[tuple[Sequence[int], float]] | None = None,
        proj_params: Any = None, layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu", *, proj_dim: int | None = None,
        proj_seed: int | None = None, factorization_type: str = "none",
        layer_names: str | Sequence[str] | None = None,
    ) -> None:
        if isinstance(steps, int) and not isinstance(steps, bool):  # 0.3.0: (task, proj_dim, ...)
            steps, proj_dim = None, steps if proj_dim is None else proj_dim
        from dattri._convention import model_style_task
        from dattri.algorithm.logra import parse_params, published_names, published_proj_dim
        from dattri.params.projection import DVEmbProjectionParams

        task = model_style_task(task, device)  # loss_func(model, batch, device) too
        layer_name = self._factorized_layers(task, factorization_type,
                                             published_names(layer_name, layer_names))
        super().__init__(task, layer_name, device)
        self.steps = None if steps is None else _check_steps(steps, self.num_checkpoints)
        proj_params = published_proj_dim(proj_params, proj_dim)
        if proj_seed is not None:
            proj_params = {**(proj_params or {}), "proj_seed": proj_seed}
        self.proj_params = parse_params(proj_params, DVEmbProjectionParams)
        pp = self.proj_params
        if pp.proj_dim_per_layer is not None:  # a dimension given means project
            from dattri.func.projection import get_projector

            kind = "normal" if pp.proj_type == "identity" else pp.proj_type
            state: dict[int, Any] = {}

            def project(g: torch.Tensor, ckpt: int) -> torch.Tensor:  # noqa: ARG001
                if "p" not in state:  # one projection for every step
                    state["p"] = get_projector(kind, g.shape[1], pp.proj_dim_per_layer,
                                               seed=pp.proj_seed,
                                               max_batch_size=pp.proj_max_batch_size)
                return state["p"].project(g, 0)

            self.train_features.transform = project
            self.test_features.transform = project
        self._emb: torch.Tensor | None = None
        self._recorded: dict[int, list[tuple[torch.Tensor, float, torch.Tensor]]] = {}
        self._epoch_emb: dict[int, torch.Tensor] = {}
        #: step gradients from one batched forward/backward where verified
        self.use_batched = True
        self._steppers: dict[tuple[str, ...], _StepGrads] = {}

    @staticmethod
    def _factorized_layers(task: AttributionTask, factorization_type: str, layer_name: Any) -> Any:
        """``factorization_type="kronecker"|"elementwise"`` (published): the gradients of
        the named ``nn.Linear`` modules (all of them by default), computed exactly."""
        choices = ("none", "kronecker", "elementwise")
        if factorization_type not in choices:
            msg = f"factorization_type={factorization_type!r} must be one of {choices}."
            raise DattriValueError(msg)
        if factorization_type == "none":
            return layer_name
        from dattri.algorithm._hooks import resolve_linear_modules

        return resolve_linear_modules(task, layer_name)[2]

    # ------------------------------------------------- the published recording workflow
    def _stepper(self, names: list[str]) -> _StepGrads:
        """The batched step gradients of these columns (one verification each)."""
        key = tuple(names)
        if key not in self._steppers:
            self._steppers[key] = _StepGrads(self.task, names)
        return self._steppers[key]

    def _live_grads(self, batch: Any) -> torch.Tensor:
        """Per-example gradients ``(B, k)`` at the model's current parameters."""
        from torch.func import grad, vmap

        from dattri._convention import BatchedFunction
        from dattri._loader import to_device
        from dattri.task import batch_of_one

        model = self.task.get_model()
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        names = list(params) if self.layer_name is None else (
            [self.layer_name] if isinstance(self.layer_name, str) else list(self.layer_name))
        batch = to_device(batch, self.device)
        loss = self.task.original_loss_func
        if isinstance(loss, BatchedFunction):
            loss.resolve(params, batch)
        flat = None
        # an active dropout layer: the recorded step draws a mask per example
        if self.use_batched and not active_dropout(model):
            flat = self._stepper(names)(loss, batch, params,
                                        lambda: ensemble_rng(0, self.device))
        if flat is None:
            def one(sel: dict, example: Any) -> torch.Tensor:
                return loss({**params, **sel}, batch_of_one(example)).reshape(())

            g = vmap(grad(one), in_dims=(None, 0), randomness="different")(
                {n: params[n] for n in names}, batch)
            flat = torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1)
        flat = flat.detach()
        transform = self.train_features.transform
        return transform(flat, 0) if transform is not None else flat

    def cache_gradients(self, epoch: int, batch_data: Any, indices: Any, learning_rate: float) -> None:
        """Record one SGD step (call it before ``optimizer.step()``): the per-example
        gradients of ``batch_data`` at the current parameters, the examples' training
        indices and the step's learning rate."""
        idx = torch.as_tensor(indices).reshape(-1).long()
        g = self._live_grads(batch_data)
        if g.shape[0] != idx.numel():
            msg = (f"indices has {idx.numel()} entries but batch_data has {g.shape[0]} "
                   "examples; pass one training index per example of the batch.")
            raise DattriValueError(msg)
        if float(learning_rate) < 0:
            msg = f"learning_rate={learning_rate!r} must be >= 0."
            raise DattriValueError(msg)
        self._recorded.setdefault(int(epoch), []).append((idx, float(learning_rate), g))

    @contextlib.contextmanager
    def cache_gradients_context(self, epoch: int, batch_data: Any, indices: Any,
                                learning_rate: float) -> Iterator[DVEmbAttributor]:
        """``with att.cache_gradients_context(epoch, batch, indices, lr): optimizer.step()``:
        records the step's gradients on entry, at the parameters before the step."""
        self.cache_gradients(epoch, batch_data, indices, learning_rate)
        yield self

    def clear_cache(self) -> None:
        """Drop the recorded gradients (the embeddings are kept)."""
        self._recorded = {}

    def cache(self, train_loader: Iterable | None = None, learning_rates: dict | None = None,
              memory_saving: bool = True, *, gradients: dict | None = None) -> DVEmbAttributor:
        """With ``steps``: the embeddings of the trajectory on ``train_loader``. In the
        recording workflow: ``cache()`` computes them from the recorded steps;
        0.3.0's ``gradients={epoch: [G_t (B_t, k)]}`` / ``learning_rates={epoch: [eta_t]}``
        replace the recorded ones step by step (the recorded indices are kept), and
        ``memory_saving`` drops the recorded gradients afterwards."""
        if isinstance(train_loader, dict):  # 0.3.0's cache(gradients, learning_rates, ...)
            train_loader, gradients = None, train_loader
        if gradients is not None or learning_rates is not None:
            self._replace_recorded(gradients or {}, learning_rates or {})
        if train_loader is not None or self.steps is not None:
            if train_loader is None or self.steps is None:
                msg = ("DVEmbAttributor: pass steps= and cache(train_loader), or record "
                       "steps with cache_gradients(...) and call cache() without a loader.")
                raise DattriValueError(msg)
            return super().cache(train_loader)
        if not self._recorded:
            msg = "no steps recorded: call cache_gradients(epoch, batch, indices, lr) during training first."
            raise NotCachedError(msg)
        n = 1 + max(int(i.max()) for steps in self._recorded.values() for i, _, _ in steps)
        k = next(iter(self._recorded.values()))[0][2].shape[1]
        first = next(iter(self._recorded.values()))[0][2]
        K = first.new_zeros(k, k)
        self._epoch_emb = {}
        for epoch in sorted(self._recorded, reverse=True):
            emb = first.new_zeros(n, k)
            for idx, lr, g in reversed(self._recorded[epoch]):
                e = (lr / len(idx)) * (g - g @ K.T)
                K += e.T @ g
                emb.index_add_(0, idx.to(emb.device), e)
            self._epoch_emb[epoch] = emb
        self._emb = torch.stack(list(self._epoch_emb.values())).sum(0)
        self._cached = True
        if memory_saving:
            self.clear_cache()
        return self

    def _replace_recorded(self, gradients: dict, learning_rates: dict) -> None:
        for epoch in set(gradients) | set(learning_rates):
            steps = self._recorded.get(int(epoch))
            if steps is None:
                msg = (f"gradients/learning_rates name epoch {epoch!r}, which cache_gradients "
                       f"did not record (recorded: {sorted(self._recorded)}).")
                raise DattriValueError(msg)
            gs = gradients.get(epoch, [g for _, _, g in steps])
            lrs = learning_rates.get(epoch, [lr for _, lr, _ in steps])
            if len(gs) != len(steps) or len(lrs) != len(steps):
                msg = (f"epoch {epoch}: {len(steps)} recorded steps but {len(gs)} gradients "
                       f"and {len(lrs)} learning rates given; pass one per step.")
                raise DattriValueError(msg)
            self._recorded[int(epoch)] = [(idx, float(lr), torch.as_tensor(g).to(self.device))
                                          for (idx, _, _), lr, g in zip(steps, lrs, gs)]

    def _cache(self, train_loader: Iterable) -> None:
        from dattri.algorithm._scored import refuse_sharded_dropout

        refuse_sharded_dropout(self, "DVEmbAttributor")  # per-rank masks would differ
        data = DataCache(train_loader, self.device)
        bad = sorted({i for idx, _ in self.steps for i in idx if not 0 <= i < data.n})
        if bad:
            msg = f"steps index training examples {bad[:5]} outside 0..{data.n - 1} (the loader has {data.n})."
            raise DattriValueError(msg)
        pool = tree_map(lambda *xs: torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0],
                        *data.batches)
        lo, hi = data.row_start, data.row_start + data.n_local  # this rank's global rows
        grads, where = [], []
        for t, (idx, _) in enumerate(tqdm(self.steps, desc="step grads", leave=False,
                                          disable=None)):
            ix = torch.tensor(idx, device=self.device)
            ix = ix[(ix >= lo) & (ix < hi)] - lo  # the step's examples held here
            where.append(ix)
            grads.append(self._step_features(slice_batch(pool, ix), t) if ix.numel() else None)
        k, dtype = self._feature_shape(grads, data)
        K = torch.zeros(k, k, dtype=dtype, device=self.device)
        emb = K.new_zeros(data.n_local, k)
        for t in range(len(self.steps) - 1, -1, -1):
            idx, lr = self.steps[t]
            g = grads[t] if grads[t] is not None else K.new_zeros(0, k)
            e = (lr / len(idx)) * (g - g @ K.T)
            K += data.reduce(e.T @ g)  # the step's sum over the ranks' examples
            emb.index_add_(0, where[t], e)
        self._emb = emb
        self._data_shard = data.shard

    def _step_features(self, batch: Any, t: int) -> torch.Tensor:
        """Features of step ``t``'s examples at ``theta_t`` (checkpoint ``t``)."""
        from dattri._convention import BatchedFunction

        g = None
        if self.use_batched:
            task = self.task
            task.load_checkpoint(t, self.device, force=True)  # the model may be shared
            task.validate_batch(batch, "loss", t)
            loss, params = task.original_loss_func, dict(task.named_parameters)
            if isinstance(loss, BatchedFunction):
                loss.resolve(params, batch)
            stepper = self._stepper(task._resolve_layer_name(self.layer_name))
            g = stepper(loss, batch, params, lambda: ensemble_rng(t, self.device))
            if g is None and stepper.refuted:  # checked once: no check per checkpoint
                g = self.train_features.vmapped(batch, t)
        if g is None:  # the featurizer's paths (verified per checkpoint) or vmap(grad)
            return self.train_features.batch(batch, t)
        g = _check_finite(g, f"loss gradients (checkpoint {t})")
        transform = self.train_features.transform
        return transform(g, t) if transform is not None else g

    def _feature_shape(self, grads: list[torch.Tensor | None], data: DataCache) -> tuple[int, torch.dtype]:
        """The features' width and dtype, agreed on by the ranks (a rank holding no
        example of any step has computed none)."""
        mine = next((g for g in grads if g is not None), None)
        if data.shard is None:
            return mine.shape[1], mine.dtype
        kinds = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        info = torch.tensor([[-1, -1] if mine is None else [mine.shape[1], kinds.index(mine.dtype)]])
        k, code = max(all_gather_rows(info, data.shard).tolist())
        return k, kinds[code]

    def embeddings(self) -> torch.Tensor:
        """The summed data value embeddings ``(n_train, k)`` (after ``cache``); under
        ``torch.distributed`` (with ``steps``) gathered from the ranks, so every rank
        must call it."""
        if self._emb is None:
            msg = "embeddings needs cache(train_loader) first."
            raise NotCachedError(msg)
        return all_gather_rows(self._emb, getattr(self, "_data_shard", None))

    def attribute(self, train_loader: Iterable | None = None, test_loader: Iterable | None = None,
                  epoch: int | None = None, train_data_indices: Sequence[int] | None = None,
                  top_k: int | None = None) -> torch.Tensor | TopK:
        """Scores ``(n_train, n_test)`` = ``<e(z_i), g_target(z_j; theta_T)>``.

        In the recording workflow ``attribute(test_loader, epoch=None,
        train_data_indices=None)``: the test gradients at the model's current
        parameters, the embeddings of one ``epoch`` (default: summed), the rows of
        ``train_data_indices`` (default: all recorded indices ``0..max``).
        ``top_k=k``: the :class:`~dattri.topk.TopK` of each test example, ranked from
        blocks of embedding rows (no ``n_train x n_test`` matrix), merged over ranks.
        """
        k = check_top_k(top_k)
        if self.steps is None:  # attribute(test_loader, epoch, train_data_indices)
            if test_loader is not None and not isinstance(test_loader, Iterable):
                test_loader, epoch, train_data_indices = None, test_loader, epoch
            emb, gt = self._recorded_sides(test_loader or train_loader, epoch, train_data_indices)
            return emb @ gt.T.to(emb.dtype) if k is None else ranked(_row_blocks(emb, gt, 0), k, None)
        self._check_pair(train_loader, test_loader)
        self._ensure_cached(train_loader)
        final = self.num_checkpoints - 1
        gt = self.test_features.all(test_loader, final, "test grads")
        if k is not None:
            start = row_range(self._emb.shape[0], self._shard())[0]  # this rank's rows
            return ranked(_row_blocks(self._emb, gt, start), k, self._shard())
        return self._gather(self._emb @ gt.T.to(self._emb.dtype))  # this rank's rows

    def self_attribute(self, train_loader: Iterable) -> torch.Tensor:
        """``<e(z_i), g_target(z_i; theta_T)>`` as ``(n_train,)``."""
        self._ensure_cached(train_loader)
        gt = self.test_features.all(self._local(train_loader), self.num_checkpoints - 1,
                                    "self grads")
        return self._gather((self._emb * gt.to(self._emb.dtype)).sum(dim=1))

    def _recorded_sides(self, test_loader: Iterable, epoch: int | None,
                        train_data_indices: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings and test gradients of the recording workflow's scores."""
        from dattri._loader import check_loader

        if not self._epoch_emb:
            msg = "DVEmbAttributor.attribute needs cache() after cache_gradients(...) first."
            raise NotCachedError(msg)
        check_loader(test_loader, "test_loader")
        if epoch is not None and epoch not in self._epoch_emb:
            msg = f"epoch={epoch!r} was not recorded; recorded epochs: {sorted(self._epoch_emb)}."
            raise DattriValueError(msg)
        emb = self._emb if epoch is None else self._epoch_emb[epoch]
        if train_data_indices is not None:
            emb = emb[torch.as_tensor(list(train_data_indices), device=emb.device).long()]
        gt = torch.cat(map_batches(test_loader, self._live_grads, "test_loader", self.device))
        return emb, gt


def _row_blocks(emb: torch.Tensor, gt: torch.Tensor, start: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(global_row_start, scores)`` of blocks of embedding rows."""
    rows = block_rows(emb.shape[1], gt.shape[0])
    g = gt.T.to(emb.dtype)
    for i in range(0, emb.shape[0], rows):
        yield start + i, emb[i:i + rows] @ g
