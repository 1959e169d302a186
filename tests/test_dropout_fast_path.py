"""Dropout ensembles keep the factored nn.Linear fast path (one mask per member)."""

from __future__ import annotations

import torch
from cases import MLP, digits, loaders
from dist_cases import _margin

from dattri.algorithm import TRAKAttributor
from dattri.model_util.dropout import activate_dropout
from dattri.task import AttributionTask


def test_active_dropout_keeps_the_factored_path_and_its_scores():
    train, test = digits(30, 5, classes=3, dim=8)
    torch.manual_seed(0)
    model = MLP(8, 6, 3, p=0.3).double()
    activate_dropout(model, dropout_prob=0.3)
    margin, prob = _margin(model)
    task = AttributionTask(loss_func=margin, model=model, checkpoints=[model.state_dict()] * 3)
    tr, te = loaders(train, test, bs_train=10)
    proj = {"proj_dim": 8, "proj_type": "normal", "proj_seed": 1}
    fast = TRAKAttributor(task, prob, proj_params=proj, regularization=1e-3)
    assert fast.train_features.factored_ok(next(iter(tr)), 0)  # checked against autograd
    dense = TRAKAttributor(task, prob, proj_params=proj, regularization=1e-3)
    dense.train_features.use_factored = dense.test_features.use_factored = False
    got, want = fast.cache(tr).attribute(te), dense.cache(tr).attribute(te)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # three members, three masks: not one model repeated
    members = [fast.train_features.grads(next(iter(tr)), c) for c in range(3)]
    assert not torch.allclose(members[0], members[1])
