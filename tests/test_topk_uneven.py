"""Top-k over uneven shards: ranks holding fewer than ``k`` training rows (or none).

``k`` is checked against the training rows of all ranks together; each rank ranks
``min(k, its rows)`` and the merge gives the single-process ranking. The sharded
cases run 2 gloo ranks on 127.0.0.1 (this file is their script), bounded in time.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dattri.errors import DattriValueError, NonFiniteError
from dattri.topk import merge_topk, topk_from_blocks, topk_from_scores
from ranks import free_port, spawn

pytestmark = pytest.mark.usefixtures("float64")

HERE = os.path.dirname(os.path.abspath(__file__))
#: a hang guard for the 2-rank run (it takes seconds); on expiry the ranks are killed
GUARD_S = 240
N, M = 5, 3
BATCHES = (4, 3)  # 5 rows on 2 ranks: 4 | 1 and 3 | 2
TOP_KS = (N, 2, 3)  # k = n, and k above one rank's rows


def _setup(batch: int):
    from dattri.algorithm import TracInAttributor
    from dattri.task import AttributionTask

    torch.manual_seed(0)
    model = nn.Linear(3, 2)

    def loss(params, data):
        return F.cross_entropy(torch.func.functional_call(model, params, (data[0],)), data[1])

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 3, generator=g), torch.randint(0, 2, (N,), generator=g)
    xt, yt = torch.randn(M, 3, generator=g), torch.randint(0, 2, (M,), generator=g)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    att = TracInAttributor(task, weight_list=[1.0], normalized_grad=False)
    return (att, DataLoader(TensorDataset(x, y), batch_size=batch),
            DataLoader(TensorDataset(xt, yt), batch_size=M))


def _scores() -> torch.Tensor:
    return torch.randn(N, M, generator=torch.Generator().manual_seed(2))


def _zero_row_blocks(rank: int, score: torch.Tensor, empty_block: bool) -> list:
    """Rank 0 holds every row; rank 1 none (no block, or one block of zero rows)."""
    if rank == 0:
        return [(0, score[:3]), (3, score[3:])]
    return [(N, score[:0])] if empty_block else []


def _topk_fields(top) -> dict[str, torch.Tensor]:
    return {"proponents": top.proponents, "proponent_scores": top.proponent_scores,
            "opponents": top.opponents, "opponent_scores": top.opponent_scores}


def _error(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded for the test process
        return type(exc).__name__, str(exc)
    return None


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank's rankings and errors, saved to ``out_dir/rank{rank}.pt``."""
    import torch.distributed as dist

    from dattri.algorithm._scored import ranked
    from dattri.distributed import resolve

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    out: dict = {}
    try:
        for batch in BATCHES:
            att, train, test = _setup(batch)
            att.cache(train)
            for k in TOP_KS:
                out[("attribute", batch, k)] = _topk_fields(att.attribute(train, test, top_k=k))
            # k above the 5 rows of both ranks: the same typed error on each rank
            out[("attribute_error", batch)] = _error(lambda: att.attribute(train, test, top_k=N + 1))
        shard, score = resolve(None), _scores()
        for empty_block in (False, True):
            for k in (N, 2):
                top = ranked(_zero_row_blocks(rank, score, empty_block), k, shard)
                out[("zero_rows", empty_block, k)] = _topk_fields(top)
            out[("zero_rows_error", empty_block)] = _error(
                lambda: ranked(_zero_row_blocks(rank, score, empty_block), N + 1, shard))
        nan = score.clone()
        nan[4, 1] = float("nan")  # on rank 1 only: both ranks raise, neither waits
        blocks = [(0, nan[:3])] if rank == 0 else [(3, nan[3:])]
        out["nan_error"] = _error(lambda: ranked(blocks, 2, shard))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt.tmp"))
        os.replace(os.path.join(out_dir, f"rank{rank}.pt.tmp"), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # tear down together
    finally:
        dist.destroy_process_group()


def _spawn(out_dir: str) -> None:
    port = free_port()
    spawn(os.path.abspath(__file__), [(r, port, out_dir) for r in range(2)], GUARD_S)


def _dense(score: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The top-k of a dense score matrix by a stable sort of every column."""
    desc = torch.sort(score, dim=0, descending=True, stable=True)
    asc = torch.sort(score, dim=0, stable=True)
    return {"proponents": desc.indices[:k].T, "proponent_scores": desc.values[:k].T,
            "opponents": asc.indices[:k].T, "opponent_scores": asc.values[:k].T}


def _assert_same(got: dict, want: dict, what: str) -> None:
    for name in ("proponents", "opponents"):
        assert torch.equal(got[name], want[name]), f"{what}: {name}"
    for name in ("proponent_scores", "opponent_scores"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


def test_two_ranks_uneven_shards_equal_one_process(tmp_path):
    torch.set_num_threads(1)
    want = {}
    for batch in BATCHES:
        att, train, test = _setup(batch)
        full = att.attribute(train, test)  # the dense (n, m) scores, one process
        for k in TOP_KS:
            want[("attribute", batch, k)] = _dense(full, k)
            _assert_same(_topk_fields(att.attribute(train, test, top_k=k)),
                         want[("attribute", batch, k)], f"one process, batch {batch}, k {k}")
    for k in (N, 2):
        for empty_block in (False, True):
            want[("zero_rows", empty_block, k)] = _dense(_scores(), k)
    _spawn(str(tmp_path))
    expected_k_error = ("DattriValueError",
                        f"k: {N + 1} exceeds the {N} training rows scored; pass k <= {N}.")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key, ref in want.items():
            _assert_same(got[key], ref, f"rank {rank}, {key}")
        for batch in BATCHES:
            assert got[("attribute_error", batch)] == expected_k_error, (rank, batch)
        for empty_block in (False, True):
            assert got[("zero_rows_error", empty_block)] == expected_k_error, (rank, empty_block)
        kind, text = got["nan_error"]
        assert kind == NonFiniteError.__name__ and "NaN" in text, (rank, got["nan_error"])


# ----------------------------------------------------------- the pieces, one process
def test_partial_shard_ranks_its_rows_and_merge_checks_the_union():
    score = _scores()
    parts = [topk_from_blocks([(0, score[:4])], 3, partial=True),
             topk_from_blocks([(4, score[4:])], 3, partial=True),  # 1 row < k
             topk_from_blocks([(5, score[:0])], 3, partial=True)]  # no rows
    assert [p.k for p in parts] == [3, 1, 0]
    assert parts[2].proponent_scores.dtype == score.dtype
    for k in (1, 3, N):
        shards = [topk_from_blocks([(0, score[:4])], k, partial=True),
                  topk_from_blocks([(4, score[4:])], k, partial=True), parts[2]]
        merged = merge_topk(shards, k=k)
        _assert_same(_topk_fields(merged), _dense(score, k), f"k {k}")
        _assert_same(_topk_fields(merged), _topk_fields(topk_from_scores(score, k)), f"k {k}")
    with pytest.raises(DattriValueError, match=rf"k: 6 exceeds the {N} training rows"):
        merge_topk([topk_from_blocks([(0, score[:4])], 6, partial=True),
                    topk_from_blocks([(4, score[4:])], 6, partial=True)], k=6)
    # without partial, k is still checked against the rows of the blocks
    with pytest.raises(DattriValueError, match="k: 2 exceeds the 1 training rows"):
        topk_from_blocks([(4, score[4:])], 2)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
