"""MNIST MLP, at its published module path."""

from dattri.benchmark.datasets.mnist.models import MLPMnist, create_mlp_model

AVAILABLE_DATASETS = ["mnist"]

__all__ = ["AVAILABLE_DATASETS", "MLPMnist", "create_mlp_model"]
