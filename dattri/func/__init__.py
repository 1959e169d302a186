"""Pure kernels built on ``torch.func``: HVP/IHVP, Fisher products, projections.

Submodules: :mod:`dattri.func.hessian`, :mod:`dattri.func.fisher`,
:mod:`dattri.func.projection`, :mod:`dattri.func.utils`.
"""
