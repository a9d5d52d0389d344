"""HIRE (Liu et al. 2022, arXiv 2207.11887): node-level and relation-level distillation from a
heterogeneous GNN, checked on numbers worked out with plain loops."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from distill.functional.hire import hire_node_loss, hire_relation_loss, hire_relation_matrix

torch.set_num_threads(1)


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _cos(x: list[float], y: list[float]) -> float:
    return sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))


def test_node_loss_on_hand_numbers() -> None:
    s = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    t = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
    tau = 2.5
    want = tau ** 2 * sum(_kl(_softmax([v / tau for v in tr]), _softmax([v / tau for v in sr]))
                          for sr, tr in zip(s, t)) / 2
    got = hire_node_loss(torch.tensor(s), torch.tensor(t), tau)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_relation_loss_on_hand_numbers() -> None:
    # types: "img" (3 nodes), "cls" (2 nodes), "pix" (2 nodes); student width 2, teacher width 3
    s = {"img": [[1.0, 0.0], [0.5, 0.5], [-1.0, 2.0]], "cls": [[1.0, 1.0], [0.0, -1.0]], "pix": [[2.0, 0.1], [0.3, 1.0]]}
    t = {"img": [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 2.0, -1.0]], "cls": [[0.5, 0.5, 0.0], [1.0, -1.0, 2.0]],
         "pix": [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]}
    pairs = [("img", "cls"), ("cls", "pix"), ("pix", "img")]
    tau = 0.5

    def rel(emb: dict, a: str, b: str) -> list[list[float]]:
        return [_softmax([_cos(x, y) / tau for y in emb[b]]) for x in emb[a]]

    want = 0.0
    for a, b in pairs:
        rs, rt = rel(s, a, b), rel(t, a, b)
        want += sum(_kl(pt, ps) for ps, pt in zip(rs, rt)) / len(rs)
    want = tau ** 2 * want / len(pairs)
    got = hire_relation_loss({k: torch.tensor(v) for k, v in s.items()}, {k: torch.tensor(v) for k, v in t.items()},
                             pairs, tau)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # the matrix itself: row i of exp(log R) is the softmax of cosines
    r = hire_relation_matrix(torch.tensor(s["img"]), torch.tensor(s["cls"]), tau).exp()
    assert torch.allclose(r, torch.tensor(rel(s, "img", "cls")), atol=1e-6)


def test_relation_loss_errors() -> None:
    e = {"a": torch.randn(3, 2), "b": torch.randn(2, 2)}
    with pytest.raises(ValueError, match="different node types"):
        hire_relation_loss(e, e, [("a", "a")])
    with pytest.raises(KeyError, match="no embeddings of node type 'c'"):
        hire_relation_loss(e, e, [("a", "c")])
    with pytest.raises(ValueError, match="tau must be > 0"):
        hire_node_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0.2, 5.0), scale=st.floats(0.1, 10.0))
def test_relation_loss_properties(seed: int, tau: float, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    t = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(3, 3, generator=g)}
    s = {"a": torch.randn(4, 2, generator=g, requires_grad=True), "b": torch.randn(3, 2, generator=g, requires_grad=True)}
    pairs = [("a", "b"), ("b", "a")]
    # zero when the student's embeddings are the teacher's; never negative
    assert hire_relation_loss(t, t, pairs, tau).abs().item() < 1e-5
    loss = hire_relation_loss(s, t, pairs, tau)
    assert loss.item() >= -1e-6
    # cosine correlations: rescaling a node's embedding leaves the loss unchanged
    scaled = {"a": s["a"] * scale, "b": s["b"]}
    assert hire_relation_loss(scaled, t, pairs, tau).item() == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    # the gradient reaches the student's embeddings, the teacher's need none
    loss.backward()
    assert s["a"].grad is not None and s["b"].grad is not None
    assert not t["a"].requires_grad


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0.2, 5.0))
def test_node_loss_properties(seed: int, tau: float) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(5, 4, generator=g)
    assert hire_node_loss(t, t, tau).abs().item() < 1e-5
    assert hire_node_loss(torch.randn(5, 4, generator=g), t, tau).item() >= -1e-6


# ------------------------------------------------------------------------------------------ models and methods

# the tests below need torch_geometric; those above are pure math and run without it
needs_torch_geometric = pytest.mark.skipif(importlib.util.find_spec("torch_geometric") is None,
                                 reason="torch_geometric is not installed: pip install 'distill[graph]'")

from distill.data.graphs import HeteroGraphData  # noqa: E402
from distill.methods import create_method  # noqa: E402
from distill.methods.hire import HIRENode, HIRERelation  # noqa: E402
from distill.models import create  # noqa: E402
from distill.models.hetero_gnn import bind_hetero  # noqa: E402
from distill.strategies.graph import distill_graph  # noqa: E402


def _tiny_hetero(seed: int = 0) -> HeteroGraphData:
    g = torch.Generator().manual_seed(seed)
    n, k, r = 24, 3, 4
    y = torch.arange(n) % k
    x = torch.rand(n, 6, generator=g) + torch.nn.functional.one_hot(y, 6).float()
    train = torch.arange(n) < 9
    val = (torch.arange(n) >= 9) & (torch.arange(n) < 15)
    sim = torch.stack([torch.arange(n), (torch.arange(n) + k) % n])
    sim = torch.cat([sim, sim.flip(0)], 1)
    tr = train.nonzero().flatten()
    cells = torch.randint(r, (n,), generator=g)
    edges = {("image", "similar", "image"): sim,
             ("image", "in_class", "class"): torch.stack([tr, y[tr]]),
             ("image", "has", "region"): torch.stack([torch.arange(n), cells]),
             ("region", "rev_has", "image"): torch.stack([cells, torch.arange(n)])}
    return HeteroGraphData({"image": x, "class": torch.eye(k), "region": torch.eye(r)}, edges, y, train, val,
                           ~(train | val), k)


def _kw(data: HeteroGraphData) -> dict:
    return dict(node_types=data.node_types, edge_types=data.edge_types,
                in_dims={t: x.shape[1] for t, x in data.x_dict.items()}, num_classes=data.num_classes)


@needs_torch_geometric
def test_hetero_gnn_shapes_taps_and_binding() -> None:
    data = _tiny_hetero()
    torch.manual_seed(0)
    model = create("hetero_gnn", **_kw(data), dropout=0.0).eval()
    out = model(data.x_dict, data.edge_index_dict)
    assert out.shape == (24, 3)
    bound, graph = bind_hetero(model, data)
    assert torch.equal(graph.edge_index, data.edge_index_dict[("image", "similar", "image")])
    assert torch.allclose(bound(graph.x, graph.edge_index), out)
    # the call's edge_index replaces the image-image relation: dropping it changes the output
    assert not torch.allclose(bound(graph.x, graph.edge_index[:, :0]), out)
    names = dict(bound.named_modules())
    assert {"embeds.1.image", "embeds.1.class", "embeds.1.region"} <= set(names)
    small = create("hetero_gnn_small", **_kw(data))
    assert small.hidden == 16 and len(small.convs) == 1
    for conv in ("graph", "gat"):
        other = create("hetero_gnn", **_kw(data), conv=conv, hidden=8, heads=2).eval()
        assert other(data.x_dict, data.edge_index_dict).shape == (24, 3)
    # a type without features gets a learned embedding per node
    kw = _kw(data)
    kw["in_dims"] = {"image": 6, "region": 4}
    emb = create("hetero_gnn", **kw, hidden=8, num_nodes={"class": 3}).eval()
    assert emb(data.x_dict, data.edge_index_dict).shape == (24, 3)
    with pytest.raises(ValueError, match="num_nodes\\['class'\\]"):
        create("hetero_gnn", **kw)
    with pytest.raises(ValueError, match="target 'paper'"):
        create("hetero_gnn", **_kw(data), target="paper")


@needs_torch_geometric
def test_hire_methods_read_views_and_match_the_functional() -> None:
    g = torch.Generator().manual_seed(1)
    sv = {"logits": torch.randn(5, 3, generator=g), "embeds.0.image": torch.randn(5, 4, generator=g),
          "embeds.0.class": torch.randn(3, 4, generator=g)}
    tv = {"logits": torch.randn(5, 3, generator=g), "embeds.1.image": torch.randn(5, 8, generator=g),
          "embeds.1.class": torch.randn(3, 8, generator=g)}
    node = create_method("hire_node", tau=3.0)
    assert node(sv, tv, None).item() == pytest.approx(hire_node_loss(sv["logits"], tv["logits"], 3.0).item())
    rel = HIRERelation(node_types=("image", "class"), tau=0.7)
    assert rel.pairs == [("image", "class"), ("class", "image")]
    assert rel.student_taps == ["embeds.0.image", "embeds.0.class"]
    want = hire_relation_loss({"image": sv["embeds.0.image"], "class": sv["embeds.0.class"]},
                              {"image": tv["embeds.1.image"], "class": tv["embeds.1.class"]}, rel.pairs, 0.7)
    assert rel(sv, tv, None).item() == pytest.approx(want.item())
    with pytest.raises(ValueError, match="at least two"):
        HIRERelation(node_types=("image",))
    with pytest.raises(ValueError, match="distinct types"):
        HIRERelation(node_types=("image", "class"), pairs=[("image", "image")])
    with pytest.raises(KeyError, match="no tap 'embeds.0.region'"):
        HIRERelation(node_types=("image", "region"))(sv, tv, None)


@needs_torch_geometric
def test_hire_trains_a_hetero_student_through_distill_graph() -> None:
    data = _tiny_hetero()
    torch.manual_seed(0)
    teacher, graph = bind_hetero(create("hetero_gnn", **_kw(data), hidden=8), data)
    distill_graph(teacher, None, graph, {}, epochs=5, progress=False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(1)
    student, _ = bind_hetero(create("hetero_gnn_small", **_kw(data), hidden=4), data)
    methods = {"hire_node": HIRENode(tau=2.0), "hire_relation": HIRERelation(tau=0.5, weight=2.0)}
    result = distill_graph(student, teacher, graph, methods, epochs=3, progress=False)
    parts = result["history"][0]
    assert parts["hire_node"] > 0 and parts["hire_relation"] > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
