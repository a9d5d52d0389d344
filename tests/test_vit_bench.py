"""benchmarks/vit.py: a ``--quick`` smoke run of every row on MNIST, the cached teacher reused, and
the table's honesty (a missing piece reads "not available" with its reason, never a number)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _benchmarks import load_benchmark

from tests._mnist import mnist_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vit.py"


def _bench():
    return load_benchmark("vit")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.skipif(mnist_dir() is None, reason="the shared MNIST files are absent (set DISTILL_MNIST)")
def test_quick_run_covers_every_row_and_reuses_the_teachers(tmp_path):
    bench = _bench()
    out = tmp_path / "bench"
    common = ["--quick", "--dataset", "mnist", "--root", str(mnist_dir()), "--out", str(out),
              "--train-subset", "256", "--val-subset", "128"]
    r = _run(*common)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    assert "quick protocol on mnist: 256 training / 128 test images, 1 seed(s)" in text
    saved = json.loads((out / "results.json").read_text())
    results, unavailable = saved["results"], saved["unavailable"]
    planned = ([("supervised", n) for n in bench.SUPERVISED] + [("reduced", n) for n in bench.REDUCED]
               + [("ssl", n) for n in bench.SSL])
    ran = {(x["section"], x["row"]) for x in results}
    for section, name in planned:  # every row either ran or says why it cannot
        assert (section, name) in ran or f"{section}/{name}" in unavailable, (section, name)
    errors = [x for x in results if "error" in x]
    assert not errors, errors
    for x in results:
        for key in ("last", "best", "probe", "finetune"):
            if key in x:
                assert 0.0 <= x[key] <= 100.0, x
        assert x["time_s"] is None or x["time_s"] >= 0
    for name in bench.SUPERVISED:
        assert f"| {name} |" in text
    # every teacher the rows name was trained once and cached as safetensors with its settings
    kinds = {s["teacher"] for s in bench.SUPERVISED.values() if s["teacher"]} | \
        {s["teacher"] for s in bench.SSL.values() if s.get("teacher")}
    stamps = {}
    for kind in kinds:
        meta = json.loads((out / f"teacher_{kind}.json").read_text())
        assert meta["settings"]["model"] == bench.TEACHERS[kind]["model"] and 0 <= meta["acc"] <= 100
        stamps[kind] = (out / f"teacher_{kind}.safetensors").stat().st_mtime_ns
    again = _run(*common, "--sections", "supervised", "--rows", "kd")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "teacher_cnn.safetensors").stat().st_mtime_ns == stamps["cnn"]  # reused, not retrained
    assert "| kd |" in again.stdout and "| deit_hard |" not in again.stdout


def test_missing_pieces_read_not_available_with_the_reason():
    bench = _bench()
    assert bench.missing({"methods": ["kd"]}) is None
    assert bench.missing({"methods": ["no_such_method"]}) == "method 'no_such_method' is not registered"
    assert bench.missing({"strategies": ["no_such_strategy"]}) == "strategy 'no_such_strategy' is not registered"
    assert "cannot be imported" in bench.missing({"functions": ["distill.no_such_module:f"]})
    results = [{"section": "supervised", "row": "scratch", "seed": s, "last": v, "best": v + 1, "time_s": 2.0}
               for s, v in enumerate([50.0, 52.0])]
    results += [{"section": "supervised", "row": "kd", "seed": 0, "error": "RuntimeError: boom"}]
    text = bench.table(results, {("supervised", "vitkd"): "method 'vitkd' is not registered"}, ["supervised"],
                       {}, 0.1)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "51.00 ± 1.41" in lines["scratch"] and "52.00 ± 1.41" in lines["scratch"]  # mean ± sample std
    assert "error in 1 run(s): RuntimeError: boom" in lines["kd"] and "| 0 |" in lines["kd"]
    assert "not available: method 'vitkd' is not registered" in lines["vitkd"]
    assert not any(ch.isdigit() for ch in lines["vitkd"].split("not available")[1].replace("vitkd", ""))
    widths = {line.count("|") for line in lines.values()}
    assert len(widths) == 1, text  # every row has the header's columns


def test_bad_arguments_fail_before_any_work(tmp_path):
    r = _run("--reduced-fraction", "1.5", "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "--reduced-fraction must be in (0, 1)" in r.stderr
    r = _run("--rows", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "unknown rows ['nope']" in r.stderr
    assert not (tmp_path / "x").exists()
