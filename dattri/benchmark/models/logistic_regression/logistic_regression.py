"""MNIST logistic regression, at its published module path."""

from dattri.benchmark.datasets.mnist.models import LogisticRegressionMnist, create_lr_model

AVAILABLE_DATASETS = ["mnist"]

__all__ = ["AVAILABLE_DATASETS", "LogisticRegressionMnist", "create_lr_model"]
