"""Tests of dattri.func.projection: JL properties, reproducibility, budgets, Demos 3/4."""

from __future__ import annotations

import math

import pytest
import torch

from dattri.errors import DattriValueError
from dattri.func.projection import (
    DenseProjector,
    RandomMaskProjector,
    _sample_subset,
    arnoldi_project,
    clear_projector_cache,
    get_projector,
    random_project,
)
from dattri.params.projection import TRAKProjectionParams

RANDOM_TYPES = ["normal", "rademacher", "sjlt", "random_mask", "grass"]
ALL_TYPES = ["identity", *RANDOM_TYPES]


def _matrix(projector, ensemble_id=0, dtype=torch.float64):
    """The (P, k) matrix of a linear projector, read off the identity."""
    return projector.project(torch.eye(projector.feature_dim, dtype=dtype), ensemble_id)


# ---------------------------------------------------------------- shapes and scale
@pytest.mark.parametrize("proj_type", ALL_TYPES)
def test_output_shape_dtype_and_linearity(proj_type):
    p, k = 700, 64
    proj = get_projector(proj_type, p, k, seed=3)
    x = torch.randn(9, p, dtype=torch.float64)
    y = proj.project(x)
    assert y.shape == (9, p if proj_type == "identity" else k)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x @ _matrix(proj), rtol=1e-12, atol=1e-12)


def test_dense_scales():
    p, k = 300, 128
    normal = DenseProjector(p, k, kind="normal", seed=1).matrix()
    assert normal.shape == (p, k)
    z = normal * math.sqrt(k)  # should be N(0, 1)
    assert abs(z.mean().item()) < 4 / math.sqrt(p * k)
    assert abs(z.pow(2).mean().item() - 1) < 4 * math.sqrt(2 / (p * k))
    rad = DenseProjector(p, k, kind="rademacher", seed=1).matrix()
    assert torch.equal(rad.abs(), torch.full_like(rad, 1 / math.sqrt(k)))
    assert abs((rad > 0).float().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(p * k)


@pytest.mark.parametrize("c", [1, 3])
def test_sjlt_structure(c):
    p, k = 500, 30
    m = _matrix(get_projector("sjlt", p, k, seed=2, sjlt_c=c))
    nz = m != 0
    assert torch.equal(nz.sum(1), torch.full((p,), c))  # c nonzeros per input coordinate
    torch.testing.assert_close(m[nz].abs(), torch.full((p * c,), 1 / math.sqrt(c), dtype=m.dtype))
    bounds = [(r * k) // c for r in range(c + 1)]
    for r in range(c):  # one nonzero in each of the c output blocks
        assert torch.equal(nz[:, bounds[r] : bounds[r + 1]].sum(1), torch.ones(p, dtype=torch.long))


def test_random_mask_structure():
    p, k = 400, 50
    m = _matrix(get_projector("random_mask", p, k, seed=2))
    nz = m != 0
    assert nz.sum().item() == k and torch.equal(nz.sum(0), torch.ones(k, dtype=torch.long))
    assert nz.sum(1).max().item() == 1  # distinct kept coordinates
    torch.testing.assert_close(m[nz], torch.full((k,), math.sqrt(p / k), dtype=m.dtype))


def test_grass_structure():
    p, k = 5000, 40  # intermediate m = 4k = 160 < P: both stages active
    proj = get_projector("grass", p, k, seed=2)
    assert proj.grass_dim == 160
    m = _matrix(proj)
    nz = m != 0
    assert nz.any(1).sum().item() == 160
    torch.testing.assert_close(m[nz].abs(), torch.full((160,), math.sqrt(p / 160), dtype=m.dtype))


@pytest.mark.parametrize(("n", "k"), [(10, 7), (10**9, 50)])
def test_sample_subset_distinct(n, k):
    gen = torch.Generator().manual_seed(0)
    idx = _sample_subset(n, k, gen, torch.device("cpu"))
    assert idx.numel() == k and idx.unique().numel() == k
    assert idx.min() >= 0 and idx.max() < n and torch.equal(idx, idx.sort().values)


# ---------------------------------------------------------------- JL properties
@pytest.mark.parametrize("proj_type", RANDOM_TYPES)
def test_inner_products_within_jl_bound(proj_type):
    """k = 2048: |<Px,Py> - <x,y>| <= 4/sqrt(k) ||x|| ||y|| for >= 98% of 200 pairs.

    Every projection here has Var[<Px,Py>] <= 2 ||x||^2 ||y||^2 / k for these dense
    Gaussian vectors (the mask and GraSS up to the finite-population factor), so the
    bound is >= 2.8 standard deviations: about 0.5% of pairs fail in expectation and
    the chance of more than 4 failures in 200 is below 0.3%. Seeds are fixed.
    """
    p, k, n = 10_000, 2048, 200
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, p, generator=gen, dtype=torch.float64)
    y = 0.6 * x + torch.randn(n, p, generator=gen, dtype=torch.float64)
    proj = get_projector(proj_type, p, k, seed=5)
    px, py = proj.project(x), proj.project(y)
    err = ((px * py).sum(1) - (x * y).sum(1)).abs()
    bound = 4 / math.sqrt(k) * x.norm(dim=1) * y.norm(dim=1)
    assert (err <= bound).float().mean().item() >= 0.98


@pytest.mark.parametrize("proj_type", RANDOM_TYPES)
def test_norms_and_inner_products_unbiased_over_seeds(proj_type):
    p, k, draws = 300, 16, 300
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, p, generator=gen, dtype=torch.float64)
    y = 0.5 * x + torch.randn(1, p, generator=gen, dtype=torch.float64)
    proj = get_projector(proj_type, p, k, seed=0, grass_dim=64)
    ratios, inner = [], []
    for e in range(draws):
        px, py = proj.project(x, ensemble_id=e), proj.project(y, ensemble_id=e)
        ratios.append((px.pow(2).sum() / x.pow(2).sum()).item())
        inner.append(((px * py).sum() / (x * y).sum()).item())
    for values in (torch.tensor(ratios), torch.tensor(inner)):
        se = values.std() / math.sqrt(draws)
        assert abs(values.mean().item() - 1) < 4 * se.item()


# ---------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("proj_type", RANDOM_TYPES)
def test_same_seed_same_projection_any_batch_split(proj_type):
    p, k = 1000, 96
    x = torch.randn(23, p, dtype=torch.float64)
    kwargs = {"block_bytes": 4 * k * 128}  # several blocks
    a = get_projector(proj_type, p, k, seed=7, **kwargs).project(x, ensemble_id=2)
    fresh = get_projector(proj_type, p, k, seed=7, max_batch_size=4, **kwargs)
    parts = torch.cat([fresh.project(x[i : i + 5], ensemble_id=2) for i in range(0, 23, 5)])
    torch.testing.assert_close(parts, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fresh.project(x, ensemble_id=2), a, rtol=1e-12, atol=1e-12)
    single = fresh.project(x[17], ensemble_id=2)  # 1-D input = one example
    torch.testing.assert_close(single, a[17:18], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("proj_type", RANDOM_TYPES)
def test_ensemble_id_and_seed_change_the_projection(proj_type):
    p, k = 800, 64
    x = torch.randn(4, p, dtype=torch.float64)
    proj = get_projector(proj_type, p, k, seed=1)
    base = proj.project(x, 0)
    assert not torch.allclose(base, proj.project(x, 1))
    assert not torch.allclose(base, get_projector(proj_type, p, k, seed=2).project(x, 0))


@pytest.mark.parametrize("proj_type", ALL_TYPES)
def test_dict_features_equal_concatenated_tensor(proj_type):
    b = 5
    feats = {"w": torch.randn(b, 6, 7, dtype=torch.float64), "b": torch.randn(b, 6, dtype=torch.float64)}
    flat = torch.cat([feats["w"].reshape(b, -1), feats["b"]], dim=1)
    proj = get_projector(proj_type, 48, 16, seed=4)
    torch.testing.assert_close(proj.project(feats, 3), proj.project(flat, 3))


@pytest.mark.parametrize("proj_type", RANDOM_TYPES)
def test_float32_and_float64_see_the_same_matrix(proj_type):
    x = torch.randn(6, 500, dtype=torch.float64)
    proj = get_projector(proj_type, 500, 32, seed=9)
    y64 = proj.project(x)
    y32 = proj.project(x.float())
    assert y64.dtype == torch.float64 and y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- memory budget
def test_dense_blocks_respect_budget_and_cache():
    p, k = 1000, 64
    budget = 4 * k * 100  # 100 rows per block
    x = torch.randn(3, p, dtype=torch.float64)
    proj = DenseProjector(p, k, seed=0, block_bytes=budget)
    y = proj.project(x)
    assert proj.peak_block_bytes <= budget and proj.blocks_generated == 10
    proj.project(x)  # everything cached: nothing regenerated
    assert proj.blocks_generated == 10
    torch.testing.assert_close(y, x @ proj.matrix().double(), rtol=1e-12, atol=1e-12)
    tight = DenseProjector(p, k, seed=0, block_bytes=budget, cache_bytes=3 * budget)
    torch.testing.assert_close(tight.project(x), y, rtol=1e-12, atol=1e-12)
    tight.project(x)  # 3 blocks cached, 7 regenerated
    assert tight.blocks_generated == 17 and tight._cached_bytes <= 3 * budget


@pytest.mark.parametrize("kind", ["normal", "rademacher"])
def test_dense_blocks_drawn_ahead_on_threads_are_the_same(kind):
    """Uncached blocks are drawn ahead on the CPU's threads: the same matrix, products
    and adjoint as one thread drawing them in order, bit for bit."""
    p, k = 1000, 16
    budget = 4 * k * 64  # 16 blocks of 64 rows (the last one 40), nothing cached
    x, y = torch.randn(5, p), torch.randn(3, k)
    threads = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            proj = DenseProjector(p, k, kind=kind, seed=4, block_bytes=budget, cache_bytes=0)
            out[n] = (proj.project(x, 2), proj.back_project(y, 2), proj.project(x, 2))
            assert proj.blocks_generated == 3 * math.ceil(p / 64)
    finally:
        torch.set_num_threads(threads)
    m = DenseProjector(p, k, kind=kind, seed=4, block_bytes=budget).matrix(2)
    for a, b in zip(out[1], out[3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(out[3][0], x @ m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3][1], y @ m.T, rtol=1e-5, atol=1e-5)


def test_sparse_blocks_respect_budget():
    proj = get_projector("sjlt", 5000, 32, seed=0, sjlt_c=2, block_bytes=2400)
    proj.project(torch.randn(2, 5000))
    assert 0 < proj.peak_block_bytes <= 2400 and proj.blocks_generated == math.ceil(5000 / 100)


# ---------------------------------------------------------------- random_project / Demo 3
def test_demo3_as_printed():
    clear_projector_cache()

    class Demo:
        def __init__(self):
            self.norm_scaler = 2.0
            self.projector_kwargs = TRAKProjectionParams(proj_dim=32).as_kwargs(device="cpu")

        def grad_loss_func(self, parameters, batch):
            return batch[0] * parameters

    self = Demo()
    parameters = torch.randn(200)
    train_batch_data = (torch.randn(6, 200), torch.zeros(6))
    ckpt_seed = 3
    grad_t = self.grad_loss_func(parameters, train_batch_data)
    grad_t = torch.nan_to_num(grad_t) / self.norm_scaler
    grad_p = random_project(
        grad_t,
        train_batch_data[0].shape[0],
        **self.projector_kwargs,
    )(grad_t, ensemble_id=ckpt_seed).clone().detach()
    assert grad_p.shape == (6, 32)
    ref = get_projector("normal", 200, 32, seed=0).project(grad_t, ensemble_id=ckpt_seed)
    torch.testing.assert_close(grad_p, ref)
    again = random_project(grad_t[:2], 2, **self.projector_kwargs)
    assert again.projector is random_project(grad_t, 6, **self.projector_kwargs).projector
    torch.testing.assert_close(again(grad_t, ensemble_id=ckpt_seed), grad_p)


def test_random_project_dict_and_half_precision():
    feats = {"a": torch.randn(4, 3, 5), "b": torch.randn(4, 2)}
    f = random_project(feats, 4, proj_dim=8, proj_max_batch_size=2, proj_type="sjlt")
    assert f.projector.feature_dim == 17 and f(feats).shape == (4, 8)
    h = random_project(feats, 4, proj_dim=8, proj_max_batch_size=2, use_half_precision=True)
    assert h(feats).dtype == torch.float16


# ---------------------------------------------------------------- arnoldi_project / Demo 4
def _quadratic(dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-1, 1, dim, dtype=torch.float64)) @ q.T
    b = torch.randn(dim, generator=gen, dtype=torch.float64)
    return a, lambda theta: 0.5 * theta @ a @ theta + b @ theta


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_arnoldi_project_equals_dense_inverse(mode):
    dim = 12
    a, f = _quadratic(dim)
    theta = torch.randn(dim, dtype=torch.float64)
    g = torch.randn(5, dim, dtype=torch.float64)
    proj = arnoldi_project(dim, f, theta, proj_dim=dim, max_iter=dim, tol=1e-10, mode=mode)
    pg = proj(g)
    torch.testing.assert_close(pg @ pg.T, g @ torch.linalg.solve(a, g.T), rtol=1e-8, atol=1e-10)
    reg = arnoldi_project(g, f, theta, proj_dim=dim, max_iter=dim, regularization=0.5, norm_constant=2.0)
    ref = 4.0 * g @ torch.linalg.solve(a + 0.5 * torch.eye(dim, dtype=a.dtype), g.T)
    torch.testing.assert_close(reg(g) @ reg(g).T, ref, rtol=1e-8, atol=1e-10)


def test_arnoldi_project_top_eigenspace_and_dict_params():
    dim, r = 10, 4
    a, f = _quadratic(dim, seed=1)
    params = {"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(4, dtype=torch.float64)}

    def target(p, scale):
        return scale * f(torch.cat([p["w"].reshape(-1), p["b"]]))

    g = torch.randn(3, dim, dtype=torch.float64)
    proj = arnoldi_project(dim, target, (params, 1.0), argnums=0, proj_dim=r, max_iter=dim)
    evals, evecs = torch.linalg.eigh(a)
    top = evecs[:, -r:]
    ref = g @ top @ torch.diag(1 / evals[-r:]) @ top.T @ g.T
    assert proj(g).shape == (3, r)
    torch.testing.assert_close(proj(g) @ proj(g).T, ref, rtol=1e-8, atol=1e-10)


def test_demo4_as_printed():
    dim = 8
    _, f = _quadratic(dim, seed=2)

    class Demo:
        norm_scaler = 1.0
        projector_kwargs = {"proj_dim": 5, "max_iter": 8, "device": "cpu"}
        target_func = staticmethod(f)

        def grad_loss_func(self, parameters, batch):
            return batch[0] + parameters

    self = Demo()
    parameters = torch.zeros(dim, dtype=torch.float64)
    train_batch_data = (torch.randn(4, dim, dtype=torch.float64),)
    grad_t = self.grad_loss_func(parameters, train_batch_data)
    grad_t = torch.nan_to_num(grad_t) / self.norm_scaler
    grad_p = arnoldi_project(
        grad_t,
        self.target_func,
        parameters,
        **self.projector_kwargs,
    )(grad_t).clone().detach()
    assert grad_p.shape == (4, 5) and torch.isfinite(grad_p).all()


def test_arnoldi_project_drops_nonpositive_eigenvalues():
    a = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="dropped"):
        proj = arnoldi_project(3, lambda t: 0.5 * t @ a @ t, torch.ones(3, dtype=torch.float64),
                               proj_dim=3, max_iter=3)
    assert proj.eigvals.numel() == 2 and (proj.eigvals > 0).all()


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: get_projector("gaussian", 10, 4), "proj_type must be one of"),
        (lambda: get_projector("normal", 10, 0), "proj_dim must be an integer >= 1, got 0"),
        (lambda: get_projector("random_mask", 10, 20), "proj_dim <= feature_dim"),
        (lambda: get_projector("sjlt", 10, 4, sjlt_c=5), "sjlt_c=5 exceeds proj_dim=4"),
        (lambda: get_projector("normal", 10, 4).project(torch.randn(2, 11)), "feature_dim=10"),
        (lambda: get_projector("normal", 10, 4).project(torch.ones(2, 10, dtype=torch.long)),
         "floating point"),
        (lambda: get_projector("normal", 10, 4).project(torch.randn(2, 10), -1), "ensemble_id"),
        (lambda: random_project(torch.randn(4, 5), 3, 2, 2), "feature_batch_size=3"),
        (lambda: random_project(torch.randn(4, 5), 4, 2, 2, "cpu"), "device is keyword-only"),
        (lambda: random_project(torch.randn(4, 5), 4, 2, 2, colour=1), r"unknown keyword\(s\) \['colour'\]"),
        (lambda: get_projector("normal", 10, 4, device="tpu"), "device must be a torch device"),
        (lambda: arnoldi_project(3, lambda t: t.sum(), torch.ones(3), argnums=1), "argnums=1"),
        (lambda: arnoldi_project(3, lambda t: t, torch.ones(3)), "single-element"),
        (lambda: arnoldi_project(4, lambda t: t.sum(), torch.ones(3)), "feature_dim=4"),
        (lambda: arnoldi_project(3, lambda t: t.sum(), torch.ones(3), mode="fwd"), "mode must be"),
        (lambda: arnoldi_project(3, lambda t: t.sum(), torch.ones(3), regularization=-1), "regularization"),
    ],
)
def test_bad_input_raises_typed_error(call, match):
    with pytest.raises(DattriValueError, match=match):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda():
    with pytest.raises(DattriValueError, match="CUDA is not available"):
        RandomMaskProjector(10, 4, device="cuda")


# ---------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("proj_type", ALL_TYPES)
def test_cuda_features_match_cpu(proj_type):
    x = torch.randn(17, 3000, dtype=torch.float64)
    proj = get_projector(proj_type, 3000, 256, seed=1, block_bytes=4 * 256 * 500)
    cpu = proj.project(x, 5)
    gpu = proj.project(x.cuda(), 5)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-10)
    on_gpu = get_projector(proj_type, 3000, 256, seed=1, device="cuda")  # GPU generator
    torch.testing.assert_close(on_gpu.project(x.cuda(), 5), on_gpu.project(x.cuda(), 5))


def test_a_new_ensemble_id_evicts_the_previous_matrix_not_its_own_blocks():
    """An ensemble loop (checkpoint-major, batches inside) over a cache that holds one
    matrix: each checkpoint's matrix is drawn once, however many batches use it (the
    cache kept the first id's blocks forever and redrew the others per batch)."""
    p, k = 1000, 64
    budget = 4 * k * 100  # 100 rows per block: 10 blocks a matrix
    proj = DenseProjector(p, k, seed=0, block_bytes=budget, cache_bytes=10 * budget)
    x = torch.randn(3, p, dtype=torch.float64)
    for c in range(3):
        first = proj.project(x, ensemble_id=c)
        for _ in range(4):  # the other batches of this checkpoint
            torch.testing.assert_close(proj.project(x, ensemble_id=c), first, rtol=0, atol=0)
        torch.testing.assert_close(first, x @ proj.matrix(c).double(), rtol=1e-12, atol=1e-12)
        assert proj.blocks_generated == 10 * (c + 1)
        assert proj._cached_bytes <= 10 * budget
