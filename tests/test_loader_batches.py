"""dattri._loader.batches: the index_select path for DataLoaders over TensorDatasets
yields exactly the batches of iterating the loader; other loaders are left alone."""

from __future__ import annotations

import pytest
import torch
from torch.utils import data as tud

from dattri._loader import _TensorBatches, batches


def _same(loader) -> None:
    want, got = list(loader), list(batches(loader))
    assert len(got) == len(want) == len(batches(loader))
    for a, b in zip(want, got):
        assert type(a) is type(b) and len(a) == len(b)
        for s, t in zip(a, b):
            assert s.dtype == t.dtype and s.shape == t.shape and torch.equal(s, t)


def _data(n: int = 23):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g),
            torch.rand(n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("batch_size", [1, 5, 23, 64])
@pytest.mark.parametrize("drop_last", [False, True])
def test_tensor_dataset_batches_equal_the_loader(batch_size, drop_last):
    x, y, w = _data()
    for ds in (tud.TensorDataset(x, y, w), tud.TensorDataset(x),
               tud.Subset(tud.TensorDataset(x, y), [7, 3, 3, 22, 0, 11, 5, 19])):
        loader = tud.DataLoader(ds, batch_size=batch_size, drop_last=drop_last)
        assert isinstance(batches(loader), _TensorBatches)
        _same(loader)


def test_a_fixed_index_order_and_a_batch_sampler_list():
    x, y, _ = _data()
    ds = tud.TensorDataset(x, y)
    _same(tud.DataLoader(ds, batch_size=4, sampler=[9, 2, 2, 17, 0, 4, 13]))
    _same(tud.DataLoader(ds, batch_sampler=[[3, 1], [0], [22, 21, 20]]))
    _same(tud.DataLoader(x[:, 0, 0], batch_size=6))  # not a TensorDataset: as it is


def test_other_loaders_are_returned_as_they_are():
    x, y, _ = _data()
    ds = tud.TensorDataset(x, y)
    others = [
        tud.DataLoader(ds, batch_size=4, collate_fn=lambda b: b),
        tud.DataLoader(ds, batch_size=4, num_workers=1),
        tud.DataLoader(ds, batch_size=None),
        tud.DataLoader(tud.ConcatDataset([ds, ds]), batch_size=4),
        [(x[:3], y[:3])],
    ]
    for loader in others:
        assert batches(loader) is loader


def test_one_rank_s_part_of_a_loader():
    from dattri.distributed import Shard, shard_loader

    x, y, _ = _data()
    loader = tud.DataLoader(tud.TensorDataset(x, y), batch_size=4)
    part = shard_loader(loader, Shard(rank=1, world=2, group=None))
    assert isinstance(batches(part), _TensorBatches)
    _same(part)
