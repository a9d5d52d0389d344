"""benchmarks/datafree.py's own logic: the ``--set`` budget overrides and the time-to-accuracy
comparison of fast_dfkd against dfad (issue 13). No training runs here: the curves are written out."""

from __future__ import annotations


import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("datafree")


def test_overrides_are_parsed_as_literals(bench):
    got = bench.parse_overrides(["fast_dfkd.kd_steps=200", "fast_dfkd.T=4.5", "dfad.iterations=400",
                                 "fast_dfkd.meta='fomaml'"], bench.METHODS)
    assert got == {"fast_dfkd": {"kd_steps": 200, "T": 4.5, "meta": "fomaml"}, "dfad": {"iterations": 400}}
    assert isinstance(got["fast_dfkd"]["kd_steps"], int)


@pytest.mark.parametrize("item, words", [
    ("fast_dfkd.kd_steps", "METHOD.KEY=VALUE"),        # no value
    ("kd_steps=200", "METHOD.KEY=VALUE"),              # no method
    ("fast_dfkd.=200", "METHOD.KEY=VALUE"),            # no key
    ("fast_dfkd.kd_steps=", "METHOD.KEY=VALUE"),       # empty value
    ("fastdfkd.kd_steps=200", "unknown method 'fastdfkd'"),
    ("fast_dfkd.kd_steps=two", "not a Python literal"),
])
def test_bad_override_names_the_item(bench, item, words):
    with pytest.raises(SystemExit) as e:
        bench.parse_overrides([item], bench.METHODS)
    assert item in str(e.value) and words in str(e.value)


def test_overrides_apply_to_a_copy(bench):
    before = {k: dict(v) for k, v in bench.FULL.items()}
    b = bench.budgets_for(False, {"fast_dfkd": {"kd_steps": 400, "generator_width": 64}})
    assert b["fast_dfkd"] == {**before["fast_dfkd"], "kd_steps": 400, "generator_width": 64}
    assert b["dfad"] == before["dfad"]
    assert bench.FULL == before                        # the documented FULL is untouched
    assert bench.budgets_for(True, {})["fast_dfkd"] == bench.QUICK["fast_dfkd"]


def _run(seed, curve):
    return {"seed": seed, "curve": curve}


def test_speedup_targets_dfads_best_and_divides_medians(bench):
    # dfad seed 0 peaks at 52.9 (t 300) then falls; seed 1 peaks at 48.0 (t 250): the target is the lower
    # best, 48.0, which seed 0 first passes at t 300 (52.9 >= 48.0; 41.5 at t 200 is under it)
    dfad = [_run(1, [(100.0, 20.0), (250.0, 48.0), (400.0, 30.0)]),
            _run(0, [(100.0, 18.1), (200.0, 41.5), (300.0, 52.9), (400.0, 48.1)])]
    # fast_dfkd: seed 0 reaches 48 first at t 40 (47.9 at t 30 is under), seed 1 at t 60
    fast = [_run(0, [(10.0, 9.8), (30.0, 47.9), (40.0, 80.0), (50.0, 90.0)]),
            _run(1, [(20.0, 11.0), (60.0, 48.0), (70.0, 95.0)])]
    target, times, ratio = bench.speedup(dfad, fast)
    assert target == 48.0
    assert times == {"dfad": [300.0, 250.0], "fast_dfkd": [40.0, 60.0]}   # sorted by seed
    assert ratio == pytest.approx(((300 + 250) / 2) / ((40 + 60) / 2))   # 275 / 50 = 5.5
    # an explicit target: seed 1 of dfad never reaches 50 -> no ratio
    target, times, ratio = bench.speedup(dfad, fast, 50.0)
    assert target == 50.0 and times["dfad"] == [300.0, None] and ratio is None


def test_speedup_rejects_missing_runs(bench):
    with pytest.raises(ValueError, match="at least one dfad and one fast_dfkd"):
        bench.speedup([], [_run(0, [(1.0, 50.0)])])
    with pytest.raises(ValueError, match="at least one dfad and one fast_dfkd"):
        bench.speedup([_run(0, [(1.0, 50.0)])], [])
    with pytest.raises(ValueError, match=r"seed\(s\) \[0\] have no evaluation"):
        bench.speedup([_run(0, [])], [_run(0, [(1.0, 50.0)])])


def test_scan_table_aligns_runs_by_epoch(tmp_path):
    scan = load_benchmark("datafree_diagnosis_scan")
    log = tmp_path / "fast_dfkd_s0" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text('{"epoch": 0, "val_student_acc": 11.36, "time_s": 55.4}\n'
                   '{"epoch": 1, "val_student_acc": 64.125, "time_s": 129.6}\n')
    runs = {"a": scan.read_log(log), "b": [{"epoch": 0, "val_student_acc": 9.0, "time_s": 3.0}],
            "c": scan.read_log(tmp_path / "missing.jsonl")}
    lines = scan.table(runs).splitlines()
    assert lines[0] == "| epoch | a: top-1 % (s) | b: top-1 % (s) | c: top-1 % (s) |"
    assert lines[2] == "| 0 | 11.36 (55) | 9.00 (3) |  |"
    assert lines[3] == "| 1 | 64.12 (130) |  |  |"        # b stopped after epoch 0: blank, not a number
    assert lines[4] == "| last epoch reached | 1 | 0 | - |"
    # every=2 keeps epoch 0 and each run's last epoch (1 for a)
    assert [line.split(" |")[0] for line in scan.table(runs, every=2).splitlines()[2:4]] == ["| 0", "| 1"]
    with pytest.raises(ValueError, match="every must be >= 1; got 0"):
        scan.table(runs, every=0)


def test_scan_reads_a_stopped_dfad_run_for_the_speedup(tmp_path, bench):
    from distill.train.checkpoint import save_checkpoint

    scan = load_benchmark("datafree_diagnosis_scan")
    (tmp_path / "fast_dfkd_s1").mkdir()
    (tmp_path / "fast_dfkd_s1" / "metrics.jsonl").write_text(
        '{"epoch": 3, "val_student_acc": 19.68, "time_s": 375.0}\n{"epoch": 4, "val_student_acc": 64.12, "time_s": 544.0}\n')
    (tmp_path / "dfad_s1").mkdir()
    save_checkpoint(tmp_path / "dfad_s1" / "last.pt", {"iteration": 175, "time_s": 3073.0, "history": [
        {"epoch": 150, "student_acc": 53.02, "time_s": 2669.0}, {"epoch": 175, "student_acc": 58.1, "time_s": 3073.0}]})
    fast, dfad, reached = scan.curves(tmp_path, 1)
    assert fast == [(375.0, 19.68), (544.0, 64.12)] and dfad == [(2669.0, 53.02), (3073.0, 58.1)]
    assert reached == "fast_dfkd to epoch 4 (544 s), dfad to iteration 175 (3073 s)"
    target, times, ratio = bench.speedup([{"seed": 1, "curve": dfad}], [{"seed": 1, "curve": fast}])
    assert (target, times["fast_dfkd"], times["dfad"]) == (58.1, [544.0], [3073.0])
    assert ratio == pytest.approx(3073 / 544)
    with pytest.raises(SystemExit, match="expected fast_dfkd_s0/metrics.jsonl and dfad_s0/last.pt"):
        scan.curves(tmp_path, 0)
    (tmp_path / "dfad_s2").mkdir()                  # dfad logged, fast_dfkd not: also refused
    save_checkpoint(tmp_path / "dfad_s2" / "last.pt", {"iteration": 25, "time_s": 1.0, "history": []})
    with pytest.raises(SystemExit, match="expected fast_dfkd_s2/metrics.jsonl"):
        scan.curves(tmp_path, 2)


def test_the_ceiling_is_the_student_trained_on_the_real_labels(bench, monkeypatch):
    """``--ceiling``: LeNet-5-half trained on the real MNIST training set with labels (no teacher), one
    epoch of the teacher's protocol; a trained student, far above chance, tested on real test images."""
    import torch

    from tests._mnist import mnist_dir

    root = mnist_dir()
    if root is None:
        pytest.skip("no MNIST files (../shared/data/mnist or $DISTILL_MNIST)")
    monkeypatch.setenv("DISTILL_MNIST", str(root))
    threads = torch.get_num_threads()
    try:
        row = bench.run_ceiling({"seed": 0, "epochs": 1, "val_subset": 1000})
    finally:
        torch.set_num_threads(threads)
    assert row["method"] == "real_data_student" and row["seed"] == 0
    assert row["last"] == row["best"] and 80.0 < row["last"] <= 100.0
    assert row["curve"] == [] and row["wall"] > 0


def test_the_ceiling_trains_the_benchmarks_student_with_the_jobs_settings(bench, monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "train_on_real", lambda *a, **k: (seen.append((a, k)), (None, 55.5))[1])
    row = bench.run_ceiling({"seed": 2, "epochs": 7, "val_subset": 300})
    assert seen == [(("lenet5_half", {}, 7, 300), {"seed": 2})]
    assert (row["method"], row["seed"], row["last"], row["best"]) == ("real_data_student", 2, 55.5, 55.5)
