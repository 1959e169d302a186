"""dattri: efficient training-data attribution for PyTorch."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

if "scipy.linalg" not in _sys.modules:
    # scipy's OpenBLAS (TRAK's float64 Gram matrix and Cholesky factor) keeps its
    # worker threads spinning for ~2^28 cycles (~0.1 s) after every call before they
    # sleep. Interleaved with torch's own thread pool on a few cores, that spin steals
    # the cores torch needs next (2 cores: a float32 matmul right after a dsfrk
    # 0.21 s instead of 0.15 s; TRAK-10 on the MNIST MLP 13.4 s -> 12.5 s). 2^4 cycles
    # parks them at once; BLAS-3 calls do not notice the wake-up. OpenBLAS reads the
    # variable when it loads, so this only acts if scipy.linalg is imported after
    # dattri; a value the user set is kept.
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
