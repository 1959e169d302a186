r"""Preconditioners: one checkpoint's curvature, applied to rows of features.

The precondition seam of the attribution pipeline (featurize -> precondition ->
score): an influence-function attributor's ``cache`` builds one
:class:`Preconditioner` per checkpoint, and ``attribute`` applies it to the test
features, all rows together:

.. math:: \mathrm{solve}(V) = V M^{-1} \quad (V: (k, P),\ M\ \text{symmetric}),

with ``M`` the damped Hessian (explicit, CG, LiSSA), its top eigenspace (Arnoldi),
Kronecker / EK-FAC blocks, DataInf's or LoGra's per-layer blocks, or TRAK's
regularised Gram matrix of the projected training gradients. The solvers of
:mod:`dattri.linalg.solvers` and :mod:`dattri.func.fisher` give the products; these
classes only package them with their dimension, so that scoring code (and a
researcher's own method) can use any of them alike: ``attributor.preconditioner(c)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dattri.errors import DattriValueError

__all__ = [
    "BlockDiagonalPreconditioner",
    "EigenbasisPreconditioner",
    "GramPreconditioner",
    "KroneckerEigenPreconditioner",
    "Preconditioner",
]


class Preconditioner:
    """``V -> V M^{-1}`` on rows ``V (k, dim)`` from a solve function.

    Args:
        solve: ``f(V (k, dim)) -> (k, dim)``.
        dim: the feature dimension ``P``.
        name: what ``M`` is (shown in ``repr``).
    """

    def __init__(self, solve: Callable[[torch.Tensor], torch.Tensor], dim: int,
                 name: str = "") -> None:
        self._solve, self.dim, self.name = solve, int(dim), name

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """``v M^{-1}`` for rows ``v (k, dim)`` (or one vector ``(dim,)``)."""
        one = v.dim() == 1
        rows = v[None] if one else v
        if rows.shape[-1] != self.dim:
            msg = f"{self!r}.solve: rows of width {rows.shape[-1]}, expected {self.dim}."
            raise DattriValueError(msg)
        out = self._solve(rows)
        return out[0] if one else out

    def solve_owned(self, v: torch.Tensor) -> torch.Tensor:
        """:meth:`solve` of rows nobody else holds: an operator may overwrite ``v``
        instead of allocating a result of its size."""
        return self.solve(v)

    def to_dense(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
                 ) -> torch.Tensor:
        """``M^{-1}`` as a ``(dim, dim)`` matrix (small problems, tests)."""
        return self.solve(torch.eye(self.dim, dtype=dtype, device=device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name or 'solve'}, dim={self.dim})"


class EigenbasisPreconditioner(Preconditioner):
    r"""``M^{-1} = U^T \mathrm{diag}(1 / \lambda) U / c`` on ``r`` orthonormal rows ``U``
    (Arnoldi's top eigenpairs, shifted by the regularisation): zero off the eigenspace.

    Args:
        vecs: ``U (r, dim)``.
        vals: ``lambda (r,)`` (nonzero).
        scale: ``c`` (``norm_constant``).
    """

    def __init__(self, vecs: torch.Tensor, vals: torch.Tensor, scale: float = 1.0) -> None:
        self.vecs, self.vals, self.scale = vecs, vals, float(scale)
        super().__init__(self._apply, vecs.shape[1], f"eigenbasis of rank {vecs.shape[0]}")

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """Coordinates ``v U^T`` ``(k, r)`` in the eigenbasis."""
        return v @ self.vecs.T.to(v.dtype)

    @property
    def inverse_eigenvalues(self) -> torch.Tensor:
        """``1 / (lambda c)`` ``(r,)``: ``solve(v) = (project(v) * this) @ U``."""
        return 1.0 / (self.vals * self.scale)

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        vecs, vals = self.vecs.to(v.dtype), self.vals.to(v.dtype)
        return ((v @ vecs.T) / vals) @ vecs / self.scale


class BlockDiagonalPreconditioner(Preconditioner):
    """Independent blocks: ``M = diag(M_1, ..., M_L)`` over column ``slices`` (layers);
    a block whose solve is ``None`` is the identity.

    Args:
        blocks: ``[(slice, solve_l or None)]`` covering ``0 .. dim`` in order.
    """

    def __init__(self, blocks: Sequence[tuple[slice, Callable | None]], name: str = "") -> None:
        self.blocks = list(blocks)
        dim = self.blocks[-1][0].stop if self.blocks else 0
        super().__init__(self._apply, dim, name or f"{len(self.blocks)} blocks")

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        if all(solve is None for _, solve in self.blocks):
            return v
        out = torch.empty_like(v)
        for sl, solve in self.blocks:
            out[:, sl] = v[:, sl] if solve is None else solve(v[:, sl]).to(v.dtype)
        return out


class KroneckerEigenPreconditioner(Preconditioner):
    r"""Per layer ``l`` (a block of columns holding a ``(d_out, d_a)`` gradient),
    ``V \mapsto Q_S [(Q_S^\top V Q_A) \oslash (\Lambda + \delta)] Q_A^\top`` (EK-FAC;
    K-FAC with ``\Lambda`` the products of the factors' eigenvalues). With
    ``damping = 0`` the inverse is a pseudo-inverse: eigenvalues at rounding level
    (below ``max * count * eps``) are dropped.

    Rows are taken in chunks of at most ``chunk_bytes`` per temporary (a rotation of
    500 gradients of a 512 x 4,608 convolution is 4.7 GB).

    With ``rotated`` (one flag per layer), the flagged layers' columns hold
    coordinates in the eigenbasis, ``Q_S^T V Q_A``, and their solve is the division
    by ``Lambda + delta`` alone: the same operator after an orthogonal change of
    coordinates (:meth:`in_eigenbasis`), for features computed in that basis.

    Args:
        blocks: ``[(slice, Q_A (d_a, d_a), Q_S (d_out, d_out), Lambda (d_out, d_a))]``.
        damping: ``delta >= 0``.
        rotated: per layer, whether its columns are eigenbasis coordinates.
    """

    def __init__(self, blocks: Sequence[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]],
                 damping: float = 0.0, chunk_bytes: int = 256 << 20,
                 rotated: Sequence[bool] | None = None) -> None:
        self.blocks, self.damping, self.chunk_bytes = list(blocks), float(damping), int(chunk_bytes)
        self.rotated = [False] * len(self.blocks) if rotated is None else [bool(r) for r in rotated]
        if len(self.rotated) != len(self.blocks):
            msg = f"rotated has {len(self.rotated)} flags for {len(self.blocks)} layers."
            raise DattriValueError(msg)
        dim = self.blocks[-1][0].stop if self.blocks else 0
        where = f", {sum(self.rotated)} in their eigenbasis" if any(self.rotated) else ""
        super().__init__(self._apply, dim, f"EK-FAC, {len(self.blocks)} layers{where}")

    def in_eigenbasis(self, rotated: Sequence[bool]) -> KroneckerEigenPreconditioner:
        """The same inverse for features whose ``rotated`` layers are eigenbasis
        coordinates ``Q_S^T G Q_A`` (an orthogonal change of coordinates: inner
        products, hence scores, are unchanged)."""
        return KroneckerEigenPreconditioner(self.blocks, self.damping, self.chunk_bytes, rotated)

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        return self._into(v, torch.empty_like(v))

    def solve_owned(self, v: torch.Tensor) -> torch.Tensor:
        return self._into(v, v)  # each chunk is read before it is written

    def _into(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        from dattri.func.fisher import kfac_ifvp

        for (sl, qa, qs, lam), rotated in zip(self.blocks, self.rotated):
            qa, qs, lam = qa.to(v.dtype), qs.to(v.dtype), lam.to(v.dtype)
            if self.damping == 0:  # pseudo-inverse: eigenvalues at rounding level dropped
                cut = lam.abs().max() * lam.numel() * torch.finfo(lam.dtype).eps
                inv = torch.where(lam > cut, 1.0 / torch.where(lam > cut, lam, 1.0), 0.0)
            else:
                inv = None if not rotated else 1.0 / (lam + self.damping)
            rows = max(1, self.chunk_bytes // (lam.numel() * v.element_size()))
            for r0 in range(0, v.shape[0], rows):
                r1 = min(v.shape[0], r0 + rows)
                vl = v[r0:r1, sl].reshape(r1 - r0, *lam.shape)
                if rotated:
                    r = vl * inv
                elif inv is None:
                    r = kfac_ifvp(vl, qa, qs, lam, self.damping)
                else:
                    r = qs @ ((qs.T @ vl @ qa) * inv) @ qa.T
                out[r0:r1, sl] = r.reshape(r1 - r0, -1)
        return out


class GramPreconditioner(Preconditioner):
    r"""``M^{-1} = (\Phi^\top \Phi + \lambda I)^{-1}`` of a kernel method (TRAK) from a
    Cholesky factor of its Gram matrix (:class:`dattri.linalg.GramCholesky`), in the
    form that was cheaper to factor:

    - ``"primal"``: ``factor`` holds :math:`\Phi^\top \Phi + \lambda I` (``k x k``);
      ``solve(V)`` is one solve.
    - ``"dual"``: ``factor`` holds :math:`\Phi \Phi^\top + \lambda I` (``n x n``, for
      ``n < k``) and ``rows`` is :math:`\Phi`. ``solve(V)`` is, by Woodbury,
      :math:`(V - V \Phi^\top (\Phi \Phi^\top + \lambda I)^{-1} \Phi) / \lambda`, and with
      :math:`\lambda = 0` the pseudo-inverse
      :math:`V \Phi^\top (\Phi \Phi^\top)^{-2} \Phi = V (\Phi^\top \Phi)^+`. TRAK's
      scores never form this: :math:`\Phi M^{-1} = (\Phi \Phi^\top + \lambda I)^{-1}
      \Phi` (:func:`dattri.algorithm.trak.kernel_scores`).

    Results are float64.

    Args:
        form: ``"primal"`` or ``"dual"``.
        factor: the Gram factor of that form.
        dim: the feature dimension ``k``.
        rows: :math:`\Phi` ``(n, k)`` (the dual form only).
    """

    def __init__(self, form: str, factor, dim: int, rows: torch.Tensor | None = None) -> None:
        if form not in ("primal", "dual"):
            msg = f"form={form!r}; expected 'primal' or 'dual'."
            raise DattriValueError(msg)
        if form == "dual" and (rows is None or rows.shape != (factor.size, dim)):
            shape = None if rows is None else tuple(rows.shape)
            msg = f"the dual form needs rows of shape ({factor.size}, {dim}), got {shape}."
            raise DattriValueError(msg)
        self.form, self.factor, self.rows = form, factor, rows
        super().__init__(self._apply, dim, f"Gram factor, {form} form of size {factor.size}")

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(torch.float64)
        if self.form == "primal":
            return self.factor.solve(v).to(v.device)
        phi = self.rows.to(v.device, torch.float64)
        inner = self.factor.solve(v @ phi.T).to(v.device)  # (m, n)
        lam = self.factor.regularization
        if lam > 0:
            return (v - inner @ phi) / lam
        return self.factor.solve(inner).to(v.device) @ phi
