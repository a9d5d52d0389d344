"""Generative recipes, the last three families (distill.generative_runner): self_distilled_stylegan,
stylegan2_distillation, img2img (Wavelet KD). Validation before any work, the recipe's arguments reaching the
strategy / trainer, a row's numbers against the same training and evaluation written out here, the run folder's
results.json / report.md. Tiny sizes: the numbers say the pipeline is the intended one, not how good a method is."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics", reason="FID/KID need the 'generative' extra (torchmetrics)")

from _mnist import mnist_dir  # noqa: E402

import distill.generative_runner as gr  # noqa: E402
from distill.cli import main as cli_main  # noqa: E402
from distill.data.contaminated import contaminated_mnist  # noqa: E402
from distill.generative_runner import (  # noqa: E402
    is_generative_recipe,
    load_generative_recipe,
    parse_generative_recipe,
    run_generative_recipe,
)
from distill.models.img2img import unet_img2img  # noqa: E402
from distill.recipes import RecipeError  # noqa: E402
from distill.strategies.img2img import predict_images, train_img2img  # noqa: E402
from distill.train.checkpoint import load_model  # noqa: E402


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
TINY_NET = {"epochs": 1, "seed": 0, "train_subset": 300}

SDS: dict[str, Any] = {
    "name": "sds", "kind": "generative", "family": "self_distilled_stylegan",
    "data": {"name": "mnist", "train_subset": 40, "eval_size": 20, "outlier_fraction": 0.25},
    "feature_net": TINY_NET,
    "student": {"width": 4, "min_width": 4, "mapping_layers": 2},
    "discriminator": {"width": 8, "min_width": 4},
    "rows": {
        "raw": {"baseline": "train_gan", "args": {"steps": 2, "batch_size": 8}},
        "filtered": {"strategy": "self_distilled_stylegan",
                     "args": {"steps": 2, "batch_size": 8, "keep_fraction": 0.7, "projection_steps": 2,
                              "num_clusters": 2, "cluster_samples": 8}},
    },
    "seeds": [3], "threads": 1,
}

SG2: dict[str, Any] = {
    "name": "sg2", "kind": "generative", "family": "stylegan2_distillation",
    "data": {"name": "mnist", "eval_size": 10},
    "feature_net": TINY_NET,
    "teacher": {"train": {"steps": 2, "width": 4, "limit": 64, "batch_size": 8}},
    "student": {"width": 4, "depth": 2},
    "rows": {"student": {"strategy": "stylegan2_distillation",
                         "args": {"source_class": 1, "target_class": 7, "direction_samples": 64, "top_k": 8,
                                  "confidence": 0.0, "amplitude": 1.5, "train_pairs": 8, "test_pairs": 4,
                                  "max_latents": 4096, "steps": 2, "batch_size": 4, "l1_weight": 50.0}}},
    "seeds": [3], "threads": 1,
}

I2I: dict[str, Any] = {
    "name": "i2i", "kind": "generative", "family": "img2img",
    "data": {"name": "fashion_mnist", "train_subset": 32, "eval_size": 16, "task": "edges2image"},
    "teacher": {"model": {"width": 8, "depth": 2}, "train": {"steps": 3, "batch_size": 8}},
    "student": {"width": 4, "depth": 2},
    "rows": {
        "scratch": {"baseline": "train_img2img", "args": {"steps": 2, "batch_size": 8, "lr": 1e-3}},
        "wavelet": {"baseline": "train_img2img", "args": {"kd": "wavelet", "kd_weight": 30.0, "wavelet_levels": 2,
                                                          "steps": 2, "batch_size": 8, "lr": 1e-3}},
        "l1": {"baseline": "train_img2img", "args": {"kd": "l1", "kd_weight": 7.0, "steps": 2, "batch_size": 8,
                                                     "lr": 1e-3}},
    },
    "seeds": [3], "threads": 1,
}


def recipe(base: dict[str, Any], **edits: Any) -> dict[str, Any]:
    r = copy.deepcopy(base)
    r.update(edits)
    return r


def spy_strategy(monkeypatch: pytest.MonkeyPatch, name: str, calls: list[tuple[dict[str, Any], Any]],
                 edit: Any = None) -> None:
    """Replace the registered strategy ``name`` (as the runner looks it up) by a wrapper that records its keyword
    arguments and result (``edit(result)`` instead when given)."""
    info = gr.strategy_info(name)

    @functools.wraps(info.fn)  # the runner checks the recipe's args against the strategy's signature
    def spy(*a: Any, **k: Any) -> Any:
        res = info.fn(*a, **k)
        if edit is not None:
            res = edit(res)
        calls.append((k, res))
        return res

    monkeypatch.setattr(gr, "strategy_info", lambda n: dataclasses.replace(info, fn=spy) if n == name
                        else pytest.fail(f"unexpected strategy {n}"))


# ------------------------------------------------------------------------------------------- validation

def test_shipped_recipes_of_the_three_families_validate() -> None:
    paths = {p.stem: p for p in (REPO / "recipes" / "generative").glob("*.yaml")}
    for stem, family in (("mnist_self_distilled_stylegan", "self_distilled_stylegan"),
                         ("mnist_stylegan2_distillation", "stylegan2_distillation"), ("fashion_wavelet_kd", "img2img")):
        assert is_generative_recipe(paths[stem])
        r = load_generative_recipe(paths[stem])
        assert (r.family, r.name) == (family, stem)


@pytest.mark.parametrize("base, edit, match", [
    (SDS, lambda r: r["rows"]["filtered"]["args"].update(keep_fractoin=0.5),
     r"rows.filtered.args.keep_fractoin: unknown argument of self_distilled_stylegan"),
    (SDS, lambda r: r["rows"]["filtered"]["args"].update(images=[1]), r"rows.filtered.args.images: set by the runner"),
    (SDS, lambda r: r["rows"]["filtered"]["args"].update(keep_fraction="most"), r"keep_fraction: 'most' is not a valid"),
    (SDS, lambda r: r.update(teacher={"train": {"steps": 2}}), r"has no teacher; give no teacher.train"),
    (SDS, lambda r: r.update(teacher={"model": {"width": 8}}), r"teacher.model: .* has no teacher"),
    (SDS, lambda r: r["rows"].update(x={"strategy": "stylekd"}), r"'stylekd' is a generative strategy of another"),
    (SDS, lambda r: r["data"].update(outlier_fraction=1.5), r"data.outlier_fraction"),
    (SDS, lambda r: r["rows"]["filtered"]["args"].update(keep_fraction=1.5), r"keep_fraction: must be in \(0, 1\]"),
    (SDS, lambda r: r["data"].update(task="thicken"), r"data.task is for family 'img2img'"),
    (SG2, lambda r: r["rows"]["student"]["args"].pop("target_class"), r"stylegan2_distillation needs \['target_class'\]"),
    (SG2, lambda r: r["rows"]["student"]["args"].update(classifier=1), r"rows.student.args.classifier: set by the runner"),
    (SG2, lambda r: r["rows"]["student"]["args"].update(direction_method="pca"), r"direction_method: 'pca' is not one"),
    (SG2, lambda r: r["rows"]["student"]["args"].update(train_pairs=0), r"rows.student.args.train_pairs"),
    (SG2, lambda r: r["teacher"]["train"].update(dataset="mnist"), r"teacher.train.dataset: set by the runner"),
    (SG2, lambda r: r["teacher"]["train"].update(stepz=3), r"teacher.train.stepz: unknown argument of teacher_gan"),
    (SG2, lambda r: r.update(discriminator={"width": 4}), r"discriminator: family 'stylegan2_distillation' trains"),
    (SG2, lambda r: r["data"].update(outlier_fraction=0.1), r"data.outlier_fraction is for family"),
    (I2I, lambda r: r["rows"]["wavelet"]["args"].update(kd="wavelets"), r"rows.wavelet.args.kd: 'wavelets' is not one"),
    (I2I, lambda r: r["rows"]["wavelet"]["args"].update(teacher=1), r"rows.wavelet.args.teacher: set by the runner"),
    (I2I, lambda r: r["rows"]["l1"]["args"].update(kd_weigth=3.0), r"rows.l1.args.kd_weigth: unknown argument"),
    (I2I, lambda r: r["rows"]["l1"].update(strategy="stylekd"), r"exactly one of strategy"),
    (I2I, lambda r: r["rows"].update(x={"baseline": "train_gan"}), r"'train_gan' is not a baseline of family 'img2img'"),
    (I2I, lambda r: r["student"].update(channels=3), r"student.channels: set by the runner"),
    (I2I, lambda r: r["teacher"]["model"].update(widht=8), r"teacher.model.widht: unknown argument of unet_img2img"),
    (I2I, lambda r: r["teacher"]["train"].update(kd="l1"), r"teacher.train.kd: set by the runner"),
    (I2I, lambda r: r["data"].update(task="colorize"), r"data.task"),
])
def test_bad_recipes_are_refused_before_any_work(base: dict[str, Any], edit, match: str) -> None:
    r = recipe(base)
    edit(r)
    with pytest.raises(RecipeError, match=match):
        parse_generative_recipe(r)


@pytest.mark.parametrize("base, bad", [(I2I, ("rows", "wavelet", "args", "kd_weight", "heavy")),
                                       (SG2, ("rows", "student", "args", "amplitude", "big")),
                                       (SDS, ("rows", "filtered", "args", "projection_stpes", 2))])
def test_a_bad_recipe_file_trains_nothing(base: dict[str, Any], bad: tuple[Any, ...], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    for name in ("load_images", "train_gan", "train_feature_net", "train_img2img", "teacher_gan", "img2img_pairs",
                 "contaminated_mnist"):
        monkeypatch.setattr(gr, name, lambda *a, **k: pytest.fail("work started for a bad recipe"))
    r = recipe(base)
    *keys, key, value = bad
    node = r
    for k in keys:
        node = node[k]
    node[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(r))
    assert cli_main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) != 0
    assert key in capsys.readouterr().err
    assert not (tmp_path / r["name"]).exists()


# ------------------------------------------------------------------------------------------- img2img (Wavelet KD)

@pytest.fixture(scope="module")
def i2i_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, dict[str, Any]]]]:
    calls: list[tuple[str, dict[str, Any]]] = []

    @functools.wraps(train_img2img)
    def spy(generator: Any, source: Any, target: Any, **k: Any) -> Any:
        calls.append((k.get("kd") or "none", k))
        return train_img2img(generator, source, target, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(gr.FAMILIES["img2img"].baselines, "train_img2img", spy)
        folder = run_generative_recipe(parse_generative_recipe(recipe(I2I)), out_dir=tmp_path_factory.mktemp("i2i"),
                                       progress=False)
    return folder, calls


def test_img2img_rows_get_the_recipes_kd_and_the_saved_teacher(i2i_run) -> None:
    folder, calls = i2i_run
    assert [c[0] for c in calls] == ["none", "wavelet", "l1"]
    k = {name: kw for name, kw in calls}
    assert k["none"]["teacher"] is None and (k["none"]["steps"], k["none"]["lr"], k["none"]["seed"]) == (2, 1e-3, 3)
    assert (k["wavelet"]["kd_weight"], k["wavelet"]["wavelet_levels"]) == (30.0, 2)
    assert k["l1"]["kd_weight"] == 7.0
    saved, _ = load_model(folder / "seed3" / "teacher.safetensors", unet_img2img(width=8, depth=2))
    for row in ("wavelet", "l1"):  # the teacher trained for this seed (width 8), frozen
        t = k[row]["teacher"]
        for key, v in saved.state_dict().items():
            torch.testing.assert_close(t.state_dict()[key], v, rtol=0, atol=0)
    assert k["wavelet"]["val"][0].shape == (16, 1, 28, 28)


def test_img2img_scratch_row_is_train_img2img_written_out_with_psnr_by_hand(i2i_run) -> None:
    """The scratch row: U-Net built after manual_seed(1000 + s), trained by train_img2img on the first 32 pairs of
    a seed-0 permutation, PSNR = 10 log10(1 / MSE) over every pixel of the 16 test pairs (numpy, by hand)."""
    from distill.data.img2img import img2img_pairs

    folder, _ = i2i_run
    results = json.loads((folder / "results.json").read_text())
    src, tgt = img2img_pairs("edges2image", "fashion_mnist", "train", limit=32, seed=0)
    vsrc, vtgt = img2img_pairs("edges2image", "fashion_mnist", "test", limit=16, seed=0)
    torch.manual_seed(1003)
    g = unet_img2img(width=4, depth=2)
    train_img2img(g, src, tgt, steps=2, batch_size=8, lr=1e-3, seed=3, progress=False)
    pred = predict_images(g, vsrc).double().numpy()
    mse = np.mean((pred - vtgt.double().numpy()) ** 2)
    got = results["rows"]["scratch"]["seeds"]["3"]
    assert got["psnr_test"] == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-5)
    assert got["l1_test"] == pytest.approx(np.mean(np.abs(pred - vtgt.double().numpy())), rel=1e-5)
    rows = results["rows"]
    assert rows["wavelet"]["seeds"]["3"]["psnr_test"] != got["psnr_test"]  # the KD term changed the training


def test_img2img_folder_holds_rows_report_and_teacher(i2i_run) -> None:
    folder, _ = i2i_run
    results = json.loads((folder / "results.json").read_text())
    assert list(results["rows"]) == ["scratch", "wavelet", "l1"] and results["family"] == "img2img"
    assert "train_img2img, 3 steps" in results["teacher"]["3"]["how"] and "psnr_test" in results["teacher"]["3"]
    report = (folder / "report.md").read_text()
    assert "| test PSNR (dB) ↑ | test L1 ↓ |" in report and "| wavelet | baseline train_img2img" in report
    m = results["rows"]["l1"]["seeds"]["3"]
    assert f"| {m['psnr_test']:.2f} | {m['l1_test']:.4f} |" in report
    assert (folder / "seed3" / "l1.safetensors").is_file()


# ------------------------------------------------------------------------------------------- self-distilled StyleGAN

def test_contaminated_mnist_is_the_benchmarks_construction() -> None:
    """Written out as benchmarks/generative_stylegan.py builds it: MNIST permutation, Fashion-MNIST permutation,
    shuffle of the union, one generator seeded with the seed."""
    from distill.data.sources import _default_mnist_root, load_fashion_mnist, load_mnist

    x, out = contaminated_mnist(40, 0.25, seed=7)
    g = torch.Generator().manual_seed(7)
    mnist = load_mnist(_default_mnist_root(), "train")[0]
    fashion = load_fashion_mnist(split="train")[0]
    a = mnist[torch.randperm(len(mnist), generator=g)[:30]]
    b = fashion[torch.randperm(len(fashion), generator=g)[:10]]
    perm = torch.randperm(40, generator=g)
    assert torch.equal(x, torch.cat([a, b])[perm]) and torch.equal(out, (torch.arange(40) >= 30)[perm])
    with pytest.raises(ValueError, match="outlier_fraction must be in"):
        contaminated_mnist(40, 1.0)


def test_self_distilled_stylegan_recipe_filters_and_measures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The strategy's kept mask is replaced by one chosen here (a 2-step GAN removes no outlier, where precision
    and recall would both be 0): 6 of the 10 outliers and 6 inliers removed -> precision 6 / 12, recall 6 / 10."""
    x, is_out = contaminated_mnist(40, 0.25, seed=3)
    out_idx, in_idx = torch.nonzero(is_out).flatten(), torch.nonzero(~is_out).flatten()
    kept = torch.ones(40, dtype=torch.bool)
    kept[out_idx[:6]] = False
    kept[in_idx[:6]] = False
    calls: list[tuple[dict[str, Any], Any]] = []
    spy_strategy(monkeypatch, "self_distilled_stylegan", calls, edit=lambda res: dataclasses.replace(res, kept=kept))
    folder = run_generative_recipe(parse_generative_recipe(recipe(SDS)), out_dir=tmp_path, progress=False)
    (k, res), = calls
    assert torch.equal(k["images"], x)
    assert (k["keep_fraction"], k["projection_steps"], k["num_clusters"], k["cluster_samples"], k["seed"]) == \
        (0.7, 2, 2, 8, 3)
    results = json.loads((folder / "results.json").read_text())
    got = results["rows"]["filtered"]["seeds"]["3"]
    assert (got["outlier_precision"], got["outlier_recall"]) == (pytest.approx(0.5), pytest.approx(0.6))
    assert got["kept"] == pytest.approx(28 / 40)
    assert set(results["rows"]["raw"]["seeds"]["3"]) == {"fid", "kid", "seconds"}
    assert list(results["rows"]) == ["raw", "filtered"] and "none" in results["teacher"]["3"]["how"]
    report = (folder / "report.md").read_text()
    assert "outlier precision of the removed" in report and "| raw | baseline train_gan" in report
    assert "| 0.500 | 0.600 | 0.700 |" in report


# ------------------------------------------------------------------------------------------- StyleGAN2 distillation

def test_stylegan2_distillation_recipe_passes_its_args_and_measures(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The two classes a 2-step teacher GAN's samples fall in most (by the tiny LeNet) are the edit's: with 1 -> 7
    an untrained GAN may give no sample of class 1."""
    from distill.strategies.stylegan2_distillation import (
        classify,
        sample_latents,
        teacher_gan,
    )

    r = recipe(SG2)
    r["teacher"]["train"]["cache_dir"] = str(tmp_path / "cache")
    fnet = gr._feature_net(parse_generative_recipe(r), progress=False)
    t = teacher_gan("mnist", steps=2, width=4, limit=64, batch_size=8, cache_dir=tmp_path / "cache", seed=3,
                    progress=False)
    counts = torch.bincount(classify(fnet, sample_latents(t, 64, seed=3)[1]).argmax(1), minlength=10)
    a, b = (int(c) for c in counts.argsort(descending=True)[:2])
    r["rows"]["student"]["args"].update(source_class=a, target_class=b)
    calls: list[tuple[dict[str, Any], Any]] = []
    spy_strategy(monkeypatch, "stylegan2_distillation", calls)
    folder = run_generative_recipe(parse_generative_recipe(r), out_dir=tmp_path, progress=False)
    (k, res), = calls
    assert (k["source_class"], k["target_class"], k["amplitude"], k["l1_weight"], k["train_pairs"], k["seed"]) == \
        (a, b, 1.5, 50.0, 8, 3)
    assert k["classifier"] is k["feature_net"] and k["feature_net"].name.startswith("lenet-mnist")
    for key, v in t.state_dict().items():  # the teacher GAN of this seed
        torch.testing.assert_close(k["teacher"].state_dict()[key], v, rtol=0, atol=0)
    from distill.data.sources import _default_mnist_root, load_mnist

    xt, yt = load_mnist(_default_mnist_root(), "test")  # real test images of the source class, eval_size of them
    assert torch.equal(k["real_images"], xt[yt == a][:10])
    results = json.loads((folder / "results.json").read_text())
    got = results["rows"]["student"]["seeds"]["3"]
    assert got["psnr_to_edit"] == pytest.approx(res.psnr_student) and got["psnr_identity"] == pytest.approx(
        res.psnr_identity)
    assert got["edit_rate"] == pytest.approx(res.edit_rate_student) and got["keep_rate"] == pytest.approx(res.keep_rate)
    assert got["real_base_rate"] == pytest.approx(res.real_base_rate) and got["fid"] == pytest.approx(res.fid_student)
    report = (folder / "report.md").read_text()
    assert "PSNR to teacher's edit (dB) ↑" in report and "target share, student's edits of real images" in report
    assert "teacher_gan, 2 steps" in results["teacher"]["3"]["how"]
