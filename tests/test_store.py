"""dattri.store: resume after SIGKILL (bit-identical, only unfinished batches
recomputed), metadata checks, reads under a byte budget, shards and checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dattri._loader import loader_fingerprint
from dattri.errors import DattriValueError, StoreError
from dattri.store import (
    FeatureStore,
    featurize_to_store,
    open_store,
    shard_range,
    shard_stores,
    store_blocks,
    store_folder,
)

REPO = Path(__file__).resolve().parents[1]

# A TRAK-style featurizer (per-example gradients of a small MLP, projected to 24
# dimensions) over 12 batches; `kill` makes the process SIGKILL itself, either while
# batch K is featurized ("compute") or after batch K's temporary file is written and
# fsync-ed but before it is renamed ("commit").
WORKER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import dattri.store as store_mod
    from dattri.algorithm._engine import Featurizer
    from dattri.algorithm.base import make_projection
    from dattri.store import featurize_to_store, open_store
    from dattri.task import AttributionTask

    cache_dir, mode, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(94, 6, generator=g), torch.randint(0, 3, (94,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    def loss(params, data):
        xb, yb = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    proj = make_projection({"proj_dim": 24, "proj_type": "normal", "proj_seed": 0,
                            "proj_max_batch_size": 8}, torch.device("cpu"))
    feat = Featurizer(task, "loss", None, torch.device("cpu"), transform=proj)

    class Counting:
        device = feat.device
        calls = 0
        def batch(self, b, c):
            if mode == "compute" and Counting.calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            Counting.calls += 1
            return feat.batch(b, c)

    if mode == "commit":
        real = os.replace
        def replace(src, dst):
            if str(dst).endswith(f"batch-{kill_at:08d}.npy"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        store_mod.os.replace = replace

    store = open_store(cache_dir, loader, 0, settings={"proj_dim": 24})
    computed = featurize_to_store(Counting(), loader, 0, store, show_progress=False)
    print(json.dumps({"computed": computed, "calls": Counting.calls}))
""")


def _worker(tmp_path: Path, cache_dir: Path, mode: str, kill_at: int = -1):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # generous bound: the test stops by itself if a worker hangs; a correct one takes seconds
    return subprocess.run([sys.executable, str(script), str(cache_dir), mode, str(kill_at)],
                          capture_output=True, text=True, timeout=900, cwd=REPO, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})


def _features(cache_dir: Path) -> list[torch.Tensor]:
    store = FeatureStore.load(store_folder(cache_dir, 0))
    return [store.read_batch(i) for i in range(store.num_batches)]


def test_a_sigkilled_featurize_run_resumes_bit_identically(tmp_path):
    ref = _worker(tmp_path, tmp_path / "ref", "none")
    assert ref.returncode == 0, ref.stderr
    assert json.loads(ref.stdout)["computed"] == 12
    want = _features(tmp_path / "ref")
    for mode, kill_at in (("compute", 5), ("commit", 8)):
        cache = tmp_path / mode
        killed = _worker(tmp_path, cache, mode, kill_at)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        folder = store_folder(cache, 0)
        left = FeatureStore.load(folder)
        assert left.done() == set(range(kill_at)) and not left.complete
        strays = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
        assert strays == ([f".batch-{kill_at:08d}.npy.{strays[0].split('.')[3]}.tmp"]
                          if mode == "commit" else [])
        again = _worker(tmp_path, cache, "none")
        assert again.returncode == 0, again.stderr
        # and one call more: the first 2 examples computed again to check the store
        # against this run's features (store._check_first_rows)
        assert json.loads(again.stdout) == {"computed": 12 - kill_at, "calls": 13 - kill_at}
        got = _features(cache)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # cleaned at the end
        third = _worker(tmp_path, cache, "none")  # a finished store: nothing to do
        assert json.loads(third.stdout)["computed"] == 0


class _Counted(Dataset):
    """A map-style data set that counts the items it loads."""

    def __init__(self, n: int, dim: int = 5) -> None:
        g = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, dim, generator=g, dtype=torch.float64)
        self.loaded = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.loaded += 1
        return self.x[i]


class _Square:
    """Features ``[x, x^2]`` of a batch; counts its calls."""

    device = torch.device("cpu")

    def __init__(self, dtype=torch.float64, fail_at: int | None = None) -> None:
        self.calls, self.dtype, self.fail_at = 0, dtype, fail_at

    def batch(self, b, ckpt):
        if self.calls == self.fail_at:
            raise KeyboardInterrupt  # a run stopped mid-way
        self.calls += 1
        return torch.cat([b, b * b + ckpt], dim=1).to(self.dtype)


def test_resume_loads_only_the_unfinished_batches_of_a_dataloader(tmp_path):
    data = _Counted(45)
    loader = DataLoader(data, batch_size=4)  # 12 batches, the last of 1
    store = open_store(tmp_path, loader, 0, settings="sq")
    with pytest.raises(KeyboardInterrupt):
        featurize_to_store(_Square(fail_at=7), loader, 0, store, show_progress=False)
    assert store.done() == set(range(7)) and not store.complete
    data.loaded = 0
    again = _Square()
    assert featurize_to_store(again, loader, 0, open_store(tmp_path, loader, 0, settings="sq")) == 5
    assert again.calls == 6  # and the first 2 examples again, to check the store
    # the 17 examples of the 5 unfinished batches, the 45 of the loader fingerprint
    # (every example hashed, once: featurize_to_store trusts open_store's) and the 2
    # of the check; the model saw 17 + 2
    assert data.loaded == 17 + 45 + 2
    assert store.complete and store.n == 45 and store.num_batches == 12 and store.dim == 10
    full = torch.cat([store.read_batch(i) for i in range(12)])
    assert torch.equal(full, torch.cat([data.x, data.x ** 2], dim=1))
    # a loader that is not a plain DataLoader: iterated whole, finished batches skipped
    batches = [data.x[i:i + 4] for i in range(0, 45, 4)]
    other = FeatureStore(tmp_path / "list", loader_fingerprint(batches), "sq")
    with pytest.raises(KeyboardInterrupt):
        featurize_to_store(_Square(fail_at=3), batches, 0, other)
    rest = _Square()
    # the 9 unfinished batches, and the first 2 examples again to check the store
    assert featurize_to_store(rest, batches, 0, other) == 9 and rest.calls == 10
    assert torch.equal(torch.cat([b for _, b in other.blocks()]), full)


def test_a_store_of_other_data_settings_or_layout_is_refused(tmp_path):
    data = _Counted(20)
    loader = DataLoader(data, batch_size=5)
    store = open_store(tmp_path, loader, 0, settings={"proj_dim": 8, "seed": 0})
    featurize_to_store(_Square(), loader, 0, store)
    folder = str(store.folder)
    negated = _Counted(20)
    negated.x = -negated.x  # same size, other examples
    # the same settings in another key order: accepted
    assert open_store(tmp_path, loader, 0, settings={"seed": 0, "proj_dim": 8}).complete
    cases = [
        (lambda: open_store(tmp_path, loader, 0, settings={"proj_dim": 16, "seed": 0}), "other featurizer settings"),
        (lambda: open_store(tmp_path, DataLoader(_Counted(21), batch_size=5), 0,
                            settings={"proj_dim": 8, "seed": 0}), "another training loader"),
        (lambda: open_store(tmp_path, DataLoader(negated, batch_size=5), 0,
                            settings={"proj_dim": 8, "seed": 0}), "another training loader"),
        (lambda: FeatureStore(folder, loader_fingerprint(loader), {"proj_dim": 8, "seed": 0}, dim=3),
         "another feature dimension"),
        (lambda: FeatureStore(folder, loader_fingerprint(loader), {"proj_dim": 8, "seed": 0},
                              dtype=torch.float32), "another feature dtype"),
        (lambda: FeatureStore(folder, loader_fingerprint(loader), {"proj_dim": 8, "seed": 0},
                              row_offset=20), "another shard"),
    ]
    for make, what in cases:
        with pytest.raises(StoreError, match=what) as err:
            make()
        assert folder in str(err.value) and "different cache_dir, or delete the folder" in str(err.value)
    # the featurizer changed its output without changing the key
    fresh = open_store(tmp_path / "b", loader, 0, settings="k")
    featurize_to_store(_Square(), loader, 0, fresh)
    (fresh.folder / "complete.json").unlink()
    (fresh.folder / "batch-00000002.npy").unlink()
    with pytest.raises(StoreError, match="another feature dtype"):
        featurize_to_store(_Square(torch.float32), loader, 0, open_store(tmp_path / "b", loader, 0, settings="k"))
    # featurizing a store with a loader it was not opened for
    with pytest.raises(StoreError, match="another training loader"):
        featurize_to_store(_Square(), DataLoader(_Counted(7)), 0, fresh)
    with pytest.raises(StoreError, match="not complete"):
        list(fresh.blocks())
    with pytest.raises(StoreError, match="no feature store here"):
        FeatureStore.load(tmp_path / "nothing")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "batch-00000000.npy").write_bytes(b"")
    with pytest.raises(StoreError, match="without meta.json"):
        FeatureStore(tmp_path / "c")
    # a dimension given in advance, the dtype taken from the first batch
    ahead = FeatureStore(tmp_path / "d", dim=10)
    ahead.write_batch(0, torch.ones(2, 10))
    assert ahead.dtype == torch.float32 and FeatureStore(tmp_path / "d", dim=10).dim == 10
    with pytest.raises(StoreError, match="another feature dimension"):
        ahead.write_batch(1, torch.ones(2, 9))


def test_blocks_stay_within_the_byte_budget(tmp_path):
    n, dim = 6000, 64  # 3 MB of float64 features in 47 batch files
    data = _Counted(n, dim // 2)
    loader = DataLoader(data, batch_size=128)
    store = open_store(tmp_path, loader, 0)
    featurize_to_store(_Square(), loader, 0, store)
    want = torch.cat([data.x, data.x ** 2], dim=1)
    for budget in (100_000, 3 * 8 * dim, 1):  # rows spanning batch files; 3 rows; 1 row
        rows = max(1, budget // (dim * 8))
        tracemalloc.start()
        start, peak_block = 0, 0
        for s, block in store.blocks(budget_bytes=budget):
            assert s == start and block.dtype == torch.float64
            assert block.shape[0] == min(rows, n - s)
            assert torch.equal(block, want[s:s + block.shape[0]])
            peak_block = max(peak_block, block.numel() * block.element_size())
            start += block.shape[0]
            del block
            if rows == 1 and s > 300:
                break
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak_block <= max(budget, dim * 8)
        # numpy's block buffers are traced; the 3 MB of features never are at once
        assert peak < 2 * max(budget, dim * 8) + 200_000, (budget, peak)
    with pytest.raises(DattriValueError, match="budget_bytes=0"):
        next(store.blocks(budget_bytes=0))


def test_shards_and_checkpoints_read_back_in_global_row_order(tmp_path):
    data = _Counted(23)
    world = 3
    ranges = [shard_range(len(data), world, r) for r in range(world)]
    assert [len(r) for r in ranges] == [8, 8, 7] and ranges[-1].stop == 23
    assert [i for r in ranges for i in r] == list(range(23))
    for ckpt in (0, 1):
        for rank, rows in enumerate(ranges[::-1]):  # any order of ranks
            rank = world - 1 - rank
            sub = torch.utils.data.Subset(data, list(rows))
            loader = DataLoader(sub, batch_size=3)
            store = open_store(tmp_path, loader, ckpt, shard=rank, settings="sq", row_offset=rows.start)
            featurize_to_store(_Square(torch.bfloat16), loader, ckpt, store)
    assert [s.row_offset for s in shard_stores(tmp_path, 1)] == [0, 8, 16]
    blocks = list(store_blocks(tmp_path, (0, 1), budget_bytes=2 * 10 * 2 * 4))
    assert [s for s, _ in blocks] == [0, 4, 8, 12, 16, 20]  # 4 rows of 20 bytes per checkpoint
    for c in (0, 1):
        got = torch.cat([b[c] for _, b in blocks])
        want = torch.cat([data.x, data.x ** 2 + c], dim=1).to(torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)  # bit-exact bfloat16
    with pytest.raises(DattriValueError, match="world_size=2, rank=2"):
        shard_range(10, 2, 2)
    FeatureStore.load(store_folder(tmp_path, 1, 1)).delete()
    with pytest.raises(StoreError, match="a shard is missing"):
        shard_stores(tmp_path, 1)


def _scale_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_bench", REPO / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_benchmark_smoke_matches_the_full_matrix_and_resumes(tmp_path):
    scale = _scale_module()
    args = ["--n", "700", "--test", "20", "--k", "3", "--batch-size", "100", "--train-n", "300",
            "--epochs", "1", "--proj-dim", "32", "--graddot-proj-dim", "0", "--budget-mb", "1",
            "--cache-dir", str(tmp_path), "--check"]
    first = scale.main(args)
    for method in ("trak1", "graddot"):
        assert first["check"][method]["same_rows"], method
        assert first[method]["computed_batches"] == 7
    assert first["check"]["graddot"]["max_rel_score_diff"] < 1e-4  # float32 products, blocked
    assert first["peak_under_2GiB"] and first["trak1"]["store_bytes"] > 700 * 33 * 4
    again = scale.main(args)  # the stores are complete: nothing is featurized again
    assert again["trak1"]["computed_batches"] == 0 and again["graddot"]["computed_batches"] == 0
    assert again["check"]["trak1"]["same_rows"]
    # the same run through TRAKAttributor / TracInAttributor(offload="disk", top_k=)
    via = scale.main([*args, "--engine", "attributor"])
    assert via["engine"] == "attributor"
    assert via["check"]["trak1"]["same_rows"] and via["check"]["graddot"]["same_rows"]
    assert (tmp_path / "attributor-trak1").is_dir()
    # the augmentation: row i is base digit i % 60000 shifted by (dy, dx) in -2..2
    base, _ = scale._mnist()
    data = scale.ShiftedDigits(base, 60_000 - 2, 60_003)
    shifts = set()
    for j, (x, y) in enumerate(data.__getitems__(list(range(5)))):
        i = 60_000 - 2 + j
        src = base[i % 60_000][0][0]
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(x[0], _shift(src, dy, dx, float(base[i % 60_000][0].min())))]
        assert hits and int(y) == int(base.targets[i % 60_000])
        shifts.add(hits[0])
    assert len(shifts) > 1


def _shift(img: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    out = torch.full_like(img, fill)
    h, w = img.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out
