"""Warnings point at the user's line (``dattri._warn.warn_user``), whether the user
called the building block directly or an attributor called it several frames down."""

from __future__ import annotations

import warnings

import torch

from dattri.algorithm import IFAttributorExplicit
from dattri.linalg import GramCholesky, explicit_inverse
from dattri.task import AttributionTask

from cases import loaders, trained_lr


def _caught(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def _task(model) -> AttributionTask:
    def ce(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(out, y)
    return AttributionTask(ce, model, model.state_dict())


def test_direct_calls_warn_at_the_callers_line():
    singular = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    for fn in (lambda: explicit_inverse(singular),
               lambda: GramCholesky(torch.ones(3, 2, dtype=torch.float64))):
        (w,) = _caught(fn)
        assert w.filename == __file__, (w.filename, str(w.message))


def test_an_attributor_warns_at_the_callers_line_not_inside_dattri():
    # the LR's Hessian without its L2 term is singular along the bias direction of
    # the softmax (rows of the weight gradient sum to zero): the explicit inverse at
    # regularization 0 falls back to the pseudo-inverse, five frames inside dattri
    model, _, train, test = trained_lr(40, 4, classes=3, dim=6)

    tr, te = loaders(train, test)
    att = IFAttributorExplicit(_task(model), regularization=0.0)
    caught = _caught(lambda: att.cache(tr).attribute(tr, te))
    assert caught, "the singular Hessian must warn"
    assert {w.filename for w in caught} == {__file__}, [(w.filename, w.lineno) for w in caught]


def test_a_warning_at_the_end_of_a_with_block_points_at_the_call():
    """IF-CG's non-convergence warning is given when the call's
    ``summarize_unconverged`` block ends (in ``contextlib``'s exit): it still points
    at the user's line, not at contextlib."""
    from dattri.algorithm import IFAttributorCG

    model, _, train, test = trained_lr(40, 4, classes=3, dim=6)

    tl, sl = loaders(train, test)
    att = IFAttributorCG(_task(model), max_iter=1, regularization=1e-3).cache(tl)
    caught = [w for w in _caught(lambda: att.attribute(tl, sl))
              if "did not converge" in str(w.message)]
    assert len(caught) == 1
    assert caught[0].filename == __file__, caught[0].filename
