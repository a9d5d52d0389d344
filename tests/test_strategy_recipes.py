"""Every registered strategy runs from a recipe (``strategy: {name, args, labeled}``), and bad
strategy sections fail before any training with an error naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.cli import main
from distill.recipes import RecipeError, parse_recipe
from distill.runner import run_recipe
from distill.strategies.registry import list_strategies

TEACHER = {"model": {"name": "cnn_digits_teacher"}, "train": {"epochs": 1, "lr": 0.05}}
# what each strategy needs beyond the student, the data and the protocol
NEEDS: dict[str, dict] = {
    "born_again": {"args": {"generations": 2}},
    "pro_kd": {"teacher": True, "args": {"teacher_epochs": 1}},
    "reskd": {"teacher": True, "args": {"res_students": [{"name": "mlp_digits_student", "num_classes": 10}]}},
    "takd": {"teacher": True, "args": {"assistants": [{"name": "cnn_digits_student", "num_classes": 10}]}},
    "cmm": {"teacher": True},
    "model_compression": {"teacher": True},
    "co_training": {"labeled": 48},
    "data_distillation": {"labeled": 48},
    "mean_teacher": {"labeled": 48},
    "dml": {"args": {"num_models": 2}},
    "okddip": {"args": {"num_models": 3}},
    "hsakd": {"teacher": True, "args": {"teacher_epochs": 1}},
    "knowledge_flow": {"teacher": True},
}
# strategies not run by this single-process test, each for a stated reason
PYTHON_ONLY = {
    "rocket_launching": "its student is a RocketNet (a shared trunk with a light and a booster head)",
    "okdhp": "a dense-output (heatmap) method: its student is a MultiBranchNet",
    "codistillation": "one model per process: it needs torchrun with 2+ processes (tests/test_distributed.py)",
}


def _recipe(name: str) -> dict:
    need = NEEDS.get(name, {})
    strategy = {"name": name, "args": need.get("args", {})}
    if "labeled" in need:
        strategy["labeled"] = need["labeled"]
    recipe = {"name": f"s_{name}", "data": {"name": "digits", "batch_size": 32, "train_subset": 96},
              "student": {"name": "cnn_digits_student"}, "train": {"epochs": 1, "lr": 0.05}, "strategy": strategy}
    if need.get("teacher"):
        recipe["teacher"] = TEACHER
    return recipe


RUNNABLE = sorted(i.name for i in list_strategies() if i.name not in PYTHON_ONLY)


def test_every_registered_strategy_is_covered():
    assert set(PYTHON_ONLY) <= {i.name for i in list_strategies()}
    assert len(RUNNABLE) >= 15


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_strategy_runs_from_a_recipe(name: str, tmp_path: Path) -> None:
    dirs = run_recipe(parse_recipe(_recipe(name)), out_dir=tmp_path, progress=False)
    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert summary["strategy"] == name and summary["kind"] == "distill"
    assert 0.0 <= summary["last_acc"] <= 100.0
    assert (tmp_path / f"s_{name}" / "report.md").is_file()


@pytest.mark.parametrize("edit, match", [
    (lambda r: r["strategy"]["args"].update(nope=1), r"strategy.args.nope: unknown argument"),
    (lambda r: r["strategy"]["args"].update(epochs=3), r"strategy.args.epochs: set by the recipe"),
    (lambda r: r["strategy"]["args"].update(lr=0.1), r"strategy.args.lr: a training setting"),
    (lambda r: r["strategy"].update(labeled=10), r"strategy.labeled: strategy 'dml' takes no unlabeled data"),
    (lambda r: r.update(losses={"ce": 1.0}), r"chooses its own losses"),
    (lambda r: r["strategy"].update(name="dmll"), r"unknown strategy 'dmll'.*Did you mean 'dml'"),
    (lambda r: r.update(hint_stage={"train": {"epochs": 1}}), r"cannot be combined"),
])
def test_bad_strategy_sections_are_clear_errors(edit, match: str) -> None:
    recipe = _recipe("dml")
    edit(recipe)
    with pytest.raises(RecipeError, match=match):
        parse_recipe(recipe)


def test_labeled_must_leave_some_unlabeled_data(tmp_path: Path) -> None:
    recipe = _recipe("mean_teacher")
    recipe["strategy"]["labeled"] = 96  # the whole subset: nothing left unlabeled
    with pytest.raises(RecipeError, match="leaves no unlabeled data"):
        run_recipe(parse_recipe(recipe), out_dir=tmp_path, progress=False)


def test_cli_lists_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert by_name["dml"]["arxiv"] == "1706.00384" and by_name["dml"]["family"] == "online"
    assert by_name["born_again"]["defaults"]["generations"] >= 1
    assert main(["strategies", "--family", "chain"]) == 0
    out = capsys.readouterr().out
    assert "takd" in out and "dml" not in out


def test_single_process_strategies_refuse_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from distill.strategies.online import fit_dml
    from distill.strategies.registry import refuse_multi_process

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="cannot run under torchrun"):
        refuse_multi_process("x")
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    from distill.data.loader import InMemoryLoader
    from distill.models import create

    with pytest.raises(RuntimeError, match="cannot run under torchrun"):
        fit_dml(lambda: create("cnn_digits_student"), InMemoryLoader(x, y, 4), None, epochs=1, num_models=2,
                progress=False)
