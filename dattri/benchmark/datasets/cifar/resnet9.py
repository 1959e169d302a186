"""ResNet-9 for the CIFAR-2 / CIFAR-10 settings (paper, Table 3 and App. C).

Two variants, each with dropout (rate 0.1 in the paper) after every convolution
block, as App. C says:

* ``"dattri"`` (default): the network of the published dattri benchmark, whose
  size the paper reports (4.83M parameters for CIFAR-2). A 3x3 stem convolution
  (3 -> 64) and three residual basic blocks (He et al. 2016) to 128, 256 and 512
  channels, the last two with stride 2; each block is two 3x3 conv-BN-ReLU layers
  plus a 1x1 conv-BN projection shortcut; global average pooling and a linear
  layer. Parameter names match the published model, so its checkpoints load.
  Count: 4,824,128 + 513 * num_classes (4,825,154 for 2 classes).
* ``"page"``: D. Page's DAWNBench ResNet-9 ("How to train your ResNet", 2018):
  prep conv 64, then [conv 128, max-pool, residual of two conv 128],
  [conv 256, max-pool], [conv 512, max-pool, residual of two conv 512], global
  max-pool, linear, output scaled by 0.125. Count: 6,568,000 + 513 * num_classes.

Normalisation is BatchNorm, as in both references. Attribution evaluates the
model on batches of one under ``torch.func.vmap``; a BatchNorm layer in training
mode would normalise a batch of one by its own statistics (and update running
statistics inside vmap, which fails), so attribution must use the model in
**eval mode**, where BatchNorm is a fixed per-channel affine map. The training
functions return the model in eval mode.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from dattri.errors import DattriValueError

__all__ = ["ResNet9", "ResNet9Page", "create_resnet9_model"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU layers (dropout after each) plus a projection shortcut.

    ``out = relu(drop(relu(bn2(conv2(drop(relu(bn1(conv1(x)))))))) + shortcut(x))``
    with ``shortcut = drop(bn(conv1x1(x)))`` when the shape changes, else ``x``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, dropout_rate: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout2 = nn.Dropout(dropout_rate)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
                nn.Dropout(dropout_rate),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c_in, H, W) -> (B, c_out, H / stride, W / stride)``."""
        h = self.dropout1(F.relu(self.bn1(self.conv1(x))))
        h = self.dropout2(F.relu(self.bn2(self.conv2(h))))
        return F.relu(h + self.shortcut(x))


class ResNet9(nn.Module):
    """The published dattri ResNet-9 (module docstring, variant ``"dattri"``).

    Args:
        num_classes: output logits.
        dropout_rate: dropout after every convolution block.
    """

    def __init__(self, num_classes: int = 2, dropout_rate: float = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.layer1 = nn.Sequential(BasicBlock(64, 128, 1, dropout_rate))
        self.layer2 = nn.Sequential(BasicBlock(128, 256, 2, dropout_rate))
        self.layer3 = nn.Sequential(BasicBlock(256, 512, 2, dropout_rate))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 3, 32, 32)``."""
        h = self.dropout1(F.relu(self.bn1(self.conv1(x))))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.linear(h.mean(dim=(2, 3)))


def _conv_bn(
    c_in: int, c_out: int, dropout_rate: float, pool: bool = False,
) -> nn.Sequential:
    layers = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Dropout(dropout_rate),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int, dropout_rate: float) -> None:
        super().__init__()
        self.res1 = _conv_bn(channels, channels, dropout_rate)
        self.res2 = _conv_bn(channels, channels, dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


class ResNet9Page(nn.Module):
    """Page's DAWNBench ResNet-9 (module docstring, variant ``"page"``).

    Args:
        num_classes: output logits.
        dropout_rate: dropout after every conv-BN-ReLU.
    """

    def __init__(self, num_classes: int = 2, dropout_rate: float = 0.1) -> None:
        super().__init__()
        self.prep = _conv_bn(3, 64, dropout_rate)
        self.layer1 = nn.Sequential(
            _conv_bn(64, 128, dropout_rate, pool=True), _Residual(128, dropout_rate),
        )
        self.layer2 = _conv_bn(128, 256, dropout_rate, pool=True)
        self.layer3 = nn.Sequential(
            _conv_bn(256, 512, dropout_rate, pool=True), _Residual(512, dropout_rate),
        )
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 3, 32, 32)``."""
        h = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.linear(h.amax(dim=(2, 3))) * 0.125


def create_resnet9_model(
    num_classes: int = 2,
    dropout_rate: float = 0.1,
    variant: Literal["dattri", "page"] = "dattri",
) -> nn.Module:
    """Create a ResNet-9 (see the module docstring for both variants).

    Args:
        num_classes: 2 for CIFAR-2, 10 for CIFAR-10.
        dropout_rate: dropout after every convolution block (0.1 in App. C).
        variant: ``"dattri"`` (4.83M parameters, the paper's) or ``"page"``.

    Returns:
        The model, in training mode, with float32 parameters.

    Raises:
        DattriValueError: bad ``num_classes``, ``dropout_rate`` or ``variant``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        msg = f"num_classes: expected an integer >= 1, got {num_classes!r}."
        raise DattriValueError(msg)
    if not 0.0 <= float(dropout_rate) < 1.0:
        msg = f"dropout_rate: expected a probability in [0, 1), got {dropout_rate!r}."
        raise DattriValueError(msg)
    if variant == "dattri":
        return ResNet9(num_classes, dropout_rate)
    if variant == "page":
        return ResNet9Page(num_classes, dropout_rate)
    msg = f"variant: expected 'dattri' or 'page', got {variant!r}."
    raise DattriValueError(msg)
