"""Full-batch graph distillation: train a student GNN (or MLP) on a node-classification graph with
cross-entropy on the labelled nodes plus any weighted distillation methods, from a frozen teacher.

The one entry point, stable for the methods of issue 16 (LSP, GNN-SD, graph-free KD, HIRE)::

    distill_graph(student, teacher, data, methods={"kd": KD(T=2), "lsp": LSP("embeddings.0", "embeddings.0")},
                  epochs=200, lr=0.01, weight_decay=5e-4, ce=1.0, seed=0, device=None, progress=True) -> dict

* ``student``: an ``nn.Module`` (or a zero-argument factory) called as ``student(x, edge_index)`` →
  logits ``(N, K)``; ``teacher``: likewise, or ``None`` when every method is teacher-free (GNN-SD).
  The teacher is put in eval mode with ``requires_grad_(False)`` and run **once** under ``no_grad`` (a
  full-batch teacher's view does not change); its view is ``{"logits": (N, K), tap: (N, D)...}``.
* ``data``: a graph with ``x`` ``(N, F)``, ``edge_index`` ``(2, E)``, ``y`` ``(N,)`` and boolean
  ``train_mask`` / ``val_mask`` / ``test_mask`` ``(N,)`` (:class:`distill.data.graphs.GraphData`).
* ``methods``: ``{name: Method}``; each term is multiplied by its ``method.weight`` (and warm-up factor),
  read from the student's and teacher's views of **every** node (transductive: the teacher's soft labels
  on unlabelled nodes are the point of graph KD), and sees a :class:`~distill.batch.GraphBatch` whose
  ``edge_index`` carries the graph (graph methods read it there), whose ``targets`` hold the labels of
  the training nodes only (``-100`` elsewhere: no val/test label reaches a loss) and whose ``mask`` is
  ``train_mask``.
* The loss is ``ce`` × cross-entropy on ``train_mask`` nodes + Σ weight × method. Adam (``lr``,
  ``weight_decay``) over the student's parameters and the methods' own (adapters), full batch, one step
  per epoch. Each epoch the student is evaluated (eval mode) on ``val_mask`` and ``test_mask``; the
  weights of the epoch with the best validation accuracy (first on ties) are restored at the end.

Returns (accuracies in %, as :func:`distill.train.graph.fit_graph`) ``{"val_acc", "test_acc",
"train_acc"}`` (at the selected epoch), ``"best_epoch"``, ``"last_val_acc"``, ``"last_test_acc"``,
``"teacher_val_acc"`` / ``"teacher_test_acc"`` (``None`` without a teacher) and ``"history"`` (per
epoch: loss, each weighted part, train/val/test accuracy). ``device`` defaults to ``data.x``'s.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.batch import GraphBatch, View
from distill.methods.base import Method
from distill.progress import StepProgress
from distill.strategies.registry import as_model
from distill.taps import Taps

__all__ = ["distill_graph", "graph_view", "masked_accuracy"]


def _field(data: Any, name: str) -> Tensor:
    value = getattr(data, name, None)
    if not isinstance(value, Tensor):
        raise ValueError(f"distill_graph: data.{name} must be a tensor, got {type(value).__name__} "
                         "(expected a graph with x, edge_index, y, train_mask, val_mask, test_mask)")
    return value


def _check_data(data: Any) -> None:
    x, ei, y = _field(data, "x"), _field(data, "edge_index"), _field(data, "y")
    n = x.shape[0]
    if x.dim() != 2:
        raise ValueError(f"distill_graph: data.x must be node features (N, F), got {tuple(x.shape)}")
    if ei.dim() != 2 or ei.shape[0] != 2:
        raise ValueError(f"distill_graph: data.edge_index must be (2, E), got {tuple(ei.shape)}")
    if y.shape != (n,):
        raise ValueError(f"distill_graph: data.y must be (N,) = ({n},), got {tuple(y.shape)}")
    for name in ("train_mask", "val_mask", "test_mask"):
        mask = _field(data, name)
        if mask.shape != (n,) or mask.dtype != torch.bool:
            raise ValueError(f"distill_graph: data.{name} must be a bool (N,) = ({n},) mask, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
    if not bool(_field(data, "train_mask").any()):
        raise ValueError("distill_graph: data.train_mask selects no node")


def masked_accuracy(logits: Tensor, y: Tensor, mask: Tensor) -> float:
    """Accuracy in % of ``logits`` ``(N, K)`` against ``y`` ``(N,)`` on the nodes of ``mask`` ``(N,)``
    (NaN for an empty mask)."""
    if not bool(mask.any()):
        return float("nan")
    return 100.0 * float((logits[mask].argmax(-1) == y[mask]).float().mean())


def graph_view(model: nn.Module, taps: Taps | None, x: Tensor, edge_index: Tensor) -> View:
    """``{"logits": model(x, edge_index), tap: tensor...}`` for one full-graph forward."""
    if taps is None:
        return {"logits": model(x, edge_index)}
    with taps.recording() as store:
        logits = model(x, edge_index)
    return {"logits": logits, **store}


def distill_graph(
    student: Any,
    teacher: nn.Module | None,
    data: Any,
    methods: Mapping[str, Method] | None = None,
    *,
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    ce: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``student`` on the graph ``data`` with ``ce`` × cross-entropy (training nodes) + the weighted
    ``methods`` from the frozen ``teacher``; keep the best-validation epoch. See the module docstring."""
    methods = dict(methods or {})
    for name, m in methods.items():
        if not isinstance(m, Method):
            raise TypeError(f"distill_graph: methods[{name!r}] must be a distill Method, got {type(m).__name__}")
    if epochs < 1:
        raise ValueError(f"distill_graph: epochs must be >= 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"distill_graph: lr must be a finite number > 0, got {lr}")
    if not ce >= 0:
        raise ValueError(f"distill_graph: ce must be >= 0, got {ce}")
    needing = [n for n, m in methods.items() if m.needs_teacher]
    if teacher is None and needing:
        raise ValueError(f"distill_graph: the methods {needing} need a teacher, but teacher is None")
    _check_data(data)
    torch.manual_seed(seed)
    model = as_model(student, "distill_graph")
    dev = torch.device(device) if device is not None else _field(data, "x").device
    model.to(dev)
    x, edge_index, y = data.x.to(dev), data.edge_index.to(dev).long(), data.y.to(dev).long()
    train_mask, val_mask, test_mask = data.train_mask.to(dev), data.val_mask.to(dev), data.test_mask.to(dev)
    batch = GraphBatch(x, torch.where(train_mask, y, torch.full_like(y, -100)), edge_index=edge_index,
                       mask=train_mask)

    s_paths = list(dict.fromkeys(p for m in methods.values() for p in m.student_taps))
    t_paths = list(dict.fromkeys(p for m in methods.values() if m.needs_teacher for p in m.teacher_taps))
    s_taps = Taps(model, s_paths, model_name="student") if s_paths else None
    t_taps: Taps | None = None
    teacher_view: View = {}
    teacher_val = teacher_test = None
    try:
        if teacher is not None:
            teacher.to(dev).eval().requires_grad_(False)
            t_taps = Taps(teacher, t_paths, model_name="teacher") if t_paths else None
            with torch.no_grad():
                teacher_view = {k: v.detach() for k, v in graph_view(teacher, t_taps, x, edge_index).items()}
            teacher_val = masked_accuracy(teacher_view["logits"], y, val_mask)
            teacher_test = masked_accuracy(teacher_view["logits"], y, test_mask)

        bag = nn.ModuleDict(methods).to(dev)
        model.eval()
        with torch.no_grad():
            example_view = graph_view(model, s_taps, x, edge_index)
            for m in methods.values():
                m.bind_models(model, teacher, batch)
            for m in methods.values():
                m.prepare(example_view, teacher_view, batch)
        bag.to(dev)
        params = [p for p in list(model.parameters()) + list(bag.parameters()) if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

        best_val, best_epoch, best_state = -1.0, -1, None
        history: list[dict[str, float]] = []
        with StepProgress(progress, "distill_graph", epochs) as bar:
            for epoch in range(epochs):
                for m in methods.values():
                    m.on_epoch_start(epoch, epochs)
                model.train()
                bag.train()
                view = graph_view(model, s_taps, x, edge_index)
                parts: dict[str, Tensor] = {}
                if ce > 0:
                    parts["ce"] = ce * F.cross_entropy(view["logits"][train_mask], y[train_mask])
                for name, m in methods.items():
                    w = m.weight * m.weight_factor()
                    if w > 0:
                        parts[name] = w * m(view, teacher_view, batch)
                if not parts:
                    raise ValueError("distill_graph: nothing to train (ce = 0 and every method weighs 0)")
                loss = sum(parts.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"distill_graph: the loss is {loss.item()} at epoch {epoch} "
                                             f"(parts: { {k: v.item() for k, v in parts.items()} })")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for m in methods.values():
                    m.on_step_end()

                model.eval()
                with torch.no_grad():
                    logits = model(x, edge_index)
                val_acc = masked_accuracy(logits, y, val_mask)
                test_acc = masked_accuracy(logits, y, test_mask)
                row = {"epoch": float(epoch), "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                       "train_acc": masked_accuracy(logits, y, train_mask), "val_acc": val_acc, "test_acc": test_acc}
                history.append(row)
                if val_acc > best_val:
                    best_val, best_epoch = val_acc, epoch
                    best_state = copy.deepcopy(model.state_dict())
                bar.advance(f"loss {row['loss']:.3f} val {val_acc:.3f} best {best_val:.3f}")
    finally:
        if s_taps is not None:
            s_taps.remove()
        if t_taps is not None:
            t_taps.remove()

    if best_state is not None:
        model.load_state_dict(best_state)
    chosen = history[best_epoch] if best_epoch >= 0 else history[-1]
    return {
        "val_acc": chosen["val_acc"],
        "test_acc": chosen["test_acc"],
        "train_acc": chosen["train_acc"],
        "best_epoch": best_epoch,
        "last_val_acc": history[-1]["val_acc"],
        "last_test_acc": history[-1]["test_acc"],
        "teacher_val_acc": teacher_val,
        "teacher_test_acc": teacher_test,
        "history": history,
    }
