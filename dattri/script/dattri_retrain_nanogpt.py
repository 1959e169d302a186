"""``dattri_retrain_nanogpt``, at its published module path.

:func:`main` is the console script (the published arguments); :func:`retrain` is
the published function, run on dattri's retraining engine instead of nanoGPT's
``train.py`` in a subprocess: the models go to ``save_path`` as a retraining folder
(``metadata.json``, resumable) that :func:`dattri.metric.calculate_lds_ground_truth`
reads.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dattri.benchmark.cli import retrain_nanogpt_main
from dattri.errors import DattriValueError

__all__ = ["logger", "main", "read_nanogpt_config", "retrain"]

logger = logging.getLogger(__name__)

#: keys of a nanoGPT configuration file that :func:`retrain` uses
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")
TRAIN_KEYS = ("max_iters",)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the nanoGPT retraining command (the published arguments)."""
    return retrain_nanogpt_main(argv)


def read_nanogpt_config(config_path: str | os.PathLike) -> dict[str, Any]:
    """The ``name = literal`` assignments of a nanoGPT configuration file (such as
    the published ``config/train_shakespeare_char.py``), without executing it.

    Raises:
        DattriValueError: the file is missing or is not Python.
    """
    try:
        tree = ast.parse(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError) as e:
        msg = (f"config_path: {os.fspath(config_path)!r} is not a readable nanoGPT "
               f"configuration file ({e}); pass a file of `name = value` lines, or None.")
        raise DattriValueError(msg) from e
    out: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue  # an expression, not a literal: not a setting retrain uses
    return out


def _text_file(dataset_path: str | os.PathLike | None,
               dataset_file: str | os.PathLike | None) -> Path | None:
    for cand in (dataset_file, None if dataset_path is None else Path(dataset_path) / "input.txt"):
        if cand is not None and Path(cand).is_file():
            return Path(cand)
    return None


def _tinystories_data(path: Any, size: Any, seed: int) -> tuple[Any, Any]:
    from dattri.benchmark.datasets.tinystories import create_tinystories_dataset

    return create_tinystories_dataset(path, n_train=size.n_train, n_test=size.n_test,
                                      seed=seed, **size.data_kwargs)


def retrain(
    seed: int,
    subset_ratio: float,
    config_path: str | os.PathLike | None,
    dataset_path: str | os.PathLike | None,
    dataset_file: str | os.PathLike | None,
    save_path: str | os.PathLike,
    partition: Sequence[int],
    only_download: bool = False,
    *,
    size: str = "full",
    device: str = "cpu",
) -> dict[str, Any] | None:
    """Train nanoGPT models ``start .. end-1`` on seeded subsets (the published function).

    Model ``i`` trains on the subset ``i`` of ``subset_ratio`` of the training blocks
    (:func:`dattri.model_util.retrain.retrain_lds`, seeds derived from ``seed``).

    Args:
        seed: base seed.
        subset_ratio: fraction of the training blocks, in ``(0, 1]``.
        config_path: a nanoGPT configuration file; its ``n_layer``, ``n_head``,
            ``n_embd``, ``block_size``, ``dropout``, ``bias`` and ``max_iters`` are
            used (read, not executed); ``None``: the setting's ``size``.
        dataset_path: the data folder: a Tiny Shakespeare ``input.txt`` in it is
            used; a folder named ``tinystories`` selects TinyStories.
        dataset_file: a text file (Tiny Shakespeare ``input.txt``, or TinyStories'
            ``TinyStoriesV2-GPT4-train.txt``); neither given: the offline
            Shakespeare stand-in (said in a warning).
        save_path: the retraining folder.
        partition: ``[start, end, total]``.
        only_download: only read the data and log where it came from.
        size: ``"full"`` (the paper's nanoGPT) or ``"reduced"``, before the
            configuration file's values.
        device: where the models train.

    Returns:
        The retraining summary of :func:`retrain_lds`, or ``None`` with
        ``only_download``.

    Raises:
        DattriValueError: ``subset_ratio`` outside ``(0, 1]``, a bad ``partition``
            or configuration file.
        TinyStoriesNotFoundError: TinyStories asked for and not on disk.
    """
    from dattri.benchmark.load import prepare_setting
    from dattri.benchmark.settings import get_setting
    from dattri.model_util.retrain import retrain_lds

    if isinstance(subset_ratio, bool) or not isinstance(subset_ratio, (int, float)) \
            or not 0 < subset_ratio <= 1:
        msg = f"subset_ratio={subset_ratio!r} must be a fraction in (0, 1] (e.g. 0.5)."
        raise DattriValueError(msg)
    if len(partition) != 3 or not all(isinstance(p, int) and p >= 0 for p in partition):  # noqa: PLR2004
        msg = f"partition={list(partition)!r} must be [start, end, total] of ints >= 0."
        raise DattriValueError(msg)
    start, end, total = partition
    end = min(end, total)
    if end <= start:
        msg = f"partition={list(partition)!r} selects no model (need start < min(end, total))."
        raise DattriValueError(msg)
    rec = get_setting("shakespeare_nanogpt")
    tiny_stories = (dataset_path is not None and Path(dataset_path).name == "tinystories") or (
        dataset_file is not None and "tinystories" in Path(dataset_file).name.lower())
    text = _text_file(dataset_path, dataset_file)
    if tiny_stories:
        rec = dataclasses.replace(rec, name="tinystories_nanogpt", dataset="tinystories",
                                  create_datasets=_tinystories_data)
        text = dataset_file if dataset_file is not None else dataset_path
    sz = rec.size(size)
    model_kwargs, train_kwargs = dict(sz.model_kwargs), dict(sz.train_kwargs)
    data_kwargs = dict(sz.data_kwargs)
    if config_path is not None:
        cfg = read_nanogpt_config(config_path)
        model_kwargs.update({k: cfg[k] for k in MODEL_KEYS if k in cfg})
        train_kwargs.update({k: cfg[k] for k in TRAIN_KEYS if k in cfg})
        if "block_size" in cfg:
            data_kwargs["block_size"] = cfg["block_size"]
    # every training block is in the pool; no test split is needed to retrain
    sz = dataclasses.replace(sz, n_train=None, n_test=None, model_kwargs=model_kwargs,
                             train_kwargs=train_kwargs, data_kwargs=data_kwargs)
    prep = prepare_setting(rec, sz, text, seed)
    source = getattr(prep.train_dataset, "source", "?")
    if only_download:
        logger.info("dataset ready: %d training blocks from %s", len(prep.train_dataset), source)
        return None
    logger.info("retraining nanoGPT models %d..%d of %d on %s", start, end - 1, total, source)
    return retrain_lds(prep.train_callable(), prep.train_loader(), save_path,
                       num_subsets=end - start, start_id=start, subset_ratio=subset_ratio,
                       seed=seed, num_workers=0, device=device)


if __name__ == "__main__":
    sys.exit(main())
