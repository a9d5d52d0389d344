"""The graph core of issue 16: kNN image graphs, the heterogeneous image graph, the GNN zoo, fit_graph."""

from __future__ import annotations

import pytest
import torch

from distill.batch import GraphBatch, run_model
from distill.data import graphs


def test_knn_edges_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(9, 5, generator=g)
    got = graphs.knn_edges(x, k=2)
    unit = x / x.norm(dim=1, keepdim=True)
    want = set()
    for i in range(9):
        sims = [(float(unit[i] @ unit[j]), j) for j in range(9) if j != i]
        for _, j in sorted(sims, key=lambda t: -t[0])[:2]:
            want |= {(i, j), (j, i)}
    assert set(map(tuple, got.T.tolist())) == want
    assert got.shape[1] == len(want)  # no duplicates
    assert not (got[0] == got[1]).any()
    with pytest.raises(ValueError, match="k must be in"):
        graphs.knn_edges(x, k=9)


def test_split_masks_are_disjoint_and_balanced():
    y = torch.arange(60) % 3
    train, val, test = graphs.split_masks(y, 3, train_per_class=4, val_size=10, generator=torch.Generator().manual_seed(1))
    assert (train.int() + val.int() + test.int() == 1).all()
    assert torch.bincount(y[train], minlength=3).tolist() == [4, 4, 4]
    assert int(val.sum()) == 10 and int(test.sum()) == 38
    with pytest.raises(ValueError, match="class 2 has"):
        graphs.split_masks(torch.tensor([0, 1, 2, 0, 1]), 3, 2, 0, torch.Generator())


def test_knn_image_graph_on_digits_is_deterministic_and_labelled():
    a = graphs.knn_image_graph("digits", num_nodes=300, k=5, train_per_class=5, val_size=50, seed=3)
    b = graphs.knn_image_graph("digits", num_nodes=300, k=5, train_per_class=5, val_size=50, seed=3)
    c = graphs.knn_image_graph("digits", num_nodes=300, k=5, train_per_class=5, val_size=50, seed=4)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)
    assert a.x.shape == (300, 64) and a.num_classes == 10 and int(a.train_mask.sum()) == 50
    # kNN over pixels links mostly same-class images (homophily), far above chance (0.1)
    same = (a.y[a.edge_index[0]] == a.y[a.edge_index[1]]).float().mean()
    assert same > 0.8
    batch = a.batch("val")
    assert isinstance(batch, GraphBatch)
    assert (batch.targets[a.val_mask] == a.y[a.val_mask]).all() and (batch.targets[~a.val_mask] == -100).all()


def test_hetero_graph_links_classes_to_training_images_only():
    h = graphs.hetero_image_graph("digits", num_nodes=200, k=4, grid=4, region_threshold=0.25,
                                  train_per_class=3, val_size=40, seed=0)
    src, dst = h.edge_index_dict[("image", "in_class", "class")]
    assert h.train_mask[src].all() and (h.y[src] == dst).all() and len(src) == 30
    rev = h.edge_index_dict[("class", "rev_in_class", "image")]
    assert torch.equal(rev, torch.stack([dst, src]))
    # the region edges are exactly the cells whose mean intensity exceeds the threshold
    images = graphs._pick_nodes("digits", 200, 0, "train")[0]
    cell = images[:, 0, :2, 2:4].mean(dim=(1, 2))  # cell (row 0, col 1) of a 4×4 grid on 8×8 images
    img, reg = h.edge_index_dict[("image", "has", "region")]
    assert set(img[reg == 1].tolist()) == set((cell > 0.25).nonzero().flatten().tolist())
    assert h.x_dict["region"].shape == (16, 16) and h.x_dict["class"].shape == (10, 10)


def test_gnn_zoo_taps_and_fit_graph():
    pytest.importorskip("torch_geometric")
    from distill.models import create
    from distill.taps import Taps
    from distill.train.graph import accuracy_by_split, fit_graph

    data = graphs.knn_image_graph("digits", num_nodes=300, k=5, train_per_class=5, val_size=50, seed=0)
    for name in ("gcn", "gat", "sage", "mlp_graph"):
        torch.manual_seed(0)
        model = create(name, in_dim=64, num_classes=10, hidden=16, layers=3, **({"heads": 2} if name == "gat" else {}))
        taps = Taps(model, ["convs.0", "embeddings.1", "convs.2"])
        with taps.recording() as store:
            logits = run_model(model, data.batch())
        assert logits.shape == (300, 10) and store["embeddings.1"].shape == (300, 16)
        assert torch.equal(store["convs.2"], logits)
        taps.remove()
    torch.manual_seed(0)
    model = create("gcn", in_dim=64, num_classes=10, hidden=32)
    before = accuracy_by_split(model, data)["val_acc"]
    result = fit_graph(model, data, epochs=30, progress=False)
    assert result["val_acc"] == max(h["val_acc"] for h in result["history"])  # the best epoch is kept
    assert result["val_acc"] > before + 20
    assert accuracy_by_split(model, data)["val_acc"] == result["val_acc"]
    with pytest.raises(ValueError, match="needs edge_index"):
        model(data.x)
