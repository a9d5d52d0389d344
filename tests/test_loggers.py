"""Loggers beside metrics.jsonl: TensorBoard event files and MLflow runs hold each epoch's row, with
the epoch as the step; names, options and packages are checked before any work (fit, recipe, CLI)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distill import Distiller, fit
from distill.data import InMemoryLoader, get_dataset
from distill.integrations import MissingExtraError
from distill.models import create
from distill.recipes import RecipeError, parse_recipe
from distill.train import EpochLog, FitResult
from distill.train.loggers import check_loggers, make_loggers

from _optional import missing


NO_TENSORBOARD = missing("tensorboard", "; it is in the 'log' extra")
NO_MLFLOW = missing("mlflow", "; it is in the 'log' extra")


@pytest.fixture(scope="module")
def digits():
    tr = get_dataset("digits", split="train")
    va = get_dataset("digits", split="val")
    return tr.inputs[:64].clone(), tr.targets[:64].clone(), va.inputs[:32].clone(), va.targets[:32].clone()


def _fit(digits, run_dir, epochs=2, **kwargs):
    x, y, vx, vy = digits
    torch.manual_seed(0)
    d = Distiller(create("cnn_digits_student"), None, losses={"ce": 1.0})
    return fit(d, InMemoryLoader(x, y, 32, shuffle=True, seed=0), InMemoryLoader(vx, vy, 32, shuffle=False),
               epochs=epochs, lr=0.05, progress=False, device="cpu", run_dir=run_dir, **kwargs)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Recorder:
    """A logger of our own: any object with log_metrics(metrics, step) and close()."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict]] = []
        self.closed = 0

    def log_metrics(self, metrics, step):
        self.calls.append((step, dict(metrics)))

    def close(self):
        self.closed += 1


def test_fit_sends_each_row_to_a_logger_object_and_closes_it(digits, tmp_path):
    rec = Recorder()
    _fit(digits, tmp_path / "run", loggers=[rec])
    rows = _rows(tmp_path / "run")
    assert [step for step, _ in rec.calls] == [0, 1]
    assert [m for _, m in rec.calls] == rows  # the very rows of metrics.jsonl
    assert rec.closed == 1


def test_loggers_are_closed_when_training_fails(digits):
    rec = Recorder()

    def boom(row):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _fit(digits, None, loggers=[rec], on_epoch_end=boom)
    assert len(rec.calls) == 1 and rec.closed == 1


def test_epoch_log_without_loggers_is_unchanged(tmp_path):
    log = EpochLog(FitResult(), tmp_path)
    log.begin()
    log.end_epoch({"epoch": 0, "val_student_acc": 50.0})
    log.close()
    assert _rows(tmp_path) == [{"epoch": 0, "val_student_acc": 50.0, "best_acc": 50.0}]


@pytest.mark.parametrize("loggers, error, needle", [
    (["tensorbored"], ValueError, "unknown logger 'tensorbored'; known: tensorboard, mlflow"),
    ([{"name": "mlflow", "uri": "x"}], ValueError, r"logger 'mlflow': unknown options \['uri'\]"),
    ([{"log_dir": "x"}], ValueError, "needs a 'name'"),
    ("tensorboard", TypeError, "loggers must be a list"),
    ([3], TypeError, "a logger is a name"),
])
def test_bad_logger_specs_fail_before_any_work(digits, tmp_path, loggers, error, needle):
    with pytest.raises(error, match=needle):
        _fit(digits, tmp_path / "run", loggers=loggers)
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_tensorboard_without_a_folder_is_refused():
    with pytest.raises(ValueError, match="give fit a run_dir, or a log_dir"):
        check_loggers(["tensorboard"], run_dir=None)


@pytest.mark.parametrize("name, package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_absent_logger_package_names_the_extra(name, package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(MissingExtraError, match=rf"^the {name} logger needs {package}: pip install 'distill\[log\]'$"):
        check_loggers([name], run_dir=tmp_path)
    with pytest.raises(RecipeError, match=rf"train.loggers: .*needs {package}: pip install 'distill\[log\]'"):
        parse_recipe(_recipe(loggers=[name]))


@pytest.mark.skipif(NO_TENSORBOARD is not None, reason=str(NO_TENSORBOARD))
def test_tensorboard_event_files_hold_the_rows(digits, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _fit(digits, tmp_path / "run", loggers=["tensorboard"])
    rows = _rows(tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "val_student_acc", "lr", "best_acc"} <= tags and "epoch" not in tags
    for tag in ("train_loss", "val_student_acc"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1]
        assert [e.value for e in events] == pytest.approx([r[tag] for r in rows], rel=1e-6)


@pytest.mark.skipif(NO_MLFLOW is not None, reason=str(NO_MLFLOW))
def test_mlflow_run_holds_the_rows_and_a_resume_continues_it(digits, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store: no database needed in a test
    uri = (tmp_path / "mlruns").as_uri()
    spec = {"name": "mlflow", "tracking_uri": uri, "experiment": "eco"}
    _fit(digits, tmp_path / "run", epochs=1, loggers=[spec], schedule="constant")
    _fit(digits, tmp_path / "run", epochs=2, loggers=[spec], schedule="constant", resume=True)  # the same MLflow run
    rows = _rows(tmp_path / "run")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("eco")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "run"
    history = client.get_metric_history(runs[0].info.run_id, "val_student_acc")
    assert [m.step for m in history] == [0, 1]
    assert [m.value for m in history] == pytest.approx([r["val_student_acc"] for r in rows])


# --------------------------------------------------------------------------- recipes and the CLI


def _recipe(**train) -> dict:
    return {"name": "logged", "data": {"name": "digits", "val_split": "val", "train_subset": 64, "batch_size": 32},
            "student": {"name": "cnn_digits_student"},
            "train": {"epochs": 1, "lr": 0.05, "schedule": "constant", "device": "cpu", **train}}


def test_recipe_loggers_are_validated():
    with pytest.raises(RecipeError, match="train.loggers: .*unknown logger 'wandb'"):
        parse_recipe(_recipe(loggers=["wandb"]))
    strategy = {**_recipe(loggers=[{"name": "tensorboard", "log_dir": "tb"}]), "strategy": {"name": "dml"}}
    with pytest.raises(RecipeError, match="train.loggers: strategy 'dml' runs its own training"):
        parse_recipe(strategy)


@pytest.mark.skipif(NO_TENSORBOARD is not None, reason=str(NO_TENSORBOARD))
def test_recipe_and_cli_logger(tmp_path, capsys):
    import yaml

    from distill.cli import main

    assert parse_recipe(_recipe(loggers=["tensorboard"])).train.loggers == ["tensorboard"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe()))
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--no-progress", "--logger", "tensorboard"]) == 0
    run = tmp_path / "runs" / "logged" / "seed0"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((tmp_path / "runs" / "logged" / "recipe.yaml").read_text())
    assert saved["train"]["loggers"] == ["tensorboard"]
    assert main(["run", str(path), "--out", str(tmp_path / "other"), "--no-progress", "--logger", "nope"]) == 2
    assert "unknown logger 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_make_loggers_places_named_loggers_beside_the_run(tmp_path):
    loggers = make_loggers([Recorder()], tmp_path)
    assert isinstance(loggers[0], Recorder)
    if NO_TENSORBOARD is None:
        (tb,) = make_loggers(["tensorboard"], tmp_path / "exp" / "seed0")
        assert tb.log_dir == tmp_path / "exp" / "seed0" / "tensorboard"
    if NO_MLFLOW is None:
        (ml,) = make_loggers(["mlflow"], tmp_path / "exp" / "seed0")
        assert (ml.experiment, ml.run_name) == ("exp", "seed0")
