"""Where cached training features live: ``offload="none" | "cpu" | "disk"`` (private).

A :class:`FeatureStore` takes feature rows batch by batch and gives them back in
blocks on the compute device:

- ``"none"``: kept on the compute device;
- ``"cpu"``: kept in host memory, each block moved to the device when read;
- ``"disk"``: appended to a raw float file in ``cache_dir`` and read back through a
  ``numpy.memmap`` in blocks of ``chunk_size`` batches, so at most one block is in
  memory at a time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from dattri.errors import DattriValueError

__all__ = ["OFFLOADS", "FeatureStore"]

OFFLOADS = ("none", "cpu", "disk")


class FeatureStore:
    """Rows ``(n, d)`` of cached features.

    Args:
        offload: ``"none"``, ``"cpu"`` or ``"disk"``.
        device: the compute device blocks are returned on.
        cache_dir: folder of the memory-mapped file (``offload="disk"`` only).
        chunk_size: batches per block when reading back.
        name: file name stem (one store per checkpoint).
    """

    def __init__(self, offload: str, device: torch.device, cache_dir: str | os.PathLike | None = None,
                 chunk_size: int = 16, name: str = "features") -> None:
        check_offload(offload, cache_dir, chunk_size)
        self.offload, self.device, self.chunk_size = offload, device, int(chunk_size)
        self._parts: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self.dim: int | None = None
        self.dtype: torch.dtype | None = None
        self.path: str | None = None
        if offload == "disk":
            os.makedirs(cache_dir, exist_ok=True)
            fd, self.path = tempfile.mkstemp(prefix=f"{name}-", suffix=".bin", dir=os.fspath(cache_dir))
            os.close(fd)

    @property
    def n(self) -> int:
        """Rows stored."""
        return sum(self._sizes)

    def append(self, rows: torch.Tensor) -> None:
        """Store the rows of one batch."""
        rows = rows.detach()
        if self.dim is None:
            self.dim, self.dtype = rows.shape[1], rows.dtype
        if self.offload == "disk":
            with open(self.path, "ab") as f:
                f.write(rows.to("cpu", torch.float64 if rows.dtype == torch.float64
                                else torch.float32).numpy().tobytes())
        else:
            self._parts.append(rows if self.offload == "none" else rows.to("cpu"))
        self._sizes.append(rows.shape[0])

    def blocks(self) -> Iterator[torch.Tensor]:
        """The stored rows, in order, in blocks on the compute device."""
        step = max(1, self.chunk_size)
        if self.offload != "disk":
            for i in range(0, len(self._parts), step):
                yield torch.cat(self._parts[i:i + step]).to(self.device)
            return
        if not self._sizes:
            return
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        mm = np.memmap(self.path, dtype=np_dtype, mode="r", shape=(self.n, self.dim))
        start = 0
        for i in range(0, len(self._sizes), step):
            rows = sum(self._sizes[i:i + step])
            block = torch.from_numpy(np.array(mm[start:start + rows]))
            start += rows
            yield block.to(self.device, self.dtype)
        del mm

    def close(self) -> None:
        """Delete the file (``"disk"``) or drop the rows."""
        self._parts = []
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass


def check_offload(offload: object, cache_dir: object, chunk_size: object) -> None:
    """Typed errors for the offload settings."""
    if offload not in OFFLOADS:
        msg = f"offload={offload!r} must be one of {OFFLOADS}."
        raise DattriValueError(msg)
    if offload == "disk" and cache_dir is None:
        msg = ("offload='disk' keeps the cached features in a memory-mapped file: pass "
               "cache_dir= a folder for it.")
        raise DattriValueError(msg)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        msg = f"chunk_size={chunk_size!r} must be an int >= 1 (batches per block read back)."
        raise DattriValueError(msg)
