"""Attributor lifecycle shared by every method.

The constructor only stores settings; :meth:`BaseAttributor.cache` does the
training-side work once and returns the attributor; :meth:`attribute` reuses
it (caching first, with a warning, if the user did not).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dattri._warn import warn_user
from dattri._loader import check_loader, check_same_loader, loader_fingerprint
from dattri.algorithm._engine import Featurizer, resolve_device
from dattri.algorithm._score import Ensemble
from dattri.algorithm._scored import ranked
from dattri.distributed import Shard, all_gather_rows, resolve, shard_loader
from dattri.errors import DattriValueError, NotCachedError
from dattri.linalg.operators import Preconditioner
from dattri.task import AttributionTask

__all__ = ["DEFAULT_PROJECTOR_KWARGS", "BaseAttributor", "projector_kwargs"]

#: the projection a settings dict is completed with (the published name and
#: values; ``device`` is ignored: projections run on the attributor's device)
DEFAULT_PROJECTOR_KWARGS = {"proj_dim": 512, "proj_max_batch_size": 32, "proj_seed": 0,
                            "device": "cpu"}


class BaseAttributor:
    """Common state and lifecycle of the attributors.

    Args:
        task: the attribution task.
        layer_name: restrict gradients to these parameter names (a string is one
            name); ``None`` = all trainable parameters.
        device: where features, curvature and scores are computed; scores come
            back on this device.
    """

    #: True where ``attribute`` scores the train loader it is given (only the
    #: curvature is cached); otherwise a loader that differs from the cached one
    #: is refused (:class:`~dattri.errors.LoaderMismatchError`)
    _scores_given_train = False

    #: True where the method splits the training set over the ranks of a
    #: ``torch.distributed`` process group (:mod:`dattri.distributed`); the others
    #: compute everything on every rank (with a warning)
    _shardable = False
    _process_group: Any = None  # None: the default group, if initialised
    _warned_unsharded = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        from dattri.algorithm._compat import install

        install(cls)  # the published keyword names (train_dataloader=, ...)

    def __init__(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(task, AttributionTask):
            msg = (
                f"task must be a dattri.task.AttributionTask, got {type(task).__name__}; "
                "wrap your model, loss and checkpoints in AttributionTask(...)."
            )
            raise DattriValueError(msg)
        self.task = task
        self.layer_name = layer_name
        self.device = resolve_device(device)
        self.show_progress: bool | None = None
        self._cached = False
        if layer_name is not None:
            task._resolve_layer_name(layer_name)  # fail early on unknown names
        self.train_features = Featurizer(task, "loss", layer_name, self.device)
        self.test_features = Featurizer(task, "target", layer_name, self.device)

    @property
    def num_checkpoints(self) -> int:
        """How many checkpoints the task holds."""
        return len(self.task.get_checkpoints())

    #: TracInCP's per-checkpoint weights (``None``: the ensemble mean)
    _checkpoint_weights: torch.Tensor | None = None

    @property
    def ensemble(self) -> Ensemble:
        """The checkpoints and how their scores combine (:class:`_score.Ensemble`)."""
        return Ensemble(self.num_checkpoints, self._checkpoint_weights)

    def preconditioner(self, ckpt: int = 0) -> Preconditioner:
        """The operator ``cache`` built for checkpoint ``ckpt``, applied to the test
        features in ``attribute``: a :class:`~dattri.linalg.operators.Preconditioner`
        (``solve(V) = V M^{-1}`` on rows), for reuse in a researcher's own scores.
        Influence functions: the inverse damped curvature; TRAK: the inverse
        regularised Gram matrix; LoGra / FactGraSS: per-layer blocks.

        Raises:
            NotCachedError: before ``cache``, for a ``ckpt`` out of range, or for a
                method without one (Grad-Dot, TracIn, RPS, ...).
        """
        held = getattr(self, "_preconditioners", None) or {}
        if ckpt not in held:
            what = ("needs cache(train_loader) first and 0 <= ckpt < "
                    f"{self.num_checkpoints}") if self._uses_preconditioner else \
                "does not exist: this method scores the features without one"
            msg = f"{type(self).__name__}.preconditioner({ckpt!r}) {what}."
            raise NotCachedError(msg)
        return held[ckpt]

    #: whether ``cache`` builds :meth:`preconditioner` (influence functions, TRAK, LoGra)
    _uses_preconditioner = False

    @property
    def is_cached(self) -> bool:
        """Whether :meth:`cache` has run."""
        return self._cached

    def cache(self, train_loader: Iterable) -> BaseAttributor:
        """Do the training-side work once (curvature, factorisations, features).

        Args:
            train_loader: the training data, in a fixed order.

        Returns:
            ``self``, now cached.
        """
        check_loader(train_loader, "train_loader")
        self._cache(self._local(train_loader))
        self._train_fingerprint = loader_fingerprint(train_loader, "train_loader")
        self._cached = True
        return self

    # -- torch.distributed (dattri.distributed) --------------------------------------
    def _shard(self) -> Shard | None:
        """This process's share of the work (None: one process does everything)."""
        shard = resolve(self._process_group)
        if shard is None:
            return None
        if not self._shardable:
            if not self._warned_unsharded:
                self._warned_unsharded = True
                warn_user(
                    f"{type(self).__name__} does not split the training set across the "
                    f"{shard.world} ranks of the process group: every rank computes all "
                    "of it (same result, no speed-up).")
            return None
        return shard

    def _local(self, train_loader: Iterable, name: str = "train_loader") -> Iterable:
        """This rank's contiguous batches of ``train_loader`` (all of it for one process)."""
        shard = self._shard()
        return train_loader if shard is None else shard_loader(train_loader, shard, name)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The ranks' score rows in loader order, on every rank."""
        return all_gather_rows(rows, self._shard())

    def _finish(self, blocks: Iterable[tuple[int, torch.Tensor]], top_k: int | None):
        """``attribute``'s result from ``(global_row_start, scores)`` blocks of this
        rank's training rows: every rank's rows in order, or with ``top_k`` the
        :class:`~dattri.topk.TopK` ranked block by block (merged over the ranks)."""
        if top_k is not None:
            return ranked(blocks, top_k, self._shard())
        return self._gather(torch.cat([b for _, b in blocks]))

    def _cache(self, train_loader: Iterable) -> None:  # noqa: ARG002
        """Subclasses override; the default has nothing to precompute."""

    def _ensure_cached(self, train_loader: Iterable) -> None:
        check_loader(train_loader, "train_loader")
        if self._cached and not self._scores_given_train:
            check_same_loader(getattr(self, "_train_fingerprint", None), train_loader,
                              type(self).__name__)
        if not self._cached:
            warn_user(
                f"{type(self).__name__}.attribute called before cache(train_loader); "
                "caching now. Call cache() once to reuse the training-side work.",
            )
            self.cache(train_loader)

    def _check_pair(self, train_loader: Iterable, test_loader: Iterable) -> None:
        check_loader(train_loader, "train_loader")
        check_loader(test_loader, "test_loader")

    def attribute(self, train_loader: Iterable, test_loader: Iterable) -> torch.Tensor:
        """Scores ``(n_train, n_test)``; positive = proponent."""
        raise NotImplementedError

    def self_attribute(self, train_loader: Iterable) -> torch.Tensor:
        """Diagonal of ``attribute(train, train)`` as ``(n_train,)``, without the n x n matrix."""
        raise NotImplementedError


def projector_kwargs(proj_params: Any, name: str = "proj_params") -> dict[str, Any] | None:
    """Normalise projection settings (a params dataclass, a dict or None)."""
    if proj_params is None:
        return None
    if dataclasses.is_dataclass(proj_params) and not isinstance(proj_params, type):
        kw = dataclasses.asdict(proj_params)
    elif isinstance(proj_params, dict):
        kw = dict(proj_params)
    else:
        msg = (
            f"{name} must be None, a dict or a dattri.params.projection settings "
            f"object, got {type(proj_params).__name__}."
        )
        raise DattriValueError(msg)
    kw.pop("device", None)
    if kw.get("proj_type") == "identity":
        return None
    defaults = {k: v for k, v in DEFAULT_PROJECTOR_KWARGS.items() if k != "device"}
    return {**defaults, "proj_type": "normal", **kw}


def make_projection(kw: dict[str, Any] | None, device: torch.device):
    """A transform ``f(G (B, P), ckpt_idx) -> (B, k)`` from projection settings.

    The projector is built once per feature dimension and reused for every batch,
    with ``ensemble_id = ckpt_idx`` so each checkpoint has its own projection.
    """
    if kw is None:
        return None
    if kw.get("proj_type") == "tensorsketch":
        return _tensor_sketch_transform(kw)
    from dattri.func.projection import random_project

    state: dict[int, Any] = {}

    def projector(g: torch.Tensor):
        """The :class:`~dattri.func.projection.Projector` for features like ``g``."""
        p = g.shape[-1]
        if p not in state:
            state[p] = random_project(g, g.shape[0], device=device, **kw)
        return state[p].projector

    def transform(g: torch.Tensor, ckpt_idx: int) -> torch.Tensor:
        return projector(g).project(g, ensemble_id=ckpt_idx)

    transform.projector = projector
    # a dense matrix: one product of many rows beats several of few (the featurizer
    # gathers small batches' gradients first); a sparse one costs the same per row
    transform.blockable = kw.get("proj_type") in ("normal", "rademacher")
    return transform


def _tensor_sketch_transform(kw: dict[str, Any]):
    """``proj_type="tensorsketch"``: the featurizer sketches the gradients under the
    model's :class:`~dattri.func.sketch.SketchLayout` (``sketch``; the factors of
    ``nn.Linear`` layers on 2-D inputs through ``project_factored``); flat gradients
    handed to the transform itself, without that layout, are refused."""
    from dattri.func.sketch import TensorSketch

    sketch = TensorSketch(int(kw["proj_dim"]), int(kw.get("proj_seed", 0)))

    def transform(g: torch.Tensor, ckpt_idx: int) -> torch.Tensor:
        msg = (
            "proj_type='tensorsketch' is computed by the attributor's featurizer from the "
            "model's layer layout (TRAKAttributor and TracInAttributor, any model), but this "
            "call got flat per-example gradients without it; use proj_type='sjlt' or "
            "'normal' here."
        )
        raise DattriValueError(msg)

    transform.project_factored = lambda fg, ckpt_idx: sketch.project(fg.factors, ckpt_idx)
    transform.sketch = sketch
    return transform


from dattri.algorithm._compat import install as _install_compat  # noqa: E402

_install_compat(BaseAttributor)  # subclasses get it from __init_subclass__


def __getattr__(name: str) -> type:
    # the published name of the IF family's base class (defined after this module)
    if name == "BaseInnerProductAttributor":
        from dattri.algorithm.influence_function import _IFBase

        return _IFBase
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
