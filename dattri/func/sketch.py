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
import math
from collections.abc import Sequence

import torch
from torch import nn

from dattri.errors import DattriValueError

__all__ = ["FactoredSketchSink", "SketchLayout", "TensorSketch", "dense_buckets", "tensor_sketch_matrix"]

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


def _structured_buckets(sketch: TensorSketch, ensemble_id: int, layer: int, d_in: int, d_out: int,
                        w_sel: bool, b_sel: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(bucket, sign)]`` of a structured layer's selected weight (``d_out x d_in``,
    row-major) and bias (the ones column appended to the input), in that order:
    ``h(o, j) = h_d(o) + h_a(j) mod k``, ``s(o, j) = s_d(o) s_a(j)``."""
    k, cpu = sketch.proj_dim, torch.device("cpu")
    ha, sa = sketch.hashes(ensemble_id, layer, 0, (d_in if w_sel else 0) + (1 if b_sel else 0), cpu)
    hd, sd = sketch.hashes(ensemble_id, layer, 1, d_out, cpu)
    out = []
    if w_sel:
        out.append(((hd[:, None] + ha[None, :d_in]).remainder(k).reshape(-1),
                    (sd[:, None] * sa[None, :d_in]).reshape(-1)))
    if b_sel:
        out.append(((hd + ha[-1]).remainder(k), sd * sa[-1]))
    return out


def _count_matrix(bucket: torch.Tensor, sign: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``(P, k)`` matrix of a count sketch (one ``+-1`` per row)."""
    m = torch.zeros(bucket.numel(), k, dtype=dtype)
    m[torch.arange(bucket.numel()), bucket] = sign.to(dtype)
    return m


def dense_buckets(sketch: TensorSketch, layers: Sequence[tuple[int, int, bool, bool]],
                  ensemble_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket and sign of every coordinate of a dense flat gradient, so that
    ``zeros(B, k).index_add_(1, bucket, g * sign)`` equals :meth:`TensorSketch.project`
    of the same gradients' factors (the fallback when factors are unavailable).

    ``layers``: ``(d_in, d_out, weight_selected, bias_selected)`` per ``nn.Linear``
    layer, in the flat layout ``[W (d_out x d_in) row-major, b]`` layer after layer;
    the bias is the ones column appended to the layer input.
    """
    parts = [bs for layer, (d_in, d_out, w_sel, b_sel) in enumerate(layers)
             for bs in _structured_buckets(sketch, ensemble_id, layer, d_in, d_out, w_sel, b_sel)]
    return torch.cat([b for b, _ in parts]), torch.cat([s for _, s in parts])


def tensor_sketch_matrix(sketch: TensorSketch, layer_sizes: Sequence[tuple[int, int]],
                         ensemble_id: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense ``(P, k)`` matrix ``M`` with ``sketch.project(f) = vec(f) @ M``.

    ``layer_sizes`` are ``(d_in, d_out)`` per layer; rows follow the row-major
    outer products ``D (x) A`` layer after layer (``P = sum d_in * d_out``).
    """
    bucket, sign = dense_buckets(sketch, [(i, o, True, False) for i, o in layer_sizes],
                                 ensemble_id)
    return _count_matrix(bucket, sign, sketch.proj_dim, dtype)


#: layer index of the first parameter hashed coordinate by coordinate (see SketchLayout)
_PLAIN_LAYER = 1_000_000


def _structured(module: nn.Module | None) -> bool:
    """A layer whose weight is a matrix ``(d_out, d_in)`` applied at every position:
    ``nn.Linear`` (any input rank) and ungrouped convolutions (``d_in = C_in * K``)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1


class SketchLayout:
    """Where every coordinate of a model's flat per-example gradient goes in a
    :class:`TensorSketch`: the generalisation of :func:`dense_buckets` to any model.

    The weight (and bias) of each ``nn.Linear`` and ungrouped ``nn.Conv1d`` /
    ``nn.Conv2d`` is one structured layer, numbered in the order of the selected
    parameters, with rows ``d_out`` and columns ``d_in`` (``C_in * prod(kernel)``
    for a convolution, the unfolded patch) plus the bias as a column of ones: its
    gradient ``sum_t d_t [a_t, 1]^T`` can be sketched from the factors
    (:class:`FactoredSketchSink`). Every other parameter is hashed coordinate by
    coordinate (a plain count sketch). For a model made of ``nn.Linear`` layers
    the buckets are those of :func:`dense_buckets`, so the two paths agree.

    Args:
        model: the model (module names resolve the parameter names).
        names: the selected parameter names, in the flat layout's order.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        params = dict(model.named_parameters(remove_duplicate=False))
        self.names = list(names)
        self.numels = [int(params[n].numel()) for n in self.names]
        #: module name -> (layer index, d_in, d_out, weight selected, bias selected)
        self.layers: dict[str, tuple[int, int, int, bool, bool]] = {}
        chosen: dict[str, list[bool]] = {}
        for n in self.names:
            mod_name, _, leaf = n.rpartition(".")
            if _structured(modules.get(mod_name)) and leaf in ("weight", "bias"):
                chosen.setdefault(mod_name, [False, False])[leaf == "bias"] = True
        for i, (mod_name, (w, b)) in enumerate(chosen.items()):
            m = modules[mod_name]
            d_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels * math.prod(m.kernel_size)
            d_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            self.layers[mod_name] = (i, d_in, d_out, w, b)

    def buckets(self, sketch: TensorSketch, ensemble_id: int,
                names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket and sign ``(P,)`` of every coordinate of the parameters ``names``
        (default all), in the layout's order, so that
        ``zeros(B, k).index_add_(1, bucket, g * sign)`` sketches formed gradients."""
        k, cpu, out_b, out_s = sketch.proj_dim, torch.device("cpu"), [], []
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        keep = set(self.names if names is None else names)
        for pos, (n, numel) in enumerate(zip(self.names, self.numels)):
            if n not in keep:
                continue
            mod_name, _, leaf = n.rpartition(".")
            if mod_name in self.layers and leaf in ("weight", "bias"):
                if mod_name not in parts:  # the layer's weight and bias parts, once
                    layer, d_in, d_out, w, b = self.layers[mod_name]
                    parts[mod_name] = _structured_buckets(sketch, ensemble_id, layer, d_in, d_out, w, b)
                bucket, sign = parts[mod_name][0 if leaf == "weight" else -1]
                out_b.append(bucket)
                out_s.append(sign)
            else:
                ha, sa = sketch.hashes(ensemble_id, _PLAIN_LAYER + pos, 0, numel, cpu)
                hd, sd = sketch.hashes(ensemble_id, _PLAIN_LAYER + pos, 1, 1, cpu)
                out_b.append((hd + ha).remainder(k))
                out_s.append(sd * sa)
        if not out_b:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat(out_b), torch.cat(out_s)

    def matrix(self, sketch: TensorSketch, ensemble_id: int = 0,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``(P, k)`` matrix of the sketch (for checks)."""
        return _count_matrix(*self.buckets(sketch, ensemble_id), sketch.proj_dim, dtype)


def _signed(bucket: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    """``bucket + k [sign < 0]``: the column of a count sketch taken into ``2k``
    columns, positive and negative signs apart (see :func:`_count_sketch_rows`)."""
    return bucket + k * (sign < 0)


def _count_sketch_rows(x: torch.Tensor, bucket2: torch.Tensor, k: int,
                       work: torch.Tensor | None = None) -> torch.Tensor:
    """``(R, k)`` count sketch of each row of ``x`` ``(R, d)``: one ``index_add_`` into
    ``2k`` columns (``bucket2 = bucket + k [sign < 0]``: positive and negative signs
    apart, no signed copy of ``x``), then the difference (contiguous rows: the FFT
    along them is 10x faster than along a strided axis). ``work``: an ``(R, 2k)``
    buffer to reuse (zeroed here; a fresh one costs its page faults every call)."""
    out = x.new_zeros(x.shape[0], 2 * k) if work is None else work.zero_()
    out.index_add_(1, bucket2, x)
    return out[:, :k] - out[:, k:]


class FactoredSketchSink:
    """One batch's :class:`TensorSketch` under a :class:`SketchLayout`, accumulated
    from the layers' factors where that is cheaper than forming their gradients.

    A structured layer's per-example gradient ``sum_t d_t [a_t, 1]^T`` is sketched as
    ``IFFT(sum_t FFT(CS_d(d_t)) * FFT(CS_a([a_t, 1])))``: two count sketches and two
    FFTs per position instead of ``d_out * d_in`` products per position and a scatter
    of ``d_out * d_in`` values per example. :meth:`prefers_factors` compares the two by
    a cost model; the parameters left to the formed path are sketched by
    :meth:`finish` with the layout's buckets, so the result does not depend on the
    choice (up to rounding).

    Args:
        sketch: the :class:`TensorSketch` (``k``, seed).
        layout: the :class:`SketchLayout` of the selected parameters.
        ensemble_id: the sketch's ensemble id (TRAK: the checkpoint).
    """

    #: costs in multiply-adds of a matrix product (~86 G a second on this library's
    #: 2-core CPU), fitted to ResNet-9's layers at batch 16 (dattri's session 13): a
    #: real FFT of length k costs ``FFT_COST * k log2 k``; each factor value at each
    #: position ``FACTOR_COST`` (unfolding, the transposed copy and the count sketch:
    #: ~4.7 ns); each formed gradient value ``SCATTER_COST`` (its scattered addition:
    #: ~0.65 ns). Measured against the model: the 512 x 4,608 convolution at 64
    #: positions 26 ms from factors against 61 ms formed, the 256 x 2,304 one at 256
    #: positions 155 ms against 51 ms
    FFT_COST = 4.0
    FACTOR_COST = 400.0
    SCATTER_COST = 56.0

    def __init__(self, sketch: TensorSketch, layout: SketchLayout, ensemble_id: int) -> None:
        self.sketch, self.layout, self.ensemble_id = sketch, layout, ensemble_id
        self._spec: torch.Tensor | None = None
        self._work: torch.Tensor | None = None  # the count sketches' (R, 2k) scratch
        self._hash2: dict[tuple[int, int], torch.Tensor] = {}
        #: (names, signed buckets) of the formed parameters of the last batch
        self._dense: tuple[tuple[str, ...], torch.Tensor] | None = None
        self._acc: torch.Tensor | None = None  # (B, 2k): add_formed's sum of this batch

    def prefers_factors(self, module_name: str, positions: int) -> bool:
        """Whether sketching layer ``module_name`` from factors at ``positions``
        positions per example costs less than forming and scattering its gradient."""
        if module_name not in self.layout.layers:
            return False
        _, d_in, d_out, _, _ = self.layout.layers[module_name]
        k = self.sketch.proj_dim
        per_position = (2 * self.FFT_COST * k * math.log2(max(k, 2))
                        + self.FACTOR_COST * (d_in + d_out) + 4 * k)
        formed = positions * d_in * d_out + self.SCATTER_COST * d_in * d_out
        return positions * per_position < formed

    def _buckets2(self, layer: int, side: int, size: int, device: torch.device) -> torch.Tensor:
        key = (layer, side, size)
        if key not in self._hash2:
            b, s = self.sketch.hashes(self.ensemble_id, layer, side, size, torch.device("cpu"))
            self._hash2[key] = _signed(b, s, self.sketch.proj_dim).to(device)
        return self._hash2[key]

    def add(self, module_name: str, a: torch.Tensor, d: torch.Tensor) -> None:
        """Add one call of layer ``module_name``: inputs ``a`` ``(B, L, d_in)`` and
        output gradients ``d`` ``(B, L, d_out)`` at ``L`` positions (each example's
        own, e.g. ``B`` times the gradient of a batch mean)."""
        layer, d_in, d_out, w, b = self.layout.layers[module_name]
        k, n, length = self.sketch.proj_dim, a.shape[0], a.shape[1]
        width = (d_in if w else 0) + b
        rows = n * length
        work = self._work
        if work is None or work.shape != (rows, 2 * k) or work.dtype != a.dtype or work.device != a.device:
            work = self._work = torch.empty(rows, 2 * k, dtype=a.dtype, device=a.device)
        cs_d = _count_sketch_rows(d.to(a.dtype).reshape(rows, d_out),
                                  self._buckets2(layer, 1, d_out, a.device), k, work)
        b_a = self._buckets2(layer, 0, width, a.device)
        if w:
            cs_a = _count_sketch_rows(a.reshape(rows, d_in), b_a[:d_in], k, work)
        else:
            cs_a = a.new_zeros(rows, k)
        if b:  # the column of ones: its bucket gets its sign at every position
            last = int(b_a[-1])
            cs_a[:, last % k] += 1.0 if last < k else -1.0
        fa = torch.fft.rfft(cs_a, n=k, dim=1)
        fd = torch.fft.rfft(cs_d, n=k, dim=1)
        spec = (fa.mul_(fd)).reshape(n, length, -1).sum(1)  # (B, k // 2 + 1)
        self._spec = spec if self._spec is None else self._spec.add_(spec)

    def _formed_buckets(self, names: Sequence[str], device: torch.device) -> torch.Tensor:
        """The signed ``2k`` buckets of the formed parameters ``names`` (concatenated in
        the layout's order); those of the last batch are kept."""
        key = tuple(names)
        if self._dense is None or self._dense[0] != key:  # the formed set of the last batch
            bucket, sign = self.layout.buckets(self.sketch, self.ensemble_id, names)
            self._dense = (key, _signed(bucket, sign, self.sketch.proj_dim).to(device))
        return self._dense[1]

    def add_formed(self, part: torch.Tensor, start: int, names: Sequence[str]) -> None:
        """Add columns ``start:start + n`` of the formed gradients ``(B, P_f)`` of the
        parameters ``names``, given as ``part`` ``(B, n)``: a layer's part scattered as
        soon as it is written (still in cache), instead of the whole ``(B, P_f)`` after
        the last layer. :meth:`finish` (with ``formed=None``) adds the sum."""
        k = self.sketch.proj_dim
        work = self._acc
        if work is None:
            work = self._acc = part.new_zeros(part.shape[0], 2 * k)
        buckets = self._formed_buckets(names, part.device)
        work.index_add_(1, buckets[start:start + part.shape[1]], part.to(work.dtype))

    def finish(self, formed: torch.Tensor | None, names: Sequence[str], batch: int,
               like: torch.Tensor) -> torch.Tensor:
        """``(B, k)``: the factored layers' sketch plus that of ``formed`` (``(B, P_f)``,
        the flat gradients of the parameters ``names`` in the layout's order), or of
        the parts given to :meth:`add_formed`."""
        k = self.sketch.proj_dim
        if self._spec is not None:
            out = torch.fft.irfft(self._spec, n=k, dim=1)
        else:
            out = like.new_zeros(batch, k)
        self._spec = None
        if formed is not None and formed.shape[1]:
            out += _count_sketch_rows(formed, self._formed_buckets(names, formed.device), k).to(out.dtype)
        if self._acc is not None:
            acc, self._acc = self._acc, None
            out += (acc[:, :k] - acc[:, k:]).to(out.dtype)
        return out
