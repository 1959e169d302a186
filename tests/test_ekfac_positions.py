"""EK-FAC on a convolution and on a linear layer over a sequence, against a dense
float64 reference built from formed per-example gradients, layer inputs and
per-position output gradients (the K-FAC-expand factors over positions)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from dattri.algorithm import IFAttributorEKFAC
from dattri.task import AttributionTask


class ConvSeq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.seq = nn.Linear(3, 4)  # applied at every pixel: a sequence layer
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))  # (B, 3, 3, 3)
        h = torch.tanh(self.seq(h.flatten(2).transpose(1, 2)))  # (B, 9, 4)
        return self.out(h.mean(1))


def _loss(model):
    def loss(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return loss


def _reference(model, batches, test, layer, damping):
    """IF scores of one layer with EK-FAC built from dense quantities."""
    mod = dict(model.named_modules())[layer]
    names = [f"{layer}.weight", f"{layer}.bias"]
    params = dict(model.named_parameters())

    def per_example(batch):  # formed gradients G_n (o, i + 1), and (a, s) per position
        rows, acts, outs = [], [], []
        for i in range(batch[0].shape[0]):
            store = {}
            h = mod.register_forward_hook(lambda m, inp, o: store.update(a=inp[0], y=o))
            p = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
            loss = F.cross_entropy(torch.func.functional_call(model, p, (batch[0][i:i + 1],)),
                                   batch[1][i:i + 1])
            h.remove()
            gw, gb, gy = torch.autograd.grad(loss, [p[names[0]], p[names[1]], store["y"]])
            rows.append(torch.cat([gw.reshape(gw.shape[0], -1), gb[:, None]], 1))
            a = store["a"].detach()
            if isinstance(mod, nn.Conv2d):
                a = F.unfold(a, 3, padding=1, stride=2).transpose(1, 2)[0]  # (L, C_in * 9)
                s = gy.reshape(gy.shape[1], -1).T  # (L, C_out)
            else:
                a, s = a[0], gy[0]
            acts.append(torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1))
            outs.append(s)
        return torch.stack(rows), acts, outs

    gs, acts, outs = zip(*(per_example(b) for b in batches))
    g = torch.cat(gs)
    acts, outs = [a for part in acts for a in part], [s for part in outs for s in part]
    n, tokens = g.shape[0], sum(a.shape[0] for a in acts)
    A = sum(a.T @ a for a in acts) / tokens
    S = sum(s.T @ s for s in outs) / n
    qa, qs = torch.linalg.eigh(A)[1], torch.linalg.eigh(S)[1]
    lam = ((qs.T @ g @ qa) ** 2).mean(0)  # (o, i + 1)
    gt, _, _ = per_example(test)
    pre = qs @ ((qs.T @ gt @ qa) / (lam + damping)) @ qa.T
    return g.reshape(n, -1) @ pre.reshape(pre.shape[0], -1).T


@pytest.mark.parametrize("basis", ["standard", "eigen"])
@pytest.mark.parametrize("layer", ["conv", "seq"])
def test_ekfac_over_positions_matches_dense_reference(layer, basis):
    torch.manual_seed(0)
    model = ConvSeq().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    train = [(x[:7], y[:7]), (x[7:], y[7:])]
    test = (x[:3], y[:3])
    task = AttributionTask(_loss(model), model, model.state_dict())
    att = IFAttributorEKFAC(task, module_name=layer, damping=1e-3)
    att.scoring_basis = basis  # the scores of either basis are the reference's
    got = att.cache(train).attribute(train, [test])
    want = _reference(model, train, test, layer, 1e-3)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_ekfac_default_modules_include_convolutions():
    model = ConvSeq()
    task = AttributionTask(_loss(model), model, model.state_dict())
    att = IFAttributorEKFAC(task, damping=0.1)
    assert att.module_name == ["conv", "seq", "out"]



def test_ihvp_in_row_chunks_equals_one_block(monkeypatch):
    """The inverse-Fisher products taken a few rows at a time (and in place for the
    test side) equal the products of the whole block."""
    import dattri.algorithm.ekfac as ek

    torch.manual_seed(0)
    model = ConvSeq().double()
    task = AttributionTask(_loss(model), model, model.state_dict())
    x, y = torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    for damping in (0.0, 0.1):
        att = IFAttributorEKFAC(task, damping=damping).cache([(x, y)])
        width = max(sl.stop for sl, *_ in att._state[0])
        v = torch.randn(5, width, dtype=torch.float64)
        whole = att._ihvp(v, 0)
        assert whole.abs().max() > 0
        assert att.preconditioner(0).chunk_bytes == ek._IHVP_CHUNK_BYTES
        monkeypatch.setattr(att.preconditioner(0), "chunk_bytes", 8)  # one row at a time
        torch.testing.assert_close(att._ihvp(v, 0), whole, rtol=1e-9, atol=1e-11)  # damping 0: 1/lambda near the cut amplifies rounding
        owned = v.clone()
        got = att._ihvp_owned(owned, 0)
        assert got.data_ptr() == owned.data_ptr()
        torch.testing.assert_close(got, whole, rtol=1e-9, atol=1e-11)
        monkeypatch.undo()


class DeepAndWide(nn.Module):
    """An early convolution (1 -> 16 channels at 9 positions, a 10-wide input factor:
    forming its gradients is cheaper than rotating them) and a deep one (16 -> 16
    channels at one position, a 145-wide input factor: rotating the test side there
    and back costs the most), the shapes between which the scoring basis changes."""

    def __init__(self) -> None:
        super().__init__()
        self.early = nn.Conv2d(1, 16, 3, stride=10)  # (B, 16, 3, 3)
        self.deep = nn.Conv2d(16, 16, 3)  # one position
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.deep(torch.tanh(self.early(x)))).flatten(1))


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_scores_are_the_same_in_every_scoring_basis(damping):
    # the eigenbasis is an orthogonal change of coordinates: scores, self-influence
    # and RelatIF are unchanged; "auto" takes the deep layer there, not the early one
    torch.manual_seed(0)
    model = DeepAndWide().double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(26, 1, 23, 23, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (26,), generator=g)
    train, test = [(x[:8], y[:8]), (x[8:20], y[8:20])], [(x[20:], y[20:])]
    task = AttributionTask(_loss(model), model, model.state_dict())
    out = {}
    for basis in ("standard", "eigen", "auto"):
        att = IFAttributorEKFAC(task, damping=damping)
        att.scoring_basis = basis
        att.cache(train)
        out[basis] = (att.attribute(train, test), att.self_attribute(train),
                      att.attribute(train, test, relatif_method="theta"))
        if basis == "auto":
            # head (3 x 17): 26 x 349 multiply-adds to rotate, 13,566 to score in the
            # standard basis: the eigenbasis only without its weight of 2
            assert att._choose_basis(20, 6) == {"early": False, "deep": True, "head": False}
            att.ROTATION_SLOWDOWN = 1.0
            assert att._choose_basis(20, 6) == {"early": False, "deep": True, "head": True}
            assert att._positions == {"early": 9.0, "deep": 1.0, "head": 1.0}
    for basis in ("eigen", "auto"):
        for got, want in zip(out[basis], out["standard"]):
            scale = want.abs().max()
            torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-10)


def test_an_unknown_scoring_basis_is_refused():
    model = ConvSeq().double()
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    att = IFAttributorEKFAC(AttributionTask(_loss(model), model, model.state_dict()))
    att.scoring_basis = "diagonal"
    with pytest.raises(ValueError, match="scoring_basis='diagonal' must be"):
        att.cache([(x, y)]).attribute([(x, y)], [(x, y)])
