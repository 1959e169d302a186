"""Blocked top-k (dattri.topk) against a stable sort of the full score matrix."""

from itertools import pairwise

import pytest
import torch

from dattri.errors import DattriValueError, NonFiniteError
from dattri.topk import (
    TopK,
    mean_inner_product,
    merge_topk,
    topk_from_blocks,
    topk_from_features,
    topk_from_scores,
)


def _reference(score: torch.Tensor, k: int):
    """Per column, a stable sort: equal scores keep the lower row first."""
    down_v, down_i = torch.sort(score, dim=0, descending=True, stable=True)
    up_v, up_i = torch.sort(score, dim=0, stable=True)
    return down_i[:k].T, down_v[:k].T, up_i[:k].T, up_v[:k].T


def _assert_equal(top: TopK, score: torch.Tensor, k: int) -> None:
    want = _reference(score, k)
    got = (top.proponents, top.proponent_scores, top.opponents, top.opponent_scores)
    for name, g, w in zip(("proponents", "proponent_scores", "opponents", "opponent_scores"), got, want):
        assert torch.equal(g, w), name


def _tied_scores(n: int, m: int, seed: int) -> torch.Tensor:
    """float64 scores of few distinct values (many ties), with +-inf and -0.0."""
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(-4, 5, (n, m), generator=g).to(torch.float64) / 4
    score[torch.rand(n, m, generator=g) < 0.02] = float("inf")
    score[torch.rand(n, m, generator=g) < 0.02] = -float("inf")
    score[score == 0] = torch.where(torch.rand(int((score == 0).sum()), generator=g) < 0.5,
                                    -0.0, 0.0).to(torch.float64)
    return score


@pytest.mark.parametrize(("n", "m", "k", "block"), [
    (257, 9, 10, 32), (257, 9, 10, 7), (100, 5, 100, 13), (64, 3, 1, 1), (500, 4, 25, 500),
])
def test_blocked_topk_equals_a_stable_sort_of_the_full_matrix_with_ties(n, m, k, block):
    score = _tied_scores(n, m, seed=n + k)
    _assert_equal(topk_from_scores(score, k, block_size=block), score, k)
    # the same blocks in a random order (e.g. arriving from several shards)
    blocks = [(s, score[s:s + block]) for s in range(0, n, block)]
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(1)).tolist()
    _assert_equal(topk_from_blocks([blocks[i] for i in order], k), score, k)


def test_continuous_scores_equal_the_sort_and_keep_their_dtype():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float64, torch.float32):
        score = torch.randn(1000, 17, generator=g, dtype=torch.float64).to(dtype)
        top = topk_from_scores(score, 10, block_size=96)
        _assert_equal(top, score, 10)
        assert top.proponent_scores.dtype == dtype and top.proponents.dtype == torch.int64


def test_a_column_of_equal_scores_keeps_the_first_rows():
    score = torch.zeros(50, 2, dtype=torch.float64)
    score[40, 1] = 1.0  # one larger value after the ties
    top = topk_from_scores(score, 3, block_size=16)
    assert top.proponents.tolist() == [[0, 1, 2], [40, 0, 1]]
    assert top.opponents.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_merging_shard_results_gives_the_global_ranking():
    score = _tied_scores(301, 6, seed=7)
    cols = torch.tensor([5, 0, 3])
    cuts = [0, 120, 121, 250, 301]
    # (row_offset, shard-local ranking) pairs, and rankings with global rows (a rank's
    # blocks carry their global starts), merged in any order
    local = [(a, topk_from_scores(score[a:b], 8, cols)) for a, b in pairwise(cuts) if b - a >= 8]
    small = topk_from_scores(score[120:121], 1, cols)  # a 1-row shard keeps k = 1
    assert small.k == 1
    global_rows = [topk_from_blocks([(a, score[a:b][:, cols])], min(8, b - a), cols)
                   for a, b in pairwise(cuts)]
    want = score[:, cols]
    for parts in (global_rows[::-1], [*local, global_rows[1]]):
        merged = merge_topk(parts)
        assert merged.k == min(p.k for p in (p[1] if isinstance(p, tuple) else p for p in parts))
        _assert_equal(merged, want, merged.k)
        assert torch.equal(merged.test_indices, cols)
    _assert_equal(merge_topk(local), want, 8)


def test_topk_from_features_scores_block_by_block_over_checkpoints():
    g = torch.Generator().manual_seed(0)
    # integer-valued float64 features: every product is exact, so ties are real
    train = [torch.randint(-2, 3, (203, 5), generator=g).double() for _ in range(2)]
    test = [torch.randint(-2, 3, (7, 5), generator=g).double() for _ in range(2)]
    full = (train[0] @ test[0].T + train[1] @ test[1].T) / 2
    blocks = ((s, [t[s:s + 50] for t in train]) for s in range(0, 203, 50))
    _assert_equal(topk_from_features(blocks, test, 6), full, 6)
    assert torch.equal(mean_inner_product(train, test), full)
    # one checkpoint, a custom score (a TRAK-like row weight)
    q = torch.arange(203, dtype=torch.float64) % 3
    blocks = ((s, train[0][s:s + 64]) for s in range(0, 203, 64))
    top = topk_from_features(blocks, test[0], 4, lambda b, t: b @ t.T,
                             test_indices=torch.arange(10, 17))
    assert top.test_indices.tolist() == list(range(10, 17))
    _assert_equal(top, train[0] @ test[0].T, 4)
    weighted = topk_from_features(
        ((s, (train[0][s:s + 64], q[s:s + 64])) for s in range(0, 203, 64)), test[0], 4,
        lambda b, t: b[1][:, None] * (b[0] @ t.T))
    _assert_equal(weighted, q[:, None] * (train[0] @ test[0].T), 4)


def test_bad_input_is_refused_with_typed_errors(tmp_path):
    score = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(DattriValueError, match="k: 7 exceeds the 6"):
        topk_from_scores(score, 7)
    with pytest.raises(DattriValueError, match="k: expected a positive int"):
        topk_from_scores(score, 0)
    with pytest.raises(DattriValueError, match="test_indices: must lie in 0..2"):
        topk_from_scores(score, 1, [3])
    with pytest.raises(DattriValueError, match="every block must be 2-D"):
        topk_from_blocks([(0, torch.zeros(3, 2)), (3, torch.zeros(3, 1))], 1)
    with pytest.raises(DattriValueError, match="no score block"):
        topk_from_blocks([], 1)
    bad = score.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="block at row 0 holds NaN"):
        topk_from_scores(bad, 2)
    top = topk_from_scores(score, 2)
    with pytest.raises(DattriValueError, match="different test examples"):
        merge_topk([top, topk_from_scores(score, 2, [0, 2, 1])])
    with pytest.raises(DattriValueError, match="mean over checkpoints|one test feature matrix"):
        mean_inner_product([score, score], [score])
    again = TopK.load(top.save(tmp_path / "t.pt"))
    assert torch.equal(again.proponents, top.proponents)
    assert torch.equal(again.opponent_scores, top.opponent_scores)
