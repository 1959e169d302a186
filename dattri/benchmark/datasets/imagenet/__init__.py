"""The ImageNet + ResNet-18 setting (published ``dattri.benchmark.datasets.imagenet``).

No package ships ImageNet, so there is no offline stand-in: the data loads from
``path=`` in the original class-folder layout. Licence: ImageNet's terms of access
(non-commercial research), see image-net.org.
"""

from dattri.benchmark.datasets.imagenet.data import ImageFolderDataset, create_imagenet_dataset
from dattri.benchmark.datasets.imagenet.imagenet_resnet18 import (
    ResNet18,
    create_resnet18_model,
    loss_imagenet_resnet18,
    train_imagenet_resnet18,
)

__all__ = [
    "ImageFolderDataset",
    "ResNet18",
    "create_imagenet_dataset",
    "create_resnet18_model",
    "loss_imagenet_resnet18",
    "train_imagenet_resnet18",
]
