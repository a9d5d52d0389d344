"""The issue-17 examples' ``--quick`` modes run end to end (smoke tests, about 10 s each: the formulas are
proved in tests/test_i17_*.py). Each runs in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from _examples import run_example_quick


@pytest.mark.parametrize("script, expect, data", [
    ("adversarial/adversarial_imitation.py", "student + adversarial imitation", None),
    ("explain/additive_explanations.py", "additive student acc", None),
    ("explain/yasenn.py", "class:", None),
    ("face/ddl_verification.py", "student + DDL on degraded pairs", "mnist"),
    ("face/ec_kd.py", "student + EC-KD on degraded pairs", "mnist"),
    ("compression/reskd_search.py", "sample-adaptive (max prob >= 0.9 stops)", None),
    ("fewshot/skd_fewshot.py", "Gen-1: 5-way 5-shot", "fashion_mnist"),
    ("longtail/ssd_longtail.py", "soft head: overall", "fashion_mnist"),
    ("transfer/knowledge_projection.py", "knowledge projection:", "fashion_mnist"),
    ("transfer/cross_lingual.py", "target student distilled on parallel text", None),
    ("transfer/msdn_zsl.py", "lambda_distill=0.001: ZSL", "fashion_mnist"),
])
def test_example_quick(script: str, expect: str, data: str | None, tmp_path: Path) -> None:
    run_example_quick(script, expect, data, tmp_path)
