"""Small models and real data shared by the attributor tests (float64)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L2 = 1e-2


def digits(n_train: int = 120, n_test: int = 12, classes: int = 10, dim: int | None = None):
    """Real 8x8 digits from scikit-learn, standardised, float64."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    keep = y < classes
    x, y = x[keep], y[keep]
    x = torch.tensor(x, dtype=torch.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)
    if dim is not None:
        x = x[:, :dim]
    y = torch.tensor(y, dtype=torch.long)
    return (x[:n_train], y[:n_train]), (x[n_train:n_train + n_test], y[n_train:n_train + n_test])


def loaders(train, test, bs_train=32, bs_test=5):
    return (DataLoader(TensorDataset(*train), batch_size=bs_train),
            DataLoader(TensorDataset(*test), batch_size=bs_test))


def make_lr(d: int, c: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(d, c).double()


def l2_loss_factory(model: nn.Module, l2: float = L2):
    """Mean CE + (l2/2)||theta||^2: strictly convex for a linear model."""

    def loss(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        reg = sum((p * p).sum() for p in params.values())
        return nn.functional.cross_entropy(out, y) + 0.5 * l2 * reg

    return loss


def train_full_batch(model: nn.Module, loss, x, y, steps: int = 200) -> nn.Module:
    """Deterministic L-BFGS to convergence."""
    params = dict(model.named_parameters())
    opt = torch.optim.LBFGS(list(params.values()), lr=1, max_iter=steps,
                            tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        v = loss(params, (x, y))
        v.backward()
        return v

    opt.step(closure)
    return model


def trained_lr(n_train: int, n_test: int, classes: int = 3, dim: int = 10):
    """A float64 L2-regularised LR trained to convergence on real digits:
    ``(model, loss, (x_train, y_train), (x_test, y_test))``."""
    train, test = digits(n_train, n_test, classes=classes, dim=dim)
    model = make_lr(dim, classes)
    loss = l2_loss_factory(model)
    train_full_batch(model, loss, *train)
    return model, loss, train, test


def correct_probability(model: nn.Module):
    """TRAK's ``correct_probability_func``: mean softmax probability of the label."""

    def p(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        return torch.softmax(out, -1).gather(1, y.reshape(-1, 1)).squeeze(1).mean()

    return p


def per_example_grads(model: nn.Module, loss, x, y) -> torch.Tensor:
    """Reference per-example gradients with a Python loop over examples."""
    names = [k for k, _ in model.named_parameters()]
    out = []
    for i in range(x.shape[0]):
        params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
        v = loss(params, (x[i:i + 1], y[i:i + 1]))
        gs = torch.autograd.grad(v, [params[k] for k in names])
        out.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(out)


def dense_hessian(model: nn.Module, loss, x, y) -> torch.Tensor:
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def f(flat):
        parts = torch.split(flat, [int(torch.Size(s).numel()) for s in shapes])
        params = {k: t.reshape(s) for k, t, s in zip(names, parts, shapes)}
        return loss(params, (x, y))

    return torch.autograd.functional.hessian(f, flat0)


class MLP(nn.Module):
    def __init__(self, d: int, h: int, c: int, p: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(h, c)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def spy_ranked(monkeypatch, module) -> list[tuple[int, ...]]:
    """Record the shapes of the score blocks that ``module`` hands to its ``ranked``
    (the blocked top-k): a test can then check that no block holds every row."""
    shapes: list[tuple[int, ...]] = []
    orig = module.ranked

    def spy(blocks, k, shard):
        def seen():
            for start, s in blocks:
                shapes.append(tuple(s.shape))
                yield start, s
        return orig(seen(), k, shard)

    monkeypatch.setattr(module, "ranked", spy)
    return shapes


def weight_decay_task(model: nn.Module, n: int = 29, batch: int = 8, l2: float = 0.0,
                      seed: int = 0, dim: int = 6, classes: int = 4):
    """``(AttributionTask, loader)``: ``model`` in float64 on ``n`` Gaussian inputs of
    ``dim`` features, cross-entropy plus ``(l2/2)||theta||^2`` over every parameter."""
    from dattri.task import AttributionTask

    torch.manual_seed(seed)
    model = model.double()
    x = torch.randn(n, dim, dtype=torch.float64)
    y = torch.randint(0, classes, (n,))

    def loss(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        reg = sum((p * p).sum() for p in params.values())
        return nn.functional.cross_entropy(out, data[1]) + 0.5 * l2 * reg

    task = AttributionTask(loss, model, model.state_dict())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    return task, loader
