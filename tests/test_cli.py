"""The ``distill`` command, run as a subprocess (``python -m distill.cli``) the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from distill.methods import list_methods

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

TINY_TRAIN = {"epochs": 2, "optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "device": "cpu"}


def distill(*args: str, cwd: Path | None = None, columns: int = 250, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env["COLUMNS"] = str(columns)  # a wide, non-interactive console: rich tables do not wrap names
    env.pop("DISTILL_MNIST", None)
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is faster and shares the cores
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=timeout)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_distill_recipe(name: str = "cli_kd") -> dict[str, Any]:
    return {
        "name": name,
        "seeds": [0],
        "data": {"name": "digits", "val_split": "val", "train_subset": 64, "batch_size": 32},
        "student": {"name": "cnn_digits_student"},
        "teacher": {"model": {"name": "cnn_digits_teacher"}, "train": {**TINY_TRAIN, "epochs": 1}},
        "losses": {"ce": 1.0, "kd": {"T": 4.0}},
        "train": TINY_TRAIN,
    }


def tiny_train_recipe(name: str = "cli_teacher") -> dict[str, Any]:
    return {
        "name": name,
        "kind": "train",
        "data": {"name": "digits", "val_split": "val", "train_subset": 64, "batch_size": 32},
        "student": {"name": "cnn_digits_teacher"},
        "train": {**TINY_TRAIN, "epochs": 1},
    }


# --------------------------------------------------------------------------- version, methods


def test_version() -> None:
    from distill import __version__

    res = distill("--version")
    assert res.returncode == 0, res.stderr
    assert f"distill {__version__}" in res.stdout


def test_no_command_is_a_usage_error() -> None:
    res = distill()
    assert res.returncode == 2
    assert "usage" in res.stderr.lower()


def test_methods_table_lists_every_method_with_arxiv() -> None:
    res = distill("methods")
    assert res.returncode == 0, res.stderr
    infos = list_methods()
    assert len(infos) >= 11
    for info in infos:
        assert info.name in res.stdout, info.name
        if info.paper.arxiv:
            assert info.paper.arxiv in res.stdout, (info.name, info.paper.arxiv)
    assert "1503.02531" in res.stdout  # KD, Hinton et al.
    assert "2203.08679" in res.stdout  # DKD, Zhao et al.


def test_methods_table_keeps_names_whole_on_a_narrow_console() -> None:
    res = distill("methods", columns=80)
    assert res.returncode == 0, res.stderr
    for info in list_methods():
        assert info.name in res.stdout, info.name


def test_methods_json() -> None:
    res = distill("methods", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    by_name = {r["name"]: r for r in rows}
    expected = {"ce", "label_smoothing", "kd", "logit_regression", "noisy_teacher", "dkd", "dist", "skd", "ctkd",
                "fitnet", "at"}
    assert expected <= set(by_name)
    for row in rows:
        for key in ("name", "family", "title", "year", "arxiv", "defaults"):
            assert key in row, (row.get("name"), key)
        assert isinstance(row["defaults"], dict) and isinstance(row["year"], int)
    assert by_name["kd"]["arxiv"] == "1503.02531"
    assert by_name["dkd"]["arxiv"] == "2203.08679"
    assert by_name["kd"]["defaults"]["T"] == 4.0
    assert by_name["fitnet"]["family"] == "features"


def test_methods_family_filter() -> None:
    res = distill("methods", "--json", "--family", "features")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert {"fitnet", "at"} <= {r["name"] for r in rows}
    assert {r["family"] for r in rows} == {"features"}


# --------------------------------------------------------------------------- run, compare, train


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("cli")
    recipe = write_yaml(tmp / "recipe.yaml", tiny_distill_recipe())
    res = distill("run", str(recipe), "--out", str(tmp / "out"), "--no-progress")
    return {"tmp": tmp, "res": res, "base": tmp / "out" / "cli_kd"}


def test_run_prints_a_table(cli_run: dict[str, Any]) -> None:
    res = cli_run["res"]
    assert res.returncode == 0, res.stderr
    assert "cli_kd" in res.stdout
    assert "acc last" in res.stdout and "agreement" in res.stdout
    base = cli_run["base"]
    for rel in ("seed0/summary.json", "seed0/metrics.jsonl", "report.md", "teacher/model.safetensors"):
        assert (base / rel).is_file(), rel


def test_compare_prints_the_group(cli_run: dict[str, Any]) -> None:
    assert cli_run["res"].returncode == 0, cli_run["res"].stderr
    res = distill("compare", str(cli_run["base"]))
    assert res.returncode == 0, res.stderr
    assert "cli_kd" in res.stdout
    assert "acc last" in res.stdout


def test_compare_a_folder_without_runs(tmp_path: Path) -> None:
    res = distill("compare", str(tmp_path))
    assert res.returncode == 2
    assert "error" in res.stderr.lower() and str(tmp_path) in res.stderr
    assert "Traceback" not in res.stderr


def test_train_writes_model(tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "teacher.yaml", tiny_train_recipe())
    res = distill("train", str(recipe), "--out", str(tmp_path / "out"), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "cli_teacher" / "seed0" / "model.safetensors").is_file()
    assert "cli_teacher" in res.stdout or "cnn_digits_teacher" in res.stdout


def test_train_refuses_a_recipe_with_a_teacher(tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "kd.yaml", tiny_distill_recipe())
    res = distill("train", str(recipe), "--out", str(tmp_path / "out"), "--no-progress")
    assert res.returncode == 2
    assert "error" in res.stderr.lower() and "teacher" in res.stderr
    assert not list((tmp_path).rglob("model.safetensors"))


# --------------------------------------------------------------------------- errors


def test_bad_recipe_exits_2_naming_the_key(tmp_path: Path) -> None:
    data = tiny_distill_recipe()
    data["train"] = {**data["train"], "lrr": 0.1}
    recipe = write_yaml(tmp_path / "bad.yaml", data)
    res = distill("run", str(recipe), "--out", str(tmp_path / "out"), "--no-progress")
    assert res.returncode == 2
    assert "error" in res.stderr.lower()
    assert "train.lrr" in res.stderr and "unknown key" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_bad_method_argument_exits_2(tmp_path: Path) -> None:
    data = tiny_distill_recipe()
    data["losses"] = {"ce": 1.0, "kd": {"TT": 4.0}}
    res = distill("run", str(write_yaml(tmp_path / "bad.yaml", data)), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert "error" in res.stderr.lower() and "losses.kd.TT" in res.stderr


def test_bad_tap_exits_2_naming_the_tap(tmp_path: Path) -> None:
    data = tiny_distill_recipe()
    data["losses"] = {"ce": 1.0, "fitnet": {"student_tap": "stage9"}}
    res = distill("run", str(write_yaml(tmp_path / "bad.yaml", data)), "--out", str(tmp_path / "out"),
                  "--no-progress")
    assert res.returncode == 2, res.stderr
    assert "error" in res.stderr.lower() and "stage9" in res.stderr
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_missing_recipe_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    for cmd in ("run", "train"):
        res = distill(cmd, str(missing))
        assert res.returncode == 2, (cmd, res.stderr)
        assert "error" in res.stderr.lower() and "nope.yaml" in res.stderr


def test_missing_data_directory_exits_2(tmp_path: Path) -> None:
    data = tiny_train_recipe()
    data["data"] = {"name": "mnist", "root": str(tmp_path / "no_mnist")}
    data["student"] = {"name": "cnn_student_mnist"}
    res = distill("train", str(write_yaml(tmp_path / "mnist.yaml", data)), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert "error" in res.stderr.lower() and "no_mnist" in res.stderr
