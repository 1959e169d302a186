r"""EK-FAC influence functions (George et al. 2018; Grosse et al. 2023).

For every selected ``nn.Linear`` layer ``l`` (``y = W a + b``) the per-example
gradient is the matrix :math:`G_{nl} = \sum_t s_{n,t} a_{n,t}^\top` of shape
``(d_out, d_in + 1)`` (bias last; ``t`` runs over sequence positions), with ``a``
the layer input and ``s`` the gradient of example ``n``'s own loss w.r.t. the layer
output. Both are captured with forward hooks while the task's loss runs on a
batch; the loss is a batch mean, so ``s = B * dL_batch/dy``. The curvature is the
empirical Fisher of the loss (the ground-truth labels), block-diagonal over
layers, Kronecker-factored :math:`F_l \approx S_l \otimes A_l` with eigenbases
``Q_A, Q_S`` and the EK-FAC corrected eigenvalues
:math:`\Lambda_l = \frac1N\sum_n (Q_S^\top G_{nl} Q_A)^{\odot 2}`:

.. math::
    \tau(i, j) = \sum_l \langle G^{loss}_{il},\;
        Q_S [(Q_S^\top G^{target}_{jl} Q_A) \oslash (\Lambda_l + \delta)] Q_A^\top \rangle.

Grosse et al. use the true Fisher (labels sampled from the model): pass a
``fisher_loss_func`` that samples its labels to get it. With ``damping = 0`` the
inverse is a pseudo-inverse (eigenvalues below ``N_l * eps * max`` are dropped).
Gradients come from the layer outputs, so loss terms that depend on the
parameters only (weight decay) are not part of them. RelatIF works as for every
influence-function attributor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dattri._loader import batch_size_of, to_device
from dattri.algorithm._engine import ENSEMBLE_SEED, _check_finite
from dattri.algorithm.influence_function import _check_nonneg, _IFBase
from dattri.errors import DattriValueError, InvalidLossError, LayerNameError
from dattri.func.fisher import (
    ekfac_corrected_eigenvalues_from_activations,
    kfac_covariances,
    kfac_eigen,
    kfac_ifvp,
    linear_per_example_grads,
)
from dattri.task import AttributionTask

__all__ = ["IFAttributorEKFAC"]


# ----------------------------------------------------------------- hook capture
def _param_names(module_name: str, bias: bool) -> list[str]:
    pre = f"{module_name}." if module_name else ""
    return [f"{pre}weight"] + ([f"{pre}bias"] if bias else [])


def resolve_linear_modules(
    task: AttributionTask, module_name: str | Sequence[str] | None,
) -> tuple[list[str], dict[str, bool], list[str]]:
    """Selected Linear modules, whether each has a trainable bias, their param names."""
    task._resolve_layer_name(None)  # loads checkpoint 0 -> named_parameters
    modules = dict(task.model.named_modules())
    trainable = task.named_parameters
    if module_name is None:
        names = [n for n, m in modules.items() if isinstance(m, nn.Linear)
                 and _param_names(n, False)[0] in trainable]
        if not names:
            msg = ("module_name=None: the model has no nn.Linear module with a trainable "
                   "weight; K-FAC-style methods need Linear layers.")
            raise DattriValueError(msg)
    else:
        names = [module_name] if isinstance(module_name, str) else list(module_name)
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        bad = [n for n in names if n not in linear or _param_names(n, False)[0] not in trainable]
        if bad or not names:
            msg = (f"module_name={module_name!r}: {bad} are not nn.Linear modules with a "
                   f"trainable weight; use names of model.named_modules(), e.g. {linear[:8]}.")
            raise LayerNameError(msg)
    bias = {n: _param_names(n, True)[1] in trainable for n in names}
    params = [p for n in names for p in _param_names(n, bias[n])]
    return names, bias, [p for p in trainable if p in set(params)]


def _as_seq(t: torch.Tensor) -> torch.Tensor:
    """``(B, d)`` -> ``(B, 1, d)``; ``(B, ..., d)`` -> ``(B, T, d)``."""
    return t[:, None] if t.dim() == 2 else t.reshape(t.shape[0], -1, t.shape[-1])  # noqa: PLR2004


class LinearCapture:
    """Inputs ``a (B, T, d_in)`` and per-example output gradients ``s (B, T, d_out)``.

    ``run`` calls the loss (or target) function on a batch with forward hooks on the
    selected Linear modules; each output ``y`` is replaced by ``y + 0`` with a zero
    leaf so that ``autograd.grad`` w.r.t. the leaf gives ``dL/dy``, multiplied by
    ``B`` (the loss is a mean).
    """

    def __init__(self, task: AttributionTask, modules: list[str], device: torch.device) -> None:
        self.task, self.modules, self.device = task, modules, device
        self._ckpt: int | None = None

    def _prepare(self, ckpt: int) -> None:
        task = self.task
        if self._ckpt != ckpt or task.current_checkpoint_idx != ckpt:
            task.model.to(self.device)
            task.current_checkpoint_idx = None  # re-read params on the device
            task._load_checkpoints(ckpt)
            self._ckpt = ckpt

    def run(self, batch: Any, ckpt: int, which: str = "loss",
            func: Callable | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Captured ``{module: (a, s)}`` for one batch already on the device."""
        task = self.task
        self._prepare(ckpt)
        if func is None:
            task.validate_batch(batch, which, ckpt)
            func = task.original_loss_func if which == "loss" else task.original_target_func
        mods = dict(task.model.named_modules())
        store: dict[str, list] = {n: [] for n in self.modules}

        def make_hook(name: str) -> Callable:
            def hook(_m: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
                if store[name]:
                    msg = (f"module {name!r} is called more than once per forward pass "
                           "(shared weights); this is not supported, exclude it via module_name.")
                    raise DattriValueError(msg)
                # y + 0-leaf: d loss / d leaf = d loss / d y, and the graph to
                # earlier layers stays intact
                leaf = torch.zeros_like(output, requires_grad=True)
                store[name].append((inputs[0].detach(), leaf))
                return output + leaf
            return hook

        handles = [mods[n].register_forward_hook(make_hook(n)) for n in self.modules]
        try:
            with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
                torch.manual_seed(ENSEMBLE_SEED + ckpt)
                with torch.enable_grad():
                    loss = func(dict(task.named_parameters), batch)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        msg = "the loss/target function must return a scalar batch mean."
                        raise InvalidLossError(msg)
                    leaves = [store[n][0][1] for n in self.modules if store[n]]
                    grads = torch.autograd.grad(loss.reshape(()), leaves, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.modules if not store[n]]
        if missing:
            msg = f"modules {missing} were not called by the loss function; drop them from module_name."
            raise DattriValueError(msg)
        b = batch_size_of(batch)
        out, it = {}, iter(grads)
        for n in self.modules:
            a, leaf = store[n][0]
            g = next(it)
            g = torch.zeros_like(leaf) if g is None else g.detach() * b
            out[n] = (_as_seq(a), _check_finite(_as_seq(g), f"{which} output gradients"))
        return out


class HookFeaturizer:
    """Featurizer-compatible (``batch``/``iterate``/``all``) features from captures.

    Args:
        capture: the :class:`LinearCapture`.
        which: ``"loss"`` or ``"target"``.
        transform: ``f(captured dict, ckpt) -> (B, K)``.
    """

    def __init__(self, capture: LinearCapture, which: str,
                 transform: Callable[[dict, int], torch.Tensor]) -> None:
        self.capture, self.which, self.transform = capture, which, transform
        self.show_progress: bool | None = None

    def batch(self, batch: Any, ckpt_idx: int) -> torch.Tensor:
        """Features ``(B, K)`` of one batch already on the device."""
        return self.transform(self.capture.run(batch, ckpt_idx, self.which), ckpt_idx)

    def iterate(self, loader: Iterable, ckpt_idx: int, desc: str = "") -> Iterator[torch.Tensor]:
        """Features of every batch of ``loader`` in order."""
        disable = None if self.show_progress is None else not self.show_progress
        for b in tqdm(loader, desc=desc or f"{self.which} grads", leave=False, disable=disable):
            yield self.batch(to_device(b, self.capture.device), ckpt_idx)

    def all(self, loader: Iterable, ckpt_idx: int, desc: str = "") -> torch.Tensor:
        """Features ``(n, K)`` of the whole loader."""
        parts = list(self.iterate(loader, ckpt_idx, desc))
        if not parts:
            msg = "the data loader yielded no batches; pass a non-empty loader."
            raise DattriValueError(msg)
        return torch.cat(parts)


# ------------------------------------------------------------------- attributor
class IFAttributorEKFAC(_IFBase):
    """EK-FAC influence functions on Linear layers (see the module docstring).

    Args:
        task: the attribution task; its loss must be a mean over the batch.
        module_name: Linear module names (``model.named_modules()`` keys, a string
            is one name); ``None`` = every Linear module with a trainable weight.
        device: computation device.
        damping: ``delta >= 0`` added to the eigenvalues; ``0`` = pseudo-inverse.
        fisher_loss_func: optional ``f(params, data) -> scalar`` used instead of
            the task's loss when estimating the curvature (e.g. with labels sampled
            from the model for the true Fisher).
    """

    def __init__(
        self, task: AttributionTask, module_name: str | Sequence[str] | None = None,
        device="cpu", damping: float = 0.0, fisher_loss_func: Callable | None = None,
    ) -> None:
        if not isinstance(task, AttributionTask):
            super().__init__(task, None, device)  # raises the typed error
        names, bias, params = resolve_linear_modules(task, module_name)
        super().__init__(task, params, device)
        _check_nonneg("damping", damping)
        if fisher_loss_func is not None and not callable(fisher_loss_func):
            msg = "fisher_loss_func must be None or callable f(params, data) -> scalar."
            raise DattriValueError(msg)
        self.module_name, self.bias = names, bias
        self.damping, self.fisher_loss_func = float(damping), fisher_loss_func
        self.capture = LinearCapture(task, names, self.device)
        self.train_features = HookFeaturizer(self.capture, "loss", self._grads)
        self.test_features = HookFeaturizer(self.capture, "target", self._grads)

    def _grads(self, cap: dict, ckpt: int) -> torch.Tensor:  # noqa: ARG002
        """Per-example ``[dW | db]`` of every layer, flattened and concatenated."""
        return torch.cat([linear_per_example_grads(a, s, self.bias[n]).flatten(1)
                          for n, (a, s) in cap.items()], dim=1)

    def _fit(self, ckpt: int) -> list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        func = self.fisher_loss_func
        sums: dict[str, list] = {}
        n = 0
        for batch in tqdm(self.data, desc="K-FAC factors", leave=False, disable=None):
            for name, (a, s) in self.capture.run(batch, ckpt, "loss", func).items():
                A, S = kfac_covariances(a, s, self.bias[name], reduction="sum")
                acc = sums.setdefault(name, [0, 0, 0])
                acc[0], acc[1], acc[2] = acc[0] + A, acc[1] + S, acc[2] + a.shape[0] * a.shape[1]
            n += batch_size_of(batch)
        eigen = {}
        for name, (A, S, tokens) in sums.items():
            _, qa, _, qs = kfac_eigen(A / tokens, S / n)
            eigen[name] = (qa, qs, torch.zeros(qs.shape[0], qa.shape[0], dtype=qa.dtype,
                                               device=qa.device))
        for batch in tqdm(self.data, desc="EK-FAC eigenvalues", leave=False, disable=None):
            for name, (a, s) in self.capture.run(batch, ckpt, "loss", func).items():
                qa, qs, lam = eigen[name]
                lam += ekfac_corrected_eigenvalues_from_activations(
                    a, s, qa, qs, self.bias[name], reduction="sum")
        out, start = [], 0
        for name in self.module_name:
            qa, qs, lam = eigen[name]
            size = lam.numel()
            out.append((slice(start, start + size), qa, qs, lam / n))
            start += size
        return out

    def _ihvp(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        out = torch.empty_like(v)
        for sl, qa, qs, lam in self._state[ckpt]:
            vl = v[:, sl].reshape(v.shape[0], *lam.shape)
            qa, qs, lam = qa.to(v.dtype), qs.to(v.dtype), lam.to(v.dtype)
            if self.damping > 0:
                r = kfac_ifvp(vl, qa, qs, lam, self.damping)
            else:
                cut = lam.abs().max() * lam.numel() * torch.finfo(lam.dtype).eps
                inv = torch.where(lam > cut, 1.0 / torch.where(lam > cut, lam, 1.0), 0.0)
                r = qs @ ((qs.T @ vl @ qa) * inv) @ qa.T
            out[:, sl] = r.reshape(v.shape[0], -1)
        return out

    def factors(self, ckpt: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``{module: (Q_A, Q_S, corrected eigenvalues)}`` at ``ckpt`` (after ``cache``)."""
        from dattri.errors import NotCachedError

        if ckpt not in self._state:
            msg = "factors needs cache(train_loader) first (and a valid ckpt index)."
            raise NotCachedError(msg)
        return {n: st[1:] for n, st in zip(self.module_name, self._state[ckpt])}
