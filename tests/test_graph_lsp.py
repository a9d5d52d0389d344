"""LSP (Yang et al., CVPR 2020, arXiv 2003.10477): the local-structure KL against a plainly written per-node
loop and hand-worked numbers; invariants with hypothesis; the method's wiring (taps, batch.edge_index)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill import functional as DF
from distill.batch import Batch, GraphBatch
from distill.methods import LSP, Method, create_method, method_info

# a 5-node graph, symmetric, with a self loop on node 4 (not a neighbour) and node 3 of degree 1
EDGES = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1), (2, 3), (3, 2), (1, 4), (4, 1), (0, 4), (4, 0), (4, 4)]


def _edge_index() -> torch.Tensor:
    return torch.tensor(EDGES, dtype=torch.long).t().contiguous()


def _sim(a: np.ndarray, b: np.ndarray, kernel: str, sigma: float, degree: int, coef: float) -> float:
    if kernel == "rbf":
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma ** 2))
    if kernel == "linear":
        return float((a * b).sum())
    if kernel == "poly":
        return (float((a * b).sum()) + coef) ** degree
    return math.exp(-float(np.abs(a - b).sum()) / sigma)


def _loop_lsp(s: np.ndarray, t: np.ndarray, kernel: str, sigma: float, degree: int, coef: float) -> float:
    """For every node: its neighbours (incoming edges, no self loop), the softmax of the kernel over them
    for teacher and student, KL(teacher || student); then the mean over nodes that have neighbours."""
    n = s.shape[0]
    kls = []
    for i in range(n):
        nbrs = [j for (j, k) in EDGES if k == i and j != i]
        if not nbrs:
            continue
        zs = [math.exp(_sim(s[i], s[j], kernel, sigma, degree, coef)) for j in nbrs]
        zt = [math.exp(_sim(t[i], t[j], kernel, sigma, degree, coef)) for j in nbrs]
        ps = [z / sum(zs) for z in zs]
        pt = [z / sum(zt) for z in zt]
        kls.append(sum(a * math.log(a / b) for a, b in zip(pt, ps)))
    return sum(kls) / len(kls)


@pytest.mark.parametrize("kernel", ["rbf", "linear", "poly", "laplacian"])
def test_lsp_loss_matches_a_per_node_loop(kernel):
    g = np.random.default_rng(3)
    s = g.normal(size=(5, 3)) * 0.8
    t = g.normal(size=(5, 4)) * 0.8  # the teacher is wider: only similarities are compared
    sigma, degree, coef = 0.7, 3, 0.5
    got = DF.lsp_loss(torch.tensor(s), torch.tensor(t), _edge_index(), kernel=kernel, sigma=sigma,
                      degree=degree, coef=coef)
    assert got.item() == pytest.approx(_loop_lsp(s, t, kernel, sigma, degree, coef), rel=1e-10, abs=1e-12)


def test_lsp_loss_hand_numbers_linear_kernel():
    # path 0 - 1 - 2, one-dimensional embeddings. Nodes 0 and 2 have one neighbour each: KL 0.
    # Node 1: student similarities (0·1, 1·3) = (0, 3), teacher's (0·2, 2·2) = (0, 4).
    s = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    t = torch.tensor([[0.0], [2.0], [2.0]], dtype=torch.float64)
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    ps = [1 / (1 + math.e ** 3), math.e ** 3 / (1 + math.e ** 3)]
    pt = [1 / (1 + math.e ** 4), math.e ** 4 / (1 + math.e ** 4)]
    kl = pt[0] * math.log(pt[0] / ps[0]) + pt[1] * math.log(pt[1] / ps[1])
    assert DF.lsp_loss(s, t, ei, kernel="linear").item() == pytest.approx(kl / 3, rel=1e-9)
    rev = ps[0] * math.log(ps[0] / pt[0]) + ps[1] * math.log(ps[1] / pt[1])
    assert DF.lsp_loss(s, t, ei, kernel="linear", reverse=True).item() == pytest.approx(rev / 3, rel=1e-9)
    # a fourth, isolated node has no local structure: the mean stays over the 3 nodes with neighbours
    s4 = torch.cat([s, torch.tensor([[5.0]], dtype=torch.float64)])
    t4 = torch.cat([t, torch.tensor([[-1.0]], dtype=torch.float64)])
    assert DF.lsp_loss(s4, t4, ei, kernel="linear").item() == pytest.approx(kl / 3, rel=1e-9)


def test_local_structure_is_a_distribution_per_node():
    emb = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    ei = _edge_index()
    p = DF.lsp_local_structure(emb, ei, kernel="rbf", sigma=2.0)
    keep = ei[0] != ei[1]
    sums = torch.zeros(5, dtype=p.dtype).index_add(0, ei[1][keep], p)
    assert torch.allclose(sums, torch.ones(5, dtype=p.dtype))
    # node 3 has one neighbour: probability 1
    assert p[(ei[1][keep] == 3)].item() == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["rbf", "linear", "poly", "laplacian"]))
def test_lsp_zero_for_equal_and_nonnegative(seed, kernel):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    ei = _edge_index()
    assert DF.lsp_loss(s, s.clone(), ei, kernel=kernel, sigma=1.3).item() == pytest.approx(0.0, abs=1e-12)
    assert DF.lsp_loss(s, t, ei, kernel=kernel, sigma=1.3).item() >= -1e-12


def test_lsp_self_loops_are_not_neighbours():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    ei = _edge_index()
    no_loop = ei[:, ei[0] != ei[1]]
    assert DF.lsp_loss(s, t, ei).item() == pytest.approx(DF.lsp_loss(s, t, no_loop).item(), rel=1e-6)
    with_loop = DF.lsp_loss(s, t, ei, exclude_self=False).item()
    assert with_loop != pytest.approx(DF.lsp_loss(s, t, no_loop).item(), rel=1e-6)


def test_lsp_errors_name_the_bad_value():
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="outside"):
        DF.lsp_loss(s, t, torch.tensor([[0, 7], [1, 0]]))
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        DF.lsp_loss(s, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same N"):
        DF.lsp_loss(s, torch.randn(4, 3), _edge_index())
    with pytest.raises(ValueError, match="kernel"):
        DF.lsp_loss(s, t, _edge_index(), kernel="cosine")
    with pytest.raises(ValueError, match="kernel"):
        LSP(kernel="cosine")


def test_lsp_method_reads_taps_and_edge_index_and_detaches_teacher():
    info = method_info("lsp")
    assert info.family == "graph" and info.paper.arxiv == "2003.10477"
    m = create_method("lsp", student_tap="convs.0", teacher_tap="convs.1", kernel="laplacian", sigma=3.0)
    assert m.student_taps == ["convs.0"] and m.teacher_taps == ["convs.1"]
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 3, generator=g, requires_grad=True)
    t = torch.randn(5, 8, generator=g, requires_grad=True)
    batch = GraphBatch(torch.zeros(5, 2), edge_index=_edge_index())
    loss = m({"logits": s, "convs.0": s}, {"logits": t, "convs.1": t}, batch)
    expected = _loop_lsp(s.detach().numpy(), t.detach().numpy(), "laplacian", 3.0, 2, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher's embeddings get no gradient
    with pytest.raises(ValueError, match="edge_index"):
        m({"convs.0": s}, {"convs.1": t}, Batch(inputs=torch.zeros(5, 2)))


# ------------------------------------------------------------------------------------------------
# distill_graph: the full-batch loop LSP, GNN-SD, graph-free KD and HIRE train with
# ------------------------------------------------------------------------------------------------


def _tiny_graph(n: int = 60, seed: int = 0):
    from distill.data.graphs import GraphData, knn_edges, split_masks

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 6, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 6).float()
    train, val, test = split_masks(y, 3, 4, 16, g)
    return GraphData(x, knn_edges(x, 4), y, train, val, test, 3, name="tiny")


class _Spy(Method):
    """Records what the loop hands a method; returns a fixed multiple of the student's logits' mean square."""

    needs_teacher = True

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight=weight)
        self.student_taps, self.teacher_taps = ["embeddings.0"], ["embeddings.0"]
        self.seen: list[tuple[dict, dict, Batch]] = []

    def forward(self, student_view, teacher_view, batch):
        self.seen.append((dict(student_view), dict(teacher_view), batch))
        return student_view["logits"].pow(2).mean()


def test_distill_graph_freezes_teacher_selects_on_val_and_hides_eval_labels():
    pytest.importorskip("torch_geometric")
    from distill.models.gnn import GNN
    from distill.strategies.graph import distill_graph
    from distill.train.graph import accuracy_by_split

    data = _tiny_graph()
    torch.manual_seed(0)
    teacher = GNN(6, 16, 3, conv="gcn")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    spy = _Spy(weight=0.5)
    student = GNN(6, 8, 3, conv="gcn")
    out = distill_graph(student, teacher, data, {"spy": spy}, epochs=12, lr=0.05, seed=3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and len(calls) == 1  # frozen, eval mode, one full-batch forward
    vals = [h["val_acc"] for h in out["history"]]
    assert out["best_epoch"] == vals.index(max(vals)) and out["val_acc"] == max(vals)
    assert out["test_acc"] == out["history"][out["best_epoch"]]["test_acc"]
    assert accuracy_by_split(student, data)["val_acc"] == pytest.approx(out["val_acc"])  # best weights restored
    assert out["teacher_val_acc"] == pytest.approx(accuracy_by_split(teacher, data)["val_acc"])
    # the method saw every node, the graph, and training labels only
    s_view, t_view, batch = spy.seen[-1]
    assert s_view["logits"].shape == (60, 3) and s_view["embeddings.0"].shape == (60, 8)
    assert t_view["embeddings.0"].shape == (60, 16) and not t_view["logits"].requires_grad
    assert torch.equal(batch.edge_index, data.edge_index)
    assert (batch.targets[~data.train_mask] == -100).all()
    assert torch.equal(batch.targets[data.train_mask], data.y[data.train_mask])
    # parts are weighted: 0.5 x the method's value
    row = out["history"][0]
    assert row["spy"] == pytest.approx(0.5 * spy.seen[0][0]["logits"].detach().pow(2).mean().item(), rel=1e-5)
    assert row["loss"] == pytest.approx(row["ce"] + row["spy"], rel=1e-5)


def test_distill_graph_lsp_alone_reduces_the_lsp_loss_and_errors():
    pytest.importorskip("torch_geometric")
    from distill.models.gnn import GNN
    from distill.strategies.graph import distill_graph

    data = _tiny_graph(seed=1)
    torch.manual_seed(0)
    teacher = GNN(6, 16, 3, conv="gcn", dropout=0.0)
    student = GNN(6, 4, 3, conv="gcn", dropout=0.0)
    lsp = LSP(kernel="rbf", sigma=0.5)
    out = distill_graph(student, teacher, data, {"lsp": lsp}, epochs=40, lr=0.05, ce=0.0, progress=False)
    first, last = out["history"][0]["lsp"], out["history"][-1]["lsp"]
    assert last < 0.5 * first
    with pytest.raises(ValueError, match="need a teacher"):
        distill_graph(student, None, data, {"lsp": lsp}, epochs=1, progress=False)
    with pytest.raises(ValueError, match="train_mask"):
        bad = _tiny_graph()
        bad.train_mask = bad.train_mask.float()
        distill_graph(student, teacher, bad, {}, epochs=1, progress=False)
