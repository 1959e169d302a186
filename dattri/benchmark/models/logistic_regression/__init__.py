"""MNIST logistic regression, at its published path."""

from dattri.benchmark.datasets.mnist.models import LogisticRegressionMnist, create_lr_model

__all__ = ["LogisticRegressionMnist", "create_lr_model"]
