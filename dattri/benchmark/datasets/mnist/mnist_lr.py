"""The MNIST logistic-regression functions at their published module path."""

from dattri.benchmark.datasets.mnist.training import loss_mnist_lr, train_mnist_lr

__all__ = ["loss_mnist_lr", "train_mnist_lr"]
