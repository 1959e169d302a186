"""Brittleness: how many top-attributed training examples must go to flip a prediction.

For a test example ``z_j`` and scores ``tau[:, j]`` (positive = proponent), rank
the training examples from the highest score down; for each ``k`` of the search
space (increasing), retrain without the top ``k`` and compare the prediction on
``z_j`` with the prediction of the model trained on the whole training set. The
brittleness is the smallest ``k`` that changes it (Ilyas et al. 2022,
"Datamodels"; Park et al. 2023, TRAK, Section 5). A better attribution method
finds smaller sets.

Differences from older dattri releases (deliberate): the reference is the
full-data model's prediction rather than the label (so a test example the model
already gets wrong is not "flipped" by removing nothing), ``k = 0`` is skipped,
score rows follow the training loader order (also with a ``SubsetSampler``), and
several test columns give one answer each.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dattri.errors import DattriValueError, NonFiniteError
from dattri.model_util.retrain import loader_dataset_indices

__all__ = ["brittleness", "check_if_flip"]


def _predictions(eval_func: Callable, model: nn.Module, test_loader: Iterable) -> torch.Tensor:
    pred = eval_func(model, test_loader)
    return torch.as_tensor(pred).detach().reshape(-1).cpu()


def _retrain(train_loader: DataLoader, order: np.ndarray, keep: np.ndarray, train_func: Callable,
             device: Any, seed: int | None) -> nn.Module:
    loader = DataLoader(Subset(train_loader.dataset, order[keep].tolist()),
                        batch_size=train_loader.batch_size or 1,
                        collate_fn=train_loader.collate_fn, shuffle=False)
    if seed is not None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002
        random.seed(seed)
    model = train_func(loader)
    if not isinstance(model, nn.Module):
        msg = f"train_func must return an nn.Module, got {type(model).__name__}."
        raise DattriValueError(msg)
    model.to(device)
    model.eval()
    return model


def _check_scores(scores: Any, n_train: int) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().cpu()
    if scores.dim() == 1:
        scores = scores.unsqueeze(1)
    if scores.dim() != 2 or scores.shape[0] != n_train:
        msg = (
            f"scores must be (n_train, n_test) with n_train = {n_train} (the training "
            f"loader's length), got shape {tuple(scores.shape)}."
        )
        raise DattriValueError(msg)
    if not bool(torch.isfinite(scores).all()):
        msg = "scores contain NaN or inf; fix the attribution before measuring brittleness."
        raise NonFiniteError(msg)
    return scores


def _search_space(search_space: Sequence[int] | None, n_train: int) -> list[int]:
    ks = list(range(0, 200, 20)) if search_space is None else [int(k) for k in search_space]
    ks = sorted({k for k in ks if k > 0})
    if not ks or ks[-1] >= n_train:
        msg = (
            f"search_space must hold sizes in [1, {n_train}) (number of removed "
            f"training examples), got {list(search_space) if search_space is not None else 'default'}."
        )
        raise DattriValueError(msg)
    return ks


def brittleness(
    train_loader: DataLoader,
    test_loader: Iterable,
    scores: torch.Tensor,
    train_func: Callable[[DataLoader], nn.Module],
    eval_func: Callable[[nn.Module, Iterable], torch.Tensor],
    device: str | torch.device = "cpu",
    search_space: Sequence[int] | None = None,
    seed: int | None = None,
    progress: bool | None = None,
) -> int | None | list[int | None]:
    """Smallest number of top-scored training examples whose removal flips a prediction.

    ``B(j) = min { k in search_space : pred_{theta(S \\ top_k(tau[:, j]))}(z_j) != pred_{theta(S)}(z_j) }``

    Args:
        train_loader: training loader (fixed order; its positions are score rows).
        test_loader: loader of the test example(s), in score-column order.
        scores: ``(n_train,)`` or ``(n_train, n_test)`` attribution scores.
        train_func: ``train_func(loader) -> nn.Module``; called once on the full set
            and once per tried ``k``, with a non-shuffling loader over the kept rows.
        eval_func: ``eval_func(model, test_loader) -> predictions`` ``(n_test,)``.
        device: where the trained model is moved before ``eval_func``.
        search_space: candidate ``k`` (default ``0, 20, ..., 180``; ``k = 0`` is
            skipped). The smallest flipping ``k`` in it is returned.
        seed: if given, torch / numpy / random are seeded with it before every
            call of ``train_func`` (removes training noise from the comparison).
        progress: progress bar (None: only on a terminal).

    Returns:
        For one test column an int or None (no ``k`` in the space flips it); for
        several, a list of those.

    Raises:
        DattriValueError: bad shapes or search space. NonFiniteError: NaN scores.
    """
    order = loader_dataset_indices(train_loader)
    n_train = len(order)
    scores = _check_scores(scores, n_train)
    ks = _search_space(search_space, n_train)
    everyone = np.arange(n_train)
    full_model = _retrain(train_loader, order, everyone, train_func, device, seed)
    reference = _predictions(eval_func, full_model, test_loader)
    if reference.shape[0] != scores.shape[1]:
        msg = (
            f"eval_func returned {reference.shape[0]} prediction(s) but scores have "
            f"{scores.shape[1]} test column(s); they must match."
        )
        raise DattriValueError(msg)
    results: list[int | None] = []
    bar = tqdm(total=scores.shape[1] * len(ks), desc="brittleness", leave=False,
               disable=(not progress) if progress is not None else None)
    for j in range(scores.shape[1]):
        ranking = torch.argsort(scores[:, j], descending=True, stable=True).numpy()
        found = None
        for k in ks:
            keep = np.setdiff1d(everyone, ranking[:k])  # sorted: loader order kept
            model = _retrain(train_loader, order, keep, train_func, device, seed)
            bar.update(1)
            if _predictions(eval_func, model, test_loader)[j] != reference[j]:
                found = k
                break
        bar.update(len(ks) - (ks.index(found) + 1 if found is not None else len(ks)))
        results.append(found)
    bar.close()
    return results[0] if len(results) == 1 else results


def check_if_flip(
    train_loader: DataLoader,
    test_loader: Iterable,
    indices_to_remove: Sequence[int],
    train_func: Callable[[DataLoader], nn.Module],
    eval_func: Callable[[nn.Module, Iterable], Any],
    device: Any = "cpu",
) -> bool:
    """Whether the prediction on ONE test example differs from its label after
    retraining without ``indices_to_remove`` (the published 0.3.0 helper).

    Args:
        train_loader: the training data (its dataset indices, from its sampler).
        test_loader: yields exactly one ``(x, label)`` example.
        indices_to_remove: dataset indices of the training examples to drop.
        train_func: ``f(loader) -> model`` trained on the remaining examples (kept
            in the loader's order).
        eval_func: ``f(model, test_loader) -> prediction`` (one class index).
        device: where the retrained model is evaluated.

    Returns:
        ``prediction != label`` (the published convention; :func:`brittleness`
        compares with the full-data model's prediction instead).
    """
    batches = list(test_loader)
    labels = [b[1] for b in batches if isinstance(b, (list, tuple)) and len(b) >= 2]
    if len(labels) != len(batches) or sum(torch.as_tensor(y).numel() for y in labels) != 1:
        msg = ("check_if_flip: test_loader must yield exactly one (x, label) example; for "
               "several test examples use dattri.metric.brittleness(...).")
        raise DattriValueError(msg)
    order = np.asarray(loader_dataset_indices(train_loader))
    keep = ~np.isin(order, np.asarray(list(indices_to_remove), dtype=np.int64))
    model = _retrain(train_loader, order, keep, train_func, device, None)
    pred = _predictions(eval_func, model, test_loader)
    if pred.numel() != 1:
        msg = f"check_if_flip: eval_func returned {pred.numel()} predictions for one test example."
        raise DattriValueError(msg)
    return bool(int(pred[0]) != int(torch.as_tensor(labels[0]).reshape(-1)[0]))
