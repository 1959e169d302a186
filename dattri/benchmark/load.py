"""``load_benchmark``: the benchmark's checkpoints and ground truth, trained once and cached.

The published dattri downloads pre-trained checkpoints and ground truth. Nothing
can be downloaded here, so this module *produces* them on first use with the
retraining engine (:mod:`dattri.model_util.retrain`) and loads them afterwards.
For a setting (:mod:`dattri.benchmark.settings`) and a size it keeps, under
``<cache>/benchmark/<setting>/<size>-<hash>/``::

    config.json                 what was trained (setting, size, data, seed)
    models_full/                num_full full-data models (train_ensemble)
    models_half/ensemble/       half-data models 0 .. num_ensemble-1 (retrain_lds)
    models_half/lds/            half-data models num_ensemble .. (retrain_lds, same plan)
    loo_<k>/                    leave-one-out models of k training points (retrain_loo)
    ground_truth/{lds,loo_<k>}.pt
    noisy/...                   the same for the noisy-label (AUC) variant

exactly as the paper describes it: 100 half-data models, the first 50 for
ensembles (TRAK-10/50), the last 50 for the LDS; LOO models for MNIST; 10% of the
labels flipped for AUC. Every file is written atomically and every step resumes,
so an interrupted call continues where it stopped. ``<cache>`` is ``cache_dir=``,
else ``$DATTRI_CACHE``, else ``$DATTRI_CACHE_DIR``, else ``~/.cache/dattri``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dattri.benchmark.settings import BenchmarkSetting, SettingSize, get_setting
from dattri.benchmark.utils import SubsetSampler, flip_label
from dattri.errors import DattriValueError

__all__ = [
    "LOSS_MAP",
    "MODEL_MAP",
    "REPO_URL",
    "SAMPLERSIZE_MAP",
    "SUPPORTED_DATASETS",
    "TRAIN_FUNC_MAP",
    "PreparedSetting",
    "default_cache_dir",
    "generate_url_map",
    "load_benchmark",
    "prepare_setting",
]

METRICS = ("lds", "loo", "auc")
_FORMAT = 1
_NOISE = 0.1


# ----------------------------------------------------------------------------- published maps
#: where the published release downloads its checkpoints and ground truth from
#: (nothing here downloads: ``load_benchmark`` trains them; see the module docstring)
REPO_URL = "https://huggingface.co/datasets/trais-lab/dattri-benchmark/resolve/main/"


def generate_url_map(identifier: str) -> dict[str, Any]:
    """The published release's download addresses of a setting ``f"{dataset}_{model}"``.

    ``{"models_full": url, "models_half": url, "groundtruth": {"lds": [indices_url,
    values_url], "loo": [indices_url, values_url]}}``, as the published layout of
    ``REPO_URL`` has them. Only the addresses: this package cannot reach them and
    produces the same files itself (:func:`load_benchmark`).

    Raises:
        DattriValueError: ``identifier`` is not a non-empty string.
    """
    if not isinstance(identifier, str) or not identifier:
        msg = f"identifier: expected a setting name such as 'mnist_lr', got {identifier!r}."
        raise DattriValueError(msg)
    base = f"{REPO_URL}{identifier}/"

    def gt(metric: str) -> list[str]:
        return [f"{base}{metric}/{kind}_{metric}.pt?download=true"
                for kind in ("indices", "target_values")]

    return {"models_full": f"{base}{identifier}_full.zip?download=true",
            "models_half": f"{base}{identifier}_half.zip?download=true",
            "groundtruth": {"lds": gt("lds"), "loo": gt("loo")}}


class _LazyMap(Mapping):
    """A read-only map whose values are imported on first access (``"module:attr"``,
    optionally with positional arguments bound), so that importing this module does
    not import every setting's dependencies (``transformers``, ``music21``)."""

    def __init__(self, spec: Mapping[str, tuple | None]) -> None:
        self._spec = dict(spec)
        self._done: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._done:
            spec = self._spec[key]
            if spec is None:
                self._done[key] = None
            else:
                import importlib

                module, attr = spec[0].split(":")
                obj = getattr(importlib.import_module(module), attr)
                self._done[key] = partial(obj, *spec[1:]) if len(spec) > 1 else obj
        return self._done[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._spec)

    def __len__(self) -> int:
        return len(self._spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({sorted(self._spec)})"


_D = "dattri.benchmark.datasets."
#: published ``SUPPORTED_DATASETS``: dataset name -> ``create_*(path) -> (train, test)``
SUPPORTED_DATASETS = _LazyMap({
    "mnist": (_D + "mnist:create_mnist_dataset",),
    "cifar2": (_D + "cifar:create_cifar2_dataset",),
    "cifar10": (_D + "cifar:create_cifar10_dataset",),
    "shakespeare": (_D + "shakespeare_char:create_shakespeare_dataset",),
    "maestro": (_D + "maestro:create_maestro_datasets",),
    "wikitext2": (_D + "wikitext2:create_wikitext2_dataset",),
})
#: published ``LOSS_MAP``: setting -> ``loss(model_path, dataloader) -> per-batch losses``
LOSS_MAP = _LazyMap({
    "mnist_mlp": (_D + "mnist:loss_mnist_mlp",),
    "mnist_lr": (_D + "mnist:loss_mnist_lr",),
    "cifar2_resnet9": (_D + "cifar:loss_cifar_resnet9",),
    "shakespeare_nanogpt": (_D + "shakespeare_char:loss_shakespeare_nanogpt",),
    "maestro_musictransformer": (_D + "maestro:loss_maestro_musictransformer",),
    "wikitext2_gpt2": (_D + "wikitext2:loss_wikitext2_gpt2",),
})
#: published ``TRAIN_FUNC_MAP``: setting -> ``train(dataloader, seed=, device=) -> model``
TRAIN_FUNC_MAP = _LazyMap({
    "mnist_mlp": (_D + "mnist:train_mnist_mlp",),
    "mnist_lr": (_D + "mnist:train_mnist_lr",),
    "cifar2_resnet9": (_D + "cifar:train_cifar_resnet9",),
    "shakespeare_nanogpt": (_D + "shakespeare_char:train_shakespeare_nanogpt",),
    "maestro_musictransformer": (_D + "maestro:train_maestro_musictransformer",),
    "wikitext2_gpt2": (_D + "wikitext2:train_wikitext2_gpt2",),
})
#: published ``MODEL_MAP``: setting -> zero-argument factory of the (untrained) model
MODEL_MAP = _LazyMap({
    "mnist_mlp": (_D + "mnist:create_mlp_model", "mnist"),
    "mnist_lr": (_D + "mnist:create_lr_model", "mnist"),
    "cifar2_resnet9": (_D + "cifar:create_resnet9_model",),
    "shakespeare_nanogpt": (_D + "shakespeare_char:create_nanogpt_model",),
    "maestro_musictransformer": (_D + "maestro:create_musictransformer_model",),
    "wikitext2_gpt2": ("dattri.benchmark.models.gpt2:create_gpt2_model",),
})
#: published ``SAMPLERSIZE_MAP``: ``[n_train, n_test]`` of each setting's full size on
#: the original data (nanoGPT / GPT-2: every block of Tiny Shakespeare / WikiText-2)
SAMPLERSIZE_MAP = {
    "mnist_mlp": [5000, 500], "mnist_lr": [5000, 500], "cifar2_resnet9": [5000, 500],
    "shakespeare_nanogpt": [3921, 435], "maestro_musictransformer": [5000, 178],
    "wikitext2_gpt2": [4656, 481],
}


def default_cache_dir() -> Path:
    """``$DATTRI_CACHE``, else ``$DATTRI_CACHE_DIR``, else ``~/.cache/dattri``."""
    env = os.environ.get("DATTRI_CACHE") or os.environ.get("DATTRI_CACHE_DIR")
    return Path(env or "~/.cache/dattri").expanduser()


@dataclass
class PreparedSetting:
    """A setting at one size with its data loaded and its cache folder chosen.

    Attributes:
        setting, size: the record and its configuration.
        root: the cache folder of this (setting, size, data, seed).
        train_dataset, test_dataset: the datasets; examples ``range(n_train)`` and
            ``range(n_test)`` of them are the benchmark's (loader positions).
        n_train, n_test: benchmark sizes.
        seed: base seed of every model and subset.
        model_kwargs: keywords of ``setting.create_model`` (sizes, vocabulary).
        flipped: flipped training positions (noisy-label variant), else ``None``.
        config: JSON-able description, written to ``root/config.json`` on training.
    """

    setting: BenchmarkSetting
    size: SettingSize
    root: Path
    train_dataset: Any
    test_dataset: Any
    n_train: int
    n_test: int
    seed: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    flipped: list[int] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def train_sampler(self) -> SubsetSampler:
        """Positions ``0 .. n_train-1`` of the training set, in order."""
        return SubsetSampler(range(self.n_train))

    @property
    def test_sampler(self) -> SubsetSampler:
        """Positions ``0 .. n_test-1`` of the test set, in order."""
        return SubsetSampler(range(self.n_test))

    def model_factory(self) -> partial:
        """A picklable zero-argument factory of the (untrained) model."""
        return partial(self.setting.create_model, **self.model_kwargs)

    def make_model(self) -> nn.Module:
        """A fresh model in eval mode (checkpoints are loaded into it)."""
        return self.model_factory()().eval()

    def train_callable(self) -> partial:
        """``train_func(loader, seed=, device=)`` with the size's keywords bound."""
        kwargs = dict(self.size.train_kwargs)
        if "model_kwargs" in inspect.signature(self.setting.train_func).parameters:
            kwargs["model_kwargs"] = dict(self.model_kwargs)
        return partial(self.setting.train_func, **kwargs)

    def train_loader(self, batch_size: int | None = None) -> DataLoader:
        """Fixed-order loader over the benchmark's training examples."""
        return DataLoader(self.train_dataset, batch_size=batch_size or self.setting.batch_size,
                          sampler=self.train_sampler)

    def test_loader(self, batch_size: int | None = None) -> DataLoader:
        """Fixed-order loader over the benchmark's test examples."""
        return DataLoader(self.test_dataset, batch_size=batch_size or self.setting.attr_batch_size,
                          sampler=self.test_sampler)


# ----------------------------------------------------------------------------- preparation
def _cache_key(setting: BenchmarkSetting, size: SettingSize, data_path: Any, seed: int) -> str:
    desc = size.to_dict()
    for k in ("note", "loo_size"):
        desc.pop(k)
    blob = json.dumps({"setting": setting.name, "size": desc, "seed": seed, "format": _FORMAT,
                       "data": None if data_path is None else str(Path(data_path).resolve())},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        msg = f"{name}: expected an int >= {low}, got {value!r}."
        raise DattriValueError(msg)
    return int(value)


def prepare_setting(
    setting: str | BenchmarkSetting,
    size: str | SettingSize = "full",
    data_path: str | os.PathLike | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> PreparedSetting:
    """Load a setting's data and choose its cache folder (no training).

    Args:
        setting: a :class:`BenchmarkSetting` or its name.
        size: ``"full"``, ``"reduced"``, ``"tiny"`` or a :class:`SettingSize`.
        data_path: the original data set on disk (``None``: the offline source).
        seed: base seed.
        cache_dir: cache root (``None``: :func:`default_cache_dir`).

    Returns:
        The :class:`PreparedSetting`.

    Raises:
        DattriValueError: unknown setting / size, bad seed, or a dataset smaller
            than the size asks for.
    """
    rec = setting if isinstance(setting, BenchmarkSetting) else get_setting(setting)
    sz = rec.size(size)
    seed = _check_int("seed", seed, 0)
    train, test = rec.create_datasets(data_path, sz, seed)
    n_train = len(train) if sz.n_train is None else sz.n_train
    n_test = len(test) if sz.n_test is None else sz.n_test
    for name, want, have in (("n_train", n_train, len(train)), ("n_test", n_test, len(test))):
        if want > have:
            msg = (f"size: {rec.name} at size {sz.name!r} needs {name}={want} examples but the "
                   f"data has {have}; use a smaller size or pass data_path= the full data.")
            raise DattriValueError(msg)
    model_kwargs = dict(sz.model_kwargs)
    if rec.model_kwargs_from_data is not None:
        model_kwargs.update(rec.model_kwargs_from_data(train))
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = base / "benchmark" / rec.name / f"{sz.name}-{_cache_key(rec, sz, data_path, seed)}"
    prep = PreparedSetting(rec, sz, root, train, test, n_train, n_test, seed, model_kwargs)
    prep.config = {"setting": rec.name, "size": sz.to_dict(), "seed": seed,
                   "data_path": None if data_path is None else str(data_path),
                   "train_source": getattr(train, "source", type(train).__name__),
                   "model_kwargs": model_kwargs}
    return prep


def noisy_variant(prep: PreparedSetting) -> PreparedSetting:
    """The noisy-label variant: 10% of the ``n_train`` labels flipped (seeded).

    The training set becomes a copy of its first ``n_train`` examples whose labels
    at ``flipped`` positions are replaced by a different label (:func:`flip_label`),
    and the cache folder is ``root/noisy``.
    """
    rec = prep.setting
    targets = getattr(prep.train_dataset, "targets", None)
    if rec.task != "classification" or targets is None or not hasattr(prep.train_dataset, "subset"):
        msg = f"metric: 'auc' (noisy-label detection) needs a classification setting, got {rec.name!r}."
        raise DattriValueError(msg)
    clean = prep.train_dataset.subset(range(prep.n_train))
    noisy, flipped = flip_label(clean.targets, label_space=range(rec.num_classes), p=_NOISE,
                                seed=prep.seed)
    clean.targets = noisy
    out = PreparedSetting(rec, prep.size, prep.root / "noisy", clean, prep.test_dataset,
                          prep.n_train, prep.n_test, prep.seed, dict(prep.model_kwargs), flipped)
    _write_json({"flipped": flipped, "p": _NOISE, "seed": prep.seed}, out.root / "flipped.json")
    return out


# ----------------------------------------------------------------------------- training
def _engine_kwargs(prep: PreparedSetting, device: Any, executor: Any, num_workers: int | None,
                   progress: bool | None, vectorized: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"executor": executor, "num_workers": num_workers, "progress": progress}
    if vectorized and prep.setting.vectorized is not None:
        import dataclasses

        vt = prep.setting.vectorized(prep.size)
        kw["vectorized"] = dataclasses.replace(vt, device=device)
    else:
        kw["train_func"] = prep.train_callable()
        kw["device"] = device
    return kw


def _model_count(root: Path) -> int:
    return sum(1 for _ in root.rglob("*.safetensors")) if root.exists() else 0


def _models_full(prep: PreparedSetting, kw: dict[str, Any]) -> list[str]:
    from dattri.model_util.ensemble import train_ensemble

    return train_ensemble(dataloader=prep.train_loader(), path=prep.root / "models_full",
                          num_models=prep.size.num_full, seed=prep.seed, subset_ratio=1.0, **kw)


def _half_dir(prep: PreparedSetting, part: str, kw: dict[str, Any]) -> Path:
    from dattri.model_util.retrain import retrain_lds

    num, start = ((prep.size.num_ensemble, 0) if part == "ensemble"
                  else (prep.size.num_lds, prep.size.num_ensemble))
    path = prep.root / "models_half" / part
    if num > 0:
        retrain_lds(dataloader=prep.train_loader(), path=path, num_subsets=num,
                    subset_ratio=0.5, start_id=start, seed=prep.seed, **kw)
    return path


def _paths(folder: Path) -> list[str]:
    from dattri.model_util.ensemble import checkpoint_paths

    return checkpoint_paths(folder, verify=False) if (folder / "metadata.json").is_file() else []


def loo_positions(n_train: int, loo_size: int, seed: int) -> list[int]:
    """The left-out training positions: all, or a seeded sorted sample of ``loo_size``."""
    if loo_size >= n_train:
        return list(range(n_train))
    rng = np.random.default_rng([int(seed), 7])
    return sorted(int(i) for i in rng.choice(n_train, loo_size, replace=False))


# ----------------------------------------------------------------------------- ground truth
def _meta_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "metadata.json").read_bytes()).hexdigest()


def _cached_gt(file: Path, folder: Path, compute: Any) -> tuple[torch.Tensor, torch.Tensor]:
    digest = _meta_digest(folder)
    if file.is_file():
        saved = torch.load(file, weights_only=True)
        if saved.get("digest") == digest:
            return saved["values"], saved["indices"]
    values, indices = compute()
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    torch.save({"values": values, "indices": indices, "digest": digest}, tmp)
    os.replace(tmp, file)
    return values, indices


def _lds_gt(prep: PreparedSetting, lds_dir: Path, device: Any, progress: bool | None):
    from dattri.metric import calculate_lds_ground_truth

    target = prep.setting.target_builder(prep.make_model())
    return _cached_gt(prep.root / "ground_truth" / "lds.pt", lds_dir, lambda: calculate_lds_ground_truth(
        target, lds_dir, prep.test_loader(), device=device, progress=progress))


def _loo_gt(prep: PreparedSetting, loo_size: int, kw: dict[str, Any], device: Any,
            progress: bool | None):
    from dattri.metric import calculate_loo_ground_truth
    from dattri.model_util.ensemble import recorded_seed
    from dattri.model_util.retrain import retrain_loo, train_seed

    folder = prep.root / f"loo_{loo_size}"
    # The seed of models_full[0]: with the vectorised trainer the LOO folder's full
    # model is then the attributed model itself, and LOO differences are exact.
    retrain_loo(dataloader=prep.train_loader(), path=folder,
                indices=loo_positions(prep.n_train, loo_size, prep.seed),
                seed=recorded_seed(prep.root / "models_full", 0, train_seed(prep.seed, 0)), **kw)
    target = prep.setting.target_builder(prep.make_model())
    return _cached_gt(prep.root / "ground_truth" / f"loo_{loo_size}.pt", folder,
                      lambda: calculate_loo_ground_truth(target, folder, prep.test_loader(),
                                                         device=device, progress=progress))


# ----------------------------------------------------------------------------- public entry
def _details(prep: PreparedSetting, metric: str, full: list[str], half: list[str]) -> dict[str, Any]:
    rec, model = prep.setting, prep.make_model()
    loss = rec.loss_builder(model)
    target = loss if rec.target_builder is rec.loss_builder else rec.target_builder(model)
    margin = rec.margin_builder(model)
    margin_target = rec.margin_target_builder(model) if rec.last_token_target else margin
    notes = [f"{rec.name} size {prep.size.name!r}: {prep.size.note}"] if prep.size.note else []
    source = str(getattr(prep.train_dataset, "source", "")) or type(prep.train_dataset).__name__
    notes.append(f"{rec.name} data: {source}")
    return {
        "model": model, "models_full": full, "models_half": half,
        "train_dataset": prep.train_dataset, "test_dataset": prep.test_dataset,
        "train_sampler": prep.train_sampler, "test_sampler": prep.test_sampler,
        "loss_func": loss, "target_func": target, "train_func": prep.train_callable(),
        "margin_func": margin, "margin_target_func": margin_target,
        "correct_probability_func": rec.probability_builder(model),
        "final_linear_layer_name": rec.final_layer,
        "setting": rec, "size": prep.size, "metric": metric, "seed": prep.seed,
        "notes": notes,
        "cache": {"root": str(prep.root),
                  "key": "/".join(prep.root.parts[-2 if prep.flipped is None else -3:])},
    }


_CHECKPOINT_FORMATS = ("safetensors", "pt")


def _plain_copies(root: Path, paths: list[str]) -> list[str]:
    """``torch.save(state_dict)`` copies of checkpoint files, under ``root/pt/`` (same
    relative paths, ``.pt``): what ``torch.load(path)`` in published code reads.
    Written once (atomically); rewritten when the source is newer."""
    from dattri.task import load_state_dict_file

    out = []
    for p in paths:
        src = Path(p)
        try:
            rel = src.resolve().relative_to(root.resolve())
        except ValueError:
            rel = Path(src.name)
        dst = root / "pt" / rel.with_suffix(".pt")
        if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            torch.save(load_state_dict_file(src), tmp)
            os.replace(tmp, dst)
        out.append(str(dst))
    return out


def load_benchmark(
    model: str,
    dataset: str,
    metric: str,
    download_path: str | os.PathLike | None = None,
    redownload: bool = False,
    *,
    cache_dir: str | os.PathLike | None = None,
    size: str | SettingSize = "full",
    data_path: str | os.PathLike | None = None,
    seed: int = 0,
    loo_size: int | None = None,
    device: str | torch.device = "cpu",
    executor: Any = None,
    num_workers: int | None = 0,
    vectorized: bool = True,
    progress: bool | None = None,
    checkpoint_format: str = "safetensors",
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """Checkpoints, data and ground truth of a benchmark setting (trained on first use).

    Args:
        model, dataset: e.g. ``("lr", "mnist")``, ``("mlp", "mnist")``,
            ``("resnet9", "cifar2")``, ``("resnet9", "cifar10")``,
            ``("musictransformer", "maestro")``, ``("nanogpt", "shakespeare")``.
        metric: ``"lds"``, ``"loo"`` or ``"auc"`` (those of Table 3 for the setting).
        download_path: the published name of ``cache_dir`` (nothing is downloaded).
        redownload: delete this setting's cache and train everything again.
        cache_dir: cache root (default :func:`default_cache_dir`).
        size: ``"full"`` (the paper's), ``"reduced"`` (CPU-sized), ``"tiny"``
            (tests; MNIST only) or a :class:`~dattri.benchmark.settings.SettingSize`.
        data_path: the original data set on disk (``None``: offline source).
        seed: base seed of all models, subsets and label flips.
        loo_size: left-out training points for LOO (default: the size's).
        device: where models are trained and ground truth is evaluated.
        executor: ``concurrent.futures``-style executor for retraining (Dask, Ray...).
        num_workers: local processes when ``executor`` is None (0: this process).
        vectorized: train small models many at once (MNIST) with the vmapped trainer.
        progress: progress bars (``None``: on a terminal).
        checkpoint_format: ``"safetensors"`` (the files as trained) or ``"pt"``:
            ``models_full`` / ``models_half`` are plain ``torch.save(state_dict)``
            copies (under ``<root>/pt/``), the files published code reads with
            ``torch.load(path)``.

    Returns:
        ``(model_details, ground_truth)``. ``model_details`` has ``"model"`` (eval
        mode), ``"models_full"`` / ``"models_half"`` (checkpoint paths; half =
        ensemble part, plus the LDS part for ``metric="lds"``), ``"train_dataset"``,
        ``"train_sampler"``, ``"test_dataset"``, ``"test_sampler"``,
        ``"loss_func"`` / ``"target_func"`` (``f(params, batch)``, bound to
        ``"model"``; deliberate: the published ones were per-checkpoint loss
        functions), ``"train_func"``, TRAK's ``"margin_func"``,
        ``"margin_target_func"``, ``"correct_probability_func"``, RPS's
        ``"final_linear_layer_name"``, ``"setting"``, ``"size"``, ``"notes"``,
        ``"cache"`` (root and ``trained_models``, the count trained by this call),
        plus ``"flipped_indices"`` (AUC) or ``"loo_indices"`` (LOO).
        ``ground_truth`` is ``(values (50, n_test), indices (50, n_train/2))`` for
        LDS (negated losses of ``models_half[num_ensemble:]``),
        ``(values (k, n_test), left-out positions (k,))`` for LOO, and
        ``(is_flipped (n_train,) 0/1, flipped positions)`` for AUC, ready for
        :mod:`dattri.metric`. For AUC the datasets and checkpoints are the noisy ones.

    Raises:
        DattriValueError: unknown model/dataset/metric/size, or bad sizes.
    """
    rec = get_setting(model, dataset)
    if checkpoint_format not in _CHECKPOINT_FORMATS:
        msg = (f"checkpoint_format: expected one of {list(_CHECKPOINT_FORMATS)}, got "
               f"{checkpoint_format!r}; 'pt' gives files that torch.load reads.")
        raise DattriValueError(msg)
    metric = str(metric).lower()
    if metric not in rec.metrics:
        msg = (f"metric: {metric!r} is not a metric of {rec.name} (paper Table 3 has "
               f"{list(rec.metrics)}); pass one of them.")
        raise DattriValueError(msg)
    if cache_dir is None and download_path is not None:
        cache_dir = download_path
    prep = prepare_setting(rec, size, data_path, seed, cache_dir)
    if redownload and prep.root.exists():
        shutil.rmtree(prep.root)
        prep = prepare_setting(rec, size, data_path, seed, cache_dir)
    if not (prep.root / "config.json").is_file():
        _write_json(prep.config, prep.root / "config.json")
    if metric == "auc":
        prep = noisy_variant(prep)
    before = _model_count(prep.root)
    kw = _engine_kwargs(prep, device, executor, num_workers, progress, vectorized)
    full = _models_full(prep, kw)
    half = _paths(_half_dir(prep, "ensemble", kw))
    if metric == "lds":
        lds_dir = _half_dir(prep, "lds", kw)
        half = half + _paths(lds_dir)
        gt = _lds_gt(prep, lds_dir, device, progress)
    elif metric == "loo":
        k = prep.size.loo_size if loo_size is None else _check_int("loo_size", loo_size, 1)
        k = min(k, prep.n_train)
        if k < 3:
            msg = f"loo_size: LOO needs at least 3 left-out points, got {k} for {rec.name}."
            raise DattriValueError(msg)
        gt = _loo_gt(prep, k, kw, device, progress)
    else:
        mask = torch.zeros(prep.n_train)
        mask[torch.as_tensor(prep.flipped, dtype=torch.long)] = 1.0
        gt = (mask, torch.as_tensor(prep.flipped, dtype=torch.long))
    if checkpoint_format == "pt":
        full, half = _plain_copies(prep.root, full), _plain_copies(prep.root, half)
    details = _details(prep, metric, full, half)
    details["cache"]["trained_models"] = _model_count(prep.root) - before
    if metric == "loo":
        details["loo_indices"] = gt[1].tolist()
        if len(gt[1]) < prep.n_train:
            details["notes"].append(f"{rec.name}: LOO over {len(gt[1])} of {prep.n_train} "
                                    "training points (a seeded sample)")
    if metric == "auc":
        details["flipped_indices"] = list(prep.flipped)
        details["notes"].append(f"{rec.name}: {len(prep.flipped)} of {prep.n_train} training "
                                f"labels flipped ({_NOISE:.0%})")
    return details, gt
