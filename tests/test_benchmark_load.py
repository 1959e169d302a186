"""load_benchmark on the tiny MNIST-LR size, the settings and methods registries."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dattri.benchmark.datasets.mnist import create_lr_model, create_mlp_model
from dattri.benchmark.load import default_cache_dir, load_benchmark, loo_positions
from dattri.benchmark.methods import (
    IF_REGULARIZATION,
    METHODS,
    get_method,
    infeasible_reason,
    search_space,
    trak_projection_type,
)
from dattri.benchmark.settings import (
    SETTINGS,
    correct_probability_func,
    get_setting,
    margin_func,
)
from dattri.benchmark.utils import load_model, per_example_loss
from dattri.errors import DattriValueError
from dattri.model_util.retrain import lds_subset
from dattri.task import load_state_dict_file

TINY = {"cache_dir": None, "size": "tiny", "progress": False}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dattri_cache")


@pytest.fixture(scope="module")
def lds_tiny(cache):
    return load_benchmark("lr", "mnist", "lds", **{**TINY, "cache_dir": cache})


def _test_loader(md):
    return DataLoader(md["test_dataset"], batch_size=7, sampler=md["test_sampler"])


def _losses(path, loader):
    return per_example_loss(load_model(path, create_lr_model), loader).to(torch.float64)


def test_lds_structure_and_second_call_loads(lds_tiny, cache):
    md, (values, indices) = lds_tiny
    for key in ("model", "models_full", "models_half", "train_dataset", "train_sampler",
                "test_dataset", "test_sampler", "loss_func", "target_func", "train_func",
                "margin_func", "correct_probability_func", "final_linear_layer_name"):
        assert key in md
    assert len(md["models_full"]) == 2 and len(md["models_half"]) == 8  # 4 ensemble + 4 LDS
    assert len(md["train_sampler"]) == 200 and len(md["test_sampler"]) == 20
    assert values.shape == (4, 20) and indices.shape == (4, 100)
    assert md["cache"]["trained_models"] == 2 + 8
    files = md["models_full"] + md["models_half"]
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    md2, (values2, indices2) = load_benchmark("lr", "mnist", "lds", **{**TINY, "cache_dir": cache})
    assert md2["cache"]["trained_models"] == 0
    assert {f: os.stat(f).st_mtime_ns for f in md2["models_full"] + md2["models_half"]} == stamps
    torch.testing.assert_close(values2, values)
    assert torch.equal(indices2, indices)


def test_lds_ground_truth_is_negated_loss_of_the_last_half_models(lds_tiny):
    md, (values, indices) = lds_tiny
    loader = _test_loader(md)
    for k, path in enumerate(md["models_half"][4:]):
        torch.testing.assert_close(values[k], -_losses(path, loader), rtol=1e-5, atol=1e-6)
        # subsets of the paper's plan: models_half[4 + k] trained on subset 4 + k
        expected = lds_subset(md["seed"], 4 + k, 200, 100)
        assert indices[k].tolist() == expected.tolist()
    # the ensemble part is different models (trained on other subsets)
    a = load_state_dict_file(md["models_half"][0])["linear.weight"]
    b = load_state_dict_file(md["models_half"][4])["linear.weight"]
    assert not torch.allclose(a, b)


def test_loo_ground_truth_and_full_model_identity(cache):
    md, (values, left_out) = load_benchmark("lr", "mnist", "loo", **{**TINY, "cache_dir": cache})
    assert left_out.tolist() == loo_positions(200, 8, 0) and values.shape == (8, 20)
    assert any("LOO over 8 of 200" in n for n in md["notes"])
    root = md["cache"]["root"]
    full = load_state_dict_file(f"{root}/loo_8/full/model_weights.safetensors")
    ref = load_state_dict_file(md["models_full"][0])
    for k in ref:  # the LOO folder's full model is the attributed model itself
        torch.testing.assert_close(full[k], ref[k], rtol=1e-4, atol=1e-5)
    loader = _test_loader(md)
    base = _losses(f"{root}/loo_8/full/model_weights.safetensors", loader)
    for m, i in enumerate(left_out.tolist()[:3]):
        without = _losses(f"{root}/loo_8/index_{i}/model_weights.safetensors", loader)
        torch.testing.assert_close(values[m], without - base, rtol=1e-4, atol=1e-6)


def test_auc_variant_flips_ten_percent(cache, lds_tiny):
    md, (mask, flipped) = load_benchmark("lr", "mnist", "auc", **{**TINY, "cache_dir": cache})
    clean = lds_tiny[0]["train_dataset"].targets[:200]
    noisy = md["train_dataset"].targets[:200]
    assert len(flipped) == 20 and int(mask.sum()) == 20
    changed = torch.nonzero(noisy != clean).flatten()
    assert changed.tolist() == sorted(flipped.tolist())
    assert torch.equal(mask.nonzero().flatten(), changed)
    w_noisy = load_state_dict_file(md["models_full"][0])["linear.weight"]
    w_clean = load_state_dict_file(lds_tiny[0]["models_full"][0])["linear.weight"]
    assert not torch.allclose(w_noisy, w_clean)  # trained on the noisy labels


def test_redownload_retrains(tmp_path):
    md, _ = load_benchmark("lr", "mnist", "auc", **{**TINY, "cache_dir": tmp_path})
    assert md["cache"]["trained_models"] == 6
    md, _ = load_benchmark("lr", "mnist", "auc", **{**TINY, "cache_dir": tmp_path}, redownload=True)
    assert md["cache"]["trained_models"] == 6


def test_bad_arguments(tmp_path):
    with pytest.raises(DattriValueError, match="model/dataset.*'vgg'"):
        load_benchmark("vgg", "mnist", "lds", cache_dir=tmp_path)
    with pytest.raises(DattriValueError, match="metric: 'auc'.*cifar2_resnet9.*lds"):
        load_benchmark("resnet9", "cifar2", "auc", cache_dir=tmp_path)
    with pytest.raises(DattriValueError, match="size: .*'huge'"):
        load_benchmark("lr", "mnist", "lds", cache_dir=tmp_path, size="huge")
    with pytest.raises(DattriValueError, match="loo_size"):
        load_benchmark("lr", "mnist", "loo", cache_dir=tmp_path, size="tiny", loo_size=0)
    with pytest.raises(DattriValueError, match="seed"):
        load_benchmark("lr", "mnist", "lds", cache_dir=tmp_path, size="tiny", seed=-1)
    with pytest.raises(DattriValueError, match="setting: unknown"):
        get_setting("imagenet")


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DATTRI_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DATTRI_CACHE")
    monkeypatch.setenv("DATTRI_CACHE_DIR", str(tmp_path / "b"))
    assert default_cache_dir() == tmp_path / "b"


def test_margin_and_probability_match_float64_reference():
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    params = dict(model.named_parameters())
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 0])
    p = torch.softmax(model(x), -1)[torch.arange(6), y]
    ref = torch.log(p / (1 - p)).mean()
    torch.testing.assert_close(margin_func(model)(params, (x, y)), ref)
    torch.testing.assert_close(correct_probability_func(model)(params, (x, y)), p.mean())
    # sequence models: (B, L, V) logits, every token (or the last) is a classification
    emb = nn.Embedding(7, 7).double()
    tokens, labels = torch.randint(0, 7, (2, 3)), torch.randint(0, 7, (2, 3))
    pe = dict(emb.named_parameters())
    q = torch.softmax(emb(tokens), -1).gather(-1, labels[..., None]).squeeze(-1)
    odds = torch.log(q / (1 - q))
    torch.testing.assert_close(margin_func(emb)(pe, (tokens, labels)), odds.mean())
    torch.testing.assert_close(margin_func(emb, last_only=True)(pe, (tokens, labels)),
                               odds[:, -1].mean())


def test_settings_follow_table3():
    metrics = {s.name: set(s.metrics) for s in SETTINGS.values()}
    assert metrics == {"mnist_lr": {"loo", "lds", "auc"}, "mnist_mlp": {"loo", "lds", "auc"},
                       "cifar2_resnet9": {"lds"}, "cifar10_resnet9": {"auc"},
                       "maestro_musictransformer": {"lds"}, "shakespeare_nanogpt": {"lds"}}
    for s in SETTINGS.values():
        full = s.size("full")
        assert {"full", "reduced"} <= set(s.sizes)
        assert (full.num_ensemble, full.num_lds) == (50, 50)
        assert full.n_test == {"maestro_musictransformer": 178, "shakespeare_nanogpt": 435}.get(
            s.name, 500)
    assert get_setting("lr", "mnist").name == "mnist_lr"
    assert get_setting("nanogpt", "shakespeare_char").name == "shakespeare_nanogpt"
    assert get_setting("cifar2") is SETTINGS["cifar2_resnet9"]


def test_methods_follow_appendix_c1():
    regs = [h["regularization"] for h in METHODS["IF-Explicit"].search_space]
    assert tuple(regs) == IF_REGULARIZATION == (1e-1, 1e-2, 5e-3, 1e-3, 1e-4, 1e-5)
    assert {h["max_iter"] for h in METHODS["IF-CG"].search_space} == {10}
    assert {h["max_iter"] for h in METHODS["IF-Arnoldi"].search_space} == {50}
    assert [h["batch_size"] for h in METHODS["IF-LiSSA"].search_space] == [10, 50]
    rps = METHODS["RPS-L2"].search_space
    assert len(rps) == 12 and {h["l2_strength"] for h in rps} == {10, 1, 1e-1, 1e-2, 1e-3, 1e-4}
    for k in (1, 10, 50):
        assert [h["proj_dim"] for h in METHODS[f"TRAK-{k}"].search_space] == [512, 2048]
        assert METHODS[f"TRAK-{k}"].num_models == k
    for spec in METHODS.values():  # the quick space is a subset of the paper's
        assert all(h in spec.search_space for h in search_space(spec, "quick"))
    assert get_method("if-cg") is METHODS["IF-CG"] and get_method("TracIn").num_models == 10
    with pytest.raises(DattriValueError, match="unknown method 'foo'"):
        get_method("foo")
    with pytest.raises(DattriValueError, match="search: expected"):
        search_space(METHODS["Grad-Dot"], "grid")


def test_infeasibility_marks():
    def details(name, model):
        rec = SETTINGS[name]
        return {"setting": rec, "size": rec.size("full"), "model": model,
                "models_full": ["x"] * 10, "models_half": ["x"] * 10}

    mlp = details("mnist_mlp", create_mlp_model())
    status, reason, forceable = infeasible_reason(METHODS["IF-Explicit"], mlp)
    assert status == "infeasible" and forceable and "109,386 parameters" in reason
    assert infeasible_reason(METHODS["IF-CG"], mlp) is None
    assert infeasible_reason(METHODS["IF-CG"], mlp, ["lds", "loo"]) is None
    # self-influence needs one solve per training example: CG/LiSSA AUC on the MLP
    status, reason, forceable = infeasible_reason(METHODS["IF-LiSSA"], mlp, ["auc"])
    assert status == "infeasible" and forceable and "self-influence" in reason
    lr = details("mnist_lr", nn.Linear(784, 10))
    assert infeasible_reason(METHODS["IF-CG"], lr, ["auc"]) is None
    assert infeasible_reason(METHODS["TRAK-50"], mlp)[:3:2] == ("infeasible", False)
    gpt = details("shakespeare_nanogpt", nn.Linear(2, 2))
    assert infeasible_reason(METHODS["RPS-L2"], gpt)[0] == "n/a"


def test_trak_projection_choice():
    # all-linear models are sketched from their factors; others are projected densely
    # (small) or sparsely (large)
    assert trak_projection_type(create_mlp_model()) == "tensorsketch"
    assert trak_projection_type(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(),
                                              nn.Linear(4, 2))) == "normal"
    assert trak_projection_type(nn.Sequential(nn.Embedding(2000, 600), nn.Linear(600, 2))) == "sjlt"
    frozen = nn.Sequential(nn.Embedding(3, 4), nn.Linear(4, 2))
    frozen[0].weight.requires_grad_(False)  # only trainable parameters count
    assert trak_projection_type(frozen) == "tensorsketch"


def test_language_model_functions_take_tied_checkpoints():
    from dattri.benchmark.datasets.shakespeare_char import create_nanogpt_model

    torch.manual_seed(0)
    model = create_nanogpt_model(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=8,
                                 dropout=0.0).eval()
    state = model.state_dict()  # holds lm_head.weight and its tied transformer.wte.weight
    assert "lm_head.weight" in state and "transformer.wte.weight" in state
    x, y = torch.randint(0, 7, (2, 4)), torch.randint(0, 7, (2, 4))
    rec = SETTINGS["shakespeare_nanogpt"]
    with torch.no_grad():
        logits = model(x)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), y.reshape(-1))
    torch.testing.assert_close(rec.loss_builder(model)(state, (x, y)), ref)
    last = SETTINGS["maestro_musictransformer"].target_builder(model)(state, (x, y))
    torch.testing.assert_close(last, torch.nn.functional.cross_entropy(logits[:, -1], y[:, -1]))
    assert torch.isfinite(rec.margin_builder(model)(state, (x, y)))
