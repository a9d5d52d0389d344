"""GNN-SD (Chen et al., IJCAI 2021, arXiv 2011.02255): NDR, ADR and CGE on hand-worked numbers; the method's
wiring; invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill import functional as DF
from distill.batch import Batch, GraphBatch
from distill.methods import GNNSelfDistill, create_method, method_info

# path 0 - 1 - 2 (both directions) and a self loop on 1 (ignored)
EI = torch.tensor([[0, 1, 1, 2, 1], [1, 0, 2, 1, 1]])
H = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)


def test_ndr_hand_numbers_mean_and_sym():
    # mean: node 0's neighbourhood is h1 = (0, 1): cos 0 -> 1. node 1's is (h0 + h2)/2 = (1, .5):
    # cos((0,1),(1,.5)) = .5/sqrt(1.25). node 2's is h1: cos((1,1),(0,1)) = 1/sqrt 2.
    s = DF.neighborhood_discrepancy_rate(H, EI, "mean")
    expected = [1.0, 1 - 0.5 / math.sqrt(1.25), 1 - 1 / math.sqrt(2)]
    assert s.tolist() == pytest.approx(expected, rel=1e-12)
    # sym: degrees (1, 2, 1); node 1's aggregate = h0/sqrt2 + h2/sqrt2 ∝ (2, 1): cos = 1/sqrt 5
    s = DF.neighborhood_discrepancy_rate(H, EI, "sym")
    assert s.tolist() == pytest.approx([1.0, 1 - 1 / math.sqrt(5), 1 - 1 / math.sqrt(2)], rel=1e-12)
    agg = DF.neighborhood_aggregate(H, EI, "sym")
    assert agg[1].tolist() == pytest.approx([2 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-12)


def test_ndr_isolated_node_is_zero():
    ei = torch.tensor([[0, 1], [1, 0]])  # node 2 has no neighbour
    s = DF.neighborhood_discrepancy_rate(H, ei)
    assert s[2].item() == 0.0 and s[0].item() == pytest.approx(1.0)


def test_adr_hand_numbers_adaptive_and_not():
    s1 = torch.tensor([0.5, 0.2], requires_grad=True)
    s2 = torch.tensor([0.1, 0.1], requires_grad=True)
    s3 = torch.tensor([0.3, 0.4], requires_grad=True)
    # |s1| > |s2|: distil s2 -> s1: ((0.1-0.5)^2 + (0.1-0.2)^2)/2 = 0.085; |s2| < |s3|: skipped
    loss = DF.adr_loss([s1, s2, s3])
    assert loss.item() == pytest.approx(0.085, rel=1e-6)
    loss.backward()
    assert s1.grad is None  # the shallow layer is the (stop-gradient) target
    assert s2.grad.tolist() == pytest.approx([2 * (0.1 - 0.5) / 2, 2 * (0.1 - 0.2) / 2], rel=1e-6)
    assert s3.grad is None  # its pair was not distilled
    # without the indicator the second pair adds ((0.3-0.1)^2 + (0.4-0.1)^2)/2 = 0.065
    assert DF.adr_loss([s1, s2, s3], adaptive=False).item() == pytest.approx(0.15, rel=1e-6)


def test_cge_hand_numbers_one_and_two_graphs():
    h1 = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])
    h2 = torch.tensor([[0.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    # one graph: g1 = (2, 2), g2 = (1, 1): ||g1 - g2||^2 = 2
    assert DF.cge_loss([h1, h2]).item() == pytest.approx(2.0)
    # two graphs {0}, {1, 2}: g1 = [(1,0), (2.5,3)], g2 = [(0,0), (1.5,1.5)]: (1 + 0) + (1 + 2.25) over 2
    batch = torch.tensor([0, 1, 1])
    assert DF.cge_loss([h1, h2], batch).item() == pytest.approx((1.0 + 3.25) / 2)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000))
def test_ndr_is_in_range_and_scale_invariant(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ei = torch.tensor([[0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 0], [1, 2, 3, 4, 5, 0, 0, 1, 2, 3, 4, 5]])
    s = DF.neighborhood_discrepancy_rate(h, ei)
    assert ((s >= -1e-12) & (s <= 2 + 1e-12)).all()
    assert torch.allclose(DF.neighborhood_discrepancy_rate(3.5 * h, ei), s)
    # identical NDRs across layers: nothing to retain
    assert DF.adr_loss([s, s.clone()], adaptive=False).item() == pytest.approx(0.0, abs=1e-15)


def test_method_registration_and_forward():
    info = method_info("gnn_self_distill")
    assert info.family == "graph" and info.paper.arxiv == "2011.02255"
    assert GNNSelfDistill.needs_teacher is False
    m = create_method("gnn_self_distill", taps=("convs.0", "convs.1"), adr=2.0, cge=0.5)
    assert m.student_taps == ["convs.0", "convs.1"] and m.teacher_taps == []
    h1 = H.clone().requires_grad_(True)
    h2 = torch.tensor([[1.0, 1.0], [1.0, 0.9], [0.9, 1.0]], dtype=torch.float64, requires_grad=True)
    batch = GraphBatch(torch.zeros(3, 2), edge_index=EI)
    loss = m({"logits": h2, "convs.0": h1, "convs.1": h2}, {}, batch)
    s1 = DF.neighborhood_discrepancy_rate(H, EI)
    s2 = DF.neighborhood_discrepancy_rate(h2.detach(), EI)
    assert s1.norm() > s2.norm()  # so the pair is distilled
    expected = 2.0 * ((s2 - s1) ** 2).mean() + 0.5 * ((H.mean(0) - h2.detach().mean(0)) ** 2).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    loss.backward()
    assert h2.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2"):
        GNNSelfDistill(taps=("convs.0",))
    with pytest.raises(ValueError, match="edge_index"):
        m({"convs.0": h1, "convs.1": h2}, {}, Batch(inputs=torch.zeros(3, 2)))


def test_gnn_sd_trains_without_a_teacher_through_distill_graph():
    pytest.importorskip("torch_geometric")
    from distill.data.graphs import GraphData, knn_edges, split_masks
    from distill.models.gnn import GNN
    from distill.strategies.graph import distill_graph

    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 6, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 6).float()
    train, val, test = split_masks(y, 3, 4, 16, g)
    data = GraphData(x, knn_edges(x, 4), y, train, val, test, 3)
    torch.manual_seed(0)
    student = GNN(6, 8, 3, layers=3, conv="gcn", dropout=0.0)
    sd = GNNSelfDistill(taps=("convs.0", "convs.1", "convs.2"), adr=3.0)
    out = distill_graph(student, None, data, {"gnn_sd": sd}, epochs=5, lr=0.01, progress=False)
    assert out["teacher_val_acc"] is None
    first = out["history"][0]
    # at initialisation the NDR falls with depth, so the regulariser is active from the first epoch
    assert first["gnn_sd"] > 0 and first["loss"] == pytest.approx(first["ce"] + first["gnn_sd"], rel=1e-5)
