"""Graph distillation benchmark (issue 16): node classification on kNN graphs over real images.

For each data set (Fashion-MNIST, MNIST: :func:`distill.data.graphs.knn_image_graph`, 2000 images, k = 10,
20 labelled nodes per class, 500 validation nodes, the rest test) and each seed (the seed draws the
images, the split and every initialisation): a teacher (a 2-layer GCN, 64 hidden units) trained on the
labelled nodes with :func:`distill.train.graph.fit_graph`, then every row of :data:`ROWS`: a student
from scratch or with a method, through :func:`distill.strategies.graph.distill_graph` (or the row's own
runner). Every run keeps the epoch with the best validation accuracy and reports its test accuracy;
the table gives mean ± std over the seeds and, per row, the change against its baseline row (the same
student without the method), seed by seed.

    python benchmarks/graph.py --quick          # 1 seed, 600 nodes, 60 epochs: < 2 min
    python benchmarks/graph.py                  # 3 seeds, 2000 nodes, 100 epochs

Adding a row (e.g. helper K2's graph-free KD and HIRE): one entry in ``ROWS``. ``Row(student, methods)``
trains ``STUDENTS[student]`` with ``distill_graph(..., methods(ctx))``; ``Row(..., run=fn)`` calls
``fn(ctx) -> {"val_acc", "test_acc"}`` (in %) instead, with ``ctx`` a :class:`Context` (the graph, the
trained teacher, the seed, the epochs; ``ctx.student(name)`` builds a fresh seeded student).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from distill.data.graphs import GraphData, knn_image_graph  # noqa: E402
from distill.methods import KD, LSP, GNNSelfDistill, Method  # noqa: E402
from distill.models.gnn import GNN  # noqa: E402
from distill.strategies.graph import distill_graph  # noqa: E402
from distill.train.graph import fit_graph  # noqa: E402

TEACHER_HIDDEN = 64

# student name -> builder(in_dim, num_classes)
STUDENTS: dict[str, Callable[[int, int], nn.Module]] = {
    "gcn": lambda f, k: GNN(f, 8, k, conv="gcn"),          # a GCN 8x narrower than the teacher
    "mlp": lambda f, k: GNN(f, 64, k, conv="mlp"),         # no message passing at all
}
STUDENT_NAMES = {"gcn": "GCN-8", "mlp": "MLP-64"}


@dataclass
class Context:
    """What a row's runner gets: one data set, one seed, its trained teacher."""

    dataset: str
    seed: int
    data: GraphData
    teacher: nn.Module
    teacher_result: dict[str, Any]
    epochs: int
    quick: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def student(self, name: str) -> nn.Module:
        """A fresh student ``STUDENTS[name]``, its initialisation seeded by the run's seed."""
        torch.manual_seed(1000 + self.seed)
        return STUDENTS[name](self.data.x.shape[1], self.data.num_classes)


@dataclass(frozen=True)
class Row:
    """One benchmark row: ``student`` trained with ``methods(ctx)`` (none: cross-entropy alone), from the
    teacher when ``teacher``; or ``run(ctx)`` for a row with its own loop. ``baseline`` names the row
    without the method (for the Δ column)."""

    student: str
    methods: Callable[[Context], dict[str, Method]] | None = None
    teacher: bool = True
    baseline: str | None = None
    run: Callable[[Context], dict[str, Any]] | None = None


# LSP on the first hidden layer's embedding (embeddings.0, after ReLU) of teacher and student. Kernel, sigma,
# weight and KD's T were chosen on the validation accuracy of MNIST seed 0 (200 epochs; see docs/graph.md):
# RBF sigma 1 / 3 (weight 1, 10), Laplacian sigma 10 / 100 (weight 1); T 1, 2, 4.
LSP_KW: dict[str, Any] = {"kernel": "laplacian", "sigma": 10.0, "weight": 1.0}
KD_T = 2.0

# ---- helper K2's rows: graph-free KD (a BatchNorm teacher: GFKD matches its statistics) and HIRE (its own
# heterogeneous graph over the same images: hetero_image_graph, same seed). Settings: docs/graph.md.
GFKD_KW: dict[str, Any] = {"bn_weight": 1.0, "features": "free"}


def _bn_teacher(c: Context) -> nn.Module:
    if "bn_teacher" not in c.extra:
        torch.manual_seed(c.seed)
        t = GNN(c.data.x.shape[1], TEACHER_HIDDEN, c.data.num_classes, conv="gcn", norm="batch")
        c.extra["bn_teacher_result"] = fit_graph(t, c.data, epochs=c.epochs, seed=c.seed, progress=False)
        c.extra["bn_teacher"] = t
    return c.extra["bn_teacher"]


def _graph_free(c: Context) -> dict[str, Any]:
    from distill.strategies.graph_free_kd import graph_free_kd

    student = c.student("gcn")
    student.dropout = 0.0  # the synthetic features' signal is small; input dropout drowns it (docs/graph.md)
    r = graph_free_kd(student, None, c.data, teacher=_bn_teacher(c), synthesis_steps=60 if c.quick else 500,
                      epochs=60 if c.quick else 300, seed=c.seed, progress=False, **GFKD_KW)
    return {"val_acc": r.val_acc, "test_acc": r.test_acc}


def _kd_bn(c: Context) -> dict[str, Any]:
    return distill_graph(c.student("gcn"), _bn_teacher(c), c.data, {"kd": KD(T=KD_T)}, epochs=c.epochs, seed=c.seed,
                         progress=False)


def _hire(kind: str) -> Callable[[Context], dict[str, Any]]:
    def run(c: Context) -> dict[str, Any]:
        from distill.data.graphs import hetero_image_graph
        from distill.methods.hire import HIRENode, HIRERelation
        from distill.models import create
        from distill.models.hetero_gnn import bind_hetero

        if "hetero" not in c.extra:
            data = hetero_image_graph(c.dataset, num_nodes=c.data.num_nodes, k=10, train_per_class=20,
                                      val_size=int(c.data.val_mask.sum()), seed=c.seed)
            kw = dict(node_types=data.node_types, in_dims={t: x.shape[1] for t, x in data.x_dict.items()},
                      num_classes=data.num_classes,  # class -> image hands labelled nodes their label: left out
                      edge_types=[e for e in data.edge_types if e[1] != "rev_in_class"])
            torch.manual_seed(c.seed)
            teacher, graph = bind_hetero(create("hetero_gnn", **kw), data)
            c.extra["hetero_teacher_result"] = distill_graph(teacher, None, graph, {}, epochs=c.epochs, seed=c.seed,
                                                             progress=False)
            c.extra["hetero"] = (data, kw, teacher, graph)
        data, kw, teacher, graph = c.extra["hetero"]
        if kind == "teacher":
            return c.extra["hetero_teacher_result"]
        methods: dict[str, Method] = {}
        if kind != "scratch":
            methods["hire_node"] = HIRENode(tau=2.0)
        if kind == "hire":
            methods["hire_relation"] = HIRERelation(node_types=data.node_types, tau=0.5)
        torch.manual_seed(1000 + c.seed)
        student, _ = bind_hetero(create("hetero_gnn_small", **kw), data)
        return distill_graph(student, teacher if methods else None, graph, methods, epochs=c.epochs, seed=c.seed,
                             progress=False)
    return run


ROWS: dict[str, Row] = {
    "GCN-8 scratch": Row("gcn", teacher=False),
    "GCN-8 + KD": Row("gcn", lambda c: {"kd": KD(T=KD_T)}, baseline="GCN-8 scratch"),
    "GCN-8 + LSP": Row("gcn", lambda c: {"lsp": LSP(**LSP_KW)}, baseline="GCN-8 scratch"),
    "GCN-8 + GNN-SD (no teacher)": Row("gcn", lambda c: {"gnn_sd": GNNSelfDistill()}, teacher=False,
                                       baseline="GCN-8 scratch"),
    "MLP-64 scratch": Row("mlp", teacher=False),
    "MLP-64 + KD": Row("mlp", lambda c: {"kd": KD(T=KD_T)}, baseline="MLP-64 scratch"),
    "MLP-64 + LSP": Row("mlp", lambda c: {"lsp": LSP(**LSP_KW)}, baseline="MLP-64 scratch"),
    "teacher GCN-64 + BatchNorm": Row("gcn", run=lambda c: (_bn_teacher(c), c.extra["bn_teacher_result"])[1]),
    "GCN-8 + KD (BN teacher)": Row("gcn", run=_kd_bn, baseline="GCN-8 scratch"),
    "GCN-8 graph-free KD (BN t.)": Row("gcn", run=_graph_free, baseline="GCN-8 scratch"),
    "hetero teacher HGNN-64": Row("gcn", run=_hire("teacher")),
    "HGNN-16 scratch (hetero)": Row("gcn", run=_hire("scratch")),
    "HGNN-16 + HIRE node": Row("gcn", run=_hire("node"), baseline="HGNN-16 scratch (hetero)"),
    "HGNN-16 + HIRE node+relation": Row("gcn", run=_hire("hire"), baseline="HGNN-16 scratch (hetero)"),
}


def run_row(row: Row, ctx: Context) -> dict[str, Any]:
    if row.run is not None:
        return row.run(ctx)
    methods = row.methods(ctx) if row.methods is not None else {}
    return distill_graph(ctx.student(row.student), ctx.teacher if row.teacher else None, ctx.data, methods,
                         epochs=ctx.epochs, seed=ctx.seed, progress=False)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 600 nodes, 60 epochs, Fashion-MNIST + MNIST")
    p.add_argument("--datasets", nargs="+", default=["fashion_mnist", "mnist"])
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --quick 1)")
    p.add_argument("--nodes", type=int, default=None, help="images per graph (default 2000, --quick 600)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default 100: half of Kipf & Welling's 200, for this CPU; --quick 60)")
    p.add_argument("--rows", nargs="+", default=None, help=f"a subset of the rows: {list(ROWS)}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or (1 if args.quick else 3)
    nodes = args.nodes or (600 if args.quick else 2000)
    epochs = args.epochs or (60 if args.quick else 100)
    val_size = 100 if nodes < 1000 else 500
    rows = {k: ROWS[k] for k in (args.rows or ROWS)}
    unknown = [k for k in rows if k not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {list(ROWS)}")

    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    t_start = time.time()
    for ds in args.datasets:
        for seed in range(seeds):
            data = knn_image_graph(ds, num_nodes=nodes, k=10, train_per_class=20, val_size=val_size, seed=seed)
            torch.manual_seed(seed)
            teacher = GNN(data.x.shape[1], TEACHER_HIDDEN, data.num_classes, conv="gcn")
            t_res = fit_graph(teacher, data, epochs=epochs, seed=seed, progress=False)
            results.setdefault((ds, "teacher"), []).append(t_res)
            ctx = Context(ds, seed, data, teacher, t_res, epochs, args.quick)
            for name, row in rows.items():
                t0 = time.time()
                res = run_row(row, ctx)
                res = {**res, "seconds": time.time() - t0}
                results.setdefault((ds, name), []).append(res)
                print(f"  [{ds} seed {seed}] {name}: val {res['val_acc']:.1f} test {res['test_acc']:.1f} "
                      f"({res['seconds']:.0f} s)", file=sys.stderr, flush=True)

    lines = []
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/graph.py", *(argv or sys.argv[1:])])
    lines.append(f"$ {command}")
    lines.append(f"kNN image graphs: {nodes} nodes, k=10, 20 labels/class, {val_size} val; {epochs} epochs; "
                 f"{seeds} seed(s); test accuracy (%) at the best-validation epoch, mean ± std over seeds; "
                 f"Δ = mean paired difference to the baseline row")
    header = f"{'row':<30} " + " ".join(f"{ds + ' test':>16} {'Δ':>6}" for ds in args.datasets)
    lines.append(header)
    lines.append("-" * len(header))
    teacher_label = f"teacher GCN-{TEACHER_HIDDEN}"
    cells = [f"{_fmt([r['test_acc'] for r in results[(ds, 'teacher')]]):>16} {'':>6}" for ds in args.datasets]
    lines.append(f"{teacher_label:<30} " + " ".join(cells))
    for name, row in rows.items():
        cells = []
        for ds in args.datasets:
            mine = [r["test_acc"] for r in results[(ds, name)]]
            delta = ""
            if row.baseline is not None and (ds, row.baseline) in results:
                base = [r["test_acc"] for r in results[(ds, row.baseline)]]
                delta = f"{statistics.mean(a - b for a, b in zip(mine, base)):+.1f}"
            cells.append(f"{_fmt(mine):>16} {delta:>6}")
        lines.append(f"{name:<30} " + " ".join(cells))
    lines.append(f"total {time.time() - t_start:.0f} s (1 CPU thread)")
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
