"""``dattri.metric.britteness``: the published (misspelled) module name of
:mod:`dattri.metric.brittleness`, kept so that published imports work."""

from dattri.metric.brittleness import *  # noqa: F403
from dattri.metric.brittleness import __all__  # noqa: F401
