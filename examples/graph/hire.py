"""HIRE (Liu et al. 2022): node-level and relation-level distillation from a heterogeneous GNN.

    python examples/graph/hire.py                 # Fashion-MNIST, 2000 images, 200 epochs (minutes)
    python examples/graph/hire.py --dataset mnist
    python examples/graph/hire.py --quick         # digits, 600 images, 40 epochs (< 60 s)

Graph: :func:`distill.data.graphs.hetero_image_graph`: ``image`` nodes (pixels), ``class`` nodes
linked to the labelled images, ``region`` nodes (cells of a grid over the image plane) linked to the
images with ink there, image-image kNN edges. Models: :class:`distill.models.hetero_gnn.HeteroGNN`,
teacher ``hetero_gnn`` (2 rounds, 64 channels), student ``hetero_gnn_small`` (1 round, 16 channels).
The ``class -> image`` relation is left out of both models: it hands each *labelled* image its own
label while the evaluated images have no such edge, a train/test shift (with it our teacher lost
~9 points of test accuracy on Fashion-MNIST). Training: :func:`distill.strategies.graph.distill_graph`
on the models bound to the graph (:func:`distill.models.hetero_gnn.bind_hetero`): cross-entropy on
the labelled images + ``hire_node`` (+ ``hire_relation``). Prints validation and test accuracy (%).
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.data.graphs import hetero_image_graph
from distill.methods.hire import HIRENode, HIRERelation
from distill.models import create
from distill.models.hetero_gnn import bind_hetero
from distill.strategies.graph import distill_graph

LEAKING_RELATION = "rev_in_class"  # class -> image: a labelled image's own label


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("fashion_mnist", "mnist", "digits"), default="fashion_mnist")
    p.add_argument("--nodes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--node-tau", type=float, default=2.0)
    p.add_argument("--relation-tau", type=float, default=0.5)
    p.add_argument("--relation-weight", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="digits, 600 nodes, 40 epochs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.dataset, args.nodes, args.epochs = "digits", 600, 40
    torch.set_num_threads(1)
    progress = not args.no_progress
    t0 = time.time()
    data = hetero_image_graph(args.dataset, num_nodes=args.nodes, grid=4 if args.dataset == "digits" else 7,
                              val_size=200 if args.nodes < 1500 else 500, seed=args.seed)
    kw = dict(node_types=data.node_types, edge_types=[e for e in data.edge_types if e[1] != LEAKING_RELATION],
              in_dims={t: x.shape[1] for t, x in data.x_dict.items()}, num_classes=data.num_classes)
    print(f"{data.name}: " + ", ".join(f"{t} {x.shape[0]}" for t, x in data.x_dict.items()))

    torch.manual_seed(args.seed)
    teacher, graph = bind_hetero(create("hetero_gnn", **kw), data)
    res = distill_graph(teacher, None, graph, {}, epochs=args.epochs, seed=args.seed, progress=progress)
    print(f"{'teacher HGNN-64 (2 rounds)':<36} val {res['val_acc']:5.1f}  test {res['test_acc']:5.1f}")

    runs = {
        "student HGNN-16 scratch": {},
        "student HGNN-16 + HIRE node": {"hire_node": HIRENode(tau=args.node_tau)},
        "student HGNN-16 + HIRE node+rel": {"hire_node": HIRENode(tau=args.node_tau),
                                            "hire_relation": HIRERelation(node_types=data.node_types,
                                                                          tau=args.relation_tau,
                                                                          weight=args.relation_weight)},
    }
    for name, methods in runs.items():
        torch.manual_seed(1000 + args.seed)
        student, _ = bind_hetero(create("hetero_gnn_small", **kw), data)
        r = distill_graph(student, teacher if methods else None, graph, methods, epochs=args.epochs, seed=args.seed,
                          progress=progress)
        print(f"{name:<36} val {r['val_acc']:5.1f}  test {r['test_acc']:5.1f}  (best epoch {r['best_epoch']})")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
