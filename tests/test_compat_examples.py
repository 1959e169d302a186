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
