"""Tests of the retraining engine: vectorised trainer, retrain folders, resume, executors,
ground truth from a folder, and bad input."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import dattri
from dattri.errors import (
    DattriRuntimeError,
    DattriValueError,
    GroundTruthError,
    InvalidLossError,
    ShuffledLoaderError,
)
from dattri.metric import calculate_lds_ground_truth, calculate_loo_ground_truth
from dattri.model_util._retrain_store import load_model_file
from dattri.model_util.ensemble import checkpoint_paths, train_ensemble
from dattri.model_util.retrain import retrain_lds, retrain_loo
from dattri.model_util.vtrain import (
    VectorizedTraining,
    _ModelStreams,
    train_model,
    train_models_vectorized,
)

# Training functions must be importable by spawned worker processes, so they live in a
# small module written to a temporary folder that is put on sys.path (and PYTHONPATH).
HELPERS = textwrap.dedent('''
    import os, time
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    def make_data(n=24, d=4):
        g = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(n, d, generator=g, dtype=torch.float64),
                             torch.randint(0, 3, (n,), generator=g))

    def train_small(loader, seed=0):
        """Deterministic float64 softmax regression, 3 epochs of momentum SGD."""
        if os.environ.get("DATTRI_TEST_PIDS"):
            open(os.path.join(os.environ["DATTRI_TEST_PIDS"], str(os.getpid())), "w").close()
        if os.environ.get("DATTRI_TEST_LOG"):
            with open(os.environ["DATTRI_TEST_LOG"], "a") as f:
                f.write(f"{seed}\\n")
        model = nn.Linear(4, 3).double()
        params = list(model.parameters())
        bufs = [torch.zeros_like(p) for p in params]
        for _ in range(3):
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x), y)
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, b, g in zip(params, bufs, grads):
                        b.mul_(0.5).add_(g)
                        p.sub_(0.1 * b)
        time.sleep(float(os.environ.get("DATTRI_TEST_DELAY", "0")))
        return model

    def train_sum(loader):
        """A 'model' whose weight is the sum of the inputs it saw and bias their count."""
        xs = torch.cat([x for x, _ in loader])
        model = nn.Linear(xs.shape[1], 1).double()
        with torch.no_grad():
            model.weight.copy_(xs.sum(0, keepdim=True))
            model.bias.fill_(xs.shape[0])
        return model

    def train_fails(loader):
        raise ValueError("boom")
''')


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("helpers")
    (folder / "_dattri_rt_helpers.py").write_text(HELPERS)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("_dattri_rt_helpers")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("_dattri_rt_helpers", None)


def _loader(h, batch_size=5, **kw):
    return DataLoader(h.make_data(), batch_size=batch_size, **kw)


def _states(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    meta = json.loads((folder / "metadata.json").read_text())
    entries = meta["models"] + ([meta["full_model"]] if "full_model" in meta else [])
    return {e["file"]: load_model_file(folder / e["file"], e["job_id"]) for e in entries}


def _assert_same_models(a: Path, b: Path, exact: bool = True) -> None:
    sa, sb = _states(a), _states(b)
    assert sa.keys() == sb.keys()
    for f in sa:
        for k in sa[f]:
            if exact:
                assert torch.equal(sa[f][k], sb[f][k]), (f, k)
            else:
                torch.testing.assert_close(sa[f][k], sb[f][k], rtol=0, atol=1e-12)


# ------------------------------------------------------------------ vectorised trainer
def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


def _data(n=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_vectorized_equals_per_model_loop_float64():
    x, y = _data()
    g = torch.Generator().manual_seed(1)
    subsets = [torch.randperm(40, generator=g)[:23] for _ in range(4)]  # 23: partial last batch
    seeds = [11, 12, 13, 14]
    kw = {"epochs": 3, "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-2, "batch_size": 5,
          "dtype": torch.float64}
    vec = train_models_vectorized(_mlp, nn.functional.cross_entropy, x, y, subsets, seeds,
                                  chunk_size=3, progress=False, **kw)
    for s, sd, v in zip(subsets, seeds, vec):
        ref = train_model(_mlp, nn.functional.cross_entropy, x, y, s, sd, **kw)
        assert ref.keys() == v.keys() == _mlp().state_dict().keys()
        for k in ref:
            torch.testing.assert_close(v[k], ref[k], rtol=0, atol=1e-12)
    # a model does not depend on which models share its chunk
    alone = train_models_vectorized(_mlp, nn.functional.cross_entropy, x, y, subsets[3:], seeds[3:],
                                    progress=False, **kw)[0]
    for k in alone:
        torch.testing.assert_close(alone[k], vec[3][k], rtol=0, atol=1e-12)
    # different seeds give different models
    assert not torch.allclose(vec[0]["0.weight"], vec[1]["0.weight"])


class _ImageMLP(nn.Module):
    """A lead nn.Linear on the flattened image, dropout after it (the MNIST MLP's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(12, 8), nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x.reshape(x.shape[0], -1)))))


class _ScaledInput(_ImageMLP):
    """A parameter used on the input before the lead layer, outside any module call:
    the lead's input equals x at initialisation (scale 1) but not after a step."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(12))

    def forward(self, x):
        return super().forward(x.reshape(x.shape[0], -1) * self.scale)


class _DropFirst(_ImageMLP):
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.drop(x.reshape(x.shape[0], -1)))))


class _LeadTwice(nn.Module):
    """The lead layer called a second time: only the first step's gradient check can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.fc1(x.reshape(x.shape[0], -1))))))


def _count_shared_steps(monkeypatch):
    import dattri.model_util.vtrain as vt

    calls = {"shared": 0}
    original = vt._SharedInput.grads

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["shared"] += out is not None
        return out

    monkeypatch.setattr(vt._SharedInput, "grads", spy)
    return calls


@pytest.mark.parametrize(("factory", "shared_steps"),
                         [(_ImageMLP, 21), (lambda: nn.Linear(12, 3), 21), (_ScaledInput, 0),
                          (_DropFirst, 0), (_LeadTwice, 1)],
                         ids=["mlp", "root-linear", "param-before-lead", "dropout-before-lead",
                              "lead-called-twice"])
def test_vectorized_leave_one_out_shared_input_path_float64(monkeypatch, factory, shared_steps):
    """Leave-one-out models of one seed share their minibatch rows: the lead layer's
    products come from GEMMs over the union rows. Every model equals the plain loop;
    the path is taken for models it fits and declined (still exact) for the others."""
    g = torch.Generator().manual_seed(3)
    n = 41
    x = torch.randn(n, 1, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    flat = isinstance(factory(), nn.Linear)
    xs = x.reshape(n, -1) if flat else x
    subsets = [[j for j in range(n) if j != i] for i in (0, 7, 20, 40)]
    kw = {"epochs": 3, "lr": 0.3, "momentum": 0.9, "weight_decay": 1e-2, "batch_size": 6,
          "dtype": torch.float64}
    calls = _count_shared_steps(monkeypatch)
    vec = train_models_vectorized(factory, nn.functional.cross_entropy, xs, y, subsets, [5] * 4,
                                  progress=False, **kw)
    # 3 epochs x 7 minibatches; declined by the probe (0) or by the first step's check (1)
    assert calls["shared"] == shared_steps
    for s, v in zip(subsets, vec):
        ref = train_model(factory, nn.functional.cross_entropy, xs, y, s, 5, **kw)
        for k in ref:
            torch.testing.assert_close(v[k], ref[k], rtol=0, atol=1e-12)
    assert not torch.allclose(vec[0][next(iter(vec[0]))], vec[1][next(iter(vec[1]))])


def test_vectorized_full_batch_matches_handwritten_gradient_descent():
    x, y = _data(n=30, d=6, seed=2)
    subset = torch.arange(0, 30, 2)
    lr, mu, wd, epochs = 0.3, 0.8, 0.05, 6
    out = train_models_vectorized(lambda: nn.Linear(6, 3), nn.functional.cross_entropy, x, y,
                                  [subset], [7], epochs=epochs, lr=lr, momentum=mu,
                                  weight_decay=wd, batch_size=None, shuffle=False,
                                  dtype=torch.float64, progress=False)[0]
    torch.manual_seed(7)
    ref = nn.Linear(6, 3).double()
    w, b = ref.weight.detach().clone(), ref.bias.detach().clone()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(epochs):
        w.requires_grad_(True)
        b.requires_grad_(True)
        loss = nn.functional.cross_entropy(x[subset] @ w.T + b, y[subset])
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            vw = mu * vw + gw + wd * w
            vb = mu * vb + gb + wd * b
            w, b = w - lr * vw, b - lr * vb
    torch.testing.assert_close(out["weight"], w.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(out["bias"], b.detach(), rtol=0, atol=1e-13)


def test_loo_data_order_is_the_full_order_minus_the_removed_example():
    full = torch.ones(12, dtype=torch.bool)
    loo = full.clone()
    loo[5] = False
    a, b = _ModelStreams(3, full, True), _ModelStreams(3, loo, True)
    for _ in range(3):
        oa, ob = a.epoch_order(), b.epoch_order()
        assert torch.equal(oa[oa != 5], ob)


class _BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(6, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.lin(x))


class _FunctionalDropout(nn.Linear):
    def forward(self, x):
        return nn.functional.dropout(super().forward(x), 0.5, training=True)


def test_vectorized_rejects_unsupported_models_and_inputs():
    x, y = _data()
    ce = nn.functional.cross_entropy
    with pytest.raises(DattriValueError, match="BatchNorm"):
        train_models_vectorized(_BN, ce, x.float(), y, [range(10)], [0], progress=False)
    with pytest.raises(DattriValueError, match="random operations other than nn.Dropout"):
        train_models_vectorized(lambda: _FunctionalDropout(6, 3), ce, x.float(), y, [range(10)], [0], progress=False)
    with pytest.raises(DattriValueError, match="same size"):
        train_models_vectorized(_mlp, ce, x, y, [range(10), range(11)], [0, 1], progress=False)
    with pytest.raises(DattriValueError, match="seeds has 1 entries but there are 2 subsets"):
        train_models_vectorized(_mlp, ce, x, y, [range(10), range(10, 20)], [0], progress=False)
    with pytest.raises(DattriValueError, match=r"subsets\[0\] repeats"):
        train_models_vectorized(_mlp, ce, x, y, [[1, 1, 2]], [0], progress=False)
    with pytest.raises(DattriValueError, match=r"holds indices in \[0, 40\]"):
        train_models_vectorized(_mlp, ce, x, y, [[0, 40]], [0], progress=False)


# ------------------------------------------------------------------ retrain folders
def test_retrain_lds_metadata_and_data_routing(helpers, tmp_path):
    ds = helpers.make_data()
    order = list(range(23, 3, -1))  # a fixed sampler over part of the dataset, reversed
    dl = DataLoader(ds, batch_size=4, sampler=order)
    meta = retrain_lds(helpers.train_sum, dl, tmp_path, num_subsets=5, subset_ratio=0.3,
                       num_runs_per_subset=2, seed=9, num_workers=0, progress=False)
    assert meta == json.loads((tmp_path / "metadata.json").read_text())
    assert meta["dataset_indices"] == order and meta["subset_size"] == 6
    assert len({m["seed"] for m in meta["models"]}) == 10
    for sub in meta["subsets"]:
        pos = sub["indices"]
        assert pos == sorted(set(pos)) and 0 <= pos[0] and pos[-1] < 20
    for m in meta["models"]:
        assert not os.path.isabs(m["file"])
        pos = meta["subsets"][m["subset"]]["indices"]
        state = load_model_file(tmp_path / m["file"], m["job_id"])
        expected = ds.tensors[0][[order[p] for p in pos]].sum(0)
        torch.testing.assert_close(state["weight"][0], expected)
        assert state["bias"].item() == len(pos)


def test_retrain_loo_metadata_and_full_model(helpers, tmp_path):
    ds = helpers.make_data()
    dl = DataLoader(ds, batch_size=7)
    meta = retrain_loo(helpers.train_sum, dl, tmp_path, indices=[2, 5, 7], seed=4,
                       num_workers=0, progress=False, save_format="torch")
    total = ds.tensors[0].sum(0)
    full = load_model_file(tmp_path / meta["full_model"]["file"])
    torch.testing.assert_close(full["weight"][0], total)
    for m in meta["models"]:
        assert m["file"].endswith(".pt") and m["seed"] == 4
        state = load_model_file(tmp_path / m["file"], m["job_id"])
        torch.testing.assert_close(state["weight"][0], total - ds.tensors[0][m["removed"]])


def _ce_target_factory():
    model = nn.Linear(4, 3).double()

    def target(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    def target_loop_only(params, batch):  # .item() cannot be vmapped: exercises the fallback
        x, y = batch
        value = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
        return torch.tensor(value.item(), dtype=torch.float64)

    return model, target, target_loop_only


def _manual_losses(state, x, y):
    logits = x @ state["weight"].T + state["bias"]
    return nn.functional.cross_entropy(logits, y, reduction="none")


def test_ground_truth_values_signs_and_averaging(helpers, tmp_path):
    dl = _loader(helpers)
    x_te, y_te = helpers.make_data().tensors[0][:9], helpers.make_data().tensors[1][:9]
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=4)
    _, target, target_loop = _ce_target_factory()

    meta = retrain_lds(helpers.train_small, dl, tmp_path / "lds", num_subsets=4,
                       num_runs_per_subset=2, seed=1, num_workers=0, progress=False)
    values, indices = calculate_lds_ground_truth(target, tmp_path / "lds", test)
    assert values.shape == (4, 9) and indices.shape == (4, 12)
    for s, sub in enumerate(meta["subsets"]):
        assert indices[s].tolist() == sub["indices"]
        runs = [m for m in meta["models"] if m["subset"] == sub["id"]]
        manual = torch.stack([_manual_losses(load_model_file(tmp_path / "lds" / m["file"]), x_te, y_te)
                              for m in runs]).mean(0)
        torch.testing.assert_close(values[s], -manual)  # negated target
    loop_values, _ = calculate_lds_ground_truth(target_loop, tmp_path / "lds", test)
    torch.testing.assert_close(loop_values, values)

    meta = retrain_loo(helpers.train_small, dl, tmp_path / "loo", indices=[0, 3, 8], seed=2,
                       num_workers=0, progress=False)
    values, removed = calculate_loo_ground_truth(target, tmp_path / "loo", test)
    assert removed.tolist() == [0, 3, 8]
    full = _manual_losses(load_model_file(tmp_path / "loo" / meta["full_model"]["file"]), x_te, y_te)
    for m, row in zip(meta["models"], values):
        loo = _manual_losses(load_model_file(tmp_path / "loo" / m["file"]), x_te, y_te)
        torch.testing.assert_close(row, loo - full)

    with pytest.raises(InvalidLossError, match=r"must return a scalar .* returned \(1, 3\)"):
        calculate_lds_ground_truth(lambda p, b: functional_call(_ce_target_factory()[0], p, (b[0],)),
                                   tmp_path / "lds", test)


def test_vectorized_retrain_resume_after_damage(tmp_path):
    x, y = _data(n=30)
    dl = DataLoader(TensorDataset(x, y), batch_size=6)
    vt = VectorizedTraining(_mlp, nn.functional.cross_entropy, epochs=2, lr=0.1, momentum=0.9,
                            batch_size=4, dtype=torch.float64, chunk_size=4)
    retrain_lds(None, dl, tmp_path / "ref", num_subsets=6, seed=2, vectorized=vt,
                num_workers=0, progress=False)
    retrain_lds(None, dl, tmp_path / "run", num_subsets=6, seed=2, vectorized=vt,
                num_workers=0, progress=False)
    run = tmp_path / "run"
    (run / "1" / "model_weights_0.safetensors").unlink()
    (run / "4" / "model_weights_0.safetensors").unlink()
    half = run / "2" / "model_weights_0.safetensors"
    half.write_bytes(half.read_bytes()[:100])  # a half-written file under the final name
    (run / "3" / ".model_weights_0.safetensors.tmp-1-abc").write_bytes(b"junk")
    untouched = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run.glob("[035]/*.safetensors")}
    with pytest.warns(UserWarning, match=r"1 model file\(s\) are corrupt"):
        retrain_lds(None, dl, run, num_subsets=6, seed=None, vectorized=vt, num_workers=0,
                    progress=False)  # seed=None adopts the recorded seed
    assert not list(run.rglob(".*tmp-*"))
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in untouched} == untouched
    _assert_same_models(tmp_path / "ref", run, exact=False)


def _wait_for(pred, proc, timeout=120.0):
    deadline = time.time() + timeout
    while not pred():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"driver exited early ({proc.returncode}): {err[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the retraining to progress")
        time.sleep(0.05)


DRIVER = textwrap.dedent('''
    import sys
    from torch.utils.data import DataLoader
    import _dattri_rt_helpers as h
    from dattri.model_util.retrain import retrain_lds

    if __name__ == "__main__":
        retrain_lds(h.train_small, DataLoader(h.make_data(), batch_size=5), sys.argv[1],
                    num_subsets=8, seed=3, num_workers=1, models_per_task=1, progress=False)
''')


def test_kill_worker_mid_run_then_resume_matches_uninterrupted(helpers, tmp_path, monkeypatch):
    out, pids, log = tmp_path / "run", tmp_path / "pids", tmp_path / "log.txt"
    pids.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, DATTRI_TEST_PIDS=str(pids), DATTRI_TEST_LOG=str(log),
               DATTRI_TEST_DELAY="0.3",
               PYTHONPATH=os.pathsep.join([str(Path(helpers.__file__).parent),
                                           str(Path(dattri.__file__).parents[1])]))
    proc = subprocess.Popen([sys.executable, str(driver), str(out)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = lambda: len(list(out.glob("*/model_weights_0.safetensors")))  # noqa: E731
    _wait_for(lambda: done() >= 3, proc)
    for pid in map(int, os.listdir(pids)):  # the pool's worker process, mid-training
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "rerun the same call to resume" in err
    finished = {p.parent.name for p in out.glob("*/model_weights_0.safetensors")}
    assert 3 <= len(finished) < 8
    meta = json.loads((out / "metadata.json").read_text())
    finished_seeds = {str(m["seed"]) for m in meta["models"] if m["file"].split("/")[0] in finished}

    monkeypatch.setenv("DATTRI_TEST_LOG", str(log))
    before = log.read_text().split()
    dl = _loader(helpers)
    retrain_lds(helpers.train_small, dl, out, num_subsets=8, seed=3, num_workers=0, progress=False)
    retrained = log.read_text().split()[len(before):]
    assert len(retrained) == 8 - len(finished)
    assert not finished_seeds & set(retrained)  # a finished model is never trained twice
    monkeypatch.delenv("DATTRI_TEST_LOG")
    retrain_lds(helpers.train_small, dl, tmp_path / "ref", num_subsets=8, seed=3,
                num_workers=0, progress=False)
    assert json.loads((out / "metadata.json").read_text()) == json.loads(
        (tmp_path / "ref" / "metadata.json").read_text())
    _assert_same_models(out, tmp_path / "ref", exact=True)


def test_dask_local_cluster_gives_the_same_models_as_the_local_pool(helpers, tmp_path):
    distributed = pytest.importorskip("distributed")
    dl = _loader(helpers)
    retrain_loo(helpers.train_small, dl, tmp_path / "pool", indices=[1, 4, 9], seed=5,
                num_workers=1, progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  protocol="tcp", host="127.0.0.1", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1")
        with distributed.Client(cluster) as client:
            retrain_loo(helpers.train_small, dl, tmp_path / "dask", indices=[1, 4, 9], seed=5,
                        executor=client.get_executor(), progress=False)
    _assert_same_models(tmp_path / "pool", tmp_path / "dask", exact=True)


def test_ensemble_trains_seeded_checkpoints_and_lists_lds_models(helpers, tmp_path):
    dl = _loader(helpers)
    paths = train_ensemble(helpers.train_small, dl, tmp_path / "ens", num_models=3, seed=0,
                           num_workers=0, progress=False)
    assert len(paths) == 3 and all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
    states = [load_model_file(p) for p in paths]
    assert not torch.equal(states[0]["weight"], states[1]["weight"])
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    assert train_ensemble(helpers.train_small, dl, tmp_path / "ens", num_models=3, seed=0,
                          num_workers=0, progress=False) == paths
    assert [os.stat(p).st_mtime_ns for p in paths] == stamps  # resumed: nothing retrained
    meta = retrain_lds(helpers.train_small, dl, tmp_path / "lds", num_subsets=4, seed=0,
                       num_workers=0, progress=False)
    first = checkpoint_paths(tmp_path / "lds", 0, 2)
    assert first == [str((tmp_path / "lds" / m["file"]).resolve()) for m in meta["models"][:2]]
    from dattri.task import AttributionTask

    task = AttributionTask(lambda p, b: torch.tensor(0.0), nn.Linear(4, 3).double(), first)
    flat, _ = task.get_param(1)
    state = load_model_file(first[1])
    torch.testing.assert_close(flat, torch.cat([state["weight"].reshape(-1), state["bias"]]))


# ------------------------------------------------------------------ bad input
@pytest.fixture
def lds_dir(helpers, tmp_path):
    retrain_lds(helpers.train_small, _loader(helpers), tmp_path / "lds", num_subsets=4, seed=1,
                num_workers=0, progress=False)
    return tmp_path / "lds"


def _test_loader(h):
    x, y = h.make_data().tensors
    return DataLoader(TensorDataset(x[:5], y[:5]), batch_size=5)


def test_missing_corrupt_foreign_and_tampered_model_files(helpers, lds_dir):
    _, target, _ = _ce_target_factory()
    test = _test_loader(helpers)
    f0, f1 = lds_dir / "0" / "model_weights_0.safetensors", lds_dir / "1" / "model_weights_0.safetensors"
    good0, good1 = f0.read_bytes(), f1.read_bytes()
    f0.unlink()
    with pytest.raises(GroundTruthError, match=r"0/model_weights_0\.safetensors' is missing"):
        calculate_lds_ground_truth(target, lds_dir, test)
    f0.write_bytes(good0[: len(good0) // 2])
    with pytest.raises(GroundTruthError, match=r"0/model_weights_0\.safetensors' is corrupt or half-written"):
        calculate_lds_ground_truth(target, lds_dir, test)
    f0.write_bytes(good1)  # a finished model of another subset
    with pytest.raises(GroundTruthError, match=r"0/model_weights_0\.safetensors' was trained for job .* does not belong"):
        calculate_lds_ground_truth(target, lds_dir, test)
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(lds_dir / "1" / "model_weights_0.safetensors"), "pt") as f:
        header = f.metadata()
    state = load_file(str(f1))
    state["bias"] = state["bias"] + 1.0
    save_file(state, str(f0), metadata=header)
    with pytest.raises(GroundTruthError, match=r"0/model_weights_0\.safetensors' fails its checksum"):
        calculate_lds_ground_truth(target, lds_dir, test)


def test_bad_metadata_and_mismatched_folders(helpers, lds_dir, tmp_path):
    _, target, _ = _ce_target_factory()
    test = _test_loader(helpers)
    with pytest.raises(GroundTruthError, match=r"describes a 'lds' retraining, not 'loo'"):
        calculate_loo_ground_truth(target, lds_dir, test)
    with pytest.raises(GroundTruthError, match="has no metadata.json"):
        calculate_lds_ground_truth(target, tmp_path / "nowhere", test)
    with pytest.raises(GroundTruthError, match=r"differs in \['models', 'num_subsets', 'subsets'\]"):
        retrain_lds(helpers.train_small, _loader(helpers), lds_dir, num_subsets=5, seed=1,
                    num_workers=0, progress=False)
    meta_file = lds_dir / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["subsets"][2]["indices"][-1] = 24
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(GroundTruthError, match=r"subset indices outside \[0, 24\)"):
        calculate_lds_ground_truth(target, lds_dir, test)
    meta_file.write_text("{not json")
    with pytest.raises(GroundTruthError, match="metadata.json' is not valid JSON"):
        calculate_lds_ground_truth(target, lds_dir, test)


def test_bad_arguments_get_typed_errors(helpers, tmp_path):
    dl = _loader(helpers)
    with pytest.raises(DattriValueError, match=r"subset_ratio must be in \(0, 1\], got 0"):
        retrain_lds(helpers.train_small, dl, tmp_path / "b", subset_ratio=0, num_workers=0)
    with pytest.raises(DattriValueError, match="num_subsets must be an int >= 1, got 0"):
        retrain_lds(helpers.train_small, dl, tmp_path / "b", num_subsets=0, num_workers=0)
    with pytest.raises(DattriValueError, match=r"distinct loader positions in \[0, 24\)"):
        retrain_loo(helpers.train_small, dl, tmp_path / "c", indices=[3, 24], num_workers=0)
    with pytest.raises(DattriValueError, match="distinct loader positions"):
        retrain_loo(helpers.train_small, dl, tmp_path / "c", indices=[3, 3], num_workers=0)
    with pytest.raises(DattriValueError, match="save_format must be 'safetensors' or 'torch', got 'pickle'"):
        retrain_loo(helpers.train_small, dl, tmp_path / "c", save_format="pickle")
    with pytest.raises(ShuffledLoaderError, match="dataloader shuffles"):
        retrain_loo(helpers.train_small, DataLoader(helpers.make_data(), shuffle=True), tmp_path / "c")
    with pytest.raises(DattriValueError, match="train_func must be callable"):
        retrain_loo(None, dl, tmp_path / "c")
    with pytest.raises(DattriValueError, match="path is required"):
        retrain_loo(helpers.train_small, dl)
    with pytest.raises(DattriValueError, match="executor must be a concurrent.futures-style executor"):
        retrain_loo(helpers.train_small, dl, tmp_path / "d", indices=[0], executor=object())
    with pytest.raises(DattriRuntimeError, match=r"train_func failed while training 'full/model_weights\.safetensors': ValueError: boom"):
        retrain_loo(helpers.train_fails, dl, tmp_path / "e", indices=[0], num_workers=0, progress=False)


# ------------------------------------------------------------------ issues 13, 17, 18
def test_unpicklable_train_func_trains_in_this_process(helpers, tmp_path, capsys):
    import numpy as np

    dl = _loader(helpers)
    scale = 1.0  # a closure: cannot be pickled for worker processes

    def closure(loader, seed=0):
        np.random.seed(seed)  # a seed >= 2**32 would raise here
        return helpers.train_small(loader, seed=int(seed * scale))

    ref = retrain_lds(helpers.train_small, dl, tmp_path / "ref", num_subsets=3, seed=4,
                      num_workers=0, progress=False)
    meta = retrain_lds(closure, dl, tmp_path / "a", num_subsets=3, seed=4, progress=True)
    assert "LDS retraining: in this process" in capsys.readouterr().err
    assert [m["seed"] for m in meta["models"]] == [m["seed"] for m in ref["models"]]
    assert all(0 <= m["seed"] < 2**32 for m in meta["models"])
    for a, b in zip(_states(tmp_path / "ref").values(), _states(tmp_path / "a").values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.warns(RuntimeWarning, match="train_func cannot be pickled"):
        retrain_lds(lambda loader, seed=0: helpers.train_small(loader, seed), dl, tmp_path / "b",
                    num_subsets=2, seed=4, num_workers=2, progress=True)
    assert "in this process (train_func cannot be pickled" in capsys.readouterr().err
    assert len(list((tmp_path / "b").glob("*/model_weights_0.safetensors"))) == 2


def test_seeds_given_to_train_func_are_below_2_32_and_recorded(helpers, tmp_path, monkeypatch):
    log = tmp_path / "log.txt"
    monkeypatch.setenv("DATTRI_TEST_LOG", str(log))
    dl = _loader(helpers)
    meta = retrain_loo(helpers.train_small, dl, tmp_path / "loo", indices=[0, 5], seed=2**40 + 7,
                       num_workers=0, progress=False)
    lds_meta = retrain_lds(helpers.train_small, dl, tmp_path / "lds", num_subsets=3,
                           num_runs_per_subset=2, seed=2**50, num_workers=0, progress=False)
    used = [int(v) for v in log.read_text().split()]
    recorded = ([meta["full_model"]["seed"]] + [m["seed"] for m in meta["models"]]
                + [m["seed"] for m in lds_meta["models"]])
    assert used == recorded and all(0 <= v < 2**32 for v in used)
    assert len(set(m["seed"] for m in lds_meta["models"])) == 6
    assert meta["seed"] == 2**40 + 7 and meta["seed_scheme"] == lds_meta["seed_scheme"] == 2
    # a rerun is a no-op that trains nothing and keeps every file
    before = log.read_text()
    retrain_lds(helpers.train_small, dl, tmp_path / "lds", num_subsets=3, num_runs_per_subset=2,
                seed=2**50, num_workers=0, progress=False)
    assert log.read_text() == before


def test_other_training_data_or_settings_in_the_same_folder_are_refused(helpers, tmp_path):
    x, y = helpers.make_data().tensors
    dl = DataLoader(TensorDataset(x, y), batch_size=5)
    retrain_lds(helpers.train_small, dl, tmp_path / "f", num_subsets=2, seed=0, num_workers=0,
                progress=False)
    other = DataLoader(TensorDataset(x, (y + 1) % 3), batch_size=5)  # same size, other labels
    with pytest.raises(GroundTruthError, match=r"other training data .*Start a new folder: pass a new path"):
        retrain_lds(helpers.train_small, other, tmp_path / "f", num_subsets=2, seed=0,
                    num_workers=0, progress=False)
    for lr in (0.1, 0.2):  # a closure's captured setting is part of the fingerprint
        def train(loader, seed=0, lr=lr):
            return helpers.train_small(loader, seed)
        if lr == 0.1:
            retrain_lds(train, dl, tmp_path / "g", num_subsets=2, seed=0, progress=False)
        else:
            with pytest.raises(GroundTruthError, match="training-function settings"):
                retrain_lds(train, dl, tmp_path / "g", num_subsets=2, seed=0, progress=False)
    with pytest.raises(GroundTruthError, match="other training data"):
        retrain_loo(helpers.train_small, dl, tmp_path / "h", indices=[1], seed=0, progress=False)
        retrain_loo(helpers.train_small, other, tmp_path / "h", indices=[1], seed=0, progress=False)


def test_edited_metadata_and_duplicate_subset_indices_are_refused(helpers, lds_dir):
    _, target, _ = _ce_target_factory()
    test = _test_loader(helpers)
    meta_file = lds_dir / "metadata.json"
    good = meta_file.read_text()
    meta = json.loads(good)
    sub = meta["subsets"][1]["indices"]
    sub[0] = next(i for i in range(24) if i not in sub)  # another valid, distinct index
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(GroundTruthError, match=r"entry of '1/model_weights_0.safetensors' .*edited"):
        calculate_lds_ground_truth(target, lds_dir, test)
    meta = json.loads(good)
    meta["subsets"][2]["indices"][1] = meta["subsets"][2]["indices"][0]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(GroundTruthError, match="subset 2 lists training index .* more than once"):
        calculate_lds_ground_truth(target, lds_dir, test)
    meta = json.loads(good)
    meta["models"][0]["seed"] += 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(GroundTruthError, match="edited"):
        calculate_lds_ground_truth(target, lds_dir, test)
    meta_file.write_text(good)
    values, _ = calculate_lds_ground_truth(target, lds_dir, test)
    assert values.shape == (4, 5)


def _published_folder(root: Path, helpers, runs: int = 2) -> tuple[list, list]:
    """An LDS folder in the published 0.3.0 layout (written here, not by its code)."""
    import yaml

    x, y = helpers.make_data().tensors
    g = torch.Generator().manual_seed(5)
    subsets, states, dirs = [], [], {}
    for i in range(3):
        idx = torch.randperm(24, generator=g)[:12].tolist()
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "indices.txt").write_text("\n".join(map(str, idx)))
        row = []
        for j in range(runs):
            model = helpers.train_small(DataLoader(TensorDataset(x[idx], y[idx]), batch_size=5),
                                        seed=10 * i + j)
            torch.save(model.state_dict(), root / str(i) / f"model_weights_{j}.pt")
            row.append({k: v.clone() for k, v in model.state_dict().items()})
        subsets.append(idx)
        states.append(row)
        dirs[i] = str(root / str(i))
    (root / "metadata.yml").write_text(yaml.safe_dump(
        {"mode": "lds", "data_length": 24, "train_func": "train_small", "num_subsets": 3,
         "subset_ratio": 0.5, "num_runs_per_subset": runs, "subset_dir_map": dirs}))
    return subsets, states


def test_published_lds_folders_and_target_funcs_work_without_conversion(helpers, tmp_path):
    subsets, states = _published_folder(tmp_path / "old", helpers)
    test = _test_loader(helpers)
    xt, yt = test.dataset.tensors
    want = -torch.stack([torch.stack([_manual_losses(s, xt, yt) for s in row]).mean(0)
                         for row in states])
    _, target, _ = _ce_target_factory()

    def published_target(ckpt_path, dataloader):  # the 0.3.0 style
        state = torch.load(ckpt_path, weights_only=True)
        return torch.cat([_manual_losses(state, xb, yb) for xb, yb in dataloader])

    (tmp_path / "old").rename(tmp_path / "moved")  # subset_dir_map holds the old paths
    for func in (target, published_target):
        values, indices = calculate_lds_ground_truth(func, tmp_path / "moved", test)
        torch.testing.assert_close(values, want)
        assert indices.tolist() == subsets
    # a published-style target_func on a folder written by this library
    dl = _loader(helpers)
    retrain_lds(helpers.train_small, dl, tmp_path / "new", num_subsets=3, seed=2, num_workers=0,
                progress=False)

    def safetensors_target(ckpt_path, dataloader):
        from safetensors.torch import load_file

        state = load_file(str(ckpt_path))
        return torch.cat([_manual_losses(state, xb, yb) for xb, yb in dataloader])

    torch.testing.assert_close(calculate_lds_ground_truth(safetensors_target, tmp_path / "new", test),
                               calculate_lds_ground_truth(target, tmp_path / "new", test))


def test_pool_worker_exits_when_its_parent_is_gone():
    code = ("import os; from dattri.model_util._retrain_runner import _watch_parent; "
            "_watch_parent(os.getppid() + 999999, 0.01)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]


@pytest.mark.slow
def test_killing_the_driver_ends_its_workers(helpers, tmp_path):
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.replace("models_per_task=1", "models_per_task=8"))  # one task
    env = dict(os.environ, DATTRI_TEST_PIDS=str(pids), DATTRI_TEST_DELAY="2",
               PYTHONPATH=os.pathsep.join([str(Path(helpers.__file__).parent),
                                           str(Path(dattri.__file__).parents[1])]))
    proc = subprocess.Popen([sys.executable, str(driver), str(out)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: len(os.listdir(pids)) >= 1, proc)
    workers = [int(p) for p in os.listdir(pids)]
    proc.kill()
    proc.wait()

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie waiting for its (new) parent to reap it has exited too
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False

    for _ in range(3000):  # the worker polls its parent every second
        if not any(alive(p) for p in workers):
            break
        time.sleep(0.1)
    assert not any(alive(p) for p in workers)
    # an orphan would have trained the rest of its 8-model task (2 s each)
    assert len(list(out.glob("*/model_weights_0.safetensors"))) <= 1


def test_folders_of_earlier_versions_resume_with_their_recorded_seeds(helpers, tmp_path, monkeypatch):
    import dattri.model_util.retrain as rt

    dl, path = _loader(helpers), tmp_path / "old"
    with monkeypatch.context() as m:  # write the folder as earlier versions did
        m.setattr(rt, "_scheme", lambda old, fp, root: (True, None))
        old_meta = retrain_lds(helpers.train_small, dl, path, num_subsets=3, seed=8,
                               num_workers=0, progress=False)
    assert "seed_scheme" not in old_meta and "fingerprint" not in old_meta
    assert [m["seed"] for m in old_meta["models"]] == [rt.derive_seed(8, s, 0) for s in range(3)]
    before = _states(path)
    (path / "1" / "model_weights_0.safetensors").unlink()
    with pytest.warns(UserWarning, match="earlier dattri version: it resumes with its recorded"):
        meta = retrain_lds(helpers.train_small, dl, path, num_subsets=3, seed=8, num_workers=0,
                           progress=False)
    assert meta == old_meta
    after = _states(path)
    assert all(torch.equal(before[f][k], after[f][k]) for f in before for k in before[f])
    _, target, _ = _ce_target_factory()
    values, _ = calculate_lds_ground_truth(target, path, _test_loader(helpers))
    assert values.shape == (3, 5)
