r"""Cholesky factor of a Gram matrix in float64, stored in half the memory.

:class:`GramCholesky` factors :math:`F^\top F + \lambda I` (or, with
``transpose=True``, :math:`F F^\top + \lambda I`) for a float32 or float64 matrix
``F`` and solves with it. On the CPU the Gram matrix is formed by LAPACK's
``dsfrk`` straight into *rectangular full packed* (RFP) storage, factored by
``dpftrf`` and used by ``dpftrs``: the same level-3 BLAS speed as the full-storage
``dsyrk`` / ``dpotrf`` / ``dpotrs`` (measured on 2 cores, 5,000 x 2,048: 0.37 s /
0.055 s / 0.085 s for 500 right-hand sides) with half the memory, no symmetrising
pass and no copy of ``F`` beyond its float64 cast (``F^T`` of a row-major matrix is
column-major, which is what BLAS reads). TRAK keeps one such factor per
checkpoint, so the halving is what lets a 50-checkpoint ensemble fit.

Float64 because the rounding of a float32 Gram matrix (~1e-7 of its norm) can make
a well-posed but ill-conditioned one look indefinite (MNIST MLP TRAK features:
condition number 4e9). When the matrix is not positive definite (singular,
``lambda = 0`` and fewer examples than features) the factor falls back, with a
warning, to the symmetric-eigendecomposition pseudo-inverse of
:func:`dattri.linalg.factorize`. Other devices use ``torch`` in full storage.
"""

from __future__ import annotations

import torch

from dattri._warn import warn_user
from dattri.errors import DattriValueError, NonFiniteError
from dattri.func.utils import all_finite

__all__ = ["BLOCK_ELEMENTS", "GramCholesky", "gram64", "rfp_diagonal"]

#: float64 elements of one block of F cast at a time (16 MiB)
BLOCK_ELEMENTS = 1 << 21
#: below this much Gram work (``inner * size**2``, ~0.1 s of float64 arithmetic) the
#: factor is a full torch Cholesky factor; above it LAPACK's packed storage, which
#: forms only one triangle and holds half the memory (its scipy import costs ~0.5 s once)
SMALL_GRAM_WORK = 1 << 31


#: column block of :func:`symmetric_gram`: wider Gram matrices are formed from the
#: blocks on and above the diagonal only
GRAM_BLOCK = 256


def symmetric_gram(x: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """``x^T x`` ``(d, d)`` of ``x (N, d)`` in ``x``'s dtype, from its block upper
    triangle, mirrored: about ``(d + block) / (2 d)`` of the multiply-adds of one
    product (62% at ``d = 1,152``, 53% at 4,608: a ResNet-9 convolution's patch
    covariance), as a symmetric rank-k update (``syrk``) would, in ordinary matrix
    products."""
    d = x.shape[1]
    if d <= 2 * block:
        return x.T @ x
    out = x.new_empty(d, d)
    for i in range(0, d, block):
        out[i:i + block, i:] = x[:, i:i + block].T @ x[:, i:]
    for i in range(block, d, block):
        out[i:i + block, :i] = out[:i, i:i + block].T
    return out


def gram64(f: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Float64 Gram matrix ``f^T f`` (``transpose=False``) or ``f f^T``, full storage
    (:func:`symmetric_gram`)."""
    f = f.to(torch.float64)
    return symmetric_gram(f.T if transpose else f)


def rfp_diagonal(size: int) -> torch.Tensor:
    """Flat indices of the diagonal of a ``size x size`` lower triangle in RFP
    storage (``transr='N'``, ``uplo='L'``), in no particular order.

    For even ``size = 2h`` the RFP array has leading dimension ``size + 1`` and the
    diagonal sits at ``j (size + 2)`` and ``j (size + 2) + 1`` for ``j < h``; for
    odd ``size = 2h + 1`` it is at 0 and at ``j (size + 1) - 1``, ``j (size + 1)``
    for ``1 <= j <= h`` (checked against LAPACK's ``dtrttf`` in the tests).
    """
    h = size // 2
    if size % 2 == 0:
        j = torch.arange(h)
        return torch.cat([j * (size + 2), j * (size + 2) + 1])
    j = torch.arange(1, h + 1)
    return torch.cat([torch.zeros(1, dtype=torch.long), j * (size + 1) - 1, j * (size + 1)])


class GramCholesky:
    r"""Cholesky factor of :math:`K + \lambda I`, with :math:`K = F^\top F`
    (``transpose=False``, size ``k``) or :math:`F F^\top` (``transpose=True``,
    size ``n``), for ``F`` of shape ``(n, k)``.

    ``solve(B)`` maps every row ``b_r`` of ``B`` (``(m, size)``) to
    :math:`(K + \lambda I)^{-1} b_r`, in float64. ``nbytes`` is the memory the
    factor holds.

    Args:
        f: ``(n, k)`` real matrix (float32 or float64; cast to float64).
        regularization: :math:`\lambda \ge 0`.
        transpose: factor :math:`F F^\top` instead of :math:`F^\top F`.
    """

    def __init__(self, f: torch.Tensor, regularization: float = 0.0, transpose: bool = False) -> None:
        if f.ndim != 2 or not f.is_floating_point() or f.is_complex():
            msg = f"`f` must be a real (n, k) matrix, got shape {tuple(f.shape)} dtype {f.dtype}."
            raise DattriValueError(msg)
        if not regularization >= 0:  # also rejects NaN
            msg = f"regularization={regularization!r} must be >= 0."
            raise DattriValueError(msg)
        if not all_finite(f):
            msg = "`f` contains inf/NaN; check the features it was built from."
            raise NonFiniteError(msg)
        self.size = f.shape[0] if transpose else f.shape[1]
        self.regularization = float(regularization)
        self._rfp = self._full = self._pinv = None
        self.device = f.device
        inner = f.shape[1] if transpose else f.shape[0]
        if f.device.type == "cpu" and inner * self.size**2 > SMALL_GRAM_WORK:
            self._factor_rfp(f, transpose)
        else:
            self._factor_full(f, transpose)

    # -- CPU: rectangular full packed storage through LAPACK ------------------------
    def _gram_rfp(self, f: torch.Tensor, transpose: bool):
        """``K + lambda I`` (lower triangle, RFP) accumulated over blocks of the inner
        dimension, each cast to float64 on its own (~16 MiB) instead of a float64 copy
        of all of F."""
        import numpy as np
        from scipy.linalg import lapack

        arf = np.empty(self.size * (self.size + 1) // 2)
        # a row-major block ``a`` (r, c) is, as a.T, a column-major (c, r) matrix
        # without a copy: dsfrk(trans='N') adds a.T a = F_rows^T F_rows (primal),
        # trans='T' adds a a.T = F_cols F_cols^T (dual)
        inner = f.shape[1] if transpose else f.shape[0]
        step = max(1, BLOCK_ELEMENTS // max(1, self.size))
        for i, start in enumerate(range(0, inner, step)):
            part = f[:, start:start + step] if transpose else f[start:start + step]
            a = part.to(torch.float64).contiguous().numpy()
            arf = lapack.dsfrk(self.size, a.shape[1] if transpose else a.shape[0], 1.0, a.T,
                               1.0 if i else 0.0, arf, transr="N", uplo="L",
                               trans="T" if transpose else "N", overwrite_c=1)
        if self.regularization:
            arf[rfp_diagonal(self.size).numpy()] += self.regularization
        return arf

    def _factor_rfp(self, f: torch.Tensor, transpose: bool) -> None:
        from scipy.linalg import lapack

        from dattri.linalg.solvers import _eig_inverse

        f = f.detach()
        chol, info = lapack.dpftrf(self.size, self._gram_rfp(f, transpose), transr="N",
                                   uplo="L", overwrite_a=1)
        if info == 0:
            self._rfp = chol
            return
        # not positive definite: dpftrf overwrote the matrix, so form it again and
        # unpack its lower triangle (what eigh reads) for the pseudo-inverse
        low, _ = lapack.dtfttr(self.size, self._gram_rfp(f, transpose), transr="N", uplo="L")
        self._warn_singular()
        self._pinv = _eig_inverse(torch.from_numpy(low))

    # -- other devices ----------------------------------------------------------------
    def _factor_full(self, f: torch.Tensor, transpose: bool) -> None:
        self._factor_gram(gram64(f.detach(), transpose))

    def _factor_gram(self, g: torch.Tensor) -> None:
        from dattri.linalg.solvers import _eig_inverse

        g.diagonal().add_(self.regularization)
        L, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            self._full = L
            return
        self._warn_singular()
        self._pinv = _eig_inverse(g)

    @classmethod
    def from_gram(cls, g: torch.Tensor, regularization: float = 0.0) -> GramCholesky:
        r"""The factor of :math:`K + \lambda I` from a formed Gram matrix ``K``
        ``(size, size)`` (e.g. a sum of per-shard ``F_r^T F_r`` over the ranks of a
        process group), in full float64 storage; ``g`` is not modified."""
        if g.ndim != 2 or g.shape[0] != g.shape[1] or not g.is_floating_point():
            msg = f"`g` must be a real square matrix, got shape {tuple(g.shape)} dtype {g.dtype}."
            raise DattriValueError(msg)
        if not regularization >= 0:
            msg = f"regularization={regularization!r} must be >= 0."
            raise DattriValueError(msg)
        if not all_finite(g):
            msg = "`g` contains inf/NaN; check the features it was built from."
            raise NonFiniteError(msg)
        self = cls.__new__(cls)
        self.size, self.regularization = g.shape[0], float(regularization)
        self._rfp = self._full = self._pinv = None
        self.device = g.device
        self._factor_gram(g.detach().to(torch.float64).clone())
        return self

    def _warn_singular(self) -> None:
        warn_user(
            f"GramCholesky: the {self.size} x {self.size} Gram matrix + regularization*I "
            f"(regularization={self.regularization}) is not positive definite in float64 "
            "(the features are linearly dependent or nearly so); using the eigendecomposition "
            "pseudo-inverse instead. A regularization > 0 makes it well posed (and faster).",
            RuntimeWarning,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the factor."""
        held = self._rfp if self._rfp is not None else (self._full if self._full is not None else self._pinv)
        return int(held.nbytes) if held is not None else 0

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        r"""Rows of ``b`` ``(m, size)`` mapped to :math:`(K + \lambda I)^{-1} b_r`, float64."""
        if b.ndim != 2 or b.shape[1] != self.size:
            msg = f"`b` must be (m, {self.size}), got shape {tuple(b.shape)}."
            raise DattriValueError(msg)
        if self._rfp is not None:
            from scipy.linalg import lapack

            # b^T of a row-major (m, size) matrix is column-major (size, m): no transpose copy
            rhs = b.detach().to("cpu", torch.float64).contiguous().numpy().T
            x, info = lapack.dpftrs(self.size, self._rfp, rhs, transr="N", uplo="L")
            if info != 0:  # an invalid argument; cannot happen with the checks above
                msg = f"LAPACK dpftrs failed with info={info}."
                raise RuntimeError(msg)
            return torch.from_numpy(x).T.to(b.device)
        bb = b.to(self.device, torch.float64)
        if self._full is not None:
            return torch.cholesky_solve(bb.T, self._full).T
        return bb @ self._pinv
