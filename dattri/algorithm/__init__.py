"""Attribution methods behind one API: ``cache(train_loader)``,
``attribute(train_loader, test_loader) -> (n_train, n_test)`` and
``self_attribute(train_loader) -> (n_train,)``.
"""

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.block_projected_if import BlockProjectedIFAttributor
from dattri.algorithm.datainf import IFAttributorDataInf
from dattri.algorithm.dvemb import DVEmbAttributor
from dattri.algorithm.ekfac import IFAttributorEKFAC
from dattri.algorithm.factgrass import FactGraSSAttributor
from dattri.algorithm.knn_shapley import KNNShapleyAttributor
from dattri.algorithm.logra import LoGraAttributor
from dattri.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from dattri.algorithm.rps import RPSAttributor
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor

__all__ = [
    "BaseAttributor",
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorExplicit",
    "IFAttributorLiSSA",
    "RPSAttributor",
    "TRAKAttributor",
    "TracInAttributor",
]
__all__ += [
    "BlockProjectedIFAttributor",
    "DVEmbAttributor",
    "FactGraSSAttributor",
    "IFAttributorDataInf",
    "IFAttributorEKFAC",
    "KNNShapleyAttributor",
    "LoGraAttributor",
]
