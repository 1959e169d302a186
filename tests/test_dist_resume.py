"""A sharded featurize-to-disk run killed mid-way (SIGKILL of one rank) resumes: the
rerun recomputes only the unfinished batches and the features are bit-identical to
an uninterrupted run. Run as a script, this file is one rank of such a run:

    python tests/test_dist_resume.py RANK WORLD PORT CACHE_DIR OUT_DIR KILL_RANK KILL_AT

Rank ``KILL_RANK`` sends itself SIGKILL when it is about to featurize its
``KILL_AT``-th batch (counted over both checkpoints, from 1), so exactly
``KILL_AT - 1`` of its batches are committed (``-1``: no kill). Every rank that
finishes writes ``OUT_DIR/rank{RANK}.pt``: the batches it featurized and its
features per checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

#: a hang guard per run (each takes seconds); on expiry the ranks are killed
GUARD_S = 600
#: 46 examples in batches of 5: 10 batches, 5 per rank of two, 2 checkpoints
BATCH = 5
KILL_RANK, KILL_AT = 1, 8  # rank 1 dies before its 8th batch: 7 = 5 (ckpt 0) + 2 (ckpt 1)


def _attributor(cache_dir: str):
    import dist_cases
    from cases import loaders

    from dattri.algorithm import TracInAttributor
    from dattri.task import AttributionTask

    model, loss, ckpts, train, test = dist_cases._setup()
    tr, _ = loaders(train, test, bs_train=BATCH, bs_test=4)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=ckpts)
    att = TracInAttributor(task, weight_list=[0.3, 0.7], normalized_grad=False, offload="disk",
                           cache_dir=cache_dir,
                           proj_params={"proj_dim": 16, "proj_type": "normal", "proj_seed": 1})
    return att, tr


def _dropout_refusals() -> list[str]:
    """Sharded DataInf / LiSSA / DVEmb with an active dropout layer: refused."""
    import dist_cases
    from cases import MLP, l2_loss_factory, loaders

    from dattri.algorithm import DVEmbAttributor, IFAttributorDataInf, IFAttributorLiSSA
    from dattri.errors import DattriValueError
    from dattri.task import AttributionTask

    _, _, _, train, test = dist_cases._setup()
    tr, _ = loaders(train, test, bs_train=BATCH, bs_test=4)
    torch.manual_seed(0)
    model = MLP(12, 6, 3, p=0.3).double().train()
    loss = l2_loss_factory(model)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    traj, steps = dist_cases._trajectory(model, loss, train)
    made = {"datainf": lambda: IFAttributorDataInf(task),
            "lissa": lambda: IFAttributorLiSSA(task, recursion_depth=2, scaling=10.0),
            "dvemb": lambda: DVEmbAttributor(
                AttributionTask(loss_func=loss, model=model, checkpoints=traj), steps)}
    refused = []
    for name, make in made.items():
        try:
            make().cache(tr)
        except DattriValueError as e:
            if "dropout" in str(e) and "model.eval()" in str(e):
                refused.append(name)
    return refused


def main(rank: int, world: int, port: int, cache_dir: str, out_dir: str, kill_rank: int,
         kill_at: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    att, tr = _attributor(cache_dir)
    featurized: list[int] = []
    orig = att.train_features.batch

    def batch(b, c):
        if rank == kill_rank and len(featurized) + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no flush
        featurized.append(c)
        return orig(b, c)

    att.train_features.batch = batch
    att.cache(tr)
    feats = [torch.cat([b for _, b in s.blocks()]) for s in att._stores]
    refused = _dropout_refusals() if kill_at < 0 else []
    torch.save({"featurized": featurized, "features": feats, "refused": refused},
               os.path.join(out_dir, f"rank{rank}.pt"))
    if kill_rank < 0:
        # both ranks reach the teardown together: a rank that exits while its peer
        # still holds the process group can make the peer's gloo thread abort (SIGABRT,
        # "terminate called without an active exception"; seen once in CI)
        dist.barrier()
    dist.destroy_process_group()


def _spawn(cache_dir, out_dir, kill_rank: int = -1, kill_at: int = -1) -> list[int]:
    from test_distributed import _free_port

    os.makedirs(out_dir, exist_ok=True)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(r), "2", str(port),
                               str(cache_dir), str(out_dir), str(kill_rank), str(kill_at)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=GUARD_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    want = [-signal.SIGKILL if r == kill_rank else 0 for r in range(2)]
    assert codes == want, "\n".join(f"rank {r} (exit {c}):\n{log[-2500:]}"
                                    for r, (c, log) in enumerate(zip(codes, logs)))
    return codes


def _committed(cache_dir, ckpt: int, rank: int) -> int:
    folder = os.path.join(cache_dir, f"ckpt-{ckpt:04d}", f"shard-{rank:05d}")
    return sum(1 for f in os.listdir(folder) if f.startswith("batch-") and f.endswith(".npy"))


def test_killed_rank_resumes_bit_identical_recomputing_only_unfinished_batches(tmp_path):
    cache = tmp_path / "killed"
    _spawn(cache, tmp_path / "run1", KILL_RANK, KILL_AT)
    assert not (tmp_path / "run1" / f"rank{KILL_RANK}.pt").exists()
    first = torch.load(tmp_path / "run1" / "rank0.pt")
    assert first["featurized"] == [0] * 5 + [1] * 5  # rank 0 finished both checkpoints
    # rank 1 committed its 5 batches of checkpoint 0 and 2 of checkpoint 1, then died
    assert [_committed(cache, c, KILL_RANK) for c in (0, 1)] == [5, 2]
    assert (cache / "ckpt-0000" / "shard-00001" / "complete.json").exists()
    assert not (cache / "ckpt-0001" / "shard-00001" / "complete.json").exists()

    _spawn(cache, tmp_path / "run2")  # the rerun: both ranks, same cache_dir
    _spawn(tmp_path / "fresh", tmp_path / "ref")  # an uninterrupted run
    for rank in range(2):
        resumed = torch.load(tmp_path / "run2" / f"rank{rank}.pt")
        ref = torch.load(tmp_path / "ref" / f"rank{rank}.pt")
        # only the unfinished batches: none on rank 0, checkpoint 1's last 3 on rank 1
        # (and one call per store: the check of its first rows)
        assert resumed["featurized"] == [0, 1] + ([1] * 3 if rank == KILL_RANK else [])
        assert ref["featurized"] == [0] * 5 + [1] * 5
        assert len(resumed["features"]) == 2
        for got, want in zip(resumed["features"], ref["features"]):
            assert got.shape == want.shape == ((25 if rank == 0 else 21), 16)
            assert torch.equal(got, want)
        # sharded DataInf / LiSSA / DVEmb with active dropout: refused on every rank
        assert ref["refused"] == ["datainf", "lissa", "dvemb"]


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]), sys.argv[4], sys.argv[5], int(sys.argv[6]),
         int(sys.argv[7]))
