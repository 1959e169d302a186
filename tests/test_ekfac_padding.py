"""EK-FAC on dict batches with an ``attention_mask``: padded positions count in
neither factor nor in the token count, so the scores do not depend on the padding.

The reference is built densely, in float64, from each example *unpadded* (cut to
its real length): layer inputs and output gradients captured with hooks over the
real tokens only, the K-FAC factors, their eigenbases, the corrected eigenvalues
and the scores of the module docstring of :mod:`dattri.algorithm.ekfac`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dattri.algorithm import IFAttributorEKFAC
from dattri.task import AttributionTask

pytestmark = pytest.mark.usefixtures("float64")

V, D, H = 7, 4, 5
DAMPING = 1e-2
TRAIN_LENS, TEST_LENS = [6, 3, 5, 6, 2, 4, 5], [5, 6, 3]
PADS = (6, 9)  # the longest example unpadded, then three more padded positions


class DictData(Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


class CausalMean(nn.Module):
    """Tokens -> Linear -> tanh -> Linear; each position also sees the mean of the
    real tokens up to it (``attention_mask`` weighted), so padded positions carry
    nonzero layer inputs while the real positions do not depend on the padding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.l1, self.l2 = nn.Embedding(V, D), nn.Linear(D, H), nn.Linear(H, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        e = self.emb(input_ids)
        m = attention_mask.to(e.dtype)[..., None]
        ctx = torch.cumsum(e * m, 1) / torch.cumsum(m, 1).clamp_min(1)
        return self.l2(torch.tanh(self.l1(e + ctx)))


def _data(lens: list[int], length: int, seed: int, vocab: int) -> dict[str, torch.Tensor]:
    """Right-padded (pad id 0) token batches; label -100 at the padding and at the
    first real position (a real token the loss ignores: it still counts in ``A``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lens), length), generator=g)
    mask = torch.zeros(len(lens), length, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    labels = torch.where(mask.bool(), torch.randint(0, vocab, ids.shape, generator=g),
                         torch.full_like(ids, -100))
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _repad(data: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    out = {}
    for k, v in data.items():
        extra = torch.full((v.shape[0], length - v.shape[1]), fill[k], dtype=v.dtype)
        out[k] = torch.cat([v, extra], 1)
    return out


def _token_mean_loss(logits_of, vocab: int):
    """Each example's mean over its labelled tokens, averaged over the batch."""
    def loss(params, batch):
        logits = logits_of(params, batch)
        tok = nn.functional.cross_entropy(logits.reshape(-1, vocab), batch["labels"].reshape(-1),
                                          ignore_index=-100, reduction="none")
        tok = tok.reshape(batch["labels"].shape)
        count = (batch["labels"] != -100).sum(1).clamp_min(1)
        return (tok.sum(1) / count).mean()
    return loss


def _captures(model: nn.Module, loss, example: dict, names: list[str]) -> dict:
    """``{name: (a (T, d_in + 1), s (T, d_out))}`` of one unpadded example."""
    mods, store = dict(model.named_modules()), {}

    def hook(name):
        def h(_m, inputs, output):
            leaf = torch.zeros_like(output, requires_grad=True)
            store[name] = (inputs[0].detach(), leaf)
            return output + leaf
        return h

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        params = {k: p.detach() for k, p in model.named_parameters()}
        grads = torch.autograd.grad(loss(params, example), [store[n][1] for n in names])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, g in zip(names, grads):
        a = store[n][0].reshape(-1, store[n][0].shape[-1])
        out[n] = (torch.cat([a, torch.ones(a.shape[0], 1)], 1), g.reshape(-1, g.shape[-1]))
    return out


def _unpadded(data: dict, i: int) -> dict:
    n = int(data["attention_mask"][i].sum())
    return {k: v[i:i + 1, :n] for k, v in data.items()}


def _reference(model, loss, train: dict, test: dict, names: list[str]) -> torch.Tensor:
    """Dense EK-FAC scores ``(n, m)`` from the real tokens of each example."""
    n, m = len(train["input_ids"]), len(test["input_ids"])
    tr = [_captures(model, loss, _unpadded(train, i), names) for i in range(n)]
    te = [_captures(model, loss, _unpadded(test, j), names) for j in range(m)]
    scores = torch.zeros(n, m)
    for name in names:
        a_all = torch.cat([c[name][0] for c in tr])  # every real token, no padding
        A = a_all.T @ a_all / a_all.shape[0]
        S = sum(c[name][1].T @ c[name][1] for c in tr) / n
        qa, qs = torch.linalg.eigh(A)[1], torch.linalg.eigh(S)[1]
        G = torch.stack([c[name][1].T @ c[name][0] for c in tr])  # (n, d_out, d_in + 1)
        lam = (qs.T @ G @ qa).square().mean(0)
        for j, c in enumerate(te):
            gt = c[name][1].T @ c[name][0]
            ihvp = qs @ ((qs.T @ gt @ qa) / (lam + DAMPING)) @ qa.T
            scores[:, j] += (G * ihvp).sum((1, 2))
    return scores


def _ekfac(task, train: dict, test: dict, mask_key: str | None = "attention_mask"):
    att = IFAttributorEKFAC(task, damping=DAMPING)
    att.padding_mask_key = mask_key
    train_loader = DataLoader(DictData(train), batch_size=3)
    test_loader = DataLoader(DictData(test), batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        att.cache(train_loader)
        return att.attribute(train_loader, test_loader), att.module_name


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _check(model, loss, vocab: int) -> None:
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    train0 = _data(TRAIN_LENS, PADS[0], 1, vocab)
    test0 = _data(TEST_LENS, PADS[0], 2, vocab)
    got = {}
    for length in PADS:
        got[length], names = _ekfac(task, _repad(train0, length), _repad(test0, length))
    want = _reference(model, loss, train0, test0, names)
    for length in PADS:
        assert _rel(got[length], want) < 1e-10, (length, _rel(got[length], want))
    assert _rel(got[PADS[1]], got[PADS[0]]) < 1e-10
    # every position counted (the mask ignored): the factors see the padding
    loose = {length: _ekfac(task, _repad(train0, length), _repad(test0, length), None)[0]
             for length in PADS}
    assert _rel(loose[PADS[1]], loose[PADS[0]]) > 1e-3


def test_ekfac_scores_ignore_padding_sequence_model():
    torch.manual_seed(0)
    model = CausalMean().eval()
    loss = _token_mean_loss(
        lambda params, batch: torch.func.functional_call(
            model, params, (batch["input_ids"], batch["attention_mask"])), V)
    _check(model, loss, V)


def test_ekfac_scores_ignore_padding_gpt2():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed: pip install -e '.[hf]'")
    vocab = 20
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    loss = _token_mean_loss(
        lambda params, batch: torch.func.functional_call(
            model, params, (), {"input_ids": batch["input_ids"],
                                "attention_mask": batch["attention_mask"]}).logits, vocab)
    _check(model, loss, vocab)
