"""Result buffers of the featurizers: only a result the caller released (or a block
it provided) takes a later batch's gradients; one it still holds (itself or a view)
is never written again; stream_rows gathers batches into blocks, in place."""

from __future__ import annotations

import torch
from torch import nn

from dattri.algorithm._engine import Featurizer
from dattri.algorithm._loop import BufferLender
from dattri.task import AttributionTask


def test_lender_reuses_only_a_released_or_provided_buffer():
    lender, cpu = BufferLender(), torch.device("cpu")
    a = lender.take((3, 5), torch.float64, cpu)
    a.fill_(7.0)
    b = lender.take((3, 5), torch.float64, cpu)  # a not released: new memory
    assert b.data_ptr() != a.data_ptr()
    torch.testing.assert_close(a, torch.full((3, 5), 7.0, dtype=torch.float64))
    lender.release(a)  # not the last taken: ignored
    c = lender.take((3, 5), torch.float64, cpu)
    assert c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    lender.release(c)
    assert lender.take((3, 5), torch.float64, cpu).data_ptr() == c.data_ptr()
    block = torch.zeros(6, 5, dtype=torch.float64)
    lender.provide(block[3:])
    assert lender.take((2, 5), torch.float64, cpu).data_ptr() != block[3].data_ptr()  # not its shape
    assert lender.take((3, 5), torch.float64, cpu).data_ptr() == block[3].data_ptr()  # used once
    assert lender.take((3, 5), torch.float64, cpu).data_ptr() != block[3].data_ptr()


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _featurizer_and_batches(sizes, seed: int):
    """The dense featurizer of a float64 ConvNet's loss and batches of ``sizes``."""
    torch.manual_seed(0)
    model = ConvNet().double().eval()

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 4, (n,), generator=g)) for n in sizes]
    return Featurizer(task, "loss", None, torch.device("cpu")), batches


def test_featurizer_results_held_by_the_caller_survive_later_batches():
    """Dense per-example gradients of a convolutional model (the batched path, one
    buffer per result): each batch's result equals autograd on its examples alone,
    after later batches were computed, whether the caller kept the result or a view
    of it; a released result's memory takes the next batch."""
    fz, batches = _featurizer_and_batches([3] * 4, seed=1)
    fz.use_factored = False
    want = [fz.reference(b, 0) for b in batches]
    first = fz.grads(batches[0], 0)  # kept whole
    assert fz.batched_ok(batches[0], 0)
    second = fz.grads(batches[1], 0)
    p2 = second.data_ptr()
    fz.release(second)
    third = fz.grads(batches[2], 0)
    assert third.data_ptr() == p2
    view = third[1:]  # only a view kept
    del third
    fourth = fz.grads(batches[3], 0)
    assert fourth.data_ptr() != p2
    torch.testing.assert_close(first, want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(view, want[2][1:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fourth, want[3], rtol=1e-10, atol=1e-12)


def test_stream_rows_gathers_whole_batches_in_place_and_equals_the_gradients(monkeypatch):
    """Blocks of up to ``rows`` rows made of whole batches, in one buffer: batch sizes
    3, 3, 3, 2, 5, 3 at rows = 7 give blocks of 6, 5, 5 and 3 rows (a batch that does
    not fit what is left closes the block), each equal to the per-example gradients
    of its examples while the consumer reads it; the batches after a block's first of
    their size are written in place (no copy, nothing released)."""
    fz, batches = _featurizer_and_batches((3, 3, 3, 2, 5, 3), seed=3)
    fz.use_factored = False
    want = torch.cat([fz.reference(b, 0) for b in batches])
    released = []
    release = fz.release
    monkeypatch.setattr(fz, "release", lambda f: (released.append(f.shape[0]), release(f)))
    got, ptrs = [], set()
    for block in fz.stream_rows(batches, 0, rows=7):
        got.append(block.clone())  # read now: the buffer takes the next block
        ptrs.add(block.data_ptr())
    assert [b.shape[0] for b in got] == [6, 5, 5, 3]
    assert len(ptrs) == 1
    assert released == [3, 2, 5, 3]  # the 2nd and 3rd batches were written in place
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-10, atol=1e-12)


def test_stream_rows_below_two_batches_is_the_plain_stream():
    fz, batches = _featurizer_and_batches([4] * 3, seed=4)
    got = [b.clone() for b in fz.stream_rows(batches, 0, rows=7)]
    assert [b.shape[0] for b in got] == [4, 4, 4]
    torch.testing.assert_close(torch.cat(got), torch.cat([fz.reference(b, 0) for b in batches]),
                               rtol=1e-10, atol=1e-12)


def test_score_rows_gathers_two_resnet9_batches_and_bounds_the_block():
    """The block of training rows: ResNet-9's 4.83M float32 gradients against 500 test
    rows take 166 rows (two batches of 64; 64 rows would leave the product at the
    slow shape), at most a third of the test side's memory; small features take
    the full 256 rows; a huge row takes one."""
    from dattri.algorithm._engine import SCORE_ROWS, score_rows

    meta = torch.device("meta")
    big = torch.empty(500, 4_825_154, device=meta)
    rows = score_rows(big)
    assert 128 <= rows < 192
    assert rows * big.shape[1] * 4 <= big.numel() * 4 // 3
    assert score_rows(torch.empty(500, 2048, device=meta)) == SCORE_ROWS
    assert score_rows(torch.empty(2, 1 << 30, device=meta)) == 1


def test_dense_projection_of_small_batches_is_one_product_per_block(monkeypatch):
    """A dense Gaussian projection of batches smaller than PROJECT_ROWS / 2: the
    gradients of consecutive batches (sizes 3, 3, 3, 2, 5, 3 at PROJECT_ROWS = 7:
    blocks of 6, 5, 5, 3 rows) are projected in one product per block, and every
    batch's features (in order, with their own batch) equal the projection of its
    examples' float64 per-example gradients."""
    from dattri.algorithm import _engine
    from dattri.algorithm.base import make_projection

    monkeypatch.setattr(_engine, "PROJECT_ROWS", 7)
    fz, batches = _featurizer_and_batches((3, 3, 3, 2, 5, 3), seed=5)
    fz.use_factored = False
    fz.transform = make_projection({"proj_dim": 16, "proj_type": "normal", "proj_seed": 3},
                                   torch.device("cpu"))
    assert fz.transform.blockable
    grads = [fz.reference(b, 0) for b in batches]
    m = fz.transform.projector(grads[0]).matrix(0).double()
    calls = []
    project = fz.transform.projector(grads[0]).project
    monkeypatch.setattr(fz.transform.projector(grads[0]), "project",
                        lambda x, ensemble_id=0: (calls.append(x.shape[0]), project(x, ensemble_id))[1])
    out = list(fz.iterate(batches, 0, with_batch=True))
    assert calls == [6, 5, 5, 3]
    # a block is also bounded in bytes: at 5 rows no block holds two batches of 3 or a
    # batch of 5 (each projected alone); at 6 the blocks are those above
    monkeypatch.setattr(_engine, "PROJECT_BYTES", 5 * grads[0][0].numel() * 8)
    calls.clear()
    assert len(list(fz.iterate(batches, 0))) == 6
    assert calls == [3, 3, 3, 2, 5, 3]  # the 2 went into a block, closed by the 5 after it
    monkeypatch.setattr(_engine, "PROJECT_BYTES", 6 * grads[0][0].numel() * 8)
    calls.clear()
    list(fz.iterate(batches, 0))
    assert calls == [6, 5, 5, 3]
    assert [torch.equal(b[0], want[0]) for (b, _), want in zip(out, batches)] == [True] * 6
    for (_, f), g in zip(out, grads):
        torch.testing.assert_close(f, g @ m, rtol=1e-10, atol=1e-12)


def test_projected_block_features_equal_the_per_batch_features_for_trak_and_tracin(monkeypatch):
    """TRAK and projected Grad-Cos (normal projection, k = 32) on a float64 ConvNet:
    loaders of batch 4 (gathered into blocks of 16 rows) and of batch 40 (one
    product each) give the same scores."""
    from dattri.algorithm import TracInAttributor, TRAKAttributor
    from dattri.algorithm import _engine

    monkeypatch.setattr(_engine, "PROJECT_ROWS", 16)
    torch.manual_seed(0)
    model = ConvNet().double().eval()

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    def prob(params, data):
        x, y = data
        return torch.softmax(torch.func.functional_call(model, params, (x,)), -1).gather(1, y[:, None])[:, 0]

    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(30, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (30,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    proj = {"proj_dim": 32, "proj_type": "normal", "proj_seed": 1}

    def scores(batch):
        tl = torch.utils.data.DataLoader(ds, batch_size=batch)
        sl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:6], y[:6]), batch_size=batch)
        task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
        trak = TRAKAttributor(task, prob, proj_params=proj).cache(tl).attribute(tl, sl)
        cos = TracInAttributor(task, weight_list=[1.0], normalized_grad=True, proj_params=proj)
        return trak, cos.attribute(tl, sl)

    for small, big in zip(scores(4), scores(40)):
        torch.testing.assert_close(small, big, rtol=1e-9, atol=1e-11)
