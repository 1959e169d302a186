"""Block-wise projected influence (the published ``dattri.algorithm.block_projected_if``)."""

from dattri.algorithm.block_projected_if.block_projected_if import BlockProjectedIFAttributor

__all__ = ["BlockProjectedIFAttributor"]
