"""The report of a large run: the page from top-k results and from features cached in
a store (no score matrix) equals the page from the full score matrix."""

from __future__ import annotations

import pytest
import torch
from test_report import _check_against_scores, _kind, _parse
from torch import nn
from torch.utils.data import DataLoader, Subset

from dattri.algorithm import TracInAttributor
from dattri.algorithm._engine import Featurizer
from dattri.benchmark.datasets.mnist.data import create_mnist_5k_dataset
from dattri.report import merge_topk, topk_from_scores, topk_from_store, write_report
from dattri.store import (
    FeatureStore,
    featurize_to_store,
    open_store,
    shard_range,
    store_folder,
)
from dattri.task import AttributionTask
from dattri.topk import topk_from_features


@pytest.fixture(scope="module")
def digits():
    ds = create_mnist_5k_dataset()
    return ds.subset(range(0, 5000, 25)), ds.subset(range(3, 5000, 500))  # 200 / 10


class _Fixed:
    """Features that are a fixed table: row ``i`` of the batch's examples."""

    device = torch.device("cpu")

    def __init__(self, table: torch.Tensor) -> None:
        self.table, self.next = table, 0

    def batch(self, b, ckpt):
        rows = self.table[self.next:self.next + len(b[1])]
        self.next += len(b[1])
        return rows


def test_page_from_a_sharded_store_equals_the_page_from_the_full_matrix(tmp_path, digits):
    train, test = digits
    n, m, d, k = len(train), len(test), 6, 5
    g = torch.Generator().manual_seed(4)
    # small-integer float64 features: every inner product is exact, so the pages can be
    # compared character for character (and scores tie often)
    feats = [torch.randint(-3, 4, (n, d), generator=g).double() for _ in range(2)]
    tests = [torch.randint(-3, 4, (m, d), generator=g).double() for _ in range(2)]
    score = (feats[0] @ tests[0].T + feats[1] @ tests[1].T) / 2
    self_inf = (feats[0].pow(2).sum(1) + feats[1].pow(2).sum(1)) / 2
    cols = [7, 0, 3]
    for ckpt in (0, 1):
        for rank in range(3):
            rows = shard_range(n, 3, rank)
            loader = DataLoader(Subset(train, list(rows)), batch_size=16)
            store = open_store(tmp_path, loader, ckpt, shard=rank, settings="fixed",
                               row_offset=rows.start)
            featurize_to_store(_Fixed(feats[ckpt][rows.start:rows.stop]), loader, ckpt, store)
    options = {"method": "Grad-Dot", "self_influence": self_inf, "num_noisy": 6,
               "metrics": {"LDS": 0.5}}
    full = write_report(tmp_path / "full.html", topk_from_scores(score, k, cols), train, test,
                        **options)
    from_store = topk_from_store(tmp_path, [t[cols] for t in tests], k, checkpoints=(0, 1),
                                 test_indices=cols, budget_bytes=7 * d * 8 * 2)  # 7-row blocks
    # one ranking per shard (as each rank would make it), merged afterwards
    def rank_blocks(r):
        stores = [FeatureStore.load(store_folder(tmp_path, c, r)) for c in (0, 1)]
        for a, b in zip(*(s.blocks(rows=5) for s in stores), strict=True):
            yield a[0], [a[1], b[1]]

    per_rank = [topk_from_features(rank_blocks(r), [t[cols] for t in tests], k, test_indices=cols)
                for r in range(3)]
    pages = [full.read_text()]
    for name, top in (("store", from_store), ("merged", merge_topk(per_rank))):
        path = write_report(tmp_path / f"{name}.html", top, train, test, **options)
        pages.append(path.read_text())
        _check_against_scores(_parse(path), score, k, cols)
        assert len(_kind(_parse(path), "self-influence")) == 6
    assert pages[1] == pages[0] and pages[2] == pages[0]


def test_grad_dot_page_from_stored_features_equals_the_attributors_page(tmp_path, digits):
    train, test = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).double()
    train64 = [(x.double(), y) for x, y in train]
    test64 = [(x.double(), y) for x, y in test]
    train_loader, test_loader = DataLoader(train64, batch_size=32), DataLoader(test64, batch_size=32)

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    att = TracInAttributor(task, weight_list=[1.0], normalized_grad=False)
    score = att.attribute(train_loader, test_loader)  # the full (200, 10) Grad-Dot matrix
    # the same method from the low-level pieces: per-example gradients into the store,
    # test gradients in memory, top-k block by block
    train_side = Featurizer(task, "loss", None, torch.device("cpu"))
    featurize_to_store(train_side, train_loader, 0, open_store(tmp_path, train_loader, 0))
    test_side = Featurizer(task, "target", None, torch.device("cpu")).all(test_loader, 0)
    k = 4
    top = topk_from_store(tmp_path, test_side, k, budget_bytes=20 * 7850 * 8)
    ref = topk_from_scores(score, k)
    assert torch.equal(top.proponents, ref.proponents) and torch.equal(top.opponents, ref.opponents)
    torch.testing.assert_close(top.proponent_scores, ref.proponent_scores, rtol=1e-10, atol=0)
    page = _parse(write_report(tmp_path / "p.html", top, train, test, method="Grad-Dot"))
    cards = _kind(page, "proponent")
    assert [int(c["data-train-index"]) for c in cards] == ref.proponents.reshape(-1).tolist()
    shown = torch.tensor([float(c["data-score"]) for c in cards], dtype=torch.float64)
    torch.testing.assert_close(shown, ref.proponent_scores.reshape(-1), rtol=1e-10, atol=0)
