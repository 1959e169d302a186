"""No silent wrong answer: every bad input gets a typed error or the correct rows
(issue 13). Each test asserts the error type and what it names, or the rows."""

from __future__ import annotations

import pytest
import torch
from cases import correct_probability, loaders, trained_lr
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import (
    DVEmbAttributor,
    IFAttributorArnoldi,
    IFAttributorCG,
    KNNShapleyAttributor,
    RPSAttributor,
    TracInAttributor,
    TRAKAttributor,
)
from dattri.errors import LoaderError, LoaderMismatchError, OnePassLoaderError
from dattri.task import AttributionTask


@pytest.fixture(scope="module")
def lr_setup():
    return trained_lr(64, 8)


def _task(setup):
    model, loss, _, _ = setup
    return AttributionTask(loss_func=loss, model=model,
                           checkpoints={k: v.clone() for k, v in model.state_dict().items()})


def _rps_task(setup):
    model, _, _, _ = setup

    def loss(pre, y):
        return torch.nn.functional.cross_entropy(pre, y)

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


# -------------------------------------------------------- cached train loader
def _cached_row_attributors(setup):
    model = setup[0]
    return {
        "trak": lambda: TRAKAttributor(_task(setup), correct_probability(model),
                                       proj_params={"proj_type": "identity"}, regularization=1e-3),
        "knn": lambda: KNNShapleyAttributor(k_neighbors=3),
        "rps": lambda: RPSAttributor(_rps_task(setup), "", epoch=20),
        "dvemb": lambda: DVEmbAttributor(
            AttributionTask(loss_func=setup[1], model=model,
                            checkpoints=[model.state_dict()] * 3),
            steps=[(list(range(32)), 0.1), (list(range(32, 64)), 0.1)]),
    }


def test_knn_scores_or_refuses_a_different_train_loader(lr_setup):
    (xtr, ytr), (xte, yte) = lr_setup[2], lr_setup[3]
    train, test = loaders((xtr, ytr), (xte, yte))
    att = KNNShapleyAttributor(k_neighbors=3).cache(train)
    for other in (DataLoader(TensorDataset(xtr[:40], ytr[:40]), batch_size=32),
                  DataLoader(TensorDataset(xtr.flip(0), ytr.flip(0)), batch_size=32)):
        try:
            got = att.attribute(other, test)
        except LoaderMismatchError:
            continue
        torch.testing.assert_close(got, KNNShapleyAttributor(k_neighbors=3).attribute(other, test))


@pytest.mark.parametrize("which", ["trak", "rps", "dvemb"])
def test_cached_rows_refuse_a_different_train_loader(lr_setup, which):
    make = _cached_row_attributors(lr_setup)[which]
    (xtr, ytr), (xte, yte) = lr_setup[2], lr_setup[3]
    train, test = loaders((xtr, ytr), (xte, yte))
    att = make().cache(train)
    assert att.attribute(train, test).shape == (64, 8)
    smaller = DataLoader(TensorDataset(xtr[:40], ytr[:40]), batch_size=32)
    with pytest.raises(LoaderMismatchError, match=r"40 examples, the cached one 64"):
        att.attribute(smaller, test)
    same_size = DataLoader(TensorDataset(xtr.flip(0), ytr.flip(0)), batch_size=32)
    with pytest.raises(LoaderMismatchError, match="different examples"):
        att.attribute(same_size, test)
    # the same data in a new loader object (another batch size) is accepted
    again = DataLoader(TensorDataset(xtr, ytr), batch_size=16)
    torch.testing.assert_close(att.attribute(again, test), att.attribute(train, test))


def test_arnoldi_scores_the_train_loader_it_is_given(lr_setup):
    (xtr, ytr), (xte, yte) = lr_setup[2], lr_setup[3]
    train, test = loaders((xtr, ytr), (xte, yte))
    att = IFAttributorArnoldi(_task(lr_setup), proj_dim=20, max_iter=40,
                              regularization=1e-3).cache(train)
    full = att.attribute(train, test)
    part = att.attribute(DataLoader(TensorDataset(xtr[:40], ytr[:40]), batch_size=32), test)
    assert part.shape == (40, 8)
    torch.testing.assert_close(part, full[:40])
    flipped = att.attribute(DataLoader(TensorDataset(xtr.flip(0), ytr.flip(0)), batch_size=32), test)
    torch.testing.assert_close(flipped, full.flip(0))


# -------------------------------------------------------- one-pass iterables
def _gen(x, y, bs=16):
    return ((x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs))


@pytest.mark.parametrize("method", ["cache", "attribute_train", "attribute_test", "self"])
def test_one_pass_iterables_are_refused(lr_setup, method):
    (xtr, ytr), (xte, yte) = lr_setup[2], lr_setup[3]
    train, test = loaders((xtr, ytr), (xte, yte))
    att = TracInAttributor(_task(lr_setup), weight_list=[1.0], normalized_grad=False)
    cg = IFAttributorCG(_task(lr_setup), regularization=1e-2)
    name = "test_loader" if method == "attribute_test" else "train_loader"
    with pytest.raises(OnePassLoaderError, match=rf"{name} is a one-pass \w+.*list\("):
        if method == "cache":
            cg.cache(_gen(xtr, ytr))
        elif method == "attribute_train":
            att.attribute(_gen(xtr, ytr), test)
        elif method == "attribute_test":
            att.attribute(train, _gen(xte, yte))
        else:
            cg.cache(train).self_attribute(iter(list(train)))
    # the list of the same batches gives every row
    assert att.attribute(list(_gen(xtr, ytr)), test).shape == (64, 8)


@pytest.mark.parametrize("empty", ["train", "test"])
def test_empty_loaders_are_named(lr_setup, empty):
    (xtr, ytr), (xte, yte) = lr_setup[2], lr_setup[3]
    train, test = loaders((xtr, ytr), (xte, yte))
    nothing = DataLoader(TensorDataset(xtr[:0], ytr[:0]), batch_size=4)
    att = TracInAttributor(_task(lr_setup), weight_list=[1.0], normalized_grad=True)
    name = f"{empty}_loader"
    with pytest.raises(LoaderError, match=rf"{name} is empty"):
        if empty == "train":
            att.attribute(nothing, test)
        else:
            att.attribute(train, [])


# -------------------------------------------------------- weight_list
@pytest.mark.parametrize("weights", [[float("nan")], [float("inf")], ["0.1"], [None]])
def test_bad_weight_list_is_refused(lr_setup, weights):
    from dattri.errors import DattriValueError

    with pytest.raises(DattriValueError, match="weight_list="):
        TracInAttributor(_task(lr_setup), weight_list=weights, normalized_grad=False)


@pytest.mark.parametrize("fast_path", [True, False])
def test_grad_cos_is_unit_at_any_gradient_scale(lr_setup, fast_path):
    # gradients ~1e-14 (loss x 1e-13): still cosines; a zero gradient stays 0
    model, loss, (xtr, ytr), _ = lr_setup
    ref_task = _task(lr_setup)
    tiny = AttributionTask(lambda p, d: 1e-13 * loss(p, d), model, ref_task.get_checkpoints()[0])
    train = DataLoader(TensorDataset(xtr[:20], ytr[:20]), batch_size=8)
    ref = TracInAttributor(ref_task, [1.0], True, fast_path=fast_path).attribute(train, train)
    got = TracInAttributor(tiny, [1.0], True, fast_path=fast_path).attribute(train, train)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(got), torch.ones(20, dtype=got.dtype))


# -------------------------------------------------------- batches that do not fit
@pytest.mark.parametrize("bad", ["features", "labels"])
@pytest.mark.parametrize("make", ["cg", "grad_dot", "arnoldi"])
def test_a_later_test_loader_that_does_not_fit_names_loader_and_batch(lr_setup, bad, make):
    from dattri.errors import InvalidBatchError

    (xtr, ytr), (xte, yte) = lr_setup[2], lr_setup[3]
    train, test = loaders((xtr, ytr), (xte, yte), bs_test=3)
    task = _task(lr_setup)
    att = {"cg": lambda: IFAttributorCG(task, regularization=1e-2),
           "grad_dot": lambda: TracInAttributor(task, weight_list=[1.0], normalized_grad=False),
           "arnoldi": lambda: IFAttributorArnoldi(task, proj_dim=5, max_iter=10)}[make]()
    att.cache(train)
    att.attribute(train, test)  # a good first call validates the functions
    if bad == "features":  # batch 1: 12 features instead of 10
        later = [(xte[:3], yte[:3]), (torch.cat([xte[3:6], xte[3:6, :2]], 1), yte[3:6])]
    else:
        later = [(xte[:3], yte[:3]), (xte[3:6], torch.tensor([0, 7, 1]))]  # 3 classes
    with pytest.raises(InvalidBatchError, match=r"test_loader batch 1 does not fit the model"):
        att.attribute(train, later)


def test_the_first_batch_that_does_not_fit_is_not_blamed_on_target_func(lr_setup):
    from dattri.errors import InvalidBatchError

    (xtr, ytr), (xte, yte) = lr_setup[2], lr_setup[3]
    train, _ = loaders((xtr, ytr), (xte, yte))
    att = IFAttributorCG(_task(lr_setup), regularization=1e-2).cache(train)
    wide = [(torch.cat([xte, xte[:, :3]], 1), yte)]
    with pytest.raises(InvalidBatchError, match="test loader does not fit the model"):
        att.attribute(train, wide)


def test_an_unavailable_device_is_a_typed_error(lr_setup):
    from dattri.errors import DeviceError

    if torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU
    else:
        device = "cuda"
    with pytest.raises(DeviceError, match=rf"device='{device}'.*pass device='cpu'"):
        IFAttributorCG(_task(lr_setup), device=device)


# -------------------------------------------------------- CLI --cache-dir
@pytest.mark.parametrize("problem", ["file", "under_file", "read_only"])
def test_cli_refuses_an_unusable_cache_dir_in_one_line_before_any_work(tmp_path, monkeypatch,
                                                                       capsys, problem):
    import errno
    import tempfile

    from dattri.benchmark import cli

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(cli, "_cmd_bench", no_work)
    monkeypatch.setattr(cli, "_cmd_retrain", no_work)
    target = tmp_path / "f"
    target.write_text("x")
    folder, why = {"file": (target, "is a file, not a folder"),
                   "under_file": (target / "sub", "lies under a file"),
                   "read_only": (tmp_path / "ro", "is not writable")}[problem]
    if problem == "read_only":  # root may write anywhere: refuse the probe file instead
        def refuse(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    for command in (["bench"], ["retrain", "--setting", "mnist_lr"]):
        assert cli.main([*command, "--cache-dir", str(folder)]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(folder) in err and why in err, err
        assert "Traceback" not in err


def test_tracin_by_the_projection_adjoint_names_the_loader_and_batch(lr_setup, monkeypatch):
    """TracIn with a dense random projection and few tests scores by the adjoint
    (``G_train (M M^T G_test^T)``); its loops over the loaders are the engine's: a
    batch that does not fit is an InvalidBatchError naming the loader and batch, a
    one-pass iterator is refused."""
    from dattri.errors import InvalidBatchError

    (xtr, ytr), (xte, yte) = lr_setup[2], lr_setup[3]
    train, _ = loaders((xtr, ytr), (xte, yte))
    att = TracInAttributor(_task(lr_setup), weight_list=[1.0], normalized_grad=False,
                           projector_kwargs={"proj_dim": 256, "proj_type": "normal"})
    used = []
    adjoint = att._scores_by_adjoint
    monkeypatch.setattr(att, "_scores_by_adjoint", lambda *a: (used.append(1), adjoint(*a))[1])
    att.cache(train)
    good = [(xte[:3], yte[:3]), (xte[3:6], yte[3:6])]
    assert att.attribute(train, good).shape == (len(xtr), 6) and used
    wide = [(xte[:3], yte[:3]), (torch.cat([xte[3:6], xte[3:6, :2]], 1), yte[3:6])]
    with pytest.raises(InvalidBatchError, match=r"test_loader batch 1 does not fit the model"):
        att.attribute(train, wide)
    with pytest.raises(OnePassLoaderError, match="test_loader"):
        att.attribute(train, iter(good))
