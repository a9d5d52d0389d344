"""Graph-Free Knowledge Distillation (GFKD): distil a GNN without reading any graph.

Deng & Zhang, "Graph-Free Knowledge Distillation for Graph Neural Networks", IJCAI 2021,
arXiv 2105.07519 (code: github.com/Xiang-Deng-DL/GFKD).

Stage 1 (:func:`synthesize_graphs`): ``G`` synthetic graphs of ``n`` nodes are learned from the
frozen teacher alone. Node features ``X`` ``(G*n, F)`` are parameters trained by Adam on

    L = (1/N) sum_i CE(f_T(A, X)_i, y_i) + bn_weight * R_BN [+ onehot_weight * H(X)]

(``y`` fixed random classes, ``R_BN`` the teacher's BatchNorm-statistics term, ``H`` the one-hot
prior, see :mod:`distill.functional.graph_free`); the adjacency ``A_g ~ Bernoulli(sigmoid(phi_g))``
has its own Adam on ``phi`` driven by the ARM gradient estimator (two teacher forward passes per
step, no back-propagation through ``A``). Stage 2: the student learns the teacher's outputs on
the synthetic graphs, ``T^2 KL(softmax(t/T) || softmax(s/T))`` (batch mean over nodes), and nothing
else.

Neither stage reads a real graph: ``train_data`` is never touched, and ``val_data`` is read only
after the student's training, to report its accuracy.

Defaults are the authors' MUTAG scripts (``generate_fake_graphs.sh``, ``inversion_gcn.py``,
``train_kd_gcn.sh``, ``train_kd_gcn.py``): 1500 synthesis steps, feature lr 0.01, structure lr 1.0
(Adam both), both decayed x0.1 every 700 steps, ``bn_weight = 0.01``, ``onehot_weight = 1e-6`` (for
one-hot features), edge logits initialised as ``logit(U(0,1))`` and free features as ``N(0, 1)``;
student: Adam lr 0.01, no weight decay, 300 epochs with a linear decay of the lr to 0, ``T = 2``.
The paper's method section could not be read here (its abstract only). Departures, all ours:
node classification instead of the paper's graph classification, so each synthetic node gets a
random target class and each graph's loss is its nodes' mean CE; equal-size graphs (``n = 20``,
the authors draw 10..29 nodes per graph); ``G = 32`` graphs; besides the paper's free (default)
and one-hot features, ``"unit"`` (sigmoid of the parameters, in [0, 1] like our pixel features: it
did worse on Fashion-MNIST, 21% vs 37% test accuracy of the student); the feature step samples
``A ~ Bernoulli`` (the paper's expectation; the authors' code uses the most probable graph
``sigmoid(phi) >= 0.5`` there); the student learns full-batch on the union of the graphs kept at
the lowest synthesis loss. On our image graphs ``bn_weight = 1`` did far better than the authors'
0.01, and a student without input dropout (see docs/_parts/16k2.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.functional.graph_free import (arm_bernoulli_grad, arm_bernoulli_samples, dense_graphs_to_edge_index,
                                           gfkd_feature_entropy, gfkd_graph_losses)
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.registry import as_model, register_strategy
from distill.synthesis.bn_stats import BatchNormStatistics

__all__ = ["GFKD_PAPER", "GraphFreeResult", "SyntheticGraphs", "graph_free_kd", "synthesize_graphs"]

GFKD_PAPER = Paper("Graph-Free Knowledge Distillation for Graph Neural Networks", "X. Deng, Z. Zhang", 2021,
                   "2105.07519", "IJCAI")

_FEATURES = ("free", "unit", "onehot")


@dataclass
class SyntheticGraphs:
    """The synthesised graphs as one disjoint union: ``x`` ``(G*n, F)``, ``edge_index`` ``(2, E)``,
    ``targets`` ``(G*n,)`` (the random classes they were optimised for), ``num_graphs`` ``G``,
    ``loss`` (the synthesis loss they reached) and ``history`` (per step: ``loss``, ``ce``, ``bn``)."""

    x: Tensor
    edge_index: Tensor
    targets: Tensor
    num_graphs: int
    loss: float
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class GraphFreeResult:
    """What :func:`graph_free_kd` returns: the trained ``student``, the ``graphs`` it learned on,
    its accuracy in % on ``val_data``'s validation / test masks (``None`` without ``val_data``), its
    agreement in % with the teacher's predictions on the synthetic nodes, and the KD loss per epoch."""

    student: nn.Module
    graphs: SyntheticGraphs
    val_acc: float | None = None
    test_acc: float | None = None
    synthetic_agreement: float = 0.0
    kd_history: list[float] = field(default_factory=list)


def _features_of(params: Tensor, kind: str) -> Tensor:
    if kind == "unit":
        return torch.sigmoid(params)
    if kind == "onehot":
        return torch.softmax(params, dim=1)
    return params


def _check_positive(**values: Any) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ValueError(f"graph_free_kd: {name} must be a finite number > 0; got {v!r}")


def synthesize_graphs(teacher: nn.Module, feature_dim: int, num_classes: int, *, num_graphs: int = 32,
                      nodes_per_graph: int = 20, steps: int = 1500, lr_features: float = 0.01,
                      lr_structure: float = 1.0, lr_decay_every: int = 700, bn_weight: float = 0.01,
                      features: str = "free", onehot_weight: float = 1e-6, seed: int = 0,
                      progress: bool = True) -> SyntheticGraphs:
    """GFKD's stage 1: graphs (features + Bernoulli edges) learned from the frozen teacher alone.

    Args:
        teacher: a GNN ``teacher(x (N, F), edge_index (2, E)) -> logits (N, K)`` with at least one
            ``nn.BatchNorm1d`` (its running statistics are the data prior); kept in eval mode, frozen.
        feature_dim, num_classes: ``F`` and ``K``.
        num_graphs, nodes_per_graph: ``G`` and ``n``.
        steps: synthesis steps (each: one feature step, one ARM structure step).
        lr_features, lr_structure, lr_decay_every: the two Adams' learning rates, x0.1 every
            ``lr_decay_every`` steps.
        bn_weight: ``lambda_BN``.
        features: ``"free"`` (the parameters themselves), ``"unit"`` (their sigmoid, in [0, 1]) or
            ``"onehot"`` (their softmax, with the entropy prior weighted by ``onehot_weight``).
    Returns: the graphs at the lowest synthesis loss seen (features and the sampled adjacency of that step).
    """
    if features not in _FEATURES:
        raise ValueError(f"graph_free_kd: features must be one of {_FEATURES}; got {features!r}")
    for name, v in (("feature_dim", feature_dim), ("num_classes", num_classes), ("num_graphs", num_graphs),
                    ("nodes_per_graph", nodes_per_graph), ("steps", steps), ("lr_decay_every", lr_decay_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name in ("num_classes", "nodes_per_graph") else 1):
            raise ValueError(f"graph_free_kd: {name} must be an int >= "
                             f"{2 if name in ('num_classes', 'nodes_per_graph') else 1}; got {v!r}")
    _check_positive(lr_features=lr_features, lr_structure=lr_structure)
    if bn_weight < 0 or onehot_weight < 0:
        raise ValueError(f"graph_free_kd: bn_weight and onehot_weight must be >= 0; got {bn_weight}, {onehot_weight}")
    device = next(teacher.parameters()).device
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    n, total = nodes_per_graph, num_graphs * nodes_per_graph
    targets = torch.randint(num_classes, (total,), generator=g).to(device)
    p0 = torch.rand(num_graphs, n, n, generator=g).clamp(1e-7, 1 - 1e-7)
    phi = torch.log(p0 / (1 - p0)).to(device)  # logit(U(0,1)), the authors' initialisation
    x_params = torch.randn(total, feature_dim, generator=g).to(device).requires_grad_(True)
    phi.requires_grad_(True)
    opt_x = torch.optim.Adam([x_params], lr=lr_features)
    opt_a = torch.optim.Adam([phi], lr=lr_structure)
    best: SyntheticGraphs | None = None
    history: list[dict[str, float]] = []
    with BatchNormStatistics(teacher) as bn, StepProgress(progress, "gfkd synthesis", steps) as bar:
        for step in range(steps):
            decay = 0.1 ** (step // lr_decay_every)
            for opt, lr in ((opt_x, lr_features), (opt_a, lr_structure)):
                for group in opt.param_groups:
                    group["lr"] = lr * decay
            # features: gradient through the teacher, on a graph sampled from the current Bernoulli
            with torch.no_grad():
                adjacency = (torch.rand(phi.shape, generator=g).to(device) < torch.sigmoid(phi)).to(phi.dtype)
            edge_index = dense_graphs_to_edge_index(adjacency)
            x = _features_of(x_params, features)
            logits = teacher(x, edge_index)
            ce = F.cross_entropy(logits, targets)
            bn_term = bn.loss()
            loss = ce + bn_weight * bn_term
            if features == "onehot":
                loss = loss + onehot_weight * gfkd_feature_entropy(x)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"graph_free_kd: the synthesis loss became {value} at step {step}")
            if best is None or value < best.loss:
                best = SyntheticGraphs(x.detach().clone(), edge_index.clone(), targets, num_graphs, value)
            history.append({"loss": value, "ce": float(ce.detach()), "bn": float(bn_term.detach())})
            opt_x.zero_grad(set_to_none=True)
            loss.backward()
            opt_x.step()
            # structure: ARM, two forward passes, each graph's own loss (+ the shared BN term)
            with torch.no_grad():
                x = _features_of(x_params, features)
                u = torch.rand(phi.shape, generator=g).to(device)
                plus, minus = arm_bernoulli_samples(phi, u)
                losses = []
                for sample in (plus, minus):
                    out = teacher(x, dense_graphs_to_edge_index(sample))
                    losses.append(gfkd_graph_losses(out, targets, num_graphs) + bn_weight * bn.loss())
                phi.grad = arm_bernoulli_grad(losses[0], losses[1], u)
            opt_a.step()
            bar.advance(f"loss {value:.3f} ce {history[-1]['ce']:.3f} bn {history[-1]['bn']:.3f}")
    assert best is not None
    best.history = history
    return best


def _in_dim(model: nn.Module) -> int | None:
    """The node-feature width a GNN expects: its ``in_dim`` attribute, else the ``in_channels`` /
    ``in_features`` of its first layer that has one."""
    if isinstance(getattr(model, "in_dim", None), int):
        return model.in_dim  # type: ignore[return-value]
    for m in model.modules():
        for name in ("in_channels", "in_features"):
            v = getattr(m, name, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def _accuracy(model: nn.Module, data: Any, mask_name: str) -> float | None:
    mask = getattr(data, mask_name, None)
    if mask is None or int(mask.sum()) == 0:
        return None
    pred = model(data.x, data.edge_index).argmax(1)
    return 100.0 * float((pred[mask] == data.y[mask]).float().mean())


@register_strategy("graph_free_kd", "graph", GFKD_PAPER)
def graph_free_kd(student: Any, train_data: Any = None, val_data: Any = None, *, teacher: nn.Module,
                  feature_dim: int | None = None, num_classes: int | None = None, num_graphs: int = 32,
                  nodes_per_graph: int = 20, synthesis_steps: int = 1500, lr_features: float = 0.01,
                  lr_structure: float = 1.0, lr_decay_every: int = 700, bn_weight: float = 0.01,
                  features: str = "free", onehot_weight: float = 1e-6, epochs: int = 300, lr: float = 0.01,
                  weight_decay: float = 0.0, temperature: float = 2.0, seed: int = 0,
                  progress: bool = True) -> GraphFreeResult:
    """Graph-Free KD (Deng & Zhang, IJCAI 2021, arXiv 2105.07519): synthesise graphs from the teacher, distil on them.

    Args:
        student: a GNN ``student(x, edge_index) -> logits (N, K)`` (or a zero-argument factory).
        train_data: never read (the strategy convention's slot: GFKD has no training graph).
        val_data: a graph with ``x``, ``edge_index``, ``y`` and ``val_mask`` / ``test_mask`` (e.g.
            :class:`distill.data.graphs.GraphData`), read only after training, for the accuracies.
        teacher: the trained GNN with BatchNorm1d layers (see :func:`synthesize_graphs`).
        feature_dim, num_classes: node feature width and classes; default the teacher's
            (``in_dim`` or its first layer's ``in_channels`` / ``in_features``; ``num_classes``).
        epochs, lr, weight_decay, temperature: the student's stage (Adam, lr decayed linearly to 0).
        The other arguments: :func:`synthesize_graphs`.
    Returns: a :class:`GraphFreeResult`.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"graph_free_kd: teacher must be a trained GNN (nn.Module); got {teacher!r}")
    student = as_model(student, "graph_free_kd")
    feature_dim = feature_dim if feature_dim is not None else _in_dim(teacher)
    num_classes = num_classes if num_classes is not None else getattr(teacher, "num_classes", None)
    if feature_dim is None or num_classes is None:
        raise ValueError("graph_free_kd: give feature_dim and num_classes (the teacher has no in_dim / num_classes "
                         "attributes to read them from)")
    _check_positive(lr=lr, temperature=temperature)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"graph_free_kd: epochs must be an int >= 1; got {epochs!r}")
    torch.manual_seed(seed)
    graphs = synthesize_graphs(teacher, int(feature_dim), int(num_classes), num_graphs=num_graphs,
                               nodes_per_graph=nodes_per_graph, steps=synthesis_steps, lr_features=lr_features,
                               lr_structure=lr_structure, lr_decay_every=lr_decay_every, bn_weight=bn_weight,
                               features=features, onehot_weight=onehot_weight, seed=seed, progress=progress)
    with torch.no_grad():
        teacher_logits = teacher(graphs.x, graphs.edge_index)
    opt = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: max(0.0, (epochs - e) / epochs))
    kd_history: list[float] = []
    with StepProgress(progress, "gfkd student", epochs) as bar:
        for _ in range(epochs):
            student.train()
            s = student(graphs.x, graphs.edge_index)
            loss = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                            reduction="batchmean") * temperature ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            kd_history.append(float(loss.detach()))
            bar.advance(f"kd {kd_history[-1]:.4f}")
    student.eval()
    with torch.no_grad():
        agreement = 100.0 * float((student(graphs.x, graphs.edge_index).argmax(1)
                                   == teacher_logits.argmax(1)).float().mean())
        result = GraphFreeResult(student, graphs, synthetic_agreement=agreement, kd_history=kd_history)
        if val_data is not None:  # the real graph, read only now that training is over
            result.val_acc = _accuracy(student, val_data, "val_mask")
            result.test_acc = _accuracy(student, val_data, "test_mask")
    return result
