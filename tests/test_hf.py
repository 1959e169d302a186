"""Hugging Face ``transformers`` models built from a config (no download), with dict
batches: batched per-example gradients, padded positions, and the attributors."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install -e '.[hf]'")

from dattri.algorithm import TracInAttributor, TRAKAttributor  # noqa: E402
from dattri.algorithm._engine import Featurizer  # noqa: E402
from dattri.task import AttributionTask  # noqa: E402

VOCAB, T = 50, 10


def _gpt2(dtype=torch.float64):
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def _loss(model):
    def loss(params, batch):
        out = torch.func.functional_call(model, params, (), dict(batch))
        return out.loss
    return loss


def _batch(n: int, pad: bool = False):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    if pad:
        mask[0, 6:] = 0  # right padding of the first example
        mask[2, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_gpt2_batched_gradients_equal_vmap_grad():
    model = _gpt2()
    task = AttributionTask(_loss(model), model, model.state_dict())
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    batch = _batch(4)
    got = fz.raw(batch, 0)
    assert fz._batched_ok == {0: True}  # Conv1D, LayerNorm, Embedding, tied lm_head
    # the definition: autograd on each example as a batch of one (vmap cannot trace
    # the Hugging Face attention mask)
    torch.testing.assert_close(got, fz.reference(batch, 0), rtol=1e-9, atol=1e-12)


def test_padded_positions_contribute_nothing():
    model = _gpt2()
    task = AttributionTask(_loss(model), model, model.state_dict())
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    batch = _batch(4, pad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batch mean over tokens couples the examples
        got = fz.raw(batch, 0)
    # example 0 is the same as its first 6 tokens alone, without padding
    alone = {k: v[:1, :6] for k, v in batch.items()}
    torch.testing.assert_close(got[0], fz.reference(alone, 0)[0], rtol=1e-8, atol=1e-11)


def test_tracin_and_trak_on_gpt2():
    model = _gpt2(torch.float32)
    task = AttributionTask(_loss(model), model, model.state_dict())
    data = _batch(6)
    train = [{k: v[i:i + 3] for k, v in data.items()} for i in (0, 3)]
    test = [{k: v[:2] for k, v in data.items()}]
    a = TracInAttributor(task, weight_list=[1.0], normalized_grad=False)
    s = a.attribute(train, test)
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    g_tr = torch.cat([fz.reference(b, 0) for b in train])
    g_te = fz.reference(test[0], 0)
    torch.testing.assert_close(s, g_tr @ g_te.T, rtol=1e-4, atol=1e-6)

    def prob(params, batch):
        out = torch.func.functional_call(model, params, (), dict(batch))
        logp = torch.log_softmax(out.logits[:, :-1], -1)
        tok = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return tok.mean(1).exp()

    trak = TRAKAttributor(task, correct_probability_func=prob,
                          proj_params={"proj_dim": 16, "proj_type": "sjlt"}, regularization=1e-3)
    trak.cache(train)
    out = trak.attribute(train, test)
    assert out.shape == (6, 2) and torch.isfinite(out).all()


def test_ekfac_and_logra_on_gpt2_conv1d_layers():
    from dattri.algorithm import IFAttributorEKFAC, LoGraAttributor

    model = _gpt2()
    task = AttributionTask(_loss(model), model, model.state_dict())
    data = _batch(6)
    train = [{k: v[i:i + 3] for k, v in data.items()} for i in (0, 3)]
    test = [{k: v[:2] for k, v in data.items()}]
    mods = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    ek = IFAttributorEKFAC(task, module_name=mods, damping=0.1).cache(train)
    s = ek.attribute(train, test)
    assert s.shape == (6, 2) and torch.isfinite(s).all() and s.abs().max() > 0
    # LoGra without projection and curvature = exact inner products of those layers
    lg = LoGraAttributor(task, module_name=mods, hessian="Identity",
                         proj_params={"proj_type": "identity"}).cache(train)
    params = [f"{m}.{p}" for m in mods for p in ("weight", "bias")]
    exact = TracInAttributor(task, weight_list=[1.0], normalized_grad=False,
                             layer_name=params).attribute(train, test)
    torch.testing.assert_close(lg.attribute(train, test), exact, rtol=1e-8, atol=1e-11)
