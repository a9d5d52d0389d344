"""YASENN: a network explained by partitioning its sequences of activations with layer-wise boosted trees.

Paper: Y. Zharov, D. Korzhenkov, P. Shvechikov, A. Tuzhilin, "YASENN: Explaining Neural Networks via
Partitioning Activation Sequences", 2018, arXiv 1811.02783. Only the abstract could be read here; the
procedure below is what the abstract states, and each choice it leaves open is ours (marked so):

1. *layer-wise distillation*: for each chosen layer ``l`` a gradient-boosted tree ensemble ``G_l``
   (scikit-learn's ``GradientBoostingClassifier``) learns the network's predicted class from that layer's
   activations ``a_l(x)``; its disagreement with the network is the layer's *distillation error*;
2. *codes*: each sample's activation sequence ``(a_1(x), ..., a_L(x))`` is encoded by the leaf indices it
   reaches in every tree of ``G_1, ..., G_L``;
3. *partitions*: the finitely many distinct codes partition the input space; each partition is labelled by
   the network's majority prediction inside it (its *fidelity*: the share of samples whose prediction is
   that label, on training and held-out data), and described by an interpretable model trained to tell
   its samples from the others (:meth:`YasennResult.describe`: a shallow decision tree on the input
   features, whose rules are printed).

Ours: what ``G_l`` is trained on (the network's predicted class, not the activations of the next layer),
its size (``n_trees`` stages of depth ``depth``: small, so that codes stay few), and the describing model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.batch import Batch
from distill.data.loader import in_memory_tensors
from distill.papers import Paper
from distill.strategies.registry import register_strategy
from distill.taps import Taps, run_tapped
from distill.train.loop import FitResult

__all__ = ["YASENN", "YasennResult", "activation_sequences", "fit_yasenn", "partition_codes"]

YASENN = Paper("YASENN: Explaining Neural Networks via Partitioning Activation Sequences",
               "Y. Zharov, D. Korzhenkov, P. Shvechikov, A. Tuzhilin", 2018, "1811.02783", None)


@torch.no_grad()
def activation_sequences(model: nn.Module, x: Tensor, layers: Sequence[str], batch_size: int = 512
                         ) -> tuple[list[Tensor], Tensor]:
    """The activations ``(N, D_l)`` (flattened) at each tap path of ``layers`` and the logits ``(N, K)`` of
    ``model`` (in eval mode) on ``x`` ``(N, ...)``."""
    taps = Taps(model, layers, model_name="teacher")
    was_training = model.training
    model.eval()
    acts: list[list[Tensor]] = [[] for _ in layers]
    logits = []
    try:
        for start in range(0, x.shape[0], batch_size):
            out, store = run_tapped(model, Batch(x[start:start + batch_size]), taps)
            logits.append(out.float())
            for i, path in enumerate(layers):
                acts[i].append(store[path].flatten(1).float())
    finally:
        taps.remove()
        model.train(was_training)
    return [torch.cat(a) for a in acts], torch.cat(logits)


def partition_codes(leaves: Sequence[np.ndarray], table: dict[tuple[int, ...], int] | None = None
                    ) -> tuple[np.ndarray, dict[tuple[int, ...], int]]:
    """Partition ids ``(N,)`` of the samples whose leaf indices per layer are ``leaves[l]`` ``(N, T_l)``: one id
    per distinct concatenated code. With ``table`` (code → id, from the training data) an unseen code gets -1
    and the table is not extended; without it a new table is built (ids in order of first appearance)."""
    codes = np.concatenate([np.asarray(lv).reshape(len(lv), -1) for lv in leaves], axis=1).astype(np.int64)
    build = table is None
    table = {} if table is None else table
    ids = np.empty(len(codes), dtype=np.int64)
    for i, row in enumerate(map(tuple, codes.tolist())):
        if build and row not in table:
            table[row] = len(table)
        ids[i] = table.get(row, -1)
    return ids, table


def _majority(ids: np.ndarray, pred: np.ndarray) -> dict[int, int]:
    out: dict[int, Counter] = {}
    for p, c in zip(ids.tolist(), pred.tolist()):
        out.setdefault(p, Counter())[c] += 1
    return {p: cnt.most_common(1)[0][0] for p, cnt in out.items()}


@dataclass
class YasennResult(FitResult):
    """What :func:`fit_yasenn` found.

    ``layers``: the tap paths; ``layer_agreement_train`` / ``layer_agreement_val``: % of samples where each
    layer's trees predict the network's class (100 − the layer's distillation error); ``num_partitions``;
    ``partition_fidelity_train`` / ``partition_fidelity_val``: % of samples whose network prediction is their
    partition's label (validation: among samples whose code was seen in training, ``val_coverage`` % of them);
    ``partition_sizes``: training samples per partition; ``ids``: each training sample's partition.
    """

    layers: list[str] = field(default_factory=list)
    layer_agreement_train: list[float] = field(default_factory=list)
    layer_agreement_val: list[float] = field(default_factory=list)
    num_partitions: int = 0
    partition_fidelity_train: float | None = None
    partition_fidelity_val: float | None = None
    val_coverage: float | None = None
    teacher_acc: float | None = None
    partition_labels: dict[int, int] = field(default_factory=dict)
    partition_sizes: dict[int, int] = field(default_factory=dict)
    ids: np.ndarray | None = None
    inputs: np.ndarray | None = None
    trees: list[Any] = field(default_factory=list)
    table: dict[tuple[int, ...], int] = field(default_factory=dict)

    def describe(self, partition: int, feature_names: Sequence[str] | None = None, max_depth: int = 2,
                 seed: int = 0) -> tuple[float, str]:
        """A shallow decision tree on the inputs telling ``partition``'s training samples from the rest:
        its training accuracy (%) and its rules as text."""
        from sklearn.tree import DecisionTreeClassifier, export_text

        if self.ids is None or self.inputs is None or partition not in self.partition_sizes:
            raise ValueError(f"unknown partition {partition!r}; partitions: 0..{self.num_partitions - 1}")
        target = (self.ids == partition).astype(int)
        tree = DecisionTreeClassifier(max_depth=max_depth, random_state=seed).fit(self.inputs, target)
        names = list(feature_names) if feature_names is not None else [f"x{j}" for j in range(self.inputs.shape[1])]
        return 100.0 * float(tree.score(self.inputs, target)), export_text(tree, feature_names=names)


def _default_layers(model: nn.Module) -> list[str]:
    points = getattr(model, "tap_points", ())
    layers = [p for p in points if p.startswith("hidden") and "." not in p]
    if not layers:
        raise ValueError("fit_yasenn: the teacher declares no hidden layers (tap_points 'hidden1', ...): pass "
                         "layers=[...] (tap paths whose activations form the sequence)")
    return layers


@register_strategy("yasenn", "explanation", YASENN)
def fit_yasenn(
    student: Any,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int | None = None,
    layers: Sequence[str] | None = None,
    n_trees: int = 2,
    depth: int = 2,
    learning_rate: float = 0.5,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
) -> YasennResult:
    """Partition the teacher's activation sequences with layer-wise boosted trees (YASENN).

    Args:
        student: ``"gbdt"`` (the layer-wise gradient-boosted trees are the student).
        train_loader / val_loader: in-memory data (``InMemoryLoader``, ``TensorData`` or ``(x, y)``).
        teacher: the trained network explained.
        epochs: unused (the trees are fitted by scikit-learn); ``None`` or 1.
        layers: tap paths of the activations (default: the zoo MLP's ``hidden1, hidden2, ...``).
        n_trees, depth, learning_rate: each layer's ``GradientBoostingClassifier`` (ours: few shallow trees,
            so that the number of codes stays small; the paper's values could not be read here).
        run_dir, progress: accepted for the convention; nothing is written or shown.
    """
    from sklearn.ensemble import GradientBoostingClassifier

    if student != "gbdt":
        raise ValueError(f"student must be 'gbdt' (YASENN's layer-wise gradient-boosted trees); got {student!r}")
    if epochs not in (None, 1):
        raise ValueError(f"the trees are fitted by scikit-learn: epochs must be None (or 1), got {epochs!r}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be the trained network to explain (an nn.Module), got {type(teacher).__name__}")
    for name, v in (("n_trees", n_trees), ("depth", depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    layers = list(layers) if layers is not None else _default_layers(teacher)
    x, _, _ = in_memory_tensors(train_loader, "yasenn")
    acts, logits = activation_sequences(teacher, x, layers)
    pred = logits.argmax(1).numpy()
    if len(np.unique(pred)) < 2:
        raise ValueError("yasenn: the teacher predicts a single class on the training data; nothing to partition")
    trees, leaves, agree = [], [], []
    for a in acts:
        g = GradientBoostingClassifier(n_estimators=n_trees, max_depth=depth, learning_rate=learning_rate,
                                       random_state=seed).fit(a.numpy(), pred)
        trees.append(g)
        leaves.append(g.apply(a.numpy()))
        agree.append(100.0 * float((g.predict(a.numpy()) == pred).mean()))
    ids, table = partition_codes(leaves)
    labels = _majority(ids, pred)
    sizes = dict(Counter(ids.tolist()))
    result = YasennResult(layers=layers, layer_agreement_train=agree, num_partitions=len(table),
                          partition_fidelity_train=100.0 * float(np.mean([labels[i] == c for i, c in zip(ids, pred)])),
                          partition_labels=labels, partition_sizes=sizes, ids=ids,
                          inputs=x.flatten(1).double().numpy(), trees=trees, table=table)
    if val_loader is not None:
        xv, yv, _ = in_memory_tensors(val_loader, "yasenn")
        acts_v, logits_v = activation_sequences(teacher, xv, layers)
        pred_v = logits_v.argmax(1).numpy()
        result.layer_agreement_val = [100.0 * float((g.predict(a.numpy()) == pred_v).mean())
                                      for g, a in zip(trees, acts_v)]
        ids_v, _ = partition_codes([g.apply(a.numpy()) for g, a in zip(trees, acts_v)], table)
        seen = ids_v >= 0
        result.val_coverage = 100.0 * float(seen.mean())
        if seen.any():
            result.partition_fidelity_val = 100.0 * float(np.mean([labels[i] == c for i, c in
                                                                   zip(ids_v[seen], pred_v[seen])]))
        if yv is not None:
            result.teacher_acc = 100.0 * float((pred_v == yv.numpy()).mean())
    result.history = [{"epoch": 0, "num_partitions": result.num_partitions,
                       "partition_fidelity_train": result.partition_fidelity_train,
                       "val_partition_fidelity": result.partition_fidelity_val, "val_coverage": result.val_coverage}]
    return result
