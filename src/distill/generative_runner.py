"""Generative recipes (``kind: generative``): a generative teacher trained here (or loaded), then one row per
generator to compare, each a registered generative strategy or the baseline it is measured against, then the
rows' measures with the library's evaluators.

``distill run recipes/generative/mnist_stylekd.yaml`` does, for each seed ``s`` of ``seeds``:

1. the data: ``data.train_subset`` training images of ``data.name`` (MNIST or Fashion-MNIST, local files) and
   ``data.eval_size`` held-out test images; the FID/KID extractor
   (:func:`distill.train.generative_eval.train_feature_net` with ``feature_net.epochs`` / ``seed``, cached;
   it is named in the results);
2. the teacher, loaded from ``teacher.checkpoint`` (:func:`distill.train.checkpoint.load_model`: no code
   runs) or trained here and saved as ``OUT/NAME/seed<s>/teacher.safetensors``. Per ``family``:

   * ``stylegan``: an unconditional :class:`~distill.models.stylegan.StyleGenerator` (``teacher.model``, its
     keyword arguments) trained by :func:`distill.strategies.gan.train_gan` (``teacher.train``, its keyword
     arguments) against a :class:`~distill.models.stylegan.StyleDiscriminator` (``discriminator``); the
     teacher is its EMA generator;
   * ``darkgan``: a classifier, the LeNet of :func:`~distill.train.generative_eval.train_feature_net`
     (``teacher.train``: ``epochs``, ``batch_size``, ``lr``) trained on the whole training split (cached) with
     seed ``s + 1`` (so that it is never the FID extractor of seed 0), its logits read by DarkGAN;

3. each row of ``rows``, with the student generator built with seed ``1000 + s`` and its discriminator with
   ``2000 + s`` (the same initial weights for every row of a seed): ``{strategy: NAME, args: {...}}`` calls the
   registered strategy (``stylekd`` for ``stylegan``; ``darkgan`` for ``darkgan``: its ``conditioning: none``
   row is the plain GAN), ``{baseline: train_gan, args: {...}}`` trains the same student as a plain GAN from
   scratch (``stylegan``). ``args`` are the function's own keyword arguments, checked against its signature
   and annotations before anything trains (a mapping becomes the annotated dataclass, e.g. stylekd's
   ``weights: {l1: 3, perceptual: 3, relation: 30}`` → :class:`~distill.strategies.stylekd.StyleKDWeights`);
   the runner sets the models, data, feature net, seed and progress. The row's EMA generator is saved as
   ``OUT/NAME/seed<s>/<row>.safetensors``;
4. the measures, written to ``OUT/NAME/results.json`` after each row (``--resume`` skips finished rows) and,
   at the end, ``report.md`` (mean ± std over the seeds):

   * ``stylegan``: FID and KID of ``eval_size`` samples (EMA generator, latents drawn with seed ``1000 + s``,
     no truncation) against as many test images, and the L1 distance to the teacher's image of the same
     latent (StyleKD's output consistency);
   * ``darkgan``: :func:`distill.strategies.darkgan.darkgan_evaluate`: one image per held-out test image's
     soft label (the ``onehot`` row gets its top-1 class one-hot, the ``none`` row nothing), judged by the
     teacher (KL of the soft label to the teacher's tempered prediction on the image, top-1 agreement), and
     FID/KID against the held-out images.

Three more families (the same validation, run folder and report):

* ``self_distilled_stylegan`` (no teacher: the GAN filters its own data): the data are
  :func:`distill.data.contaminated.contaminated_mnist` (``train_subset`` images, ``data.outlier_fraction`` of them
  Fashion-MNIST, drawn with seed ``s``); rows ``{strategy: self_distilled_stylegan}`` (measured: its filtered
  GAN's EMA) and ``{baseline: train_gan}`` (the raw GAN on the contaminated set); measures the filtering's outlier
  precision / recall (:func:`~distill.functional.gan_truncation.removal_precision_recall`), the share kept, FID/KID
  of ``eval_size`` samples against clean MNIST test images. Images are scored by pixel MSE (the runner passes no
  ``feature_net``: the LeNet stays the judge only), as ``benchmarks/generative_stylegan.py`` does;
* ``stylegan2_distillation``: the teacher GAN is :func:`~distill.strategies.stylegan2_distillation.teacher_gan`
  (``teacher.train``: its arguments; ``dataset`` is ``data.name``, cached by it too, and saved in the run folder);
  the LeNet extractor is also the attribute classifier (as ``benchmarks/generative_img2img.py``); the student is
  :func:`~distill.models.img2img.unet_img2img` (``student``); the real images are the first ``eval_size`` test
  images of the row's ``source_class``; measures the strategy's own: PSNR to the teacher's edit (and of the
  unedited source), the target-class share on the teacher's edits, the student's edits and the sources, on real
  images edited and unedited, FID/KID of the student's edits against the teacher's, the share of latents giving a
  pair;
* ``img2img``: pairs of :func:`distill.data.img2img.img2img_pairs` (``data.task``, default ``edges2image``;
  ``train_subset`` / ``eval_size`` pairs of a seed-0 permutation of the train / test split); the teacher a
  :func:`~distill.models.img2img.unet_img2img` (``teacher.model``) trained by
  :func:`~distill.strategies.img2img.train_img2img` (``teacher.train``) or loaded; rows
  ``{baseline: train_img2img, args: {kd: null | wavelet | l1, kd_weight: ...}}`` (``wavelet``: the ``wavelet_kd``
  method; the teacher is passed only when ``kd`` is set); measures test PSNR and L1 (no FID extractor is trained).

FID/KID use the LeNet extractor, not Inception (no weights can be downloaded): numbers compare the rows of
one report, never published values. The run folder follows :mod:`distill.recipe_runs` (one writer, one
version of a recipe, ``--resume`` / ``--overwrite`` / ``--rows``).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.nn import functional as F

from distill.files import atomic_write_text
from distill.models.stylegan import StyleDiscriminator, StyleGenerator
from distill.recipe_runs import (
    check_row_name,
    check_seeds,
    check_strategy_arg_names,
    load_weights,
    mean_std,
    recipe_kind,
    recipe_run,
    rows_to_run,
)
from distill.recipes import RecipeError, _Strict, read_recipe_file, validate_schema
from distill.data.contaminated import contaminated_mnist
from distill.data.img2img import img2img_pairs
from distill.data.lightfield import make_scene, make_views
from distill.functional.gan_truncation import removal_precision_recall
from distill.models.img2img import unet_img2img
from distill.models.stylegan import stylegan_mnist
from distill.integrations.diffusers import build_unet
from distill.models.nerf import NeLF, NeRF
from distill.strategies.darkgan import AuxDiscriminator, darkgan_evaluate, teacher_soft_labels
from distill.strategies.diffusion_distill import diffusion_images, sample_diffusion, train_diffusion_teacher
from distill.strategies.gan import train_gan
from distill.strategies.img2img import evaluate_img2img, train_img2img
from distill.strategies.r2l import evaluate_views, train_nelf, train_nerf
from distill.strategies.registry import list_strategies, strategy_info
from distill.strategies.stylegan2_distillation import teacher_gan
from distill.train.checkpoint import save_model
from distill.train.generative_eval import FeatureNet, fid_kid, psnr, train_feature_net

__all__ = ["FAMILIES", "GenerativeRecipe", "is_generative_recipe", "load_generative_recipe", "parse_generative_recipe",
           "run_generative_recipe"]

console = Console()


@dataclasses.dataclass(frozen=True)
class Family:
    """What a recipe ``family`` allows: its strategies and baselines (name -> function), the arguments the runner
    passes them itself, the teacher's trainer and the arguments it sets, and the models' keyword arguments it
    sets (``c_dim`` follows the conditioning)."""

    strategies: tuple[str, ...]
    baselines: dict[str, Callable[..., Any]]
    own_args: tuple[str, ...]
    teacher_trainer: Callable[..., Any] | None  # None: the family has no teacher (self-distillation)
    teacher_own: tuple[str, ...]
    teacher_model: Callable[..., Any] | None  # what ``teacher.model`` holds the keyword arguments of (None: nothing)
    measures: tuple[str, ...]  # the report's columns, in order


FAMILIES: dict[str, Family] = {
    "stylegan": Family(
        strategies=("stylekd",), baselines={"train_gan": train_gan},
        own_args=("student", "train_loader", "val_loader", "teacher", "images", "discriminator", "feature_net",
                  "checkpoint", "progress", "seed", "generator", "labels"),
        teacher_trainer=train_gan, teacher_own=("generator", "discriminator", "images", "labels", "checkpoint",
                                                "progress", "seed"),
        teacher_model=StyleGenerator, measures=("fid", "kid", "l1_to_teacher")),
    "darkgan": Family(
        strategies=("darkgan",), baselines={},
        own_args=("student", "train_loader", "val_loader", "teacher", "images", "discriminator", "labels",
                  "checkpoint", "progress", "seed"),
        teacher_trainer=train_feature_net, teacher_own=("dataset", "seed", "cache_dir", "images", "labels", "progress"),
        teacher_model=None, measures=("kl", "top1", "fid", "kid")),
    "diffusion": Family(
        strategies=("guided_diffusion_distill", "progressive_distill"), baselines={"teacher": sample_diffusion},
        own_args=("student", "train_loader", "val_loader", "teacher", "images", "labels", "seed", "progress", "run_dir",
                  "model", "image_shape"),
        teacher_trainer=train_diffusion_teacher, teacher_own=("model", "images", "labels", "train_loader", "seed",
                                                              "progress", "checkpoint"),
        teacher_model=build_unet, measures=("steps", "fid", "kid", "psnr_to_teacher")),
    "lightfield": Family(
        strategies=("r2l",), baselines={"train_nelf": train_nelf},
        own_args=("student", "train_views", "test_views", "teacher", "teacher_steps", "rays", "colors", "seed",
                  "progress", "desc"),
        teacher_trainer=train_nerf, teacher_own=("teacher", "views", "seed", "progress"),
        teacher_model=NeRF, measures=("psnr", "macs_ratio")),
    # the raw GAN (train_gan on the contaminated set) against the strategy's GAN on the filtered set
    "self_distilled_stylegan": Family(
        strategies=("self_distilled_stylegan",), baselines={"train_gan": train_gan},
        own_args=("student", "train_loader", "val_loader", "discriminator", "images", "feature_net", "checkpoint",
                  "progress", "seed", "generator", "labels"),
        teacher_trainer=None, teacher_own=(), teacher_model=None,
        measures=("outlier_precision", "outlier_recall", "kept", "fid", "kid")),
    # a teacher GAN's latent edit distilled into an image-to-image U-Net; the LeNet is classifier and extractor
    "stylegan2_distillation": Family(
        strategies=("stylegan2_distillation",), baselines={},
        own_args=("student", "train_loader", "val_loader", "teacher", "classifier", "feature_net", "real_images",
                  "seed", "progress"),
        teacher_trainer=teacher_gan, teacher_own=("dataset", "seed", "progress"), teacher_model=None,
        measures=("psnr_to_edit", "psnr_identity", "edit_rate", "edit_rate_teacher", "edit_rate_source",
                  "real_edit_rate", "real_base_rate", "fid", "kid", "keep_rate")),
    # pix2pix students from scratch, + Wavelet KD, + output L1 KD (train_img2img's kd / kd_weight)
    "img2img": Family(
        strategies=(), baselines={"train_img2img": train_img2img},
        own_args=("generator", "source", "target", "teacher", "val", "eval_every", "seed", "progress"),
        teacher_trainer=train_img2img, teacher_own=("generator", "source", "target", "teacher", "kd", "kd_weight",
                                                    "wavelet_levels", "val", "eval_every", "seed", "progress"),
        teacher_model=unet_img2img, measures=("psnr_test", "l1_test")),
}
IMG2IMG_OWN = ("channels", "out_channels")  # the U-Nets' channels follow the data
# sample_diffusion's arguments the runner sets (a ``sample`` mapping or a ``teacher`` baseline row may set the rest)
SAMPLER_OWN = ("model", "labels", "image_shape", "seed", "batch_size", "progress")
UNET_OWN = ("img_size", "channels", "num_classes", "w_conditioned")
# what the report says each measure is (and which way is better)
MEASURES = {"psnr": "test-view PSNR (dB) ↑", "macs_ratio": "MACs per ray ÷ teacher's ↓", "steps": "sampling steps", "psnr_to_teacher": "PSNR to teacher's samples (dB) ↑", "fid": "FID ↓", "kid": "KID ×1000 ↓", "l1_to_teacher": "L1 to teacher (same z) ↓",
            "kl": "teacher KL(c ‖ t(G(z, c))/T) ↓", "top1": "teacher top-1 agreement ↑",
            "outlier_precision": "outlier precision of the removed ↑", "outlier_recall": "outlier recall ↑",
            "kept": "share kept", "psnr_to_edit": "PSNR to teacher's edit (dB) ↑",
            "psnr_identity": "PSNR of the unedited source (dB)", "edit_rate": "target share, student's edits ↑",
            "edit_rate_teacher": "target share, teacher's edits", "edit_rate_source": "target share, sources",
            "real_edit_rate": "target share, student's edits of real images ↑",
            "real_base_rate": "target share, real images unedited", "keep_rate": "latents giving a pair",
            "psnr_test": "test PSNR (dB) ↑", "l1_test": "test L1 ↓"}
SCALE = {"kid": 1000.0}
DIGITS = {"kl": 4, "l1_to_teacher": 4, "top1": 3, "steps": 0, "outlier_precision": 3, "outlier_recall": 3, "kept": 3,
          "edit_rate": 3, "edit_rate_teacher": 3, "edit_rate_source": 3, "real_edit_rate": 3, "real_base_rate": 3,
          "keep_rate": 3, "l1_test": 4}
# string arguments whose values are known before anything runs (else they would fail after other rows trained)
CHOICES = {("darkgan", "conditioning"): ("soft", "onehot", "none"), ("darkgan", "form"): ("softmax", "sigmoid"),
           ("stylekd", "relation_form"): ("kl", "mse"), ("train_img2img", "kd"): (None, "wavelet", "l1"),
           ("stylegan2_distillation", "direction_method"): ("mean_diff", "logistic")}
GENERATOR_OWN = ("c_dim",)  # set from the conditioning
NEW_FAMILIES = ("self_distilled_stylegan", "stylegan2_distillation", "img2img")
DISCRIMINATOR_OWN = ("c_dim",)


class GenDataSpec(_Strict):
    """Real images: ``train_subset`` training images (the GANs' data) and ``eval_size`` test images."""

    name: Literal["mnist", "fashion_mnist"] = "mnist"
    train_subset: int = Field(5000, gt=1, description="the first N training images")
    eval_size: int = Field(500, gt=1, description="held-out test images: FID/KID reference, DarkGAN's soft labels")
    size: int | None = Field(None, gt=3, description="diffusion only: the size the models work at (area-resized; "
                                                     "default 16); samples are resized back to 28 px for FID/KID")
    outlier_fraction: float | None = Field(None, ge=0, lt=1, description="self_distilled_stylegan only: the share "
                                           "of Fashion-MNIST outliers among the train_subset images (default 0.1)")
    task: Literal["edges2image", "thicken"] | None = Field(None, description="img2img only: the pairs' task "
                                                                             "(default edges2image)")


class FeatureNetSpec(_Strict):
    """The FID/KID extractor (:func:`~distill.train.generative_eval.train_feature_net`)."""

    epochs: int = Field(2, gt=0)
    seed: int = 0
    train_subset: int | None = Field(None, gt=1, description="the LeNets (this extractor, DarkGAN's teacher) train on "
                                                              "the first N training images only (not cached; for "
                                                              "tests). None: the whole split, cached")


class SceneSpec(_Strict):
    """Family ``lightfield``: an analytic scene (:func:`distill.data.lightfield.make_scene`) and its views."""

    scene: int | None = Field(None, description="the scene's seed; None: each run seed draws its own scene")
    views: int = Field(30, gt=0, description="training views (the real views)")
    test_views: int = Field(5, gt=0, description="held-out views (drawn with seed + 1000): the PSNR's")
    size: int = Field(32, gt=3, description="views are size x size pixels")


class GenTeacherSpec(_Strict):
    model: dict[str, Any] = Field(default_factory=dict, description="stylegan: StyleGenerator keyword arguments")
    checkpoint: str | None = Field(None, description="weights saved by distill.train.checkpoint.save_model "
                                                     "(else trained here)")
    train: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the teacher's trainer")
    sample: dict[str, Any] = Field(default_factory=dict, description="diffusion only: sample_diffusion arguments of "
                                                                     "the teacher's reference samples (steps, w)")


class GenRow(_Strict):
    """One row: ``{strategy: NAME, args}`` or ``{baseline: NAME, args}``."""

    strategy: str | None = None
    baseline: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    teacher_row: str | None = Field(None, description="diffusion only: an earlier row whose model is this row's "
                                                      "teacher (progressive distillation of the stage-one student)")
    sample: dict[str, Any] = Field(default_factory=dict, description="diffusion only: sample_diffusion arguments of "
                                                                     "the row's samples (steps: default its own)")

    @model_validator(mode="after")
    def _one(self) -> GenRow:
        if (self.strategy is None) == (self.baseline is None):
            raise ValueError("a row names exactly one of strategy (a registered generative strategy) or baseline")
        return self


class GenerativeRecipe(_Strict):
    """A generative distillation recipe; see the module docstring."""

    name: str
    kind: Literal["generative"]
    family: Literal["stylegan", "darkgan", "diffusion", "lightfield", "self_distilled_stylegan",
                    "stylegan2_distillation", "img2img"]
    data: GenDataSpec = Field(default_factory=GenDataSpec)
    scene: SceneSpec | None = Field(None, description="family lightfield: the scene (instead of data)")
    feature_net: FeatureNetSpec = Field(default_factory=FeatureNetSpec)
    teacher: GenTeacherSpec = Field(default_factory=GenTeacherSpec)
    student: dict[str, Any] = Field(default_factory=dict, description="StyleGenerator keyword arguments")
    discriminator: dict[str, Any] = Field(default_factory=dict, description="StyleDiscriminator keyword arguments")
    rows: dict[str, GenRow] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    threads: int | None = Field(None, gt=0)
    output_dir: str = "runs"

    @field_validator("rows")
    @classmethod
    def _row_names(cls, rows: dict[str, GenRow]) -> dict[str, GenRow]:
        for row in rows:
            check_row_name(row)
        return rows

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        return check_seeds(seeds)


def is_generative_recipe(path: str | Path) -> bool:
    """Whether the YAML file at ``path`` is a generative recipe (``kind: generative``)."""
    return recipe_kind(path) == "generative"


# ------------------------------------------------------------------------------------------ validation

def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: names are still checked, values at call time
        return {}


def _convert(where: str, fn: Callable[..., Any], args: dict[str, Any]) -> dict[str, Any]:
    """``args`` validated against ``fn``'s annotations and converted (a mapping to the annotated dataclass, a
    list to a tuple); a :class:`RecipeError` names the argument and what was expected."""
    hints, out = _hints(fn), {}
    for key, value in args.items():
        hint = hints.get(key)
        if hint is None:
            out[key] = value
            continue
        try:
            out[key] = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True, extra="forbid")
                                   ).validate_python(value)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or key}: {err['msg']}" for err in e.errors())
            raise RecipeError(f"{where}.{key}: {value!r} is not a valid {hint} ({problems})") from None
        except Exception as e:  # a type pydantic cannot check (a callable...): a recipe cannot give one
            raise RecipeError(f"{where}.{key}: a recipe cannot give this argument ({hint}): {e}") from None
    return out


def _check_kwargs(where: str, cls: Callable[..., Any], kwargs: dict[str, Any], own: tuple[str, ...]) -> None:
    params = inspect.signature(cls).parameters
    for key in kwargs:
        if key in own or key not in params:
            allowed = sorted(p for p in params if p not in own and p != "self")
            raise RecipeError(f"{where}.{key}: {'set by the runner' if key in own else 'unknown argument'} of "
                              f"{getattr(cls, '__name__', cls)} (it takes {allowed})")
    _convert(where, cls.__init__ if inspect.isclass(cls) else cls, kwargs)


def row_function(family: str, row: GenRow) -> tuple[str, Callable[..., Any]]:
    """The name and function a row calls: its registered strategy or the family's baseline."""
    if row.strategy is not None:
        return row.strategy, strategy_info(row.strategy).fn
    return str(row.baseline), FAMILIES[family].baselines[str(row.baseline)]


def row_args(family: str, name: str, row: GenRow) -> dict[str, Any]:
    """A row's ``args`` converted to what its function takes (dataclasses, tuples)."""
    return _convert(f"rows.{name}.args", row_function(family, row)[1], row.args)


def _check_row(recipe: GenerativeRecipe, name: str, row: GenRow) -> None:
    fam = FAMILIES[recipe.family]
    generative = {i.name for i in list_strategies("generative")}
    if row.strategy is not None and row.strategy not in fam.strategies:
        what = "a generative strategy of another family" if row.strategy in generative else "not a generative strategy"
        raise RecipeError(f"rows.{name}.strategy: {row.strategy!r} is {what} (family {recipe.family!r} runs "
                          f"{list(fam.strategies)}; generative strategies: {sorted(generative)})")
    if row.baseline is not None and row.baseline not in fam.baselines:
        known = sorted(fam.baselines) or "none: its baseline is a strategy row with the method off (darkgan: conditioning: none)"
        raise RecipeError(f"rows.{name}.baseline: {row.baseline!r} is not a baseline of family {recipe.family!r} "
                          f"(baselines: {known})")
    fn_name, fn = row_function(recipe.family, row)
    check_strategy_arg_names(f"rows.{name}.args", fn_name, fn, row.args, fam.own_args)
    # a required argument the runner does not set must be in the recipe
    missing = [p for p, v in inspect.signature(fn).parameters.items() if v.default is inspect.Parameter.empty
               and v.kind == inspect.Parameter.KEYWORD_ONLY and p not in fam.own_args and p not in row.args]
    if missing:
        raise RecipeError(f"rows.{name}.args: {fn_name} needs {missing} (the runner does not set them)")
    row_args(recipe.family, name, row)
    for key, value in row.args.items():
        allowed = CHOICES.get((fn_name, key))
        if allowed is not None and value not in allowed:
            raise RecipeError(f"rows.{name}.args.{key}: {value!r} is not one of {list(allowed)}")
    if recipe.family != "diffusion" and (row.teacher_row or row.sample):
        raise RecipeError(f"rows.{name}: teacher_row and sample are for family 'diffusion'")
    if row.teacher_row is not None:
        names = list(recipe.rows)
        earlier = names[:names.index(name)]
        if row.teacher_row not in earlier or recipe.rows[row.teacher_row].strategy is None:
            raise RecipeError(f"rows.{name}.teacher_row: {row.teacher_row!r} is not an earlier strategy row "
                              f"(earlier strategy rows: {[r for r in earlier if recipe.rows[r].strategy]})")
    if row.sample:
        check_strategy_arg_names(f"rows.{name}.sample", "sample_diffusion", sample_diffusion, row.sample, SAMPLER_OWN)
        _convert(f"rows.{name}.sample", sample_diffusion, row.sample)
    if recipe.family == "diffusion" and row.baseline is not None and "steps" not in row.args:
        raise RecipeError(f"rows.{name}.args: the teacher baseline needs steps (its sampling steps)")
    if row.args.get("keep_fraction") is not None and not 0 < float(row.args["keep_fraction"]) <= 1:
        raise RecipeError(f"rows.{name}.args.keep_fraction: must be in (0, 1], got {row.args['keep_fraction']!r}")
    for key in ("steps", "batch_size", "train_pairs", "test_pairs", "direction_samples", "projection_steps",
                "num_clusters", "cluster_samples"):
        if key in row.args and (isinstance(row.args[key], bool) or not isinstance(row.args[key], int)
                                or row.args[key] < 1):
            raise RecipeError(f"rows.{name}.args.{key}: must be a positive int, got {row.args[key]!r}")


def parse_generative_recipe(data: Any, source: str = "recipe") -> GenerativeRecipe:
    """Validate a generative recipe mapping: the schema, the models' keyword arguments, each row's strategy or
    baseline and its arguments (names and values), the teacher's trainer arguments, before anything is loaded or
    trained; a :class:`~distill.recipes.RecipeError` names the bad key and what was expected."""
    recipe = validate_schema(GenerativeRecipe, data, source)
    fam = FAMILIES[recipe.family]
    try:
        if fam.teacher_model is not None:
            _check_kwargs("teacher.model", fam.teacher_model, recipe.teacher.model,
                          UNET_OWN if recipe.family == "diffusion" else GENERATOR_OWN)
        elif recipe.teacher.model:
            what = {"darkgan": "trains its own teacher (a LeNet classifier)",
                    "self_distilled_stylegan": "has no teacher (the GAN filters its own data)",
                    "stylegan2_distillation": "trains its teacher with teacher_gan (its arguments go in teacher.train)"}
            raise RecipeError(f"teacher.model: family {recipe.family!r} {what[recipe.family]}; give none")
        if fam.teacher_trainer is None and (recipe.teacher.train or recipe.teacher.checkpoint):
            raise RecipeError(f"teacher: family {recipe.family!r} has no teacher; give no teacher.train or checkpoint")
        if recipe.data.outlier_fraction is not None and recipe.family != "self_distilled_stylegan":
            raise RecipeError("data.outlier_fraction is for family 'self_distilled_stylegan'")
        if recipe.data.task is not None and recipe.family != "img2img":
            raise RecipeError("data.task is for family 'img2img'")
        if (recipe.family == "lightfield") != (recipe.scene is not None):
            raise RecipeError("scene: family 'lightfield' reads a scene (and no data), the other families none")
        if recipe.family == "lightfield":
            if recipe.discriminator or recipe.data != GenDataSpec() or recipe.teacher.sample:
                raise RecipeError("discriminator, data and teacher.sample do not apply to family 'lightfield'")
            _check_kwargs("student", NeLF, recipe.student, ("near", "far"))
        elif recipe.family == "diffusion":
            if recipe.student or recipe.discriminator:
                raise RecipeError("student / discriminator: family 'diffusion' distils copies of the teacher's UNet "
                                  "(its strategies build the student); give none")
            check_strategy_arg_names("teacher.sample", "sample_diffusion", sample_diffusion, recipe.teacher.sample,
                                     SAMPLER_OWN)
            _convert("teacher.sample", sample_diffusion, recipe.teacher.sample)
        else:
            if recipe.data.size is not None or recipe.teacher.sample:
                raise RecipeError("data.size and teacher.sample are for family 'diffusion'")
            if recipe.family in ("stylegan2_distillation", "img2img"):
                if recipe.discriminator:
                    raise RecipeError(f"discriminator: family {recipe.family!r} trains pix2pix's PatchGAN; give none")
                _check_kwargs("student", unet_img2img, recipe.student, IMG2IMG_OWN)
            else:
                _check_kwargs("student", StyleGenerator, recipe.student, GENERATOR_OWN)
                _check_kwargs("discriminator", StyleDiscriminator, recipe.discriminator, DISCRIMINATOR_OWN)
        if fam.teacher_trainer is not None:
            check_strategy_arg_names("teacher.train", fam.teacher_trainer.__name__, fam.teacher_trainer,
                                     recipe.teacher.train, fam.teacher_own)
            _convert("teacher.train", fam.teacher_trainer, recipe.teacher.train)
        for name, row in recipe.rows.items():
            _check_row(recipe, name, row)
        if recipe.family == "darkgan" and recipe.feature_net.seed in [s + 1 for s in recipe.seeds] and \
                recipe.feature_net.epochs == recipe.teacher.train.get("epochs", 2) and \
                recipe.teacher.checkpoint is None:
            raise RecipeError(f"feature_net.seed {recipe.feature_net.seed}: the teacher of seed "
                              f"{recipe.feature_net.seed - 1} is trained with that seed; the FID extractor must be "
                              "another network (give it another seed or epochs)")
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return recipe


def load_generative_recipe(path: str | Path) -> GenerativeRecipe:
    """Read and validate a YAML generative recipe file."""
    return parse_generative_recipe(read_recipe_file(path), str(path))


# --------------------------------------------------------------------------------------------- running

class Classifier(nn.Module):
    """A :class:`~distill.train.generative_eval.FeatureNet` read as a classifier (DarkGAN's teacher):
    images ``(B, C, H, W)`` in [0, 1] -> logits ``(B, K)``."""

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.classify(x)


def load_images(name: str, split: str) -> tuple[Tensor, Tensor]:
    """``(images (N, 1, 28, 28) in [0, 1], labels (N,))`` of MNIST or Fashion-MNIST's ``split`` (local files)."""
    from distill.data.sources import _default_mnist_root, load_fashion_mnist, load_mnist

    return load_mnist(_default_mnist_root(), split) if name == "mnist" else load_fashion_mnist(split=split)


@torch.no_grad()
def generate(generator: nn.Module, n: int, seed: int, batch_size: int = 250) -> Tensor:
    """``n`` images ``(n, C, H, W)`` in [0, 1] of an unconditional generator in eval mode, latents drawn with
    ``seed`` (the same latents for every generator of one ``z_dim``). The generator's per-pixel noise is drawn
    from torch's global generator: it is seeded with ``seed`` too, inside a fork (the caller's stream is left as
    it was), so that a row's samples can be drawn again from its saved weights."""
    generator.eval()
    z = torch.randn(n, generator.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.cat([((generator(z[i:i + batch_size]).clamp(-1, 1) + 1) / 2) for i in range(0, n, batch_size)])


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _lenet(recipe: GenerativeRecipe, seed: int, progress: bool, **kwargs: Any) -> FeatureNet:
    """A LeNet of :func:`~distill.train.generative_eval.train_feature_net` (the FID/KID extractor, DarkGAN's teacher)
    on the data set's whole training split (cached), or on its first ``feature_net.train_subset`` images."""
    n = recipe.feature_net.train_subset
    if n is None:
        return train_feature_net(recipe.data.name, seed=seed, progress=progress, **kwargs)
    x, y = load_images(recipe.data.name, "train")
    return train_feature_net(recipe.data.name, seed=seed, images=x[:n], labels=y[:n], progress=progress, **kwargs)


def _feature_net(recipe: GenerativeRecipe, progress: bool) -> FeatureNet:
    return _lenet(recipe, recipe.feature_net.seed, progress, epochs=recipe.feature_net.epochs)


class _Context:
    """One seed's data, extractor and teacher, shared by its rows."""

    def __init__(self, recipe: GenerativeRecipe, seed: int, fnet: FeatureNet | None, x: Tensor, y: Tensor,
                 real: Tensor, progress: bool) -> None:
        self.recipe, self.seed, self.fnet, self.x, self.y, self.real, self.progress = (recipe, seed, fnet, x, y, real,
                                                                                       progress)
        self.teacher: nn.Module | None = None
        self.teacher_images: Tensor | None = None  # the teacher's samples, in [0, 1]: what rows are compared to
        self.models: dict[str, nn.Module] = {}  # rows' models of this seed (diffusion: a later row's teacher)
        # diffusion: the training images in [-1, 1] at the models' size, and the evaluation's class labels
        self.images = diffusion_images(x, recipe.data.size or 16) if recipe.family == "diffusion" else x
        self.eval_labels = torch.arange(len(real)) % (int(y.max()) + 1)
        self.train_views: Any = None  # lightfield: distill.data.lightfield.LightFieldViews
        self.test_views: Any = None
        self.pairs: Any = None  # img2img: (source, target, test source, test target)
        self.is_outlier: Any = None  # self_distilled_stylegan: which training images are outliers, (N,) bool
        self.test: Any = None  # stylegan2_distillation: the test split (images, labels): real images of a class

    def discriminator(self, c_dim: int = 0) -> nn.Module:
        torch.manual_seed(2000 + self.seed)
        base = StyleDiscriminator(**self.recipe.discriminator)
        return AuxDiscriminator(base, c_dim) if c_dim else base

    def student(self, c_dim: int = 0) -> nn.Module:
        torch.manual_seed(1000 + self.seed)
        return StyleGenerator(c_dim=c_dim, **self.recipe.student)


def _teacher(ctx: _Context, run_dir: Path, reuse: bool, overwrite: bool) -> tuple[nn.Module, str]:
    """The seed's teacher: loaded, reused from the run folder, or trained here (and saved)."""
    recipe, seed = ctx.recipe, ctx.seed
    spec = recipe.teacher
    torch.manual_seed(seed)
    if recipe.family == "stylegan":
        model: nn.Module = StyleGenerator(**spec.model)
    elif recipe.family == "stylegan2_distillation":  # teacher_gan's generator, for a checkpoint or the run's file
        model = stylegan_mnist(width=int(spec.train.get("width", 32)))
    elif recipe.family == "img2img":
        model = unet_img2img(channels=ctx.x.shape[1], **spec.model)
    elif recipe.family == "lightfield":
        model = NeRF(**spec.model)
    elif recipe.family == "diffusion":
        model = build_unet(img_size=ctx.images.shape[-1], channels=ctx.images.shape[1],
                           num_classes=int(ctx.y.max()) + 1, **_convert("teacher.model", build_unet, spec.model))
    else:
        model = FeatureNet(channels=ctx.x.shape[1], num_classes=int(ctx.y.max()) + 1)
    weights = run_dir / "teacher.safetensors"
    if spec.checkpoint is not None:
        load_weights(model, Path(spec.checkpoint))
        how = f"loaded from {spec.checkpoint}"
    elif weights.is_file() and reuse and not overwrite:
        load_weights(model, weights)
        how = f"reused from {weights}"
    else:
        train = row_args_teacher(recipe)
        if recipe.family == "stylegan":
            model = train_gan(model, ctx.discriminator(), ctx.x, seed=seed, progress=ctx.progress, **train).ema
            how = f"trained here (train_gan, {train.get('steps', 2000)} steps)"
        elif recipe.family == "lightfield":
            train_nerf(model, ctx.train_views, seed=seed, progress=ctx.progress, **train)
            how = f"trained here (train_nerf, {train.get('steps', 3000)} steps)"
        elif recipe.family == "diffusion":
            model = train_diffusion_teacher(model, ctx.images, ctx.y, seed=seed, progress=ctx.progress, **train).model
            how = f"trained here (train_diffusion_teacher, {train.get('steps', 3000)} steps)"
        elif recipe.family == "stylegan2_distillation":  # cached by teacher_gan under its cache_dir too
            model = teacher_gan(recipe.data.name, seed=seed, progress=ctx.progress, **train)
            how = f"trained here (teacher_gan, {train.get('steps', 1500)} steps, classes {train.get('classes', (1, 7))})"
        elif recipe.family == "img2img":
            src, tgt, vsrc, vtgt = ctx.pairs
            train_img2img(model, src, tgt, val=(vsrc, vtgt), seed=seed, progress=ctx.progress, **train)
            how = f"trained here (train_img2img, {train.get('steps', 2000)} steps)"
        else:
            model = _lenet(recipe, seed + 1, ctx.progress, **train)
            how = f"trained here (LeNet, {train.get('epochs', 2)} epochs, seed {seed + 1})"
        save_model(weights, model)
    model.eval().requires_grad_(False)
    return (Classifier(model).eval() if recipe.family == "darkgan" else model), how


def row_args_teacher(recipe: GenerativeRecipe) -> dict[str, Any]:
    """``teacher.train`` converted to what the family's trainer takes."""
    return _convert("teacher.train", FAMILIES[recipe.family].teacher_trainer, recipe.teacher.train)


def _to_eval(images: Tensor) -> Tensor:
    """Images ``(N, C, s, s)`` in [0, 1] at the diffusion models' size -> ``(N, C, 28, 28)`` for the 28-px
    extractor (bilinear)."""
    return F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)


def _fid_kid(ctx: _Context, imgs: Tensor) -> dict[str, float]:
    """FID and KID of ``imgs`` against the seed's held-out images (subsets of up to 500, 20 of them)."""
    n = len(ctx.real)
    s = fid_kid(ctx.real, imgs, ctx.fnet, kid_subset_size=min(500, n), kid_subsets=20, seed=ctx.seed)
    return {"fid": s["fid"], "kid": s["kid"]}


def _diffusion_measures(ctx: _Context, model: nn.Module, sample: dict[str, Any]) -> dict[str, Any]:
    """FID/KID of ``model``'s samples (one per evaluation label, noise of seed ``1000 + s``) at 28 px against the
    held-out images, and their PSNR to the teacher's reference samples of the same labels and noise."""
    fake = (sample_diffusion(model, ctx.eval_labels, seed=1000 + ctx.seed, batch_size=250, **sample) + 1) / 2
    out = {"steps": float(sample["steps"]), **_fid_kid(ctx, _to_eval(fake))}
    if ctx.teacher_images is None:
        ctx.teacher_images = fake
    else:
        out["psnr_to_teacher"] = psnr(fake, ctx.teacher_images)
    return out


def _teacher_samples(recipe: GenerativeRecipe) -> int:
    """The NeRF teacher's samples per ray: its training's (``teacher.train.num_samples``, default 64)."""
    return int(recipe.teacher.train.get("num_samples", 64))


def _teacher_measures(ctx: _Context) -> dict[str, Any]:
    if ctx.recipe.family == "img2img":
        return {"psnr_test": evaluate_img2img(ctx.teacher, ctx.pairs[2], ctx.pairs[3])["psnr"]}
    if ctx.recipe.family == "stylegan2_distillation":  # its edits are measured per row (the row's classes)
        return {}
    if ctx.recipe.family == "lightfield":
        return {"psnr": evaluate_views(ctx.teacher, ctx.test_views, num_samples=_teacher_samples(ctx.recipe))["psnr"]}
    n = len(ctx.real)
    if ctx.recipe.family == "diffusion":
        ctx.teacher_images = None
        return _diffusion_measures(ctx, ctx.teacher, {"steps": 16, "w": 1.0, **_convert(
            "teacher.sample", sample_diffusion, ctx.recipe.teacher.sample)})
    if ctx.recipe.family == "stylegan":
        ctx.teacher_images = generate(ctx.teacher, n, 1000 + ctx.seed)
        return _fid_kid(ctx, ctx.teacher_images)
    _, yt = load_images(ctx.recipe.data.name, "test")
    logits = teacher_soft_labels(ctx.teacher, ctx.real)[0]
    return {"test_top1": float((logits.argmax(1) == yt[:n]).float().mean())}


def _run_row(ctx: _Context, name: str, row: GenRow) -> tuple[nn.Module, dict[str, Any]]:
    """Train the row's generator and measure it; returns (its EMA generator, its measures)."""
    recipe, seed = ctx.recipe, ctx.seed
    fn_name, fn = row_function(recipe.family, row)
    args = row_args(recipe.family, name, row)
    n = len(ctx.real)
    if recipe.family in NEW_FAMILIES:
        return _run_new_row(ctx, row, fn, args)
    if recipe.family == "stylegan":
        student, disc = ctx.student(), ctx.discriminator()
        if row.baseline is not None:
            res = fn(student, disc, ctx.x, seed=seed, progress=ctx.progress, **args)
        else:
            res = fn(student, teacher=ctx.teacher, images=ctx.x, discriminator=disc, feature_net=ctx.fnet, seed=seed,
                     progress=ctx.progress, **args)
        g = res.ema
        imgs = generate(g, n, 1000 + seed)
        return g, {**_fid_kid(ctx, imgs), "l1_to_teacher": float((imgs - ctx.teacher_images).abs().mean())}
    if recipe.family == "lightfield":
        torch.manual_seed(1000 + seed)  # every row's light field starts from the same weights
        student = NeLF(ctx.train_views.near, ctx.train_views.far, **recipe.student)
        if row.baseline is not None:  # the light field on the real views alone
            o, d, colors = ctx.train_views.rays()
            fn(student, torch.cat([o, d], -1), colors, seed=seed, progress=ctx.progress, **args)
        else:
            fn(student, ctx.train_views, teacher=ctx.teacher, seed=seed, progress=ctx.progress, **args)
        teacher_macs = ctx.teacher.macs_per_ray(_teacher_samples(recipe))  # a hierarchical teacher counts both networks
        return student, {"psnr": evaluate_views(student, ctx.test_views)["psnr"],
                         "macs_ratio": student.macs_per_ray() / teacher_macs}
    if recipe.family == "diffusion":
        if row.baseline is not None:
            return ctx.teacher, _diffusion_measures(ctx, ctx.teacher, args)
        teacher = ctx.models[row.teacher_row] if row.teacher_row else ctx.teacher
        res = fn(teacher=teacher, images=ctx.images, labels=ctx.y, seed=seed, progress=ctx.progress, **args)
        sample = {"steps": res.sampling_steps, "w": 1.0, **_convert(f"rows.{name}.sample", sample_diffusion, row.sample)}
        if sample["steps"] is None:
            raise RecipeError(f"rows.{name}.sample.steps: {fn_name} returns a continuous-time model; give its "
                              "sampling steps")
        ctx.models[name] = res.model
        return res.model, _diffusion_measures(ctx, res.model, sample)
    # darkgan: the conditioning decides the generator's and discriminator's c_dim and what evaluation feeds it
    temperature = float(args.get("temperature", 3.0))
    form = str(args.get("form", "softmax"))
    _, targets = teacher_soft_labels(ctx.teacher, ctx.real, temperature, form)
    k = targets.shape[1]
    cond = str(args.get("conditioning", "soft"))
    c_dim = 0 if cond == "none" else k
    res = fn(ctx.student(c_dim), teacher=ctx.teacher, images=ctx.x, discriminator=ctx.discriminator(c_dim),
             seed=seed, progress=ctx.progress, **args)
    inputs = F.one_hot(targets.argmax(1), k).float() if cond == "onehot" else None
    ev = darkgan_evaluate(res.ema, ctx.teacher, targets, inputs=inputs, real=ctx.real, feature_net=ctx.fnet,
                          temperature=temperature, form=form, seed=1000 + seed)
    return res.ema, {"kl": ev["kl"], "top1": ev["top1"], "fid": ev["fid"], "kid": ev["kid"]}


def _run_new_row(ctx: _Context, row: GenRow, fn: Callable[..., Any], args: dict[str, Any]
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """A row of families self_distilled_stylegan, stylegan2_distillation, img2img (see the module docstring)."""
    recipe, seed = ctx.recipe, ctx.seed
    if recipe.family == "self_distilled_stylegan":
        student, disc = ctx.student(), ctx.discriminator()
        if row.baseline is not None:  # the raw GAN: the same student trained on the whole contaminated set
            g = fn(student, disc, ctx.x, seed=seed, progress=ctx.progress, **args).ema
            return g, _fid_kid(ctx, generate(g, len(ctx.real), 1000 + seed))
        res = fn(student, discriminator=disc, images=ctx.x, seed=seed, progress=ctx.progress, **args)
        g = res.filtered.ema
        pr = removal_precision_recall(res.kept, ctx.is_outlier)
        return g, {"outlier_precision": pr["precision"], "outlier_recall": pr["recall"],
                   "kept": float(res.kept.float().mean()), **_fid_kid(ctx, generate(g, len(ctx.real), 1000 + seed))}
    torch.manual_seed(1000 + seed)  # every row's student starts from the same weights
    student = unet_img2img(channels=ctx.x.shape[1], **recipe.student)
    if recipe.family == "stylegan2_distillation":
        x_test, y_test = ctx.test
        real = x_test[y_test == args["source_class"]][:recipe.data.eval_size]
        res = fn(student, teacher=ctx.teacher, classifier=ctx.fnet, feature_net=ctx.fnet, real_images=real,
                 seed=seed, progress=ctx.progress, **args)
        out = {"psnr_to_edit": res.psnr_student, "psnr_identity": res.psnr_identity, "edit_rate": res.edit_rate_student,
               "edit_rate_teacher": res.edit_rate_teacher, "edit_rate_source": res.edit_rate_source,
               "real_edit_rate": res.real_edit_rate, "real_base_rate": res.real_base_rate, "fid": res.fid_student,
               "kid": res.kid_student, "keep_rate": res.keep_rate}
        return res.student, {k: float(v) for k, v in out.items() if v is not None}
    src, tgt, vsrc, vtgt = ctx.pairs
    fn(student, src, tgt, teacher=ctx.teacher if args.get("kd") else None, val=(vsrc, vtgt), seed=seed,
       progress=ctx.progress, **args)
    m = evaluate_img2img(student, vsrc, vtgt)
    return student, {"psnr_test": m["psnr"], "l1_test": m["l1"]}


def _image_context(recipe: GenerativeRecipe, seed: int, fnet: FeatureNet | None, progress: bool) -> _Context:
    """One seed's data: ``train_subset`` training images (self_distilled_stylegan: the contaminated set of seed
    ``s``; img2img: pairs) and ``eval_size`` test images (self_distilled_stylegan: clean MNIST)."""
    d = recipe.data
    if recipe.family == "img2img":
        task = d.task or "edges2image"
        src, tgt = img2img_pairs(task, d.name, "train", limit=d.train_subset, seed=0)
        vsrc, vtgt = img2img_pairs(task, d.name, "test", limit=d.eval_size, seed=0)
        ctx = _Context(recipe, seed, fnet, src, torch.zeros(len(src), dtype=torch.long), vtgt, progress)
        ctx.pairs = (src, tgt, vsrc, vtgt)
        return ctx
    if recipe.family == "self_distilled_stylegan":
        x, is_outlier = contaminated_mnist(d.train_subset, 0.1 if d.outlier_fraction is None else d.outlier_fraction,
                                           seed=seed)
        real = load_images("mnist", "test")[0][:d.eval_size]
        ctx = _Context(recipe, seed, fnet, x, is_outlier.long(), real, progress)
        ctx.is_outlier = is_outlier
        return ctx
    test = load_images(d.name, "test")
    if recipe.family == "stylegan2_distillation":  # the teacher GAN reads its own training data (teacher_gan)
        ctx = _Context(recipe, seed, fnet, test[0][:2], test[1][:2], test[0][:d.eval_size], progress)
        ctx.test = test
        return ctx
    x_all, y_all = load_images(d.name, "train")
    return _Context(recipe, seed, fnet, x_all[:d.train_subset], y_all[:d.train_subset], test[0][:d.eval_size],
                    progress)


def _scene_context(recipe: GenerativeRecipe, seed: int, progress: bool) -> _Context:
    """Family lightfield: the scene (``scene.scene``, else the run seed), its training views (seed ``s``) and
    held-out views (seed ``s + 1000``)."""
    spec = recipe.scene
    assert spec is not None
    scene = make_scene(spec.scene if spec.scene is not None else seed)
    empty = torch.zeros(2, 1, 1, 1)
    ctx = _Context(recipe, seed, None, empty, torch.zeros(2, dtype=torch.long), empty, progress)
    ctx.train_views = make_views(scene, spec.views, H=spec.size, W=spec.size, seed=seed)
    ctx.test_views = make_views(scene, spec.test_views, H=spec.size, W=spec.size, seed=seed + 1000)
    return ctx


def _with_teacher_rows(recipe: GenerativeRecipe, todo: list[str]) -> list[str]:
    """``todo`` in recipe order, with the rows a row of it takes as its teacher (``teacher_row``), run again if
    done: their models are not saved in a form a later run can rebuild without them (a diffusion student is the
    teacher's UNet with a guidance input added by its strategy); seeded, their numbers repeat (to float noise)."""
    need = set(todo)
    for row in reversed(list(recipe.rows)):
        if row in need and recipe.rows[row].teacher_row:
            need.add(str(recipe.rows[row].teacher_row))
    return [r for r in recipe.rows if r in need]


def run_generative_recipe(recipe: GenerativeRecipe, *, out_dir: str | Path | None = None, progress: bool = True,
                          resume: bool = False, overwrite: bool = False, rows: list[str] | None = None) -> Path:
    """Run a generative recipe (see the module docstring); returns its folder ``OUT/NAME``."""
    with recipe_run(recipe, recipe.rows, out_dir=out_dir, resume=resume, overwrite=overwrite, rows=rows,
                    what="generative recipe results") as run:
        folder, teachers, results = run.folder, run.teachers, run.results

        def write() -> None:
            run.write(family=recipe.family, data=(recipe.scene or recipe.data).model_dump(mode="json", exclude_none=True))

        fnet = None
        for seed in recipe.seeds:
            todo = rows_to_run(recipe.rows, seed, results, rows, overwrite)
            if not todo:
                continue
            run_dir = folder / f"seed{seed}"
            run_dir.mkdir(exist_ok=True)
            if recipe.scene is not None:
                ctx = _scene_context(recipe, seed, progress)
            else:
                if fnet is None and recipe.family != "img2img":  # img2img measures PSNR only
                    fnet = _feature_net(recipe, progress)
                ctx = _image_context(recipe, seed, fnet, progress)
            t0 = time.perf_counter()
            if FAMILIES[recipe.family].teacher_trainer is None:
                teachers[str(seed)] = {"parameters": 0, "how": "none: the GAN filters its own training set",
                                       **({"extractor": fnet.name} if fnet else {}), "seconds": 0.0}
            else:
                ctx.teacher, how = _teacher(ctx, run_dir, str(seed) in teachers, overwrite)
                teachers[str(seed)] = {**_teacher_measures(ctx), "parameters": _parameters(ctx.teacher), "how": how,
                                       **({"extractor": fnet.name} if fnet else {}), "seconds": time.perf_counter() - t0}
            console.print(f"seed {seed}: teacher {teachers[str(seed)]['how']}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in teachers[str(seed)].items() if isinstance(v, float) and k != "seconds"))
            write()
            for row in _with_teacher_rows(recipe, todo):
                spec = recipe.rows[row]
                t1 = time.perf_counter()
                generator, measures = _run_row(ctx, row, spec)
                save_model(run_dir / f"{row}.safetensors", generator)
                entry = results.setdefault(row, {"seeds": {}})
                entry["spec"], entry["parameters"] = spec.model_dump(mode="json", exclude_none=True), _parameters(generator)
                entry["seeds"][str(seed)] = {**measures, "seconds": time.perf_counter() - t1}
                write()
                console.print(f"seed {seed}: {row}: " + ", ".join(f"{k} {v:.4g}" for k, v in measures.items()))
        write()
        atomic_write_text(folder / "report.md", report_markdown(run.summary))
        console.print(results_table(run.summary))
    return folder


# --------------------------------------------------------------------------------------------- report

def _describe(spec: dict[str, Any]) -> str:
    what = f"strategy {spec['strategy']}" if spec.get("strategy") else f"baseline {spec.get('baseline')}"
    extra = "".join(f"; {k} {spec[k]}" for k in ("teacher_row", "sample") if spec.get(k))
    return f"{what} {spec.get('args') or ''}".strip() + extra


def _cells(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    measures = FAMILIES[summary["family"]].measures
    head = ["row", "strategy / baseline", "parameters", *(MEASURES[m] for m in measures), "train s", "seeds"]
    body = []
    for row, r in summary.get("rows", {}).items():
        runs = list(r["seeds"].values())
        body.append([row, _describe(r["spec"]), f"{r['parameters']:,}",
                     *(mean_std([x[m] * SCALE.get(m, 1.0) for x in runs if m in x], DIGITS.get(m, 2)) for m in measures),
                     mean_std([x["seconds"] for x in runs], 0), str(len(runs))])
    return head, body


def report_markdown(summary: dict[str, Any]) -> str:
    """``report.md``: one row per recipe row, mean ± std over the seeds, and the teacher."""
    head, body = _cells(summary)
    fid = "fid" in FAMILIES[summary["family"]].measures
    lines = [f"# {summary['recipe']}", "", f"Family {summary['family']}, data {summary['data']}. Mean ± std over the "
             "seeds" + ("; FID/KID in the feature space of the LeNet extractor named below (compare rows of this "
                        "table only)." if fid else "."), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    t = summary.get("teacher", {})
    if t:
        runs = list(t.values())
        keys = [k for k in runs[0] if isinstance(runs[0][k], float) and k != "seconds"]
        scores = ", ".join(f"{k} {mean_std([x[k] * SCALE.get(k, 1.0) for x in runs], 3)}" for k in keys)
        lines += ["", f"Teacher: {runs[0]['parameters']:,} parameters, {runs[0]['how']}; {scores} "
                  f"({len(runs)} seed(s)).", ""]
        if "extractor" in runs[0]:
            lines += [f"FID/KID extractor: {runs[0]['extractor']}.", ""]
    return "\n".join(lines)


def results_table(summary: dict[str, Any]) -> Table:
    head, body = _cells(summary)
    table = Table(title=summary["recipe"])
    for title in head:
        table.add_column(title)
    for cells in body:
        table.add_row(*cells)
    return table
