"""The score seam (``dattri.algorithm._score``): the checkpoint combination, blocked
scores with lockstep steps, the diagonal; Grad-Cos scores divided by robust norms."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import TracInAttributor
from dattri.algorithm._score import Ensemble, diagonal, score_blocks, started
from dattri.algorithm.tracin import _row_norms
from dattri.task import AttributionTask


def _parts(c=3, shape=(4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(c)]


def test_ensemble_mean_and_weights_equal_the_explicit_sums():
    parts = _parts()
    mean = Ensemble(3)
    torch.testing.assert_close(mean.combine(parts), (parts[0] + parts[1] + parts[2]) / 3)
    torch.testing.assert_close(mean.total(lambda c: parts[c]), (parts[0] + parts[1] + parts[2]) / 3)
    w = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    weighted = Ensemble(3, w)
    want = 0.5 * parts[0] - 2.0 * parts[1] + 3.0 * parts[2]
    torch.testing.assert_close(weighted.combine(parts), want)
    torch.testing.assert_close(weighted.total(lambda c: parts[c]), want)
    assert list(weighted) == [0, 1, 2] and weighted.each(lambda c: c * c) == [0, 1, 4]
    # float32 parts keep their dtype under float64 weights
    assert weighted.combine([p.float() for p in parts]).dtype == torch.float32


def test_score_blocks_sum_checkpoints_per_block_and_keep_lockstep_steps():
    train = _parts(2, (7, 3), seed=1)
    test = _parts(2, (4, 3), seed=2)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    ens = Ensemble(2, w)
    calls = []

    def pair(rows, c):
        calls.append((rows is None, c))
        return None if rows is None else rows @ test[c].T

    # blocks of 3 and 4 rows with a lockstep step (no rows) between them
    blocks = [[t[:3] for t in train], None, [t[3:] for t in train]]
    out = list(score_blocks(started(blocks, 10), pair, ens))
    assert [s for s, _ in out] == [10, 13]
    want = 0.3 * train[0] @ test[0].T + 0.7 * train[1] @ test[1].T
    torch.testing.assert_close(torch.cat([b for _, b in out]), want)
    assert calls.count((True, 0)) == 1 and calls.count((True, 1)) == 1  # the step took part


def test_diagonal_is_the_diagonal_of_the_product():
    a, b = _parts(2, (9, 4), seed=3)
    blocks_a, blocks_b = a.split([2, 5, 2]), b.split([2, 5, 2])
    torch.testing.assert_close(diagonal(blocks_a, blocks_b), (a @ b.T).diagonal())
    torch.testing.assert_close(diagonal(blocks_a), (a @ a.T).diagonal())


def test_row_norms_survive_underflow_and_overflow_in_float32():
    g = torch.tensor([[3e-25, 4e-25, 0.0], [0.0, 0.0, 0.0], [3e20, -4e20, 0.0], [1.0, 2.0, 2.0],
                      [1e-30, 1e-45, 0.0]], dtype=torch.float32)
    want = torch.linalg.vector_norm(g.double(), dim=1)
    kept = g.clone()
    got = _row_norms(g)
    assert torch.equal(g, kept)  # the rows are not touched
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0.0)


def _cos_case(scale: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).eval()
    x, y = torch.randn(20, 2, 6), torch.randint(0, 3, (20,))

    def loss(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        return scale * nn.functional.cross_entropy(out, data[1])

    task = AttributionTask(loss, model, model.state_dict())
    train = DataLoader(TensorDataset(x[:14], y[:14]), batch_size=5)
    test = DataLoader(TensorDataset(x[14:], y[14:]), batch_size=6)
    return task, train, test, model, x, y


def test_grad_cos_dense_scores_equal_cosines_at_any_scale():
    # float32 gradients of ~1e-26 per entry: their squares underflow; the scores
    # are divided by norms that do not (and equal the float64 cosines)
    task, train, test, model, x, y = _cos_case(1.0)
    ref = TracInAttributor(task, [1.0], True, fast_path=False).attribute(train, test)
    grads = []
    params = dict(model.named_parameters())
    for i in range(20):
        out = model(x[i:i + 1])
        g = torch.autograd.grad(nn.functional.cross_entropy(out, y[i:i + 1]), list(params.values()))
        grads.append(torch.cat([t.flatten() for t in g]).double())
    G = torch.nn.functional.normalize(torch.stack(grads), dim=1)
    torch.testing.assert_close(ref.double(), G[:14] @ G[14:].T, rtol=1e-4, atol=1e-5)
    tiny_task, train, test, *_ = _cos_case(1e-25)
    tiny = TracInAttributor(tiny_task, [1.0], True, fast_path=False).attribute(train, test)
    torch.testing.assert_close(tiny, ref, rtol=1e-4, atol=1e-5)
