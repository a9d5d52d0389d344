"""YAML recipes: a serialisation of the Python API, validated with pydantic before any work.

A recipe names the data, the student, the teacher (a checkpoint, a model to train first, or an
ensemble), the losses with their hyper-parameters and the training protocol. Every key is
checked before anything runs: an unknown key, a wrong type, an unknown method or model, a
method argument it does not take, or a tap path that is not in the model is one clear error
naming the key (tap paths are resolved on the built models, before any training).
"""

from __future__ import annotations

import inspect
import math
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)


class RecipeError(ValueError):
    """A recipe that does not validate; the message lists each bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSpec(_Strict):
    """A model: ``name`` from ``distill.models.list_models()``, or an ecosystem's model spec
    (``timm:NAME``, ``torchvision:NAME``, ``hf:PATH``; :mod:`distill.integrations`), and its
    keyword arguments (``pretrained: PATH``: a local weights file for timm and torchvision)."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None  # a file written by distill.train.checkpoint.save_model

    @model_validator(mode="before")
    @classmethod
    def _student_only(cls, data: Any) -> Any:
        # a teacher (or any model but the recipe's student) starting as a copy of "its teacher" means nothing:
        # say so, rather than pydantic's bare "unknown key"
        if isinstance(data, dict) and "init_from_teacher" in data and "init_from_teacher" not in cls.model_fields:
            raise ValueError(f"init_from_teacher={data['init_from_teacher']!r}: only the recipe's 'student' can start "
                             "as a copy of its teacher's weights; remove it here")
        return data

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from distill.models import list_models

        if ":" in v:  # an ecosystem's spec: checked with its kwargs below
            return v
        if v not in list_models():
            import difflib

            close = difflib.get_close_matches(v, list_models(), n=3)
            raise ValueError(f"unknown model {v!r}" + (f"; did you mean {close}?" if close else "")
                             + f"; known: {list_models()} (or timm:NAME, torchvision:NAME, hf:PATH)")
        return v

    @model_validator(mode="after")
    def _external(self) -> ModelSpec:
        from distill.integrations import check_model_spec, is_external

        if is_external(self.name):
            try:  # prefix, package, model name and pretrained file, before any work
                check_model_spec(self.name, self.kwargs)
            except (ImportError, OSError, TypeError) as e:  # pydantic reports ValueErrors only
                raise ValueError(str(e)) from None
        return self


class StudentSpec(ModelSpec):
    """The recipe's student: a :class:`ModelSpec`, and ``init_from_teacher: true`` to start each seed's
    student as a copy of the recipe's one teacher once that teacher exists (trained in the run or
    loaded from its checkpoint): LiDAR Distillation's setting (Wei et al., ECCV 2022, arXiv 2203.14956),
    a student of the teacher's architecture initialised from its weights. The student then has the
    teacher's model ``name`` (checked here), and a state dict of the teacher's keys and shapes (checked
    on the built models, before any training: its kwargs may differ only where no weight changes shape)."""

    init_from_teacher: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> StudentSpec:
        if self.init_from_teacher and self.checkpoint is not None:
            raise ValueError(f"init_from_teacher=True and checkpoint={self.checkpoint!r} both give the student's "
                             "initial weights: keep one")
        return self


class AugmentSpec(_Strict):
    crop_padding: int = Field(0, ge=0)
    flip: bool = False
    mixup_alpha: float | None = Field(None, gt=0, description="mixup with λ ~ Beta(alpha, alpha), after crop and flip")


# the 3D scene data sets (distill.data.pointscenes) and their tasks; the options a recipe may give them
POINT_SCENE_SETS = ("lidar_scenes",)
POINT_SCENE_TASKS = ("bev", "mono3d")
POINT_SCENE_OPTIONS = ("n_scenes", "beams", "teacher_beams", "objects", "seed")


def _check_point_options(spec: DataSpec) -> None:
    """A point-scene data spec's options and keys, before any scene is made (each error names its key)."""
    unknown = sorted(set(spec.options) - set(POINT_SCENE_OPTIONS))
    if unknown:
        raise ValueError(f"data.options.{unknown[0]}: unknown option of data set {spec.name!r}; it takes "
                         f"{list(POINT_SCENE_OPTIONS)}")
    for key in ("n_scenes", "beams", "teacher_beams", "seed"):
        v = spec.options.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "seed" else 1)):
            raise ValueError(f"data.options.{key}: must be a {'non-negative' if key == 'seed' else 'positive'} "
                             f"integer (got {v!r})")
    for key in ("beams", "teacher_beams"):
        v = spec.options.get(key)
        if v is not None and 64 % v:
            raise ValueError(f"data.options.{key}: the beam count must divide 64 (64, 32, 16, 8...), got {v!r}")
    teacher_beams = spec.options.get("teacher_beams")
    if teacher_beams is not None:
        if spec.task != "bev":
            raise ValueError(f"data.options.teacher_beams: the teacher's denser scan is for task 'bev' (LiDAR "
                             f"Distillation), not {spec.task!r}: remove it")
        if teacher_beams <= spec.options.get("beams", 64):
            raise ValueError(f"data.options.teacher_beams ({teacher_beams}) must be more than data.options.beams "
                             f"({spec.options.get('beams', 64)}): the teacher sees the denser scan")
    if spec.train_subset is not None:
        raise ValueError(f"data.train_subset: data set {spec.name!r} is generated: set data.options.n_scenes instead")


class DataSpec(_Strict):
    # "synthetic": a set written by SyntheticSet.save / 'distill synth' (root: its folder)
    name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic",
                  "mnist_scenes", "fashion_scenes", "digits_scenes", "lidar_scenes"] = "digits"
    root: str | None = None
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    train_subset: int | None = Field(None, gt=0, description="use only the first N training samples")
    val_split: str = "test"
    # what batches carry as targets: class labels, or the pose-style maps of distill.data.dense.class_heatmaps
    targets: Literal["labels", "class_heatmaps"] = "labels"
    heatmap_sigma: float = Field(1.0, gt=0, description="σ (pixels) of the class_heatmaps Gaussians (else unused)")
    # what batches carry and how runs are scored: class labels and top-1; or, on the scene data sets
    # (distill.data.scenes), DenseBatches with boxes scored by mAP, or semantic masks scored by mIoU; or, on
    # lidar_scenes (distill.data.pointscenes), 3D boxes scored by BEV AP: "bev" from the LiDAR points,
    # "mono3d" from the camera (image + sparse LiDAR depth)
    task: Literal["classification", "detection", "segmentation", "bev", "mono3d"] = "classification"
    options: dict[str, Any] = Field(default_factory=dict, description="the data set's options (get_dataset kwargs: "
                                    "make_scenes' n_scenes, canvas, objects...; lidar_scenes' n_scenes, beams, "
                                    "teacher_beams, objects, seed)")

    @model_validator(mode="after")
    def _synthetic_root(self) -> DataSpec:
        if self.name == "synthetic" and self.root is None:
            raise ValueError("data 'synthetic' needs root: the folder of a synthetic set (written by 'distill synth')")
        return self

    @model_validator(mode="after")
    def _dense_task(self) -> DataSpec:
        scenes = self.name.endswith("_scenes")
        points = self.name in POINT_SCENE_SETS
        fits = self.task in (POINT_SCENE_TASKS if points else ("detection", "segmentation") if scenes
                             else ("classification",))
        if not fits:
            raise ValueError(f"task {self.task!r} does not fit data set {self.name!r}: the scene data sets "
                             "(mnist_scenes, fashion_scenes, digits_scenes) take task 'detection' or 'segmentation', "
                             f"the point scenes ({', '.join(POINT_SCENE_SETS)}) 'bev' or 'mono3d', the others "
                             "'classification'")
        if points:
            _check_point_options(self)
        if scenes:
            a = self.augment
            if a.crop_padding or a.flip or a.mixup_alpha is not None or self.targets != "labels":
                raise ValueError(f"task {self.task!r} takes no 'augment' or 'targets' (a crop or flip would have to "
                                 "move the boxes and masks): remove them")
        elif self.options:
            raise ValueError(f"data.options are for the scene data sets; data set {self.name!r} takes none")
        return self

    @model_validator(mode="after")
    def _dense_targets(self) -> DataSpec:
        if self.targets == "class_heatmaps":
            a = self.augment
            if a.crop_padding or a.flip or a.mixup_alpha is not None:
                raise ValueError("targets 'class_heatmaps' are computed once from the un-augmented images: remove "
                                 "'augment' (a crop, flip or mixup would move the digit away from its target map)")
        return self


class TrainSpec(_Strict):
    epochs: int = Field(gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["multistep", "cosine", "onecycle", "constant"] = "multistep"
    milestones: list[int] | None = None
    gamma: float = Field(0.1, gt=0)
    amp: bool | Literal["auto", "bf16", "fp16"] = "auto"
    grad_clip: float | None = Field(None, gt=0)
    deterministic: bool = False
    device: str | None = None
    # besides metrics.jsonl: "tensorboard", "mlflow" or {name: ..., options} (distill.train.loggers)
    loggers: list[str | dict[str, Any]] = Field(default_factory=list)

    @field_validator("loggers")
    @classmethod
    def _loggers(cls, v: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        from distill.train.loggers import check_loggers

        try:
            check_loggers(v, run_dir_known=True)  # a recipe always has run folders
        except (ImportError, TypeError) as e:  # pydantic reports ValueErrors only
            raise ValueError(str(e)) from None
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        from distill.teachers import parse_device

        if v is not None:
            parse_device(v, "device")  # the spelling only: whether this machine has it is checked at run start
        return v

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"milestones must be strictly increasing epochs, got {v}")
        return v


class HintStageSpec(_Strict):
    """FitNets' stage 1: train up to the guided layer with the hint loss alone; or a stage a loss
    offers (``method: ft_paraphraser`` with an ``ft`` loss: FT's paraphraser pre-training)."""

    method: str = "fitnet"
    weight: float | None = Field(None, gt=0, description="loss weight in this stage (default: the method's, or 1)")
    train: TrainSpec


class CacheSpec(_Strict):
    """A teacher-output cache (:mod:`distill.cache`): built at ``path`` on first use, checked on later ones.

    ``views``: ``augmented`` stores the teacher's outputs for the exact augmented view of each
    sample in each epoch (every seed's student then draws its augmentation with
    ``augment_seed``); ``plain`` stores them for the un-augmented inputs, once.
    """

    path: str
    views: Literal["augmented", "plain"] = "augmented"
    topk: int | None = Field(None, gt=0, description="store the k largest logits and the tail (default: all)")
    dtype: Literal["fp16", "fp32"] = "fp32"
    epochs: int | None = Field(None, gt=0, description="augmented epochs to store (default: the training epochs)")
    temperature: float | None = Field(None, gt=0, description="T of a top-k cache's exact tail (default: the losses')")
    augment_seed: int = Field(0, ge=0)
    taps: list[str] | None = None  # teacher taps to store (default: those the losses read)
    verify: Literal["open", "lazy"] = "open"


class TeacherSpec(_Strict):
    """One teacher (``model``) or an ensemble (``ensemble``), each from a checkpoint or trained first;
    ``cache`` (a path, or a :class:`CacheSpec`) reads its outputs from a teacher cache instead."""

    model: ModelSpec | None = None
    ensemble: list[ModelSpec] | None = None
    combine: Literal["probs", "logits"] = "probs"
    temperature: float = Field(1.0, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    train: TrainSpec | None = None  # train missing checkpoints first with this protocol
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # used when the teacher is trained here
    train_subset: int | None = Field(None, gt=0)  # teachers trained here see the whole training split by default
    cache: CacheSpec | None = None

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_path(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v  # `cache: PATH` is short for `cache: {path: PATH}`

    @model_validator(mode="after")
    def _one(self) -> TeacherSpec:
        if (self.model is None) == (self.ensemble is None):
            raise ValueError("give exactly one of 'model' or 'ensemble'")
        if self.ensemble is not None and len(self.ensemble) < 1:
            raise ValueError("'ensemble' needs at least one model")
        members = [self.model] if self.model is not None else list(self.ensemble or [])
        if self.train is None and any(m.checkpoint is None for m in members):
            raise ValueError("a teacher without 'checkpoint' needs 'train' (the protocol to train it first)")
        return self

    def members(self) -> list[ModelSpec]:
        return [self.model] if self.model is not None else list(self.ensemble or [])


class StrategySpec(_Strict):
    """A registered training strategy (``distill strategies``) run instead of one ``fit``.

    ``args`` are the strategy's own keyword arguments (its paper's hyper-parameters, model specs
    such as ``assistants: [{name: cnn, num_classes: 10}]``); the recipe gives the student, the
    teacher, the data and the training protocol. ``labeled``: for semi-supervised strategies,
    only the first N training samples keep their labels; the rest are given as unlabeled data.
    """

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    labeled: int | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from distill.strategies.registry import strategy_info

        try:
            strategy_info(v)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return v


# the arguments a recipe fills in for every strategy; ``args`` may not set them
STRATEGY_RESERVED = ("student", "train_loader", "val_loader", "teacher", "epochs", "run_dir", "seed", "progress",
                     "unlabeled", "unlabeled_loader", "resume")
# strategies that train on dense target maps (data.targets other than labels), and only those
DENSE_TARGET_STRATEGIES = ("okdhp",)


def validate_strategy_args(spec: StrategySpec) -> None:
    """Every ``args`` key must be a keyword the strategy takes (and not one the recipe fills in)."""
    from distill.strategies.registry import strategy_info

    params = inspect.signature(strategy_info(spec.name).fn).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    errors = []
    for key in spec.args:
        if key in STRATEGY_RESERVED:
            errors.append(f"  strategy.args.{key}: set by the recipe (student, teacher, data, train), not in args")
        elif key in TrainSpec.model_fields:
            errors.append(f"  strategy.args.{key}: a training setting: put it in 'train'")
        elif key not in named:
            errors.append(f"  strategy.args.{key}: unknown argument of strategy {spec.name!r}; it takes "
                          f"{sorted(named - set(STRATEGY_RESERVED))}")
    if spec.labeled is not None and not ({"unlabeled", "unlabeled_loader"} & named):
        errors.append(f"  strategy.labeled: strategy {spec.name!r} takes no unlabeled data")
    if errors:
        raise RecipeError("invalid strategy:\n" + "\n".join(errors))



def _plain_folder_name(v: str) -> str:
    # the run folder is OUTPUT_DIR/NAME: a name with a path in it would write outside output_dir
    if not v or v in (".", "..") or any(c in v for c in "/\\\0") or v != v.strip():
        raise ValueError(f"name {v!r} must be a plain folder name (no '/', '\\', '..', surrounding spaces): "
                         "runs are written to OUTPUT_DIR/NAME")
    return v


class Recipe(_Strict):
    """A whole run. ``kind: train`` trains ``student`` alone (e.g. a teacher) with ``losses``."""

    name: str
    kind: Literal["distill", "train"] = "distill"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    data: DataSpec = Field(default_factory=DataSpec)
    student: StudentSpec
    teacher: TeacherSpec | None = None
    losses: dict[str, float | dict[str, Any]] = Field(default_factory=lambda: {"ce": 1.0})
    train: TrainSpec
    hint_stage: HintStageSpec | None = None
    strategy: StrategySpec | None = None
    output_dir: str = "runs"

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        return _plain_folder_name(v)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        repeated = sorted({s for s in v if v.count(s) > 1})
        if repeated:
            raise ValueError(f"seeds {repeated} are listed more than once (each seed is one run folder seed<k>)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.kind == "train" and self.teacher is not None:
            raise ValueError("kind 'train' trains one model without a teacher: remove 'teacher'")
        if self.strategy is not None:
            if self.kind == "train" or self.hint_stage is not None:
                raise ValueError("'strategy' runs its own training: it cannot be combined with kind 'train' or "
                                 "'hint_stage'")
            if self.teacher is not None and self.teacher.cache is not None:
                raise ValueError("a strategy runs its teacher models itself: remove 'teacher.cache'")
            if self.train.loggers:  # cohort loops of their own take no loggers: refuse them all, before any work
                raise ValueError(f"train.loggers: strategy {self.strategy.name!r} runs its own training; loggers "
                                 "apply to recipes without a strategy: remove 'train.loggers'")
            if "losses" in self.model_fields_set:
                raise ValueError(f"strategy {self.strategy.name!r} chooses its own losses: remove 'losses' (its "
                                 "hyper-parameters go in strategy.args)")
        if self.data.options.get("teacher_beams") is not None and self.data.name in POINT_SCENE_SETS:
            if self.teacher is None or self.strategy is not None:
                raise ValueError("data.options.teacher_beams: the denser scan is the teacher's input; this recipe "
                                 "has no teacher distilled with losses: remove it")
            if self.teacher.ensemble is not None or self.teacher.cache is not None:
                raise ValueError("data.options.teacher_beams: the denser scan is read by one teacher model "
                                 "(teacher.model, without teacher.cache)")
        elif "lidar_distill" in self.losses:
            raise ValueError("losses.lidar_distill: its teacher sees the full-beam scan of the scenes whose reduced "
                             "scan the student sees: use data set 'lidar_scenes' with data.options.beams (the "
                             "student's) and data.options.teacher_beams (the teacher's)")
        if self.student.init_from_teacher:
            self._check_init_from_teacher()
        strategy = self.strategy.name if self.strategy is not None else None
        if self.data.targets != "labels" and strategy not in DENSE_TARGET_STRATEGIES:
            raise ValueError(f"data.targets {self.data.targets!r} gives dense target maps, which only a dense-output "
                             f"strategy ({', '.join(DENSE_TARGET_STRATEGIES)}) trains on: remove it")
        if strategy in DENSE_TARGET_STRATEGIES and self.data.targets == "labels":
            raise ValueError(f"strategy {strategy!r} trains on dense target maps: set data.targets: class_heatmaps")
        if self.hint_stage is not None and self.hint_stage.method not in self.losses:
            offered = _offered_stages(self.losses)
            if self.hint_stage.method not in offered:
                raise ValueError(f"hint_stage.method {self.hint_stage.method!r} is not one of the losses "
                                 f"{list(self.losses)}" + (f" nor a stage they offer {offered}" if offered else ""))
        return self

    def _check_init_from_teacher(self) -> None:
        """``student.init_from_teacher``: one teacher model of the student's name, copied by the plain
        distillation loop (the state-dict keys and shapes are checked on the built models, by the runner)."""
        where = "student.init_from_teacher=True"
        if self.teacher is None:  # (kind train has none: it refuses one above)
            raise ValueError(f"{where}: the student starts as a copy of the recipe's teacher, and this recipe has "
                             f"none (kind {self.kind!r}, teacher {self.teacher!r}): add 'teacher' or remove it")
        if self.teacher.ensemble is not None:
            raise ValueError(f"{where}: the student copies one teacher, and 'teacher.ensemble' has "
                             f"{len(self.teacher.ensemble)} members: use 'teacher.model'")
        if self.strategy is not None:
            raise ValueError(f"{where}: strategy {self.strategy.name!r} builds its own students; the copy of the "
                             "teacher is made by the plain distillation loop: remove one")
        teacher = self.teacher.model
        assert teacher is not None
        if self.student.name != teacher.name:
            raise ValueError(f"{where}: the student copies the teacher's weights, so it must be the teacher's model: "
                             f"student.name is {self.student.name!r}, teacher.model.name {teacher.name!r}")


def _offered_stages(losses: dict[str, Any]) -> list[str]:
    """Extra stages the named losses offer (FT: ``ft_paraphraser``); unknown names are skipped here."""
    from distill.methods import method_info

    out: list[str] = []
    for name in losses:
        try:
            out.extend(s for s in method_info(name).cls.stages if s not in out)
        except KeyError:
            continue
    return out


def _method_arg_model(method: str) -> type[BaseModel]:
    """A pydantic model of a method's keyword arguments, from its ``__init__`` signature."""
    from distill.methods import method_info

    info = method_info(method)
    try:
        hints = typing.get_type_hints(info.cls.__init__)
    except Exception:  # unresolvable annotations: validate names only
        hints = {}
    fields: dict[str, Any] = {}
    for name, p in inspect.signature(info.cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[name] = (hints.get(name, Any), default)
    return create_model(f"{method}_args", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                        **fields)


def _format(e: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged"))) or "recipe"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        lines.append(f"  {prefix}{loc}: {msg}{got}")
    return lines


def _bad_method_values(name: str, kwargs: dict[str, Any]) -> str | None:
    """The first bad value of a loss's arguments as an error line naming its key, or ``None``.

    A weight must be a finite number >= 0 and no number may be NaN or infinite; then the method
    is built, so that its own checks (``T > 0``...) fail here, at validation, with the key named.
    """
    from distill.methods import method_info

    for key, value in kwargs.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"  losses.{name}.{key}: must be a finite number (got {value!r})"
    weight = kwargs.get("weight", 1.0)
    if isinstance(weight, (int, float)) and weight < 0:
        return f"  losses.{name}.weight: a loss weight must be >= 0 (got {weight!r}); 0 switches the loss off"
    cls = method_info(name).cls
    try:
        cls(**kwargs)
    except (ValueError, TypeError) as e:
        culprit = None  # the argument that fails alone (with the others at their defaults)
        for key, value in kwargs.items():
            try:
                cls(**{key: value})
            except (ValueError, TypeError):
                culprit = key
                break
        where = f"losses.{name}.{culprit}" if culprit else f"losses.{name}"
        got = f" (got {kwargs[culprit]!r})" if culprit and repr(kwargs[culprit]) not in str(e) else ""
        return f"  {where}: {e}{got}"
    return None


def validate_losses(losses: dict[str, float | dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each loss name must be registered and its arguments accepted; returns name → kwargs."""
    from distill.methods import method_info

    out: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for name, spec in losses.items():
        try:
            method_info(name)
        except KeyError as e:
            errors.append(f"  losses.{name}: {e.args[0]}")
            continue
        kwargs = {"weight": float(spec)} if isinstance(spec, (int, float)) else dict(spec)
        try:
            validated = _method_arg_model(name).model_validate(kwargs)
        except ValidationError as e:
            errors.extend(_format(e, f"losses.{name}."))
            continue
        out[name] = {k: getattr(validated, k) for k in kwargs}
        bad = _bad_method_values(name, out[name])
        if bad:
            errors.append(bad)
            out.pop(name)
    if errors:
        raise RecipeError("invalid losses:\n" + "\n".join(errors))
    return out


M = TypeVar("M", bound=BaseModel)


def validate_schema(schema: type[M], data: Any, source: str = "recipe") -> M:
    """``data`` validated against a recipe schema; :class:`RecipeError` lists every bad key."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source} is invalid:\n" + "\n".join(_format(e))) from None


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; raises :class:`RecipeError` listing every bad key."""
    if isinstance(data, dict) and data.get("kind") == "synth":
        raise RecipeError(f"{source} is a synthesis recipe (kind: synth): run it with 'distill synth'")
    if isinstance(data, dict) and data.get("kind") == "auto":
        raise RecipeError(f"{source} is a search spec (kind: auto): run it with 'distill auto'")
    if isinstance(data, dict) and data.get("kind") in ("graph", "lm", "generative"):
        raise RecipeError(f"{source} is a recipe of kind {data['kind']!r}: 'distill run' reads it with its own schema "
                          f"(distill.{data['kind']}_runner)")
    recipe = validate_schema(Recipe, data, source)
    try:
        validate_losses(recipe.losses)
        if recipe.strategy is not None:
            validate_strategy_args(recipe.strategy)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return recipe


def read_recipe_file(path: str | Path) -> Any:
    """The parsed YAML of a recipe file (not yet validated); a clear error when absent or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    return parse_recipe(read_recipe_file(path), str(path))


# ---------------------------------------------------------------------------------------------
# kind: synth — a synthetic data set (distill synth RECIPE)
# ---------------------------------------------------------------------------------------------


class SynthDataSpec(_Strict):
    """The real data set of a synth recipe: what a "dataset" synthesizer condenses (its train
    split, or its first ``train_subset`` samples); for both families, the test split that
    evaluates the set and the normalisation the set is stored in."""

    name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100"]
    root: str | None = None
    train_subset: int | None = Field(None, gt=0, description="condense only the first N training samples")


class SynthEvaluateSpec(_Strict):
    """The evaluation of a synthetic set (:func:`distill.synthesis.evaluate.evaluate_synthetic`):
    ``evaluations`` fresh ``model`` s trained on it (DC's protocol), tested on the real test split."""

    evaluations: int = Field(5, gt=0)
    epochs: int = Field(300, gt=0)
    lr: float | None = Field(None, gt=0, description="None: the set's learned lr when it has one (MTT), else 0.01")
    lr_decay: float = Field(0.1, gt=0, le=1)
    batch_size: int = Field(256, gt=0)
    dsa: bool = True
    dsa_strategy: str | None = Field(None, description="None: DSA's default, without flip for digit sets")
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(name="convnet3"))
    seed: int = Field(0, ge=0)

    @field_validator("model")
    @classmethod
    def _no_checkpoint(cls, v: ModelSpec) -> ModelSpec:
        if v.checkpoint is not None:
            raise ValueError("the evaluation trains fresh models: remove 'checkpoint'")
        return v


class SynthesizerSpec(_Strict):
    """A registered synthesizer (``distill synthesizers``) and its own keyword arguments."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from distill.synthesis.registry import synthesizer_info

        try:
            synthesizer_info(v)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return v


class SynthRecipe(_Strict):
    """``kind: synth``: make a synthetic set with a registered synthesizer, evaluate it, save it.

    A "dataset" synthesizer needs ``data`` (the real set it condenses); a "data-free" one needs
    ``teacher`` (a zoo model with its ``checkpoint``), and ``data`` only for the evaluation and
    the normalisation (its training images are never given to the synthesizer), else
    ``num_classes`` and ``image_shape``. The set goes to ``OUTPUT_DIR/NAME``.
    """

    name: str
    kind: Literal["synth"]
    synthesizer: SynthesizerSpec
    ipc: int = Field(gt=0, description="images per class")
    data: SynthDataSpec | None = None
    teacher: ModelSpec | None = None
    num_classes: int | None = Field(None, gt=0)
    image_shape: tuple[int, int, int] | None = None
    seed: int = Field(0, ge=0)
    evaluate: SynthEvaluateSpec | None = Field(default_factory=SynthEvaluateSpec)
    device: str | None = None
    output_dir: str = "runs/synth"

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        return _plain_folder_name(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        from distill.teachers import parse_device

        if v is not None:
            parse_device(v, "device")
        return v

    @model_validator(mode="after")
    def _family(self) -> SynthRecipe:
        from distill.synthesis.registry import synthesizer_info

        family = synthesizer_info(self.synthesizer.name).family
        who = f"synthesizer {self.synthesizer.name!r} ({family})"
        if family == "dataset":
            if self.data is None:
                raise ValueError(f"{who} condenses a real data set: give 'data'")
            if self.teacher is not None:
                raise ValueError(f"{who} takes no teacher: remove 'teacher'")
        else:
            if self.teacher is None or self.teacher.checkpoint is None:
                raise ValueError(f"{who} needs 'teacher' with a 'checkpoint' (its trained weights)")
            if self.data is None and (self.num_classes is None or self.image_shape is None):
                raise ValueError(f"{who} without 'data' needs 'num_classes' and 'image_shape' (C, H, W)")
            if self.data is not None and self.data.train_subset is not None:
                raise ValueError(f"{who} never reads training images: remove 'data.train_subset'")
        if self.evaluate is not None and self.data is None:
            raise ValueError("'evaluate' tests on the real test split: give 'data', or set 'evaluate: null'")
        return self


def validate_synthesizer_args(spec: SynthesizerSpec) -> dict[str, Any]:
    """Every ``args`` key must be a keyword of the synthesizer (not one the recipe fills in), with a
    value of the annotated type; an argument without a default must be given. Returns the args."""
    from distill.synthesis.registry import RESERVED, synthesizer_info

    info = synthesizer_info(spec.name)
    fn = info.fn
    own = info.hyperparameters()
    params = inspect.signature(fn).parameters
    errors: list[str] = []
    for key in spec.args:
        if key in RESERVED[info.family]:
            errors.append(f"  synthesizer.args.{key}: set by the recipe (ipc, seed, data or teacher), not in args")
        elif key not in own:
            errors.append(f"  synthesizer.args.{key}: unknown argument of synthesizer {spec.name!r}; it takes {own}")
    for name in own:
        if params[name].default is inspect.Parameter.empty and name not in spec.args:
            errors.append(f"  synthesizer.args.{name}: required by synthesizer {spec.name!r}")
    if errors:
        raise RecipeError("invalid synthesizer:\n" + "\n".join(errors))
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: names only
        hints = {}
    fields = {n: (hints.get(n, Any), ...) for n in spec.args}
    try:
        model = create_model(f"{spec.name}_args", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                             **fields)
    except Exception:  # an annotation pydantic cannot express: the names were checked above
        return dict(spec.args)
    try:
        model.model_validate(spec.args)
    except ValidationError as e:
        raise RecipeError("invalid synthesizer:\n" + "\n".join(_format(e, "synthesizer.args."))) from None
    return dict(spec.args)


def parse_synth_recipe(data: dict[str, Any], source: str = "recipe") -> SynthRecipe:
    """Validate a ``kind: synth`` recipe mapping; :class:`RecipeError` lists every bad key."""
    recipe = validate_schema(SynthRecipe, data, source)
    try:
        validate_synthesizer_args(recipe.synthesizer)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return recipe


def is_synth_recipe(data: Any) -> bool:
    """Whether a parsed recipe mapping is ``kind: synth``."""
    return isinstance(data, dict) and data.get("kind") == "synth"


def load_synth_recipe(path: str | Path) -> SynthRecipe:
    """Read and validate a ``kind: synth`` YAML recipe file."""
    data = read_recipe_file(path)
    if not is_synth_recipe(data):
        kind = data.get("kind", "distill") if isinstance(data, dict) else None
        raise RecipeError(f"{path}: 'distill synth' runs recipes of kind 'synth'; this one is kind {kind!r} "
                          "(run it with 'distill run')")
    return parse_synth_recipe(data, str(path))
