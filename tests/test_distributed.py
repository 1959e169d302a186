"""Sharded attribution on torch.distributed (gloo on loopback) equals one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dattri import distributed
from dattri.errors import DattriValueError
from ranks import free_port, spawn

HERE = os.path.dirname(os.path.abspath(__file__))
#: a hang guard (the 2-rank run takes seconds); on expiry the ranks are killed
GUARD_S = 600


_free_port = free_port  # test_dist_resume imports it from here


def _spawn(world: int, out_dir: str) -> None:
    port = free_port()
    spawn(os.path.join(HERE, "dist_cases.py"),
          [(r, world, port, out_dir) for r in range(world)], GUARD_S)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    import dist_cases

    torch.set_num_threads(1)
    want, want_held = dist_cases.run_all(str(tmp_path / "single"))
    assert set(want_held.values()) == {46}
    # LiSSA's minibatches: some span both ranks (rows 0-29 | 30-45), some sit on one
    spans = [bool((d < 30).any() and (d >= 30).any()) for d in dist_cases.lissa_draws()]
    assert any(spans) and not all(spans)
    # the rankings are those of the full matrix (stable order: ties to the lower row)
    order = torch.sort(want["trak_disk"], dim=0, descending=True, stable=True)
    assert torch.equal(want["trak_top5"], order.indices[:5].T)
    # a store's features are projected batch by batch, in memory several batches at
    # once (Featurizer.iterate): equal up to the rounding of the products
    torch.testing.assert_close(want["trak_disk"], want["trak_primal"], rtol=1e-9, atol=1e-15)
    _spawn(2, str(tmp_path))
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        # batches 0-2 (30 examples) on rank 0, 3-4 (16) on rank 1
        share = 30 if rank == 0 else 16
        assert saved["held"] == {name: share for name in want_held}
        got = saved["scores"]
        assert set(got) == set(want)
        for name, ref in want.items():
            assert got[name].shape == ref.shape, name
            torch.testing.assert_close(got[name], ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()),
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_shard_loader_splits_batches_contiguously():
    data = TensorDataset(torch.arange(23.0)[:, None], torch.arange(23))
    loader = DataLoader(data, batch_size=4)  # 6 batches
    parts = [distributed.shard_loader(loader, distributed.Shard(r, 4, None)) for r in range(4)]
    assert [p.batches for p in parts] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    seen = torch.cat([b[1] for p in parts for b in p])
    assert torch.equal(seen, torch.arange(23))  # every example once, in loader order
    as_list = distributed.shard_loader(list(loader), distributed.Shard(1, 4, None))
    assert [b[1].tolist() for b in as_list] == [b[1].tolist() for b in list(loader)[2:4]]
    with pytest.raises(DattriValueError, match="6 batch.*for 7 ranks"):
        distributed.shard_loader(loader, distributed.Shard(6, 7, None))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0, shuffle=False)
    with pytest.raises(DattriValueError, match="DistributedSampler"):
        distributed.shard_loader(DataLoader(data, sampler=sampler), distributed.Shard(0, 2, None))


def test_split_covers_range():
    for n in range(0, 12):
        for w in range(1, 5):
            parts = distributed.split(n, w)
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1


def test_process_group_without_init_is_a_typed_error():
    from cases import MLP, digits, l2_loss_factory, loaders

    from dattri.algorithm import TracInAttributor
    from dattri.task import AttributionTask

    train, test = digits(20, 4, classes=3, dim=5)
    model = MLP(5, 3, 3).double()
    task = AttributionTask(loss_func=l2_loss_factory(model), model=model,
                           checkpoints=model.state_dict())
    tr, te = loaders(train, test)
    att = TracInAttributor(task, weight_list=[1.0], normalized_grad=False)
    with pytest.raises(DattriValueError, match="torch.distributed is not initialised"):
        att.attribute(tr, te, process_group=object())
    assert distributed.resolve(None) is None  # one process: nothing to split


USER_MODULE = '''
import sys
sys.path.insert(0, {tests!r})
import torch
from cases import MLP, digits, loaders
from dist_cases import _margin
from dattri.algorithm import TRAKAttributor
from dattri.task import AttributionTask

def build():
    train, test = digits(40, 6, classes=3, dim=8)
    torch.manual_seed(0)
    model = MLP(8, 5, 3).double()
    margin, prob = _margin(model)
    task = AttributionTask(loss_func=margin, model=model, checkpoints=model.state_dict())
    tr, te = loaders(train, test, bs_train=7, bs_test=4)
    att = TRAKAttributor(task, prob, regularization=1e-3, offload="disk", cache_dir={store!r},
                         proj_params={{"proj_dim": 12, "proj_type": "normal", "proj_seed": 4}})
    return {{"attributor": att, "train_loader": tr, "test_loader": te}}
'''


def test_attribute_cli_under_torchrun_equals_one_process(tmp_path):
    import importlib.util

    mod = tmp_path / "task.py"
    mod.write_text(USER_MODULE.format(tests=HERE, store=str(tmp_path / "store")))
    spec = importlib.util.spec_from_file_location("user_task", mod)
    user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user)
    built = user.build()
    built["attributor"].cache_dir = str(tmp_path / "single")
    want = built["attributor"].cache(built["train_loader"]).attribute(built["test_loader"])
    out = tmp_path / "top.pt"
    root = os.path.dirname(HERE)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "dattri.benchmark.cli", "attribute", str(mod), "--top-k", "3", "--out", str(out)]
    for _ in range(2):  # the second run reads the stores the first one wrote
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=GUARD_S)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "[rank 1/2] caching TRAKAttributor" in proc.stderr
        from dattri.topk import TopK

        top = TopK.load(out)  # what `dattri report --topk` reads
        order = torch.sort(want, dim=0, descending=True, stable=True)
        assert torch.equal(top.proponents, order.indices[:3].T)
        torch.testing.assert_close(top.proponent_scores, order.values[:3].T,
                                   rtol=1e-10, atol=1e-14)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["ckpt-0000", "residuals"]
    assert len(list((tmp_path / "store" / "ckpt-0000").iterdir())) == 2  # one store per rank
