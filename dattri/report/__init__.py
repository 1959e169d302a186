"""Reports: a self-contained HTML page of each test example's proponents and opponents.

``write_report(path, topk, train_dataset, test_dataset, ...)`` renders the top-k
training examples of highest and lowest score of every chosen test example, per
modality (images, character windows, piano rolls, any tensor, or a user's render
function), under a summary (method, checkpoints, metric values, the noisy-label
ranking). The ranking comes from a score matrix read in blocks, from the shards
of a sharded run, from training features cached on disk (:mod:`dattri.store`),
or from an attributor on the shown test examples only
(:mod:`dattri.report.topk`), so no full score matrix is needed.
The benchmark's page (``dattri report``, ``dattri bench``) is
:mod:`dattri.report.bench`. This package imports torch, numpy and matplotlib only.
"""

from dattri.report.page import render_report, write_report
from dattri.report.render import (
    GenericRenderer,
    ImageRenderer,
    PianoRollRenderer,
    TextRenderer,
    custom,
    default_renderer,
    piano_roll,
    png_data_uri,
)
from dattri.report.topk import (
    TopK,
    merge_topk,
    topk_from_attributor,
    topk_from_blocks,
    topk_from_scores,
    topk_from_store,
)

__all__ = [
    "GenericRenderer",
    "ImageRenderer",
    "PianoRollRenderer",
    "TextRenderer",
    "TopK",
    "custom",
    "default_renderer",
    "merge_topk",
    "piano_roll",
    "png_data_uri",
    "render_report",
    "topk_from_attributor",
    "topk_from_blocks",
    "topk_from_scores",
    "topk_from_store",
    "write_report",
]
