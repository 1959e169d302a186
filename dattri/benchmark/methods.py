"""The benchmarked attribution methods: how to build each for a setting, and its search space.

One :class:`MethodSpec` per method of the paper's figures (Table 1, Sec. 4):
IF-Explicit, IF-CG, IF-LiSSA, IF-Arnoldi, TracInCP-10, Grad-Dot, Grad-Cos,
RPS-L2, TRAK-1, TRAK-10, TRAK-50 (``group="paper"``, :data:`PAPER_METHODS`); and
the methods the library ships beyond the paper (``group="new"``): IF-DataInf,
IF-EK-FAC, LoGra, FactGraSS, KNN-Shapley, DVEmb and the dropout ensembles
TRAK-10-dropout / TRAK-50-dropout.
``search_space`` is the hyper-parameter grid of Appendix C.1 (the benchmark
reports the best value over it, with the chosen hyper-parameters; for the new
methods a grid in its style); ``quick_space`` is a documented subset for quick
runs; ``budget_s`` the planned seconds of a whole search on one MNIST setting and
metric at the paper's size on a 2-core CPU (rows over it say so).

Checkpoints (the paper, Sec. 3.3): single-model methods attribute
``models_full[0]``; TRAK-k ensembles ``models_half[:k]`` (the first 50 half-data
models are the ensemble pool); TracInCP-10 sums over ``models_full[:10]`` with the
optimiser's learning rate as weight (10 full-data models of different seeds: the
retraining engine keeps final models, not a training trajectory).

TRAK's projection (recorded with each result) is a TensorSketch of the layer
factors for models made of ``nn.Linear`` layers (MNIST LR and MLP), else Gaussian up
to ``DENSE_PROJECTION_MAX_PARAMS`` parameters and SJLT above.

The new methods: IF-DataInf, IF-EK-FAC, LoGra and FactGraSS attribute
``models_full[0]`` as the IF family does; KNN-Shapley values training points with
the K-nearest-neighbour classifier on the input of the final linear layer of
``models_full[0]`` (the pixels for LR, the 64 hidden features for the MLP); it has
no self-value, so no AUC. DVEmb needs the SGD trajectory of the attributed model:
it replays the training of ``models_full[0]`` (same seed, data order, dropout
masks: the plain loop of :mod:`dattri.model_util.vtrain`, which the vmapped
trainer that made the model matches up to summation order) and records every
step's per-example gradients; only settings trained by that trainer support it
(MNIST LR and MLP), the others report ``n/a``. Each step enters DVEmb with the
trainer's learning rate, as DVEmb (plain SGD) assumes; momentum 0.9 is not folded
in. Folding it (each gradient weighted by its total weight in the final parameters,
:func:`momentum_step_weight`, up to ``lr / (1 - mu)`` = 10 lr) is exact to first
order but makes DVEmb's step-by-step propagation ``(I - w_t G_t)`` overshoot over the
1,580 steps of MNIST LR: measured there (paper size, one run each), folded LDS 0.195
and AUC 0.512 (chance), plain learning rate LDS 0.529 and AUC 0.975. The per-step
gradients are taken without dropout.
TRAK-10-dropout / TRAK-50-dropout (Deng et al. 2024; the paper's Sec. 3.2) are
TRAK's ensemble over 10 / 50 dropout masks of ONE model, ``models_half[0]`` (the
model of TRAK-1, trained on the same half of the data as every TRAK-k member),
with dropout active at the trained rate (:func:`dattri.model_util.dropout.activate_dropout`;
member ``c`` draws its masks from seed ``ENSEMBLE_SEED + c``): a model without
dropout (LR) reports ``n/a``.

Feasibility (the paper's red crosses): a method whose memory or time grows too
fast with the parameter count P is marked infeasible above ``max_params``
(dense Hessian P^2 for IF-Explicit; per-test-vector HVP solves for CG and LiSSA).
``force=True`` in the runner tries anyway.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from dattri.algorithm import (
    DVEmbAttributor,
    FactGraSSAttributor,
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
from dattri.errors import DattriValueError
from dattri.task import AttributionTask

__all__ = [
    "DENSE_PROJECTION_MAX_PARAMS",
    "IF_REGULARIZATION",
    "METHODS",
    "NEW_METHODS",
    "PAPER_METHODS",
    "MethodSpec",
    "get_method",
    "hyper_slug",
    "infeasible_reason",
    "momentum_step_weight",
    "num_parameters",
    "resolve_methods",
    "search_space",
    "trak_projection_type",
]

IF_REGULARIZATION = (1e-1, 1e-2, 5e-3, 1e-3, 1e-4, 1e-5)
#: TRAK projects with a dense Gaussian matrix up to this many parameters and with
#: a sparse JL transform (SJLT) above: a dense p x k block per batch costs 2pk
#: flops per example plus p*k random numbers (16 s per 16 ResNet-9 gradients on
#: a CPU against 0.2 s for SJLT); the published TRAK uses a CUDA projector instead.
DENSE_PROJECTION_MAX_PARAMS = 1_000_000
Builder = Callable[[Mapping[str, Any], Mapping[str, Any], dict], Any]


@dataclass(frozen=True)
class MethodSpec:
    """How to benchmark one attribution method.

    Attributes:
        name: the label of the paper's figures.
        family: ``"IF"``, ``"TracIn"``, ``"RPS"`` or ``"TRAK"``.
        search_space: hyper-parameter dicts of Appendix C.1 (``({},)``: none).
        quick_space: the subset used by ``search="quick"``.
        build: ``(model_details, hyper, context) -> attributor`` (not yet cached).
        checkpoints: ``"full"`` or ``"half"``: where its models come from.
        num_models: checkpoints it needs (1, 10 or 50).
        max_params: feasibility limit on the parameter count (None: none).
        classification_only: needs a final linear classifier (RPS).
        aliases: other accepted names (the published benchmark's).
        max_params_self: feasibility limit for self-influence (the AUC metric), which
            needs one inverse-HVP per *training* example: ten times the test side
            for CG and LiSSA (MNIST MLP: ~25 min per configuration at this CPU's
            matmul rate, against 2.5 min for the 500 test points).
        group: ``"paper"`` (the paper's eleven) or ``"new"`` (beyond the paper).
        budget_s: planned seconds of the whole search for one MNIST setting and
            metric at the paper's size on a 2-core CPU (None: not set); a
            result row whose search took longer is marked ``over_budget``.
        self_influence: the method defines a self-value (needed for AUC).
        needs: ``"dropout"`` (the model must have nn.Dropout layers) or
            ``"trajectory"`` (the setting's training must be replayable); None.
    """

    name: str
    family: str
    search_space: tuple[Mapping[str, Any], ...]
    quick_space: tuple[Mapping[str, Any], ...]
    build: Builder
    checkpoints: str = "full"
    num_models: int = 1
    max_params: int | None = None
    classification_only: bool = False
    aliases: tuple[str, ...] = ()
    max_params_self: int | None = None
    group: str = "paper"
    budget_s: float | None = None
    self_influence: bool = True
    needs: str | None = None


def _grid(**axes: tuple[Any, ...]) -> tuple[dict[str, Any], ...]:
    keys = list(axes)
    return tuple(dict(zip(keys, values)) for values in itertools.product(*axes.values()))


def hyper_slug(hyper: Mapping[str, Any]) -> str:
    """A file-name-safe name of a hyper-parameter dict (``"default"`` when empty)."""
    if not hyper:
        return "default"
    parts = [f"{k}={hyper[k]}" for k in sorted(hyper)]
    return "_".join(parts).replace("/", "-").replace(" ", "")


# ----------------------------------------------------------------------------- builders
def _task(md: Mapping[str, Any], ckpts: Any, loss: Any = None, target: Any = None) -> AttributionTask:
    loss = md["loss_func"] if loss is None else loss
    target = md["target_func"] if target is None else target
    return AttributionTask(loss_func=loss, model=md["model"], checkpoints=ckpts,
                           target_func=None if target is loss else target)


def _if_explicit(md, hyper, ctx):
    # the regularisation search of Appendix C.1 only changes (H + lambda I)^{-1}:
    # one Hessian per setting and model, shared through hessian_store
    store = ctx.setdefault("hessians", {})
    return IFAttributorExplicit(_task(md, md["models_full"][0]), hessian_store=store,
                                device=ctx.get("device", "cpu"), **hyper)


def _if_cg(md, hyper, ctx):
    # CG for (H + lambda I) sees one Krylov space for every lambda: the first
    # configuration runs one multi-shift CG for all of IF_REGULARIZATION, the others
    # take their solution from ctx (held: 7 blocks of n_test x P, 1.5 GB on the MNIST
    # MLP), so that one's "attribute" seconds carry the whole search's CG
    return IFAttributorCG(_task(md, md["models_full"][0]), device=ctx.get("device", "cpu"),
                          shift_store=ctx.setdefault("cg_shifts", {}),
                          shifts=IF_REGULARIZATION, **hyper)


def _if_lissa(md, hyper, ctx):
    return IFAttributorLiSSA(_task(md, md["models_full"][0]), device=ctx.get("device", "cpu"),
                             **hyper)


def _if_arnoldi(md, hyper, ctx):
    # the regularisation only shifts the eigenvalues: one Arnoldi iteration per
    # setting and model, shared through eigen_store
    return IFAttributorArnoldi(_task(md, md["models_full"][0]), device=ctx.get("device", "cpu"),
                               eigen_store=ctx.setdefault("arnoldi_eigen", {}), **hyper)


def _tracin(num: int, normalized: bool) -> Builder:
    def build(md, hyper, ctx):
        ckpts = md["models_full"][:num]
        rate = md["setting"].learning_rate if num > 1 else 1.0
        return TracInAttributor(_task(md, ckpts if num > 1 else ckpts[0]), [rate] * num,
                                normalized, device=ctx.get("device", "cpu"), **hyper)

    return build


def _rps(md, hyper, ctx):
    task = AttributionTask(loss_func=F.cross_entropy, model=md["model"],
                           checkpoints=md["models_full"][0])
    return RPSAttributor(task, md["final_linear_layer_name"], device=ctx.get("device", "cpu"),
                         **hyper)


def trak_projection_type(model: torch.nn.Module) -> str:
    """TRAK's projection in the benchmark: ``"tensorsketch"`` when every trainable
    parameter sits in an ``nn.Linear`` (sketched from the layer factors without
    forming gradients; its inner-product error at k = 2,048 is that of a dense
    Gaussian projection, ``benchmarks/sketch_accuracy.py``), else ``"normal"`` up to
    ``DENSE_PROJECTION_MAX_PARAMS`` parameters, else ``"sjlt"``."""
    linear = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False)}
    if all(id(p) in linear for p in model.parameters() if p.requires_grad):
        return "tensorsketch"
    return "normal" if num_parameters(model) <= DENSE_PROJECTION_MAX_PARAMS else "sjlt"


def _trak_attributor(task: AttributionTask, probability: Any, hyper: Mapping[str, Any],
                     ctx: dict) -> TRAKAttributor:
    proj = {"proj_dim": int(hyper["proj_dim"]), "proj_max_batch_size": 32,
            "proj_seed": 0, "proj_type": trak_projection_type(task.model)}
    return TRAKAttributor(task, probability, proj_params=proj, device=ctx.get("device", "cpu"))


def _trak(num: int) -> Builder:
    def build(md, hyper, ctx):
        ckpts = md["models_half"][:num]
        task = _task(md, ckpts if num > 1 else ckpts[0], md["margin_func"],
                     md["margin_target_func"])
        return _trak_attributor(task, md["correct_probability_func"], hyper, ctx)

    return build


# ----------------------------------------------------------------------------- beyond the paper
def _datainf(md, hyper, ctx):
    return IFAttributorDataInf(_task(md, md["models_full"][0]), device=ctx.get("device", "cpu"),
                               **hyper)


def _ekfac(md, hyper, ctx):
    return IFAttributorEKFAC(_task(md, md["models_full"][0]), device=ctx.get("device", "cpu"),
                             **hyper)


def _block_projected(cls: type) -> Builder:
    """LoGra / FactGraSS: ``damping`` (relative) and ``proj_dim`` per layer."""

    def build(md, hyper, ctx):
        return cls(_task(md, md["models_full"][0]), hessian="eFIM",
                   damping=float(hyper["damping"]), device=ctx.get("device", "cpu"),
                   proj_params={"proj_dim_per_layer": int(hyper["proj_dim"])})

    return build


def _trained_copy(md: Mapping[str, Any], checkpoint: Any) -> torch.nn.Module:
    """A copy of the setting's model with ``checkpoint`` loaded, in eval mode (the
    user-facing ``md["model"]`` is left as it is)."""
    from dattri.benchmark.utils import load_model

    return load_model(checkpoint, lambda: copy.deepcopy(md["model"])).eval()


def _knn_shapley(md, hyper, ctx):
    net = _trained_copy(md, md["models_full"][0])
    final = net.get_submodule(md["final_linear_layer_name"])
    dtype = next(net.parameters()).dtype

    def features(batch: Any) -> torch.Tensor:  # the final linear layer's input
        seen: list[torch.Tensor] = []
        hook = final.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
        try:
            net(batch[0].to(dtype))
        finally:
            hook.remove()
        return seen[0].flatten(1)

    return KNNShapleyAttributor(int(hyper["k_neighbors"]), feature_func=features,
                                device=ctx.get("device", "cpu"))


def _loader_xy(loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*((b[0], b[1]) for b in loader))
    return torch.cat(xs), torch.cat(ys)


def momentum_step_weight(lr: float, momentum: float, steps_left: int) -> float:
    r"""The weight of a step's gradient in the final parameters of SGD with momentum.

    With ``b_t = mu b_{t-1} + g_t`` and ``theta_{t+1} = theta_t - lr b_t`` over ``T``
    steps, ``theta_T = theta_0 - sum_t w_t g_t`` exactly, with
    ``w_t = lr (1 - mu^{T-t}) / (1 - mu)`` (``lr`` for ``mu = 0``); ``steps_left`` is
    ``T - t``. DVEmb's step ``t`` gets learning rate ``w_t``.
    """
    if momentum == 0:
        return float(lr)
    return float(lr) * (1 - momentum**steps_left) / (1 - momentum)


#: relative parameter gap between DVEmb's replayed final model and ``models_full[0]``
#: above which the result carries a note and a warning (the run is not the same one)
REPLAY_RELATIVE_GAP_WARN = 1e-3


class _ReplayedDVEmb:
    """DVEmb on the recorded trajectory of ``models_full[0]`` (see the module docstring).

    ``cache(train_loader)`` replays the model's training with
    :meth:`~dattri.model_util.vtrain.VectorizedTraining.train_one` (seed of
    ``models_full[0]``, loader order = training positions) and records every SGD
    step with ``DVEmbAttributor.cache_gradients``; then the embeddings are formed and
    the attributed model is ``models_full[0]`` itself. ``replay_gap`` is the
    largest parameter difference between the replayed and the cached final model.
    """

    def __init__(self, md: Mapping[str, Any], proj_dim: int, device: Any = "cpu") -> None:
        rec = md["setting"]
        self.md, self.device = md, device
        self.net = _trained_copy(md, md["models_full"][0])  # moved along the trajectory
        task = AttributionTask(loss_func=rec.loss_builder(self.net), model=self.net,
                               checkpoints=md["models_full"][0])
        self.att = DVEmbAttributor(task, proj_params={"proj_dim_per_layer": int(proj_dim),
                                                      "proj_type": "sjlt"}, device=device)
        self.proj_params = {"proj_dim": int(proj_dim), "proj_type": "sjlt", "proj_seed": 0}
        self.replay_gap: float | None = None
        self.replay_relative_gap: float | None = None
        self.bench_notes: list[str] = []

    def _trainer(self) -> Any:
        import dataclasses

        vt = self.md["setting"].vectorized(self.md["size"])
        return dataclasses.replace(vt, device=self.device)

    def cache(self, train_loader: Iterable) -> _ReplayedDVEmb:
        from pathlib import Path

        from dattri.model_util.ensemble import recorded_seed
        from dattri.model_util.retrain import train_seed

        vt = self._trainer()
        x, y = _loader_xy(train_loader)
        seed = recorded_seed(Path(self.md["cache"]["root"]) / "models_full", 0,
                             train_seed(self.md["seed"], 0))
        total = vt.num_steps(x.shape[0])
        final = {k: v.detach().clone() for k, v in self.net.state_dict().items()}

        def record(epoch: int, idx: torch.Tensor, work: torch.nn.Module) -> None:
            self.net.load_state_dict(work.state_dict())
            # plain SGD's rate: see the module docstring (not momentum_step_weight)
            self.att.cache_gradients(epoch, (x[idx], y[idx]), idx, vt.lr)

        replayed = vt.train_one(x, y, range(x.shape[0]), seed, on_step=record)
        self.net.load_state_dict(final)  # the attributed model: models_full[0]
        self.replay_gap = max(float((replayed[k].to(v.dtype) - v).abs().max())
                              for k, v in final.items() if k in replayed)
        scale = max(float(v.abs().max()) for k, v in final.items()
                    if k in replayed and v.is_floating_point())
        self.replay_relative_gap = self.replay_gap / max(scale, 1e-30)
        self.bench_notes = [f"DVEmb: replayed trajectory of {total} SGD steps; its final "
                            f"model differs from models_full[0] by at most {self.replay_gap:.2e}"]
        if self.replay_relative_gap > REPLAY_RELATIVE_GAP_WARN:
            msg = (f"DVEmb: the replay ended {self.replay_relative_gap:.1e} (relative to the "
                   f"largest parameter, above {REPLAY_RELATIVE_GAP_WARN:.0e}) from "
                   f"models_full[0] (likely the plain loop's and the vmapped trainer's summation "
                   f"orders, with float32 rounding amplified over {total} steps); the "
                   f"embeddings are those of the replayed run, scored at models_full[0]")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            self.bench_notes.append(msg)
        self.att.cache()
        return self

    @property
    def is_cached(self) -> bool:
        """Whether ``cache`` has replayed the trajectory (the reports read it)."""
        return self.replay_gap is not None

    def attribute(self, train_loader: Iterable, test_loader: Iterable) -> torch.Tensor:
        return self.att.attribute(test_loader)

    def self_attribute(self, train_loader: Iterable) -> torch.Tensor:
        return self.att.self_attribute(train_loader)


def _dvemb(md, hyper, ctx):
    return _ReplayedDVEmb(md, int(hyper["proj_dim"]), ctx.get("device", "cpu"))


def _trak_dropout(num: int) -> Builder:
    def build(md, hyper, ctx):
        from dattri.model_util.dropout import activate_dropout

        rec = md["setting"]
        net = copy.deepcopy(md["model"])
        rates = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
        activate_dropout(net, dropout_prob=rates[0])  # the trained rate
        margin = rec.margin_builder(net)
        target = rec.margin_target_builder(net) if rec.last_token_target else margin
        task = AttributionTask(loss_func=margin, model=net,
                               checkpoints=[md["models_half"][0]] * num,
                               target_func=None if target is margin else target)
        return _trak_attributor(task, rec.probability_builder(net), hyper, ctx)

    return build


# ----------------------------------------------------------------------------- the registry
_REGS = _grid(regularization=IF_REGULARIZATION)
_QUICK_REGS = _grid(regularization=(1e-2, 1e-3))
_TRAK_SPACE = _grid(proj_dim=(512, 2048))

METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("IF-Explicit", "IF", _REGS, _QUICK_REGS, _if_explicit, max_params=20_000,
               aliases=("if-explicit", "explicit")),
    MethodSpec("IF-CG", "IF", _grid(regularization=IF_REGULARIZATION, max_iter=(10,)),
               _grid(regularization=(1e-2, 1e-3), max_iter=(10,)), _if_cg,
               max_params=2_000_000, max_params_self=20_000, aliases=("if-cg", "cg")),
    MethodSpec("IF-LiSSA", "IF",
               ({"recursion_depth": 500, "batch_size": 10},
                {"recursion_depth": 500, "batch_size": 50}),
               ({"recursion_depth": 500, "batch_size": 50},), _if_lissa,
               max_params=2_000_000, max_params_self=20_000, aliases=("if-lissa", "lissa")),
    MethodSpec("IF-Arnoldi", "IF", _grid(regularization=IF_REGULARIZATION, max_iter=(50,)),
               _grid(regularization=(1e-2,), max_iter=(50,)), _if_arnoldi,
               max_params=20_000_000, aliases=("if-arnoldi", "arnoldi")),
    MethodSpec("TracInCP-10", "TracIn", ({},), ({},), _tracin(10, False), num_models=10,
               aliases=("tracin", "tracincp")),
    MethodSpec("Grad-Dot", "TracIn", ({},), ({},), _tracin(1, False), aliases=("graddot",)),
    MethodSpec("Grad-Cos", "TracIn", ({},), ({},), _tracin(1, True), aliases=("gradcos",)),
    MethodSpec("RPS-L2", "RPS",
               _grid(l2_strength=(10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4),
                     normalize_preactivate=(True, False)),
               _grid(l2_strength=(1e-2, 1e-3), normalize_preactivate=(False,)), _rps,
               classification_only=True, aliases=("rps", "rps-l2")),
    MethodSpec("TRAK-1", "TRAK", _TRAK_SPACE, _grid(proj_dim=(512,)), _trak(1),
               checkpoints="half", aliases=("trak",)),
    MethodSpec("TRAK-10", "TRAK", _TRAK_SPACE, _grid(proj_dim=(512,)), _trak(10),
               checkpoints="half", num_models=10),
    MethodSpec("TRAK-50", "TRAK", _TRAK_SPACE, _grid(proj_dim=(512,)), _trak(50),
               checkpoints="half", num_models=50),
)}
#: the paper's eleven methods (Table 1, Figures 2-4), in its order
PAPER_METHODS: tuple[str, ...] = tuple(METHODS)

# Beyond the paper. Grids in the style of Appendix C.1 (README "Benchmark suite" has
# the reasons): an absolute damping grid for the IF curvatures (DataInf's 0 = its
# per-layer heuristic), a relative one for the projected Fishers of LoGra /
# FactGraSS, projection dimensions per layer, K for KNN-Shapley; one projection
# dimension where a configuration costs a whole replay of the training (DVEmb) or a
# whole 10 / 50-member featurization (the dropout ensembles). Budgets: seconds of
# one whole search per MNIST setting and metric at the paper's size on the 2-core
# CPU, counted from the work of each configuration (not measured yet).
_DAMPING = (1e-1, 1e-3, 1e-5)
METHODS.update({m.name: m for m in (
    MethodSpec("IF-DataInf", "IF", _grid(regularization=(0.0, 1e-3)),
               _grid(regularization=(0.0,)), _datainf, group="new", budget_s=420,
               aliases=("datainf", "if-datainf")),
    MethodSpec("IF-EK-FAC", "IF", _grid(damping=_DAMPING), _grid(damping=(1e-3,)),
               _ekfac, group="new", budget_s=90, aliases=("ekfac", "if-ekfac")),
    MethodSpec("LoGra", "IF", _grid(damping=_DAMPING, proj_dim=(256, 4096)),
               _grid(damping=(1e-1,), proj_dim=(4096,)), _block_projected(LoGraAttributor),
               group="new", budget_s=90, aliases=("logra",)),
    MethodSpec("FactGraSS", "IF", _grid(damping=_DAMPING, proj_dim=(256, 1024)),
               _grid(damping=(1e-1,), proj_dim=(1024,)), _block_projected(FactGraSSAttributor),
               group="new", budget_s=60, aliases=("factgrass", "grass")),
    MethodSpec("KNN-Shapley", "Shapley", _grid(k_neighbors=(5, 10, 25, 50, 100)),
               _grid(k_neighbors=(10,)), _knn_shapley, group="new", budget_s=20,
               classification_only=True, self_influence=False,
               aliases=("knn", "knnshapley", "knn_shapley")),
    MethodSpec("DVEmb", "DVEmb", _grid(proj_dim=(1024,)), _grid(proj_dim=(1024,)), _dvemb,
               group="new", budget_s=300, needs="trajectory", aliases=("dvemb",)),
    MethodSpec("TRAK-10-dropout", "TRAK", _grid(proj_dim=(2048,)), _grid(proj_dim=(2048,)),
               _trak_dropout(10), checkpoints="half", group="new", budget_s=60,
               needs="dropout", aliases=("trak-10-de", "trak10-dropout")),
    MethodSpec("TRAK-50-dropout", "TRAK", _grid(proj_dim=(2048,)), _grid(proj_dim=(2048,)),
               _trak_dropout(50), checkpoints="half", group="new", budget_s=180,
               needs="dropout", aliases=("trak-50-de", "trak50-dropout")),
)})
#: the methods beyond the paper, in the figures' order (after the paper's)
NEW_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m not in PAPER_METHODS)
_GROUPS = {"all": tuple(METHODS), "paper": PAPER_METHODS, "new": NEW_METHODS}


def resolve_methods(names: Sequence[str]) -> list[str]:
    """Method names with the groups expanded: ``"all"`` (every registered method),
    ``"paper"`` (the paper's eleven), ``"new"`` (the others); names and aliases as
    :func:`get_method` takes them. Each method once, in the given order."""
    out: list[str] = []
    for name in names:
        key = str(name).strip().lower()
        group = _GROUPS[key] if key in _GROUPS else (get_method(name).name,)
        for full in group:
            if full not in out:
                out.append(full)
    return out


def get_method(name: str) -> MethodSpec:
    """Look a method up by name or alias (case-insensitive).

    Raises:
        DattriValueError: unknown method; the message lists them.
    """
    key = str(name).strip().lower()
    for spec in METHODS.values():
        if key == spec.name.lower() or key in spec.aliases:
            return spec
    msg = (f"method: unknown method {name!r}; choose from {list(METHODS)} or a group: "
           "all, paper, new.")
    raise DattriValueError(msg)


def search_space(spec: MethodSpec, search: str) -> tuple[Mapping[str, Any], ...]:
    """``"paper"``: Appendix C.1's grid; ``"quick"``: its documented subset."""
    if search == "paper":
        return spec.search_space
    if search == "quick":
        return spec.quick_space
    msg = f"search: expected 'paper' or 'quick', got {search!r}."
    raise DattriValueError(msg)


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct trainable parameters (tied weights counted once)."""
    seen = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
    return sum(seen.values())


def infeasible_reason(spec: MethodSpec, md: Mapping[str, Any],
                      metrics: tuple[str, ...] | list[str] = ()) -> tuple[str, str, bool] | None:
    """Why ``spec`` cannot run on these model details (for ``metrics``), or None.

    Returns:
        ``(status, reason, forceable)``: status ``"n/a"`` (the method does not
        apply, e.g. RPS without a classifier) or ``"infeasible"`` (too few
        checkpoints, or above ``max_params``; only the latter is ``forceable``).
    """
    rec = md["setting"]
    if spec.classification_only and (rec.task != "classification" or not rec.final_layer):
        return "n/a", f"{spec.name} needs a classifier's final linear layer; {rec.name} has none", False
    if "auc" in metrics and not spec.self_influence:
        return "n/a", (f"{spec.name} has no self-value (a point is its own nearest "
                       "neighbour), which the noisy-label AUC ranks by"), False
    if spec.needs == "dropout" and not any(isinstance(m, torch.nn.Dropout)
                                           for m in md["model"].modules()):
        return "n/a", (f"{spec.name} needs dropout layers; the {rec.name} model has none "
                       "(a dropout ensemble would repeat one model)"), False
    if spec.needs == "trajectory" and rec.vectorized is None:
        return "n/a", (f"{spec.name} needs the SGD trajectory of the attributed model; "
                       f"{rec.name}'s training is not replayed step by step (only the "
                       "settings of the vmapped SGD trainer are: MNIST LR and MLP)"), False
    if spec.checkpoints == "full":
        have = len(md["models_full"])
    else:  # only the ensemble part: models_half[num_ensemble:] are the LDS ground truth
        have = min(len(md["models_half"]), md["size"].num_ensemble)
    if have < spec.num_models:
        why = (f"{spec.name} needs {spec.num_models} {spec.checkpoints}-data models; size "
               f"{md['size'].name!r} has {have}")
        return "infeasible", why, False
    p = num_parameters(md["model"])
    if spec.max_params is not None and p > spec.max_params:
        why = (f"{spec.name} is infeasible for {p:,} parameters (limit {spec.max_params:,}: "
               "memory / time, the paper's red cross)")
        return "infeasible", why, True
    if "auc" in metrics and spec.max_params_self is not None and p > spec.max_params_self:
        why = (f"{spec.name} self-influence (AUC) is infeasible for {p:,} parameters (limit "
               f"{spec.max_params_self:,}: one inverse-HVP solve per training example, "
               "time budget; --force runs it)")
        return "infeasible", why, True
    return None
