"""``student.init_from_teacher``: a student that starts as a copy of its teacher (issue 14).

LiDAR Distillation (Wei et al., ECCV 2022, arXiv 2203.14956) fine-tunes a student of the teacher's
architecture that starts from the teacher's weights. The recipe field is checked before any work
(only on the student, one teacher model of the student's name, not with ``checkpoint`` nor a strategy;
the built models' state dicts must match key for key and shape for shape); the runner copies the
trained (or loaded) teacher into each seed's student; the run fingerprint records the teacher's
weights, so a resumed student refuses another teacher. Runs use the digits data (96 images) and,
for the two 3D recipes, 8 scenes of ``lidar_scenes``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.recipes import RecipeError, parse_recipe, read_recipe_file
from distill.runner import recipe_fingerprint, run_recipe, teacher_fingerprint
from distill.train.checkpoint import load_checkpoint, load_model, save_model
from distill.train.rundir import ResumeError, SpecMismatchError
from tests.test_recipes import error_of

REPO = Path(__file__).resolve().parents[1]
DENSE = REPO / "recipes" / "dense"
FROM_TEACHER = ("bev_lidar_distill_from_teacher.yaml", "bev_finetune_16beams_from_teacher.yaml")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def copied_recipe(name: str = "copy", **overrides: Any) -> dict[str, Any]:
    """Digits, 96 images; student cnn_digits_teacher copied from the in-run teacher (1 epoch); the
    student trains 1 epoch at another lr than the teacher, so its weights move away from the copy."""
    data: dict[str, Any] = {
        "name": name,
        "kind": "distill",
        "seeds": [0],
        "data": {"name": "digits", "val_split": "val", "train_subset": 96, "batch_size": 32},
        "student": {"name": "cnn_digits_teacher", "init_from_teacher": True},
        "teacher": {"model": {"name": "cnn_digits_teacher"},
                    "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "schedule": "constant", "device": "cpu"}},
        "losses": {"ce": 1.0, "kd": {"T": 3.0}},
        "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.1, "schedule": "constant", "device": "cpu"},
    }
    data.update(overrides)
    return data




def states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit: the same keys, dtypes and values (buffers included)."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


class FitSpy:
    """Wraps ``distill.train.fit``: the student and the teacher model at the first step and after."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import distill.train

        self.calls: list[dict[str, Any]] = []
        real = distill.train.fit

        def spy(d: Any, *args: Any, **kwargs: Any) -> Any:
            teacher = d.teacher_module()
            if teacher is None:  # the in-run teacher's own training
                return real(d, *args, **kwargs)
            call = {"student0": states(d.student), "teacher0": states(teacher), "fingerprint": kwargs["fingerprint"]}
            result = real(d, *args, **kwargs)
            call.update(student1=states(d.student), teacher1=states(teacher))
            self.calls.append(call)
            return result

        monkeypatch.setattr(distill.train, "fit", spy)


# ---------------------------------------------------------------- the copy


def test_the_student_starts_bit_for_bit_as_the_trained_teacher_which_stays_unchanged(tmp_path, monkeypatch):
    spy = FitSpy(monkeypatch)
    runs = run_recipe(parse_recipe(copied_recipe(seeds=[0, 1])), out_dir=tmp_path, progress=False)
    teacher = states(load_model(runs[0].parent / "teacher" / "model.safetensors")[0])
    # the trained teacher's BatchNorm statistics moved from their initial values: the copy includes buffers
    assert any("running_mean" in k and v.abs().sum() > 0 for k, v in teacher.items())
    assert len(spy.calls) == 2  # each seed's student is a copy
    for call in spy.calls:
        assert same(call["student0"], teacher)
        assert same(call["teacher0"], teacher) and same(call["teacher1"], teacher)  # frozen, unchanged
        assert not same(call["student1"], teacher)  # the student trained (on its own tensors)


def test_the_copy_is_of_the_loaded_checkpoint_in_float32_even_with_a_bfloat16_teacher(tmp_path, monkeypatch):
    from distill.models import create

    torch.manual_seed(7)
    ckpt = save_model(tmp_path / "t.safetensors", create("cnn_digits_teacher", num_classes=10, in_channels=1),
                      name="cnn_digits_teacher", kwargs={"num_classes": 10, "in_channels": 1})
    saved = states(load_model(ckpt)[0])
    spy = FitSpy(monkeypatch)
    raw = copied_recipe(teacher={"model": {"name": "cnn_digits_teacher", "checkpoint": str(ckpt)},
                                 "dtype": "bfloat16"})
    run_recipe(parse_recipe(raw), out_dir=tmp_path, progress=False)
    (call,) = spy.calls
    assert same(call["student0"], saved)  # taken before the teacher source casts its model
    assert call["teacher0"]["fc.weight"].dtype == torch.bfloat16  # the teacher itself runs in bfloat16
    assert call["student0"]["fc.weight"].dtype == torch.float32


# ---------------------------------------------------------------- refusals, before any work


@pytest.mark.parametrize("where", ["model", "ensemble"])
def test_only_the_student_may_start_from_the_teacher(where):
    spec = {"name": "cnn_digits_teacher", "init_from_teacher": True}
    teacher = {"model": spec} if where == "model" else {"ensemble": [{"name": "cnn_digits_teacher"}, spec]}
    msg = error_of(copied_recipe(student={"name": "cnn_digits_teacher"}, teacher={**teacher, "train": {"epochs": 1}}))
    assert "init_from_teacher=True: only the recipe's 'student'" in msg
    assert ("teacher.model" if where == "model" else "teacher.ensemble.1") in msg


def test_init_from_teacher_needs_a_teacher():
    raw = copied_recipe()
    del raw["teacher"]
    assert "this recipe has none" in error_of(raw) and "teacher None" in error_of(raw)
    kind_train = copied_recipe(kind="train")
    del kind_train["teacher"]
    assert "kind 'train'" in error_of(kind_train)


def test_init_from_teacher_needs_one_teacher_model_not_an_ensemble():
    msg = error_of(copied_recipe(teacher={"ensemble": [{"name": "cnn_digits_teacher"}] * 2, "train": {"epochs": 1}}))
    assert "'teacher.ensemble' has 2 members" in msg
    one = error_of(copied_recipe(teacher={"ensemble": [{"name": "cnn_digits_teacher"}], "train": {"epochs": 1}}))
    assert "has 1 members" in one


def test_init_from_teacher_needs_the_teachers_model_name():
    msg = error_of(copied_recipe(student={"name": "cnn_digits_student", "init_from_teacher": True}))
    assert "student.name is 'cnn_digits_student', teacher.model.name 'cnn_digits_teacher'" in msg


def test_init_from_teacher_excludes_checkpoint():
    msg = error_of(copied_recipe(student={"name": "cnn_digits_teacher", "init_from_teacher": True,
                                          "checkpoint": "some/t.safetensors"}))
    assert "checkpoint='some/t.safetensors'" in msg and "keep one" in msg


def test_init_from_teacher_excludes_a_strategy():
    raw = copied_recipe(strategy={"name": "born_again", "args": {}})
    del raw["losses"]
    assert "strategy 'born_again' builds its own students" in error_of(raw)


def test_init_from_teacher_false_is_accepted_anywhere_a_student_is():
    assert parse_recipe(copied_recipe(student={"name": "cnn_digits_student", "init_from_teacher": False}))


@pytest.mark.parametrize("student, key, said", [
    ({"name": "cnn_digits_teacher", "kwargs": {"in_channels": 3}}, "'stem.0.weight'",
     "shape (32, 3, 3, 3) in the student and (32, 1, 3, 3) in the teacher"),
    ({"name": "mlp", "kwargs": {"input_size": 8, "hidden": [32, 16]}}, "'hidden2.linear.weight'",
     "is only in the student's state dict"),
])
def test_a_student_whose_weights_do_not_fit_the_teacher_is_refused_before_any_training(tmp_path, student, key, said):
    teacher = {"name": student["name"], "kwargs": {"input_size": 8, "hidden": [32]} if student["name"] == "mlp" else {}}
    raw = copied_recipe(student={**student, "init_from_teacher": True},
                        teacher={"model": teacher, "train": copied_recipe()["teacher"]["train"]})
    with pytest.raises(RecipeError, match="student.init_from_teacher: ") as info:
        run_recipe(parse_recipe(raw), out_dir=tmp_path, progress=False)
    assert said in str(info.value) and key in str(info.value)
    assert not (tmp_path / "copy" / "teacher").exists()  # the teacher was not trained


def test_a_kwarg_that_changes_no_shape_is_accepted():
    from distill.models import create
    from distill.runner import _check_init_from_teacher

    _check_init_from_teacher(create("cnn_digits_teacher", dropout=0.3), create("cnn_digits_teacher"))


# ---------------------------------------------------------------- fingerprints and resume


def test_the_fingerprint_records_the_copy_and_the_teachers_weights():
    recipe = parse_recipe(copied_recipe())
    losses = {"ce": {"weight": 1.0}}
    fp = recipe_fingerprint(recipe, losses, 0, teacher_weights="ab12")
    assert fp["student"]["init_from_teacher"] is True and fp["teacher_weights"] == "ab12"
    assert recipe_fingerprint(recipe, losses, 0, teacher_weights="cd34") != fp
    # without the copy neither key is written: checkpoints of runs made before the field still resume
    plain = parse_recipe(copied_recipe(student={"name": "cnn_digits_student"}))
    fp0 = recipe_fingerprint(plain, losses, 0, teacher_weights="ab12")
    assert "init_from_teacher" not in fp0["student"] and "teacher_weights" not in fp0
    # the teacher's own spec is what it was (a teacher trained before the field stays reused)
    assert teacher_fingerprint(recipe, 0) == teacher_fingerprint(plain, 0)


def _retrained_in_place(model_file: Path) -> None:
    """The teacher file replaced by other weights under the same teacher_spec.json (a retrain, a copy)."""
    model, meta = load_model(model_file)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_model(model_file, model, name="cnn_digits_teacher", kwargs={"num_classes": 10, "in_channels": 1},
               metadata=meta)


def test_resume_refuses_a_student_whose_teacher_changed(tmp_path):
    from distill.runner import _weights_digest

    recipe = parse_recipe(copied_recipe())
    (run,) = run_recipe(recipe, out_dir=tmp_path, progress=False)
    model_file = run.parent / "teacher" / "model.safetensors"
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["fingerprint"]
    assert saved["teacher_weights"] == _weights_digest(load_model(model_file)[0])
    run_recipe(recipe, out_dir=tmp_path, progress=False, resume=True)  # the same teacher: resumes
    _retrained_in_place(model_file)
    with pytest.raises(SpecMismatchError, match="teacher_weights: checkpoint"):
        run_recipe(recipe, out_dir=tmp_path, progress=False, resume=True)


def test_resume_refuses_when_the_teacher_would_be_trained_anew(tmp_path):
    import shutil

    recipe = parse_recipe(copied_recipe())
    (run,) = run_recipe(recipe, out_dir=tmp_path, progress=False)
    shutil.rmtree(run.parent / "teacher")
    with pytest.raises(ResumeError, match="started as a copy of the teacher, and no trained teacher"):
        run_recipe(recipe, out_dir=tmp_path, progress=False, resume=True)
    assert not (run.parent / "teacher").exists()  # refused before training one


def test_resume_refuses_a_teacher_checkpoint_rewritten_in_place(tmp_path):
    from distill.models import create

    torch.manual_seed(3)
    ckpt = save_model(tmp_path / "t.safetensors", create("cnn_digits_teacher", num_classes=10, in_channels=1),
                      name="cnn_digits_teacher", kwargs={"num_classes": 10, "in_channels": 1})
    recipe = parse_recipe(copied_recipe(teacher={"model": {"name": "cnn_digits_teacher", "checkpoint": str(ckpt)}}))
    run_recipe(recipe, out_dir=tmp_path, progress=False)
    _retrained_in_place(ckpt)
    with pytest.raises(SpecMismatchError, match="teacher_weights"):
        run_recipe(recipe, out_dir=tmp_path, progress=False, resume=True)


# ---------------------------------------------------------------- the two 3D recipes


def _tiny3d(name: str) -> dict[str, Any]:
    raw = read_recipe_file(DENSE / name)
    raw["data"]["options"]["n_scenes"] = 8
    raw["data"]["batch_size"] = 4
    raw["seeds"] = [0]
    raw["train"]["epochs"] = 1
    raw["teacher"]["train"]["epochs"] = 1
    return raw


def test_the_two_recipes_differ_only_by_the_distillation_term_and_share_the_64_beam_teacher():
    kd, ft = (parse_recipe(read_recipe_file(DENSE / n)) for n in FROM_TEACHER)
    assert kd.student.init_from_teacher and kd.student.name == kd.teacher.model.name == "pillars_teacher"
    assert set(kd.losses) == {"bev_loss", "lidar_distill"} and ft.losses == {"bev_loss": kd.losses["bev_loss"]}
    assert kd.model_dump(exclude={"name", "losses"}) == ft.model_dump(exclude={"name", "losses"})
    assert kd.data.options == {"beams": 16, "teacher_beams": 64}
    # the teacher spec of the 64-beam recipes: a teacher/ folder trained by them is reused here
    for other in ("bev_lidar_distill.yaml", "bev_sparse_kd3d.yaml", "bev_pointdistiller.yaml"):
        theirs = teacher_fingerprint(parse_recipe(read_recipe_file(DENSE / other)), 0)
        assert teacher_fingerprint(kd, 0) == teacher_fingerprint(ft, 0) == theirs


@pytest.mark.parametrize("name", FROM_TEACHER)
def test_each_recipe_runs_small_with_the_student_a_copy_of_the_teacher(tmp_path, monkeypatch, name):
    spy = FitSpy(monkeypatch)
    (run,) = run_recipe(parse_recipe(_tiny3d(name)), out_dir=tmp_path, progress=False)
    teacher = states(load_model(run.parent / "teacher" / "model.safetensors")[0])
    (call,) = spy.calls
    assert same(call["student0"], teacher) and same(call["teacher1"], teacher)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["beams"] == 16 and summary["data"]["teacher_beams"] == 64
    assert set(summary["losses"]) == set(read_recipe_file(DENSE / name)["losses"])
    assert 0.0 <= summary["last_acc"] <= 100.0
