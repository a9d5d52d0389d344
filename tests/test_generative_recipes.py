"""Generative recipes (kind: generative, distill.generative_runner): validation before any work, a row's numbers
against the same training and evaluation written out by hand, the recipe's arguments reaching the strategy, the run
folder's rules (resume, overwrite), a teacher checkpoint, and the command line. Tiny sizes: the numbers say the
pipeline is the intended one, not how good a method is."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchmetrics", reason="FID/KID need the 'generative' extra (torchmetrics)")

from _mnist import mnist_dir  # noqa: E402

import distill.generative_runner as gr  # noqa: E402
from distill.cli import main as cli_main  # noqa: E402
from distill.generative_runner import (  # noqa: E402
    is_generative_recipe,
    load_generative_recipe,
    parse_generative_recipe,
    run_generative_recipe,
)
from distill.models.stylegan import StyleDiscriminator, StyleGenerator  # noqa: E402
from distill.recipes import RecipeError, parse_recipe  # noqa: E402
from distill.strategies.gan import train_gan  # noqa: E402
from distill.strategies.stylekd import StyleKDWeights  # noqa: E402
from distill.train.checkpoint import load_model  # noqa: E402
from distill.train.generative_eval import fid_kid  # noqa: E402
from distill.train.rundir import RunFolderError  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _shared_mnist():
    """The runner reads MNIST from ``$DISTILL_MNIST`` or ``../shared/data/mnist`` beside the working directory;
    a clone elsewhere (CI's) finds the shared files through the tests' own lookup. Module scope: the module's
    run fixtures read the data too."""
    root = mnist_dir()
    with pytest.MonkeyPatch.context() as mp:
        if root is not None:
            mp.setenv("DISTILL_MNIST", str(root))
        yield

REPO = Path(__file__).resolve().parents[1]

STYLEGAN: dict[str, Any] = {
    "name": "sg",
    "kind": "generative",
    "family": "stylegan",
    "data": {"name": "mnist", "train_subset": 64, "eval_size": 24},
    "feature_net": {"epochs": 1, "seed": 0, "train_subset": 300},
    "teacher": {"model": {"width": 8, "min_width": 4, "mapping_layers": 2}, "train": {"steps": 3, "batch_size": 8}},
    "student": {"width": 4, "min_width": 4, "mapping_layers": 2},
    "discriminator": {"width": 8, "min_width": 4},
    "rows": {
        "scratch": {"baseline": "train_gan", "args": {"steps": 2, "batch_size": 8, "lr": 0.002}},
        "stylekd": {"strategy": "stylekd", "args": {"steps": 2, "batch_size": 8, "directions_per_block": 2,
                                                    "weights": {"l1": 1.5, "perceptual": 0.5, "relation": 7.0}}},
    },
    "seeds": [5],
    "threads": 1,
}

DARKGAN: dict[str, Any] = {
    "name": "dg",
    "kind": "generative",
    "family": "darkgan",
    "data": {"name": "fashion_mnist", "train_subset": 64, "eval_size": 24},
    "feature_net": {"epochs": 1, "seed": 0, "train_subset": 300},
    "teacher": {"train": {"epochs": 1, "batch_size": 32}},
    "student": {"width": 4, "min_width": 4, "mapping_layers": 2},
    "discriminator": {"width": 8, "min_width": 4},
    "rows": {
        "darkgan": {"strategy": "darkgan", "args": {"conditioning": "soft", "temperature": 2.0, "steps": 2,
                                                    "batch_size": 8}},
        "uncond": {"strategy": "darkgan", "args": {"conditioning": "none", "steps": 2, "batch_size": 8}},
    },
    "seeds": [0],
    "threads": 1,
}


def recipe(base: dict[str, Any] = STYLEGAN, **edits: Any) -> dict[str, Any]:
    r = copy.deepcopy(base)
    r.update(edits)
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_generative_recipe(parse_generative_recipe(recipe()), out_dir=tmp_path_factory.mktemp("gen"),
                                 progress=False)


# ------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("edit, match", [
    (lambda r: r["rows"].update(x={"strategy": "stylekdd"}), r"rows.x.strategy: 'stylekdd' is not a generative strategy"),
    (lambda r: r["rows"].update(x={"strategy": "darkgan"}), r"'darkgan' is a generative strategy of another family"),
    (lambda r: r["rows"].update(x={"strategy": "dkd"}), r"'dkd' is not a generative strategy"),
    (lambda r: r["rows"].update(x={"baseline": "scratch"}), r"rows.x.baseline: 'scratch' is not a baseline"),
    (lambda r: r["rows"].update(x={"args": {}}), r"exactly one of strategy .* or baseline"),
    (lambda r: r["rows"]["stylekd"]["args"].update(stepz=3), r"rows.stylekd.args.stepz: unknown argument of stylekd"),
    (lambda r: r["rows"]["stylekd"]["args"].update(teacher=1), r"rows.stylekd.args.teacher: set by the runner"),
    (lambda r: r["rows"]["scratch"]["args"].update(images=1), r"rows.scratch.args.images: set by the runner"),
    (lambda r: r["rows"]["stylekd"]["args"].update(steps="many"), r"rows.stylekd.args.steps: 'many' is not a valid"),
    (lambda r: r["rows"]["stylekd"]["args"].update(steps=0), r"rows.stylekd.args.steps: must be a positive int"),
    (lambda r: r["rows"]["stylekd"]["args"]["weights"].update(l2=1.0), r"rows.stylekd.args.weights: .*l2"),
    (lambda r: r["rows"]["stylekd"]["args"].update(relation_form="cosine"), r"relation_form: 'cosine' is not one of"),
    (lambda r: r["rows"]["scratch"]["args"].update(betas=[0.0]), r"rows.scratch.args.betas"),
    (lambda r: r["student"].update(widht=4), r"student.widht: unknown argument of StyleGenerator"),
    (lambda r: r["student"].update(c_dim=3), r"student.c_dim: set by the runner"),
    (lambda r: r["teacher"]["train"].update(epochs=3), r"teacher.train.epochs: unknown argument of train_gan"),
    (lambda r: r["rows"].update({"a b": {"baseline": "train_gan"}}), r"row name 'a b'"),
    (lambda r: r.update(seeds=[1, 1]), r"seeds repeat"),
    (lambda r: r.update(family="nerf"), r"family"),
    (lambda r: r["data"].update(name="cifar10"), r"data.name"),
])
def test_bad_recipes_are_refused_before_any_work(edit, match: str) -> None:
    r = recipe()
    edit(r)
    with pytest.raises(RecipeError, match=match):
        parse_generative_recipe(r)


@pytest.mark.parametrize("edit, match", [
    (lambda r: r["rows"]["darkgan"]["args"].update(conditioning="hard"), r"conditioning: 'hard' is not one of"),
    (lambda r: r["rows"]["darkgan"]["args"].update(labels=[1]), r"darkgan.args.labels: set by the runner"),
    (lambda r: r["teacher"].update(model={"width": 8}), r"teacher.model: family 'darkgan' trains its own teacher"),
    (lambda r: r.update(feature_net={"epochs": 1, "seed": 1}), r"feature_net.seed 1: the teacher of seed 0"),
])
def test_bad_darkgan_recipes_are_refused(edit, match: str) -> None:
    r = recipe(DARKGAN)
    edit(r)
    with pytest.raises(RecipeError, match=match):
        parse_generative_recipe(r)


def test_a_bad_recipe_file_trains_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    for name in ("load_images", "train_gan", "train_feature_net"):
        monkeypatch.setattr(gr, name, lambda *a, **k: pytest.fail("work started for a bad recipe"))
    r = recipe()
    r["rows"]["stylekd"]["args"]["weights"]["relaton"] = 1.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(r))
    assert cli_main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) != 0
    assert "relaton" in capsys.readouterr().err
    assert not (tmp_path / "sg").exists()


def test_the_image_recipe_schema_points_at_the_generative_runner() -> None:
    with pytest.raises(RecipeError, match=r"kind 'generative'.*distill.generative_runner"):
        parse_recipe(recipe())


def test_shipped_generative_recipes_validate() -> None:
    paths = sorted((REPO / "recipes" / "generative").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"mnist_stylekd", "fashion_darkgan"}
    for path in paths:
        assert is_generative_recipe(path)
        r = load_generative_recipe(path)
        assert r.kind == "generative" and r.name == path.stem


# ------------------------------------------------------------------------------------------- the numbers

def test_the_scratch_row_is_train_gan_written_out_by_hand_and_measured_by_hand(run: Path) -> None:
    """The baseline row: the student built after manual_seed(1000 + s), its discriminator after 2000 + s, trained by
    train_gan with the row's args; FID/KID of 24 samples (latents of seed 1000 + s) against the first 24 MNIST test
    images, and L1 to the saved teacher's samples of the same latents."""
    from distill.data.sources import _default_mnist_root, load_mnist

    results = json.loads((run / "results.json").read_text())
    x, _ = load_mnist(_default_mnist_root(), "train")
    real = load_mnist(_default_mnist_root(), "test")[0][:24]
    torch.manual_seed(1005)
    g = StyleGenerator(width=4, min_width=4, mapping_layers=2)
    torch.manual_seed(2005)
    d = StyleDiscriminator(width=8, min_width=4)
    ema = train_gan(g, d, x[:64], steps=2, batch_size=8, lr=0.002, seed=5, progress=False).ema
    saved, _ = load_model(run / "seed5" / "scratch.safetensors", StyleGenerator(width=4, min_width=4, mapping_layers=2))
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[k], v, rtol=0, atol=0)
    teacher, _ = load_model(run / "seed5" / "teacher.safetensors", StyleGenerator(width=8, min_width=4, mapping_layers=2))
    z = torch.randn(24, ema.z_dim, generator=torch.Generator().manual_seed(1005))
    with torch.no_grad():  # the per-pixel noise is drawn after manual_seed(1000 + s) too
        torch.manual_seed(1005)
        imgs = (ema.eval()(z).clamp(-1, 1) + 1) / 2
        torch.manual_seed(1005)
        t_imgs = (teacher.eval()(z).clamp(-1, 1) + 1) / 2
    net = gr._feature_net(parse_generative_recipe(recipe()), progress=False)
    s = fid_kid(real, imgs, net, kid_subset_size=24, kid_subsets=20, seed=5)
    row = results["rows"]["scratch"]["seeds"]["5"]
    assert row["fid"] == pytest.approx(s["fid"], rel=1e-6)
    assert row["kid"] == pytest.approx(s["kid"], rel=1e-6, abs=1e-9)
    assert row["l1_to_teacher"] == pytest.approx(float((imgs - t_imgs).abs().mean()), rel=1e-6)
    assert results["rows"]["scratch"]["parameters"] == sum(p.numel() for p in ema.parameters())


def test_folder_holds_rows_report_weights_and_recipe(run: Path) -> None:
    results = json.loads((run / "results.json").read_text())
    assert list(results["rows"]) == ["scratch", "stylekd"]
    assert results["family"] == "stylegan" and results["seeds"] == [5]
    for row in ("scratch", "stylekd"):
        assert set(results["rows"][row]["seeds"]["5"]) >= {"fid", "kid", "l1_to_teacher", "seconds"}
        assert (run / "seed5" / f"{row}.safetensors").is_file()
    assert results["rows"]["stylekd"]["spec"]["strategy"] == "stylekd"
    assert results["rows"]["stylekd"]["seeds"]["5"] != results["rows"]["scratch"]["seeds"]["5"]
    assert "trained here (train_gan, 3 steps)" == results["teacher"]["5"]["how"]
    report = (run / "report.md").read_text()
    assert "| scratch | baseline train_gan" in report and "| stylekd | strategy stylekd" in report
    assert "FID ↓" in report and "L1 to teacher" in report and "lenet-mnist" in report
    kd = results["rows"]["stylekd"]["seeds"]["5"]  # one seed: the cells are the values (KID in thousandths)
    assert f"| {kd['fid']:.2f} | {1000 * kd['kid']:.2f} | {kd['l1_to_teacher']:.4f} |" in report
    assert (run / "recipe.yaml").is_file()


def test_the_recipes_arguments_reach_the_strategy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spy on the registered stylekd and on the baseline: the recipe's weights arrive as StyleKDWeights with its
    numbers (not the paper's 3/3/30 defaults), the other args unchanged, the runner's teacher, images, feature net and
    seed with them."""
    calls: dict[str, dict[str, Any]] = {}
    info = gr.strategy_info("stylekd")

    @functools.wraps(info.fn)  # the runner checks the recipe's args against the strategy's signature
    def spy(*a: Any, **k: Any) -> Any:
        calls["stylekd"] = k
        return info.fn(*a, **k)

    @functools.wraps(train_gan)
    def spy_gan(*a: Any, **k: Any) -> Any:
        calls["train_gan"] = k
        return train_gan(*a, **k)

    monkeypatch.setattr(gr, "strategy_info", lambda name: dataclasses.replace(info, fn=spy) if name == "stylekd"
                        else pytest.fail(f"unexpected strategy {name}"))
    monkeypatch.setitem(gr.FAMILIES["stylegan"].baselines, "train_gan", spy_gan)
    r = recipe()
    r["teacher"]["train"]["steps"] = 1
    run_generative_recipe(parse_generative_recipe(r), out_dir=tmp_path, progress=False)
    k = calls["stylekd"]
    assert k["weights"] == StyleKDWeights(l1=1.5, perceptual=0.5, relation=7.0)
    assert (k["steps"], k["batch_size"], k["directions_per_block"], k["seed"]) == (2, 8, 2, 5)
    saved, _ = load_model(tmp_path / "sg" / "seed5" / "teacher.safetensors",
                          StyleGenerator(width=8, min_width=4, mapping_layers=2))
    for key, v in saved.state_dict().items():  # the teacher trained for this seed, not another generator
        torch.testing.assert_close(k["teacher"].state_dict()[key], v, rtol=0, atol=0)
    assert k["images"].shape == (64, 1, 28, 28) and k["feature_net"] is not None
    assert {key: calls["train_gan"][key] for key in ("steps", "batch_size", "lr", "seed")} == \
        {"steps": 2, "batch_size": 8, "lr": 0.002, "seed": 5}


def test_finished_results_are_refused_then_resumed_without_training(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RunFolderError, match="already holds results.*--resume"):
        run_generative_recipe(parse_generative_recipe(recipe()), out_dir=run.parent, progress=False)
    monkeypatch.setattr(gr, "_run_row", lambda *a, **k: pytest.fail("a finished row was trained again"))
    monkeypatch.setattr(gr, "train_gan", lambda *a, **k: pytest.fail("the teacher was trained again"))
    before = json.loads((run / "results.json").read_text())
    run_generative_recipe(parse_generative_recipe(recipe()), out_dir=run.parent, progress=False, resume=True)
    assert json.loads((run / "results.json").read_text())["rows"] == before["rows"]
    with pytest.raises(RunFolderError, match="another version of the recipe"):
        run_generative_recipe(parse_generative_recipe(recipe(seeds=[6])), out_dir=run.parent, progress=False,
                              resume=True)


def test_resume_runs_only_the_missing_row_and_reuses_the_teacher(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    r = recipe()
    r["teacher"]["train"]["steps"] = 1
    run_generative_recipe(parse_generative_recipe(r), out_dir=tmp_path, progress=False, rows=["scratch"])
    ran: list[str] = []
    real = gr._run_row
    monkeypatch.setattr(gr, "_run_row", lambda ctx, name, row: ran.append(name) or real(ctx, name, row))
    folder = run_generative_recipe(parse_generative_recipe(r), out_dir=tmp_path, progress=False, resume=True)
    assert ran == ["stylekd"]
    results = json.loads((folder / "results.json").read_text())
    assert "reused" in results["teacher"]["5"]["how"] and set(results["rows"]) == {"scratch", "stylekd"}


def test_a_teacher_checkpoint_is_loaded_and_must_fit(run: Path, tmp_path: Path) -> None:
    ckpt = run / "seed5" / "teacher.safetensors"
    r = recipe(rows={"scratch": STYLEGAN["rows"]["scratch"]})
    r["teacher"]["checkpoint"] = str(ckpt)
    folder = run_generative_recipe(parse_generative_recipe(r), out_dir=tmp_path, progress=False)
    results = json.loads((folder / "results.json").read_text())
    before = json.loads((run / "results.json").read_text())
    assert results["teacher"]["5"]["how"] == f"loaded from {ckpt}"
    assert results["teacher"]["5"]["fid"] == pytest.approx(before["teacher"]["5"]["fid"], rel=1e-9)
    r["teacher"]["model"]["width"] = 16
    with pytest.raises(RecipeError, match="does not fit the teacher model"):
        run_generative_recipe(parse_generative_recipe(r), out_dir=tmp_path / "other", progress=False)


def test_a_darkgan_recipe_runs_conditioned_and_plain_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {}
    info = gr.strategy_info("darkgan")

    @functools.wraps(info.fn)
    def spy(student: Any, *a: Any, **k: Any) -> Any:
        calls[k["conditioning"]] = (student.c_dim, k.get("temperature"), k["discriminator"])
        return info.fn(student, *a, **k)

    monkeypatch.setattr(gr, "strategy_info", lambda name: dataclasses.replace(info, fn=spy))
    folder = run_generative_recipe(parse_generative_recipe(recipe(DARKGAN)), out_dir=tmp_path, progress=False)
    results = json.loads((folder / "results.json").read_text())
    assert list(results["rows"]) == ["darkgan", "uncond"]
    for row in ("darkgan", "uncond"):
        m = results["rows"][row]["seeds"]["0"]
        assert set(m) >= {"kl", "top1", "fid", "kid"} and 0 <= m["top1"] <= 1 and m["kl"] >= 0
    assert calls["soft"][:2] == (10, 2.0) and hasattr(calls["soft"][2], "forward_with_aux")
    assert calls["none"][:2] == (0, None) and not hasattr(calls["none"][2], "forward_with_aux")
    assert "seed 1" in results["teacher"]["0"]["how"] and 0 <= results["teacher"]["0"]["test_top1"] <= 1
    assert "teacher top-1 agreement" in (folder / "report.md").read_text()


def test_distill_run_reads_a_generative_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    r = recipe(rows={"scratch": STYLEGAN["rows"]["scratch"]})
    r["teacher"]["train"]["steps"] = 1
    path = tmp_path / "sg.yaml"
    path.write_text("# a generative recipe\n" + yaml.safe_dump(r))
    assert cli_main(["run", str(path), "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "generative recipe (kind: generative): --seeds does not apply" in capsys.readouterr().err.replace("\n", " ")
    assert cli_main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "sg" / "report.md").is_file()


# ------------------------------------------------------------------------------------------- diffusion

DIFFUSION: dict[str, Any] = {
    "name": "df",
    "kind": "generative",
    "family": "diffusion",
    "data": {"name": "mnist", "train_subset": 64, "eval_size": 20, "size": 8},
    "feature_net": {"epochs": 1, "seed": 0, "train_subset": 300},
    "teacher": {"model": {"block_out_channels": [8, 16], "attention": False, "norm_num_groups": 8},
                "train": {"steps": 2, "batch_size": 8}, "sample": {"steps": 4, "w": 1.5}},
    "rows": {
        "teacher_2": {"baseline": "teacher", "args": {"steps": 2, "w": 1.5}},
        "guided": {"strategy": "guided_diffusion_distill", "args": {"steps": 2, "batch_size": 8, "w_max": 3.0},
                   "sample": {"steps": 4, "w": 1.5}},
        "progressive": {"strategy": "progressive_distill", "teacher_row": "guided", "sample": {"w": 1.5},
                        "args": {"start_steps": 4, "rounds": 1, "steps_per_round": 2, "batch_size": 8}},
    },
    "seeds": [2],
    "threads": 1,
}


@pytest.mark.parametrize("edit, match", [
    (lambda r: r["rows"]["progressive"].update(teacher_row="later"), r"teacher_row: 'later' is not an earlier strategy"),
    (lambda r: r["rows"]["progressive"].update(teacher_row="teacher_2"), r"'teacher_2' is not an earlier strategy row"),
    (lambda r: r["rows"]["guided"]["sample"].update(stepz=2), r"rows.guided.sample.stepz: unknown argument"),
    (lambda r: r["rows"]["guided"]["sample"].update(labels=[1]), r"rows.guided.sample.labels: set by the runner"),
    (lambda r: r["rows"]["teacher_2"]["args"].pop("steps"), r"the teacher baseline needs steps"),
    (lambda r: r["rows"]["guided"]["args"].update(w_max="big"), r"rows.guided.args.w_max: 'big' is not a valid"),
    (lambda r: r.update(student={"width": 4}), r"family 'diffusion' distils copies of the teacher"),
    (lambda r: r["teacher"]["model"].update(img_size=16), r"teacher.model.img_size: set by the runner"),
    (lambda r: r["teacher"]["train"].update(p_uncnd=0.1), r"teacher.train.p_uncnd: unknown argument"),
])
def test_bad_diffusion_recipes_are_refused(edit, match: str) -> None:
    r = recipe(DIFFUSION)
    edit(r)
    with pytest.raises(RecipeError, match=match):
        parse_generative_recipe(r)


def test_diffusion_rows_are_only_for_diffusion() -> None:
    r = recipe()
    r["rows"]["stylekd"]["sample"] = {"steps": 2}
    with pytest.raises(RecipeError, match="teacher_row and sample are for family 'diffusion'"):
        parse_generative_recipe(r)


def test_a_diffusion_recipe_distils_stage_one_then_progressive_from_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Progressive distillation starts from the stage-one row's model (teacher_row), with the recipe's args; its
    student is sampled in start_steps / 2 ** rounds steps; a resume of that row alone re-runs stage one first."""
    seen: dict[str, Any] = {}
    infos = {n: gr.strategy_info(n) for n in ("guided_diffusion_distill", "progressive_distill")}

    def spy_for(name: str) -> Any:
        @functools.wraps(infos[name].fn)
        def spy(*a: Any, **k: Any) -> Any:
            res = infos[name].fn(*a, **k)
            seen.setdefault(name, []).append((k, res.model))
            return res
        return spy

    monkeypatch.setattr(gr, "strategy_info", lambda n: dataclasses.replace(infos[n], fn=spy_for(n)))
    folder = run_generative_recipe(parse_generative_recipe(recipe(DIFFUSION)), out_dir=tmp_path, progress=False)
    (gk, guided_model), = seen["guided_diffusion_distill"]
    (pk, _), = seen["progressive_distill"]
    assert pk["teacher"] is guided_model and (pk["start_steps"], pk["rounds"], pk["steps_per_round"]) == (4, 1, 2)
    assert gk["w_max"] == 3.0 and gk["steps"] == 2 and gk["teacher"] is not guided_model
    results = json.loads((folder / "results.json").read_text())
    rows = results["rows"]
    assert [rows[r]["seeds"]["2"]["steps"] for r in ("teacher_2", "guided", "progressive")] == [2, 4, 2]
    assert all(0 < rows[r]["seeds"]["2"]["psnr_to_teacher"] < 60 for r in rows)  # finite: not the reference itself
    assert results["teacher"]["2"]["steps"] == 4 and "psnr_to_teacher" not in results["teacher"]["2"]
    seen.clear()
    run_generative_recipe(parse_generative_recipe(recipe(DIFFUSION)), out_dir=tmp_path, progress=False,
                          rows=["progressive"])
    assert len(seen["guided_diffusion_distill"]) == 1 and len(seen["progressive_distill"]) == 1
    again = json.loads((folder / "results.json").read_text())["rows"]
    assert again["progressive"]["seeds"]["2"]["fid"] == pytest.approx(rows["progressive"]["seeds"]["2"]["fid"],  # float noise
                                                                       rel=1e-3)


# ------------------------------------------------------------------------------------------- light field (R2L)

LIGHTFIELD: dict[str, Any] = {
    "name": "lf",
    "kind": "generative",
    "family": "lightfield",
    "scene": {"scene": 3, "views": 4, "test_views": 2, "size": 8},
    "teacher": {"model": {"width": 16, "depth": 2}, "train": {"steps": 3, "batch_rays": 32, "num_samples": 8}},
    "student": {"num_points": 4, "num_freqs": 2, "width": 16, "depth": 4},
    "rows": {
        "real_only": {"baseline": "train_nelf", "args": {"steps": 3, "batch_rays": 32}},
        "r2l": {"strategy": "r2l", "args": {"num_samples": 8, "pseudo_images": 2, "distill_steps": 3,
                                            "finetune_steps": 2, "batch_rays": 32, "lr": 7e-4}},
    },
    "seeds": [1],
    "threads": 1,
}


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.pop("scene"), r"scene: family 'lightfield' reads a scene"),
    (lambda r: r["rows"]["r2l"]["args"].update(teacher_steps=10), r"rows.r2l.args.teacher_steps: set by the runner"),
    (lambda r: r["rows"]["r2l"]["args"].update(pseudo=10), r"rows.r2l.args.pseudo: unknown argument of r2l"),
    (lambda r: r["rows"]["real_only"]["args"].update(rays=1), r"rows.real_only.args.rays: set by the runner"),
    (lambda r: r["student"].update(near=1.0), r"student.near: set by the runner"),
    (lambda r: r["teacher"]["model"].update(widht=3), r"teacher.model.widht: unknown argument of NeRF"),
    (lambda r: r.update(discriminator={"width": 4}), r"do not apply to family 'lightfield'"),
])
def test_bad_lightfield_recipes_are_refused(edit, match: str) -> None:
    r = recipe(LIGHTFIELD)
    edit(r)
    with pytest.raises(RecipeError, match=match):
        parse_generative_recipe(r)


def test_a_lightfield_recipe_runs_r2l_against_the_real_views_baseline(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline row is train_nelf on the training views' rays, written out by hand here (same seeds); the r2l
    row receives the recipe's args and the teacher trained on the same views."""
    from distill.data.lightfield import make_scene, make_views
    from distill.models.nerf import NeLF
    from distill.strategies.r2l import evaluate_views, train_nelf

    seen: dict[str, Any] = {}
    info = gr.strategy_info("r2l")

    @functools.wraps(info.fn)
    def spy(*a: Any, **k: Any) -> Any:
        seen.update(k)
        return info.fn(*a, **k)

    monkeypatch.setattr(gr, "strategy_info", lambda n: dataclasses.replace(info, fn=spy))
    folder = run_generative_recipe(parse_generative_recipe(recipe(LIGHTFIELD)), out_dir=tmp_path, progress=False)
    results = json.loads((folder / "results.json").read_text())
    assert (seen["pseudo_images"], seen["distill_steps"], seen["finetune_steps"], seen["lr"], seen["seed"]) == \
        (2, 3, 2, 7e-4, 1)
    scene = make_scene(3)
    train = make_views(scene, 4, H=8, W=8, seed=1)
    test = make_views(scene, 2, H=8, W=8, seed=1001)
    torch.manual_seed(1001)
    student = NeLF(train.near, train.far, num_points=4, num_freqs=2, width=16, depth=4)
    o, d, colors = train.rays()
    train_nelf(student, torch.cat([o, d], -1), colors, steps=3, batch_rays=32, seed=1, progress=False)
    got = results["rows"]["real_only"]["seeds"]["1"]
    assert got["psnr"] == pytest.approx(evaluate_views(student, test)["psnr"], rel=1e-6)
    assert got["macs_ratio"] == pytest.approx(student.macs_per_ray() / (seen["teacher"].macs_per_point() * 8))
    assert "r2l" in results["rows"] and "test-view PSNR" in (folder / "report.md").read_text()
