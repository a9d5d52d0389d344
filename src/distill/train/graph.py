"""Full-batch training and evaluation of node classifiers (issue 16's graph models).

One step sees the whole graph (the citation-graph protocol of Kipf & Welling 2017): the loss is
taken on the training nodes, the model with the best validation accuracy is kept, and its test
accuracy is reported. :func:`fit_graph` trains one model alone (a teacher, a from-scratch
student); distillation loops (:mod:`distill.strategies.graph`) build on the same two functions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distill.batch import run_model
from distill.data.graphs import GraphData
from distill.progress import StepProgress

__all__ = ["accuracy_by_split", "fit_graph"]


@torch.no_grad()
def accuracy_by_split(model: nn.Module, data: GraphData) -> dict[str, float]:
    """``{"train_acc", "val_acc", "test_acc"}`` in % of ``model`` (put in eval mode, then restored)."""
    was = model.training
    model.eval()
    pred = run_model(model, data.batch("train")).argmax(1)
    model.train(was)
    out = {}
    for split, mask in (("train", data.train_mask), ("val", data.val_mask), ("test", data.test_mask)):
        out[f"{split}_acc"] = 100.0 * float((pred[mask] == data.y[mask]).float().mean()) if mask.any() else float("nan")
    return out


def fit_graph(model: nn.Module, data: GraphData, epochs: int = 200, lr: float = 0.01, weight_decay: float = 5e-4,
              loss_fn: Callable[[Tensor, GraphData], Tensor] | None = None, seed: int = 0,
              progress: bool = True) -> dict[str, Any]:
    """Train ``model`` on ``data``'s training nodes (Adam, full batch) for ``epochs`` epochs; keep the
    weights of the epoch with the best validation accuracy (loaded back into ``model``).

    ``loss_fn(logits (N, K), data) -> scalar`` replaces the default cross-entropy on the training
    nodes. Defaults (Adam, lr 0.01, weight decay 5e-4, 200 epochs) are Kipf & Welling's.
    Returns ``{"val_acc", "test_acc", "train_acc", "best_epoch", "history"}`` (accuracies in %).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    batch = data.batch("train")
    best: tuple[float, int, dict[str, Tensor]] | None = None
    history = []
    with StepProgress(progress, "training on the graph", epochs) as bar:
        for epoch in range(epochs):
            model.train()
            logits = run_model(model, batch)
            loss = loss_fn(logits, data) if loss_fn is not None else F.cross_entropy(logits[data.train_mask],
                                                                                     data.y[data.train_mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc = accuracy_by_split(model, data)
            history.append({"epoch": epoch, "loss": float(loss.detach()), **acc})
            if best is None or acc["val_acc"] > best[0]:
                best = (acc["val_acc"], epoch, copy.deepcopy(model.state_dict()))
            bar.advance(f"loss {float(loss.detach()):.3f} val {acc['val_acc']:.1f}")
    assert best is not None
    model.load_state_dict(best[2])
    final = accuracy_by_split(model, data)
    return {**final, "best_epoch": best[1], "history": history}
