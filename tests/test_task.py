"""AttributionTask: checkpoint forms, layer restriction, target vs loss, errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from dattri.errors import CheckpointError, InvalidLossError, LayerNameError
from dattri.func.utils import flatten_params
from dattri.task import AttributionTask

from cases import MLP, per_example_grads


def _setup(seed=0):
    torch.manual_seed(seed)
    model = MLP(5, 4, 3).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def loss(params, data):
        xb, yb = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb)

    return model, loss, x, y


def test_checkpoint_forms_agree(tmp_path):
    model, loss, x, y = _setup()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "m.pt")
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "m.safetensors"))
    ref = flatten_params(dict(model.named_parameters())).detach()
    for ckpt in (sd, str(tmp_path / "m.pt"), tmp_path / "m.safetensors", [sd]):
        task = AttributionTask(loss, model, ckpt)
        assert len(task.get_checkpoints()) == 1
        torch.testing.assert_close(task.get_param()[0], ref)


def test_list_of_checkpoints_loads_each(tmp_path):
    model, loss, x, y = _setup()
    sd1 = {k: v.clone() for k, v in model.state_dict().items()}
    sd2 = {k: v * 2 for k, v in sd1.items()}
    task = AttributionTask(loss, model, [sd1, sd2])
    torch.testing.assert_close(task.get_param(1)[0], 2 * task.get_param(0)[0])


def test_custom_load_func_is_used():
    model, loss, x, y = _setup()
    calls = []

    def load(m, ckpt):
        calls.append(ckpt)
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(ckpt)
        return m

    task = AttributionTask(loss, model, "ckpt-a", checkpoints_load_func=lambda m, c: load(m, 0.5))
    theta, _ = task.get_param()
    assert torch.all(theta == 0.5) and calls == [0.5]


def test_target_defaults_to_loss_and_can_differ():
    model, loss, x, y = _setup()
    task = AttributionTask(loss, model, model.state_dict())
    assert task.user_target_func is loss  # as given; original_* are the batched views
    assert task.original_target_func is task.original_loss_func

    def target(params, data):
        return torch.func.functional_call(model, params, (data[0],))[:, 0].mean()

    task2 = AttributionTask(loss, model, model.state_dict(), target_func=target)
    theta, _ = task2.get_param()
    g_loss = task2.get_grad_loss_func()(theta, (x, y))
    g_t = task2.get_grad_target_func()(theta, (x, y))
    torch.testing.assert_close(g_loss, per_example_grads(model, loss, x, y))
    torch.testing.assert_close(g_t, per_example_grads(model, target, x, y))
    assert not torch.allclose(g_loss, g_t)


@pytest.mark.parametrize("names", [["fc2.weight"], "fc2.weight", ["fc2.bias", "fc1.weight"]])
def test_layer_name_gradient_is_slice_of_full(names):
    model, loss, x, y = _setup()
    task = AttributionTask(loss, model, model.state_dict())
    full = per_example_grads(model, loss, x, y)
    order = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()
    wanted = [names] if isinstance(names, str) else names
    cols = torch.cat([torch.arange(starts[i], starts[i + 1]) for i, k in enumerate(order) if k in wanted])
    theta, _ = task.get_param(layer_name=names)
    assert theta.numel() == cols.numel()
    g = task.get_grad_loss_func(layer_name=names)(theta, (x, y))
    torch.testing.assert_close(g, full[:, cols])


def test_layer_restriction_skips_other_gradients():
    """Only the selected leaves receive gradients (others are constants)."""
    model, loss, x, y = _setup()
    task = AttributionTask(loss, model, model.state_dict())
    f = task.get_loss_func(layer_name="fc2.bias")
    theta, _ = task.get_param(layer_name="fc2.bias")
    theta = theta.clone().requires_grad_(True)
    out = f(theta, (x, y))
    assert out.grad_fn is not None
    grads = torch.autograd.grad(out, theta)
    assert grads[0].shape == (3,)
    assert all(not p.requires_grad for p in task.named_parameters.values())


def test_layer_split_map():
    model, loss, _, _ = _setup()
    task = AttributionTask(loss, model, model.state_dict())
    parts, layer_map = task.get_param(layer_split=True)
    assert [p.numel() for p in parts] == [20, 4, 12, 3]
    assert layer_map == [0, 0, 1, 1]


def test_non_scalar_loss_error():
    model, _, x, y = _setup()

    def per_example(params, data):
        return nn.functional.cross_entropy(
            torch.func.functional_call(model, params, (data[0],)), data[1], reduction="none")

    task = AttributionTask(per_example, model, model.state_dict())
    with pytest.raises(InvalidLossError, match=r"returned shape \(6,\).*scalar"):
        task.validate_batch((x, y))


def test_loss_failing_on_batch_of_one_error():
    model, _, x, y = _setup()

    def needs_two(params, data):
        assert data[0].shape[0] > 1
        return data[0].sum()

    task = AttributionTask(needs_two, model, model.state_dict())
    with pytest.raises(InvalidLossError, match="batch of one"):
        task.validate_batch((x, y))


def test_unknown_layer_name_error():
    model, loss, _, _ = _setup()
    task = AttributionTask(loss, model, model.state_dict())
    with pytest.raises(LayerNameError, match=r"fc3.weight.*fc1.weight"):
        task.get_param(layer_name=["fc3.weight"])


def test_checkpoint_key_mismatch_error(tmp_path):
    model, loss, _, _ = _setup()
    sd = {("backbone." + k): v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing keys \['fc1.bias'"):
        AttributionTask(loss, model, sd).get_param()
    with pytest.raises(CheckpointError, match="no file"):
        AttributionTask(loss, model, str(tmp_path / "nope.pt")).get_param()
    with pytest.raises(CheckpointError, match="empty"):
        AttributionTask(loss, model, [])
    with pytest.raises(CheckpointError, match=r"checkpoints\[1\] is a int"):
        AttributionTask(loss, model, [model.state_dict(), 3])


def test_checkpoint_aliasing_the_model_is_copied():
    # [model.state_dict(), other]: loading `other` must not overwrite checkpoint 0
    model = torch.nn.Linear(3, 2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: v + 1.0 for k, v in original.items()}
    task = AttributionTask(lambda p, d: torch.zeros(()), model, [model.state_dict(), other])
    task._load_checkpoints(1)
    task._load_checkpoints(0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k])


def test_forced_reload_reads_a_checkpoint_file_once_until_it_changes(tmp_path, monkeypatch):
    import os

    import dattri.task as task_mod

    model, loss, x, y = _setup()
    sd1 = {k: v.clone() for k, v in model.state_dict().items()}
    p1, p2 = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(sd1, p1)
    torch.save({k: 2 * v for k, v in sd1.items()}, p2)
    reads = []
    real = task_mod.load_state_dict_file
    monkeypatch.setattr(task_mod, "load_state_dict_file", lambda p: reads.append(p) or real(p))
    task = AttributionTask(loss, model, [str(p1), str(p2)])
    ref = task.get_param(0)[0].clone()
    with torch.no_grad():  # another task sharing the model changes its weights
        for prm in model.parameters():
            prm.zero_()
    task.load_checkpoint(0, force=True)  # reloads the weights, from memory
    torch.testing.assert_close(task.get_param(0)[0], ref)
    assert len(reads) == 1
    torch.testing.assert_close(task.get_param(1)[0], 2 * ref)  # another file: read
    assert len(reads) == 2
    # a rewritten file is read again (size and mtime change)
    torch.save({k: 3 * v for k, v in sd1.items()}, p2)
    os.utime(p2, ns=(1, 1))
    task.load_checkpoint(1, force=True)
    torch.testing.assert_close(task.get_param(1)[0], 3 * ref)
    assert len(reads) == 3
    # files over the cap are not kept
    monkeypatch.setattr(task_mod, "STATE_CACHE_BYTES", 0)
    task.load_checkpoint(0, force=True)
    task.load_checkpoint(0, force=True)
    assert len(reads) == 5


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("edit", ["extra", "missing", "shape", "not_tensor"])
def test_rejected_checkpoint_leaves_the_model_unchanged(edit):
    model, loss, _, _ = _setup()
    before = _snapshot(model)
    sd = {k: v + 1.0 for k, v in before.items()}  # loading any key would show
    if edit == "extra":
        sd["head.weight"] = torch.zeros(2)
        match = r"unexpected keys \['head.weight'\]"
    elif edit == "missing":
        del sd["fc2.bias"]
        match = r"missing keys \['fc2.bias'\]"
    elif edit == "shape":
        sd["fc2.weight"] = torch.zeros(7, 2, dtype=torch.float64)
        shape = tuple(before["fc2.weight"].shape)
        match = (r"\['fc2.weight'\] has shape \(7, 2\) but the model's 'fc2.weight' has "
                 + re.escape(f"shape {shape}"))
    else:
        sd["fc1.bias"] = [0.0] * 4
        match = r"\['fc1.bias'\] is a list"
    with pytest.raises(CheckpointError, match=match):
        AttributionTask(loss, model, sd).get_param()
    _assert_unchanged(model, before)
    # an ensemble whose second checkpoint is bad: the error names it
    with pytest.raises(CheckpointError, match=r"checkpoints\[1\]"):
        AttributionTask(loss, model, [before, sd])._load_checkpoints(1)


@pytest.mark.parametrize("damage", ["truncated_pt", "garbage_pt", "pickled_model",
                                    "truncated_safetensors", "garbage_safetensors"])
def test_unreadable_checkpoint_files_give_one_typed_error(tmp_path, damage):
    from safetensors.torch import save_file

    model, loss, _, _ = _setup()
    before = _snapshot(model)
    if damage.endswith("safetensors"):
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in before.items()}, str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save(model if damage == "pickled_model" else before, path)
    blob = path.read_bytes()
    if damage.startswith("truncated"):
        path.write_bytes(blob[: len(blob) // 2])
    elif damage.startswith("garbage"):
        path.write_bytes(b"\x00not a checkpoint" * 20)
    want = "objects other than tensors" if damage == "pickled_model" else "corrupt or truncated"
    with pytest.raises(CheckpointError, match=rf"{path.name}.*{want}") as info:
        AttributionTask(loss, model, str(path)).get_param()
    assert "weights_only" not in str(info.value)
    _assert_unchanged(model, before)
