"""Warnings that point at the user's line.

A fixed ``stacklevel`` is right for one call path only: a solver's warning raised
from ``cg_solve`` called by a researcher is one frame up, the same warning raised
while an attributor's ``attribute`` runs is five or more frames up, inside dattri.
:func:`warn_user` attributes the warning to the first frame outside the package
(the user's call), whichever path led there.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep
#: frames passed through on the way out (a warning raised when a ``with`` block of
#: dattri's ends runs in ``contextlib``'s ``__exit__``)
_TRANSPARENT = (os.path.realpath(contextlib.__file__),)


def _inside(filename: str) -> bool:
    return filename.startswith(_PACKAGE) or os.path.realpath(filename) in _TRANSPARENT


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first caller outside dattri (the
    outermost dattri frame when there is none, e.g. ``python -m dattri``)."""
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and _inside(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
