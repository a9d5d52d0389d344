"""`distill auto` (issue 17): the search space, the Pareto front, the pruning rule, resume and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

try:
    import optuna
except ImportError:  # the pure parts (front, pruning rule, spec checks) run without it
    optuna = None

from distill.auto import (  # noqa: E402
    PruneSpec,
    _stale_trials_requeued,
    measure_latency,
    median_prune,
    pareto_front,
    parse_auto_spec,
    run_auto,
    sample_trial,
)
from distill.recipes import RecipeError, load_recipe  # noqa: E402
from distill.train.rundir import RunFolderError  # noqa: E402

needs_optuna = pytest.mark.skipif(optuna is None, reason="distill auto's search needs the 'auto' extra (optuna)")


def _spec(tmp_path: Path, **over) -> dict:
    spec = {
        "name": "auto_digits", "kind": "auto",
        "data": {"name": "digits", "val_split": "val", "train_subset": 300, "batch_size": 32},
        "teacher": {"name": "cnn_digits_teacher"},
        "teacher_train": {"epochs": 2, "lr": 0.05, "schedule": "cosine"},
        "students": [{"name": "mlp", "kwargs": {"input_size": 8, "hidden": [8]}},
                     {"name": "mlp", "kwargs": {"input_size": 8, "hidden": [32]}}],
        "methods": {"ce": {}, "kd": {"T": [2.0, 5.0], "weight": {"low": 0.5, "high": 2.0}}},
        "train": {"epochs": 2, "lr": 0.05, "schedule": "cosine"},
        "budget": {"trials": 4},
        "latency": {"repeats": 3},
        "output_dir": str(tmp_path / "runs"),
    }
    spec.update(over)
    return spec


# ------------------------------------------------------------------------------------- pure parts

def test_pareto_front_on_hand_points():
    # (accuracy ↑, parameters ↓): b dominates a (better accuracy, fewer parameters); c and d trade off;
    # e equals d exactly (neither dominates the other: both stay)
    points = [(80.0, 500.0), (85.0, 400.0), (90.0, 1000.0), (70.0, 100.0), (70.0, 100.0), (60.0, 100.0)]
    assert pareto_front(points, ["maximize", "minimize"]) == [1, 2, 3, 4]
    # with the directions flipped, the lowest accuracy and the most parameters win
    assert pareto_front(points, ["minimize", "maximize"]) == [0, 2, 5]
    # one objective: the best value(s) only
    assert pareto_front([(1.0,), (3.0,), (3.0,)], ["maximize"]) == [1, 2]


def test_median_rule_compares_only_curves_that_reached_the_epoch():
    prune = PruneSpec(warmup_epochs=1, startup_trials=3)
    others = [[50.0, 60.0, 99.0], [40.0, 80.0], [45.0, 90.0, 95.0], [10.0]]
    # epoch 2: the reached values are 60, 80, 90 → median 80 (their last values would give 95)
    assert median_prune(79.9, 2, others, prune)
    assert not median_prune(80.0, 2, others, prune)
    # epoch 1 is warm-up: never pruned
    assert not median_prune(0.0, 1, others, prune)
    # epoch 3: only two curves reached it (< startup_trials): never pruned
    assert not median_prune(0.0, 3, others, prune)
    assert not median_prune(0.0, 2, others, PruneSpec(enabled=False))


@needs_optuna
def test_sample_trial_builds_the_losses_of_fixed_parameters(tmp_path):
    spec = parse_auto_spec(_spec(tmp_path, ce=[0.3, 1.0], lr={"low": 0.01, "high": 0.5, "log": True}))
    trial = optuna.trial.FixedTrial({"student": "mlp(hidden=[32],input_size=8)", "method": "kd", "ce": 0.3,
                                     "kd.T": 5.0, "kd.weight": 1.7, "lr": 0.2})
    s = sample_trial(trial, spec)
    assert s == {"student": "mlp(hidden=[32],input_size=8)", "method": "kd",
                 "losses": {"ce": 0.3, "kd": {"T": 5.0, "weight": 1.7}}, "lr": 0.2}
    # "ce" alone: no distillation term, the spec's lr when lr is not searched
    spec = parse_auto_spec(_spec(tmp_path))
    s = sample_trial(optuna.trial.FixedTrial({"student": "mlp(hidden=[8],input_size=8)", "method": "ce"}), spec)
    assert s["losses"] == {"ce": 1.0} and s["lr"] == 0.05


@pytest.mark.parametrize("over, words", [
    ({"methods": {"kdd": {}}}, ["kdd"]),
    ({"methods": {"kd": {"T": {"low": 4.0, "high": 2.0}}}}, ["methods.kd.T", "low < high"]),
    ({"methods": {"kd": {"T": {"low": 0.0, "high": 2.0, "log": True}}}}, ["methods.kd.T", "low > 0"]),
    ({"methods": {"kd": {"T": []}}}, ["methods.kd.T", "empty"]),
    ({"methods": {"kd": {"temperature": 2.0}}}, ["temperature"]),
    ({"budget": {}}, ["budget", "minutes, trials"]),
    ({"teacher_train": None}, ["checkpoint", "teacher_train"]),
    ({"objectives": ["accuracy", "accuracy"]}, ["repeat"]),
    ({"students": []}, ["students"]),
])
def test_bad_specs_fail_before_any_work_naming_the_key(tmp_path, over, words):
    with pytest.raises((RecipeError, ValueError)) as e:
        parse_auto_spec(_spec(tmp_path, **over))
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_latency_runs_the_model_repeats_plus_warm_up_times():
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return x.sum(1)

    ms = measure_latency(Counting(), torch.zeros(2, 3), repeats=5)
    assert len(calls) == 8 and ms >= 0.0


@needs_optuna
def test_stale_running_trials_are_failed_and_queued_again(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    t = study.ask({"student": optuna.distributions.CategoricalDistribution(["a", "b"])})
    assert t.params["student"] in ("a", "b")
    assert _stale_trials_requeued(study) == 1
    states = [x.state for x in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert study.get_trials()[1].system_attrs["fixed_params"] == {"student": t.params["student"]}


# ------------------------------------------------------------------------------------- end to end

def _records(base: Path) -> list[dict]:
    return [json.loads(line) for line in (base / "trials.jsonl").read_text().splitlines()]


@needs_optuna
def test_auto_search_writes_a_pareto_front_of_loadable_recipes_and_resumes(tmp_path):
    torch.set_num_threads(1)
    spec = parse_auto_spec(_spec(tmp_path))
    base = run_auto(spec, progress=False)
    records = _records(base)
    assert len(records) == 4 and all(r["state"] in ("complete", "pruned") for r in records)
    done = [r for r in records if r["state"] == "complete"]
    # the front, recomputed here from the records: no complete trial is better in every objective
    front = json.loads((base / "pareto.json").read_text())
    assert front
    for f in front:
        for r in done:
            better_everywhere = (r["holdout_acc"] >= f["holdout_acc"] and r["parameters"] <= f["parameters"]
                                 and r["latency_ms"] <= f["latency_ms"])
            strictly = (r["holdout_acc"], -r["parameters"], -r["latency_ms"]) != \
                       (f["holdout_acc"], -f["parameters"], -f["latency_ms"])
            assert not (better_everywhere and strictly), (f, r)
        recipe = load_recipe(f["recipe"])  # each point's recipe loads and names the trial's settings
        assert recipe.train.lr == f["lr"] and set(recipe.losses) == set(f["losses"])
        assert recipe.teacher.model.checkpoint == str((base / "teacher" / "model.safetensors").resolve())
    # parameters are the students' own counts: 64·h + h + h·10 + 10
    sizes = {r["student"]: r["parameters"] for r in records}
    assert sizes.get("mlp(hidden=[8],input_size=8)", 8 * 75 + 10) == 8 * 75 + 10
    assert sizes.get("mlp(hidden=[32],input_size=8)", 32 * 75 + 10) == 32 * 75 + 10
    # each trial scored on the held-out part of the training split: 10% of 300 = 30 images, so accuracies
    # are multiples of 1/30
    for r in done:
        assert abs(r["holdout_acc"] * 30 / 100 - round(r["holdout_acc"] * 30 / 100)) < 1e-6
        assert r["test_acc"] is not None
    assert "| trial | student |" in (base / "pareto.md").read_text()
    # the study is never replaced silently; --resume continues it up to the new trial budget
    with pytest.raises(RunFolderError, match="--resume"):
        run_auto(spec, progress=False)
    changed = parse_auto_spec(_spec(tmp_path, train={"epochs": 3, "lr": 0.05, "schedule": "cosine"}))
    with pytest.raises(RecipeError, match="train.epochs"):
        run_auto(changed, progress=False, resume=True)
    more = spec.model_copy(update={"budget": spec.budget.model_copy(update={"trials": 6})})
    run_auto(more, progress=False, resume=True)
    assert len(_records(base)) == 6
    assert [r["trial"] for r in _records(base)][:4] == [r["trial"] for r in records]


@needs_optuna
def test_a_trial_below_the_median_of_its_students_earlier_trials_is_pruned(tmp_path):
    torch.set_num_threads(1)
    spec = parse_auto_spec(_spec(tmp_path, budget={"trials": 1}, train={"epochs": 3, "lr": 0.05}))
    base = run_auto(spec, progress=False)
    study = optuna.load_study(study_name=spec.name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(base / "study.journal"))))
    label = "mlp(hidden=[8],input_size=8)"
    dists = {"student": optuna.distributions.CategoricalDistribution([label, "mlp(hidden=[32],input_size=8)"]),
             "method": optuna.distributions.CategoricalDistribution(["ce", "kd"])}
    for _ in range(3):  # three earlier trials of the same student that were perfect at every epoch
        study.add_trial(optuna.trial.create_trial(params={"student": label, "method": "ce"}, distributions=dists,
                                                  values=[100.0, 610.0, 0.01],
                                                  user_attrs={"curve": [100.0] * 3, "parameters": 610,
                                                              "latency_ms": 0.01, "lr": 0.05, "test_acc": 100.0,
                                                              "losses": {"ce": {"weight": 1.0}}}))
    study.enqueue_trial({"student": label, "method": "ce"})
    more = spec.model_copy(update={"budget": spec.budget.model_copy(update={"trials": 5})})
    run_auto(more, progress=False, resume=True)
    last = study.get_trials()[-1]
    assert last.params == {"student": label, "method": "ce"}
    # warm-up is one epoch: it ran epoch 2, was below 100%, and stopped there
    assert last.state == optuna.trial.TrialState.PRUNED and len(last.user_attrs["curve"]) == 2


@needs_optuna
def test_the_command_line_runs_parallel_workers_on_one_study(tmp_path, capsys):
    import yaml

    from distill.cli import main

    torch.set_num_threads(1)
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path, budget={"trials": 2}, train={"epochs": 1, "lr": 0.05})))
    # the command line's budget and jobs override the spec's
    assert main(["auto", str(path), "--trials", "4", "--jobs", "2", "--no-progress"]) == 0
    base = tmp_path / "runs" / "auto_digits"
    records = _records(base)
    assert len(records) >= 4 and len({r["trial"] for r in records}) == len(records)
    assert "| trial | student |" in capsys.readouterr().out
    # a search spec given to 'distill run' is refused with the command that runs it
    assert main(["run", str(path)]) == 2
    assert "distill auto" in capsys.readouterr().err


@needs_optuna
def test_the_report_keeps_one_point_per_objective_vector_and_lists_its_ties(tmp_path):
    from distill.auto import _directions, _storage, write_report

    spec = parse_auto_spec(_spec(tmp_path))
    base = tmp_path / "runs" / spec.name
    base.mkdir(parents=True)
    study = optuna.create_study(study_name=spec.name, storage=_storage(base), directions=_directions(spec))
    label = "mlp(hidden=[8],input_size=8)"
    dists = {"student": optuna.distributions.CategoricalDistribution([label]),
             "method": optuna.distributions.CategoricalDistribution(["ce"])}
    for acc, params in ((90.0, 610), (90.0, 610), (80.0, 610), (95.0, 2410)):
        study.add_trial(optuna.trial.create_trial(
            params={"student": label, "method": "ce"}, distributions=dists, values=[acc, params, 0.01],
            user_attrs={"curve": [acc], "parameters": params, "latency_ms": 0.01, "lr": 0.05, "test_acc": acc,
                        "losses": {"ce": {"weight": 1.0}}}))
    front = write_report(spec, base)
    # trial 2 (80%, 610) is dominated by trial 0; trial 1 ties with trial 0 and is listed with it
    assert [(f["trial"], f["ties"]) for f in front] == [(3, []), (0, [1])]
    assert sorted(p.name for p in (base / "pareto").iterdir()) == ["trial0000.yaml", "trial0003.yaml"]
