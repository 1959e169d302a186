"""The MNIST MLP functions at their published module path."""

from dattri.benchmark.datasets.mnist.training import loss_mnist_mlp, train_mnist_mlp

__all__ = ["loss_mnist_mlp", "train_mnist_mlp"]
