"""Influence functions (Koh & Liang 2017) with several inverse-Hessian solvers.

For training example i and test example j, with ``H`` the Hessian of the mean
training loss over the cached training set (at each checkpoint),

    tau(i, j) = g_loss(z_i)^T (H + lambda I)^{-1} g_target(z_j),

averaged over checkpoints. Positive = proponent: up-weighting z_i lowers the
test target. RelatIF (Barshan et al. 2020) divides by a training-side norm:
``"l"``: sqrt(g_i^T H^{-1} g_i); ``"theta"``: ||H^{-1} g_i||.

The solvers differ only in how ``V -> V (H + lambda I)^{-1}`` is applied, which is
always done for all right-hand sides together, once per checkpoint and test set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.func import grad, jvp, vjp, vmap

from dattri._loader import batches, count_examples
from dattri.algorithm._engine import DataCache
from dattri.algorithm._loop import LoaderFeatures
from dattri.algorithm._score import checkpoint_batches, score_blocks, started
from dattri.algorithm._scored import (
    aligned_blocks,
    block_rows,
    check_store_args,
    check_top_k,
    fill,
    refuse_sharded_dropout,
)
from dattri.algorithm.base import BaseAttributor
from dattri.distributed import all_gather_rows, broadcast, row_range
from dattri.errors import DattriValueError, InvalidLossError, MemoryBudgetError
from dattri.func.hessian import ihvp_arnoldi, ihvp_cg, ihvp_explicit, ihvp_lissa
from dattri.linalg.operators import EigenbasisPreconditioner, Preconditioner
from dattri.model_util.dropout import active_dropout
from dattri.task import AttributionTask
from dattri.topk import TopK

#: the published table of the inverse-HVP builders behind the IF attributors
#: (``dattri.func.hessian``: ``f(func, argnums, **settings) -> ihvp(x, v)``)
SUPPORTED_IHVP_SOLVER = {"explicit": ihvp_explicit, "cg": ihvp_cg, "arnoldi": ihvp_arnoldi,
                         "lissa": ihvp_lissa}

__all__ = [
    "SUPPORTED_IHVP_SOLVER",
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorExplicit",
    "IFAttributorLiSSA",
]

_MODES = ("rev-rev", "rev-fwd")
_RELATIF = (None, "l", "theta")


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        msg = f"{name}={value!r} is not supported; choose one of {list(choices)}."
        raise DattriValueError(msg)


def _check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or value < 0:
        msg = f"{name}={value!r} must be a number >= 0."
        raise DattriValueError(msg)


def _nonzero(n: torch.Tensor) -> torch.Tensor:
    """RelatIF norms: a zero norm (a zero gradient) divides by 1; any other, however
    small, divides (no absolute floor, so a scaled loss gives the same ranking)."""
    return torch.where(n > 0, n, torch.ones_like(n))


def _member_masks(loss: Callable, model: torch.nn.Module, ckpt: int,
                  device: torch.device) -> Callable:
    """``loss`` of a dropout ensemble's member ``ckpt``: every call draws the member's
    masks from the seed of its checkpoint (``ensemble_rng``), one mask for all the
    examples of a batch (as the per-example gradients draw them), so the curvature
    is that of the member's fixed network: the same in every Hessian-vector product
    and batch, and independent of the caller's random state."""
    from dattri.algorithm._batched import _same_mask_dropout
    from dattri.algorithm._loop import ensemble_rng

    def member(theta: torch.Tensor, batch: Any) -> torch.Tensor:
        with ensemble_rng(ckpt, device), _same_mask_dropout(model):
            return loss(theta, batch)
    return member


def hvp_matmat(
    loss: Callable, theta: torch.Tensor, batch: Any, mode: str = "rev-rev", chunk: int = 128,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V (k, P) -> rows of H_b V`` for the mean loss of one batch.

    ``rev-fwd`` is forward-over-reverse (``jvp`` of ``grad``), ``rev-rev`` is
    reverse-over-reverse (``vjp`` of ``grad``); both give the exact Hessian.
    ``rev-rev`` records the gradient graph once and replays only its backward per
    call, which is several times cheaper when many products share one batch.
    """
    g = grad(lambda t: loss(t, batch))
    if mode == "rev-rev":
        return _RevRev(loss, theta, batch, chunk)
    # a dropout ensemble's loss draws its member's mask once per call (see
    # _IFBase._loss_and_theta): the same for every direction
    return vmap(lambda v: jvp(g, (theta,), (v,))[1], chunk_size=chunk, randomness="same")


#: up to this many vectors a product is a loop of plain autograd passes over the
#: recorded gradient graph: no torch.func transform, whose first use in a process
#: imports ~1-2 s of compiler modules (Arnoldi multiplies one vector at a time). On
#: MNIST LR, 100 vectors: the loop 0.13 s, vmap 0.12 s (0.94 s on first use)
FEW_VECTORS = 128


#: bytes of recorded gradient graphs that one curvature operator over a training set
#: (:func:`dataset_matmat`) keeps between its products, one graph per batch. A graph
#: holds the batch's activations and what its backward saved for the second
#: derivative: small for an MLP, but 0.79 GB for a batch of 64 CIFAR images through
#: ResNet-9 (``benchmarks/hvp_graphs.py``), so CIFAR-2's 5,000 examples would keep
#: 62 GB. The batches past the budget multiply forward-over-reverse (``jvp`` of
#: ``grad``), which keeps no graph (:class:`_RevRev`).
GRAPH_BYTES = 4 << 30


class _SavedBytes:
    """Context: the bytes of the distinct storages autograd saves for backward while
    it is open (a recorded graph's memory, the parameters and inputs included)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self._seen: set[tuple[int, str]] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += storage.nbytes()
        return t

    def __enter__(self) -> _SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class _RevRev:
    """``V (k, P) -> H_b V`` by reverse-over-reverse, the gradient graph recorded
    once: plain ``autograd.grad`` per vector for ``k <= FEW_VECTORS``, ``vmap`` of
    ``torch.func.vjp`` (recorded on first use) above. With ``keep=False`` (past the
    operator's :data:`GRAPH_BYTES`) no graph outlives a call: one vector at a time is
    multiplied forward-over-reverse (``jvp`` of ``grad``: on ResNet-9 at batch 64
    5.1 s a product, against 6.3 s for recording the graph again and 4.8 s for
    replaying a kept one), or, where forward-mode AD fails, by a graph recorded for
    the call and freed after it."""

    def __init__(self, loss: Callable, theta: torch.Tensor, batch: Any, chunk: int) -> None:
        self.loss, self.theta, self.batch, self.chunk = loss, theta, batch, chunk
        self._graph: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batched: Callable | None = None
        self.keep = True
        self._fwd: Callable | None | bool = None  # grad for jvp; False: forward mode failed

    def record(self) -> int:
        """Record the gradient graph now; its bytes (:class:`_SavedBytes`), or 0 when
        the loss runs a ``torch.func`` transform of its own, which refuses saved-tensor
        hooks (its graph is then recorded without them and not counted)."""
        th = self.theta.detach().requires_grad_(True)

        def recorded() -> torch.Tensor:
            with torch.enable_grad():
                return torch.autograd.grad(self.loss(th, self.batch), th, create_graph=True)[0]

        try:
            with _SavedBytes() as saved:
                g = recorded()
        except RuntimeError as e:
            if "saved tensor hooks" not in str(e):
                raise
            g, saved = recorded(), _SavedBytes()  # nothing counted
        self._graph = (th, g)
        return saved.nbytes

    def _rerecorded(self, product: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``product()``, recording the graph again if the one kept is stale: loading
        a checkpoint (again) copies into the model's frozen parameters and buffers in
        place, which the recorded graph saved (autograd then refuses to replay it)."""
        try:
            return product()
        except RuntimeError as e:
            if "modified by an inplace operation" not in str(e):
                raise
            self._graph, self._batched = None, None
            return product()

    def _one(self, v: torch.Tensor, last: bool = True) -> torch.Tensor:
        if not self.keep and self._graph is None and self._fwd is not False:
            h = self._forward_over_reverse(v)
            if h is not None:
                return h
        return self._rerecorded(lambda: self._one_recorded(v, last))

    def _forward_over_reverse(self, v: torch.Tensor) -> torch.Tensor | None:
        """``H v`` by ``jvp`` of ``grad`` (no graph kept); None where forward-mode AD
        fails on the loss (an operator without a forward derivative), which then
        records graphs instead, from this call on."""
        try:
            if self._fwd is None:
                self._fwd = grad(lambda t: self.loss(t, self.batch))
            return jvp(self._fwd, (self.theta,), (v,))[1].detach()
        except (RuntimeError, NotImplementedError):
            self._fwd = False
            return None

    def _one_recorded(self, v: torch.Tensor, last: bool) -> torch.Tensor:
        if self._graph is None:
            self.record()
        th, g = self._graph
        retain = self.keep or not last  # the last vector of a call frees a graph not kept
        # d(g . v)/dtheta = H v; not grad_outputs=v: a tensor there makes autograd
        # import torch.fx's symbolic shapes (sympy) on first use, 0.25-0.4 s of a
        # process (MNIST LR IF-CG at batch 1,000: 0.50 s in all)
        (h,) = torch.autograd.grad((g * v).sum(), th, retain_graph=retain, allow_unused=True)
        if not retain:
            self._graph = None
        return torch.zeros_like(v) if h is None else h.detach()

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] <= FEW_VECTORS:
            k = v.shape[0]
            return torch.stack([self._one(row, i == k - 1) for i, row in enumerate(v)])
        def product() -> torch.Tensor:
            if self._batched is None:
                _, pull = vjp(grad(lambda t: self.loss(t, self.batch)), self.theta)
                self._batched = vmap(lambda u: pull(u)[0], chunk_size=self.chunk)
            return self._batched(v)
        try:
            return self._rerecorded(product)
        finally:
            if not self.keep:  # nothing outlives the call (the graph of _budget_graphs)
                self._batched, self._graph = None, None


def dataset_matmat(
    loss: Callable, theta: torch.Tensor, data: DataCache, mode: str = "rev-rev",
    first_batches: int | None = None, structure: tuple[AttributionTask, Any, int] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V -> V H`` with H the Hessian of the mean loss over ``data`` (its first
    ``first_batches`` batches when given).

    On one rank's part of the training set (``data.shard``) the products of the
    rank's batches are summed over the ranks: every rank must call it with the
    same ``V`` (then every rank gets the same result).

    ``structure=(task, layer_name, ckpt)`` (the task with checkpoint ``ckpt``
    loaded, ``loss`` its loss over ``layer_name``): when the selection is one
    ``nn.Linear`` (logistic regression, a last layer), ``H`` is applied from the
    cached layer inputs and output Hessians by batched products, no autograd
    (:func:`~dattri.algorithm._linear_hessian.linear_layer_matmat`), after they
    agree with these Hessian-vector products on two random vectors; otherwise
    (or when they disagree) by Hessian-vector products."""
    idx = data.local_batches(first_batches)
    n = data.count(idx)
    ops = [(hvp_matmat(loss, theta, data.batches[i], mode), data.sizes[i] / n) for i in idx]
    unbudgeted = mode == "rev-rev"  # the graphs' budget is still to be applied

    def matmat(v: torch.Tensor) -> torch.Tensor:
        nonlocal unbudgeted
        if unbudgeted:
            unbudgeted = False
            _budget_graphs([op for op, _ in ops], [data.sizes[i] for i in idx])
        vv = v.unsqueeze(0) if v.dim() == 1 else v
        out = torch.zeros_like(vv)
        for op, w in ops:
            out.add_(op(vv), alpha=w)
        return data.reduce(out).reshape(v.shape)

    matmat.ops = [op for op, _ in ops]  # the batches' products (their graphs), for tests
    if structure is not None:
        from dattri.algorithm._linear_hessian import linear_layer_matmat

        task, layer_name, ckpt = structure
        names = task._resolve_layer_name(layer_name)
        fast = linear_layer_matmat(task, names, data, ckpt, matmat, theta, idx, n)
        if fast is not None:
            return fast  # the check's recorded gradient graphs go with ``matmat``
    # an MLP's products over the whole training set stay with autograd: the chain's
    # R-operator (LiSSA's minibatches) was slower there at 500 directions (MNIST MLP
    # 5,000 x 500, CG: 90 s autograd, 103 s chain), faster only at 100
    return matmat


def _budget_graphs(ops: list[_RevRev], sizes: list[int]) -> None:
    """Keep the recorded graphs of the first batches within :data:`GRAPH_BYTES`: the
    first batch's graph is recorded now and measured, the others are taken to cost
    as much per example; those past the budget keep none (:class:`_RevRev`)."""
    if not ops:
        return
    per_example = ops[0].record() / max(sizes[0], 1)
    total = 0.0
    for op, size in zip(ops, sizes):
        total += per_example * size
        op.keep = total <= GRAPH_BYTES


class _IFBase(BaseAttributor):
    """Shared IF logic: subclasses implement ``_fit(ckpt)`` and ``_ihvp(V, ckpt)``.

    ``attribute`` scores the train loader it is given (the curvature is that of
    the cached training set).

    Under ``torch.distributed`` (:mod:`dattri.distributed`) each rank caches its
    share of the training loader, the curvature is summed over the ranks (HVPs,
    Hessians, Kronecker factors) and the score rows are gathered."""

    _scores_given_train = True
    _uses_preconditioner = True
    _shardable = True

    def __init__(self, task: AttributionTask, layer_name=None, device="cpu") -> None:
        super().__init__(task, layer_name, device)
        self.data: DataCache | None = None
        self._state: dict[int, Any] = {}

    def _cache(self, train_loader: Iterable) -> None:
        self.data = DataCache(train_loader, self.device)
        self._state, self._preconditioners = {}, {}  # nothing stale if a fit fails
        self._state = dict(enumerate(self.ensemble.each(self._fit)))
        self._preconditioners = dict(enumerate(self.ensemble.each(self._precondition)))

    def _precondition(self, ckpt: int) -> Preconditioner:
        """Checkpoint ``ckpt``'s preconditioner (after :meth:`_fit`): by default the
        method's :meth:`_solve`; structured operators override this."""
        return Preconditioner(lambda v: self._solve(v, ckpt),
                              self.task.param_spec(self.layer_name).numel, type(self).__name__)

    def _solve(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        raise NotImplementedError

    def _loss_and_theta(self, ckpt: int) -> tuple[Callable, torch.Tensor]:
        task = self.task
        task.load_checkpoint(ckpt, self.device, force=True)
        theta, _ = task.get_param(ckpt, self.layer_name)
        for batch in self.data.batches:  # the first with a nonzero loss tells the reduction
            task.validate_batch(batch, "loss", ckpt)
            if task.reduction_known("loss"):
                break
        if task.reduction("loss") == "sum":
            msg = (f"loss_func sums over the batch (reduction='sum': on a training batch it "
                   f"returns the sum of its parts' losses); {type(self).__name__}'s curvature is "
                   "the Hessian of the mean training loss, which a sum would scale by each "
                   "batch's size. Return the batch mean (reduction='mean', or divide the sum "
                   "by the batch size).")
            raise InvalidLossError(msg)
        loss = task.get_loss_func(self.layer_name, ckpt)
        model = task.get_model()
        if active_dropout(model):
            loss = _member_masks(loss, model, ckpt, self.device)
        return loss, theta.to(self.device)

    def _fit(self, ckpt: int) -> Any:
        raise NotImplementedError

    def _ihvp(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        """``v (H_ckpt + lambda I)^{-1}`` on rows (the checkpoint's preconditioner)."""
        return self._preconditioners[ckpt].solve(v)

    def attribute(
        self, train_loader: Iterable, test_loader: Iterable,
        relatif_method: str | None = None, top_k: int | None = None,
    ) -> torch.Tensor | TopK:
        """Influence scores ``(n_train, n_test)`` (see module docstring).

        Args:
            train_loader: training data (fixed order).
            test_loader: test data (fixed order).
            relatif_method: ``None``, ``"l"`` or ``"theta"`` (RelatIF).
            top_k: instead of the score matrix, each test example's ``top_k``
                proponents and opponents (a :class:`dattri.topk.TopK`): the test side
                (the inverse-Hessian products of the test gradients, or what the
                method's score factorises into) is computed once, then the training
                rows are scored one batch (or stored block) at a time and ranked as
                they come (merged over the ranks): the ``n_train x n_test`` matrix is
                never formed.
        """
        self._check_pair(train_loader, test_loader)
        _check_choice("relatif_method", relatif_method, _RELATIF)
        top_k = check_top_k(top_k)
        train_loader = self._local(train_loader)
        self._ensure_cached(train_loader)
        blocks = self._score_blocks(train_loader, test_loader, relatif_method, top_k is not None)
        return self._finish(blocks, top_k)

    def _test_side(self, test_loader: Iterable) -> list[torch.Tensor]:
        """``(H_c + lambda I)^{-1} g_target`` of every test example, per checkpoint."""
        return self.ensemble.each(lambda c: self._ihvp_owned(
            self._same_everywhere(self.test_features.all(test_loader, c, "test grads")), c))

    def _ihvp_owned(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        """:meth:`_ihvp` of a ``v`` that nobody else holds: a method may overwrite it
        instead of allocating a result of its size (500 ResNet-9 test gradients:
        9.7 GB)."""
        return self._preconditioners[ckpt].solve_owned(v)

    def _block_scores(self, g: torch.Tensor | None, xt: torch.Tensor, c: int,
                      relatif_method: str | None) -> torch.Tensor | None:
        """``g @ xt^T`` (RelatIF: divided by the rows' norms) of one block of training
        gradients ``g`` at checkpoint ``c``; ``None`` for a lockstep step without rows
        (which still takes part in a collective RelatIF solve)."""
        if relatif_method is None:
            return None if g is None else g @ xt.T.to(g.dtype)
        norm = self._relatif_norm(self._rows(g), c, relatif_method)
        return None if g is None else g @ xt.T / norm[:, None]

    def _grad_blocks(self, train_loader: Iterable) -> Iterator[list[torch.Tensor] | None]:
        """This rank's training gradients one loader batch at a time, every checkpoint's
        (``None`` for the steps that keep the ranks in lockstep, see :meth:`_lockstep`)."""
        # batches(): a TensorDataset loader read by index_select, not example by example
        # (MNIST LR 5,000 training digits: ~0.1 s of Python per pass)
        steps = self._lockstep(batches(train_loader), len(train_loader) if self._collective() else 0)
        # the scores keep nothing of a block's gradients: their buffer takes the next's
        yield from checkpoint_batches(self.train_features.batch, steps, self.ensemble, self.device,
                                      show_progress=self.train_features.show_progress,
                                      total=len(train_loader), release=self.train_features.release)

    def _kept_blocks(self, train_loader: Iterable) -> Iterator[list[torch.Tensor] | None] | None:  # noqa: ARG002
        """Kept training gradients of ``train_loader`` in blocks, like :meth:`_grad_blocks`
        (methods that keep them); ``None``: compute them."""
        return None

    def _score_blocks(self, train_loader: Iterable, test_loader: Iterable,
                      relatif_method: str | None, blocked: bool,
                      ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(global_row_start, scores (b, m))`` of this rank's training rows, averaged
        over the checkpoints: with ``blocked`` (or one checkpoint) one training batch at
        a time; otherwise one block, each checkpoint's loader pass at a time (no
        alternation between checkpoints' weights per batch)."""
        xts = self._test_side(test_loader)
        ens = self.ensemble
        start = row_range(count_examples(train_loader), self._shard())[0]
        kept = self._kept_blocks(train_loader)

        def pair(g: torch.Tensor | None, c: int) -> torch.Tensor | None:
            return self._block_scores(g, xts[c], c, relatif_method)

        if blocked or len(ens) == 1 or kept is not None:
            blocks = kept if kept is not None else self._grad_blocks(train_loader)
            yield from score_blocks(started(blocks, start), pair, ens)
            return
        yield start, ens.total(lambda c: self._checkpoint_scores(train_loader, c, pair))

    def _checkpoint_scores(self, train_loader: Iterable, c: int, pair: Callable) -> torch.Tensor:
        """Checkpoint ``c``'s scores of this rank's rows, from one pass over the loader."""
        mine = len(train_loader) if self._collective() else 0
        # pair() keeps nothing of a batch's gradients: the featurizer may write the
        # next batch into the same buffer (stream)
        grads = self._lockstep(self.train_features.stream(train_loader, c), mine)
        return torch.cat([p for p in (pair(g, c) for g in grads) if p is not None])

    # -- torch.distributed: solvers whose inverse reads the training data ---------
    #: True where ``_ihvp`` sums over the cached training data (CG, DataInf): under
    #: ``torch.distributed`` every rank then calls it on the same right-hand sides
    _ihvp_reads_data = False

    def _collective(self) -> bool:
        return self._ihvp_reads_data and self.data is not None and self.data.shard is not None

    def _same_everywhere(self, v: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``v`` on every rank (the test gradients every rank computed):
        a data-reading solver then runs identically (same iterations) everywhere."""
        return broadcast(v, self.data.shard) if self._collective() else v

    def _rows(self, g: torch.Tensor | None) -> torch.Tensor:
        """``g`` (an empty block for ``None``), for :meth:`_relatif_norm`/:meth:`_ihvp`."""
        if g is not None:
            return g
        spec = self.task.param_spec(self.layer_name)
        dtype = next(iter(self.task.named_parameters.values())).dtype
        return torch.zeros(0, spec.numel, dtype=dtype, device=self.device)

    def _lockstep(self, blocks: Iterable[Any], mine: int) -> Iterator[Any]:
        """``blocks`` (``mine`` of them), then ``None`` until every rank has had as
        many steps as the rank with the most (a data-reading ``_ihvp`` of per-rank
        blocks is collective: every rank must call it equally often)."""
        if not self._collective():
            yield from blocks
            return
        # agreed on before the first block's collectives
        steps = max(all_gather_rows(torch.tensor([mine], dtype=torch.int64), self.data.shard).tolist())
        yield from blocks
        for _ in range(steps - mine):
            yield None

    def _ihvp_rows(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        """``_ihvp`` of this rank's own rows ``v`` (each rank different): the ranks'
        rows are gathered, solved together (identically everywhere) and this rank's
        rows of the solution returned."""
        if not self._collective():
            return self._ihvp(v, ckpt)
        start, stop, _ = row_range(v.shape[0], self.data.shard)
        return self._ihvp(all_gather_rows(v, self.data.shard), ckpt)[start:stop]

    def _relatif_norm(self, g: torch.Tensor, ckpt: int, method: str) -> torch.Tensor:
        x = self._ihvp_rows(g, ckpt)
        if method == "theta":
            return _nonzero(x.norm(dim=1))
        return _nonzero((g * x).sum(dim=1).abs().sqrt())

    def self_attribute(self, train_loader: Iterable, relatif_method: str | None = None) -> torch.Tensor:
        """Self-influence ``g_loss(z_i)^T (H + lambda I)^{-1} g_target(z_i)``, ``(n_train,)``;
        with ``relatif_method`` divided by the RelatIF norm of ``g_loss(z_i)``."""
        _check_choice("relatif_method", relatif_method, _RELATIF)
        train_loader = self._local(train_loader)
        self._ensure_cached(train_loader)
        same = self.task.original_target_func is self.task.original_loss_func
        # consecutive batches solved together (a solve of 64 rows pays the solver's
        # per-step overhead for few vectors)
        width = self.task.param_spec(self.layer_name).numel
        rows = min(SELF_INFLUENCE_ROWS, max(1, SELF_INFLUENCE_BYTES // (8 * width)))
        biggest = max(self.data.sizes, default=1) if self.data is not None else 1
        per = max(1, rows // max(1, biggest))
        steps = -(-len(train_loader) // per)
        total = self.ensemble.total(
            lambda c: self._self_scores(train_loader, c, per, steps, same, relatif_method))
        return self._gather(total)

    def _self_scores(self, train_loader: Iterable, c: int, per: int, steps: int, same: bool,
                     relatif_method: str | None) -> torch.Tensor:
        """Checkpoint ``c``'s self-influence of this rank's rows, ``per`` loader batches
        solved together (``steps`` lockstep steps under a collective solver)."""
        parts = []
        targets = None if same else _grouped(self.test_features.iterate(train_loader, c, "self targets"), per)
        grads = _grouped(self.train_features.iterate(train_loader, c, "self-influence"), per)
        for g in self._lockstep(grads, steps if self._collective() else 0):
            x = self._ihvp_rows(self._rows(g), c)
            norm = None if relatif_method is None else self._relatif_norm(self._rows(g), c,
                                                                        relatif_method)
            if g is None:
                continue
            gt = g if targets is None else next(targets)
            si = (x * gt).sum(dim=1)
            parts.append(si if norm is None else si / norm)
        return torch.cat(parts)


#: training rows per self-influence solve (consecutive loader batches grouped), and
#: the bytes of one group's gradients at most
SELF_INFLUENCE_ROWS = 512
SELF_INFLUENCE_BYTES = 2**26


def _grouped(blocks: Iterable[torch.Tensor], per: int) -> Iterator[torch.Tensor]:
    """``blocks`` concatenated ``per`` at a time (in order)."""
    group: list[torch.Tensor] = []
    for b in blocks:
        group.append(b)
        if len(group) == per:
            yield torch.cat(group) if per > 1 else group[0]
            group = []
    if group:
        yield torch.cat(group)


class IFAttributorExplicit(_IFBase):
    """Influence function with the exact Hessian, factored once (Koh & Liang 2017).

    ``H`` (P x P) is formed from forward-over-reverse products with basis vectors
    and factored by Cholesky (eigen pseudo-inverse when indefinite). Refuses at
    once when ``H`` would exceed ``max_bytes`` and says what to use instead.

    Args:
        task, layer_name, device: see :class:`BaseAttributor`.
        regularization: lambda added to the diagonal.
        max_bytes: memory budget for the dense Hessian (default 4 GiB).
        hessian_store: optional dict shared by several attributors of the SAME task,
            layer selection and training data (e.g. a search over
            ``regularization``): the Hessian of each checkpoint is computed once,
            kept there, and only ``(H + lambda I)^{-1}`` is recomputed.
    """

    def __init__(
        self, task: AttributionTask, layer_name=None, device="cpu",
        regularization: float = 0.0, max_bytes: int = 4 * 2**30,
        hessian_store: dict | None = None,
    ) -> None:
        super().__init__(task, layer_name, device)
        _check_nonneg("regularization", regularization)
        if hessian_store is not None and not isinstance(hessian_store, dict):
            msg = f"hessian_store must be a dict or None, got {type(hessian_store).__name__}."
            raise DattriValueError(msg)
        self.regularization = float(regularization)
        self.max_bytes = int(max_bytes)
        self.hessian_store = hessian_store

    def _fit(self, ckpt: int) -> torch.Tensor:
        loss, theta = self._loss_and_theta(ckpt)
        p = theta.numel()
        need = p * p * theta.element_size()
        if need > self.max_bytes:
            msg = (
                f"IFAttributorExplicit: the dense Hessian of {p:,} parameters needs "
                f"{need / 2**30:.1f} GiB (budget {self.max_bytes / 2**30:.1f} GiB). "
                "Use IFAttributorCG, IFAttributorArnoldi, IFAttributorEKFAC or "
                "IFAttributorDataInf, or restrict layer_name=..."
            )
            raise MemoryBudgetError(msg)
        key = (ckpt, self.data.n, p)
        if self.hessian_store is not None and key in self.hessian_store:
            h = self.hessian_store[key]
        else:
            from dattri.algorithm._linear_hessian import linear_layer_hessian

            # one nn.Linear selected (logistic regression, a last layer): the
            # Kronecker form, checked against HVPs; otherwise basis-vector HVPs.
            # The check's operator records every batch's gradient graph, so it is
            # built only when the check runs (not when the structure is declined)
            def check(v: torch.Tensor) -> torch.Tensor:
                return dataset_matmat(loss, theta, self.data)(v)

            h = linear_layer_hessian(self.task, self.task._resolve_layer_name(self.layer_name),
                                     self.data, ckpt, check, theta)
            if h is None:
                h = dense_hessian(loss, theta, self.data)
            if self.hessian_store is not None:
                self.hessian_store[key] = h
        from dattri.linalg.solvers import factorize

        # Cholesky solves, no explicit inverse (which costs twice the factorisation
        # again: 4.7 s on top of 2.4 s for the 7,850-parameter MNIST LR)
        return factorize(h, self.regularization)

    def _solve(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        return self._state[ckpt](v).to(v.dtype)  # Cholesky solves of H + lambda I


def dense_hessian(
    loss: Callable, theta: torch.Tensor, data: DataCache, chunk: int = 256,
) -> torch.Tensor:
    """Hessian ``(P, P)`` of the mean loss over ``data`` from basis-vector HVPs."""
    p = theta.numel()
    h = torch.zeros(p, p, dtype=theta.dtype, device=theta.device)
    for batch, size in zip(data.batches, data.sizes):
        op = hvp_matmat(loss, theta, batch, "rev-rev", chunk=chunk)
        for s in range(0, p, chunk):
            e = min(p, s + chunk)
            basis = torch.zeros(e - s, p, dtype=theta.dtype, device=theta.device)
            basis[torch.arange(e - s), torch.arange(s, e)] = 1
            h[s:e].add_(op(basis), alpha=size / data.n)
    h = data.reduce(h)
    return (h + h.T) / 2


#: memory bound of an ``IFAttributorCG`` ``shift_store`` (bytes)
SHIFT_STORE_BYTES = 2 * 2**30


class IFAttributorCG(_IFBase):
    """Influence function with conjugate gradients (Martens 2010).

    Solves ``(H + lambda I) X = G_test`` for all test gradients together (block
    CG), ``max_iter`` iterations or until every residual is below ``tol``.

    Args:
        task, layer_name, device: see :class:`BaseAttributor`.
        max_iter, tol: CG iterations and relative residual tolerance.
        mode: ``"rev-rev"`` or ``"rev-fwd"`` Hessian-vector products.
        regularization: lambda added to the diagonal.
        shift_store: optional dict shared by several attributors of the SAME task,
            layer selection and training data that differ only in
            ``regularization`` (a search over it), given together with ``shifts``:
            one multi-shift CG (:func:`~dattri.linalg.cg_multishift_solve`) solves
            for every shift at the cost of one CG, and the solutions are kept there
            with their right-hand side; an attributor whose right-hand side is equal
            takes its own. Each entry holds ``len(shifts) + 1`` blocks of the
            right-hand side's size; the oldest go when they exceed
            ``SHIFT_STORE_BYTES`` (2 GiB), so a search's self-influence (one block per
            training chunk) is shared too when it fits.
        shifts: the regularizations sharing ``shift_store``; must contain
            ``regularization``.
    """

    _ihvp_reads_data = True

    def __init__(
        self, task: AttributionTask, layer_name=None, device="cpu",
        max_iter: int = 10, tol: float = 1e-7, mode: str = "rev-rev",
        regularization: float = 0.0, shift_store: dict | None = None,
        shifts: Sequence[float] | None = None,
    ) -> None:
        super().__init__(task, layer_name, device)
        _check_choice("mode", mode, _MODES)
        _check_nonneg("regularization", regularization)
        if not isinstance(max_iter, int) or max_iter < 1:
            msg = f"max_iter={max_iter!r} must be an int >= 1."
            raise DattriValueError(msg)
        if shift_store is not None and not isinstance(shift_store, dict):
            msg = f"shift_store must be a dict or None, got {type(shift_store).__name__}."
            raise DattriValueError(msg)
        if (shift_store is None) != (shifts is None):
            msg = (f"shift_store and shifts go together, got shift_store={type(shift_store).__name__}"
                   f" and shifts={shifts!r}; pass both or neither.")
            raise DattriValueError(msg)
        self.max_iter, self.tol, self.mode = max_iter, float(tol), mode
        self.regularization = float(regularization)
        self.shift_store, self.shifts = shift_store, None
        if shifts is not None:
            from dattri.linalg.solvers import _check_shifts

            self.shifts = tuple(sorted(_check_shifts(shifts)))
            if self.regularization not in self.shifts:
                msg = (f"regularization={regularization!r} is not one of shifts={shifts!r}; "
                       "add it to shifts.")
                raise DattriValueError(msg)

    def _fit(self, ckpt: int) -> Callable:
        loss, theta = self._loss_and_theta(ckpt)
        # one nn.Linear selected: batched Kronecker products, checked against HVPs
        return dataset_matmat(loss, theta, self.data, self.mode,
                              structure=(self.task, self.layer_name, ckpt))

    def _solve(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        from dattri.linalg.solvers import cg_multishift_solve, cg_solve

        if self.shift_store is None:
            return cg_solve(self._state[ckpt], v, max_iter=self.max_iter, tol=self.tol,
                            regularization=self.regularization)
        key = (ckpt, self.max_iter, self.tol, self.mode, self.shifts, tuple(v.shape),
               v.dtype, str(v.device), self.data.n)
        entries = self.shift_store.setdefault("entries", [])
        for k, v_ref, sols in entries:
            if k == key and torch.equal(v_ref, v):
                return sols[self.regularization]
        sols = cg_multishift_solve(self._state[ckpt], v, self.shifts,
                                   max_iter=self.max_iter, tol=self.tol)
        entries.append((key, v, sols))
        # bounded: oldest entries go first (self-influence solves one block per chunk)
        size = v.numel() * v.element_size() * (len(self.shifts) + 1)
        while len(entries) > 1 and size * len(entries) > SHIFT_STORE_BYTES:
            entries.pop(0)
        return sols[self.regularization]


class IFAttributorLiSSA(_IFBase):
    """Influence function with LiSSA (Agarwal et al. 2017; Koh & Liang 2017).

    Recursion ``h_t = v + (1 - damping) h_{t-1} - H_{B_t} h_{t-1} / scaling`` over
    ``recursion_depth`` minibatches ``B_t`` of ``batch_size`` training examples
    drawn with a fixed seed; result ``h_T / scaling`` averaged over ``num_repeat``,
    which approximates ``(H + damping * scaling I)^{-1} v``.

    Under ``torch.distributed`` the minibatches are still drawn from the whole
    training set (global indices, the same seed on every rank): each rank forms the
    product of the drawn examples it holds, weighted by their share of the
    minibatch, and the products are summed over the ranks (a rank holding none of
    them adds zero), so the recursion is that of one process.
    """

    _ihvp_reads_data = True

    def __init__(
        self, task: AttributionTask, layer_name=None, device="cpu",
        batch_size: int = 1, num_repeat: int = 1, recursion_depth: int = 5000,
        damping: float = 0.0, scaling: float = 50.0, mode: str = "rev-rev",
        seed: int = 0,
    ) -> None:
        super().__init__(task, layer_name, device)
        _check_choice("mode", mode, _MODES)
        for name, val in (("batch_size", batch_size), ("num_repeat", num_repeat),
                          ("recursion_depth", recursion_depth)):
            if not isinstance(val, int) or val < 1:
                msg = f"{name}={val!r} must be an int >= 1."
                raise DattriValueError(msg)
        _check_nonneg("damping", damping)
        if scaling <= 0:
            msg = f"scaling={scaling!r} must be > 0 (larger than the top Hessian eigenvalue)."
            raise DattriValueError(msg)
        self.batch_size, self.num_repeat = batch_size, num_repeat
        self.recursion_depth, self.damping, self.scaling = recursion_depth, float(damping), float(scaling)
        self.mode, self.seed = mode, seed

    def _fit(self, ckpt: int) -> Callable:
        refuse_sharded_dropout(self, "IFAttributorLiSSA")  # per-rank masks would differ
        from dattri._loader import slice_batch
        from torch.utils._pytree import tree_map

        loss, theta = self._loss_and_theta(ckpt)
        data = self.data
        pool = tree_map(
            lambda *xs: torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0],
            *data.batches,
        )
        n, gen = data.n, torch.Generator().manual_seed(self.seed)
        bs = min(self.batch_size, n)  # each minibatch: distinct examples
        lo, hi = data.row_start, data.row_start + data.n_local  # this rank's global rows
        draws = []
        for _ in range(self.recursion_depth * self.num_repeat):
            idx = torch.randperm(n, generator=gen)[:bs]
            draws.append(idx[(idx >= lo) & (idx < hi)] - lo)  # the drawn rows held here

        last: list = [None, None]  # (step, its recorded HVP or None), shared by the row blocks

        def autograd_matmat(v: torch.Tensor, step: int) -> torch.Tensor:
            if last[0] != step:
                idx = draws[step % len(draws)].to(self.device)
                op = None if idx.numel() == 0 else hvp_matmat(
                    loss, theta, slice_batch(pool, idx), self.mode, chunk=LISSA_CHUNK)
                last[:] = step, (op, idx.numel() / bs)
            op, share = last[1]
            if data.shard is None:
                return op(v)
            # the minibatch mean: each rank's mean over its drawn rows, weighted
            # by their share of the minibatch, summed over the ranks
            part = torch.zeros_like(v) if op is None else op(v) * share
            return data.reduce(part)

        fast = self._kronecker_steps(draws, bs, autograd_matmat, theta, ckpt)
        return autograd_matmat if fast is None else fast

    def _kronecker_steps(self, draws: list[torch.Tensor], bs: int, autograd_matmat: Callable,
                         theta: torch.Tensor, ckpt: int) -> Callable | None:
        """The minibatch products from the Kronecker form of one selected
        ``nn.Linear`` (per-example layer inputs and output Hessians, cached once), or
        from the R-operator of a chain of ``nn.Linear`` layers (an MLP:
        :mod:`dattri.algorithm._chain_hessian`), when one applies and its first
        step's product equals the autograd one on two random vectors
        (:func:`~dattri.algorithm._linear_hessian.calibrated`); else None. The same
        recursion, without an autograd graph per step and direction."""
        from dattri.algorithm._chain_hessian import chain_rows
        from dattri.algorithm._linear_hessian import calibrated, linear_layer_rows

        names = self.task._resolve_layer_name(self.layer_name)
        rows = linear_layer_rows(self.task, names, self.data, ckpt, theta)
        if rows is None:
            rows = chain_rows(self.task, names, self.data, ckpt, theta)
        if rows is None:
            return None
        first = rows.matmat(draws[0].to(theta.device), 1.0 / bs)
        if not calibrated(first, lambda v: autograd_matmat(v, 0), ckpt, theta):
            return None
        rows.shift = first.shift
        last: list = [None, None]

        def kronecker_matmat(v: torch.Tensor, step: int) -> torch.Tensor:
            if last[0] != step:
                last[:] = step, rows.matmat(draws[step % len(draws)].to(theta.device), 1.0 / bs)
            return last[1](v)

        # no graph to share: larger blocks (the chain's products write k x P
        # temporaries: smaller blocks stay in cache)
        kronecker_matmat.chunk = getattr(rows, "chunk", LISSA_KRONECKER_CHUNK)
        return kronecker_matmat

    def _solve(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        from dattri.linalg.solvers import lissa_solve

        op = self._state[ckpt]
        # the R-operator / Kronecker products of a step are set up again per block
        # cheaply (index_select of the step's rows): each block's recursion then runs
        # whole while it is in cache; autograd products record a graph per step
        return lissa_solve(op, v, self.recursion_depth, damping=self.damping,
                           scaling=self.scaling, num_repeat=self.num_repeat,
                           chunk=getattr(op, "chunk", LISSA_CHUNK),
                           rows_first=hasattr(op, "chunk"))


#: test vectors per LiSSA product (blocks updated in place)
LISSA_CHUNK = 64
#: the same for the Kronecker products of one nn.Linear
LISSA_KRONECKER_CHUNK = 512


class IFAttributorArnoldi(_IFBase):
    """Influence function on the top Hessian eigenspace (Schioppa et al. 2022).

    Arnoldi iteration on ``H`` (estimated on the first ``precompute_data_ratio``
    of the training batches) gives its ``proj_dim`` dominant eigenpairs
    ``(lambda_r, u_r)``; then ``H^{-1} v ~= sum_r u_r u_r^T v / (lambda_r + reg)``,
    divided by ``norm_constant``.

    The training gradients projected on the eigenbasis (``n x r``, one set per
    checkpoint) are computed once in :meth:`cache` and kept on the device
    (``offload="none"``), in host memory (``"cpu"``) or in a resumable
    :mod:`dattri.store` under ``cache_dir`` (``"disk"``; keyed by the weights, the
    loader and a hash of the eigenbasis); scores and ``top_k`` read them in blocks.

    ``eigen_store``: optional dict shared by several attributors of the SAME task,
    layer selection and training data (e.g. a search over ``regularization``, which
    only shifts the eigenvalues): each checkpoint's Arnoldi iteration runs once.
    """

    def __init__(
        self, task: AttributionTask, layer_name=None, device="cpu",
        precompute_data_ratio: float = 1.0, proj_dim: int = 100, max_iter: int = 100,
        norm_constant: float = 1.0, tol: float = 1e-7, regularization: float = 0.0,
        seed: int = 0, offload: str = "none", cache_dir: str | None = None,
        eigen_store: dict | None = None,
    ) -> None:
        super().__init__(task, layer_name, device)
        check_store_args("IFAttributorArnoldi", offload, cache_dir)
        if eigen_store is not None and not isinstance(eigen_store, dict):
            msg = f"eigen_store must be a dict or None, got {type(eigen_store).__name__}."
            raise DattriValueError(msg)
        self.eigen_store = eigen_store
        self.offload, self.cache_dir = offload, cache_dir
        if not 0 < precompute_data_ratio <= 1:
            msg = f"precompute_data_ratio={precompute_data_ratio!r} must be in (0, 1]."
            raise DattriValueError(msg)
        for name, val in (("proj_dim", proj_dim), ("max_iter", max_iter)):
            if not isinstance(val, int) or val < 1:
                msg = f"{name}={val!r} must be an int >= 1."
                raise DattriValueError(msg)
        _check_nonneg("regularization", regularization)
        self.precompute_data_ratio, self.proj_dim, self.max_iter = precompute_data_ratio, proj_dim, max_iter
        self.norm_constant, self.tol = float(norm_constant), float(tol)
        self.regularization, self.seed = float(regularization), seed

    def _fit(self, ckpt: int) -> tuple[torch.Tensor, torch.Tensor]:
        from dattri.linalg.solvers import arnoldi

        loss, theta = self._loss_and_theta(ckpt)
        k = max(1, round(self.data.num_batches * self.precompute_data_ratio))
        key = (ckpt, self.data.n, theta.numel(), k, self.proj_dim, self.max_iter, self.tol, self.seed)
        if self.eigen_store is not None and key in self.eigen_store:
            vals, vecs = self.eigen_store[key]
        else:
            matmat = dataset_matmat(loss, theta, self.data, "rev-rev", first_batches=k,
                                    structure=(self.task, self.layer_name, ckpt))
            vals, vecs = arnoldi(matmat, theta.numel(), max_iter=self.max_iter, top_k=self.proj_dim,
                                 tol=self.tol, seed=self.seed, dtype=theta.dtype, device=theta.device)
            want = min(self.proj_dim, self.max_iter, theta.numel())
            if vals.numel() < want:
                from dattri._warn import warn_user

                warn_user(
                    f"IFAttributorArnoldi: checkpoint {ckpt}: the Krylov space of the start "
                    f"vector closed after {vals.numel()} steps, so {vals.numel()} of the "
                    f"{want} eigenpairs asked for were found (an eigenvalue with several "
                    "eigenvectors, e.g. the weight decay's, gives one; or the Hessian has rank "
                    f"{vals.numel()}); the influence uses those. A different seed= changes "
                    "which vector of a repeated eigenvalue is found, not how many.")
            if self.eigen_store is not None:
                self.eigen_store[key] = (vals, vecs)
        shifted = vals + self.regularization
        keep = shifted.abs() > 1e-12 * shifted.abs().max().clamp_min(1e-30)
        return vecs[keep], shifted[keep]

    def _precondition(self, ckpt: int) -> EigenbasisPreconditioner:
        vecs, vals = self._state[ckpt]
        return EigenbasisPreconditioner(vecs, vals, self.norm_constant)

    def _cache(self, train_loader: Iterable) -> None:
        """Curvature eigenbasis, then the training gradients projected on it once
        (``n x r`` per checkpoint; kept where ``offload`` says)."""
        super()._cache(train_loader)
        basis = self.ensemble.each(lambda c: hashlib.sha256(
            self._state[c][0].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(),
        ).hexdigest()[:16])
        settings = {"method": "IF-Arnoldi", "layer_name": repr(self.layer_name), "basis": basis}
        self._kept = fill(self, _Projected(self), train_loader, settings, desc="train grads on the eigenbasis")

    def _score_blocks(self, train_loader: Iterable, test_loader: Iterable,
                      relatif_method: str | None, blocked: bool,
                      ) -> Iterator[tuple[int, torch.Tensor]]:
        """Scores through the rank-r eigenbasis: ``(G_tr U^T) diag(1/(lambda+reg)) (G_te U^T)^T``.

        The training side was projected in :meth:`cache` (read back in blocks); only
        test gradients are computed here (cost ``n r + m P r`` instead of ``n m P``).
        A train loader that differs from the cached one (any example) is projected
        here, one batch at a time."""
        from dattri._loader import loader_fingerprint

        ens = self.ensemble
        pre = ens.each(self.preconditioner)
        fts = ens.each(lambda c: pre[c].project(self.test_features.all(test_loader, c, "test grads")))
        invs = ens.each(lambda c: pre[c].inverse_eigenvalues)
        if loader_fingerprint(train_loader) == self._train_fingerprint:
            rows = block_rows(self._kept[0].dim, fts[0].shape[0], len(ens))
            blocks = aligned_blocks(self._kept, rows, self.device)
        else:
            start = row_range(count_examples(train_loader), self._shard())[0]
            blocks = started(_Projected(self).batches(train_loader), start)

        def pair(tr: torch.Tensor, c: int) -> torch.Tensor:
            inv = invs[c].to(tr.dtype)
            s = (tr * inv) @ fts[c].T.to(tr.dtype)
            if relatif_method == "l":
                s = s / _nonzero((tr * tr * inv).sum(1).abs().sqrt())[:, None]
            elif relatif_method == "theta":
                s = s / _nonzero((tr * inv).norm(dim=1))[:, None]
            return s

        return score_blocks(blocks, pair, ens)


class _Projected(LoaderFeatures):
    """IF-Arnoldi's training features: the loss gradients on the eigenbasis ``(B, r)``."""

    which = "loss"

    def __init__(self, att: IFAttributorArnoldi) -> None:
        self.att, self.device, self.show_progress = att, att.device, att.show_progress

    def batch(self, batch: Any, ckpt: int) -> torch.Tensor:
        g = self.att.train_features.batch(batch, ckpt)
        return self.att.preconditioner(ckpt).project(g)

    def batches(self, loader: Iterable) -> Iterator[list[torch.Tensor]]:
        """Every checkpoint's features, one batch of ``loader`` at a time."""
        return checkpoint_batches(self.batch, loader, self.att.ensemble, self.device,
                                  desc="train grads on the eigenbasis",
                                  show_progress=self.show_progress)


def __getattr__(name: str) -> type:
    # DataInf and EK-FAC live in their own modules (which import this one); the
    # published package exports them from here too
    if name == "IFAttributorDataInf":
        from dattri.algorithm.datainf import IFAttributorDataInf

        return IFAttributorDataInf
    if name == "IFAttributorEKFAC":
        from dattri.algorithm.ekfac import IFAttributorEKFAC

        return IFAttributorEKFAC
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
