"""The CIFAR ResNet-9 model and functions at their published module path."""

from dattri.benchmark.datasets.cifar.resnet9 import create_resnet9_model
from dattri.benchmark.datasets.cifar.training import loss_cifar_resnet9, train_cifar_resnet9

__all__ = ["create_resnet9_model", "loss_cifar_resnet9", "train_cifar_resnet9"]
