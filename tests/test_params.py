"""Tests of dattri.params.projection: defaults, validation, unknown fields, kwargs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dattri.errors import DattriValueError
from dattri.func.projection import random_project
from dattri.params.projection import (
    DVEmbProjectionParams,
    FactGrassProjectionParams,
    LoGraProjectionParams,
    RandomProjectionParams,
    TracInProjectionParams,
    TRAKProjectionParams,
)

ALL = [TracInProjectionParams, TRAKProjectionParams, LoGraProjectionParams,
       FactGrassProjectionParams, RandomProjectionParams, DVEmbProjectionParams]


@pytest.mark.parametrize(
    ("cls", "dim", "batch", "ptype"),
    [
        (TracInProjectionParams, 512, 32, "normal"),
        (TRAKProjectionParams, 512, 32, "normal"),
        (LoGraProjectionParams, 4096, 64, "normal"),
        (FactGrassProjectionParams, 4096, 64, "normal"),
        (RandomProjectionParams, 512, 32, "normal"),
        (DVEmbProjectionParams, None, 64, "identity"),
    ],
)
def test_defaults(cls, dim, batch, ptype):
    p = cls()
    assert (p.proj_dim, p.proj_max_batch_size, p.proj_seed, p.proj_type) == (dim, batch, 0, ptype)


@pytest.mark.parametrize("cls", ALL)
def test_unknown_field_is_named_with_valid_fields(cls):
    with pytest.raises(DattriValueError, match=r"unknown field\(s\) \['proj_dimension'\].*valid fields.*proj_seed"):
        cls(proj_dimension=3)
    with pytest.raises(DattriValueError, match="unknown field"):
        cls.from_dict({"proj_type": "normal", "seed": 1})


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("proj_max_batch_size", 0, "proj_max_batch_size must be a positive int, got 0"),
        ("proj_max_batch_size", 2.5, "proj_max_batch_size must be a positive int, got 2.5"),
        ("proj_seed", -3, "proj_seed must be an int >= 0, got -3"),
        ("proj_seed", "0", "proj_seed must be an int >= 0, got '0'"),
        ("proj_type", "gaussian", r"proj_type must be one of \['identity'.*got 'gaussian'"),
        ("proj_dim", 0, "must be a positive int, got 0"),
        ("proj_dim", True, "must be a positive int, got True"),
    ],
)
def test_bad_values_name_field_and_value(cls, field, value, match):
    with pytest.raises(DattriValueError, match=match):
        cls(**{field: value})


def test_valid_values_and_literal_types():
    for t in ["identity", "normal", "rademacher", "sjlt", "random_mask", "grass"]:
        assert TRAKProjectionParams(proj_type=t).proj_type == t
    p = TRAKProjectionParams(2048, 16, 3, "sjlt")
    assert p.to_dict() == {"proj_dim": 2048, "proj_max_batch_size": 16, "proj_seed": 3, "proj_type": "sjlt"}
    assert TRAKProjectionParams.from_dict(p.to_dict()) == p
    assert dataclasses.replace(p, proj_dim=64).proj_dim == 64
    with pytest.raises(DattriValueError, match="at most 4 positional"):
        TRAKProjectionParams(1, 2, 3, "normal", "cpu")


def test_per_layer_alias():
    p = LoGraProjectionParams(proj_dim=256)
    assert p.proj_dim_per_layer == 256 and p.proj_dim == 256
    assert FactGrassProjectionParams(proj_dim_per_layer=128).proj_dim == 128
    with pytest.raises(DattriValueError, match="not both"):
        LoGraProjectionParams(proj_dim=2, proj_dim_per_layer=3)
    with pytest.raises(DattriValueError, match="proj_dim_per_layer must be a positive int, got -1"):
        FactGrassProjectionParams(proj_dim_per_layer=-1)


def test_random_projection_params_device_and_kwargs():
    p = RandomProjectionParams(proj_dim=16, proj_max_batch_size=4, device=torch.device("cpu"))
    assert p.device == "cpu"
    kwargs = p.as_kwargs()
    assert kwargs == {"proj_dim": 16, "proj_max_batch_size": 4, "proj_seed": 0,
                      "proj_type": "normal", "device": "cpu"}
    with pytest.raises(DattriValueError, match="device must be a torch device.*'gpu0'"):
        RandomProjectionParams(device="gpu0")
    with pytest.raises(DattriValueError, match="feature_batch_size must be a positive int, got 0"):
        RandomProjectionParams(feature_batch_size=0)


def test_as_kwargs_drive_random_project():
    x = torch.randn(6, 40, dtype=torch.float64)
    for params in (TRAKProjectionParams(proj_dim=8, proj_type="rademacher"),
                   RandomProjectionParams(proj_dim=8, proj_type="rademacher")):
        kwargs = params.as_kwargs(device="cpu")
        y = random_project(x, 6, **kwargs)(x, ensemble_id=1)
        assert y.shape == (6, 8)
        assert (y.abs() > 0).any()
    assert "device" not in TracInProjectionParams().as_kwargs()
