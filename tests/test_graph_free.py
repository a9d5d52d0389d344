"""Graph-Free KD (Deng & Zhang 2021, arXiv 2105.07519): the ARM edge-gradient estimator, the
synthesis objective's parts, and the strategy (which never reads the real graph)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from distill.functional.graph_free import (arm_bernoulli_grad, arm_bernoulli_samples, dense_graphs_to_edge_index,
                                           gfkd_feature_entropy, gfkd_graph_losses)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ the math


def test_arm_samples_on_hand_numbers() -> None:
    # phi = 0 -> sigmoid = 0.5 both ways; phi = ln 3 -> sigmoid(phi) = 0.75, sigmoid(-phi) = 0.25
    phi = torch.tensor([0.0, math.log(3.0), math.log(3.0), -math.log(3.0)])
    u = torch.tensor([0.3, 0.6, 0.2, 0.7])
    plus, minus = arm_bernoulli_samples(phi, u)
    # A+ = 1[u > sigmoid(-phi)]: 0.3 > 0.5 no; 0.6 > 0.25 yes; 0.2 > 0.25 no; 0.7 > 0.75 no
    assert plus.tolist() == [0.0, 1.0, 0.0, 0.0]
    # A- = 1[u < sigmoid(phi)]: 0.3 < 0.5 yes; 0.6 < 0.75 yes; 0.2 < 0.75 yes; 0.7 < 0.25 no
    assert minus.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_arm_grad_on_hand_numbers() -> None:
    u = torch.tensor([[[0.1, 0.9]], [[0.75, 0.5]]])  # (G=2, 1, 2)
    grad = arm_bernoulli_grad(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5]), u)
    # graph 0: (2 - 1) * (u - 0.5) = [-0.4, 0.4]; graph 1: (0.5 - 1.5) * (u - 0.5) = [-0.25, 0]
    assert torch.allclose(grad, torch.tensor([[[-0.4, 0.4]], [[-0.25, 0.0]]]))
    scalar = arm_bernoulli_grad(torch.tensor(3.0), torch.tensor(1.0), u)
    assert torch.allclose(scalar, 2.0 * (u - 0.5))
    with pytest.raises(ValueError, match="leading axes"):
        arm_bernoulli_grad(torch.ones(3), torch.ones(3), u)


def test_arm_estimator_is_unbiased_against_the_closed_form() -> None:
    # f(z) = c . z + d z0 z1 over independent z_k ~ Bernoulli(p_k), p = sigmoid(phi):
    # E f = c . p + d p0 p1, so dE/dphi_k = p_k (1 - p_k) dE/dp_k with
    # dE/dp = (c0 + d p1, c1 + d p0, c2).
    phi = torch.tensor([0.4, -1.2, 2.0], dtype=torch.float64)
    c = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    d = 3.0
    p = torch.sigmoid(phi)
    exact = p * (1 - p) * torch.stack([c[0] + d * p[1], c[1] + d * p[0], c[2]])

    def f(z: torch.Tensor) -> torch.Tensor:  # (S, 3) -> (S,)
        return z @ c + d * z[:, 0] * z[:, 1]

    g = torch.Generator().manual_seed(0)
    s = 400_000
    u = torch.rand(s, 3, generator=g, dtype=torch.float64)
    plus, minus = arm_bernoulli_samples(phi.expand(s, 3), u)
    est = arm_bernoulli_grad(f(plus), f(minus), u)  # (S, 3)
    mean, err = est.mean(0), est.std(0) / math.sqrt(s)
    assert torch.all((mean - exact).abs() < 4 * err + 1e-4), (mean, exact, err)


def test_graph_losses_and_entropy_on_hand_numbers() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]])
    targets = torch.tensor([0, 0, 1, 1])

    def ce(row: list[float], y: int) -> float:
        return -row[y] + math.log(sum(math.exp(v) for v in row))

    rows = logits.tolist()
    want = [(ce(rows[0], 0) + ce(rows[1], 0)) / 2, (ce(rows[2], 1) + ce(rows[3], 1)) / 2]
    assert torch.allclose(gfkd_graph_losses(logits, targets, 2), torch.tensor(want))
    with pytest.raises(ValueError, match="equal graphs"):
        gfkd_graph_losses(logits, targets, 3)
    feats = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]])
    h = -(0.5 * math.log(0.5) * 2 + 0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / 3
    assert gfkd_feature_entropy(feats).item() == pytest.approx(h, rel=1e-6)


def test_dense_graphs_to_edge_index_offsets_graphs_and_drops_self_loops() -> None:
    adj = torch.zeros(2, 3, 3)
    adj[0, 0, 1] = adj[0, 2, 2] = 1  # 0 -> 1 and a self loop (dropped)
    adj[1, 1, 0] = adj[1, 2, 1] = 1  # graph 1: 1 -> 0, 2 -> 1, offset by 3
    ei = dense_graphs_to_edge_index(adj)
    assert sorted(map(tuple, ei.T.tolist())) == [(0, 1), (4, 3), (5, 4)]


# ------------------------------------------------------------------------------------------ the strategy

# the tests below need torch_geometric; those above are pure math and run without it
needs_torch_geometric = pytest.mark.skipif(importlib.util.find_spec("torch_geometric") is None,
                                 reason="torch_geometric is not installed: pip install 'distill[graph]'")

from distill.models import create  # noqa: E402
from distill.strategies.graph_free_kd import graph_free_kd, synthesize_graphs  # noqa: E402


class _Trap:
    """A graph whose every attribute read is an error (GFKD must never read the training graph)."""

    def __getattr__(self, name: str):
        raise AssertionError(f"graph-free KD read the real graph's {name!r}")


class _Recorder:
    """A small real graph that logs each attribute read into ``events``."""

    def __init__(self, events: list[str], n: int = 12, f: int = 5) -> None:
        g = torch.Generator().manual_seed(3)
        self._fields = {"x": torch.rand(n, f, generator=g), "edge_index": torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]),
                        "y": torch.randint(3, (n,), generator=g), "val_mask": torch.arange(n) < 6,
                        "test_mask": torch.arange(n) >= 6}
        self._events = events

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        self._events.append("data")
        return self.__dict__["_fields"][name]


def _teacher(f: int = 5, k: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = create("gcn", in_dim=f, num_classes=k, hidden=8, norm="batch", dropout=0.0)
    teacher.train()
    with torch.no_grad():  # give the BatchNorm running statistics something to hold
        for _ in range(5):
            teacher(torch.rand(20, f) * 2, torch.randint(20, (2, 40)))
    return teacher.eval()


@needs_torch_geometric
def test_graph_free_kd_never_reads_the_training_graph_and_reads_val_data_only_after_training() -> None:
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(1)
    student = create("gcn", in_dim=5, num_classes=3, hidden=4, dropout=0.0)
    events: list[str] = []
    student.register_forward_hook(lambda m, i, o: events.append("train" if m.training else "eval"))
    result = graph_free_kd(student, _Trap(), _Recorder(events), teacher=teacher, num_graphs=2, nodes_per_graph=4,
                           synthesis_steps=3, epochs=4, seed=0, progress=False)
    assert events.count("train") == 4
    last_train = max(i for i, e in enumerate(events) if e == "train")
    assert "data" in events and events.index("data") > last_train
    assert result.val_acc is not None and result.test_acc is not None
    assert result.graphs.x.shape == (8, 5) and result.graphs.targets.shape == (8,)
    # the teacher is frozen: weights and BatchNorm buffers unchanged
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@needs_torch_geometric
def test_graph_free_kd_student_loss_is_the_temperature_scaled_kl() -> None:
    teacher = _teacher()
    torch.manual_seed(1)
    student = create("gcn", in_dim=5, num_classes=3, hidden=4, dropout=0.0)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    t = 3.0
    result = graph_free_kd(student, teacher=teacher, num_graphs=2, nodes_per_graph=4, synthesis_steps=2, epochs=2,
                           temperature=t, seed=0, progress=False)
    fresh = create("gcn", in_dim=5, num_classes=3, hidden=4, dropout=0.0)
    fresh.load_state_dict(initial)
    with torch.no_grad():
        s = fresh(result.graphs.x, result.graphs.edge_index).double()
        tl = teacher(result.graphs.x, result.graphs.edge_index).double()
    # T^2 * mean_i sum_k p_ik (log p_ik - log q_ik), p the teacher's and q the student's softmax at T
    p, log_p, log_q = (tl / t).softmax(1), (tl / t).log_softmax(1), (s / t).log_softmax(1)
    want = t * t * float((p * (log_p - log_q)).sum(1).mean())
    assert result.kd_history[0] == pytest.approx(want, rel=1e-4)


@needs_torch_geometric
def test_structure_learning_alone_lowers_the_synthesis_loss() -> None:
    # features frozen (a vanishing lr): only the ARM updates of the edge logits can lower the loss
    teacher = _teacher()
    graphs = synthesize_graphs(teacher, 5, 3, num_graphs=4, nodes_per_graph=6, steps=60, lr_features=1e-12,
                               lr_structure=0.5, bn_weight=0.0, seed=0, progress=False)
    ce = [h["ce"] for h in graphs.history]
    assert sum(ce[-10:]) / 10 < sum(ce[:10]) / 10 - 0.02, (ce[:10], ce[-10:])


@needs_torch_geometric
def test_feature_kinds() -> None:
    teacher = _teacher()
    onehot = synthesize_graphs(teacher, 5, 3, num_graphs=2, nodes_per_graph=3, steps=2, features="onehot",
                               onehot_weight=0.5, progress=False)
    assert torch.allclose(onehot.x.sum(1), torch.ones(6)) and bool((onehot.x > 0).all())
    unit = synthesize_graphs(teacher, 5, 3, num_graphs=2, nodes_per_graph=3, steps=2, features="unit", progress=False)
    assert bool(((unit.x > 0) & (unit.x < 1)).all())
    assert len(unit.history) == 2 and {"loss", "ce", "bn"} <= set(unit.history[0])


@needs_torch_geometric
def test_graph_free_kd_errors() -> None:
    plain = create("gcn", in_dim=5, num_classes=3, hidden=8)
    with pytest.raises(ValueError, match="no BatchNorm"):
        synthesize_graphs(plain, 5, 3, steps=1, progress=False)
    with pytest.raises(ValueError, match="features must be one of"):
        synthesize_graphs(_teacher(), 5, 3, steps=1, features="pixels", progress=False)
    with pytest.raises(ValueError, match="temperature"):
        graph_free_kd(create("gcn", in_dim=5, num_classes=3), teacher=_teacher(), temperature=0.0, progress=False)
