"""Result buffers in huge pages (``dattri._memory``) and their reuse by the
featurizers: a result the caller dropped takes the next batch's gradients; one the
caller still holds (itself, a view, a numpy array over it) is never written again."""

from __future__ import annotations

import mmap

import pytest
import torch
from torch import nn

import dattri._memory as memory
from dattri.algorithm._engine import Featurizer
from dattri.algorithm._loop import BufferLender, cat_releasing
from dattri.task import AttributionTask

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MAP_ANONYMOUS"),
                                reason="anonymous private mappings need a POSIX system")


@pytest.fixture()
def huge_everything(monkeypatch):
    """Every CPU buffer through the mapped path, whatever its size and whether or not
    this kernel gives huge pages on request (the madvise is then a no-op)."""
    monkeypatch.setattr(memory, "HUGE_MIN_BYTES", 0)
    monkeypatch.setattr(memory, "_AVAILABLE", True)


def test_empty_result_is_mapped_only_for_large_cpu_buffers(monkeypatch):
    monkeypatch.setattr(memory, "_AVAILABLE", True)
    small, buf = memory.empty_result((3, 4), torch.float32, "cpu")
    assert buf is None and small.shape == (3, 4)
    n = memory.HUGE_MIN_BYTES // 8
    big, buf = memory.empty_result((2, n // 2), torch.float64, torch.device("cpu"))
    assert buf is not None and buf.nbytes == big.numel() * 8
    assert big.shape == (2, n // 2) and big.dtype == torch.float64
    big.fill_(1.5)
    assert float(big.sum()) == 1.5 * big.numel()
    monkeypatch.setattr(memory, "_AVAILABLE", False)
    _, buf = memory.empty_result((2, n // 2), torch.float64, "cpu")
    assert buf is None


def test_huge_buffer_is_free_only_when_no_tensor_over_it_is_alive(huge_everything):
    t, buf = memory.empty_result((4, 5), torch.float32, "cpu")
    assert not buf.free()
    view = t[1:3]
    del t
    assert not buf.free()  # a view holds the memory
    arr = view.numpy()
    del view
    assert not buf.free()  # so does a numpy array over it
    del arr
    assert buf.free()


def test_lender_reuses_a_dropped_buffer_and_never_a_held_one(huge_everything):
    lender, cpu = BufferLender(), torch.device("cpu")
    a = lender.take((3, 5), torch.float64, cpu)
    pa = a.data_ptr()
    a.fill_(7.0)
    b = lender.take((3, 5), torch.float64, cpu)  # a is held: new memory
    assert b.data_ptr() != pa
    torch.testing.assert_close(a, torch.full((3, 5), 7.0, dtype=torch.float64))
    pb = b.data_ptr()
    del b
    c = lender.take((3, 5), torch.float64, cpu)  # b dropped: its memory again
    assert c.data_ptr() == pb
    d = lender.take((5, 3), torch.float64, cpu)  # another shape (same bytes), c held
    assert d.data_ptr() not in (pa, pb)
    e = lender.take((3, 5), torch.float32, cpu)
    assert e.dtype == torch.float32 and e.data_ptr() not in (pa, pb, d.data_ptr())


def test_cat_releasing_into_a_mapped_buffer_equals_cat(huge_everything):
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (2, 4, 1)]
    want = torch.cat(parts)
    torch.testing.assert_close(cat_releasing(parts), want, rtol=0, atol=0)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_featurizer_results_held_by_the_caller_survive_later_batches(huge_everything):
    """Dense per-example gradients of a convolutional model (the batched path, one
    buffer per result): each batch's result equals autograd on its examples alone,
    after later batches were computed, whether the caller kept the result, a view of
    it, or dropped it (then its memory takes a later batch)."""
    torch.manual_seed(0)
    model = ConvNet().double().eval()

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 4, (3,), generator=g)) for _ in range(4)]
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    fz.use_factored = False
    want = [fz.reference(b, 0) for b in batches]
    first = fz.grads(batches[0], 0)  # kept whole
    assert fz.batched_ok(batches[0], 0)
    second = fz.grads(batches[1], 0)
    p2 = second.data_ptr()
    del second  # dropped: the next result may take its memory
    third = fz.grads(batches[2], 0)
    assert third.data_ptr() == p2
    view = third[1:]  # only a view kept
    del third
    fourth = fz.grads(batches[3], 0)
    assert fourth.data_ptr() != p2
    torch.testing.assert_close(first, want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(view, want[2][1:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fourth, want[3], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("huge", [False, True])
def test_stream_rows_gathers_whole_batches_in_place_and_equals_the_gradients(huge, monkeypatch):
    """Blocks of up to ``rows`` rows made of whole batches, in one buffer: batch sizes
    3, 3, 3, 2, 5, 3 at rows = 7 give blocks of 6, 5, 5 and 3 rows (a batch that does
    not fit what is left closes the block), each equal to the per-example gradients
    of its examples while the consumer reads it; the batches after a block's first of
    their size are written in place (no copy, nothing released)."""
    if huge:
        monkeypatch.setattr(memory, "HUGE_MIN_BYTES", 0)
        monkeypatch.setattr(memory, "_AVAILABLE", True)
    torch.manual_seed(0)
    model = ConvNet().double().eval()

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 4, (n,), generator=g)) for n in (3, 3, 3, 2, 5, 3)]
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
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
    torch.manual_seed(0)
    model = ConvNet().double().eval()

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    got = [b.clone() for b in fz.stream_rows(batches, 0, rows=7)]
    assert [b.shape[0] for b in got] == [4, 4, 4]
    torch.testing.assert_close(torch.cat(got), torch.cat([fz.reference(b, 0) for b in batches]),
                               rtol=1e-10, atol=1e-12)
