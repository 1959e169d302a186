"""Models of the MNIST-10 settings: logistic regression and a 3-layer MLP.

Parameter names (``linear.*``; ``fc1.*``, ``fc2.*``, ``fc3.*``) are those of the
published dattri models, so their checkpoints load and ``layer_name`` lists carry
over.
"""

from __future__ import annotations

import torch
from torch import nn

from dattri.errors import DattriValueError

__all__ = ["LogisticRegressionMnist", "MLPMnist", "create_lr_model", "create_mlp_model"]


class LogisticRegressionMnist(nn.Module):
    """Multinomial logistic regression: ``logits = W vec(x) + b``.

    ``W`` is ``(10, 784)`` and ``b`` ``(10,)``: 7,840 weights + 10 biases = 7,850
    parameters. The paper (App. C) describes "a linear layer and a sigmoid"; the
    published dattri model, like this one, outputs the logits and the loss
    applies the softmax inside the cross-entropy, which is logistic regression
    for 10 classes. A separate sigmoid would squash the logits before the
    softmax and change the model, so there is none.

    Input ``(B, 1, 28, 28)`` (any shape with 784 values per example); output
    ``(B, 10)`` logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 10)`` of images ``(B, 1, 28, 28)``."""
        return self.linear(x.reshape(x.shape[0], -1))


class MLPMnist(nn.Module):
    """784-128-64-10 ReLU MLP with dropout after the two hidden layers.

    ``logits = W3 drop(relu(W2 drop(relu(W1 vec(x) + b1)) + b2)) + b3``;
    100,480 + 8,256 + 650 = 109,386 parameters ("about 0.11M", App. C).

    Args:
        dropout_rate: dropout probability after each hidden layer (0.1 in the
            paper).
    """

    def __init__(self, dropout_rate: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.fc2 = nn.Linear(128, 64)
        self.dropout2 = nn.Dropout(dropout_rate)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 10)`` of images ``(B, 1, 28, 28)``."""
        h = self.dropout1(torch.relu(self.fc1(x.reshape(x.shape[0], -1))))
        h = self.dropout2(torch.relu(self.fc2(h)))
        return self.fc3(h)


def _check_dataset(dataset: str, fn: str) -> None:
    if dataset != "mnist":
        msg = f"dataset: {fn} supports 'mnist' only, got {dataset!r}."
        raise DattriValueError(msg)


def create_lr_model(dataset: str = "mnist", **kwargs: object) -> LogisticRegressionMnist:
    """Create the MNIST logistic-regression model (7,850 parameters).

    Args:
        dataset: ``"mnist"`` (the only one; kept for the published signature).
        **kwargs: passed to :class:`LogisticRegressionMnist` (none used).

    Raises:
        DattriValueError: another ``dataset``.
    """
    _check_dataset(dataset, "create_lr_model")
    return LogisticRegressionMnist(**kwargs)


def create_mlp_model(dataset: str = "mnist", **kwargs: object) -> MLPMnist:
    """Create the MNIST MLP (109,386 parameters).

    Args:
        dataset: ``"mnist"`` (the only one; kept for the published signature).
        **kwargs: passed to :class:`MLPMnist`, e.g. ``dropout_rate``.

    Raises:
        DattriValueError: another ``dataset``.
    """
    _check_dataset(dataset, "create_mlp_model")
    return MLPMnist(**kwargs)
