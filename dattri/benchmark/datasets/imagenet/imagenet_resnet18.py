"""ResNet-18 (He et al. 2016) for ImageNet, its training and the published loss helper.

The module names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``fc``), so a torchvision ``resnet18`` state dict loads into it unchanged.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

__all__ = ["ResNet18", "create_resnet18_model", "loss_imagenet_resnet18", "train_imagenet_resnet18"]


class _Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18: a 7x7 stem, four stages of two basic blocks (64-512 channels), a
    linear classifier (11.7M parameters for 1,000 classes)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, c = [64, 128, 256, 512], 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(_Basic(c, w, stride), _Basic(w, w, 1)))
            c = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def create_resnet18_model(num_classes: int = 1000) -> ResNet18:
    """A newly initialised ResNet-18 (no pretrained weights: nothing is downloaded)."""
    return ResNet18(num_classes)


def train_imagenet_resnet18(dataloader: Iterable, seed: int = 0, device: str = "cpu",
                            num_epochs: int = 15, num_classes: int = 1000) -> ResNet18:
    """Train a ResNet-18 by SGD (lr 0.1, momentum 0.8, weight decay 4e-5, the
    published recipe) for ``num_epochs`` epochs; seeds torch, numpy and random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the published recipe seeds numpy
    random.seed(seed)
    model = create_resnet18_model(num_classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.8, weight_decay=4e-5)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(num_epochs):
        for x, y in dataloader:
            opt.zero_grad()
            loss_fn(model(x.to(device)), y.to(device)).backward()
            opt.step()
    return model.eval()


def loss_imagenet_resnet18(model_path: str | os.PathLike, dataloader: Iterable,
                           device: str = "cpu", num_classes: int = 1000) -> float:
    """Summed cross-entropy of the ResNet-18 saved at ``model_path`` on ``dataloader``."""
    from dattri.task import load_state_dict_file

    model = create_resnet18_model(num_classes)
    model.load_state_dict(load_state_dict_file(model_path))
    model.to(device).eval()
    total = 0.0
    with torch.no_grad():
        for x, y in dataloader:
            total += float(nn.functional.cross_entropy(model(x.to(device)), y.to(device),
                                                       reduction="sum"))
    return total
