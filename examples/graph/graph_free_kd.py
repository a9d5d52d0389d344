"""Graph-Free KD (Deng & Zhang, IJCAI 2021): distil a GCN into a narrower GCN without reading any graph.

    python examples/graph/graph_free_kd.py                 # Fashion-MNIST, 2000 images (minutes)
    python examples/graph/graph_free_kd.py --dataset digits --nodes 1500
    python examples/graph/graph_free_kd.py --quick         # digits, 600 images, short stages (< 60 s)

The teacher (a 2-layer GCN with BatchNorm after its hidden layer, 64 units) is trained on a kNN graph
of real images (:func:`distill.data.graphs.knn_image_graph`). Then
:func:`distill.strategies.graph_free_kd.graph_free_kd` synthesises graphs from the teacher alone
(features + Bernoulli edges, BatchNorm statistics and random target classes) and trains the student
on them with KD only; the real graph is read afterwards, to measure the student. For comparison, the
same student trained on the real graph from scratch (labels) and with KD from the same teacher.
Prints validation and test accuracy (%) of each.
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.data.graphs import knn_image_graph
from distill.methods import KD
from distill.models.gnn import GNN
from distill.strategies.graph import distill_graph
from distill.strategies.graph_free_kd import graph_free_kd
from distill.train.graph import fit_graph


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("fashion_mnist", "mnist", "digits"), default="fashion_mnist")
    p.add_argument("--nodes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=200, help="teacher and real-graph students")
    p.add_argument("--synthesis-steps", type=int, default=1500)
    p.add_argument("--kd-epochs", type=int, default=300, help="the graph-free student's epochs")
    p.add_argument("--bn-weight", type=float, default=1.0,
                   help="lambda_BN (the authors' MUTAG value is 0.01; 1.0 did better on our image graphs)")
    p.add_argument("--features", choices=("free", "unit", "onehot"), default="free")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="digits, 600 nodes, 120 epochs, 100 synthesis steps, 60 KD epochs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.dataset, args.nodes, args.epochs, args.synthesis_steps, args.kd_epochs = "digits", 600, 120, 100, 60
    torch.set_num_threads(1)
    progress = not args.no_progress
    t0 = time.time()
    data = knn_image_graph(args.dataset, num_nodes=args.nodes, k=10, val_size=200 if args.nodes < 1500 else 500,
                           seed=args.seed)
    f, k = data.x.shape[1], data.num_classes
    print(f"{data.name}: {data.num_nodes} nodes, {data.num_edges} directed edges")

    torch.manual_seed(args.seed)
    teacher = GNN(f, 64, k, conv="gcn", norm="batch")
    res = fit_graph(teacher, data, epochs=args.epochs, seed=args.seed, progress=progress)
    print(f"{'teacher GCN-64 + BatchNorm':<36} val {res['val_acc']:5.1f}  test {res['test_acc']:5.1f}")

    def student() -> GNN:
        torch.manual_seed(1000 + args.seed)
        return GNN(f, 16, k, conv="gcn")

    for name, methods, t in (("student GCN-16 scratch (real graph)", {}, None),
                             ("student GCN-16 + KD (real graph)", {"kd": KD(T=2.0)}, teacher)):
        r = distill_graph(student(), t, data, methods, epochs=args.epochs, seed=args.seed, progress=progress)
        print(f"{name:<36} val {r['val_acc']:5.1f}  test {r['test_acc']:5.1f}")

    s = student()
    s.dropout = 0.0  # the synthetic features carry their signal in small directions that input dropout drowns
    gf = graph_free_kd(s, None, data, teacher=teacher, synthesis_steps=args.synthesis_steps, epochs=args.kd_epochs,
                       bn_weight=args.bn_weight, features=args.features, seed=args.seed, progress=progress)
    print(f"{'student GCN-16 graph-free KD':<36} val {gf.val_acc:5.1f}  test {gf.test_acc:5.1f}  "
          f"(synthesis loss {gf.graphs.loss:.3f}, agreement with the teacher on the synthetic nodes "
          f"{gf.synthetic_agreement:.1f}%)")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
