"""Results are never lost, mixed or mislabelled: resume checks the run's fingerprint, a folder with
results is never silently replaced, one writer per run folder and per cache build, time over sessions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import distill.train as train_pkg
from distill import Distiller, fit
from distill.data import InMemoryLoader, get_dataset
from distill.locks import RunLock, RunLockedError
from distill.methods import Method
from distill.models import create
from distill.recipes import parse_recipe
from distill.runner import run_recipe
from distill.train import load_checkpoint
from distill.train.rundir import ResumeError, RunFolderError, SpecMismatchError

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def digits():
    tr, va = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    return tr.inputs[:64].clone(), tr.targets[:64].clone(), va.inputs[:32].clone(), va.targets[:32].clone()


def _setup(digits, extra: dict[str, Any] | None = None):
    xt, yt, xv, yv = digits
    torch.manual_seed(0)
    d = Distiller(create("cnn", widths=(4, 8), num_classes=10), None, losses={"ce": 1.0, **(extra or {})})
    return d, InMemoryLoader(xt, yt, 32, seed=0), InMemoryLoader(xv, yv, 32, shuffle=False)


KW = {"lr": 0.05, "schedule": "constant", "progress": False, "device": "cpu"}


def _fit(digits, run_dir, **kw):
    d, train, val = _setup(digits)
    return fit(d, train, val, run_dir=run_dir, **{**KW, "epochs": 1, **kw})


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ fit: the fingerprint


def test_resume_under_other_settings_names_each_field(digits, tmp_path):
    _fit(digits, tmp_path, epochs=2)
    with pytest.raises(SpecMismatchError, match=r"lr: checkpoint 0\.05, now 0\.1") as info:
        _fit(digits, tmp_path, epochs=2, lr=0.1, resume=True)
    assert ("fit.lr", 0.05, 0.1) in info.value.differences
    # another optimizer died inside load_state_dict ("step") before; now it is named
    with pytest.raises(SpecMismatchError, match="fit.optimizer: checkpoint sgd, now adam"):
        _fit(digits, tmp_path, epochs=2, optimizer="adam", resume=True)
    with pytest.raises(SpecMismatchError, match=r"student\..*checkpoint \[4, 1, 3, 3\], now \[8, 1, 3, 3\]"):
        xt, yt, xv, yv = digits
        d = Distiller(create("cnn", widths=(8, 8), num_classes=10), None, losses={"ce": 1.0})
        fit(d, InMemoryLoader(xt, yt, 32, seed=0), None, run_dir=tmp_path, resume=True, **{**KW, "epochs": 2})
    # what may change on resume: device, progress, evaluation of the teacher, checkpoint frequency
    _fit(digits, tmp_path, epochs=2, resume=True, checkpoint_every=2, eval_teacher=False)
    assert len(_lines(tmp_path / "metrics.jsonl")) == 2


def test_resume_refuses_fewer_epochs_than_done_and_an_epoch_dependent_schedule(digits, tmp_path):
    _fit(digits, tmp_path / "a", epochs=2)
    with pytest.raises(SpecMismatchError, match=r"epochs: checkpoint 2 \(2 done\), now 1"):
        _fit(digits, tmp_path / "a", epochs=1, resume=True)
    _fit(digits, tmp_path / "b", epochs=2, schedule="cosine")
    with pytest.raises(SpecMismatchError, match="'cosine' schedule depends on the number of epochs"):
        _fit(digits, tmp_path / "b", epochs=3, schedule="cosine", resume=True)
    # a constant schedule may be extended (test_train's bit-exact test covers the weights)
    res = _fit(digits, tmp_path / "a", epochs=3, resume=True)
    assert [r["epoch"] for r in res.history] == [0, 1, 2]


def test_fit_stores_the_fingerprint_in_last_and_best(digits, tmp_path):
    _fit(digits, tmp_path, fingerprint={"recipe": "mine", "train": {"lr": 0.05}})
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(tmp_path / "checkpoints" / name)["fingerprint"] == {"recipe": "mine",
                                                                                   "train": {"lr": 0.05}}
    with pytest.raises(SpecMismatchError, match="train.lr: checkpoint 0.05, now 0.2"):
        _fit(digits, tmp_path, fingerprint={"recipe": "mine", "train": {"lr": 0.2}}, resume=True)


def test_a_checkpoint_without_fingerprint_is_not_resumed(digits, tmp_path):
    _fit(digits, tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    del state["fingerprint"]
    torch.save(state, last)
    with pytest.raises(ResumeError, match="does not record the settings"):
        _fit(digits, tmp_path, epochs=2, resume=True)


# ------------------------------------------------------------------------ fit: never silently replaced


def test_a_folder_with_results_is_refused_without_resume_or_overwrite(digits, tmp_path):
    _fit(digits, tmp_path, epochs=2)
    before = (tmp_path / "metrics.jsonl").read_text()
    best = (tmp_path / "checkpoints" / "best.pt").read_bytes()
    with pytest.raises(RunFolderError, match="already holds a run's results.*resume.*overwrite"):
        _fit(digits, tmp_path, lr=0.5)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert (tmp_path / "checkpoints" / "best.pt").read_bytes() == best


def test_resume_where_results_but_no_last_pt_is_an_error(digits, tmp_path):
    _fit(digits, tmp_path, epochs=2)
    (tmp_path / "checkpoints" / "last.pt").unlink()
    best = (tmp_path / "checkpoints" / "best.pt").read_bytes()
    with pytest.raises(ResumeError, match="holds results but no checkpoints/last.pt"):
        _fit(digits, tmp_path, epochs=2, resume=True)
    assert (tmp_path / "checkpoints" / "best.pt").read_bytes() == best
    assert len(_lines(tmp_path / "metrics.jsonl")) == 2
    # nothing at all: resume starts afresh
    assert len(_fit(digits, tmp_path / "new", resume=True).history) == 1


def test_overwrite_clears_the_folder_first(digits, tmp_path):
    _fit(digits, tmp_path, epochs=2)
    (tmp_path / "checkpoints" / "stale.pt").write_bytes(b"old")
    (tmp_path / "summary.json").write_text("{}")
    _fit(digits, tmp_path, overwrite=True)
    assert len(_lines(tmp_path / "metrics.jsonl")) == 1
    assert not (tmp_path / "checkpoints" / "stale.pt").exists() and not (tmp_path / "summary.json").exists()
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["epoch"] == 0
    with pytest.raises(ValueError, match="exclude each other"):
        _fit(digits, tmp_path, overwrite=True, resume=True)


# ------------------------------------------------------------------------------ one writer per folder


def test_a_locked_run_folder_is_refused_naming_the_holder(digits, tmp_path):
    with RunLock(tmp_path / "run", "another fit"):
        with pytest.raises(RunLockedError, match=rf"is being written by pid {os.getpid()} \(another fit") as info:
            _fit(digits, tmp_path / "run")
        assert info.value.pid == os.getpid()
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    _fit(digits, tmp_path / "run")  # released on exit
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_the_lock_holds_across_processes_and_dies_with_its_process(tmp_path):
    """A real second process holds the lock: refused, with its pid; once it is killed the stale
    lock file (its pid still written there) does not block."""
    script = ("import importlib.util, sys, time\n"
              f"spec = importlib.util.spec_from_file_location('locks', {str(SRC / 'distill' / 'locks.py')!r})\n"
              "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
              f"lock = m.RunLock({str(tmp_path)!r}, 'holder').acquire()\n"
              "print('held', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is being written by pid {proc.pid} \(holder"):
            RunLock(tmp_path, "second").acquire()
    finally:
        proc.kill()
        proc.wait()
    assert str(proc.pid) in (tmp_path / ".lock").read_text()  # stale text, no lock
    with RunLock(tmp_path, "third"):
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / ".lock").exists()  # a clean release leaves only the results


def test_a_locked_cache_folder_is_refused(digits, tmp_path):
    from distill.cache import build_cache

    xt, yt, _, _ = digits
    teacher = create("cnn", widths=(4, 8), num_classes=10)
    with RunLock(tmp_path / "cache", "teacher cache build"):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            build_cache(teacher, xt, tmp_path / "cache", targets=yt, progress=False)
    assert not (tmp_path / "cache" / "data.bin").exists()
    build_cache(teacher, xt, tmp_path / "cache", targets=yt, progress=False)
    assert (tmp_path / "cache" / "manifest.json").is_file()


# ----------------------------------------------------------------------------- time over the sessions


class _Slow(Method):
    """No loss; 50 ms per step in epoch 0 (a session that takes measurable time)."""

    needs_teacher = False

    def forward(self, student_view, teacher_view, batch):
        if self.epoch == 0:
            time.sleep(0.05)
        return student_view["logits"].sum() * 0.0


class _Stop(Exception):
    pass


def _stop_after_first(row):
    if row["epoch"] == 0:
        raise _Stop


def test_time_after_a_resume_counts_the_sessions_before_it(digits, tmp_path):
    d, train, val = _setup(digits, {"slow": _Slow()})
    with pytest.raises(_Stop):
        fit(d, train, val, run_dir=tmp_path, on_epoch_end=_stop_after_first, **{**KW, "epochs": 2})
    before = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["elapsed_s"]
    assert before >= 0.1  # two steps of 50 ms
    d, train, val = _setup(digits, {"slow": _Slow()})
    result = fit(d, train, val, run_dir=tmp_path, resume=True, **{**KW, "epochs": 2})
    assert result.time_s >= before
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["elapsed_s"] >= before


# -------------------------------------------------------------------------------------------- recipes


TRAIN = {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "schedule": "constant", "device": "cpu"}


def _recipe(name="integrity", **overrides):
    data: dict[str, Any] = {
        "name": name, "kind": "distill", "seeds": [0],
        "data": {"name": "digits", "val_split": "val", "train_subset": 64, "batch_size": 32},
        "student": {"name": "cnn_digits_student"},
        "teacher": {"model": {"name": "cnn_digits_teacher"}, "train": dict(TRAIN), "train_subset": 64},
        "losses": {"ce": 1.0, "kd": {"T": 4.0}}, "train": dict(TRAIN),
    }
    data.update(overrides)
    return parse_recipe(data)


def _no_fit(*_a, **_k):
    raise AssertionError("trained before the run folder was checked")


def test_recipe_rerun_and_a_same_named_recipe_are_refused_before_any_work(tmp_path, monkeypatch):
    run_recipe(_recipe(), out_dir=tmp_path, progress=False)
    base = tmp_path / "integrity"
    summary, saved_recipe = (base / "seed0" / "summary.json").read_text(), (base / "recipe.yaml").read_text()
    monkeypatch.setattr(train_pkg, "fit", _no_fit)
    with pytest.raises(RunFolderError, match="seed0 already holds results.*--resume.*--overwrite"):
        run_recipe(_recipe(), out_dir=tmp_path, progress=False)
    other = _recipe(train={**TRAIN, "lr": 0.2}, teacher={"model": {"name": "cnn_digits_teacher"},
                                                         "train": {**TRAIN, "lr": 0.2}, "train_subset": 64})
    with pytest.raises(RunFolderError, match="seed0 already holds results"):
        run_recipe(other, out_dir=tmp_path, progress=False)
    assert (base / "seed0" / "summary.json").read_text() == summary
    assert (base / "recipe.yaml").read_text() == saved_recipe  # still the recipe of the results there


def test_recipe_resume_checks_the_recipe_and_the_epochs(tmp_path, monkeypatch):
    run_recipe(_recipe(train={**TRAIN, "epochs": 2}), out_dir=tmp_path, progress=False)
    monkeypatch.setattr(train_pkg, "fit", _no_fit)
    with pytest.raises(SpecMismatchError, match=r"train\.lr: checkpoint 0\.05, now 0\.1"):
        run_recipe(_recipe(train={**TRAIN, "epochs": 2, "lr": 0.1}), out_dir=tmp_path, progress=False, resume=True)
    with pytest.raises(SpecMismatchError, match="losses.kd.T: checkpoint 4.0, now 2.0"):
        run_recipe(_recipe(train={**TRAIN, "epochs": 2}, losses={"ce": 1.0, "kd": {"T": 2.0}}), out_dir=tmp_path,
                   progress=False, resume=True)
    # fewer epochs than done: the summary would have claimed 1 epoch for a 2-epoch result
    with pytest.raises(SpecMismatchError, match=r"epochs: checkpoint 2 \(2 done\), now 1"):
        run_recipe(_recipe(), out_dir=tmp_path, progress=False, resume=True)
    assert json.loads((tmp_path / "integrity" / "seed0" / "summary.json").read_text())["epochs"] == 2


def test_a_changed_teacher_is_never_resumed_and_retrains_from_nothing(tmp_path, monkeypatch):
    base = tmp_path / "integrity"
    run_recipe(_recipe(teacher={"model": {"name": "cnn_digits_teacher"}, "train": {**TRAIN, "epochs": 2},
                                "train_subset": 64}), out_dir=tmp_path, progress=False)
    assert len(_lines(base / "teacher" / "metrics.jsonl")) == 2
    changed = _recipe()  # the teacher now trains 1 epoch
    real = train_pkg.fit
    monkeypatch.setattr(train_pkg, "fit", _no_fit)
    with pytest.raises(SpecMismatchError, match=r"teacher\.train\.epochs: checkpoint 2, now 1"):  # the student's
        run_recipe(changed, out_dir=tmp_path, progress=False, resume=True)
    shutil.rmtree(base / "seed0")  # as if stopped after the teacher: the teacher's own check
    with pytest.raises(SpecMismatchError, match=r"teacher .*trained with other settings \(train\.epochs: trained "
                                                r"with 2, now 1\).*--overwrite"):
        run_recipe(changed, out_dir=tmp_path, progress=False, resume=True)
    monkeypatch.setattr(train_pkg, "fit", real)
    run_recipe(changed, out_dir=tmp_path, progress=False, overwrite=True)
    rows = _lines(base / "teacher" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0]  # trained afresh for its 1 epoch, not resumed at epoch 2
    assert load_checkpoint(base / "teacher" / "checkpoints" / "last.pt")["epoch"] == 0
    assert json.loads((base / "teacher" / "teacher_spec.json").read_text())["train"]["epochs"] == 1


def test_recipe_resume_without_last_pt_is_an_error(tmp_path):
    run_recipe(_recipe(), out_dir=tmp_path, progress=False)
    seed = tmp_path / "integrity" / "seed0"
    (seed / "checkpoints" / "last.pt").unlink()
    best = (seed / "checkpoints" / "best.pt").read_bytes()
    with pytest.raises(ResumeError, match="holds results but no checkpoints/last.pt"):
        run_recipe(_recipe(), out_dir=tmp_path, progress=False, resume=True)
    assert (seed / "checkpoints" / "best.pt").read_bytes() == best


def test_recipe_summary_time_counts_the_sessions_before_a_resume(tmp_path):
    first = json.loads((run_recipe(_recipe(), out_dir=tmp_path, progress=False)[0] / "summary.json").read_text())
    seed = tmp_path / "integrity" / "seed0"
    elapsed = load_checkpoint(seed / "checkpoints" / "last.pt")["elapsed_s"]
    again = json.loads((run_recipe(_recipe(), out_dir=tmp_path, progress=False, resume=True)[0]
                        / "summary.json").read_text())
    assert again["time_s"] >= elapsed > 0
    assert again["time_s"] >= 0.5 * first["time_s"]


def test_a_locked_recipe_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(train_pkg, "fit", _no_fit)
    with RunLock(tmp_path / "integrity", "distill run integrity"):
        with pytest.raises(RunLockedError, match=f"integrity is being written by pid {os.getpid()}"):
            run_recipe(_recipe(), out_dir=tmp_path, progress=False)


def test_cli_resume_and_overwrite(tmp_path, capsys):
    import yaml

    from distill.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(teacher=None, losses={"ce": 1.0}).model_dump(mode="json")))
    out = ["--out", str(tmp_path / "runs"), "--no-progress"]
    assert main(["run", str(recipe), *out]) == 0
    capsys.readouterr()
    assert main(["run", str(recipe), *out]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "already holds results" in err and "--resume" in err and "--overwrite" in err
    assert main(["run", str(recipe), "--overwrite", *out]) == 0
    assert main(["run", str(recipe), "--resume", *out]) == 0
    with pytest.raises(SystemExit):
        main(["run", str(recipe), "--resume", "--overwrite", *out])


# ------------------------------------------------------------------------------------- the cohort loop


def test_the_cohort_loop_guards_its_folder_like_fit(digits, tmp_path):
    from distill.strategies.online import fit_dml

    xt, yt, _, _ = digits

    def run(**kw):
        torch.manual_seed(0)
        return fit_dml(lambda: create("cnn", widths=(4, 8), num_classes=10), InMemoryLoader(xt, yt, 32, seed=0),
                       None, epochs=1, run_dir=tmp_path, progress=False, schedule="constant", **kw)

    run()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["fingerprint"]["fit"]["lr"] == 0.05
    with pytest.raises(RunFolderError):
        run()
    with pytest.raises(SpecMismatchError, match="fit.lr: checkpoint 0.05, now 0.1"):
        run(resume=True, lr=0.1)
    with RunLock(tmp_path, "another cohort"):
        with pytest.raises(RunLockedError):
            run(overwrite=True)
    assert len(run(overwrite=True).history) == 1


def test_co_training_never_silently_replaces_its_folder(digits, tmp_path, monkeypatch):
    import distill.strategies.transfer as T

    monkeypatch.setattr(T, "fit", lambda *a, **k: train_pkg.FitResult())  # its rounds' training: not the point
    xt, yt, _, _ = digits

    def run(**kw):
        return T.fit_co_training(lambda: create("mlp_digits_student"), (xt[:20], yt[:20]), unlabeled=xt[20:60],
                                 epochs=1, rounds=1, pool_size=20, per_class=1, progress=False, run_dir=tmp_path, **kw)

    run()
    stale = tmp_path / "checkpoints" / "stale.pt"
    stale.write_bytes(b"old")
    with pytest.raises(RunFolderError, match="already holds a run's results"):
        run()
    assert stale.is_file()
    run(overwrite=True)
    assert not stale.exists() and (tmp_path / "checkpoints" / "last.pt").is_file()
