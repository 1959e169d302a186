"""Linear-algebra building blocks: solvers on operators given as callables.

See :mod:`dattri.linalg.solvers` for the formulas.
"""

from dattri.linalg.gram import GramCholesky
from dattri.linalg.operators import (
    BlockDiagonalPreconditioner,
    EigenbasisPreconditioner,
    GramPreconditioner,
    KroneckerEigenPreconditioner,
    Preconditioner,
)
from dattri.linalg.solvers import (
    arnoldi,
    cg_multishift_solve,
    cg_solve,
    explicit_inverse,
    explicit_solve,
    factorize,
    lissa_solve,
)

__all__ = [
    "BlockDiagonalPreconditioner",
    "EigenbasisPreconditioner",
    "GramPreconditioner",
    "KroneckerEigenPreconditioner",
    "Preconditioner",
    "GramCholesky",
    "arnoldi",
    "cg_multishift_solve",
    "cg_solve",
    "explicit_inverse",
    "explicit_solve",
    "factorize",
    "lissa_solve",
]
