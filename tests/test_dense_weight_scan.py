"""benchmarks/dense_weight_scan.py: the scanned weight is a multiple of the paper's, the table's
numbers (mean ± std, Δ vs scratch) are worked out by hand, and bad options fail before any work."""

from __future__ import annotations

import json

import pytest
from _benchmarks import load_benchmark


def _bench():
    return load_benchmark("dense_weight_scan")


def test_the_scanned_weight_multiplies_the_papers_outer_weight():
    b = _bench()
    assert b._spec("ifvd", 0.01) == {"weight": 2.0}  # 200 (the authors' lambda-ifv) x 0.01
    assert b._spec("knowledge_adaptation", 0.1) == {"weight": 0.1}  # alpha = 50, beta = 1 stay inside
    assert b._spec("fgd", 1e-3) == {"weight": 1e-3}
    assert b._spec("graph_flow", 10.0) == {"weight": 10.0}


def test_table_means_stds_and_deltas_by_hand():
    b = _bench()
    rows = [
        {"task": "segmentation", "method": "scratch", "factor": None, "seed": 0, "score": 10.0, "pixel_acc": 90.0,
         "time_s": 5.0},
        {"task": "segmentation", "method": "scratch", "factor": None, "seed": 1, "score": 12.0, "pixel_acc": 92.0,
         "time_s": 7.0},
        {"task": "segmentation", "method": "ifvd", "factor": 1.0, "seed": 0, "score": 8.0, "pixel_acc": 93.0,
         "time_s": 9.0},
        {"task": "segmentation", "method": "ifvd", "factor": 1.0, "seed": 1, "score": 9.0, "pixel_acc": 93.0,
         "time_s": 9.0},
        {"task": "segmentation", "method": "ifvd", "factor": 0.01, "seed": 0, "score": 13.5, "pixel_acc": 94.0,
         "time_s": 9.0},
        {"task": "segmentation", "method": "ifvd", "factor": 0.1, "seed": 0, "error": "RuntimeError: boom"},
        {"method": "ifvd", "step": 0, "seg_ce": [2.3, 1.8]},  # a diagnosis line: not a run, left out
    ]
    rows = [rows[1], rows[0], *rows[2:]]  # scratch seed 1 listed first: the seeds column still reads 0,1
    text = b.table(rows)
    # scratch: mean 11, sample std sqrt(2) = 1.41; ifvd x1: mean 8.5, std sqrt(0.5) = 0.71, delta 8.5 - 11
    assert "| scratch |  | 11.00 ± 1.41 |  | 91.00 ± 1.41 | 6.00 ± 1.41 | 0,1 |" in text
    assert "| ifvd | 1 | 8.50 ± 0.71 | -2.50 | 93.00 ± 0.00 | 9.00 ± 0.00 | 0,1 |" in text
    assert "| ifvd | 0.01 | 13.50 | +2.50 | 94.00 | 9.00 | 0 |" in text
    assert "| ifvd | 0.1 | error: RuntimeError: boom |" in text
    # rows of one method run from the largest weight down
    assert text.index("| ifvd | 1 |") < text.index("| ifvd | 0.1 |") < text.index("| ifvd | 0.01 |")


def test_a_method_of_another_task_is_refused_before_any_work(capsys, tmp_path):
    b = _bench()
    out = tmp_path / "out"
    # an empty MNIST folder and a missing teacher: had the check not run, the runs would fail fast, not exit
    with pytest.raises(SystemExit):
        b.main(["--task", "segmentation", "--methods", "fgd", "--out", str(out), "--root", str(tmp_path),
                "--teacher", str(tmp_path / "none.pt"), "--quick"])
    err = capsys.readouterr().err
    assert "fgd" in err and "knowledge_adaptation" in err
    assert not out.exists()  # refused before any work: nothing written


def test_a_run_recorded_by_two_processes_counts_once(tmp_path):
    b = _bench()
    run = {"task": "segmentation", "method": "ifvd", "factor": 1.0, "seed": 1, "score": 8.0, "time_s": 1.0}
    (tmp_path / "a.jsonl").write_text(json.dumps(run) + "\n" + json.dumps({**run, "seed": 0, "score": 10.0}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({**run, "score": 99.0}) + "\n")  # the same run again
    rows = b._read(tmp_path)
    assert sorted(r["score"] for r in rows) == [8.0, 10.0]
    assert "| ifvd | 1 | 9.00 ± 1.41 |" in b.table(rows)
