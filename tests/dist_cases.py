"""Attributions computed by one process and by the ranks of a gloo group
(``tests/test_distributed.py``); run as a script, it is one rank of such a group.

    python tests/dist_cases.py RANK WORLD PORT OUT_DIR

Every rank writes ``OUT_DIR/rank{RANK}.pt``: ``{case: tensor}``.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import MLP, digits, l2_loss_factory, loaders  # noqa: E402

from dattri.algorithm import (  # noqa: E402
    DVEmbAttributor,
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
    KNNShapleyAttributor,
    LoGraAttributor,
    RPSAttributor,
    TracInAttributor,
    TRAKAttributor,
)
from dattri.task import AttributionTask  # noqa: E402

#: 46 training examples in 5 batches of 10 (the last one 6): 3 batches for rank 0,
#: 2 for rank 1 of two, so the ranks hold unequal parts
N_TRAIN, BATCH = 46, 10
LISSA_DEPTH, LISSA_BATCH = 20, 5


def lissa_draws(n: int = N_TRAIN, seed: int = 0) -> list[torch.Tensor]:
    """The minibatches IFAttributorLiSSA(seed=0) draws (its documented recipe)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=gen)[:LISSA_BATCH] for _ in range(LISSA_DEPTH)]


def _setup():
    train, test = digits(N_TRAIN, 7, classes=3, dim=12)
    torch.manual_seed(0)
    model = MLP(12, 6, 3).double()
    loss = l2_loss_factory(model)
    # two checkpoints: the initial weights and a few gradient steps later
    ckpts = [{k: v.clone() for k, v in model.state_dict().items()}]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        loss(dict(model.named_parameters()), train).backward()
        opt.step()
    ckpts.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, loss, ckpts, train, test


def _margin(model):
    def margin(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        p = torch.softmax(out, -1).gather(1, y[:, None]).squeeze(1)
        return (torch.log(p) - torch.log1p(-p)).mean()

    def prob(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        return torch.softmax(out, -1).gather(1, y[:, None]).squeeze(1)

    return margin, prob


#: the minibatches of the SGD trajectory DVEmb replays: rows 0-29 are rank 0's, 30-45
#: rank 1's of two; steps on both ranks, on rank 1 only and on rank 0 only
DVEMB_STEPS = [[0, 33, 12, 45, 7], [31, 38, 44], [2, 3, 29, 17], [30, 1, 40, 9, 22, 36],
               [5, 6, 8], [41, 11, 33, 0]]


def _trajectory(model, loss, train):
    """Checkpoints before each SGD step of :data:`DVEMB_STEPS`, then the final model."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ckpts, steps = [], []
    x, y = train
    for t, idx in enumerate(DVEMB_STEPS):
        lr = 0.4 / (1 + t)
        ckpts.append({k: v.clone() for k, v in params.items()})
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        gs = torch.autograd.grad(loss(p, (x[idx], y[idx])), list(p.values()))
        params = {k: (v - lr * g).detach() for (k, v), g in zip(params.items(), gs)}
        steps.append((idx, lr))
    ckpts.append(params)
    return ckpts, steps


def run_all(cache_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every case's scores (equal, float64, up to summation order, for any world
    size) and the training rows each sharded attributor held on this rank."""
    model, loss, ckpts, train, test = _setup()
    tr, te = loaders(train, test, bs_train=BATCH, bs_test=4)
    last = AttributionTask(loss_func=loss, model=model, checkpoints=ckpts[-1])
    both = AttributionTask(loss_func=loss, model=model, checkpoints=ckpts)
    margin, prob = _margin(model)
    trak_task = AttributionTask(loss_func=margin, model=model, checkpoints=ckpts)
    out: dict[str, torch.Tensor] = {}

    grad_dot = TracInAttributor(last, weight_list=[1.0], normalized_grad=False)
    out["grad_dot"] = grad_dot.attribute(tr, te)
    out["grad_dot_self"] = grad_dot.self_attribute(tr)
    tracin = TracInAttributor(both, weight_list=[0.3, 0.7], normalized_grad=True,
                              proj_params={"proj_dim": 16, "proj_type": "normal", "proj_seed": 1})
    out["tracin_cos_projected"] = tracin.attribute(tr, te)

    # k = 20 < n = 46: the primal Gram summed over ranks; identity (k = 129 > n): dual
    trak = TRAKAttributor(trak_task, prob, regularization=1e-3,
                          proj_params={"proj_dim": 20, "proj_type": "normal", "proj_seed": 0})
    out["trak_primal"] = trak.cache(tr).attribute(te)
    out["trak_primal_self"] = trak.self_attribute(tr)
    trak_dual = TRAKAttributor(trak_task, prob, regularization=1e-3,
                               proj_params={"proj_type": "identity"}).cache(tr)
    out["trak_dual"] = trak_dual.attribute(tr, te)
    out["trak_dual_self"] = trak_dual.self_attribute(tr)
    # features on disk (one store per checkpoint and rank), rankings merged over ranks
    trak_disk = TRAKAttributor(trak_task, prob, regularization=1e-3, offload="disk",
                               cache_dir=os.path.join(cache_dir, "trak"),
                               proj_params={"proj_dim": 20, "proj_type": "normal", "proj_seed": 0})
    out["trak_disk"] = trak_disk.cache(tr).attribute(te)
    top = trak_disk.attribute(te, top_k=5)
    out["trak_top5"], out["trak_top5_scores"] = top.proponents, top.proponent_scores
    out["trak_bottom5"], out["trak_bottom5_scores"] = top.opponents, top.opponent_scores
    tracin_disk = TracInAttributor(both, weight_list=[0.3, 0.7], normalized_grad=False,
                                   offload="disk", cache_dir=os.path.join(cache_dir, "tracin"))
    top = tracin_disk.cache(tr).attribute(tr, te, top_k=4)
    out["tracin_top4"], out["tracin_top4_scores"] = top.proponents, top.proponent_scores

    # regularization 0.1 > 0.084 = -(the least eigenvalue of H): a positive definite
    # system, so CG converges (an indefinite one amplifies the summation order)
    cg = IFAttributorCG(last, max_iter=60, tol=1e-12, regularization=0.1).cache(tr)
    out["cg"] = cg.attribute(tr, te)
    out["cg_self"] = cg.self_attribute(tr)
    out["cg_relatif"] = cg.attribute(tr, te, relatif_method="l")
    # blocked top-k: the test side solved once, each rank's batches ranked, merged
    _top(out, "cg", cg.attribute(tr, te, top_k=5), out["cg"])
    # the last layer alone: Kronecker products (+ the loss's weight decay), summed over ranks
    cg_fc2 = IFAttributorCG(last, layer_name=["fc2.weight", "fc2.bias"], max_iter=60, tol=1e-12,
                            regularization=0.1).cache(tr)
    assert type(cg_fc2._state[0]).__name__ == "_KroneckerMatmat"
    out["cg_fc2"] = cg_fc2.attribute(tr, te)
    out["explicit"] = IFAttributorExplicit(last, regularization=0.1).cache(tr).attribute(tr, te)
    arnoldi = IFAttributorArnoldi(last, proj_dim=10, max_iter=40, precompute_data_ratio=0.6,
                                  regularization=0.1).cache(tr)
    out["arnoldi"] = arnoldi.attribute(tr, te)
    # each rank keeps its own rows of the projected gradients on disk
    arnoldi_disk = IFAttributorArnoldi(last, proj_dim=10, max_iter=40, precompute_data_ratio=0.6,
                                       regularization=0.1, offload="disk",
                                       cache_dir=os.path.join(cache_dir, "arnoldi")).cache(tr)
    out["arnoldi_disk"] = arnoldi_disk.attribute(tr, te)
    _top(out, "arnoldi_disk", arnoldi_disk.attribute(tr, te, top_k=5), out["arnoldi_disk"])

    ekfac_task = AttributionTask(loss_func=loss, model=model, checkpoints=ckpts[-1])
    ekfac = IFAttributorEKFAC(ekfac_task, damping=0.1).cache(tr)
    out["ekfac"] = ekfac.attribute(tr, te)
    out["ekfac_self"] = ekfac.self_attribute(tr)
    _top(out, "ekfac", ekfac.attribute(tr, te, top_k=5), out["ekfac"])
    out["ekfac_max_iter"] = IFAttributorEKFAC(ekfac_task, damping=0.1).cache(
        tr, max_iter=4).attribute(tr, te)

    logra = LoGraAttributor(last, damping=0.1,
                            proj_params={"proj_dim": 4, "proj_type": "normal", "proj_seed": 3})
    out["logra"] = logra.cache(tr).attribute(tr, te)
    # minibatches drawn from the whole set: each rank multiplies by the drawn rows it
    # holds, the products are summed (batch_size 5: some draws span both ranks, see
    # LISSA_DRAWS; batch_size 1: each draw sits on one rank)
    lissa = IFAttributorLiSSA(last, recursion_depth=LISSA_DEPTH, batch_size=LISSA_BATCH,
                              damping=0.1, scaling=10.0).cache(tr)
    out["lissa"] = lissa.attribute(tr, te)
    out["lissa_self"] = lissa.self_attribute(tr)
    lissa1 = IFAttributorLiSSA(both, recursion_depth=8, batch_size=1, num_repeat=2,
                               damping=0.1, scaling=10.0)
    out["lissa_bs1"] = lissa1.cache(tr).attribute(tr, te)

    # the Fisher examples are the first ceil(ratio n) of the whole order: 0.8 -> 37
    # (all of rank 0's 30 and 7 of rank 1's), 0.5 -> 23 (rank 1 holds none)
    datainf = IFAttributorDataInf(both, fim_estimate_data_ratio=0.8).cache(tr)
    out["datainf"] = datainf.attribute(tr, te)
    out["datainf_self"] = datainf.self_attribute(tr)
    out["datainf_relatif"] = datainf.attribute(tr, te, relatif_method="theta")
    out["datainf_lambdas"] = torch.tensor(datainf.block_lambdas(1))
    datainf_disk = IFAttributorDataInf(both, fim_estimate_data_ratio=0.8, offload="disk",
                                       cache_dir=os.path.join(cache_dir, "datainf")).cache(tr)
    out["datainf_disk"] = datainf_disk.attribute(tr, te)
    out["datainf_disk_relatif"] = datainf_disk.attribute(tr, te, relatif_method="theta")
    out["datainf_half"] = IFAttributorDataInf(last, regularization=0.05,
                                              fim_estimate_data_ratio=0.5).cache(tr).attribute(tr, te)

    knn = KNNShapleyAttributor(k_neighbors=3).cache(tr)
    out["knn_shapley"] = knn.attribute(tr, te)
    read: list[int] = []  # training examples featurized by this rank

    def features(batch):
        read.append(len(batch[0]))
        return torch.tanh(batch[0][:, :6])

    knn_t = KNNShapleyAttributor(k_neighbors=5, transpose=True, feature_func=features).cache(tr)
    knn_read = sum(read)
    out["knn_shapley_t"] = knn_t.attribute(tr, te)
    knn_disk = KNNShapleyAttributor(k_neighbors=3, offload="disk",
                                    cache_dir=os.path.join(cache_dir, "knn")).cache(tr)
    out["knn_disk"] = knn_disk.attribute(tr, te)
    _top(out, "knn", knn.attribute(tr, te, top_k=5), out["knn_shapley"])
    _top(out, "knn_disk", knn_disk.attribute(tr, te, top_k=5), out["knn_disk"])

    rps_task = AttributionTask(loss_func=nn.functional.cross_entropy, model=model,
                               checkpoints=ckpts[-1])
    rps = RPSAttributor(rps_task, "fc2", l2_strength=0.01).cache(tr)
    out["rps"] = rps.attribute(tr, te)
    out["rps_self"] = rps.self_attribute(tr)
    out["rps_alpha"] = rps.alpha
    rps_disk = RPSAttributor(rps_task, "fc2", l2_strength=0.01, offload="disk",
                             cache_dir=os.path.join(cache_dir, "rps")).cache(tr)
    out["rps_disk"] = rps_disk.attribute(tr, te)
    _top(out, "rps", rps.attribute(tr, te, top_k=5), out["rps"])
    _top(out, "rps_disk", rps_disk.attribute(tr, te, top_k=5), out["rps_disk"])
    # the step gradients of each rank's examples, K's update summed over the ranks
    traj, steps = _trajectory(model, loss, train)
    dv_task = AttributionTask(loss_func=loss, model=model, checkpoints=traj)
    dvemb = DVEmbAttributor(dv_task, steps).cache(tr)
    out["dvemb"] = dvemb.attribute(tr, te)
    out["dvemb_self"] = dvemb.self_attribute(tr)
    out["dvemb_embeddings"] = dvemb.embeddings()
    _top(out, "dvemb", dvemb.attribute(tr, te, top_k=5), out["dvemb"])
    out["dvemb_projected"] = DVEmbAttributor(
        dv_task, steps, proj_params={"proj_dim": 8, "proj_type": "normal"}).cache(tr).attribute(tr, te)
    held = {"trak": trak._phi[0].shape[0], "cg": cg.data.n_local, "ekfac": ekfac.data.n_local,
            "logra": logra._stores[0].n, "lissa": lissa.data.n_local,
            "trak_disk": trak_disk._stores[1].n, "datainf": datainf.data.n_local,
            "knn": knn_read, "rps": rps._held[1] - rps._held[0],
            "dvemb": dvemb._emb.shape[0], "arnoldi_disk": arnoldi_disk._kept[0].n,
            "datainf_disk": datainf_disk._kept[1].n, "knn_disk": knn_disk._kept.n,
            "rps_disk": rps_disk._kept.n}
    return out, held


def _top(out: dict[str, torch.Tensor], name: str, top, full: torch.Tensor) -> None:
    """Record a ranking after checking it (on every rank) against a stable sort of
    the full (gathered) score matrix."""
    desc = torch.sort(full, dim=0, descending=True, stable=True).indices[:5].T
    asc = torch.sort(full, dim=0, stable=True).indices[:5].T
    assert torch.equal(top.proponents, desc) and torch.equal(top.opponents, asc), name
    out[f"{name}_top5"], out[f"{name}_top5_scores"] = top.proponents, top.proponent_scores
    out[f"{name}_bottom5"], out[f"{name}_bottom5_scores"] = top.opponents, top.opponent_scores


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        results, held = run_all(os.path.join(out_dir, "stores"))
        torch.save({"scores": results, "held": held}, os.path.join(out_dir, f"rank{rank}.pt.tmp"))
        os.replace(os.path.join(out_dir, f"rank{rank}.pt.tmp"), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # tear down together (a peer's early exit can abort gloo's thread)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
