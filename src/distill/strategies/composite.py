"""Composite students built from ordinary models, for the strategies whose student has several heads.

* :func:`rocket_from_models`: rocket launching's :class:`~distill.strategies.cohort_nets.RocketNet` from
  a light model and a booster model: the light model's lower layers become the shared trunk.
* :func:`multi_branch_from_model`: OKDHP's :class:`~distill.strategies.cohort_nets.MultiBranchNet` from
  one model: its lower layers become the trunk, copies of the rest the branches.
* :func:`rocket_student` / :func:`okdhp_student`: what :func:`~distill.strategies.online.fit_rocket`
  and :func:`~distill.strategies.online.fit_okdhp` call first, so a recipe (a zoo student, model
  specs and module paths in ``strategy.args``) can run them.

A model is cut at a module path as :class:`~distill.methods.spot.StageSplit` runs it: its modules,
in registration order, must be its forward. The path's parents are opened up (cutting the zoo CNN
at ``"stage2.pre"`` runs ``stem, stage1, stage2.body, stage2.pre | stage2.act, stage3, avgpool,
pool, dropout, fc``), and the cut model is checked on an example batch: running the chain must
give the model's own output, or the cut is refused (e.g. the zoo MLP flattens its input outside
any module). The pieces keep the model's modules (and parameters) themselves; nothing is copied
except OKDHP's extra branches.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill.adapters import build_adapter, resampling_conv
from distill.batch import Batch, as_batch
from distill.methods.spot import StageSplit, _eval_mode
from distill.strategies.chain import ModelSpec, build_model, check_model_spec
from distill.strategies.cohort_nets import FeatureAggregationUnit, MultiBranchNet, RocketNet, _positive_int
from distill.taps import TapError, logits_of, resolve


__all__ = ["chain_paths", "multi_branch_from_model", "okdhp_student", "rocket_from_models", "rocket_student"]


# --------------------------------------------------------------------------------------------
# Cutting a model into pieces
# --------------------------------------------------------------------------------------------


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def chain_paths(model: nn.Module, cuts: Sequence[str] = ()) -> list[str]:
    """The model's modules as one chain of paths, in registration order, with every module that
    contains a cut opened up into its children (so each cut is one element of the chain).

    ``chain_paths(cnn)`` → ``["stem", "stage1", ..., "fc"]``; ``chain_paths(cnn, ["stage2.pre"])``
    → ``["stem", "stage1", "stage2.body", "stage2.pre", "stage2.act", "stage3", ...]``. The cuts
    are not checked here (see :func:`_cut`).
    """
    opened = {a for cut in cuts for a in _ancestors(cut)}
    out: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if path in opened:
                walk(child, path + ".")
            else:
                out.append(path)

    walk(model, "")
    return out


def _check_cut(model: nn.Module, path: Any, what: str, model_name: str) -> str:
    if not isinstance(path, str) or not path or ":" in path:
        raise ValueError(f"{what} must be a module path of the {model_name} (e.g. 'stage1'), without ':input' / "
                         f"':output'; got {path!r}")
    try:
        resolve(model, path, model_name=model_name)
    except TapError as e:  # it lists the nearest valid paths; say which argument held the bad one
        raise TapError(f"{what}={path!r}: {e}") from None
    return path


def _example_inputs(example: Any, who: str) -> Tensor:
    """The input tensor of an example: a tensor, a batch, or the first batch of a loader."""
    if isinstance(example, Tensor):
        return example
    return _first_batch(example, who).inputs


def _first_batch(loader: Any, who: str) -> Batch:
    if isinstance(loader, (Tensor, Batch, tuple, dict)):
        return as_batch(loader)
    if not isinstance(loader, Iterable):
        raise TypeError(f"{who} needs an example batch (a tensor of inputs or a loader), got {type(loader).__name__}")
    for raw in loader:
        return as_batch(raw)
    raise ValueError(f"{who}: the loader yielded no batch to build the model from")


def _on_model(x: Tensor, model: nn.Module) -> Tensor:
    ref = next(model.parameters(), None)
    return x if ref is None else x.to(ref.device)


def _cut(model: nn.Module, cuts: Sequence[tuple[str, str]], model_name: str,
         x: Tensor) -> tuple[StageSplit, list[Tensor]]:
    """Cut ``model`` after each path of ``cuts`` ((argument name, path) in forward order).

    Returns the :class:`StageSplit` of the pieces (the piece after the last cut is left out when
    nothing follows it) and each piece's output on ``x`` (eval mode, no gradient). Raises a clear
    error for a bad path, nested or out-of-order cuts, or a model whose forward is not the chain
    of its modules.
    """
    for what, path in cuts:
        _check_cut(model, path, what, model_name)
    paths = [p for _, p in cuts]
    for (what_a, a), (what_b, b) in ((ca, cb) for ca in cuts for cb in cuts if ca is not cb):
        if b.startswith(a + "."):
            raise ValueError(f"{what_a}={a!r} contains {what_b}={b!r}: the cuts must be different modules of the "
                             f"{model_name}, one after the other")
    chain = chain_paths(model, paths)
    where = [chain.index(p) for p in paths]
    for (what_a, a), (what_b, b), i, j in zip(cuts, cuts[1:], where, where[1:]):
        if j <= i:
            raise ValueError(f"{what_b}={b!r} must come after {what_a}={a!r} in the {model_name}'s chain of modules "
                             f"({', '.join(chain)})")
    bounds = [-1, *where, len(chain) - 1]
    stages = [chain[lo + 1: hi + 1] for lo, hi in itertools.pairwise(bounds)]
    if not stages[-1]:  # the cuts come in order, so only what follows the last one can be empty
        stages.pop()
    split = StageSplit(model, stages, model_name=model_name)
    x = _on_model(x, model)
    with _eval_mode(model), torch.no_grad():
        try:
            outs = split.outputs(x)
            failure = None
        except Exception as e:  # noqa: BLE001 - any failure means the chain is not the forward
            outs, failure = [], f"running them one after the other raised {type(e).__name__}: {e}"
        whole = model(x)
    if failure is None:
        mine, ref = outs[-1], logits_of(whole)
        if not isinstance(mine, Tensor) or mine.shape != ref.shape:
            failure = f"the chain gives {_shape(mine)} where the model gives {tuple(ref.shape)}"
        elif not torch.allclose(mine, ref, rtol=1e-4, atol=1e-5):
            failure = f"the chain's output differs from the model's (max |diff| {float((mine - ref).abs().max()):.3g})"
    if failure is not None:
        raise ValueError(
            f"cannot cut the {model_name} ({type(model).__name__}) at {', '.join(f'{w}={p!r}' for w, p in cuts)}: "
            f"its forward is not the chain of its modules in registration order ({' -> '.join(chain)}); {failure}. "
            "Cut a model whose forward runs its submodules one after another (e.g. the zoo CNNs), or build the "
            "composite model yourself"
        )
    return split, outs


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _piece(split: StageSplit, k: int, first: nn.Module | None = None, last: nn.Module | None = None) -> nn.Sequential:
    """Stage ``k`` of ``split`` as an ``nn.Sequential`` of the model's own modules, named by their paths
    (``stage2.body`` → ``stage2_body``), with optional modules before and after."""
    named: list[tuple[str, nn.Module]] = list(zip((p.replace(".", "_") for p in split.stages[k]), split.modules[k]))
    if first is not None:
        named.insert(0, ("adapter", first))
    if last is not None:
        named.append(("head", last))
    if len({n for n, _ in named}) < len(named):  # two paths that read alike: fall back to positions
        named = [(str(i), m) for i, (_, m) in enumerate(named)]
    return nn.Sequential(OrderedDict(named))


# --------------------------------------------------------------------------------------------
# Rocket launching
# --------------------------------------------------------------------------------------------


def rocket_from_models(light: ModelSpec, booster: ModelSpec, *, shared: str, booster_from: str | None = None,
                       example: Any, adapter: str = "conv1x1_bn") -> RocketNet:
    """A :class:`~distill.strategies.cohort_nets.RocketNet` from a light model and a booster model.

    The light model is cut after the module ``shared``: its modules up to and including ``shared``
    become the shared trunk, the rest the light head. The booster keeps its modules after
    ``booster_from`` (default: the path ``shared``) as its head, fed by the trunk instead of its
    own lower layers (which are dropped). When the trunk's output (B, C, H, W) is not the shape
    the booster head expects (the booster's own output at ``booster_from``), an adapter of kind
    ``adapter`` (:func:`~distill.adapters.build_adapter`: 1x1 conv + BN by default) is put first in
    the booster head. The trunk and both heads hold the models' own modules (no copies).

    Args:
        light, booster: models, zero-argument factories, zoo names or zoo specs
            (:data:`~distill.strategies.chain.ModelSpec`); two different models.
        shared: module path of the light model where the shared layers end, e.g. ``"stage1"``.
        booster_from: module path of the booster whose output the trunk's output replaces.
        example: example inputs (B, ...) (or a loader): the cut models are checked on them and the
            adapter is sized from them.

    Raises:
        TapError: a path that is not a module of its model (listing the nearest valid paths).
        ValueError: a model whose forward is not the chain of its modules, nothing left after a
            cut, or light and booster predicting different numbers of classes.
    """

    who = "rocket_from_models"
    for what, spec in (("light", light), ("booster", booster)):
        check_model_spec(spec, f"{who}: {what}")
    light_model, booster_model = build_model(light, "light"), build_model(booster, "booster")
    if light_model is booster_model:
        raise ValueError(f"{who}: light and booster must be two different models (the booster is a second, "
                         "usually larger, network), got the same module twice")
    booster_from = shared if booster_from is None else booster_from
    x = _example_inputs(example, who)
    light_split, light_outs = _cut(light_model, [("shared", shared)], "light net", x)
    booster_split, booster_outs = _cut(booster_model, [("booster_from", booster_from)], "booster", x)
    for name, split in (("light net", light_split), ("booster", booster_split)):
        if len(split) < 2:
            raise ValueError(f"{who}: nothing of the {name} lies after {split.stages[0][-1]!r} to make its head")
    h, wanted = light_outs[0], booster_outs[0]
    bridge = None
    if not isinstance(h, Tensor) or not isinstance(wanted, Tensor):
        raise TypeError(f"{who}: the trunk's output ({_shape(h)}) and the booster's at {booster_from!r} "
                        f"({_shape(wanted)}) must be tensors")
    if h.shape != wanted.shape:
        bridge = build_adapter(h, wanted, student_name=f"light net {shared!r}", teacher_name=f"booster {booster_from!r}",
                               kind=adapter).to(h.device)
    k_light, k_booster = logits_of(light_outs[-1]).shape[-1], logits_of(booster_outs[-1]).shape[-1]
    if k_light != k_booster:
        raise ValueError(f"{who}: the light net predicts {k_light} classes but the booster {k_booster}: build the "
                         f"booster with num_classes={k_light}")
    return RocketNet(_piece(light_split, 0), _piece(light_split, 1), _piece(booster_split, 1, first=bridge))


def rocket_student(student: Any, train_loader: Any, *, booster: ModelSpec | None = None, shared: str | None = None,
                   booster_from: str | None = None) -> RocketNet:
    """``fit_rocket``'s student: a :class:`~distill.strategies.cohort_nets.RocketNet` as it is, or one built by
    :func:`rocket_from_models` from ``student`` (the light model: a model, factory, zoo name or spec),
    ``booster`` and ``shared`` (``booster_from`` optional), checked on the first batch of ``train_loader``."""

    building = {k: v for k, v in (("booster", booster), ("shared", shared), ("booster_from", booster_from))
                if v is not None}
    if isinstance(student, RocketNet):
        if building:
            raise ValueError(f"fit_rocket: the student is already a RocketNet; {sorted(building)} build one from a "
                             "light model and a booster: drop them")
        return student
    if booster is None or shared is None:
        raise TypeError("fit_rocket needs a RocketNet(trunk, light, booster) as student, or a light model (a model, "
                        "factory, zoo name or spec) with booster=<model spec> and shared=<module path where the "
                        f"shared layers end> to build one; got student={type(student).__name__}"
                        + (f" with only {sorted(building)}" if building else ""))
    return rocket_from_models(student, booster, shared=shared, booster_from=booster_from,
                              example=_first_batch(train_loader, "fit_rocket").inputs)


# --------------------------------------------------------------------------------------------
# OKDHP's multi-branch network
# --------------------------------------------------------------------------------------------


def _reinitialise(module: nn.Module, what: str) -> nn.Module:
    """Draw fresh weights for every submodule (from torch's global generator)."""
    for name, m in module.named_modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        elif any(True for _ in m.parameters(recurse=False)):
            raise ValueError(f"cannot re-initialise {what}: its module {name or '(root)'!r} ({type(m).__name__}) "
                             "holds parameters but has no reset_parameters(); build the MultiBranchNet yourself")
    return module


def _small_init(head: nn.Module) -> nn.Module:
    """The pose heads' final-layer initialisation (SimpleBaseline's and HRNet's code, on which OKDHP's
    builds): convolution weights N(0, 0.001²), biases 0, so the first maps are near zero rather than
    PyTorch's default-initialised outputs, which a short run would spend its steps shrinking."""
    for m in head.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return head


def multi_branch_from_model(model: ModelSpec, *, split: str, branches: int = 3, until: str | None = None,
                            out_channels: int | None = None, out_size: Sequence[int] | None = None, example: Any,
                            mid_channels: int = 64) -> MultiBranchNet:
    """An OKDHP :class:`~distill.strategies.cohort_nets.MultiBranchNet` from one model.

    The model is cut after the module ``split``: its modules up to and including it become the
    shared trunk; its modules after ``split`` up to and including ``until`` (default: to the end)
    make branch 0, and ``branches - 1`` deep copies of branch 0, each re-initialised (every
    submodule's ``reset_parameters()``, from torch's global generator), make the others, so no two
    branches start alike. Each branch ends in the dense head a classifier lacks when its feature
    (B, C_f, H_f, W_f) is not already the maps asked for, (B, ``out_channels``, *``out_size``): a
    1x1 convolution to C maps at the same resolution, or one convolution that also resamples
    (:func:`~distill.adapters.resampling_conv`: a transposed convolution for an integer upsampling
    factor, where SimpleBaseline-style pose heads stack deconvolutions), initialised as those heads
    are (weights N(0, 0.001²), biases 0). The feature aggregation unit is built for the trunk's
    output channels and the C maps.

    Args:
        model: a model, zero-argument factory, zoo name or zoo spec
            (:data:`~distill.strategies.chain.ModelSpec`).
        split: module path where the trunk ends, e.g. ``"stage1"``; its output must be a map (B, C, H, W).
        branches: M >= 2.
        until: module path where each branch's copy of the model ends (a feature map), e.g. ``"stage3"``.
        out_channels: C, the number of output maps (``None``: the branch feature's channels).
        out_size: (H, W) of the output maps (``None``: the branch feature's).
        example: example inputs (B, ...) (or a loader): the cut model is checked on them.
        mid_channels: the FAU's hidden width (64, as the reference code).

    Raises:
        TapError: a path that is not a module of the model (listing the nearest valid paths).
        ValueError: cuts out of order, a model whose forward is not the chain of its modules, or a
            trunk or branch output that is not a feature map.
    """

    who = "multi_branch_from_model"
    _positive_int("branches", branches, minimum=2)
    if out_channels is not None:
        _positive_int("out_channels", out_channels)
    check_model_spec(model, f"{who}: model")
    net = build_model(model, "model")
    cuts = [("split", split)] + ([("until", until)] if until is not None else [])
    pieces, outs = _cut(net, cuts, "model", _example_inputs(example, who))
    if len(pieces) < 2:
        raise ValueError(f"{who}: nothing of the model lies after split={split!r} to make the branches")
    trunk_out, feature = outs[0], outs[1]
    if not isinstance(trunk_out, Tensor) or trunk_out.dim() != 4:
        raise ValueError(f"{who}: the trunk's output at split={split!r} is {_shape(trunk_out)}, not a feature map "
                         "(B, C, H, W) for the aggregation unit: split at an earlier module")
    if not isinstance(feature, Tensor) or feature.dim() != 4:
        after = chain_paths(net, [p for _, p in cuts])
        after = after[after.index(split) + 1:]
        raise ValueError(f"{who}: the branch output {_shape(feature)} is not a feature map (B, C, H, W): end the "
                         f"branches at a convolutional module with until= (one of {after})")
    c_in, hw_in = int(feature.shape[1]), (int(feature.shape[2]), int(feature.shape[3]))
    c_out = c_in if out_channels is None else out_channels
    hw_out = hw_in if out_size is None else (int(out_size[0]), int(out_size[1]))
    head: nn.Module | None = None
    if hw_out != hw_in:
        head = resampling_conv(c_in, c_out, hw_in, hw_out, bias=True,
                               where=f"branch feature {tuple(feature.shape)} -> maps {(c_out, *hw_out)}")
    elif c_out != c_in:
        head = nn.Conv2d(c_in, c_out, 1)
    first = _piece(pieces, 1, last=_small_init(head).to(feature.device) if head is not None else None)
    others = [_reinitialise(copy.deepcopy(first), f"branch {i}") for i in range(1, branches)]
    if head is not None:
        for branch in others:
            _small_init(branch[-1])  # the head is the last module of each branch
    fau = FeatureAggregationUnit(int(trunk_out.shape[1]), branches, c_out, mid_channels).to(trunk_out.device)
    return MultiBranchNet(_piece(pieces, 0), [first, *others], fau)


def okdhp_student(student: Any, train_loader: Any, *, split: str | None = None, num_branches: int = 3,
                  until: str | None = None) -> MultiBranchNet:
    """``fit_okdhp``'s student: a :class:`~distill.strategies.cohort_nets.MultiBranchNet` as it is, or one built by
    :func:`multi_branch_from_model` from ``student`` (a model, factory, zoo name or spec), cut at
    ``split`` (and ``until``), with ``num_branches`` branches ending in maps shaped like the target
    maps (B, C, H, W) of the first batch of ``train_loader``."""

    building = {k for k, v in (("split", split), ("until", until)) if v is not None}
    if isinstance(student, MultiBranchNet):
        if building:
            raise ValueError(f"fit_okdhp: the student is already a MultiBranchNet; {sorted(building)} build one from "
                             "an ordinary model: drop them")
        return student
    if split is None:
        raise TypeError("fit_okdhp needs a MultiBranchNet(trunk, branches, ...) as student, or a model (a model, "
                        "factory, zoo name or spec) with split=<module path where the shared trunk ends> to build "
                        f"one; got student={type(student).__name__}")
    batch = _first_batch(train_loader, "fit_okdhp")
    targets = batch.targets
    if targets is None or targets.dim() != 4:
        raise ValueError("fit_okdhp needs dense target maps (B, C, H, W) as the batches' targets (in a recipe: "
                         f"data.targets: class_heatmaps), got {None if targets is None else tuple(targets.shape)}")
    return multi_branch_from_model(student, split=split, branches=num_branches, until=until,
                                   out_channels=int(targets.shape[1]), out_size=tuple(targets.shape[2:]),
                                   example=batch.inputs)
