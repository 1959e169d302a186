"""The rest of the published dattri's public names, each used as the published
docstrings describe and checked against a closed form or a dense reference:
``dattri.func.fisher``'s EK-FAC estimation functions, ``dattri.benchmark.load``'s
maps, the published dataset modules, published LOO retraining folders, and the
GPT-2 + WikiText-2 benchmark setting."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import pytest

D64 = torch.float64


# ------------------------------------------------------- dattri.func.fisher estimates
def _hooked_mlp():
    """Two linear layers with the published EK-FAC hook: inputs get a column of ones
    for the bias, outputs are kept (the published attributor's ``layer_cache``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    cache: dict = {}

    def hook(name):
        def fn(mod, inputs, outputs):
            a = inputs[0]
            if mod.bias is not None:
                a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)
            cache[name] = (a, outputs)
        return fn

    for name in ("0", "2"):
        model.get_submodule(name).register_forward_hook(hook(name))
    return model, cache


def test_fisher_estimates_equal_per_example_gradient_reference():
    from dattri.func.fisher import (
        IFVPUsageError,
        estimate_covariance,
        estimate_eigenvector,
        estimate_lambda,
    )

    model, cache = _hooked_mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 4, generator=g, dtype=D64), torch.randint(0, 2, (10,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches 4, 4, 2

    def func(batch):  # the published convention: mean loss of a batch tuple
        return F.cross_entropy(model(batch[0]), batch[1])

    before = [p.grad for p in model.parameters()]
    cov = estimate_covariance(func, loader, cache)
    assert [p.grad for p in model.parameters()] == before  # the user's model untouched
    # dense reference: per-example gradients of each layer's [W | b] by autograd
    acts, grads = {"0": [], "2": []}, {"0": [], "2": []}
    for i in range(10):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        outs = [cache[k][1] for k in ("0", "2")]
        gs = torch.autograd.grad(loss, outs)
        for k, gk in zip(("0", "2"), gs):
            acts[k].append(cache[k][0][0])
            grads[k].append(gk[0])
    for k in ("0", "2"):
        a, s = torch.stack(acts[k]), torch.stack(grads[k])
        torch.testing.assert_close(cov[k][0], a.T @ a / 10)
        torch.testing.assert_close(cov[k][1], s.T @ s / 10)
    q = estimate_eigenvector(cov)
    for k in ("0", "2"):
        qa, qs = q[k]
        for Q, C in ((qa, cov[k][0]), (qs, cov[k][1])):
            d = Q.T @ C @ Q
            torch.testing.assert_close(d, torch.diag(torch.diagonal(d)), atol=1e-12, rtol=0)
    lam = estimate_lambda(func, loader, q, cache)
    for k in ("0", "2"):
        a, s = torch.stack(acts[k]), torch.stack(grads[k])
        G = s[:, :, None] * a[:, None, :]  # per-example [dW | db]
        qa, qs = q[k]
        torch.testing.assert_close(lam[k], (qs.T @ G @ qa).square().mean(0))
    # max_iter: the first batch only
    first = estimate_covariance(func, loader, cache, max_iter=1)
    a = torch.stack(acts["0"][:4])
    torch.testing.assert_close(first["0"][0], a.T @ a / 4)
    with pytest.raises(IFVPUsageError, match="max_iter=0"):
        estimate_covariance(func, loader, cache, max_iter=0)
    with pytest.raises(IFVPUsageError, match="layer_cache is empty"):
        estimate_covariance(func, loader, {})


# ------------------------------------------------------------ dattri.benchmark.load
def test_published_load_maps_and_url_map():
    from dattri.benchmark import load
    from dattri.benchmark.models.mlp import MLPMnist
    from dattri.errors import DattriValueError

    urls = load.generate_url_map("mnist_lr")
    assert urls["models_full"] == load.REPO_URL + "mnist_lr/mnist_lr_full.zip?download=true"
    assert urls["groundtruth"]["lds"][1].endswith("mnist_lr/lds/target_values_lds.pt?download=true")
    assert urls["groundtruth"]["loo"][0].endswith("mnist_lr/loo/indices_loo.pt?download=true")
    with pytest.raises(DattriValueError, match="identifier"):
        load.generate_url_map(3)
    identifiers = {"mnist_mlp", "mnist_lr", "cifar2_resnet9", "shakespeare_nanogpt",
                   "maestro_musictransformer", "wikitext2_gpt2"}
    for m in (load.LOSS_MAP, load.TRAIN_FUNC_MAP, load.MODEL_MAP, load.SAMPLERSIZE_MAP):
        assert set(m) == identifiers
    assert isinstance(load.MODEL_MAP["mnist_mlp"](), MLPMnist)  # zero-argument factory
    assert load.SAMPLERSIZE_MAP["mnist_lr"] == [5000, 500]
    assert load.SAMPLERSIZE_MAP["wikitext2_gpt2"] == [4656, 481]
    assert {"mnist", "cifar2", "shakespeare", "maestro", "wikitext2"} <= set(load.SUPPORTED_DATASETS)
    # the published loss functions evaluate a saved checkpoint on a loader
    model = load.MODEL_MAP["mnist_lr"]()
    assert callable(load.LOSS_MAP["mnist_lr"]) and callable(load.TRAIN_FUNC_MAP["mnist_lr"])
    assert model.linear.in_features == 784


def test_gpt2_wikitext2_setting_offline(tmp_path):
    pytest.importorskip("transformers", reason="the GPT-2 setting needs transformers")
    from dattri.algorithm import TracInAttributor
    from dattri.benchmark.datasets.cifar import StandInDataWarning
    from dattri.benchmark.load import load_benchmark
    from dattri.benchmark.settings import PUBLISHED_SETTINGS, SETTINGS, get_setting
    from dattri.task import AttributionTask, load_state_dict_file

    rec = get_setting("gpt2", "wikitext2")
    assert rec is PUBLISHED_SETTINGS["wikitext2_gpt2"] and rec.name not in SETTINGS
    with pytest.warns(StandInDataWarning, match="WikiText-2 STAND-IN"):
        md, (values, indices) = load_benchmark("gpt2", "wikitext2", "lds", size="tiny",
                                               cache_dir=tmp_path, progress=False)
    assert type(md["model"]).__name__ == "GPT2LMHeadModel"
    assert any("STAND-IN" in n for n in md["notes"])
    assert values.shape == (3, 4) and indices.shape == (3, 8)  # 3 LDS models, half of 16
    assert len(md["models_full"]) == 1 and len(md["models_half"]) == 4
    train = DataLoader(md["train_dataset"], batch_size=8, sampler=md["train_sampler"])
    test = DataLoader(md["test_dataset"], batch_size=4, sampler=md["test_sampler"])
    batch = next(iter(test))
    model = md["model"]
    # LDS ground truth = minus the model's own loss of each test block, first LDS model
    model.load_state_dict(load_state_dict_file(md["models_half"][1]))
    with torch.no_grad():
        own = torch.stack([model(**{k: v[j:j + 1] for k, v in batch.items()}).loss
                           for j in range(4)])
    torch.testing.assert_close(values[0], -own.double(), rtol=1e-5, atol=1e-6)
    state = dict(model.state_dict())
    torch.testing.assert_close(md["loss_func"](state, batch), model(**batch).loss)
    # TRAK's margin, stable form, against log(p / (1 - p)) from the logits
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"]).logits[:, :-1].double()
    p = torch.softmax(z, -1).gather(-1, batch["labels"][:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(md["margin_func"](state, batch).double(),
                               torch.log(p / (1 - p)).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(md["correct_probability_func"](state, batch).double(), p.mean(),
                               rtol=1e-4, atol=1e-6)
    task = AttributionTask(md["loss_func"], model, md["models_full"][0])
    scores = TracInAttributor(task, weight_list=[1.0], normalized_grad=False).attribute(train, test)
    assert scores.shape == (16, 4) and torch.isfinite(scores).all()
    # the published examples read checkpoints with torch.load(path): checkpoint_format="pt"
    with pytest.warns(StandInDataWarning):
        md_pt, gt_pt = load_benchmark("gpt2", "wikitext2", "lds", size="tiny", cache_dir=tmp_path,
                                      progress=False, checkpoint_format="pt")
    assert md_pt["cache"]["trained_models"] == 0 and torch.equal(gt_pt[0], values)
    for a, b in zip(md["models_full"] + md["models_half"], md_pt["models_full"] + md_pt["models_half"]):
        assert b.endswith(".pt")
        plain, ref = torch.load(b, weights_only=True), load_state_dict_file(a)
        assert plain.keys() == ref.keys() and all(torch.equal(plain[k], ref[k]) for k in ref)
    from dattri.errors import DattriValueError

    with pytest.raises(DattriValueError, match="checkpoint_format"):
        load_benchmark("gpt2", "wikitext2", "lds", size="tiny", cache_dir=tmp_path,
                       checkpoint_format="zip")


# ------------------------------------------------------- published dataset modules
def test_published_dataset_module_paths():
    from dattri.benchmark.datasets import mnist
    from dattri.benchmark.datasets.cifar import cifar_resnet9, resnet9
    from dattri.benchmark.datasets.mnist import mnist_lr, mnist_mlp

    assert mnist_lr.train_mnist_lr is mnist.train_mnist_lr
    assert mnist_lr.loss_mnist_lr is mnist.loss_mnist_lr
    assert mnist_mlp.train_mnist_mlp is mnist.train_mnist_mlp
    assert mnist_mlp.loss_mnist_mlp is mnist.loss_mnist_mlp
    net = cifar_resnet9.create_resnet9_model(num_classes=2)
    assert isinstance(net, resnet9.ResNet9)
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert callable(cifar_resnet9.train_cifar_resnet9) and callable(cifar_resnet9.loss_cifar_resnet9)


def test_get_cifar2_indices_relabels_cat_dog_in_place():
    from dattri.benchmark.datasets.cifar.data import get_cifar2_indices_and_adjust_labels
    from dattri.errors import DattriValueError

    class Fake:
        targets = [3, 0, 5, 5, 9, 3]

    ds = Fake()
    assert get_cifar2_indices_and_adjust_labels(ds) == [0, 2, 3, 5]
    assert ds.targets == [0, 0, 1, 1, 9, 0]  # cat -> 0, dog -> 1, others untouched
    t = type("T", (), {"targets": torch.tensor([5, 3, 1])})()
    assert get_cifar2_indices_and_adjust_labels(t) == [0, 1]
    assert t.targets.tolist() == [1, 0, 1]
    with pytest.raises(DattriValueError, match="1-d `targets`"):
        get_cifar2_indices_and_adjust_labels(object())


def test_shakespeare_custom_dataset_blocks():
    import numpy as np

    from dattri.benchmark.datasets.shakespeare_char.data import CustomDataset
    from dattri.errors import DattriValueError

    data = np.arange(23, dtype=np.uint16)
    ds = CustomDataset(data, block_size=5)
    assert len(ds) == 4  # 23 // 5
    x, y = ds[1]
    assert x.tolist() == [5, 6, 7, 8, 9] and y.tolist() == [6, 7, 8, 9, 10]
    assert x.dtype == torch.int64
    ds2 = CustomDataset(np.arange(10, dtype=np.uint16), 5)
    assert ds2[1][1].tolist() == [6, 7, 8, 9, 0]  # the array ends: y padded with 0
    xs, ys = ds.get_subset([3, 0])
    assert xs.shape == (2, 5) and xs[0].tolist() == [15, 16, 17, 18, 19]
    assert torch.equal(ys[1], ds[0][1])
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(DattriValueError, match="block_size"):
        CustomDataset(data, 0)


def test_tinystories_missing_then_present_and_prepare_round_trip(tmp_path, monkeypatch):
    import pickle

    import numpy as np

    from dattri.benchmark.datasets.shakespeare_char.data import CustomDataset
    from dattri.benchmark.datasets.tinystories import (
        TinyStoriesNotFoundError,
        create_tinystories_dataset,
    )
    from dattri.benchmark.datasets.tinystories.prepare import main as prepare_main

    monkeypatch.setenv("DATTRI_DATA", str(tmp_path / "nodata"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(TinyStoriesNotFoundError, match="TinyStoriesV2-GPT4-train.txt.*put it in"):
        create_tinystories_dataset()
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, as published
        create_tinystories_dataset(tmp_path / "missing.txt")
    folder = tmp_path / "nodata" / "tinystories"
    folder.mkdir(parents=True)
    text = "Once upon a time there was a cat. The cat sat on a mat. " * 20
    (folder / "TinyStoriesV2-GPT4-train.txt").write_text(text)
    train, test = create_tinystories_dataset(block_size=16)  # found via $DATTRI_DATA
    cut = int(0.9 * len(text))
    assert len(train) == (cut - 1) // 16 and len(test) == (len(text) - cut - 1) // 16
    x, y = train[2]
    assert train.vocab.decode(x) == text[32:48] and train.vocab.decode(y) == text[33:49]
    out = tmp_path / "bin"
    assert prepare_main(["--data_file", str(folder / "TinyStoriesV2-GPT4-train.txt"),
                         "--out_dir", str(out)]) == 0
    meta = pickle.loads((out / "meta.pkl").read_bytes())
    assert meta["vocab_size"] == len(set(text))
    ids = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert "".join(meta["itos"][int(i)] for i in ids) == text[:cut]
    xb, yb = CustomDataset(ids, 16)[2]  # the published reader of the files
    assert torch.equal(xb, x) and torch.equal(yb, y)


def test_retrain_nanogpt_function(tmp_path):
    import json

    from dattri.errors import DattriValueError
    from dattri.script.dattri_retrain_nanogpt import read_nanogpt_config, retrain

    text = "".join(chr(97 + (i * 7) % 26) for i in range(900))
    (tmp_path / "input.txt").write_text(text)
    cfg = tmp_path / "train_tiny.py"
    cfg.write_text("out_dir = 'x'\nn_layer = 1\nn_head = 1\nn_embd = 8\nblock_size = 16\n"
                   "dropout = 0.0\nmax_iters = 2\nlr = 1e-3 * 2\n")
    assert read_nanogpt_config(cfg)["n_embd"] == 8
    with pytest.raises(DattriValueError, match="subset_ratio"):
        retrain(0, 1.5, cfg, tmp_path, None, tmp_path / "out", [0, 2, 2])
    with pytest.raises(DattriValueError, match="selects no model"):
        retrain(0, 0.5, cfg, tmp_path, None, tmp_path / "out", [2, 2, 2])
    retrain(0, 0.5, cfg, tmp_path, None, tmp_path / "out", [0, 2, 2])
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    n_blocks = (int(0.9 * 900) - 1) // 16
    assert len(meta["subsets"]) == 2 and len(meta["models"]) == 2
    assert all(len(s["indices"]) == int(n_blocks * 0.5) for s in meta["subsets"])
    from dattri.model_util._retrain_store import load_model_file

    state = load_model_file(tmp_path / "out" / meta["models"][0]["file"])
    emb = [v for k, v in state.items() if k.endswith("wte.weight")][0]
    assert emb.shape == (26, 8)  # vocabulary of the text, n_embd of the config


# ------------------------------------------------ published LOO retraining folders
def _published_loo_folder(root, pickled=True):
    """What the published 0.3.0 ``retrain_loo`` writes: ``index_<i>/model_weights.pt``
    holding ``torch.save(model)`` (a whole pickled model) and a ``metadata.yml``."""
    models = {}
    for i in (5, 0, 2):
        torch.manual_seed(i)
        m = nn.Linear(3, 2).double()
        (root / f"index_{i}").mkdir(parents=True)
        torch.save(m if pickled else m.state_dict(), root / f"index_{i}" / "model_weights.pt")
        models[i] = m
    (root / "metadata.yml").write_text(
        "data_length: 6\nindices: [5, 0, 2]\nmode: loo\ntrain_func: train\n")
    return models


def test_published_loo_folder_loads_for_ground_truth(tmp_path):
    from dattri.errors import GroundTruthError
    from dattri.metric import calculate_loo_ground_truth, loo_corr

    models = _published_loo_folder(tmp_path / "loo")
    g = torch.Generator().manual_seed(3)
    xt, yt = torch.randn(4, 3, generator=g, dtype=D64), torch.tensor([0, 1, 1, 0])
    test = DataLoader(TensorDataset(xt, yt), batch_size=2)
    template = nn.Linear(3, 2).double()

    def target(params, batch):  # dattri's convention
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(template, params, (x,)), y)

    with pytest.raises(GroundTruthError, match="pickled whole model.*allow_pickle=True"):
        calculate_loo_ground_truth(target, tmp_path / "loo", test)
    values, indices = calculate_loo_ground_truth(target, tmp_path / "loo", test, allow_pickle=True)
    assert indices.tolist() == [0, 2, 5]  # sorted by left-out index, as published
    with torch.no_grad():
        ref = torch.stack([F.cross_entropy(models[i](xt), yt, reduction="none") for i in (0, 2, 5)])
    torch.testing.assert_close(values, ref)

    def published_target(model, dataloader):  # the published convention
        with torch.no_grad():
            return torch.cat([F.cross_entropy(model(x), y, reduction="none") for x, y in dataloader])

    v2, i2 = calculate_loo_ground_truth(published_target, tmp_path / "loo", test, allow_pickle=True)
    torch.testing.assert_close(v2, ref)
    assert torch.equal(i2, indices)
    # a constant per test column (the missing full model) does not change loo_corr
    score = torch.randn(6, 4, generator=g, dtype=D64)
    c1, _ = loo_corr(score, (values, indices))
    c2, _ = loo_corr(score, (values - values[0], indices))
    torch.testing.assert_close(c1, c2)
    # state-dict files of the same layout need no allow_pickle
    _published_loo_folder(tmp_path / "sd", pickled=False)
    v3, _ = calculate_loo_ground_truth(target, tmp_path / "sd", test)
    torch.testing.assert_close(v3, ref)
    with pytest.raises(GroundTruthError, match="no metadata.json and no index_"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "metadata.yml").write_text("mode: loo\n")
        calculate_loo_ground_truth(target, tmp_path / "empty", test)


def test_published_script_tables_and_shakespeare_prepare(tmp_path):
    import pickle

    import numpy as np

    from dattri.benchmark.datasets.shakespeare_char.data import CustomDataset
    from dattri.benchmark.datasets.shakespeare_char.prepare import main as prepare_main
    from dattri.model_util.retrain import retrain_lds, retrain_loo
    from dattri.script import dattri_retrain as script

    assert {"lr", "mlp", "resnet9", "musictransformer", "nanogpt", "gpt2"} == set(script.SUPPORTED_MODELS)
    assert script.SUPPORTED_RETRAINING_MODE["lds"] is retrain_lds
    assert script.SUPPORTED_RETRAINING_MODE["loo"] is retrain_loo
    assert script.DEFAULT_BATCH_SIZE["mnist_lr"] == 64  # the paper's Appendix C
    assert script.SUPPORTED_SETTINGS["mnist_lr"].__name__ == "train_mnist_lr"
    assert "mnist" in script.SUPPORTED_DATASETS
    text = "To be, or not to be, that is the question.\n" * 30
    (tmp_path / "input.txt").write_text(text)
    assert prepare_main(["--data_file", str(tmp_path / "input.txt"), "--out_dir",
                         str(tmp_path / "bin")]) == 0
    meta = pickle.loads((tmp_path / "bin" / "meta.pkl").read_bytes())
    val = np.fromfile(tmp_path / "bin" / "val.bin", dtype=np.uint16)
    cut = int(0.9 * len(text))
    assert "".join(meta["itos"][int(i)] for i in val) == text[cut:]
    assert meta["stoi"][text[0]] == int(np.fromfile(tmp_path / "bin" / "train.bin", np.uint16)[0])
    x, y = CustomDataset(val, 8)[0]
    assert torch.equal(y[:-1], x[1:])


def test_maestro_published_constants_drive_the_defaults():
    from dattri.benchmark.datasets.maestro import maestro_musictransformer as mt
    from dattri.benchmark.datasets.maestro.data import MAX_SEQUENCE

    assert (mt.LR, mt.EPOCHS, mt.MAX_SEQUENCE, MAX_SEQUENCE) == (1e-4, 20, 256, 256)
    assert (mt.N_LAYERS, mt.NUM_HEADS, mt.D_MODEL, mt.DIM_FEEDFORWARD, mt.DROPOUT) == (
        6, 8, 512, 1024, 0.1)
    import inspect

    sig = inspect.signature(mt.create_musictransformer_model).parameters
    assert (sig["n_layers"].default, sig["d_model"].default, sig["d_ff"].default) == (6, 512, 1024)
    small = mt.create_musictransformer_model(n_layers=1, n_heads=2, d_model=16, d_ff=16, max_len=8)
    opt, sched = mt.create_optimizer_and_scheduler(small, None)
    group = opt.param_groups[0]
    assert sched is None and (group["lr"], group["betas"], group["eps"]) == (1e-4, (0.9, 0.98), 1e-9)
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in small.parameters())


def test_published_small_names_work():
    """The last published 0.3.0 names: each does what the published one does."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from dattri.benchmark.models.nanoGPT import model as gpt
    from dattri.errors import DattriValueError
    from dattri.func.hessian import IHVPUsageError, hvp
    from dattri.func.utils import get_parameter_chunk_sizes
    from dattri.metric.britteness import check_if_flip

    # chunks: sum preserved, each below 2^32 / (2 * batch), a huge layer split
    bound, sizes = get_parameter_chunk_sizes([10, 20, 3 * 2**29], 2)
    assert bound == (2**32 - 1) // 4 and sum(sizes) == 30 + 3 * 2**29
    assert all(0 < c <= bound for c in sizes) and sizes[0] == 30
    assert get_parameter_chunk_sizes([], 1)[1] == [0]
    # a bad mode: the published error type, still a DattriValueError
    with pytest.raises(IHVPUsageError) as e:
        hvp(lambda x: (x * x).sum(), mode="fwd-fwd")
    assert isinstance(e.value, DattriValueError)
    # nanoGPT pieces from a config
    cfg = gpt.GPTConfig(n_embd=16, n_head=2, block_size=6, dropout=0.0, bias=False)
    torch.manual_seed(0)
    block = gpt.Block(cfg)
    assert block(torch.randn(3, 6, 16)).shape == (3, 6, 16)
    assert [n for n, _ in gpt.LayerNorm(16, bias=False).named_parameters()] == ["weight"]
    assert sum(p.numel() for p in gpt.MLP(cfg).parameters()) == 2 * 16 * 64
    # check_if_flip: a majority-class "model" retrained on what is left
    x = torch.zeros(5, 1)
    y = torch.tensor([0, 0, 0, 1, 1])
    train = DataLoader(TensorDataset(x, y), batch_size=2)
    test = DataLoader(TensorDataset(torch.zeros(1, 1), torch.tensor([0])), batch_size=1)

    class Majority(nn.Module):
        def __init__(self, label):
            super().__init__()
            self.label = label

    def train_func(loader):
        labels = torch.cat([b[1] for b in loader])
        return Majority(int(torch.bincount(labels, minlength=2).argmax()))

    def eval_func(model, loader):
        return torch.tensor([model.label])

    assert check_if_flip(train, test, [3], train_func, eval_func) is False  # 0,0,0,1 -> 0
    assert check_if_flip(train, test, [0, 1], train_func, eval_func) is True  # 0,1,1 -> 1
    with pytest.raises(DattriValueError, match="exactly one"):
        check_if_flip(train, train, [0], train_func, eval_func)


def test_published_solver_table_and_dvemb_defaults():
    from dattri.algorithm.dvemb import DEFAULT_PROJECTOR_KWARGS
    from dattri.algorithm.influence_function import SUPPORTED_IHVP_SOLVER
    from dattri.params.projection import DVEmbProjectionParams

    assert set(SUPPORTED_IHVP_SOLVER) == {"explicit", "cg", "arnoldi", "lissa"}
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)

    def f(x):
        return 0.5 * x @ a @ x

    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x0 = torch.zeros(2, dtype=torch.float64)
    for name in ("explicit", "cg"):  # the exact inverse of the quadratic's Hessian
        torch.testing.assert_close(SUPPORTED_IHVP_SOLVER[name](f)((x0,), v), torch.linalg.inv(a))
    assert DVEmbProjectionParams().proj_max_batch_size == DEFAULT_PROJECTOR_KWARGS["proj_max_batch_size"]
