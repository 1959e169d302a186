"""GramCholesky: the float64 Gram factor in packed (RFP) storage, against dense solves."""

import numpy as np
import pytest
import torch
from scipy.linalg import lapack

from dattri.errors import DattriValueError, NonFiniteError
from dattri.linalg import GramCholesky
from dattri.linalg.gram import rfp_diagonal


@pytest.mark.parametrize("size", [*range(1, 12), 64, 65])
def test_rfp_diagonal_matches_lapack_layout(size):
    arf, info = lapack.dtrttf(np.eye(size), transr="N", uplo="L")
    assert info == 0
    assert sorted(rfp_diagonal(size).tolist()) == np.flatnonzero(arf).tolist()


@pytest.fixture(autouse=True)
def _packed_storage(monkeypatch):
    """These tests exercise LAPACK's packed path, which small problems skip."""
    monkeypatch.setattr("dattri.linalg.gram.SMALL_GRAM_WORK", -1)


@pytest.mark.parametrize(("n", "k", "transpose"), [
    (40, 9, False), (40, 10, False), (9, 40, True), (10, 40, True), (40, 9, True), (12, 12, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [1 << 21, 37])  # one block; blocks of 37 // size rows or columns
def test_solve_matches_dense_float64(n, k, transpose, dtype, block, monkeypatch):
    monkeypatch.setattr("dattri.linalg.gram.BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(n + 100 * k)
    f = torch.randn(n, k, generator=g, dtype=torch.float64)
    lam = 0.25
    fd = f.to(dtype).double()  # the matrix actually factored
    K = fd @ fd.T if transpose else fd.T @ fd
    size = K.shape[0]
    factor = GramCholesky(f.to(dtype), lam, transpose=transpose)
    assert factor.size == size
    assert factor.nbytes == 8 * size * (size + 1) // 2  # packed: half of a full matrix
    b = torch.randn(7, size, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(K + lam * torch.eye(size, dtype=torch.float64), b.T).T
    got = factor.solve(b)
    assert got.dtype == torch.float64 and got.shape == (7, size)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # float32 right-hand sides are solved in float64 too
    torch.testing.assert_close(factor.solve(b.float()), torch.linalg.solve(
        K + lam * torch.eye(size, dtype=torch.float64), b.float().double().T).T, rtol=1e-10, atol=1e-12)


def test_ill_conditioned_float32_features_stay_accurate():
    # singular values 1 .. 1e-5 in a random basis: Gram condition number 1e10. A
    # float32 Gram is indefinite (a float32 solve is wrong by ~100%); ours solves the
    # float32 input's Gram to float64 accuracy (~eps64 * cond)
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(300, 60, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    f = ((u * torch.logspace(0, -5, 60, dtype=torch.float64)) @ v.T).float()
    fd = f.double()
    b = torch.randn(4, 60, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(fd.T @ fd, b.T).T

    def rel(x):
        return float((x - want).norm() / want.norm())

    assert rel(torch.linalg.solve(f.T @ f, b.float().T).T.double()) > 0.1
    assert rel(GramCholesky(f).solve(b)) < 1e-5


def test_singular_gram_falls_back_to_pseudo_inverse_with_warning():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(6, 15, generator=g, dtype=torch.float64)  # F^T F: rank 6 of 15
    b = f[:3] @ torch.randn(15, 15, generator=g, dtype=torch.float64) @ (f.T @ f)  # in the range
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        factor = GramCholesky(f)
    torch.testing.assert_close(factor.solve(b), b @ torch.linalg.pinv(f.T @ f), rtol=1e-6, atol=1e-8)


def test_bad_inputs_are_named():
    with pytest.raises(DattriValueError, match="regularization=-1"):
        GramCholesky(torch.randn(4, 3), -1.0)
    with pytest.raises(DattriValueError, match="real \\(n, k\\) matrix"):
        GramCholesky(torch.randn(4))
    with pytest.raises(NonFiniteError, match="inf/NaN"):
        GramCholesky(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(DattriValueError, match=r"must be \(m, 3\)"):
        GramCholesky(torch.randn(5, 3)).solve(torch.randn(2, 4))


@pytest.mark.parametrize(("preset", "expect"), [(None, "4"), ("9", "9")])
def test_dattri_parks_openblas_threads_unless_the_user_chose(preset, expect):
    # a fresh interpreter: the variable is read when scipy's OpenBLAS loads, after dattri
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = ("import os, torch, dattri\n"
            "from dattri.linalg import GramCholesky\n"
            "GramCholesky(torch.randn(6, 3)).solve(torch.randn(2, 3))\n"
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == expect


@pytest.mark.parametrize("transpose", [False, True])
def test_full_storage_path_of_accelerators_agrees(transpose, monkeypatch):
    # accelerators factor in full storage with torch; exercised here on the CPU
    g = torch.Generator().manual_seed(7)
    f = torch.randn(30, 12, generator=g)
    b = torch.randn(3, 12 if not transpose else 30, generator=g, dtype=torch.float64)
    packed = GramCholesky(f, 0.1, transpose=transpose)
    monkeypatch.setattr(GramCholesky, "_factor_rfp", GramCholesky._factor_full)
    full = GramCholesky(f, 0.1, transpose=transpose)
    assert full._rfp is None and full._full is not None
    assert full.nbytes == 8 * full.size**2
    torch.testing.assert_close(full.solve(b), packed.solve(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transpose", [False, True])
def test_small_problems_use_full_storage_and_agree(transpose, monkeypatch):
    g = torch.Generator().manual_seed(8)
    f = torch.randn(30, 12, generator=g)
    b = torch.randn(3, 12 if not transpose else 30, generator=g, dtype=torch.float64)
    packed = GramCholesky(f, 0.1, transpose=transpose)
    assert packed._rfp is not None
    monkeypatch.setattr("dattri.linalg.gram.SMALL_GRAM_WORK", 1 << 31)
    small = GramCholesky(f, 0.1, transpose=transpose)
    assert small._rfp is None and small._full is not None
    torch.testing.assert_close(small.solve(b), packed.solve(b), rtol=1e-10, atol=1e-12)
