"""ResNet-9 (CIFAR settings), at its published module path."""

from dattri.benchmark.datasets.cifar.resnet9 import BasicBlock, ResNet9, create_resnet9_model

__all__ = ["BasicBlock", "ResNet9", "create_resnet9_model"]
