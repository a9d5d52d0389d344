"""Recipes: every shipped YAML validates; bad recipes fail before any work; tiny end-to-end runs.

The end-to-end runs use the embedded digits data (no download) with a 96-image training subset,
a 1-epoch teacher and a 2-epoch student, so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from distill import runner
from distill.recipes import Recipe, RecipeError, load_recipe, parse_recipe, read_recipe_file
from distill.runner import run_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml")) + sorted((REPO / "recipes").rglob("*.yml"))

TINY_TRAIN = {"epochs": 2, "optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "device": "cpu"}
TEACHER_TRAIN = {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "device": "cpu"}


def tiny_recipe(name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A small distillation recipe on digits: 96 training images, a teacher trained in-run."""
    data: dict[str, Any] = {
        "name": name,
        "kind": "distill",
        "seeds": [0],
        "data": {"name": "digits", "val_split": "val", "train_subset": 96, "batch_size": 32},
        "student": {"name": "cnn_digits_student"},
        "teacher": {"model": {"name": "cnn_digits_teacher"}, "train": dict(TEACHER_TRAIN)},
        "losses": {"ce": 1.0, "kd": {"T": 4.0}},
        "train": dict(TINY_TRAIN),
    }
    data.update(overrides)
    return data


def train_recipe(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tiny_train",
        "kind": "train",
        "student": {"name": "cnn_digits_student"},
        "train": {"epochs": 1},
    }
    data.update(overrides)
    return data


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    return str(info.value)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models run faster on one thread, and do not fight other processes for the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def metrics_files(root: Path) -> list[Path]:
    return sorted(root.rglob("metrics.jsonl"))


# --------------------------------------------------------------------------- shipped recipes


def test_recipes_folder_is_not_empty() -> None:
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    expected = {"digits/teacher.yaml", "digits/teacher_ls.yaml", "mnist/kd_cnn.yaml", "fashion_mnist/kd_cnn.yaml"}
    expected |= {f"digits/{m}.yaml" for m in ("kd", "logit_regression", "noisy_teacher", "dkd", "dist", "skd",
                                                "ctkd", "fitnet", "at", "label_smoothing", "ensemble_kd")}
    assert expected <= names, f"missing recipes: {sorted(expected - names)}"


# digits recipes whose student is not the protocol's by design (each says why in its header)
OWN_DIGITS_PROTOCOL = {
    "binary_kt.yaml": "the student is the teacher's own architecture with binary weights",
    "benn.yaml": "an ensemble of binary networks trained by boosting on the whole training split",
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_validates(path: Path) -> None:
    assert path.read_text().lstrip().startswith("#"), "each recipe starts with a comment header"
    from distill.lm_runner import LMRecipe, is_lm_recipe, load_lm_recipe

    if is_lm_recipe(path):  # language-model recipes (kind: lm) have a schema of their own
        assert isinstance(load_lm_recipe(path), LMRecipe)
        return
    from distill.graph_runner import GraphRecipe, is_graph_recipe, load_graph_recipe

    if is_graph_recipe(path):  # graph recipes (kind: graph) have a schema of their own
        assert isinstance(load_graph_recipe(path), GraphRecipe)
        return
    from distill.generative_runner import GenerativeRecipe, is_generative_recipe, load_generative_recipe

    if is_generative_recipe(path):  # generative recipes (kind: generative) have a schema of their own
        assert isinstance(load_generative_recipe(path), GenerativeRecipe)
        return
    from distill.recipes import SynthRecipe, is_synth_recipe, load_synth_recipe, read_recipe_file

    if is_synth_recipe(read_recipe_file(path)):  # synthetic-set recipes (kind: synth, 'distill synth') too
        assert isinstance(load_synth_recipe(path), SynthRecipe)
        return
    from distill.auto import AutoSpec, is_auto_spec, load_auto_spec

    if is_auto_spec(read_recipe_file(path)):  # search specs (kind: auto, 'distill auto')
        assert isinstance(load_auto_spec(path), AutoSpec)
        return
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    if recipe.kind == "distill":
        assert recipe.teacher is not None or recipe.strategy is not None  # strategies may bring their own
        if recipe.data.name == "digits" and path.name not in OWN_DIGITS_PROTOCOL:
            semi = recipe.strategy is not None and recipe.strategy.labeled is not None
            # the same 270 labeled images everywhere (semi-supervised recipes add the rest unlabeled)
            assert (recipe.strategy.labeled if semi else recipe.data.train_subset) == 270
            assert recipe.seeds == [0, 1, 2]
            assert recipe.train.epochs == 40 and recipe.train.schedule == "cosine"
            assert recipe.student.name == "cnn_digits_student"
    else:
        assert recipe.teacher is None


def test_recipe_names_are_unique() -> None:
    # run folders are OUT/<name>: two recipes with one name would share (and reuse) a teacher
    names = [read_recipe_file(p)["name"] for p in RECIPES]
    assert len(names) == len(set(names)), names


def test_digits_recipes_use_their_methods() -> None:
    digits = REPO / "recipes" / "digits"
    for method in ("kd", "logit_regression", "noisy_teacher", "dkd", "dist", "skd", "ctkd", "fitnet", "at",
                   "label_smoothing"):
        assert method in load_recipe(digits / f"{method}.yaml").losses, method
    fitnet = load_recipe(digits / "fitnet.yaml")
    assert fitnet.hint_stage is not None and fitnet.hint_stage.method == "fitnet"
    ens = load_recipe(digits / "ensemble_kd.yaml")
    assert ens.teacher is not None and ens.teacher.ensemble is not None
    assert [m.name for m in ens.teacher.ensemble] == ["cnn_digits_teacher"] * 3
    assert ens.teacher.combine == "probs" and ens.teacher.temperature == 4.0
    assert load_recipe(digits / "teacher_ls.yaml").losses == {"label_smoothing": {"eps": 0.1}}
    assert load_recipe(digits / "teacher.yaml").data.val_split == "val"
    for sub in ("mnist", "fashion_mnist"):
        r = load_recipe(REPO / "recipes" / sub / "kd_cnn.yaml")
        assert r.data.name == sub and r.data.root is None
        assert (r.student.name, r.teacher.model.name) == ("cnn_student_mnist", "cnn_teacher_mnist")
        assert r.losses["kd"] == {"T": 4.0}


# --------------------------------------------------------------------------- parse errors


def test_valid_tiny_recipes_parse() -> None:
    parse_recipe(tiny_recipe())
    parse_recipe(train_recipe())


def test_unknown_top_level_key() -> None:
    msg = error_of(train_recipe(bogus=1))
    assert "bogus" in msg and "unknown key" in msg


def test_unknown_nested_key() -> None:
    data = train_recipe()
    data["train"]["lrr"] = 0.1
    msg = error_of(data)
    assert "train.lrr" in msg and "unknown key" in msg


def test_wrong_type_names_key_and_value() -> None:
    data = train_recipe()
    data["train"]["epochs"] = "ten"
    msg = error_of(data)
    assert "train.epochs" in msg and "'ten'" in msg


def test_negative_batch_size_names_key_and_value() -> None:
    msg = error_of(train_recipe(data={"batch_size": -1}))
    assert "data.batch_size" in msg and "-1" in msg


def test_every_bad_key_is_listed_at_once() -> None:
    data = train_recipe(bogus=1, data={"batch_size": -1})
    data["train"]["lrr"] = 0.1
    msg = error_of(data)
    assert "bogus" in msg and "data.batch_size" in msg and "train.lrr" in msg


def test_unknown_method_suggests_close_names() -> None:
    msg = error_of(train_recipe(losses={"kdd": 1.0}))
    assert "losses.kdd" in msg and "unknown method 'kdd'" in msg
    assert "'kd'" in msg and "'skd'" in msg  # close names (difflib's three nearest)


def test_unknown_method_argument() -> None:
    msg = error_of(tiny_recipe(losses={"ce": 1.0, "kd": {"TT": 2.0}}))
    assert "losses.kd.TT" in msg and "unknown key" in msg


def test_wrong_method_argument_type() -> None:
    msg = error_of(tiny_recipe(losses={"kd": {"T": "hot"}}))
    assert "losses.kd.T" in msg and "'hot'" in msg


def test_unknown_model() -> None:
    msg = error_of(train_recipe(student={"name": "cnn_digit_student"}))
    assert "student.name" in msg and "cnn_digit_student" in msg and "cnn_digits_student" in msg


def test_unknown_teacher_model() -> None:
    msg = error_of(tiny_recipe(teacher={"model": {"name": "resnet_huge"}, "train": TEACHER_TRAIN}))
    assert "teacher.model.name" in msg and "resnet_huge" in msg


def test_teacher_needs_model_or_ensemble() -> None:
    msg = error_of(tiny_recipe(teacher={"train": TEACHER_TRAIN}))
    assert "teacher" in msg and "'model' or 'ensemble'" in msg
    both = {"model": {"name": "cnn_digits_teacher"}, "ensemble": [{"name": "cnn_digits_teacher"}],
            "train": TEACHER_TRAIN}
    assert "'model' or 'ensemble'" in error_of(tiny_recipe(teacher=both))


def test_teacher_without_checkpoint_needs_train() -> None:
    msg = error_of(tiny_recipe(teacher={"model": {"name": "cnn_digits_teacher"}}))
    assert "teacher" in msg and "train" in msg


def test_train_recipe_with_teacher() -> None:
    msg = error_of(train_recipe(teacher={"model": {"name": "cnn_digits_teacher"}, "train": TEACHER_TRAIN}))
    assert "kind 'train'" in msg and "teacher" in msg


def test_whole_recipe_error_line_has_a_key() -> None:
    msg = error_of(train_recipe(teacher={"model": {"name": "cnn_digits_teacher"}, "train": TEACHER_TRAIN}))
    assert not any(line.strip().startswith(":") for line in msg.splitlines())


def test_hint_stage_method_must_be_a_loss() -> None:
    msg = error_of(tiny_recipe(hint_stage={"method": "fitnet", "train": TEACHER_TRAIN}))
    assert "hint_stage.method" in msg and "fitnet" in msg


def test_errors_come_from_parsing_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_recipe on a bad file raises without touching data, models or the file system."""
    def boom(*_a: Any, **_k: Any) -> None:
        raise AssertionError("no training or data loading while parsing a recipe")

    monkeypatch.setattr("distill.train.fit", boom)
    monkeypatch.setattr("distill.data.get_dataset", boom)
    monkeypatch.chdir(tmp_path)
    bad = tiny_recipe(losses={"kd": {"TT": 2.0}})
    bad["train"]["lrr"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(RecipeError, match=r"train\.lrr"):
        load_recipe(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_load_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "broken.yaml")


# --------------------------------------------------------------------------- checks in run_recipe


@pytest.mark.parametrize("side", ["student_tap", "teacher_tap"])
def test_bad_tap_fails_before_training(side: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = runner.train_model
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: calls.append("train") or real(*a, **k))
    fitnet = {"student_tap": "stage2", "teacher_tap": "stage2", side: "stage9"}
    recipe = parse_recipe(tiny_recipe(losses={"ce": 1.0, "fitnet": fitnet}))
    with pytest.raises(RecipeError) as info:
        run_recipe(recipe, out_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert msg.startswith("losses.fitnet:"), msg  # names the recipe key
    assert "'stage9'" in msg and "Nearest valid paths" in msg
    assert "'stage1'" in msg or "'stage2'" in msg or "'stage3'" in msg
    assert calls == [], "the teacher was trained before the tap error"
    assert metrics_files(tmp_path) == []
    assert list(tmp_path.rglob("model.safetensors")) == []


def test_missing_data_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_mnist"
    recipe = parse_recipe(tiny_recipe(data={"name": "mnist", "root": str(missing)},
                                      student={"name": "cnn_student_mnist"},
                                      teacher={"model": {"name": "cnn_teacher_mnist"}, "train": TEACHER_TRAIN}))
    with pytest.raises(FileNotFoundError) as info:
        run_recipe(recipe, out_dir=tmp_path / "out", progress=False)
    assert str(missing) in str(info.value)
    assert metrics_files(tmp_path) == []


def test_missing_default_mnist_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTILL_MNIST", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data/mnist from here
    recipe = parse_recipe(tiny_recipe(data={"name": "mnist"}, student={"name": "cnn_student_mnist"},
                                      teacher={"model": {"name": "cnn_teacher_mnist"}, "train": TEACHER_TRAIN}))
    with pytest.raises(FileNotFoundError, match="DISTILL_MNIST"):
        run_recipe(recipe, out_dir=tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("e2e")
    recipe = parse_recipe(tiny_recipe("tiny_kd"))
    dirs = run_recipe(recipe, out_dir=out, progress=False)
    model = out / "tiny_kd" / "teacher" / "model.safetensors"
    return {"out": out, "dirs": dirs, "recipe": recipe, "model": model, "mtime": model.stat().st_mtime_ns,
            "bytes": model.read_bytes()}


def test_end_to_end_files(kd_run: dict[str, Any]) -> None:
    base = kd_run["out"] / "tiny_kd"
    assert kd_run["dirs"] == [base / "seed0"]
    for rel in ("seed0/metrics.jsonl", "seed0/summary.json", "report.md", "recipe.yaml", "teacher/model.safetensors",
                "teacher/summary.json"):
        assert (base / rel).is_file(), rel
    rows = [json.loads(line) for line in (base / "seed0" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 2
    summary = json.loads((base / "seed0" / "summary.json").read_text())
    for key in ("last_acc", "best_acc", "teacher_acc", "agreement", "teacher_label_smoothing"):
        assert key in summary, key
    for key in ("last_acc", "best_acc", "teacher_acc", "agreement"):
        assert isinstance(summary[key], (int, float)) and 0 <= summary[key] <= 100, (key, summary[key])
    assert summary["teacher_label_smoothing"] == 0.0
    assert summary["notes"] == []
    assert summary["data"]["train_size"] == 96
    assert summary["losses"] == {"ce": {"weight": 1.0}, "kd": {"T": 4.0}}
    report = (base / "report.md").read_text()
    assert "tiny_kd" in report
    # recipe.yaml is a loadable copy of what ran
    assert load_recipe(base / "recipe.yaml") == kd_run["recipe"]


def test_second_run_reuses_the_teacher(kd_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the teacher was trained again")

    monkeypatch.setattr(runner, "train_model", no_training)
    first = json.loads((kd_run["dirs"][0] / "summary.json").read_text())
    dirs = run_recipe(kd_run["recipe"], out_dir=kd_run["out"], progress=False, overwrite=True)
    model: Path = kd_run["model"]
    assert model.stat().st_mtime_ns == kd_run["mtime"]
    assert model.read_bytes() == kd_run["bytes"]
    second = json.loads((dirs[0] / "summary.json").read_text())
    assert second["teacher_acc"] == pytest.approx(first["teacher_acc"])


def test_ensemble_teacher_trained_in_run(tmp_path: Path) -> None:
    teacher = {"ensemble": [{"name": "cnn_digits_teacher"}, {"name": "cnn_digits_student"}],
               "combine": "probs", "temperature": 4.0, "train": TEACHER_TRAIN}
    recipe = parse_recipe(tiny_recipe("tiny_ens", teacher=teacher, train={**TINY_TRAIN, "epochs": 1}))
    dirs = run_recipe(recipe, out_dir=tmp_path, progress=False)
    base = tmp_path / "tiny_ens"
    assert (base / "teacher0" / "model.safetensors").is_file() and (base / "teacher1" / "model.safetensors").is_file()
    assert not (base / "teacher").exists()
    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert summary["teacher_label_smoothing"] == 0.0
    assert summary["teacher_acc"] is not None


def test_train_recipe_writes_model(tmp_path: Path) -> None:
    recipe = parse_recipe(train_recipe(data={"name": "digits", "val_split": "val", "train_subset": 96},
                                       losses={"label_smoothing": {"eps": 0.2}},
                                       train={"epochs": 2, "device": "cpu"}, seeds=[0, 1]))
    dirs = run_recipe(recipe, out_dir=tmp_path, progress=False)
    assert dirs == [tmp_path / "tiny_train" / "seed0", tmp_path / "tiny_train" / "seed1"]
    for d in dirs:
        assert (d / "model.safetensors").is_file() and (d / "metrics.jsonl").is_file()
        assert json.loads((d / "summary.json").read_text())["label_smoothing"] == 0.2
    assert (tmp_path / "tiny_train" / "report.md").is_file()


def test_one_epoch_with_the_default_schedule(tmp_path: Path) -> None:
    """The minimal ``train: {epochs: 1}`` runs: default multistep milestones that round to 0 are dropped."""
    recipe = parse_recipe(train_recipe(data={"name": "digits", "train_subset": 64},
                                       train={"epochs": 1, "device": "cpu"}))
    assert recipe.train.schedule == "multistep" and recipe.train.milestones is None
    dirs = run_recipe(recipe, out_dir=tmp_path, progress=False)
    assert (dirs[0] / "model.safetensors").is_file()


def test_checkpoint_teacher_is_loaded_not_trained(kd_run: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    teacher = {"model": {"name": "cnn_digits_teacher", "checkpoint": str(kd_run["model"])}}
    recipe = parse_recipe(tiny_recipe("tiny_ckpt", teacher=teacher, train={**TINY_TRAIN, "epochs": 1}))
    dirs = run_recipe(recipe, out_dir=tmp_path, progress=False)
    assert not (tmp_path / "tiny_ckpt" / "teacher").exists()
    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert summary["teacher_label_smoothing"] == 0.0  # from the checkpoint's metadata


def test_ensemble_of_checkpoints_keeps_their_metadata(kd_run: dict[str, Any], tmp_path: Path) -> None:
    member = {"name": "cnn_digits_teacher", "checkpoint": str(kd_run["model"])}
    recipe = parse_recipe(tiny_recipe("tiny_ens_ckpt", teacher={"ensemble": [member, member], "temperature": 4.0},
                                      train={**TINY_TRAIN, "epochs": 1}))
    dirs = run_recipe(recipe, out_dir=tmp_path, progress=False)
    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert summary["teacher_label_smoothing"] == 0.0
    assert summary["notes"] == []


def test_in_run_teacher_sees_the_whole_training_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = runner.train_model

    def spy(model: Any, spec: Any, train: Any, data: Any, *a: Any, **k: Any) -> Any:
        sizes.append(data[2]["train_size"])
        return real(model, spec, train, data, *a, **k)

    monkeypatch.setattr(runner, "train_model", spy)
    recipe = parse_recipe(tiny_recipe("tiny_subset", train={**TINY_TRAIN, "epochs": 1}))
    run_recipe(recipe, out_dir=tmp_path, progress=False)
    assert sizes and sizes[0] > 96


def _teacher_rows(base: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (base / "teacher" / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def test_students_are_reproducible_given_a_fixed_teacher(kd_run: dict[str, Any], tmp_path: Path) -> None:
    teacher = {"model": {"name": "cnn_digits_teacher", "checkpoint": str(kd_run["model"])}}
    recipe = parse_recipe(tiny_recipe("tiny_repro", teacher=teacher, train={**TINY_TRAIN, "epochs": 1}))
    runs = []
    for k in range(2):
        dirs = run_recipe(recipe, out_dir=tmp_path / f"r{k}", progress=False)
        runs.append(json.loads((dirs[0] / "summary.json").read_text()))
    for key in ("last_acc", "agreement", "kl_to_teacher"):
        assert runs[0][key] == runs[1][key], key


def test_in_run_teachers_are_reproducible(tmp_path: Path) -> None:
    import torch

    recipe = parse_recipe(tiny_recipe("tiny_teacher_repro", train={**TINY_TRAIN, "epochs": 1}))
    for out in ("a", "b"):
        torch.seed()  # the global RNG as a fresh process finds it: randomly seeded
        run_recipe(recipe, out_dir=tmp_path / out, progress=False)
    assert _teacher_rows(tmp_path / "a" / "tiny_teacher_repro") == _teacher_rows(tmp_path / "b" / "tiny_teacher_repro")


# --------------------------------------------------------------------------- label smoothing check


def _ls_run(tmp_path: Path, T: float) -> dict[str, Any]:
    teacher = {"model": {"name": "cnn_digits_teacher"}, "train": TEACHER_TRAIN, "label_smoothing": 0.1}
    recipe = parse_recipe(tiny_recipe(f"ls_T{T:g}", teacher=teacher, losses={"ce": 1.0, "kd": {"T": T}},
                                      train={**TINY_TRAIN, "epochs": 1}))
    dirs = run_recipe(recipe, out_dir=tmp_path, progress=False)
    summary = json.loads((dirs[0] / "summary.json").read_text())
    summary["_report"] = (dirs[0].parent / "report.md").read_text()
    summary["_teacher_meta"] = json.loads((dirs[0].parent / "teacher" / "summary.json").read_text())
    return summary


def test_label_smoothed_teacher_at_high_temperature_gets_a_note(tmp_path: Path) -> None:
    summary = _ls_run(tmp_path, 4.0)
    assert summary["teacher_label_smoothing"] == 0.1
    assert summary["_teacher_meta"]["label_smoothing"] == 0.1
    notes = " ".join(summary["notes"])
    assert "label smoothing" in notes and "Chandrasegaran" in notes and "T=4" in notes
    assert "Chandrasegaran" in summary["_report"]


def test_label_smoothed_teacher_at_t1_gets_no_note(tmp_path: Path) -> None:
    summary = _ls_run(tmp_path, 1.0)
    assert summary["teacher_label_smoothing"] == 0.1
    assert summary["notes"] == []
    assert "Chandrasegaran" not in summary["_report"]


def test_the_ls_note_reads_other_temperatures(tmp_path: Path) -> None:
    """DKD's T (default 4) counts too, even when not written in the recipe."""
    from distill.runner import ls_notes
    from distill.recipes import validate_losses

    assert ls_notes({"label_smoothing": 0.1}, validate_losses({"ce": 1.0, "dkd": {}}))
    assert not ls_notes({"label_smoothing": 0.0}, validate_losses({"ce": 1.0, "dkd": {}}))
    assert not ls_notes({"label_smoothing": 0.1}, validate_losses({"ce": 1.0, "logit_regression": 1.0}))


def test_a_students_checkpoint_is_loaded_not_ignored(kd_run: dict[str, Any], tmp_path: Path) -> None:
    """``student.checkpoint`` starts the student from those weights (at lr ~0 it ends where it started)."""
    import torch
    from safetensors.torch import load_file

    start = load_file(str(kd_run["model"]))
    runs = {}
    for name, ckpt in (("from_checkpoint", str(kd_run["model"])), ("fresh", None)):
        student = {"name": "cnn_digits_teacher", **({"checkpoint": ckpt} if ckpt else {})}
        recipe = parse_recipe(train_recipe(name=name, student=student, seeds=[0],
                                           data={"name": "digits", "train_subset": 32, "batch_size": 32},
                                           train={"epochs": 1, "lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0,
                                                  "device": "cpu"}))
        (run_dir,) = run_recipe(recipe, out_dir=tmp_path, progress=False)
        runs[name] = load_file(str(next(Path(run_dir).rglob("model.safetensors"))))
    weights = [k for k, v in start.items() if v.is_floating_point() and "running" not in k]
    assert weights and all(torch.allclose(runs["from_checkpoint"][k], start[k], atol=1e-6) for k in weights)
    assert not all(torch.allclose(runs["fresh"][k], start[k], atol=1e-6) for k in weights)
