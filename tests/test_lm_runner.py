"""Language-model recipes end to end on a tiny teacher saved in the test (``kind: lm``)."""

from __future__ import annotations

import json

import pytest
import yaml

from distill.recipes import RecipeError
from tests._lm import saved_teacher
from tests._optional import missing

pytestmark = pytest.mark.skipif(missing("transformers"), reason="transformers is not installed")


def recipe_dict(teacher_dir, **changes):
    data = {
        "name": "tiny_lm", "kind": "lm", "seed": 3,
        "teacher": {"model": f"hf:{teacher_dir}"},
        "student": {"config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}},
        "data": {"train_prompts": 6, "eval_prompts": 3, "real_text_passages": 3, "max_new_tokens": 5,
                 "max_chars": 260, "max_len": 700, "real_text_seq_len": 32, "generation_batch_size": 4},
        "cache": {"k": 8},
        "students": {"ce_only": {"ce": 1.0}, "forward_kl": {"token_kl": {"chunk_size": 16}}},
        "train": {"epochs": 2, "batch_size": 3, "eval_batch_size": 4, "lr": 1e-2},
    }
    data.update(changes)
    return data


def test_lm_recipe_runs_end_to_end_and_refuses_to_overwrite(tmp_path):
    from distill.lm_runner import parse_lm_recipe, run_lm_recipe
    from distill.train.rundir import RunFolderError

    teacher_dir = saved_teacher(tmp_path / "teacher")
    recipe = parse_lm_recipe(recipe_dict(teacher_dir))
    folder = run_lm_recipe(recipe, out_dir=tmp_path / "runs", progress=False)
    results = json.loads((folder / "results.json").read_text())
    assert set(results["rows"]) == {"ce_only", "forward_kl"}
    for row in results["rows"].values():
        assert 0.0 <= row["agreement"] <= 100.0 and row["kl_to_teacher"] >= 0.0
        assert row["ppl_teacher_text"] > 1.0 and row["ppl_real_text"] > 1.0
    assert results["data"]["train_prompts"] == 6 and results["data"]["eval_prompts"] == 3
    assert (folder / "generations" / "train.jsonl").is_file() and (folder / "teacher_cache").is_dir()
    assert "| forward_kl |" in (folder / "report.md").read_text()
    assert yaml.safe_load((folder / "recipe.yaml").read_text())["name"] == "tiny_lm"
    with pytest.raises(RunFolderError):  # a row's results are never silently replaced
        run_lm_recipe(recipe, out_dir=tmp_path / "runs", progress=False)
    changed = parse_lm_recipe(recipe_dict(teacher_dir, train={"epochs": 3, "batch_size": 3, "eval_batch_size": 4,
                                                              "lr": 1e-2}))
    with pytest.raises(RunFolderError, match="recipe.yaml differs"):  # another version never relabels results
        run_lm_recipe(changed, out_dir=tmp_path / "runs", progress=False, resume=True)
    assert yaml.safe_load((folder / "recipe.yaml").read_text())["train"]["epochs"] == 2
    # one row again, with overwrite: the other row's results are kept
    run_lm_recipe(recipe, out_dir=tmp_path / "runs", progress=False, overwrite=True, rows=["forward_kl"])
    again = json.loads((folder / "results.json").read_text())
    assert again["rows"]["ce_only"] == results["rows"]["ce_only"]


def test_lm_recipe_errors_name_the_bad_key(tmp_path):
    from distill.lm_runner import parse_lm_recipe

    with pytest.raises(RecipeError, match="(?s)students.kd_row: .*no_such_loss"):
        parse_lm_recipe(recipe_dict(tmp_path, students={"kd_row": {"no_such_loss": 1.0}}))
    with pytest.raises(RecipeError, match="train_prompts"):
        parse_lm_recipe(recipe_dict(tmp_path, data={"train_prompts": 0}))
    with pytest.raises(RecipeError, match="bogus"):
        parse_lm_recipe(recipe_dict(tmp_path, bogus=1))
