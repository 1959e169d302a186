"""MNIST MLP, at its published path."""

from dattri.benchmark.datasets.mnist.models import MLPMnist, create_mlp_model

__all__ = ["MLPMnist", "create_mlp_model"]
