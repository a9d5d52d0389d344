"""benchmarks/dense.py's table and plan: the Δ column compares each method with the right baseline (LiDAR
Distillation's 16-beam student with a 16-beam scratch student, every other method with the task's
scratch student), and the per-task full schedules are the ones the script documents."""

from __future__ import annotations

import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("dense")


def _rows(task: str, name: str, scores: list[float]) -> list[dict]:
    return [{"task": task, "name": name, "seed": i, "score": s, "time_s": 1.0} for i, s in enumerate(scores)]


def _line(text: str, name: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_lidar_distill_is_compared_with_the_16_beam_scratch_student(bench):
    results = (_rows("bev", "scratch", [20.0, 22.0, 24.0]) + _rows("bev", "scratch_16beams", [10.0, 12.0, 14.0])
               + _rows("bev", "lidar_distill", [13.0, 14.0, 15.0]) + _rows("bev", "sparse_kd3d", [25.0, 26.0, 27.0]))
    text = bench.table(results, {"bev": 35.0})
    # means: scratch 22, scratch_16beams 12, lidar_distill 14, sparse_kd3d 26
    assert _line(text, "lidar_distill")[3] == "+2.00 (vs scratch_16beams)"
    assert _line(text, "sparse_kd3d")[3] == "+4.00"
    assert _line(text, "scratch_16beams")[3] == ""  # a baseline has no Δ of its own
    assert _line(text, "scratch_16beams")[1] == '{"bev_loss": 1.0}'
    assert _line(text, "scratch_16beams")[2] == "12.00 ± 2.00"


def test_without_its_baseline_a_method_has_no_delta(bench):
    results = _rows("bev", "scratch", [20.0, 22.0]) + _rows("bev", "lidar_distill", [13.0, 15.0])
    assert _line(bench.table(results, {}), "lidar_distill")[3] == ""


def test_full_schedules_per_task(bench):
    args = {"size_name": "full", "epochs": 6, "teacher_epochs": 12}
    got = {t: (bench._epochs(t, args, "epochs"), bench._epochs(t, args, "teacher_epochs")) for t in bench.TASKS}
    assert got == {"detection": (18, 12), "detr": (40, 40), "segmentation": (24, 12), "bev": (12, 12),
                   "mono3d": (24, 24), "ssod": (18, 12)}
    # the command line wins over a task's own schedule; the quick protocol ignores them
    assert bench._epochs("detection", {**args, "epochs": 3, "epochs_set": True}, "epochs") == 3
    assert bench._epochs("detection", {**args, "size_name": "quick", "epochs": 1}, "epochs") == 1


def test_paired_gains_are_per_seed_against_each_methods_baseline(bench):
    results = (_rows("bev", "scratch", [20.0, 30.0]) + _rows("bev", "scratch_16beams", [10.0, 16.0])
               + _rows("bev", "lidar_distill", [13.0, 15.0]) + _rows("bev", "sparse_kd3d", [21.5, 30.0]))  # a zero gain is not a positive one
    text = bench.paired_gains(results)
    lidar = next(x for x in text.splitlines() if x.strip().startswith("lidar_distill"))
    sparse = next(x for x in text.splitlines() if x.strip().startswith("sparse_kd3d"))
    assert "vs scratch_16beams" in lidar and "+3.00" in lidar and "-1.00" in lidar
    assert lidar.endswith("mean +1.00, positive on 1/2 seeds")
    assert "+1.50" in sparse and sparse.endswith("mean +0.75, positive on 1/2 seeds")
    assert not any(x.strip().startswith("scratch") for x in text.splitlines())


def test_read_logs_rebuilds_the_runs_and_refuses_two_different_scores(bench, tmp_path):
    import json

    first, second = tmp_path / "a.err", tmp_path / "b.err"
    first.write_text("teacher bev: 35.5\nsome warning\n" + "\n".join(
        json.dumps(r) for r in _rows("bev", "sparse_kd3d", [25.0]) + _rows("bev", "scratch", [20.0])) + "\n")
    second.write_text("\n".join(json.dumps(r) for r in _rows("bev", "scratch", [20.0, 22.0])
                                + _rows("detection", "scratch", [5.0])) + "\n")
    results, teachers = bench.read_logs([str(first), str(second)])
    assert teachers == {"bev": 35.5}
    # one row per (task, run, seed); tasks in the script's order, scratch first
    assert [(r["task"], r["name"], r["seed"]) for r in results] == [
        ("detection", "scratch", 0), ("bev", "scratch", 0), ("bev", "scratch", 1), ("bev", "sparse_kd3d", 0)]
    second.write_text(json.dumps(_rows("bev", "scratch", [20.5])[0]) + "\n")
    with pytest.raises(ValueError, match="two scores"):
        bench.read_logs([str(first), str(second)])
