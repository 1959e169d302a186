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
first (one fixed projection for every step), which makes ``K`` ``k x k``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from dattri._loader import slice_batch
from dattri.algorithm._engine import DataCache
from dattri.algorithm.base import BaseAttributor
from dattri.errors import DattriValueError, NotCachedError
from dattri.task import AttributionTask

__all__ = ["DVEmbAttributor"]


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

    def __init__(
        self, task: AttributionTask, steps: Sequence[tuple[Sequence[int], float]],
        proj_params: Any = None, layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(task, layer_name, device)
        self.steps = _check_steps(steps, self.num_checkpoints)
        from dattri.algorithm.logra import parse_params
        from dattri.params.projection import DVEmbProjectionParams

        self.proj_params = parse_params(proj_params, DVEmbProjectionParams)
        pp = self.proj_params
        if pp.proj_type != "identity" and pp.proj_dim_per_layer is not None:
            from dattri.func.projection import get_projector

            state: dict[int, Any] = {}

            def project(g: torch.Tensor, ckpt: int) -> torch.Tensor:  # noqa: ARG001
                if "p" not in state:  # one projection for every step
                    state["p"] = get_projector(pp.proj_type, g.shape[1], pp.proj_dim_per_layer,
                                               seed=pp.proj_seed,
                                               max_batch_size=pp.proj_max_batch_size)
                return state["p"].project(g, 0)

            self.train_features.transform = project
            self.test_features.transform = project
        self._emb: torch.Tensor | None = None

    def _cache(self, train_loader: Iterable) -> None:
        data = DataCache(train_loader, self.device)
        bad = sorted({i for idx, _ in self.steps for i in idx if not 0 <= i < data.n})
        if bad:
            msg = f"steps index training examples {bad[:5]} outside 0..{data.n - 1} (the loader has {data.n})."
            raise DattriValueError(msg)
        pool = tree_map(lambda *xs: torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0],
                        *data.batches)
        grads = []
        for t, (idx, _) in enumerate(tqdm(self.steps, desc="step grads", leave=False,
                                          disable=None)):
            ix = torch.tensor(idx, device=self.device)
            grads.append(self.train_features.batch(slice_batch(pool, ix), t))
        k = grads[0].shape[1]
        K = grads[0].new_zeros(k, k)
        emb = grads[0].new_zeros(data.n, k)
        for t in range(len(self.steps) - 1, -1, -1):
            idx, lr = self.steps[t]
            g = grads[t]
            e = (lr / len(idx)) * (g - g @ K.T)
            K += e.T @ g
            emb.index_add_(0, torch.tensor(idx, device=self.device), e)
        self._emb = emb

    def embeddings(self) -> torch.Tensor:
        """The summed data value embeddings ``(n_train, k)`` (after ``cache``)."""
        if self._emb is None:
            msg = "embeddings needs cache(train_loader) first."
            raise NotCachedError(msg)
        return self._emb

    def attribute(self, train_loader: Iterable, test_loader: Iterable) -> torch.Tensor:
        """Scores ``(n_train, n_test)`` = ``<e(z_i), g_target(z_j; theta_T)>``."""
        self._check_pair(train_loader, test_loader)
        self._ensure_cached(train_loader)
        final = self.num_checkpoints - 1
        gt = self.test_features.all(test_loader, final, "test grads")
        return self._emb @ gt.T.to(self._emb.dtype)

    def self_attribute(self, train_loader: Iterable) -> torch.Tensor:
        """``<e(z_i), g_target(z_i; theta_T)>`` as ``(n_train,)``."""
        self._ensure_cached(train_loader)
        gt = self.test_features.all(train_loader, self.num_checkpoints - 1, "self grads")
        return (self._emb * gt.to(self._emb.dtype)).sum(dim=1)
