"""TensorSketch of per-example gradients of linear layers, without forming them.

For an ``nn.Linear`` layer the per-example gradient is the outer product
``G_i = d_i a_i^T`` of the output gradient ``d_i`` (``d_out``) and the input
``a_i`` (``d_in``, with a ones column when the bias is included). A count sketch
with the *structured* hash ``h(o, j) = (h_d(o) + h_a(j)) mod k`` and signs
``s(o, j) = s_d(o) s_a(j)`` maps ``vec(G_i)`` to the circular convolution of two
small count sketches (TensorSketch, Pham and Pagh 2013)::

    S(G_i) = IFFT( FFT(CS_d(d_i)) * FFT(CS_a(a_i)) )

so the projection of all layers costs ``O(B (d_in + d_out + k log k))`` per layer
instead of ``O(B d_in d_out)`` (forming the gradients) plus the projection. Layers
get independent hashes and their sketches add up: the result is a count sketch of
the whole gradient vector, with ``E[<S g, S g'>] = <g, g'>`` (the signs are
pairwise independent across coordinates). Its worst-case variance is larger than
that of a fully random count sketch of the same size, because collisions of the
structured hash are correlated; on MNIST gradients its inner-product error equals
that of dense Gaussian and SJLT projections (``benchmarks/sketch_accuracy.py``).

The hashes depend only on ``(seed, ensemble_id, layer index, side)`` and the layer
sizes, so a sketch does not depend on the batch split. :func:`tensor_sketch_matrix`
builds the equivalent dense ``(P, k)`` matrix for checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from dattri.errors import DattriValueError

__all__ = ["TensorSketch", "dense_buckets", "tensor_sketch_matrix"]

_SEED_MASK = (1 << 63) - 1


def _seed(*parts: int) -> int:
    text = ("tensorsketch," + ",".join(str(int(p)) for p in parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _SEED_MASK


class TensorSketch:
    """Sketch ``k``-dimensional features of factored linear-layer gradients.

    Args:
        proj_dim: ``k``, the sketch dimension.
        seed: base seed; ``ensemble_id`` of :meth:`project` selects an independent
            sketch (one per checkpoint in TRAK).

    ``project(factors, ensemble_id)`` takes ``[(A_l (B, d_in_l), D_l (B, d_out_l))]``
    and returns ``(B, k)``, the sketch of ``[vec(D_1 (x) A_1), vec(D_2 (x) A_2), ...]``
    with ``vec(D (x) A)[o * d_in + j] = D[o] A[j]`` (row-major outer product).
    """

    def __init__(self, proj_dim: int, seed: int = 0) -> None:
        if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim < 1:
            msg = f"proj_dim={proj_dim!r} must be a positive int (the sketch dimension)."
            raise DattriValueError(msg)
        self.proj_dim, self.seed = proj_dim, int(seed)
        self._hashes: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def hashes(self, ensemble_id: int, layer: int, side: int, size: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets ``(size,)`` in ``[0, k)`` and signs ``(size,)`` of one factor
        (``side`` 0: the input ``a``, 1: the output gradient ``d``)."""
        key = (ensemble_id, layer, side, size)
        if key not in self._hashes:
            gen = torch.Generator().manual_seed(_seed(self.seed, ensemble_id, layer, side, size))
            bucket = torch.randint(0, self.proj_dim, (size,), generator=gen)
            sign = torch.randint(0, 2, (size,), generator=gen).mul_(2).sub_(1)
            self._hashes[key] = (bucket, sign)
        bucket, sign = self._hashes[key]
        return bucket.to(device), sign.to(device)

    def _count_sketch(self, x: torch.Tensor, ensemble_id: int, layer: int, side: int) -> torch.Tensor:
        bucket, sign = self.hashes(ensemble_id, layer, side, x.shape[1], x.device)
        out = x.new_zeros(x.shape[0], self.proj_dim)
        return out.index_add_(1, bucket, x * sign.to(x.dtype))

    def project(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                ensemble_id: int = 0) -> torch.Tensor:
        """``(B, k)`` sketch of the per-example gradients given by ``factors``."""
        if not factors:
            msg = "factors must hold at least one (A, D) pair of a linear layer."
            raise DattriValueError(msg)
        k, spec = self.proj_dim, None
        for layer, (a, d) in enumerate(factors):
            if a.dim() != 2 or d.dim() != 2 or a.shape[0] != d.shape[0]:
                msg = (f"factors[{layer}]: expected A (B, d_in) and D (B, d_out) with the "
                       f"same B, got {tuple(a.shape)} and {tuple(d.shape)}.")
                raise DattriValueError(msg)
            fa = torch.fft.rfft(self._count_sketch(a, ensemble_id, layer, 0), n=k)
            fd = torch.fft.rfft(self._count_sketch(d, ensemble_id, layer, 1), n=k)
            spec = fa * fd if spec is None else spec.addcmul_(fa, fd)
        return torch.fft.irfft(spec, n=k)


def dense_buckets(sketch: TensorSketch, layers: Sequence[tuple[int, int, bool, bool]],
                  ensemble_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket and sign of every coordinate of a dense flat gradient, so that
    ``zeros(B, k).index_add_(1, bucket, g * sign)`` equals :meth:`TensorSketch.project`
    of the same gradients' factors (the fallback when factors are unavailable).

    ``layers``: ``(d_in, d_out, weight_selected, bias_selected)`` per ``nn.Linear``
    layer, in the flat layout ``[W (d_out x d_in) row-major, b]`` layer after layer;
    the bias is the ones column appended to the layer input.
    """
    k, buckets, signs = sketch.proj_dim, [], []
    for layer, (d_in, d_out, w_sel, b_sel) in enumerate(layers):
        width = (d_in if w_sel else 0) + (1 if b_sel else 0)
        ha, sa = sketch.hashes(ensemble_id, layer, 0, width, torch.device("cpu"))
        hd, sd = sketch.hashes(ensemble_id, layer, 1, d_out, torch.device("cpu"))
        if w_sel:
            buckets.append((hd[:, None] + ha[None, :d_in]).remainder(k).reshape(-1))
            signs.append((sd[:, None] * sa[None, :d_in]).reshape(-1))
        if b_sel:
            buckets.append((hd + ha[-1]).remainder(k))
            signs.append(sd * sa[-1])
    return torch.cat(buckets), torch.cat(signs)


def tensor_sketch_matrix(sketch: TensorSketch, layer_sizes: Sequence[tuple[int, int]],
                         ensemble_id: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense ``(P, k)`` matrix ``M`` with ``sketch.project(f) = vec(f) @ M``.

    ``layer_sizes`` are ``(d_in, d_out)`` per layer; rows follow the row-major
    outer products ``D (x) A`` layer after layer (``P = sum d_in * d_out``).
    """
    bucket, sign = dense_buckets(sketch, [(i, o, True, False) for i, o in layer_sizes],
                                 ensemble_id)
    m = torch.zeros(bucket.numel(), sketch.proj_dim, dtype=dtype)
    m[torch.arange(bucket.numel()), bucket] = sign.to(dtype)
    return m
