"""Graph distillation on a kNN graph of real images: a GCN teacher, a narrow GCN student from scratch, with
LSP (local structure preserving, Yang et al. CVPR 2020), with Hinton KD, and with GNN self-distillation
(Chen et al. IJCAI 2021, no teacher).

    python examples/graph/lsp.py                       # Fashion-MNIST, 2000 images, 200 epochs (minutes)
    python examples/graph/lsp.py --dataset mnist
    python examples/graph/lsp.py --quick               # scikit-learn's digits, 500 nodes, 50 epochs (< 60 s)

Graph: :func:`distill.data.graphs.knn_image_graph` (images as nodes, pixels as features, 10 nearest
neighbours by cosine, 20 labels per class). Training: :func:`distill.strategies.graph.distill_graph`
(cross-entropy on the labelled nodes + each method, best-validation epoch kept). Prints validation and
test accuracy (%) of each run.
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.data.graphs import knn_image_graph
from distill.methods import KD, LSP, GNNSelfDistill
from distill.models.gnn import GNN
from distill.strategies.graph import distill_graph
from distill.train.graph import fit_graph


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("fashion_mnist", "mnist", "digits"), default="fashion_mnist")
    p.add_argument("--nodes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lsp-kernel", choices=("rbf", "linear", "poly", "laplacian"), default="rbf")
    p.add_argument("--lsp-sigma", type=float, default=1.0)
    p.add_argument("--lsp-weight", type=float, default=10.0)
    p.add_argument("--quick", action="store_true", help="digits, 500 nodes, 50 epochs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.dataset, args.nodes, args.epochs = "digits", 500, 50
    torch.set_num_threads(1)
    progress = not args.no_progress
    t0 = time.time()
    val_size = 100 if args.nodes < 1000 else 500
    data = knn_image_graph(args.dataset, num_nodes=args.nodes, k=10, val_size=val_size, seed=args.seed)
    f, k = data.x.shape[1], data.num_classes
    print(f"{data.name}: {data.num_nodes} nodes, {data.num_edges} directed edges, {int(data.train_mask.sum())} labelled")

    torch.manual_seed(args.seed)
    teacher = GNN(f, 64, k, conv="gcn")
    res = fit_graph(teacher, data, epochs=args.epochs, seed=args.seed, progress=progress)
    print(f"{'teacher GCN-64':<28} val {res['val_acc']:5.1f}  test {res['test_acc']:5.1f}")

    lsp = dict(kernel=args.lsp_kernel, sigma=args.lsp_sigma, weight=args.lsp_weight)
    runs = {
        "student GCN-8 scratch": ({}, False),
        "student GCN-8 + LSP": ({"lsp": LSP(**lsp)}, True),
        "student GCN-8 + KD": ({"kd": KD(T=2.0)}, True),
        "student GCN-8 + GNN-SD": ({"gnn_sd": GNNSelfDistill()}, False),
    }
    for name, (methods, uses_teacher) in runs.items():
        torch.manual_seed(1000 + args.seed)
        student = GNN(f, 8, k, conv="gcn")
        res = distill_graph(student, teacher if uses_teacher else None, data, methods, epochs=args.epochs,
                            seed=args.seed, progress=progress)
        print(f"{name:<28} val {res['val_acc']:5.1f}  test {res['test_acc']:5.1f}  (best epoch {res['best_epoch']})")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
