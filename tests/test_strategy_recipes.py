"""Every registered strategy runs from a recipe (``strategy: {name, args, labeled}``), and bad
strategy sections fail before any training with an error naming the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.recipes import DENSE_TARGET_STRATEGIES, RecipeError, parse_recipe
from distill.runner import build_data, run_recipe
from distill.strategies.registry import list_strategies
from distill.taps import TapError

TEACHER = {"model": {"name": "cnn_digits_teacher"}, "train": {"epochs": 1, "lr": 0.05}}
# what each strategy needs beyond the student, the data and the protocol
# (``data`` / ``train``: entries added to the default recipe's)
NEEDS: dict[str, dict] = {
    "born_again": {"args": {"generations": 2}},
    "pro_kd": {"teacher": True, "args": {"teacher_epochs": 1}},
    "reskd": {"teacher": True, "args": {"res_students": [{"name": "mlp_digits_student", "num_classes": 10}]}},
    "knowledge_projection": {"teacher": True},
    "reskd_search": {"teacher": True, "args": {"family": [{"name": "cnn", "widths": [2, 2, 2], "num_classes": 10}]}},
    "takd": {"teacher": True, "args": {"assistants": [{"name": "cnn_digits_student", "num_classes": 10}]}},
    "cmm": {"teacher": True},
    "model_compression": {"teacher": True},
    "co_training": {"labeled": 48},
    "data_distillation": {"labeled": 48},
    "mean_teacher": {"labeled": 48},
    "dml": {"args": {"num_models": 2}},
    "okddip": {"args": {"num_models": 3}},
    "hsakd": {"teacher": True, "args": {"teacher_epochs": 1}},
    "knowledge_flow": {"teacher": True},
    # the student is the light net, cut after stage1; the booster's stage1 has 16 channels: an adapter
    "rocket_launching": {"args": {"booster": {"name": "cnn", "widths": [16, 16, 16]}, "shared": "stage1"}},
    # trunk stem + stage1; branches stage2 + stage3, then a transposed conv up to the 10 maps at 8x8
    "okdhp": {"args": {"split": "stage1", "until": "stage3", "num_branches": 2}, "data": {"targets": "class_heatmaps"},
              "train": {"optimizer": "adam", "lr": 0.01}},
    # issue 13 (S2b): data-free generator strategies on 8x8 digits with a small generator; FedFTG's clients
    "dfad": {"teacher": True, "args": {"image_shape": [1, 8, 8], "batch_size": 16, "generator_width": 8,
                                       "eval_every": 25}},
    "rdskd": {"teacher": True, "args": {"image_shape": [1, 8, 8], "batch_size": 16, "generator_width": 8,
                                        "generator_iterations": 5, "eval_every": 60},
              "train": {"optimizer": "adam", "lr": 0.002, "weight_decay": 0.0}},
    # issue 13 (S2a): the digits teacher's stem has a BatchNorm, which DeepInversion and Fast DFKD match
    "deepinversion_kd": {"teacher": True, "args": {"ipc": 2, "batch_size": 16,
                                                   "synth": {"iterations": 3}}},
    "adi_kd": {"teacher": True, "args": {"rounds": 2, "ipc_per_round": 1,
                                         "epochs_per_round": 1, "batch_size": 16, "synth": {"iterations": 2}}},
    "fast_dfkd": {"teacher": True, "args": {"kd_steps": 2, "batch_size": 16}},
    # issue 15 (V4): label-free ViT pre-training on 8x8 digits (a 4x4 grid of 2x2 patches), then a short linear probe
    "fd": {"teacher": True, "student": {"name": "vit_tiny_rpb", "kwargs": {"img_size": 8, "patch_size": 2}},
           "args": {"teacher_tap": "stage2", "probe_epochs": 2}},
    **{name: {"student": {"name": "vit_tiny", "kwargs": {"img_size": 8, "patch_size": 2}}, "args": {"probe_epochs": 2}}
       for name in ("sdae", "dmjd")},
    # issue 15 (V5): BINGO from the digits teacher's bags, a small queue and projector, then a linear probe
    "bingo": {"teacher": True, "args": {"queue_size": 64, "hidden": 32, "probe": {"epochs": 5}}},
    # issue 15 (V3): DeepInversion from the digits teacher, then dearkd on a DeiT (4x4 grid of 2x2 patches)
    "dearkd_data_free": {"teacher": True, "student": {"name": "deit_tiny", "kwargs": {"img_size": 8, "patch_size": 2}},
                         "args": {"num_classes": 10, "image_shape": [1, 8, 8], "ipc": 2, "batch_size": 16,
                                  "synth": {"iterations": 2},
                                  "dearkd": {"pairs": [["blocks.0.attn", "stage1"]], "early_epochs": 1}},
                         "train": {"optimizer": "adamw", "lr": 0.001}},
    "fedftg": {"args": {"num_clients": 4, "active_fraction": 1.0, "local_epochs": 1, "local_batch_size": 16,
                        "finetune_iterations": 2, "latent_dim": 8}, "train": {"weight_decay": 0.001}},
    # issue 14 (M3): semi-supervised detection on digit scenes with a narrow GFL-style detector
    **{name: {"labeled": 8, "student": {"name": "gfl_student", "kwargs": {"width": 8}},
              "data": {"name": "digits_scenes", "task": "detection", "train_subset": 16, "batch_size": 8,
                       "options": {"n_scenes": 24}}} for name in ("dense_teacher", "dtg_ssod")},
    # issue 17 (A): adversarial KD loops on the digits teacher's logits
    "adversarial_kd": {"teacher": True},
    "kdgan": {"teacher": True, "train": {"optimizer": "adam", "lr": 0.001, "weight_decay": 0.0}},
    # issue 17 (H): MetaDistil trains a copy of the digits teacher; D3Former: 2 tasks of 5 digits on a ViT
    # (a 4x4 grid of 2x2 patches); function matching: the digits teacher on shared crop+flip+mixup views
    "metadistil": {"teacher": True},
    "d3former": {"student": {"name": "vit_tiny", "kwargs": {"img_size": 8, "patch_size": 2}},
                 "args": {"num_tasks": 2, "memory_per_class": 2}, "train": {"optimizer": "adamw", "lr": 0.001}},
    "function_matching": {"teacher": True},
    # issue 17 (B): the student sees a degraded / re-rendered view of the digits the teacher sees
    "generalized_distillation": {"teacher": True, "args": {"regular": "downsample:2", "imitation": 0.5, "T": 2.0}},
    "cross_quality_distillation": {"teacher": True, "args": {"degradation": "noise:0.3", "T": 2.0}},
    "supervision_transfer": {"teacher": True, "labeled": 48,
                             "args": {"student_view": "edges", "adapter": "linear", "transfer_epochs": 1}},
    # issue 17 (F): the nasty teacher is trained against the recipe's (normal) teacher; a short T for one epoch
    "nasty_teacher": {"teacher": True, "args": {"nasty_epochs": 1, "tau": 3.0, "omega": 0.05}},
    "defensive_distillation": {"args": {"T": 20.0, "teacher_epochs": 1}},
    # issue 17 (E): BENN's members distilled from the digits teacher; QuPeD on 3 Dirichlet clients of the 96 digits
    "benn": {"teacher": True, "args": {"members": 2, "mode": "boosting", "kd_weight": 0.5}},
    "quped": {"args": {"num_clients": 3, "local_steps": 2, "batch_size": 16, "eval_every": 1}},
    # issue 17 (D): Net2Net grows the digits teacher into a wider student (stage1 32 -> 48, stage3 96 -> 128);
    # prune-then-distill prunes it in 2 rounds of 1 epoch; DDSL prunes the student's channels to half
    "net2net": {"teacher": True, "student": {"name": "cnn", "kwargs": {"widths": [48, 64, 128], "stem_width": 32,
                                                                        "blocks": 2}}},
    "prune_then_distill": {"teacher": True, "args": {"sparsity": 0.36, "prune_epochs": 1}},
    "dissparse": {"teacher": True, "args": {"keep": 0.5}},
    # issue 17 (C): KDDAug's ID teacher is the digits teacher, its OOD (logit-adjusted) teacher is trained here
    "kddaug": {"teacher": True, "args": {"teacher_epochs": 1}},
}
# strategies not run by this single-process test, each for a stated reason
PYTHON_ONLY = {
    "kd_mvs": "multi-view stereo scenes and depth maps, not a digits recipe (tests/test_vit_mvs.py, examples/vit/kd_mvs.py)",
    "codistillation": "one model per process: it needs torchrun with 2+ processes (tests/test_distributed.py)",
    "gkd": "a causal LM on token batches, not a digits recipe (tests/test_gkd.py runs it through fit)",
    # issue 12's language strategies take tasks, frame sequences, token tables or seq2seq models
    "multilingual_kd": "several tasks, each with its teacher (tests/test_lang_c.py, examples/language/multitask.py)",
    "bam": "several tasks, each with its teacher (tests/test_lang_c.py, examples/language/multitask.py)",
    "mtdnn_kd": "several tasks, each with its teachers (tests/test_lang_c.py, examples/language/multitask.py)",
    "dark_knowledge": "frame sequences (B, T, ·) labelled per frame (tests/test_lang_a.py, examples/language/frames.py)",
    "embedding_encoding": "a teacher's word-embedding table (tests/test_lang_a.py, examples/language/word_embeddings.py)",
    "seq_kd": "a seq2seq model and its tokenizer (tests/test_lang_b.py, examples/language/seq2seq_kd.py)",
    "search_kd": "a seq2seq student exploring its own prefixes (tests/test_lang_b.py)",
    "stylegan2_distillation": "a teacher GAN and a classifier; generated pairs (tests/test_gen_stylegan2_distillation.py, "
                             "examples/generative/stylegan2_distillation.py; recipe: recipes/generative/mnist_stylegan2_distillation.yaml)",
    "darkgan": "a GAN (generator + discriminator) trained on images with a classifier teacher's soft labels "
               "(tests/test_gen_darkgan.py, examples/generative/darkgan.py; recipe: recipes/generative/fashion_darkgan.yaml)",
    "stylekd": "a teacher GAN generator distilled into a narrower generator (tests/test_gen_stylekd.py, "
               "examples/generative/stylekd.py; recipe: recipes/generative/mnist_stylekd.yaml)",
    "self_distilled_stylegan": "two GANs trained on a contaminated image set, filtered in between (tests/test_gen_gan.py, "
                               "examples/generative/self_distilled_stylegan.py; recipe: "
                               "recipes/generative/mnist_self_distilled_stylegan.yaml)",
    "guided_diffusion_distill": "a diffusion model distilled into a guidance-conditioned one (tests/test_gen_diffusion.py, "
                                "examples/generative/diffusion_distill.py; recipe: recipes/generative/mnist_diffusion.yaml)",
    "progressive_distill": "a diffusion model's DDIM steps halved per round (tests/test_gen_diffusion.py, "
                           "examples/generative/diffusion_distill.py; recipe: recipes/generative/mnist_diffusion.yaml)",
    "graph_free_kd": "a GNN teacher and synthetic graphs, node classification on a whole graph, not a digits recipe "
                     "(tests/test_graph_free.py, examples/graph/graph_free_kd.py)",
    "r2l": "a NeRF teacher on a rendered 3-D scene and rays, not a digits recipe (tests/test_gen_lightfield.py, "
           "examples/generative/r2l.py; recipe: recipes/generative/scene_r2l.yaml)",
    # issue 17 (A)
    "adversarial_imitation": "a token-tagging task (word ids + gold annotations), not a digits recipe "
                             "(tests/test_i17_A_adversarial.py, examples/adversarial/adversarial_imitation.py)",
    # issue 17 (F): explanations of a trained teacher on tabular features, fitted in closed form / by scikit-learn
    "global_additive_explanation": "a spline additive model fitted in closed form to a teacher's logits on tabular "
                                   "data (tests/test_i17_F_explain.py, examples/explain/additive_explanations.py)",
    "yasenn": "layer-wise scikit-learn boosted trees on a teacher's activations, tabular data "
              "(tests/test_i17_F_explain.py, examples/explain/yasenn.py)",
    # issue 17 (C): a parallel text corpus (two token tensors) and a zero-shot split with attribute vectors
    "cross_lingual_distill": "a parallel corpus of (source, target) token ids, not a digits recipe "
                             "(tests/test_i17_C_transfer.py, examples/transfer/cross_lingual.py)",
    "msdn": "zero-shot learning: seen-class images and every class's attribute vectors, scored by ZSL/GZSL "
            "(tests/test_i17_C_transfer.py, examples/transfer/msdn_zsl.py)",
    # issue 17 (G): few-shot episodes on held-out classes; a long-tailed set scored per shot group
    "skd_fewshot": "base classes trained, N-way K-shot episodes of held-out classes scored on frozen features "
                   "(tests/test_i17_G_fewshot.py, examples/fewshot/skd_fewshot.py)",
    "ssd_longtail": "a long-tailed training set, many/medium/few-shot accuracy of a two-head student "
                    "(tests/test_i17_G_longtail.py, examples/longtail/ssd_longtail.py)",
}


def _recipe(name: str) -> dict:
    need = copy.deepcopy(NEEDS.get(name, {}))  # a test that edits its recipe must not edit the next one's
    strategy = {"name": name, "args": need.get("args", {})}
    if "labeled" in need:
        strategy["labeled"] = need["labeled"]
    recipe = {"name": f"s_{name}", "data": {"name": "digits", "batch_size": 32, "train_subset": 96, **need.get("data", {})},
              "student": need.get("student", {"name": "cnn_digits_student"}),
              "train": {"epochs": 1, "lr": 0.05, **need.get("train", {})}, "strategy": strategy}
    if need.get("teacher"):
        recipe["teacher"] = TEACHER
    return recipe


RUNNABLE = sorted(i.name for i in list_strategies() if i.name not in PYTHON_ONLY)


def test_every_registered_strategy_is_covered():
    assert set(PYTHON_ONLY) <= {i.name for i in list_strategies()}
    assert len(RUNNABLE) >= 15


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_strategy_runs_from_a_recipe(name: str, tmp_path: Path) -> None:
    dirs = run_recipe(parse_recipe(_recipe(name)), out_dir=tmp_path, progress=False)
    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert summary["strategy"] == name and summary["kind"] == "distill"
    if name in DENSE_TARGET_STRATEGIES:  # scored by the validation heatmap MSE: no accuracy
        assert summary["last_acc"] is None and 0.0 < summary["last_score"] < 1.0
        assert summary["data"]["targets"] == "class_heatmaps"
    else:
        assert 0.0 <= summary["last_acc"] <= 100.0
    assert (tmp_path / f"s_{name}" / "report.md").is_file()


@pytest.mark.parametrize("edit, match", [
    (lambda r: r["strategy"]["args"].update(nope=1), r"strategy.args.nope: unknown argument"),
    (lambda r: r["strategy"]["args"].update(epochs=3), r"strategy.args.epochs: set by the recipe"),
    (lambda r: r["strategy"]["args"].update(lr=0.1), r"strategy.args.lr: a training setting"),
    (lambda r: r["strategy"].update(labeled=10), r"strategy.labeled: strategy 'dml' takes no unlabeled data"),
    (lambda r: r.update(losses={"ce": 1.0}), r"chooses its own losses"),
    (lambda r: r["strategy"].update(name="dmll"), r"unknown strategy 'dmll'.*Did you mean 'dml'"),
    (lambda r: r.update(hint_stage={"train": {"epochs": 1}}), r"cannot be combined"),
])
def test_bad_strategy_sections_are_clear_errors(edit, match: str) -> None:
    recipe = _recipe("dml")
    edit(recipe)
    with pytest.raises(RecipeError, match=match):
        parse_recipe(recipe)


@pytest.mark.parametrize("name, edit, match", [
    ("okdhp", lambda r: r["data"].update(augment={"crop_padding": 1}), r"computed once from the un-augmented images"),
    ("dml", lambda r: r["data"].update(targets="class_heatmaps"), r"only a dense-output strategy \(okdhp\)"),
    ("okdhp", lambda r: r["data"].pop("targets"), r"'okdhp' trains on dense target maps: set data.targets"),
    ("okdhp", lambda r: r["data"].update(targets="heatmaps"), r"data.targets: Input should be 'labels' or"),
    ("okdhp", lambda r: r["data"].update(heatmap_sigma=0), r"data.heatmap_sigma: Input should be greater than 0"),
])
def test_dense_targets_are_validated(name: str, edit, match: str) -> None:
    recipe = _recipe(name)
    edit(recipe)
    with pytest.raises(RecipeError, match=match):
        parse_recipe(recipe)


def test_class_heatmap_data_carries_maps_in_the_label_channel() -> None:
    recipe = parse_recipe({**_recipe("okdhp"), "data": {"name": "digits", "train_subset": 64, "batch_size": 32,
                                                        "targets": "class_heatmaps", "heatmap_sigma": 0.8}})
    train, val, info = build_data(recipe.data)
    labels, _, _ = build_data(recipe.data.model_copy(update={"targets": "labels"}))
    assert info["targets"] == "class_heatmaps" and info["num_classes"] == 10
    assert train.targets.shape == (64, 10, 8, 8) and val.targets.shape == (len(val.inputs), 10, 8, 8)
    torch.testing.assert_close(train.inputs, labels.inputs)  # same images, maps instead of labels
    assert torch.equal(train.targets.flatten(2).amax(dim=2).argmax(dim=1), labels.targets)
    assert float(train.targets.max()) <= 1.0


@pytest.mark.parametrize("name, args, error, match", [
    ("rocket_launching", {"shared": "stage9"}, TapError, r"shared='stage9'.*Nearest valid paths"),
    ("rocket_launching", {"booster": None}, TypeError, r"needs a RocketNet.*booster=<model spec>"),
    ("okdhp", {"until": None}, ValueError, r"branch output \(32, 10\) is not a feature map"),
    ("okdhp", {"split": "stage2", "until": "stage1"}, ValueError, r"until='stage1' must come after split='stage2'"),
])
def test_bad_composite_arguments_fail_before_training(name: str, args: dict, error: type, match: str,
                                                      tmp_path: Path) -> None:
    recipe = _recipe(name)
    recipe["strategy"]["args"].update(args)
    recipe["strategy"]["args"] = {k: v for k, v in recipe["strategy"]["args"].items() if v is not None}
    with pytest.raises(error, match=match):
        run_recipe(parse_recipe(recipe), out_dir=tmp_path, progress=False)
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_labeled_must_leave_some_unlabeled_data(tmp_path: Path) -> None:
    recipe = _recipe("mean_teacher")
    recipe["strategy"]["labeled"] = 96  # the whole subset: nothing left unlabeled
    with pytest.raises(RecipeError, match="leaves no unlabeled data"):
        run_recipe(parse_recipe(recipe), out_dir=tmp_path, progress=False)


def test_cli_lists_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert by_name["dml"]["arxiv"] == "1706.00384" and by_name["dml"]["family"] == "online"
    assert by_name["born_again"]["defaults"]["generations"] >= 1
    assert main(["strategies", "--family", "chain"]) == 0
    out = capsys.readouterr().out
    assert "takd" in out and "dml" not in out


@pytest.mark.parametrize("name", ["dml", "takd", "model_compression"])
def test_a_strategy_recipe_resumes(name: str, tmp_path: Path) -> None:
    """``distill run --resume`` on a finished strategy run restores it (cohort, chain, transfer set)
    without training again: the summary's accuracy is the first run's."""
    recipe = parse_recipe(_recipe(name))
    first = json.loads((run_recipe(recipe, out_dir=tmp_path, progress=False)[0] / "summary.json").read_text())
    again = json.loads((run_recipe(recipe, out_dir=tmp_path, progress=False, resume=True)[0] / "summary.json")
                       .read_text())
    assert again["last_acc"] == first["last_acc"] and again["best_epoch"] == first["best_epoch"]
