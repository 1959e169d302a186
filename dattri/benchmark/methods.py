"""The benchmarked attribution methods: how to build each for a setting, and its search space.

One :class:`MethodSpec` per method of the paper's figures (Table 1, Sec. 4):
IF-Explicit, IF-CG, IF-LiSSA, IF-Arnoldi, TracInCP-10, Grad-Dot, Grad-Cos,
RPS-L2, TRAK-1, TRAK-10, TRAK-50. ``search_space`` is the hyper-parameter grid of
Appendix C.1 (the benchmark reports the best value over it, with the chosen
hyper-parameters); ``quick_space`` is a documented subset for quick runs.

Checkpoints (the paper, Sec. 3.3): single-model methods attribute
``models_full[0]``; TRAK-k ensembles ``models_half[:k]`` (the first 50 half-data
models are the ensemble pool); TracInCP-10 sums over ``models_full[:10]`` with the
optimiser's learning rate as weight (10 full-data models of different seeds: the
retraining engine keeps final models, not a training trajectory).

TRAK's projection (recorded with each result) is a TensorSketch of the layer
factors for models made of ``nn.Linear`` layers (MNIST LR and MLP), else Gaussian up
to ``DENSE_PROJECTION_MAX_PARAMS`` parameters and SJLT above.

Feasibility (the paper's red crosses): a method whose memory or time grows too
fast with the parameter count P is marked infeasible above ``max_params``
(dense Hessian P^2 for IF-Explicit; per-test-vector HVP solves for CG and LiSSA).
``force=True`` in the runner tries anyway.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from dattri.algorithm import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
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
    "MethodSpec",
    "get_method",
    "hyper_slug",
    "infeasible_reason",
    "num_parameters",
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
    return IFAttributorArnoldi(_task(md, md["models_full"][0]), device=ctx.get("device", "cpu"),
                               **hyper)


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


def _trak(num: int) -> Builder:
    def build(md, hyper, ctx):
        ckpts = md["models_half"][:num]
        task = _task(md, ckpts if num > 1 else ckpts[0], md["margin_func"],
                     md["margin_target_func"])
        proj = {"proj_dim": int(hyper["proj_dim"]), "proj_max_batch_size": 32,
                "proj_seed": 0, "proj_type": trak_projection_type(md["model"])}
        return TRAKAttributor(task, md["correct_probability_func"], proj_params=proj,
                              device=ctx.get("device", "cpu"))

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


def get_method(name: str) -> MethodSpec:
    """Look a method up by name or alias (case-insensitive).

    Raises:
        DattriValueError: unknown method; the message lists them.
    """
    key = str(name).strip().lower()
    for spec in METHODS.values():
        if key == spec.name.lower() or key in spec.aliases:
            return spec
    msg = f"method: unknown method {name!r}; choose from {list(METHODS)}."
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
