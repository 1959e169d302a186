"""Batched per-example gradients (one forward + backward per batch) against the
definition (autograd / vmap(grad) on each example as a batch of one), float64."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from dattri.algorithm._batched import BatchedGrads
from dattri.algorithm._engine import Featurizer
from dattri.task import AttributionTask



pytestmark = pytest.mark.usefixtures("float64")


class Scale(nn.Module):
    """A custom module with its own parameter (the generic vmap(vjp) rule)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.gain)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2, padding_mode="reflect")
        self.gn = nn.GroupNorm(3, 6)
        self.c3 = nn.Conv1d(6, 5, 2, stride=1, bias=False)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = self.gn(self.c2(h))
        h = h.flatten(2)  # (B, 6, L) as a sequence for Conv1d
        h = torch.relu(self.c3(h)).mean(-1)
        return self.fc(h)


class SeqNet(nn.Module):
    """Embedding (repeated tokens, padding index), position embeddings of shape (T, d)
    broadcast over the batch, LayerNorm, attention, tied read-out."""

    def __init__(self, v: int = 7, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(v, d, padding_idx=0)
        self.pos = nn.Embedding(6, d)  # called on positions (T,): shared by the batch
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mha_tf = nn.MultiheadAttention(d, 2)  # (T, B, d) layout
        self.scale = Scale(d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, v, bias=False)
        self.head.weight = self.emb.weight  # tied weights

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.emb(tok) + self.pos(torch.arange(tok.shape[1])))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        ht = h.transpose(0, 1)
        h = h + self.mha_tf(ht, ht, ht)[0].transpose(0, 1)
        h = self.proj(self.scale(h)) + self.proj(h)  # a module called twice
        return self.head(h)  # (B, T, v)


def _task(model: nn.Module, loss) -> AttributionTask:
    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def _ce(model):
    def loss(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, x)
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return loss


def _data_conv(n: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 9, 9, generator=g), torch.randint(0, 3, (n,), generator=g)


def _data_seq(n: int = 5):
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 7, (n, 6), generator=g)
    tok[:, 1] = tok[:, 2]  # repeated tokens
    tok[0, 3] = 0  # padding index
    return tok, torch.randint(0, 7, (n, 6), generator=g)


def _vmap_reference(task, batch, layer_name=None):
    fz = Featurizer(task, "loss", layer_name, torch.device("cpu"))
    return fz.vmapped(batch, 0)


def _batched(task, batch, layer_name=None):
    bg = BatchedGrads(task, layer_name)
    assert bg.supported
    task.load_checkpoint(0)
    return bg.run(task.original_loss_func, batch, dict(task.named_parameters))


# the convolutions' three paths: unfolded patches, one grouped convolution, and the
# weight-gradient kernel once per example
@pytest.mark.parametrize("grouped_min,each_min", [(10**9, 10**9), (1, 10**9), (10**9, 1)])
@pytest.mark.parametrize("make,data", [(ConvNet, _data_conv), (SeqNet, _data_seq)])
def test_batched_equals_vmap_grad(make, data, grouped_min, each_min, monkeypatch):
    monkeypatch.setattr("dattri.func.per_example.GROUPED_MIN_POSITIONS", grouped_min)
    monkeypatch.setattr("dattri.func.per_example.EACH_MIN_POSITIONS", each_min)
    monkeypatch.setattr("dattri.func.per_example.EACH_MIN_MACS", 0)
    torch.manual_seed(0)
    model = make().eval()
    if isinstance(model, ConvNet):  # non-trivial running statistics
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    task = _task(model, _ce(model))
    batch = data()
    ref = _vmap_reference(task, batch)
    got = _batched(task, batch)
    assert got is not None
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # batch-size invariance: two halves give the same rows
    halves = [tuple(t[s] for t in batch) for s in (slice(0, 2), slice(2, None))]
    torch.testing.assert_close(torch.cat([_batched(task, h) for h in halves]), got,
                               rtol=1e-10, atol=1e-12)


def test_layer_selection_and_frozen_parameters():
    torch.manual_seed(0)
    model = SeqNet().eval()
    model.ln.weight.requires_grad_(False)  # frozen: not a parameter of the task
    task = _task(model, _ce(model))
    batch = _data_seq()
    names = ["emb.weight", "attn.out_proj.weight", "proj.bias", "scale.gain"]
    got = _batched(task, batch, names)
    ref = _vmap_reference(task, batch, names)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert "ln.weight" not in task.named_parameters


def test_featurizer_uses_batched_path_and_checks_it():
    torch.manual_seed(0)
    model = ConvNet().eval()
    task = _task(model, _ce(model))
    batch = _data_conv(6)
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    calls = []
    orig = fz.vmapped
    fz.vmapped = lambda b, c: calls.append(1) or orig(b, c)
    got = fz.raw(batch, 0)
    assert fz._batched_ok == {0: True} and not calls
    torch.testing.assert_close(got, orig(batch, 0), rtol=1e-10, atol=1e-12)


def test_coupled_loss_falls_back_with_a_warning():
    torch.manual_seed(0)
    model = ConvNet().eval()

    def coupled(params, data):  # the batch mean is subtracted: examples interact
        x, y = data
        out = torch.func.functional_call(model, params, x)
        return nn.functional.cross_entropy(out - out.mean(0, keepdim=True), y)

    task = _task(model, coupled)
    batch = _data_conv(4)
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    with pytest.warns(UserWarning, match="fall"):
        got = fz.raw(batch, 0)
    assert fz._batched_ok == {0: False}
    torch.testing.assert_close(got, fz.vmapped(batch, 0), rtol=1e-12, atol=1e-12)


def test_batchnorm_in_training_mode_is_declined_without_touching_the_model():
    torch.manual_seed(0)
    model = ConvNet().train()
    task = _task(model, _ce(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    assert not fz.batched_ok(_data_conv(4), 0)
    assert fz._batched_ok == {0: False}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dropout_ensemble_masks_are_shared_by_the_examples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    task = _task(model, _ce(model))
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    fz.use_factored = False
    got = fz.raw(batch, 0)
    assert fz._batched_ok == {0: True}
    # vmap(grad, randomness="same") under the same ensemble seed: the same masks
    torch.testing.assert_close(got, fz.vmapped(batch, 0), rtol=1e-10, atol=1e-12)


def test_projected_tracin_by_the_adjoint_equals_both_sides_projected():
    """Few test examples: <g_i M, g_j M> computed as <g_i, M M^T g_j> (test side
    projected and mapped back), the same scores as projecting both sides."""
    from dattri.algorithm import TracInAttributor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    ckpts = [model.state_dict(), {k: v * 1.1 for k, v in model.state_dict().items()}]
    task = AttributionTask(loss_func=_ce(model), model=model, checkpoints=ckpts)
    train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 40, 16)]
    test = [(x[:3], y[:3])]
    proj = {"proj_dim": 64, "proj_type": "normal", "proj_seed": 3}
    a = TracInAttributor(task, weight_list=[0.5, 2.0], normalized_grad=False, proj_params=proj)
    assert a._adjoint_cheaper(train, test)
    got = a.attribute(train, test)
    a._adjoint_cheaper = lambda *_: False
    want = a.attribute(train, test)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # and the projection is really applied: not the exact inner products
    exact = TracInAttributor(task, weight_list=[0.5, 2.0], normalized_grad=False).attribute(train, test)
    assert (got - exact).norm() > 1e-3 * exact.norm()


def test_back_project_is_the_adjoint():
    from dattri.func.projection import get_projector

    p = get_projector("normal", 50, 8, 1, "cpu", torch.float64, block_bytes=4 * 8 * 7)
    x, yv = torch.randn(3, 50), torch.randn(4, 8)
    lhs = p.project(x, 2) @ yv.T
    rhs = x @ p.back_project(yv, 2).T
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)


def test_replayable_keeps_small_loaders_and_passes_big_ones():
    from dattri.algorithm._engine import replayable

    ds = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.arange(10))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    kept = replayable(loader, torch.device("cpu"), passes=3)
    assert isinstance(kept, list) and [len(b[1]) for b in kept] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in kept]), torch.arange(10))
    assert replayable(loader, torch.device("cpu"), passes=1) is loader
    assert replayable(loader, torch.device("cpu"), passes=3, budget=100) is loader


class RelMix(nn.Module):
    """A module owning parameters that reach the activations only through matrix
    products with them (a slice and a transpose of ``basis`` on the right, ``basis``
    itself on the left), as relative position embeddings do, and through broadcast
    products and sums (``gain``, a function of ``shift``); its Linear child keeps its
    own rule."""

    def __init__(self, d: int = 4, m: int = 5) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.basis = nn.Parameter(torch.randn(m, d))
        self.gain = nn.Parameter(torch.randn(3, 1))  # broadcast over positions and features
        self.shift = nn.Parameter(torch.randn(1, 1, d))  # a leading 1 on the batch axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        h = self.lin(x) * self.gain
        right = torch.tanh(h @ self.basis[1:].transpose(0, 1))  # (B, T, m - 1)
        left = torch.matmul(self.basis, h.transpose(-1, -2))  # (B, m, T)
        h = torch.cos(h) + self.shift.sin() * 0.5
        return h + right.sum(-1, keepdim=True) + (left ** 2).mean(1).unsqueeze(-1)


class Leaky(nn.Module):
    """Its parameters also meet the activations in an einsum, or are changed in
    place before a product: not followed."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d))
        self.v = nn.Parameter(torch.randn(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v.clone()
        v[0] = 0  # row 0 gets no gradient
        return torch.sin(x @ self.w + torch.einsum("btd,de->bte", x, self.w)) + x @ v


class RelNet(nn.Module):
    def __init__(self, leaky: bool = False) -> None:
        super().__init__()
        self.mix = RelMix()
        self.leaky = Leaky() if leaky else nn.Identity()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.leaky(self.mix(x))))  # mix called twice


def _spy_generic(monkeypatch) -> list:
    """Record the calls of the generic vmap(vjp) rule (still computing)."""
    import dattri.algorithm._batched as batched

    calls, orig = [], batched.generic_grads
    monkeypatch.setattr(batched, "generic_grads",
                        lambda m, *a: calls.append(type(m).__name__) or orig(m, *a))
    return calls


@pytest.mark.parametrize("leaky", [False, True])
def test_parameter_through_matmuls_in_closed_form(leaky, monkeypatch):
    calls = _spy_generic(monkeypatch)
    torch.manual_seed(0)
    model = RelNet(leaky).eval()
    task = _task(model, _ce(model))
    g = torch.Generator().manual_seed(2)
    batch = torch.randn(5, 3, 4, generator=g), torch.randint(0, 3, (5, 3), generator=g)
    ref = _vmap_reference(task, batch)
    got = _batched(task, batch)
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # RelMix never takes the generic rule; Leaky's parameters are used by an
    # einsum and changed in place
    assert calls == (["Leaky"] if leaky else [])
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored
    names = ["mix.basis", "mix.shift"] + (["leaky.v"] if leaky else [])
    torch.testing.assert_close(_batched(task, batch, names), _vmap_reference(task, batch, names),
                               rtol=1e-10, atol=1e-12)


def _small_music_transformer(dropout: float = 0.0) -> nn.Module:
    from dattri.benchmark.models.MusicTransformer.music_transformer import (
        create_musictransformer_model,
    )

    return create_musictransformer_model(vocab_size=11, n_layers=2, n_heads=2, d_model=8, d_ff=12,
                                         max_len=7, dropout=dropout)


def _music_batch(n: int = 5, length: int = 5):
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 11, (n, length), generator=g), torch.randint(0, 11, (n, length), generator=g)


@pytest.mark.parametrize("length", [5, 7])  # a part of the relative embeddings / all of them
def test_music_transformer_relative_embeddings_in_closed_form(length, monkeypatch):
    calls = _spy_generic(monkeypatch)
    torch.manual_seed(0)
    model = _small_music_transformer().eval()
    seen = []

    def loss(params, data):
        out = torch.func.functional_call(model, params, data[0])
        seen.append(out.detach())
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), data[1].reshape(-1))

    task = _task(model, loss)
    batch = _music_batch(length=length)
    ref = _vmap_reference(task, batch)
    seen.clear()
    got = _batched(task, batch)
    assert not calls  # every parameter by a closed form: no vmap(vjp) of the attention
    # the followed forward computes the model's outputs bit for bit (seen[0] is the
    # loss convention's probe, and the batch's probed example runs alone afterwards)
    plain = torch.func.functional_call(model, dict(task.named_parameters), batch[0])
    assert torch.equal([o for o in seen if o.shape[0] == batch[0].shape[0]][-1], plain)
    rel = task.param_spec(None).slices()["layers.0.attn.rel_emb"]
    assert ref[:, rel].abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    halves = [tuple(t[s] for t in batch) for s in (slice(0, 2), slice(2, None))]
    torch.testing.assert_close(torch.cat([_batched(task, h) for h in halves]), got,
                               rtol=1e-10, atol=1e-12)


def test_music_transformer_dropout_ensemble_in_closed_form(monkeypatch):
    calls = _spy_generic(monkeypatch)
    torch.manual_seed(0)
    model = _small_music_transformer(dropout=0.3).train()
    task = _task(model, _ce(model))
    batch = _music_batch()
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    fz.use_factored = False
    got = fz.raw(batch, 0)
    assert fz._batched_ok == {0: True} and not calls
    torch.testing.assert_close(got, fz.vmapped(batch, 0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_nanogpt_layer_norms_in_closed_form(bias, monkeypatch):
    """nanoGPT's LayerNorm calls ``F.layer_norm`` with its own weight (and bias):
    followed, not re-run under vmap(vjp); the tied embedding / read-out sums up."""
    from dattri.benchmark.datasets.shakespeare_char import create_nanogpt_model

    calls = _spy_generic(monkeypatch)
    torch.manual_seed(0)
    model = create_nanogpt_model(vocab_size=9, block_size=6, n_layer=2, n_head=2, n_embd=8,
                                 dropout=0.0, bias=bias).eval()
    for name, p in model.named_parameters():  # LayerNorms away from (1, 0)
        if ".ln_" in name or "ln_f" in name:
            p.data.uniform_(0.5, 1.5) if name.endswith("weight") else p.data.uniform_(-1, 1)
    task = _task(model, _ce(model))
    g = torch.Generator().manual_seed(6)
    batch = torch.randint(0, 9, (4, 5), generator=g), torch.randint(0, 9, (4, 5), generator=g)
    ref = _vmap_reference(task, batch)
    got = _batched(task, batch)
    assert not calls
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("view", [False, True])
def test_projected_batches_reuse_the_dense_buffer_without_corrupting_features(view):
    """A projection transform lends the dense (B, P) gradients back: the next batch is
    written into the same buffer, and every batch's features equal those computed
    alone. A transform that returns a view of its input keeps its memory."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    task = _task(model, _ce(model))
    x, y = _data_conv(12)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
    proj = torch.randn(BatchedGrads(task, None).spec.numel, 7)
    seen: list[int] = []

    def transform(g, ckpt):
        seen.append(g.data_ptr())
        return g[:, :7] if view else g @ proj

    fz = Featurizer(task, "loss", None, torch.device("cpu"), transform=transform)
    got = [fz.batch(b, 0) for b in batches]  # kept: a later batch must not overwrite them
    want = [_batched(task, b) for b in batches]
    want = [w[:, :7] if view else w @ proj for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if view:
        assert len(set(seen[-3:])) == 3  # each batch in its own memory
    else:
        assert seen[-1] == seen[-2]  # the buffer of the previous batch, reused


def test_stream_writes_each_batch_into_the_previous_buffer():
    """``Featurizer.stream`` (dense gradients, no transform) lends each batch back
    when the next is asked for: the consumer's products equal those of gradients
    computed alone, and the batches after the first share one buffer."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    task = _task(model, _ce(model))
    x, y = _data_conv(12)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
    right = torch.randn(5, BatchedGrads(task, None).spec.numel)
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    ptrs, got = [], []
    for f in fz.stream(batches, 0):
        ptrs.append(f.data_ptr())
        got.append(f @ right.T)
    want = [_batched(task, b) @ right.T for b in batches]
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=1e-10, atol=1e-12)
    assert ptrs[1] == ptrs[2]


def test_cat_releasing_equals_cat_and_empties_the_list():
    from dattri.algorithm._loop import cat_releasing

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, 2, generator=g) for n in (4, 1, 5)]
    want = torch.cat(parts)
    kept = list(parts)
    got = cat_releasing(parts)
    assert parts == [] and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(kept, want.split([4, 1, 5])))
    mixed = [torch.ones(2, 3), torch.ones(1, 3, dtype=torch.float32)]
    torch.testing.assert_close(cat_releasing(mixed), torch.cat([torch.ones(2, 3), torch.ones(1, 3)]))


def test_grad_cos_rows_normalised_in_place_are_unit_and_exact():
    from dattri.algorithm.tracin import _unit_rows

    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-300, 0.0]])
    out = _unit_rows(g)
    assert out.data_ptr() == g.data_ptr()
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]]))


def test_factored_gradients_reuse_a_released_buffer_and_only_then():
    """The nn.Linear factored path writes a batch's formed gradients into the buffer
    its consumer released (no fresh allocation), never into one still held."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    task = _task(model, _ce(model))
    g = torch.Generator().manual_seed(2)
    b1 = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    b2 = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    g1 = fz.grads(b1, 0)
    assert fz.factored_ok(b1, 0)
    kept = g1.clone()
    g2 = fz.grads(b2, 0)  # g1 not released: a new buffer, g1 untouched
    assert g2.data_ptr() != g1.data_ptr()
    torch.testing.assert_close(g1, kept, rtol=0, atol=0)
    fz.release(g2)
    g3 = fz.grads(b1, 0)  # released: written into g2's memory
    assert g3.data_ptr() == g2.data_ptr()
    for got, batch in ((g3, b1), (kept, b1)):
        torch.testing.assert_close(got, fz.reference(batch, 0), rtol=1e-10, atol=1e-12)


class HeadFirst(nn.Module):
    """A tied read-out registered before its embedding (so the linear rule writes the
    weight's first part and the embedding adds to it), a layer called three times,
    a padding index and a GroupNorm over the sequence's channels."""

    def __init__(self, v: int = 7, d: int = 6) -> None:
        super().__init__()
        self.head = nn.Linear(d, v, bias=False)
        self.mix = nn.Linear(d, d)
        self.gn = nn.GroupNorm(2, d)
        self.emb = nn.Embedding(v, d, padding_idx=3)
        self.emb.weight = self.head.weight

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        h = self.emb(tok)
        for _ in range(3):
            h = torch.tanh(self.mix(h))
        h = self.gn(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


def test_tied_weight_and_repeated_layer_add_into_the_result_in_any_order():
    torch.manual_seed(0)
    model = HeadFirst().eval()
    task = _task(model, _ce(model))
    tok, y = _data_seq()
    tok[1, :2] = 3  # padding positions
    ref = _vmap_reference(task, (tok, y))
    got = _batched(task, (tok, y))
    assert got is not None and ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_a_linear_layer_called_twice_on_single_vectors_adds_into_the_result():
    """Also: the layer is registered under two names, where torch.func.functional_call
    (PyTorch 2.13) leaves its tensors in the model; the task puts the user's
    parameters back after every call, so the model and the selection stay whole."""
    from dattri.algorithm import TracInAttributor

    torch.manual_seed(0)
    lin, out = nn.Linear(5, 5), nn.Linear(5, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), out).eval()
    before = [(n, p) for n, p in model.named_parameters()]
    task = _task(model, _ce(model))
    g = torch.Generator().manual_seed(3)
    batch = torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
    got = _batched(task, batch)
    ref = _vmap_reference(task, batch)
    auto = Featurizer(task, "loss", None, torch.device("cpu")).reference(batch, 0)
    assert got is not None and got.shape == ref.shape == auto.shape == (4, 48)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(auto, ref, rtol=1e-10, atol=1e-12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=3)
    scores = TracInAttributor(task, [1.0], normalized_grad=False).attribute(loader, loader)
    torch.testing.assert_close(scores, auto @ auto.T, rtol=1e-9, atol=1e-12)
    assert [(n, p) for n, p in model.named_parameters()] == before  # the same objects
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for _, p in before)
