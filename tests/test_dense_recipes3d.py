"""The 3D dense tasks from recipes: data set 'lidar_scenes' with tasks 'bev' and 'mono3d' (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.recipes import RecipeError, load_recipe, parse_recipe, read_recipe_file

DENSE = Path(__file__).resolve().parents[1] / "recipes" / "dense"
RECIPES3D = ["bev_pillars_teacher.yaml", "bev_sparse_kd3d.yaml", "bev_pointdistiller.yaml", "bev_lidar_distill.yaml",
             "mono3d_monodistill.yaml", "bev_pillars_student.yaml", "bev_pillars_student_16beams.yaml",
             "mono3d_student.yaml", "bev_lidar_distill_from_teacher.yaml", "bev_finetune_16beams_from_teacher.yaml"]
# each distillation recipe and its student-from-scratch row (a kind-train recipe of the same protocol)
SCRATCH_ROWS = {"bev_sparse_kd3d.yaml": "bev_pillars_student.yaml", "bev_pointdistiller.yaml": "bev_pillars_student.yaml",
                "bev_lidar_distill.yaml": "bev_pillars_student_16beams.yaml", "mono3d_monodistill.yaml": "mono3d_student.yaml"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(name: str) -> dict:
    """A recipe of recipes/dense at a tiny size: 8 scenes per split, batches of 4, one epoch, one seed."""
    raw = read_recipe_file(DENSE / name)
    raw["data"]["options"]["n_scenes"] = 8
    raw["data"]["batch_size"] = 4
    raw["seeds"] = [0]
    raw["train"]["epochs"] = 1
    if "teacher" in raw:
        raw["teacher"]["train"]["epochs"] = 1
    return raw


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", RECIPES3D)
def test_each_3d_recipe_parses(name):
    recipe = load_recipe(DENSE / name)
    assert recipe.data.name == "lidar_scenes"
    assert recipe.data.task == ("mono3d" if name.startswith("mono3d") else "bev")
    task_loss = "mono3d_loss" if recipe.data.task == "mono3d" else "bev_loss"
    assert task_loss in recipe.losses
    assert (recipe.kind == "train") == (recipe.teacher is None)


@pytest.mark.parametrize("name", sorted(SCRATCH_ROWS))
def test_each_distillation_recipe_has_its_scratch_row(name):
    """The scratch row differs from its distillation recipe only by the teacher and the distillation
    losses: same data (the student's scan), seeds, student and schedule, so a seed's two students start
    from the same weights and see the same batches, and the gap between them is the method's."""
    kd, alone = load_recipe(DENSE / name), load_recipe(DENSE / SCRATCH_ROWS[name])
    assert alone.kind == "train" and alone.teacher is None
    student_scan = {k: v for k, v in kd.data.options.items() if k != "teacher_beams"}
    assert alone.data.model_dump() == kd.data.model_copy(update={"options": student_scan}).model_dump()
    assert (alone.seeds, alone.student, alone.train) == (kd.seeds, kd.student, kd.train)
    task = "mono3d_loss" if kd.data.task == "mono3d" else "bev_loss"
    assert alone.losses == {task: kd.losses[task]}
    assert len(kd.seeds) >= 3 and set(kd.losses) - {task}  # seeds for a spread; a distillation loss beside


def test_lidar_distill_recipe_runs_with_the_teacher_on_the_full_scan(tmp_path, monkeypatch):
    from distill.methods.dense3d import BeamTeacher
    from distill.runner import run_recipe
    from distill.train.checkpoint import load_model

    seen: list[tuple[int, int]] = []  # (student's points, teacher's points) of each teacher call
    forward = BeamTeacher.forward

    def spy(self, batch):
        seen.append((int(batch.point_mask.sum()), int(batch.extras["teacher_points"][..., 4].sum())))
        return forward(self, batch)

    monkeypatch.setattr(BeamTeacher, "forward", spy)
    raw = _tiny("bev_lidar_distill.yaml")
    assert raw["data"]["options"]["beams"] < raw["data"]["options"]["teacher_beams"] == 64
    (run,) = run_recipe(parse_recipe(raw), out_dir=tmp_path, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["task"] == "bev" and summary["data"]["beams"] == 16 and summary["data"]["teacher_beams"] == 64
    assert set(summary["losses"]) == {"bev_loss", "lidar_distill"}
    assert 0.0 <= summary["last_acc"] <= 100.0  # the student's BEV AP (%), from bev_evaluator
    row = _history(run)[-1]
    assert {"val_student_acc", "val_student_bev_ap_25", "val_student_bev_ap_50"} <= set(row)
    # the teacher read the 64-beam scans of the student's scenes, ~4x the student's 16-beam points
    assert seen and all(t > 2 * s for s, t in seen)
    # the teacher was trained here on 64-beam scans and saved as a model file that names itself
    teacher, meta = load_model(run.parent / "teacher" / "model.safetensors")
    assert type(teacher).__name__ == "PointPillarsBEV" and meta["dataset"] == "lidar_scenes"


def test_monodistill_recipe_runs_on_the_camera_view(tmp_path):
    from distill.runner import run_recipe

    (run,) = run_recipe(parse_recipe(_tiny("mono3d_monodistill.yaml")), out_dir=tmp_path, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["task"] == "mono3d" and set(summary["losses"]) == {"mono3d_loss", "monodistill"}
    assert 0.0 <= summary["last_acc"] <= 100.0 and summary["teacher_acc"] is not None  # BEV AP of both
    assert "val_student_bev_ap_50" in _history(run)[-1]


def test_point_scene_batches_follow_the_task():
    from distill.runner import _teacher_data_spec, build_data

    raw = _tiny("bev_lidar_distill.yaml")
    spec = parse_recipe(raw).data
    train, val, info = build_data(spec)
    batch = next(iter(train))
    assert batch.inputs.shape[-1] == 5 and "teacher_points" in batch.extras
    assert "teacher_points" not in next(iter(val)).extras  # validation: the student's scan alone
    teacher_spec = _teacher_data_spec(spec)
    assert teacher_spec.options["beams"] == 64 and "teacher_beams" not in teacher_spec.options
    mono = parse_recipe(_tiny("mono3d_monodistill.yaml")).data
    assert next(iter(build_data(mono)[0])).inputs.shape[1:] == (2, 64, 160)  # cat(image, depth)


@pytest.mark.parametrize("change, key", [
    ({"data": {"task": "detection"}}, "task 'detection' does not fit data set 'lidar_scenes'"),
    ({"data": {"task": "bev", "name": "mnist_scenes"}}, "task 'bev' does not fit data set 'mnist_scenes'"),
    ({"data": {"options": {"beam": 16}}}, r"data.options.beam: unknown option"),
    ({"data": {"options": {"beams": 12}}}, r"data.options.beams: the beam count must divide 64"),
    ({"data": {"options": {"n_scenes": 0}}}, r"data.options.n_scenes: must be a positive integer"),
    ({"data": {"options": {"beams": 32, "teacher_beams": 16}}}, r"data.options.teacher_beams \(16\) must be more"),
    ({"data": {"augment": {"flip": True}}}, "takes no 'augment'"),
    ({"data": {"train_subset": 4}}, r"data.train_subset: .* data.options.n_scenes"),
    ({"losses": {"bev_loss": 1.0, "lidar_distill": {}}}, r"losses.lidar_distill: .*teacher_beams"),
])
def test_the_validator_names_the_bad_key(change, key):
    raw = _tiny("bev_sparse_kd3d.yaml")
    for section, values in change.items():
        raw[section] = {**raw[section], **values} if section == "data" else values
    with pytest.raises(RecipeError, match=key):
        parse_recipe(raw)


def test_teacher_beams_needs_a_bev_teacher():
    teacher = _tiny("bev_pillars_teacher.yaml")  # kind train: no teacher to read the denser scan
    teacher["data"]["options"].update(beams=16, teacher_beams=64)
    with pytest.raises(RecipeError, match="data.options.teacher_beams: .*no teacher"):
        parse_recipe(teacher)
    mono = _tiny("mono3d_monodistill.yaml")
    mono["data"]["options"].update(beams=16, teacher_beams=64)
    with pytest.raises(RecipeError, match="data.options.teacher_beams: .*task 'bev'"):
        parse_recipe(mono)


def test_the_teacher_spec_records_the_teachers_scan_not_the_students():
    """An in-run teacher is reused when teacher_spec.json matches: with data.options.teacher_beams it is
    trained on that scan, so a new student scan (16 -> 32 beams) keeps it, and it is the same teacher as
    the 64-beam recipes' (same model, protocol and scans); a new teacher scan does not keep it."""
    from distill.runner import teacher_fingerprint

    lidar = _tiny("bev_lidar_distill.yaml")
    wider = _tiny("bev_lidar_distill.yaml")
    wider["data"]["options"]["beams"] = 32
    spec16, spec32 = (teacher_fingerprint(parse_recipe(raw), 0) for raw in (lidar, wider))
    assert spec16 == spec32 and spec16["data"]["options"]["beams"] == 64
    assert "teacher_beams" not in spec16["data"]["options"]
    assert spec16 == teacher_fingerprint(parse_recipe(_tiny("bev_sparse_kd3d.yaml")), 0)
    fewer = _tiny("bev_lidar_distill.yaml")
    fewer["data"]["options"]["teacher_beams"] = 32
    assert teacher_fingerprint(parse_recipe(fewer), 0)["data"]["options"]["beams"] == 32

