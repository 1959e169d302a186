"""Large result buffers in huge pages (private).

A featurizer's result for a batch is large (ResNet-9, batch 16: 16 x 4.83M float32,
309 MB) and written once. Allocated by ``torch.empty``, its memory comes from a
fresh ``mmap`` of 4 KiB pages: 75,000 page faults a batch, each taken while the
result is written (measured here: 69 ms to fill 309 MB fresh against 24 ms to
refill it, on 2 cores). Where the kernel offers transparent huge pages on request
(Linux, ``/sys/kernel/mm/transparent_hugepage/enabled`` at ``madvise`` or
``always``), a private anonymous mapping advised ``MADV_HUGEPAGE`` takes one fault
per 2 MiB instead (38-48 ms for the same fill). PyTorch does this for every large
allocation when the process starts with ``THP_MEM_ALLOC_ENABLE=1``; a library
cannot set that for its user (it is read once, at torch's first allocation), so the
buffers this package allocates itself for its results come from here.

A :class:`HugeBuffer` also tells whether anybody still holds a tensor over it: the
tensor holds an export of the mapping (a Python reference), so the mapping's only
reference being the buffer's own means the result was dropped and the memory can
take the next batch's result, already faulted in.
"""

from __future__ import annotations

import math
import mmap
import sys

import torch

__all__ = ["HUGE_MIN_BYTES", "HugeBuffer", "empty_result"]

#: buffers at least this large (CPU) are mapped in huge pages
HUGE_MIN_BYTES = 8 << 20

_ADVISE = getattr(mmap, "MADV_HUGEPAGE", None)
_PRIVATE = getattr(mmap, "MAP_PRIVATE", None)
_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", None)


def _thp_on_request() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return "[madvise]" in mode or "[always]" in mode


_AVAILABLE = (_ADVISE is not None and _PRIVATE is not None and _ANONYMOUS is not None
              and sys.platform.startswith("linux") and _thp_on_request())


class HugeBuffer:
    """``nbytes`` of private anonymous memory advised into huge pages; tensors over
    it by :meth:`tensor`."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self._map = mmap.mmap(-1, self.nbytes, flags=_PRIVATE | _ANONYMOUS)
        try:
            self._map.madvise(_ADVISE)
        except OSError:  # pragma: no cover - a kernel that refuses: 4 KiB pages then
            pass

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` over the whole buffer (contents as left)."""
        count = math.prod(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=count).view(shape)

    def free(self) -> bool:
        """Whether no tensor over this buffer is alive (views included)."""
        # the references: this object's attribute and getrefcount's own argument;
        # every alive tensor over the mapping holds one more (its buffer export)
        return sys.getrefcount(self._map) <= 2


def empty_result(shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device | str) -> tuple[torch.Tensor, HugeBuffer | None]:
    """``torch.empty(shape)``, in huge pages when it is a large CPU buffer and the
    kernel offers them; also the :class:`HugeBuffer` behind it (else ``None``)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not _AVAILABLE or device.type != "cpu" or nbytes < HUGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device), None
    buf = HugeBuffer(nbytes)
    return buf.tensor(tuple(shape), dtype), buf
