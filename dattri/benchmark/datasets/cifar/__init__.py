"""CIFAR-2 / CIFAR-10 benchmark settings with ResNet-9 (paper, Table 3).

Data: CIFAR-10, CC BY 4.0, read from ``path=`` (the original
``cifar-10-batches-py``). Without it, a loudly announced offline stand-in is used:
Fashion-MNIST (MIT licence) padded to 3x32x32; CIFAR-2 = T-shirt vs shirt.
"""

from dattri.benchmark.datasets._io import ImageDataset
from dattri.benchmark.datasets.cifar.data import (
    StandInDataWarning,
    create_cifar2_dataset,
    create_cifar10_dataset,
    create_cifar_dataset,
)
from dattri.benchmark.datasets.cifar.resnet9 import (
    ResNet9,
    ResNet9Page,
    create_resnet9_model,
)
from dattri.benchmark.datasets.cifar.training import (
    loss_cifar_resnet9,
    train_cifar2_resnet9,
    train_cifar10_resnet9,
    train_cifar_resnet9,
)

__all__ = [
    "ImageDataset",
    "ResNet9",
    "ResNet9Page",
    "StandInDataWarning",
    "create_cifar10_dataset",
    "create_cifar2_dataset",
    "create_cifar_dataset",
    "create_resnet9_model",
    "loss_cifar_resnet9",
    "train_cifar10_resnet9",
    "train_cifar2_resnet9",
    "train_cifar_resnet9",
]
