"""Graph recipes (kind: graph, distill.graph_runner): validation before any work, the runs' numbers
against the same training written out by hand, the run folder's rules (resume, overwrite, another
version of the recipe), hetero graphs, and the command line."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("torch_geometric", reason="graph recipes need the 'graph' extra (torch-geometric)")

from distill.cli import main as cli_main  # noqa: E402
from distill.data.graphs import knn_image_graph  # noqa: E402
from distill.graph_runner import (  # noqa: E402
    is_graph_recipe,
    load_graph_recipe,
    parse_graph_recipe,
    run_graph_recipe,
)
from distill.methods import KD  # noqa: E402
from distill.models.gnn import GNN  # noqa: E402
from distill.recipes import RecipeError, parse_recipe  # noqa: E402
from distill.strategies.graph import distill_graph  # noqa: E402
from distill.train.rundir import RunFolderError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "name": "g",
    "kind": "graph",
    "data": {"name": "digits", "num_nodes": 240, "k": 6, "train_per_class": 4, "val_size": 50},
    "teacher": {"model": {"name": "gcn", "kwargs": {"hidden": 16}}, "train": {"epochs": 12, "lr": 0.02}},
    "student": {"name": "gcn", "kwargs": {"hidden": 6}},
    "students": {"scratch": {"ce": 1.0}, "kd": {"ce": 0.5, "kd": {"T": 3.0, "weight": 2.0}}},
    "train": {"epochs": 9, "lr": 0.03, "weight_decay": 0.0},
    "seeds": [3, 4],
    "threads": 1,
}


def recipe(**edits: Any) -> dict[str, Any]:
    r = copy.deepcopy(BASE)
    r.update(edits)
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("graph_runs")
    return run_graph_recipe(parse_graph_recipe(recipe()), out_dir=out, progress=False)


# ------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("edit, match", [
    (lambda r: r["students"].update(bad={"ce": 1.0, "kdd": {}}), r"(?s)students.bad: invalid losses.*kdd"),
    (lambda r: r["students"]["kd"]["kd"].update(tau=2), r"(?s)students.kd: invalid losses.*tau"),
    (lambda r: r["student"].update(name="gcnn"), r"unknown model 'gcnn'"),
    (lambda r: r["students"].update(s={"strategy": "dml"}), r"'dml' is not a graph strategy"),
    (lambda r: r["students"].update(s={"strategy": "graph_free_kd", "args": {"nope": 1}}),
     r"students.s.args.nope: unknown argument of graph_free_kd"),
    (lambda r: r["students"].update(s={"strategy": "graph_free_kd", "args": {"teacher": 1}}),
     r"students.s.args.teacher: set by the runner"),
    (lambda r: r.pop("teacher"), r"students.kd: \['kd'\] read a teacher; the recipe has none"),
    (lambda r: r["students"].update({"a b": {"ce": 1.0}}), r"row name 'a b'"),
    (lambda r: r["data"].update(leave_out=[]), r"leave_out names relations of a hetero graph"),
    (lambda r: r["data"].update(name="cifar10"), r"data.name"),
    (lambda r: r.update(seeds=[1, 1]), r"seeds repeat"),
    (lambda r: r["students"].update(empty={}), r"row 'empty' has no losses"),
])
def test_bad_recipes_are_refused_before_any_work(edit, match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.graph_runner as gr

    monkeypatch.setattr(gr, "build_graph", lambda *a, **k: pytest.fail("a graph was built for a bad recipe"))
    r = recipe()
    edit(r)
    with pytest.raises(RecipeError, match=match):
        parse_graph_recipe(r)


def test_the_image_recipe_schema_points_at_the_graph_runner() -> None:
    with pytest.raises(RecipeError, match=r"kind 'graph'.*distill.graph_runner"):
        parse_recipe(recipe())


def test_shipped_graph_recipes_validate() -> None:
    paths = sorted((REPO / "recipes" / "graph").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        assert is_graph_recipe(path)
        assert load_graph_recipe(path).kind == "graph"


# ------------------------------------------------------------------------------------------- the numbers

def by_hand(seed: int) -> dict[str, float]:
    """BASE's seed written out with the library's pieces, not the runner: the graph drawn with the run's
    seed, the teacher built after manual_seed(seed) and trained alone, each student built after
    manual_seed(1000 + seed)."""
    g = knn_image_graph("digits", num_nodes=240, k=6, train_per_class=4, val_size=50, seed=seed)
    torch.manual_seed(seed)
    teacher = GNN(g.x.shape[1], 16, g.num_classes)
    distill_graph(teacher, None, g, {}, epochs=12, lr=0.02, seed=seed, progress=False)
    out = {}
    torch.manual_seed(1000 + seed)
    out["scratch"] = distill_graph(GNN(g.x.shape[1], 6, g.num_classes), None, g, {}, epochs=9, lr=0.03,
                                   weight_decay=0.0, ce=1.0, seed=seed, progress=False)["test_acc"]
    torch.manual_seed(1000 + seed)
    out["kd"] = distill_graph(GNN(g.x.shape[1], 6, g.num_classes), teacher, g, {"kd": KD(T=3.0, weight=2.0)},
                              epochs=9, lr=0.03, weight_decay=0.0, ce=0.5, seed=seed, progress=False)["test_acc"]
    return out


def test_each_row_is_the_training_written_out_by_hand(run: Path) -> None:
    results = json.loads((run / "results.json").read_text())
    assert results["seeds"] == [3, 4]
    for seed in (3, 4):
        expected = by_hand(seed)
        for row in ("scratch", "kd"):
            assert results["rows"][row]["seeds"][str(seed)]["test_acc"] == pytest.approx(expected[row], abs=1e-9)
    # the two rows differ (the kd row read its teacher), and the seeds drew different graphs
    assert results["rows"]["kd"]["seeds"]["3"] != results["rows"]["scratch"]["seeds"]["3"]
    assert results["teacher"]["3"]["test_acc"] != results["teacher"]["4"]["test_acc"]


def test_folder_holds_weights_report_and_recipe(run: Path) -> None:
    from safetensors.torch import load_file

    for seed in (3, 4):
        for name in ("teacher", "scratch", "kd"):
            state = load_file(str(run / f"seed{seed}" / f"{name}.safetensors"))
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    report = (run / "report.md").read_text()
    assert "| scratch | ce: 1.0 | 460 |" in report and "| kd |" in report and "Teacher:" in report
    assert yaml.safe_load((run / "recipe.yaml").read_text())["name"] == "g"


# ------------------------------------------------------------------------------------------- the run folder

def test_finished_results_are_refused_then_resumed_without_training(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.graph_runner as gr

    with pytest.raises(RunFolderError, match="already holds results.*--resume"):
        run_graph_recipe(parse_graph_recipe(recipe()), out_dir=run.parent, progress=False)
    monkeypatch.setattr(gr, "distill_graph", lambda *a, **k: pytest.fail("a finished row was trained again"))
    before = json.loads((run / "results.json").read_text())
    run_graph_recipe(parse_graph_recipe(recipe()), out_dir=run.parent, progress=False, resume=True)
    assert json.loads((run / "results.json").read_text())["rows"] == before["rows"]


def test_another_version_of_the_recipe_is_refused(run: Path) -> None:
    with pytest.raises(RunFolderError, match="another version of the recipe"):
        run_graph_recipe(parse_graph_recipe(recipe(seeds=[3])), out_dir=run.parent, progress=False, resume=True)


def test_resume_trains_only_the_missing_rows_and_reuses_the_teacher(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.graph_runner as gr

    one = recipe(seeds=[3])
    run_graph_recipe(parse_graph_recipe(one), out_dir=tmp_path, progress=False, rows=["scratch"])
    calls: list[int] = []
    real = gr.distill_graph
    monkeypatch.setattr(gr, "distill_graph", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    folder = run_graph_recipe(parse_graph_recipe(one), out_dir=tmp_path, progress=False, resume=True)
    assert calls == [1]  # only the kd row (one method); the teacher was loaded, not trained
    results = json.loads((folder / "results.json").read_text())
    assert "reused" in results["teacher"]["3"]["how"]
    assert results["rows"]["kd"]["seeds"]["3"]["test_acc"] == pytest.approx(by_hand(3)["kd"], abs=1e-9)


def test_a_teacher_checkpoint_is_loaded_and_must_fit(run: Path, tmp_path: Path) -> None:
    ckpt = run / "seed3" / "teacher.safetensors"
    r = recipe(seeds=[3], students={"kd": BASE["students"]["kd"]})
    r["teacher"]["checkpoint"] = str(ckpt)
    folder = run_graph_recipe(parse_graph_recipe(r), out_dir=tmp_path, progress=False)
    results = json.loads((folder / "results.json").read_text())
    assert results["teacher"]["3"]["how"] == f"loaded from {ckpt}"
    assert results["rows"]["kd"]["seeds"]["3"]["test_acc"] == pytest.approx(by_hand(3)["kd"], abs=1e-9)
    r["teacher"]["model"]["kwargs"]["hidden"] = 17
    with pytest.raises(RecipeError, match="does not fit the teacher model"):
        run_graph_recipe(parse_graph_recipe(r), out_dir=tmp_path / "other", progress=False)


# ------------------------------------------------------------------------------------------- hetero, strategies

def test_a_hetero_recipe_runs_hire_with_the_graphs_node_types(tmp_path: Path) -> None:
    r = recipe(data={"name": "digits", "graph": "hetero", "num_nodes": 200, "grid": 4, "train_per_class": 4,
                     "val_size": 40},
               teacher={"model": {"name": "hetero_gnn"}, "train": {"epochs": 4}},
               student={"name": "hetero_gnn_small"},
               students={"hire": {"ce": 1.0, "hire_node": {"tau": 2.0}, "hire_relation": {"weight": 0.5}}},
               seeds=[0], train={"epochs": 3})
    folder = run_graph_recipe(parse_graph_recipe(r), out_dir=tmp_path, progress=False)
    acc = json.loads((folder / "results.json").read_text())["rows"]["hire"]["seeds"]["0"]["test_acc"]
    assert 0.0 <= acc <= 100.0
    r["data"]["leave_out"] = ["nope"]
    with pytest.raises(RecipeError, match=r"data.leave_out: \['nope'\] are not relations"):
        run_graph_recipe(parse_graph_recipe(r), out_dir=tmp_path / "b", progress=False)


def test_a_strategy_row_runs_graph_free_kd(tmp_path: Path) -> None:
    r = recipe(teacher={"model": {"name": "gcn", "kwargs": {"hidden": 16, "norm": "batch"}}, "train": {"epochs": 4}},
               students={"gfkd": {"strategy": "graph_free_kd", "args": {"synthesis_steps": 3, "epochs": 2,
                                                                        "num_graphs": 2, "nodes_per_graph": 6}}},
               seeds=[0])
    folder = run_graph_recipe(parse_graph_recipe(r), out_dir=tmp_path, progress=False)
    results = json.loads((folder / "results.json").read_text())
    assert results["rows"]["gfkd"]["seeds"]["0"]["best_epoch"] is None
    assert "strategy graph_free_kd" in (folder / "report.md").read_text()



def test_graph_free_kd_without_a_batchnorm_teacher_is_refused_before_training(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.graph_runner as gr

    monkeypatch.setattr(gr, "distill_graph", lambda *a, **k: pytest.fail("something was trained"))
    r = recipe(students={"scratch": {"ce": 1.0}, "gfkd": {"strategy": "graph_free_kd", "args": {"epochs": 2}}},
               seeds=[0])
    with pytest.raises(RecipeError, match=r"students.gfkd: graph_free_kd matches the teacher's BatchNorm.*norm: batch"):
        run_graph_recipe(parse_graph_recipe(r), out_dir=tmp_path, progress=False)


# ------------------------------------------------------------------------------------------- command line

def test_distill_run_reads_a_graph_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("# a graph recipe\n" + yaml.safe_dump(recipe(seeds=[0], students={"scratch": {"ce": 1.0}})))
    assert cli_main(["run", str(path), "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "graph recipe (kind: graph): --seeds does not apply" in capsys.readouterr().err.replace("\n", " ")
    assert cli_main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "g" / "report.md").is_file()
