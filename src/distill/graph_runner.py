"""Graph recipes (``kind: graph``): node classification on a graph built from real images, a GNN
teacher, and one student per row of ``students``, each with its losses or a graph strategy.

The flow of ``distill run recipes/graph/fashion_knn_lsp.yaml``, for each seed of ``seeds``:

1. the graph (:func:`distill.data.graphs.knn_image_graph`: images as nodes, pixels as features,
   ``k`` nearest neighbours, ``train_per_class`` labels per class; or ``graph: hetero``,
   :func:`distill.data.graphs.hetero_image_graph`'s image / class / region graph), drawn with
   ``data.seed`` when set, else with the run's seed;
2. the teacher (a model of the zoo: ``gcn``, ``gat``, ``sage``, ``mlp_graph``, ``hetero_gnn``...),
   loaded from ``teacher.checkpoint`` (safetensors) or trained here with
   :func:`distill.strategies.graph.distill_graph` (cross-entropy on the labelled nodes, the
   best-validation epoch kept) and saved as ``OUT/NAME/seed<s>/teacher.safetensors``;
3. each row: a student built with the seed ``1000 + s`` (the same initial weights for every row of a
   seed), trained by ``distill_graph`` with the row's losses (``ce`` and registered methods: ``kd``,
   ``lsp``, ``gnn_self_distill``, ``hire_node``, ``hire_relation``, ...), or by a registered graph
   strategy (``{strategy: graph_free_kd, args: {...}}``); its weights are saved as
   ``OUT/NAME/seed<s>/<row>.safetensors``;
4. validation and test accuracy of the teacher and of every row, written to ``OUT/NAME/results.json``
   after each row (a crash loses only the row it was in: ``--resume`` skips what is done) and, at
   the end, ``report.md`` (mean ± std over the seeds).

A row ``{ce: 1.0}`` is the student trained alone on the same graph. The run folder holds one
version of a recipe: another version is refused unless ``--overwrite``; finished results are
refused unless ``--resume`` (continue) or ``--overwrite`` (start again).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from rich.console import Console
from rich.table import Table
from torch import nn

from distill.files import atomic_write_text
from distill.methods.base import create_method, method_info
from distill.models import create, list_models
from distill.recipe_runs import (
    check_row_name,
    check_seeds,
    check_strategy_arg_names,
    load_weights,
    mean_std,
    recipe_kind,
    recipe_run,
    rows_to_run,
)
from distill.recipes import RecipeError, _Strict, read_recipe_file, validate_losses, validate_schema
from distill.strategies.graph import distill_graph, masked_accuracy
from distill.strategies.registry import list_strategies, strategy_info
from distill.train.checkpoint import save_model

console = Console()

GRAPH_DATASETS = ("digits", "mnist", "fashion_mnist")
# HIRE's example leaves the class -> image relation out: it hands each labelled image its own label,
# which the evaluated images never have (distill.data.graphs.hetero_image_graph's docstring)
DEFAULT_LEFT_OUT = ["rev_in_class"]
# what the runner passes a graph strategy itself; a recipe may not set them
STRATEGY_OWN_ARGS = ("student", "train_data", "val_data", "teacher", "seed", "progress")


class GraphDataSpec(_Strict):
    """The graph: ``graph: knn`` (images only) or ``hetero`` (image / class / region nodes)."""

    name: Literal["digits", "mnist", "fashion_mnist"] = "fashion_mnist"
    graph: Literal["knn", "hetero"] = "knn"
    num_nodes: int = Field(2000, gt=1)
    k: int = Field(10, gt=0, description="nearest neighbours per image")
    train_per_class: int = Field(20, gt=0, description="labelled images per class")
    val_size: int = Field(500, gt=0)
    grid: int = Field(7, gt=0, description="hetero only: region nodes are the cells of a grid x grid partition")
    leave_out: list[str] = Field(default_factory=lambda: list(DEFAULT_LEFT_OUT),
                                 description="hetero only: relations the models do not read")
    seed: int | None = Field(None, description="the graph's draw; None: each run seed draws its own graph")


class GraphModelSpec(_Strict):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class GraphTrainSpec(_Strict):
    epochs: int = Field(200, gt=0)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(5e-4, ge=0)


class GraphTeacherSpec(_Strict):
    model: GraphModelSpec
    checkpoint: str | None = Field(None, description="a safetensors file of the teacher's weights (else trained here)")
    train: GraphTrainSpec = Field(default_factory=GraphTrainSpec)


class GraphStrategyRow(_Strict):
    strategy: str
    args: dict[str, Any] = Field(default_factory=dict)


class GraphRecipe(_Strict):
    """A graph distillation recipe; see the module docstring."""

    name: str
    kind: Literal["graph"]
    data: GraphDataSpec = Field(default_factory=GraphDataSpec)
    teacher: GraphTeacherSpec | None = None
    student: GraphModelSpec
    students: dict[str, dict[str, Any]] = Field(min_length=1)
    train: GraphTrainSpec = Field(default_factory=GraphTrainSpec)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    threads: int | None = Field(None, gt=0)
    output_dir: str = "runs"

    @field_validator("students")
    @classmethod
    def _rows(cls, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for row, spec in rows.items():
            if not spec:
                raise ValueError(f"row {row!r} has no losses (e.g. {{ce: 1.0}}) and no strategy")
            check_row_name(row)
        return rows

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        return check_seeds(seeds)

    @model_validator(mode="after")
    def _hetero_models(self) -> GraphRecipe:
        if self.data.graph == "knn" and self.data.leave_out != DEFAULT_LEFT_OUT:
            raise ValueError("data.leave_out names relations of a hetero graph; this graph is 'knn'")
        return self


def is_graph_recipe(path: str | Path) -> bool:
    """Whether the YAML file at ``path`` is a graph recipe (``kind: graph``)."""
    return recipe_kind(path) == "graph"


def _check_strategy_row(row: str, spec: GraphStrategyRow) -> None:
    names = {i.name for i in list_strategies("graph")}
    if spec.strategy not in names:
        raise RecipeError(f"students.{row}.strategy: {spec.strategy!r} is not a graph strategy "
                          f"(graph strategies: {sorted(names)})")
    check_strategy_arg_names(f"students.{row}.args", spec.strategy, strategy_info(spec.strategy).fn, spec.args,
                             STRATEGY_OWN_ARGS)


def row_kind(spec: dict[str, Any]) -> str:
    """``"strategy"`` for a row ``{strategy: NAME, args: {...}}``, else ``"losses"``."""
    return "strategy" if "strategy" in spec else "losses"


def parse_graph_recipe(data: Any, source: str = "recipe") -> GraphRecipe:
    """Validate a graph recipe mapping; :class:`~distill.recipes.RecipeError` names every bad key,
    unknown losses, strategies and their arguments, and unknown models, before any graph is built."""
    recipe = validate_schema(GraphRecipe, data, source)
    try:
        for model in [recipe.student] + ([recipe.teacher.model] if recipe.teacher else []):
            if model.name not in list_models():
                raise RecipeError(f"unknown model {model.name!r} (graph models: gcn, gat, sage, mlp_graph, "
                                  "hetero_gnn, hetero_gnn_small; all: distill models)")
        for row, spec in recipe.students.items():
            if row_kind(spec) == "strategy":
                _check_strategy_row(row, validate_schema(GraphStrategyRow, spec, f"students.{row}"))
                if recipe.teacher is None:
                    raise RecipeError(f"students.{row}: strategy {spec['strategy']!r} distils a teacher; the recipe "
                                      "has none")
                continue
            try:
                losses = validate_losses(spec)
            except RecipeError as e:
                raise RecipeError(f"students.{row}: {e}") from None
            needing = [n for n in losses if method_info(n).cls.needs_teacher]
            if needing and recipe.teacher is None:
                raise RecipeError(f"students.{row}: {needing} read a teacher; the recipe has none")
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return recipe


def load_graph_recipe(path: str | Path) -> GraphRecipe:
    """Read and validate a YAML graph recipe file."""
    return parse_graph_recipe(read_recipe_file(path), str(path))


# --------------------------------------------------------------------------------------------- running

def build_graph(spec: GraphDataSpec, seed: int) -> Any:
    """The recipe's graph for run seed ``seed`` (``spec.seed`` when set)."""
    from distill.data.graphs import hetero_image_graph, knn_image_graph

    draw = spec.seed if spec.seed is not None else seed
    if spec.graph == "hetero":
        return hetero_image_graph(spec.name, num_nodes=spec.num_nodes, k=spec.k, grid=spec.grid,
                                  train_per_class=spec.train_per_class, val_size=spec.val_size, seed=draw)
    return knn_image_graph(spec.name, num_nodes=spec.num_nodes, k=spec.k, train_per_class=spec.train_per_class,
                           val_size=spec.val_size, seed=draw)


def build_model(spec: GraphModelSpec, graph: Any, data: GraphDataSpec) -> tuple[nn.Module, Any]:
    """A zoo model sized for ``graph`` and the graph it reads (a hetero model is bound to the graph:
    :func:`distill.models.hetero_gnn.bind_hetero`, which returns the target type's view)."""
    if data.graph == "hetero":
        from distill.models.hetero_gnn import bind_hetero

        unknown = sorted(set(data.leave_out) - {e[1] for e in graph.edge_types})
        if unknown:
            raise RecipeError(f"data.leave_out: {unknown} are not relations of the graph "
                              f"({sorted({e[1] for e in graph.edge_types})})")
        kw = dict(node_types=graph.node_types, edge_types=[e for e in graph.edge_types if e[1] not in data.leave_out],
                  in_dims={t: x.shape[1] for t, x in graph.x_dict.items()}, num_classes=graph.num_classes)
        return bind_hetero(create(spec.name, **kw, **spec.kwargs), graph)
    return create(spec.name, in_dim=graph.x.shape[1], num_classes=graph.num_classes, **spec.kwargs), graph


# graph strategies that read the teacher's BatchNorm statistics (graph-free KD synthesises graphs to match them)
READS_TEACHER_BATCHNORM = ("graph_free_kd",)


def _check_teacher_for_strategies(recipe: GraphRecipe, teacher: nn.Module) -> None:
    """Before the teacher is trained: a row whose strategy matches the teacher's BatchNorm statistics needs a
    teacher with BatchNorm (else it would fail after every other row has trained)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.modules())
    for row, spec in recipe.students.items():
        if row_kind(spec) == "strategy" and spec["strategy"] in READS_TEACHER_BATCHNORM and not has_bn:
            raise RecipeError(f"students.{row}: {spec['strategy']} matches the teacher's BatchNorm statistics, but the "
                              f"teacher {recipe.teacher.model.name!r} has no BatchNorm layer (give it kwargs "
                              "{norm: batch})")


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _methods(losses: dict[str, dict[str, Any]], graph: Any) -> tuple[float, dict[str, Any]]:
    """The row's cross-entropy weight and its methods (``node_types`` filled in from a hetero graph
    for the methods that take it, e.g. ``hire_relation``)."""
    ce = float(losses.get("ce", {}).get("weight", 1.0)) if "ce" in losses else 0.0
    methods = {}
    for name, kwargs in losses.items():
        if name == "ce":
            continue
        kwargs = dict(kwargs)
        if "node_types" in method_info(name).defaults and "node_types" not in kwargs and hasattr(graph, "node_types"):
            kwargs["node_types"] = graph.node_types
        methods[name] = create_method(name, **kwargs)
    return ce, methods


def run_graph_recipe(recipe: GraphRecipe, *, out_dir: str | Path | None = None, progress: bool = True,
                     resume: bool = False, overwrite: bool = False, rows: list[str] | None = None) -> Path:
    """Run a graph recipe (see the module docstring); returns its folder ``OUT/NAME``."""
    with recipe_run(recipe, recipe.students, out_dir=out_dir, resume=resume, overwrite=overwrite, rows=rows,
                    what="graph recipe results", row_word="students") as run:
        folder, teachers, results = run.folder, run.teachers, run.results

        def write() -> None:
            data = recipe.data.model_dump(mode="json", exclude={"grid", "leave_out"} if recipe.data.graph == "knn" else None)
            run.write(data=data)

        for seed in recipe.seeds:
            todo = rows_to_run(recipe.students, seed, results, rows, overwrite)
            if not todo:
                continue
            run_dir = folder / f"seed{seed}"
            run_dir.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            graph = build_graph(recipe.data, seed)
            teacher = teacher_view = None
            if recipe.teacher is not None:
                torch.manual_seed(seed)
                teacher, teacher_view = build_model(recipe.teacher.model, graph, recipe.data)
                _check_teacher_for_strategies(recipe, teacher)
                weights = run_dir / "teacher.safetensors"
                if recipe.teacher.checkpoint is not None:
                    load_weights(teacher, Path(recipe.teacher.checkpoint))
                    how = f"loaded from {recipe.teacher.checkpoint}"
                elif weights.is_file() and str(seed) in teachers and not overwrite:
                    load_weights(teacher, weights)
                    how = f"reused from {weights}"
                else:
                    t = recipe.teacher.train
                    distill_graph(teacher, None, teacher_view, {}, epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay,
                                  seed=seed, progress=progress)
                    save_model(weights, teacher)
                    how = f"trained here ({t.epochs} epochs)"
                teacher.eval()
                with torch.no_grad():
                    logits = teacher(teacher_view.x, teacher_view.edge_index)
                teachers[str(seed)] = {"val_acc": masked_accuracy(logits, teacher_view.y, teacher_view.val_mask),
                                       "test_acc": masked_accuracy(logits, teacher_view.y, teacher_view.test_mask),
                                       "parameters": _parameters(teacher), "how": how,
                                       "seconds": time.perf_counter() - t0}
                console.print(f"seed {seed}: teacher {recipe.teacher.model.name} {how}: val "
                              f"{teachers[str(seed)]['val_acc']:.1f}  test {teachers[str(seed)]['test_acc']:.1f}")
                write()
            for row in todo:
                spec = recipe.students[row]
                torch.manual_seed(1000 + seed)  # the same initial student for every row of a seed
                student, view = build_model(recipe.student, graph, recipe.data)
                t1 = time.perf_counter()
                if row_kind(spec) == "strategy":
                    info = strategy_info(spec["strategy"])
                    out = info.fn(student, None, view, teacher=teacher, seed=seed, progress=progress,
                                  **spec.get("args", {}))
                    val_acc, test_acc, best_epoch = float(out.val_acc), float(out.test_acc), None
                else:
                    ce, methods = _methods(validate_losses(spec), view)
                    needs = any(m.needs_teacher for m in methods.values())
                    out = distill_graph(student, teacher if needs else None, view, methods, epochs=recipe.train.epochs,
                                        lr=recipe.train.lr, weight_decay=recipe.train.weight_decay, ce=ce, seed=seed,
                                        progress=progress)
                    val_acc, test_acc, best_epoch = out["val_acc"], out["test_acc"], out["best_epoch"]
                save_model(run_dir / f"{row}.safetensors", student)
                entry = results.setdefault(row, {"spec": spec, "parameters": _parameters(student), "seeds": {}})
                entry["spec"], entry["parameters"] = spec, _parameters(student)
                entry["seeds"][str(seed)] = {"val_acc": val_acc, "test_acc": test_acc, "best_epoch": best_epoch,
                                             "seconds": time.perf_counter() - t1}
                write()
                console.print(f"seed {seed}: {row}: val {val_acc:.1f}  test {test_acc:.1f}")
        write()
        atomic_write_text(folder / "report.md", report_markdown(run.summary))
        console.print(results_table(run.summary))
    return folder


def _describe(spec: dict[str, Any]) -> str:
    if row_kind(spec) == "strategy":
        return f"strategy {spec['strategy']} {spec.get('args', {}) or ''}".strip()
    return ", ".join(f"{k}: {v}" for k, v in spec.items())


def _cells(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str, int]]:
    out = []
    for row, r in summary.get("rows", {}).items():
        runs = list(r["seeds"].values())
        out.append((row, _describe(r["spec"]), f"{r['parameters']:,}", mean_std([x["val_acc"] for x in runs]),
                    mean_std([x["test_acc"] for x in runs]), len(runs)))
    return out


def report_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# {summary['recipe']}", "", "Node classification, accuracy (%) at the best-validation epoch, mean ± std "
             "over the seeds.", "", "| student | losses / strategy | parameters | val acc | test acc | seeds |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} | {n} |" for a, b, c, d, e, n in _cells(summary)]
    t = summary.get("teacher", {})
    if t:
        runs = list(t.values())
        lines += ["", f"Teacher: {runs[0]['parameters']:,} parameters, val {mean_std([x['val_acc'] for x in runs])}, "
                  f"test {mean_std([x['test_acc'] for x in runs])} ({len(runs)} seed(s))."]
    lines += ["", f"Graph: {summary['data']}", ""]
    return "\n".join(lines)


def results_table(summary: dict[str, Any]) -> Table:
    table = Table(title=summary["recipe"])
    for title in ("student", "losses / strategy", "parameters", "val acc", "test acc", "seeds"):
        table.add_column(title)
    for cells in _cells(summary):
        table.add_row(*(str(c) for c in cells))
    return table


__all__ = ["GraphRecipe", "build_graph", "build_model", "is_graph_recipe", "load_graph_recipe", "parse_graph_recipe",
           "run_graph_recipe"]
