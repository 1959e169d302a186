r"""EK-FAC influence functions (George et al. 2018; Grosse et al. 2023).

For every selected ``nn.Linear`` layer ``l`` (``y = W a + b``) the per-example
gradient is the matrix :math:`G_{nl} = \sum_t s_{n,t} a_{n,t}^\top` of shape
``(d_out, d_in + 1)`` (bias last; ``t`` runs over sequence positions), with ``a``
the layer input and ``s`` the gradient of example ``n``'s own loss w.r.t. the layer
output. An ungrouped ``nn.Conv1d`` / ``nn.Conv2d`` is the same linear map applied
at every output position ``t`` to the input patch ``a_{n,t}`` (``C_in * K``
values), so its covariances run over positions too (as kronfluence does). Both are captured with forward hooks while the task's loss runs on a
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

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from dattri._convention import model_style_task
from dattri._loader import count_examples
from dattri.algorithm._hooks import HookFeaturizer, LinearCapture, resolve_linear_modules
from dattri.algorithm._loop import BufferLender
from dattri.algorithm.influence_function import _check_nonneg, _IFBase
from dattri.errors import DattriValueError
from dattri.func.fisher import (
    ekfac_corrected_eigenvalues_from_activations,
    ekfac_rotated_grads,
    kfac_covariances,
    kfac_eigen,
    linear_per_example_grads,
    rotation_costs,
)
from dattri.linalg.operators import KroneckerEigenPreconditioner
from dattri.task import AttributionTask

__all__ = ["IFAttributorEKFAC"]


#: bytes of one temporary of the inverse-Fisher products (rows are taken in chunks)
_IHVP_CHUNK_BYTES = 256 << 20


# ------------------------------------------------------------------- attributor
class IFAttributorEKFAC(_IFBase):
    """EK-FAC influence functions on Linear layers (see the module docstring).

    Args:
        task: the attribution task; its loss must be a mean over the batch.
        module_name: Linear / ungrouped Conv1d / Conv2d module names
            (``model.named_modules()`` keys, a string is one name); ``None`` = every
            such module with a trainable weight.
        device: computation device.
        damping: ``delta >= 0`` added to the eigenvalues; ``0`` = pseudo-inverse.
        fisher_loss_func: optional ``f(params, data) -> scalar`` used instead of
            the task's loss when estimating the curvature (e.g. with labels sampled
            from the model for the true Fisher).

    ``scoring_basis`` (an attribute, ``"auto"`` by default) is where a layer's scores
    are taken: ``"standard"`` forms the training gradients and applies the inverse
    to the test gradients (rotating them into the eigenbasis and back:
    ``2 d_out d_a (d_out + d_a)`` per test example), ``"eigen"`` rotates the training
    and the test gradients into the eigenbasis (from the layer's inputs and output
    gradients where that is cheaper) and divides there; the scores are the same
    (the rotation is orthogonal). ``"auto"`` picks per layer the cheaper for the
    numbers of training and test examples, counting the eigenbasis's multiply-adds
    twice (``ROTATION_SLOWDOWN``): its per-example products run at about half the
    rate of the standard basis's square products with the test gradients. ResNet-9's
    deep convolutions (512 x 2,305 and 512 x 4,609 at 64 positions) then go to the
    eigenbasis when test examples are many against training ones (640 x 500: 2.2 T
    multiply-adds against 15.7 T; the attribution took 152 s instead of 252 s), not at
    5,000 x 500 (10.8 T against 16.7 T, which measured slower: 54.4 s against 51.2 s
    at 640 x 64, the same ratio).

    Padding (Hugging Face dict batches). When a training batch is a dict (any
    mapping) holding a tensor under ``padding_mask_key`` (an attribute,
    ``"attention_mask"`` by default; ``None`` turns this off) whose shape is a
    layer's ``(batch, positions)``, its zero entries mark padded positions: they
    count in neither the input nor the output-gradient covariance, nor in the
    number of positions ``A`` is averaged over, nor in the corrected eigenvalues
    (as kronfluence excludes masked tokens), so the scores do not depend on how far
    the batches are padded. Layers with other position axes (a pooled classifier
    head, a convolution's pixels) keep every position. The per-example gradients
    themselves are not masked: they are the loss's (zero at positions the loss
    ignores). For an encoder-decoder model whose decoder length equals the
    encoder's, the encoder's mask would also be taken for the decoder's layers:
    set ``padding_mask_key`` to the key of a mask that fits every selected layer,
    or to ``None``.
    """

    scoring_basis = "auto"
    #: the key of a dict batch's ``(batch, positions)`` 0/1 padding mask (see above);
    #: ``None``: every position counts
    padding_mask_key: str | None = "attention_mask"
    #: how much slower a multiply-add of the eigenbasis's per-example products runs
    #: than one of the standard basis's products with the test gradients (measured
    #: on ResNet-9, 2 CPU threads); ``"auto"`` weighs the eigenbasis's count by it
    ROTATION_SLOWDOWN = 2.0

    def __init__(
        self, task: AttributionTask, module_name: str | Sequence[str] | None = None,
        device="cpu", damping: float = 0.0, fisher_loss_func: Callable | None = None,
    ) -> None:
        if not isinstance(task, AttributionTask):
            super().__init__(task, None, device)  # raises the typed error
        task = model_style_task(task, device)  # loss_func(model, batch, device) too
        names, bias, params = resolve_linear_modules(task, module_name, conv=True)
        super().__init__(task, params, device)
        _check_nonneg("damping", damping)
        self.max_iter: int | None = None
        if fisher_loss_func is not None and not callable(fisher_loss_func):
            msg = "fisher_loss_func must be None or callable f(params, data) -> scalar."
            raise DattriValueError(msg)
        self.module_name, self.bias = names, bias
        self.damping, self.fisher_loss_func = float(damping), fisher_loss_func
        self.capture = LinearCapture(task, names, self.device)
        self._lender = BufferLender()  # _grads' result, lent back by streaming consumers
        self.train_features = HookFeaturizer(self.capture, "loss", self._grads, self._lender.release)
        self.test_features = HookFeaturizer(self.capture, "target", self._grads, self._lender.release)
        self._positions: dict[str, float] = {}
        self._rotated: dict[str, bool] = {}  # layers scored in their eigenbasis, this call

    def _grads(self, cap: dict, ckpt: int) -> torch.Tensor:
        """Per-example ``[dW | db]`` of every layer, flattened and concatenated (in the
        layer's eigenbasis, ``Q_S^T [dW | db] Q_A``, for the layers scored there): each
        layer's product is written into its columns of one ``(B, P)`` buffer, which a
        consumer that keeps nothing of it lends back (:meth:`HookFeaturizer.stream`)."""
        sizes = [(s.shape[-1], a.shape[-1] + bool(self.bias[n])) for n, (a, s) in cap.items()]
        a0 = next(iter(cap.values()))[0]
        b = a0.shape[0]
        flat = self._lender.take((b, sum(o * i for o, i in sizes)), a0.dtype, a0.device)
        start = 0
        for (n, (a, s)), (d_o, d_a) in zip(cap.items(), sizes):
            dest = flat[:, start:start + d_o * d_a].view(b, d_o, d_a)
            start += d_o * d_a
            if self._rotated.get(n):
                _, qa, qs, _ = self._state[ckpt][self.module_name.index(n)]
                ekfac_rotated_grads(a, s, qa.to(a.dtype), qs.to(a.dtype), self.bias[n], out=dest)
            else:
                linear_per_example_grads(a, s, self.bias[n], out=dest)
        return flat

    # -- where the scores are taken: the standard basis or each layer's eigenbasis --
    def _choose_basis(self, n_train: int, n_test: int) -> dict[str, bool]:
        """Per layer, whether scoring in the eigenbasis costs less: rotating all
        ``n_train + n_test`` gradients (from factors or formed, the cheaper; weighed by
        ``ROTATION_SLOWDOWN``) against forming the training gradients and rotating the
        test gradients there and back."""
        if self.scoring_basis not in ("auto", "eigen", "standard"):
            msg = f"scoring_basis={self.scoring_basis!r} must be 'auto', 'eigen' or 'standard'."
            raise DattriValueError(msg)
        if self.scoring_basis != "auto":
            return dict.fromkeys(self.module_name, self.scoring_basis == "eigen")
        chosen = {}
        for (_, qa, qs, _), name in zip(self._state[0], self.module_name):
            t, d_o, d_a = self._positions.get(name, 1.0), qs.shape[0], qa.shape[0]
            rotate = min(rotation_costs(t, d_o, d_a))
            form = t * d_o * d_a
            standard = n_train * form + n_test * (form + 2 * d_o * d_a * (d_o + d_a))
            chosen[name] = (n_train + n_test) * rotate * self.ROTATION_SLOWDOWN < standard
        return chosen

    def _in_basis(self, n_train: int, n_test: int, run: Callable):
        """``run()`` with the scores taken in :meth:`_choose_basis`'s bases."""
        self._rotated = self._choose_basis(n_train, n_test)
        try:
            return run()
        finally:
            self._rotated = {}

    def _scoring_preconditioner(self, ckpt: int) -> KroneckerEigenPreconditioner:
        pre = self._preconditioners[ckpt]
        flags = [self._rotated.get(n, False) for n in self.module_name]
        return pre.in_eigenbasis(flags) if any(flags) else pre

    def _ihvp(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        return self._scoring_preconditioner(ckpt).solve(v)

    def _ihvp_owned(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        return self._scoring_preconditioner(ckpt).solve_owned(v)

    def attribute(self, train_loader: Iterable, test_loader: Iterable,
                  relatif_method: str | None = None, top_k: int | None = None):
        """As :meth:`_IFBase.attribute`, each layer scored in the cheaper basis."""
        self._check_pair(train_loader, test_loader)  # before counting their examples
        self._ensure_cached(self._local(train_loader))
        return self._in_basis(
            count_examples(train_loader), count_examples(test_loader),
            lambda: super(IFAttributorEKFAC, self).attribute(
                train_loader, test_loader, relatif_method=relatif_method, top_k=top_k))

    def self_attribute(self, train_loader: Iterable, relatif_method: str | None = None):
        """As :meth:`_IFBase.self_attribute`, each layer in the cheaper basis."""
        self._ensure_cached(self._local(train_loader))
        n = count_examples(train_loader)
        return self._in_basis(n, n, lambda: super(IFAttributorEKFAC, self).self_attribute(
            train_loader, relatif_method=relatif_method))

    def cache(self, train_loader: Iterable | None = None, max_iter: int | None = None,
              *, full_train_dataloader: Iterable | None = None) -> IFAttributorEKFAC:
        """Factors and corrected eigenvalues from the training data; ``max_iter``
        (0.3.0) limits the estimate to the first ``max_iter`` batches."""
        if full_train_dataloader is not None:
            if train_loader is not None:
                msg = "pass train_loader or full_train_dataloader (its published name), not both."
                raise DattriValueError(msg)
            train_loader = full_train_dataloader
        if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int)
                                     or max_iter < 1):
            msg = f"max_iter={max_iter!r} must be None (every batch) or an int >= 1."
            raise DattriValueError(msg)
        self.max_iter = max_iter
        return super().cache(train_loader)

    def _fit_batches(self) -> list:
        """This rank's batches among the first ``max_iter`` of the training loader."""
        data = self.data
        if data.shard is not None and self.max_iter is not None:
            from dattri.distributed import split

            lo_last = split(data.num_batches, data.shard.world)[-1][0]
            if self.max_iter <= lo_last:  # the same decision on every rank
                msg = (f"max_iter={self.max_iter} batches leave some of the "
                       f"{data.shard.world} ranks without a batch to estimate the factors "
                       f"from; pass max_iter > {lo_last} (or None) or use fewer processes.")
                raise DattriValueError(msg)
        return [data.batches[i] for i in data.local_batches(self.max_iter)]

    def _padding_mask(self, batch: Any, a: torch.Tensor) -> torch.Tensor | None:
        """The ``(B, T)`` bool mask of the positions of ``a (B, T, d)`` that count: a
        mapping batch's ``padding_mask_key`` entry where its shape is ``(B, T)``
        (nonzero = a real token), else ``None`` (every position)."""
        key = self.padding_mask_key
        if key is None or not isinstance(batch, Mapping):
            return None
        mask = batch.get(key)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(a.shape[:2]):
            return None
        return (mask != 0).to(a.device)

    def _fit(self, ckpt: int) -> list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        func = self.fisher_loss_func
        sums: dict[str, list] = {}
        for batch in tqdm(self._fit_batches(), desc="K-FAC factors", leave=False, disable=None):
            for name, (a, s) in self.capture.run(batch, ckpt, "loss", func).items():
                mask = self._padding_mask(batch, a)
                A, S = kfac_covariances(a, s, self.bias[name], mask=mask, reduction="sum")
                tokens = a.shape[0] * a.shape[1] if mask is None else int(mask.sum())
                acc = sums.setdefault(name, [0, 0, 0, 0])
                acc[0], acc[1], acc[2] = acc[0] + A, acc[1] + S, acc[2] + tokens
                acc[3] += a.shape[0]
        eigen = {}
        n = self.data.count(range(len(self._fit_batches())))  # over every rank's part
        for name in self.module_name:  # a fixed order: collectives match across ranks
            # positions per example (this rank's batches: a property of the inputs' shape)
            self._positions[name] = float(sums[name][2]) / max(1, sums[name][3])
            A, S, tokens = (self.data.reduce(torch.as_tensor(t)) for t in sums[name][:3])
            _, qa, _, qs = kfac_eigen(A / tokens.clamp_min(1), S / n)  # 0: all padding
            # one eigenbasis for every rank (the corrected eigenvalues are summed in it)
            qa, qs = self.data.same(qa), self.data.same(qs)
            eigen[name] = (qa, qs, torch.zeros(qs.shape[0], qa.shape[0], dtype=qa.dtype,
                                               device=qa.device))
        for batch in tqdm(self._fit_batches(), desc="EK-FAC eigenvalues", leave=False, disable=None):
            for name, (a, s) in self.capture.run(batch, ckpt, "loss", func).items():
                qa, qs, lam = eigen[name]
                lam += ekfac_corrected_eigenvalues_from_activations(
                    a, s, qa, qs, self.bias[name], mask=self._padding_mask(batch, a),
                    reduction="sum")
        out, start = [], 0
        for name in self.module_name:
            qa, qs, lam = eigen[name]
            lam = self.data.reduce(lam)
            size = lam.numel()
            out.append((slice(start, start + size), qa, qs, lam / n))
            start += size
        return out

    def _precondition(self, ckpt: int) -> KroneckerEigenPreconditioner:
        """Each layer's ``Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T``, rows in chunks
        of ``_IHVP_CHUNK_BYTES`` per temporary (:class:`KroneckerEigenPreconditioner`)."""
        return KroneckerEigenPreconditioner(self._state[ckpt], self.damping, _IHVP_CHUNK_BYTES)

    def factors(self, ckpt: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``{module: (Q_A, Q_S, corrected eigenvalues)}`` at ``ckpt`` (after ``cache``)."""
        from dattri.errors import NotCachedError

        if ckpt not in self._state:
            msg = "factors needs cache(train_loader) first (and a valid ckpt index)."
            raise NotCachedError(msg)
        return {n: st[1:] for n, st in zip(self.module_name, self._state[ckpt])}
