"""Run a validated :class:`~distill.recipes.Recipe`: data, models, teacher, Distiller, ``fit``, report."""

from __future__ import annotations

import copy
import inspect
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn

from distill.files import atomic_write_json, atomic_write_text, read_json
from distill.recipes import DataSpec, ModelSpec, Recipe, SynthRecipe, TrainSpec, validate_losses
from distill.locks import RunLock
from distill.train.distributed import barrier, is_main_process, main_process_first
from distill.train.rundir import (
    ResumeError,
    RunFolderError,
    SpecMismatchError,
    check_fingerprint,
    clear_run_dir,
    fingerprint_diff,
    has_results,
    normalize_fingerprint,
)

console = Console(stderr=True)
MODEL_FILE = "model.safetensors"  # what a trained model leaves: tensors and a JSON header, nothing to unpickle

LS_NOTE = (
    "teacher was trained with label smoothing (eps={eps}) and a loss uses temperature T={T} > 1: "
    "Chandrasegaran et al. (ICML 2022, arXiv 2206.14532) show that distilling an LS-trained teacher "
    "at a high temperature causes systematic diffusion in the student; T=1 is the compatible setting"
)


def build_data(spec: DataSpec, seed: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """Train and evaluation loaders (in memory) for a data spec, and facts about the data."""
    from distill.data import get_dataset
    from distill.data.augment import Compose, Mixup, RandomCropPad, RandomHorizontalFlip

    from distill.data.loader import check_finite
    from distill.recipes import RecipeError

    if spec.task in ("bev", "mono3d"):
        return _build_point_data(spec, seed)
    if spec.task != "classification":
        return _build_scene_data(spec, seed)
    train = get_dataset(spec.name, spec.root, split="train")
    val = get_dataset(spec.name, spec.root, split=spec.val_split)
    x, y = train.inputs, train.targets
    n = int(x.shape[0])
    if n == 0:
        raise RecipeError(f"data set {spec.name!r} has 0 training samples"
                          + (f" (root {spec.root!r})" if spec.root else ""))
    if len(val) == 0:
        raise RecipeError(f"data set {spec.name!r} has 0 samples in its {spec.val_split!r} split (data.val_split)")
    if spec.train_subset is not None:
        if spec.train_subset > n:
            raise RecipeError(f"data.train_subset={spec.train_subset} is larger than data set {spec.name!r}, which has "
                              f"{n} training samples: lower it, or remove it to train on all of them")
        x, y = x[: spec.train_subset], y[: spec.train_subset]
    if spec.batch_size > x.shape[0]:
        raise RecipeError(f"data.batch_size={spec.batch_size} is larger than the {int(x.shape[0])} training samples of "
                          f"data set {spec.name!r}" + (" (data.train_subset)" if spec.train_subset is not None else "")
                          + ": every epoch would be one smaller batch; lower data.batch_size")
    check_finite(x, f"data set {spec.name!r} (training split)")
    check_finite(val.inputs, f"data set {spec.name!r} ({spec.val_split!r} split)")
    val_y = val.targets
    if spec.targets == "class_heatmaps":  # a pose-style dense task on the same images (maps (N, K, H, W))
        from distill.data.dense import class_heatmaps

        y = class_heatmaps(train.denormalize(x), y, train.num_classes, sigma=spec.heatmap_sigma)
        val_y = class_heatmaps(val.denormalize(val.inputs), val_y, val.num_classes, sigma=spec.heatmap_sigma)
    augs: list[Any] = []
    if spec.augment.crop_padding:
        augs.append(RandomCropPad(spec.augment.crop_padding))
    if spec.augment.flip:
        augs.append(RandomHorizontalFlip())
    if spec.augment.mixup_alpha is not None:
        augs.append(Mixup(spec.augment.mixup_alpha))  # last: it mixes the finished views
    from distill.data.loader import InMemoryLoader

    # sample indices ride along (one gather): methods with per-sample state (CRD) read them
    train_loader = InMemoryLoader(x, y, spec.batch_size, shuffle=True, seed=seed,
                                  augment=Compose(augs) if augs else None, return_index=True)
    val_loader = InMemoryLoader(val.inputs, val_y, spec.eval_batch_size, shuffle=False)
    info = {"dataset": spec.name, "num_classes": train.num_classes, "in_channels": int(x.shape[1]),
            "train_size": int(x.shape[0]), "val_size": len(val), "val_split": spec.val_split}
    if spec.targets != "labels":
        info["targets"] = spec.targets
    return train_loader, val_loader, info


def _build_scene_data(spec: DataSpec, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """Loaders of a scene data set (:mod:`distill.data.scenes`): DenseBatches with boxes, labels and
    semantic masks; ``num_classes`` counts the objects (detection) or background + objects (segmentation)."""
    from distill.data import get_dataset
    from distill.recipes import RecipeError

    try:
        train = get_dataset(spec.name, spec.root, split="train", **spec.options)
        val = get_dataset(spec.name, spec.root, split=spec.val_split, **spec.options)
    except TypeError as e:  # an option make_scenes does not take
        raise RecipeError(f"data.options: {e}") from None
    if spec.train_subset is not None:
        if spec.train_subset > len(train):
            raise RecipeError(f"data.train_subset={spec.train_subset} is larger than data set {spec.name!r}, which has "
                              f"{len(train)} training scenes")
        train = train.subset(range(spec.train_subset))
    if spec.batch_size > len(train):
        raise RecipeError(f"data.batch_size={spec.batch_size} is larger than the {len(train)} training scenes of "
                          f"data set {spec.name!r}: lower data.batch_size")
    train_loader = train.loader(spec.batch_size, shuffle=True, seed=seed, masks=False)
    val_loader = val.loader(spec.eval_batch_size, masks=False)
    k = train.num_seg_classes if spec.task == "segmentation" else train.num_classes
    info = {"dataset": spec.name, "task": spec.task, "num_classes": k, "in_channels": int(train.input_shape[0]),
            "train_size": len(train), "val_size": len(val), "val_split": spec.val_split}
    return train_loader, val_loader, info


def _build_point_data(spec: DataSpec, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """Loaders of the 3D point scenes (:mod:`distill.data.pointscenes`): DenseBatches with 3D boxes and
    labels, whose inputs are the LiDAR points (task ``bev``) or the camera image and sparse depth
    (``mono3d``); with ``data.options.teacher_beams`` the training batches also carry the teacher's denser
    scan (``extras["teacher_points"]``, for :class:`~distill.methods.dense3d.BeamTeacher`)."""
    from distill.data import get_dataset
    from distill.recipes import RecipeError

    options = dict(spec.options)
    try:
        train = get_dataset(spec.name, spec.root, split="train", **options)
        options.pop("teacher_beams", None)  # the validation scenes are scored on the student's scan alone
        val = get_dataset(spec.name, spec.root, split=spec.val_split, **options)
    except (TypeError, ValueError) as e:  # an option the data set does not take, or a bad value or split
        raise RecipeError(f"data.options: {e}") from None
    if spec.batch_size > len(train):
        raise RecipeError(f"data.batch_size={spec.batch_size} is larger than the {len(train)} training scenes of "
                          f"data set {spec.name!r}: lower data.batch_size or raise data.options.n_scenes")
    inputs = "camera" if spec.task == "mono3d" else "points"
    train_loader = train.loader(spec.batch_size, shuffle=True, seed=seed, inputs=inputs)
    val_loader = val.loader(spec.eval_batch_size, inputs=inputs)
    # in_channels None: the 3D models take no such argument (build_model leaves it out)
    info = {"dataset": spec.name, "task": spec.task, "num_classes": train.num_classes, "in_channels": None,
            "train_size": len(train), "val_size": len(val), "val_split": spec.val_split, "beams": train.lidar.beams}
    if train.teacher_scans is not None:
        info["teacher_beams"] = train.teacher_scans.lidar.beams
    return train_loader, val_loader, info


def task_evaluator(info: dict[str, Any]) -> dict[str, Any]:
    """``fit``'s ``evaluator`` for the data's task, as keyword arguments: none for classification
    (fit's top-1), COCO mAP for detection, mIoU for segmentation (:mod:`distill.train.dense_eval`), BEV AP
    for the 3D tasks ``bev`` and ``mono3d`` (:mod:`distill.train.bev_eval`)."""
    task = info.get("task", "classification")
    if task in ("bev", "mono3d"):
        from distill.train.bev_eval import bev_evaluator

        return {"evaluator": bev_evaluator(num_classes=info["num_classes"])}
    if task == "detection":
        from distill.train.dense_eval import detection_evaluator

        return {"evaluator": detection_evaluator}
    if task == "segmentation":
        from distill.train.dense_eval import segmentation_evaluator

        return {"evaluator": segmentation_evaluator(info["num_classes"])}
    return {}


def task_losses(losses: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """What a model trained alone in a dense recipe trains with: the recipe's task losses (family
    ``"task"``: ``gfl_loss``, ``seg_ce``, ``detr_loss``, ``bev_loss``, ``mono3d_loss``); ``None`` for
    classification (CE)."""
    from distill.methods import method_info
    from distill.recipes import RecipeError

    if info.get("task", "classification") == "classification":
        return None
    own = {n: kw for n, kw in losses.items() if method_info(n).family == "task"}
    if not own:
        raise RecipeError(f"task {info['task']!r}: losses must hold the model's own loss (family 'task': "
                          "gfl_loss, detr_loss, seg_ce...), which trains the teacher here and the student")
    return own


def build_model(spec: ModelSpec, num_classes: int, in_channels: int | None) -> nn.Module:
    """A zoo model sized for the data (``num_classes``/``in_channels`` unless the spec sets them;
    ``in_channels`` None: the data's models take none, e.g. the 3D detectors)."""
    from distill.models import create

    sized = {"num_classes": num_classes} if in_channels is None else {"num_classes": num_classes,
                                                                      "in_channels": in_channels}
    kwargs = {**sized, **spec.kwargs}
    return create(spec.name, **kwargs)


def build_student(spec: ModelSpec, num_classes: int, in_channels: int | None) -> nn.Module:
    """:func:`build_model`, then the weights of ``spec.checkpoint`` when the recipe names one (a student
    that starts from trained weights: fine-tuning, a stage of a chain); read without running code."""
    model = build_model(spec, num_classes, in_channels)
    if spec.checkpoint is not None:
        from distill.train.checkpoint import load_model

        model, _ = load_model(spec.checkpoint, model)
    return model


def _device(train: TrainSpec) -> torch.device:
    if train.device:
        return torch.device(train.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fit_kwargs(t: TrainSpec) -> dict[str, Any]:
    kwargs = dict(epochs=t.epochs, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
                  weight_decay=t.weight_decay, nesterov=t.nesterov, schedule=t.schedule,
                  milestones=t.milestones, gamma=t.gamma, amp=t.amp, grad_clip=t.grad_clip,
                  deterministic=t.deterministic, device=_device(t))
    if t.loggers:  # only then: strategies' own loops take no loggers (a recipe refuses the pair)
        kwargs["loggers"] = list(t.loggers)
    return kwargs


def train_model(model: nn.Module, spec: ModelSpec, train: TrainSpec, data: tuple[Any, Any, dict[str, Any]],
                run_dir: Path, *, label_smoothing: float = 0.0, seed: int = 0, progress: bool = True,
                resume: bool = False, on_epoch_end: Any = None, fingerprint: dict[str, Any] | None = None,
                overwrite: bool = False, losses: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train one model with CE (or label smoothing) and save ``run_dir/model.safetensors`` with its metadata.

    ``losses``: other losses to train with instead (a dense task's own loss, :func:`task_losses`).
    ``fingerprint``, ``resume``, ``overwrite``: passed to :func:`distill.fit` (what its checkpoints
    record and resume checks; whether results in ``run_dir`` may be continued or replaced)."""
    from distill.distiller import Distiller
    from distill.methods import create_method
    from distill.train import fit
    from distill.train.checkpoint import save_model

    train_loader, val_loader, info = data
    loss = create_method("label_smoothing", eps=label_smoothing) if label_smoothing > 0 else create_method("ce")
    methods = {n: create_method(n, **kw) for n, kw in losses.items()} if losses else {loss.name: loss}
    d = Distiller(model, None, losses=methods)
    t0 = time.perf_counter()
    result = fit(d, train_loader, val_loader, run_dir=run_dir, seed=seed, progress=progress, resume=resume,
                 on_epoch_end=on_epoch_end, fingerprint=fingerprint, overwrite=overwrite, **_fit_kwargs(train),
                 **task_evaluator(info))
    metadata = {"label_smoothing": label_smoothing, "val_acc": result.last_acc, "best_acc": result.best_acc,
                "epochs": train.epochs, "dataset": info["dataset"], "seed": seed}
    summary = {"name": spec.name, "kind": "train", "group": spec.name, "losses": losses or {loss.name: 1.0}, "seed": seed,
               "epochs": train.epochs, "last_acc": result.last_acc, "best_acc": result.best_acc,
               "best_epoch": result.best_epoch, "label_smoothing": label_smoothing,
               # a resumed run's time includes the sessions before it
               "time_s": result.time_s if result.time_s is not None else time.perf_counter() - t0}
    if is_main_process():  # under torchrun one process writes; the others wait, then read the model
        sized = {k: info[k] for k in ("num_classes", "in_channels") if info[k] is not None}
        save_model(run_dir / MODEL_FILE, model, name=spec.name, kwargs={**sized, **spec.kwargs},
                   metadata=metadata)
        atomic_write_json(run_dir / "summary.json", summary)
    barrier()
    return summary


def _teacher_temperatures(losses: dict[str, dict[str, Any]]) -> list[float]:
    from distill.methods import method_info

    temps = []
    for name, kw in losses.items():
        defaults = method_info(name).defaults
        for key in ("T", "temperature"):
            if key in defaults:
                temps.append(float(kw.get(key, defaults[key])))
    return temps


def ls_notes(metadata: dict[str, Any] | None, losses: dict[str, dict[str, Any]]) -> list[str]:
    """Chandrasegaran et al.'s check: a label-smoothed teacher distilled at T > 1."""
    eps = (metadata or {}).get("label_smoothing")
    if eps is None:
        return ["unknown whether the teacher was trained with label smoothing (no distill metadata)"]
    hot = [T for T in _teacher_temperatures(losses) if T > 1]
    if eps > 0 and hot:
        return [LS_NOTE.format(eps=eps, T=max(hot))]
    return []


def _teachers_trained_here(recipe: Recipe, base: Path) -> list[tuple[int, ModelSpec, Path, Path, dict[str, Any],
                                                                        Any]]:
    """The teachers the run trains itself (the members without a checkpoint), each as ``(index, spec,
    folder, its teacher_spec.json, the recipe's fingerprint for it, the fingerprint saved in that file
    or None)``; read when called (a folder may have been cleared since)."""
    members = recipe.teacher.members() if recipe.teacher is not None else []
    found = []
    for i, spec in enumerate(members):
        if spec.checkpoint is not None:
            continue
        tdir = base / (f"teacher{i}" if len(members) > 1 else "teacher")
        spec_file = tdir / "teacher_spec.json"
        saved = read_json(spec_file, "teacher spec", remedy="delete it to retrain the teacher") \
            if spec_file.is_file() else None
        found.append((i, spec, tdir, spec_file, teacher_fingerprint(recipe, i), saved))
    return found


def run_recipe(recipe: Recipe, *, out_dir: str | Path | None = None, progress: bool = True,
               resume: bool = False, seeds: list[int] | None = None, cache_only: bool = False,
               overwrite: bool = False) -> list[Path]:
    """Run every seed of a recipe; returns the run folders (``OUT/NAME/seed<k>``).

    The recipe's folder ``OUT/NAME`` is locked for the run (:class:`~distill.locks.RunLock`: a
    second run of the same recipe, or of another with the same ``name``, stops at once with
    ``RunLockedError`` naming this one's pid), and its results are never silently replaced. Before
    any training (teacher included), each seed's folder is checked:

    - without ``resume`` or ``overwrite``, a folder holding results raises ``RunFolderError``;
    - ``overwrite``: the seed folders are cleared first (no stale ``best.pt`` or metrics survive);
    - ``resume``: each run continues from its ``checkpoints/last.pt``, which must record this
      recipe's fingerprint (:func:`recipe_fingerprint`; else ``SpecMismatchError`` names each
      differing field, e.g. ``train.lr: checkpoint 0.05, now 0.1``); results without a
      ``last.pt`` raise ``ResumeError``; a seed with no folder starts afresh.

    An in-run teacher is reused when its ``teacher_spec.json`` matches the recipe. When the teacher
    settings changed, it is retrained from nothing with ``overwrite`` (its old folder is cleared)
    and refused otherwise, naming the fields that changed; ``resume`` continues an unfinished
    teacher only under the same settings.

    With ``student.init_from_teacher`` each seed's student starts as a copy of the teacher's state dict,
    taken once the teacher exists (trained, reused or loaded); a seed resumes only with the same
    teacher weights (:func:`recipe_fingerprint`).

    With ``teacher.cache`` the students read the teacher's outputs from that cache (built first
    when it does not exist; :mod:`distill.cache`). ``cache_only``: stop once the cache is ready
    and return ``[its path]`` (``distill cache build``).

    Everything that can be checked is checked before any training: models are built, the
    Distiller is constructed (tap paths resolved) and prepared on one batch (adapter shapes).
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the runs, --overwrite "
                         "replaces them")
    base = Path(out_dir or recipe.output_dir) / recipe.name
    # one process runs a recipe's folder at a time (under torchrun: rank 0, the only writer, locks it)
    with RunLock(base, f"distill run {recipe.name}") if is_main_process() else nullcontext():
        return _run_recipe(recipe, base=base, progress=progress, resume=resume, seeds=seeds,
                           cache_only=cache_only, overwrite=overwrite)


def _run_recipe(recipe: Recipe, *, base: Path, progress: bool, resume: bool, seeds: list[int] | None,
                cache_only: bool, overwrite: bool) -> list[Path]:
    """:func:`run_recipe` in its locked folder ``base``."""
    from distill.distiller import Distiller
    from distill.methods import create_method
    from distill.teachers import EnsembleTeacher, FrozenTeacher
    from distill.train import fit, fit_hint_stage
    from distill.train.checkpoint import load_model

    losses = validate_losses(recipe.losses)
    _check_devices(recipe)  # before any work: a CPU-only build asked for 'cuda' fails here, not after the teacher
    if cache_only and (recipe.kind != "distill" or recipe.teacher is None or recipe.teacher.cache is None):
        from distill.recipes import RecipeError

        raise RecipeError(f"{recipe.name}: cache_only needs a distillation recipe whose teacher has a 'cache' section")
    base.mkdir(parents=True, exist_ok=True)
    seeds = seeds or recipe.seeds
    data = build_data(recipe.data, seed=seeds[0])
    info = data[2]
    if recipe.strategy is None:
        task_losses(losses, info)  # a dense task names the model's own loss: checked before any work

    # ---- build everything first: a bad tap path or shape fails before any training
    def make_distiller(student: nn.Module, teacher: Any) -> Distiller:
        methods = {n: create_method(n, **kw) for n, kw in losses.items()}
        d = Distiller(student, teacher, losses=methods)
        targets = getattr(data[0], "targets", None)  # a scene loader has no label tensor
        d.bind_data(len(targets) if targets is not None else info["train_size"], targets)
        d.prepare(next(iter(data[0])))
        return d

    members = recipe.teacher.members() if recipe.teacher is not None else []
    teacher_models: list[nn.Module] = []
    member_metadata: list[dict[str, Any] | None] = []
    for i, spec in enumerate(members):
        torch.manual_seed(seeds[0] + 1000 * (i + 1))  # in-run teachers start from the same weights every run
        model = build_model(spec, info["num_classes"], info["in_channels"])
        meta = None
        if spec.checkpoint is not None:
            model, meta = load_model(spec.checkpoint, model)
        teacher_models.append(model)
        member_metadata.append(meta)
    # a throw-away Distiller on copies: freezing the real teacher now would stop its training below
    probe_teacher: Any = [copy.deepcopy(m) for m in teacher_models] or None
    if probe_teacher is not None and len(probe_teacher) == 1:
        probe_teacher = probe_teacher[0]
    probe_student = build_model(recipe.student, info["num_classes"], info["in_channels"])
    if recipe.student.init_from_teacher:  # the copy must fit: same keys and shapes, before any training
        _check_init_from_teacher(probe_student, teacher_models[0])
    _check_taps(losses, probe_student, probe_teacher)
    _check_widths(recipe, losses, probe_student, probe_teacher, data)
    make_distiller(probe_student, probe_teacher)
    # ---- and before any training: the folders this run writes may be written (resume, overwrite)
    if is_main_process():
        _check_folders(recipe, losses, base, seeds, resume=resume, overwrite=overwrite, cache_only=cache_only,
                       teacher_weights=_teacher_weights_known(recipe, base, teacher_models))
        # only now: a refused run leaves the recipe of the results already there
        atomic_write_text(base / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    barrier()

    if recipe.kind == "train":
        dirs = []
        for s in seeds:
            eps = float(losses.get("label_smoothing", {}).get("eps", 0.1)) if "label_smoothing" in losses else 0.0
            run_dir = base / f"seed{s}"
            torch.manual_seed(s)
            model = build_student(recipe.student, info["num_classes"], info["in_channels"])
            train_model(model, recipe.student, recipe.train, build_data(recipe.data, s), run_dir,
                        label_smoothing=eps, seed=s, progress=progress, resume=resume,
                        fingerprint=recipe_fingerprint(recipe, losses, s), losses=task_losses(losses, info))
            dirs.append(run_dir)
        _report(base, dirs, recipe.name)
        return dirs

    # ---- train teachers that have no checkpoint, on the whole training split unless told otherwise
    teacher: Any = None
    metadata: dict[str, Any] | None = None
    init_state: dict[str, torch.Tensor] | None = None  # student.init_from_teacher: the teacher's weights, copied
    init_digest: str | None = None
    if recipe.teacher is not None:
        t = recipe.teacher
        teacher_data = build_data(_teacher_data_spec(recipe.data).model_copy(update={"train_subset": t.train_subset}),
                                  seed=seeds[0])
        for i, spec, tdir, spec_file, fingerprint, saved in _teachers_trained_here(recipe, base):
            if (tdir / MODEL_FILE).is_file() and saved == fingerprint:
                teacher_models[i], member_metadata[i] = load_model(tdir / MODEL_FILE, teacher_models[i])
                console.print(f"[dim]reusing the trained teacher in {tdir}[/dim]")
                continue
            # _check_folders cleared a teacher of other settings (overwrite) or refused to go on
            console.print(f"training teacher {spec.name} → {tdir}")
            train_model(teacher_models[i], spec, t.train, teacher_data, tdir,  # type: ignore[arg-type]
                        label_smoothing=t.label_smoothing, seed=seeds[0] + i, progress=progress, resume=resume,
                        fingerprint={**fingerprint, "seed": seeds[0] + i}, losses=task_losses(losses, info))
            if is_main_process():
                atomic_write_json(spec_file, fingerprint)
            teacher_models[i], member_metadata[i] = load_model(tdir / MODEL_FILE, teacher_models[i])
        if recipe.student.init_from_teacher:
            # copied now, before the teacher source may cast it (teacher.dtype); clones: the teacher's own
            # tensors are never handed to a student that trains
            init_state = {k: v.detach().clone() for k, v in teacher_models[0].state_dict().items()}
            init_digest = _weights_digest(teacher_models[0])
        dtype = getattr(torch, t.dtype) if t.dtype else None
        metadata = _combine_metadata(member_metadata)
        if recipe.strategy is not None:  # a strategy gets the models as they are (it may train them further)
            pass
        elif len(teacher_models) == 1 and info.get("teacher_beams"):  # LiDAR Distillation: the denser scan
            from distill.methods.dense3d import BeamTeacher

            teacher = BeamTeacher(teacher_models[0], dtype=dtype, metadata=metadata)
        elif len(teacher_models) == 1:
            teacher = FrozenTeacher(teacher_models[0], dtype=dtype, metadata=metadata)
        else:
            teacher = EnsembleTeacher(teacher_models, combine=t.combine, temperature=t.temperature, metadata=metadata)
        if t.cache is not None:
            with main_process_first(_device(recipe.train)):  # rank 0 builds the cache, the others then open it
                teacher = recipe_cached_teacher(recipe, losses, teacher, data[0], progress=progress)
    if cache_only and recipe.teacher is not None and recipe.teacher.cache is not None:
        return [Path(recipe.teacher.cache.path)]

    if recipe.strategy is not None:
        models = teacher_models[0] if len(teacher_models) == 1 else (teacher_models or None)
        dirs = [_run_strategy(recipe, s, base / f"seed{s}", info, models, progress=progress, resume=resume,
                              fingerprint=recipe_fingerprint(recipe, losses, s)) for s in seeds]
        _report(base, dirs, recipe.name)
        return dirs

    dirs = []
    for s in seeds:
        run_dir = base / f"seed{s}"
        train_loader, val_loader, _ = build_data(recipe.data, seed=s)
        if hasattr(teacher, "prepare_loader"):  # a cached teacher: this seed's loader draws the cached views
            teacher.prepare_loader(train_loader)
        torch.manual_seed(s)
        student = build_student(recipe.student, info["num_classes"], info["in_channels"])
        if init_state is not None:  # LiDAR Distillation's student: a copy of the teacher (checked to fit above)
            student.load_state_dict(init_state)
        d = make_distiller(student, teacher)
        t0 = time.perf_counter()
        spec = recipe_fingerprint(recipe, losses, s, teacher_weights=init_digest)
        stage_time = 0.0
        if recipe.hint_stage is not None:
            console.print(f"hint stage ({recipe.hint_stage.method}, {recipe.hint_stage.train.epochs} epochs)")
            hint = fit_hint_stage(d, train_loader, method=recipe.hint_stage.method, weight=recipe.hint_stage.weight,
                                  seed=s, progress=progress, run_dir=run_dir / "hint_stage", resume=resume,
                                  fingerprint=spec, **_fit_kwargs(recipe.hint_stage.train))
            stage_time = hint.time_s or 0.0
        result = fit(d, train_loader, val_loader, run_dir=run_dir, seed=s, progress=progress, resume=resume,
                     fingerprint=spec, **_fit_kwargs(recipe.train), **task_evaluator(info))
        last = result.history[-1] if result.history else {}
        summary = {
            "name": recipe.name, "kind": "distill", "group": recipe.name, "losses": losses, "seed": s,
            "epochs": recipe.train.epochs, "last_acc": result.last_acc, "best_acc": result.best_acc,
            "best_epoch": result.best_epoch,
            # the training time of every session (a resumed run's included), hint stage and all
            "time_s": stage_time + result.time_s if result.time_s is not None else time.perf_counter() - t0,
            "teacher_acc": last.get("val_teacher_acc"), "agreement": last.get("val_agreement"),
            "kl_to_teacher": last.get("val_kl_to_teacher"),
            "teacher_label_smoothing": (metadata or {}).get("label_smoothing"),
            "data": info, "notes": ls_notes(metadata, losses) if teacher is not None else [],
        }
        if is_main_process():
            atomic_write_json(run_dir / "summary.json", summary, default=str)
        dirs.append(run_dir)
    _report(base, dirs, recipe.name)
    return dirs


def _teacher_data_spec(spec: DataSpec) -> DataSpec:
    """The data an in-run teacher trains on: the recipe's, but with ``data.options.teacher_beams`` the
    scenes scanned with that many beams (the teacher's input) instead of the student's ``beams``."""
    options = dict(spec.options)
    beams = options.pop("teacher_beams", None)
    if beams is None:
        return spec
    return spec.model_copy(update={"options": {**options, "beams": beams}})


def _run_strategy(recipe: Recipe, seed: int, run_dir: Path, info: dict[str, Any], teacher: Any, *,
                  progress: bool, resume: bool, fingerprint: dict[str, Any] | None = None) -> Path:
    """One seed of a recipe whose ``strategy`` trains instead of one ``fit``; writes ``summary.json``."""
    import inspect

    from distill.data.loader import InMemoryLoader
    from distill.recipes import RecipeError
    from distill.strategies.registry import strategy_info

    spec = recipe.strategy
    assert spec is not None
    fn = strategy_info(spec.name).fn
    params = inspect.signature(fn).parameters
    train_loader, val_loader, _ = build_data(recipe.data, seed=seed)
    kwargs: dict[str, Any] = dict(spec.args)
    if spec.labeled is not None and info.get("task", "classification") != "classification":
        scenes, n = train_loader.scenes, spec.labeled  # the first N scenes keep their boxes, the rest are unlabeled
        if n >= len(scenes):
            raise RecipeError(f"strategy.labeled={n} leaves no unlabeled data: the training set has {len(scenes)} scenes")
        unlabeled = scenes.subset(range(n, len(scenes))).loader(train_loader.batch_size, shuffle=True, seed=seed,
                                                                 masks=False)
        train_loader = scenes.subset(range(n)).loader(train_loader.batch_size, shuffle=True, seed=seed, masks=False)
        kwargs["unlabeled_loader"] = unlabeled
    elif spec.labeled is not None:  # the first N samples keep their labels, the rest are unlabeled data
        x, y, n = train_loader.inputs, train_loader.targets, spec.labeled
        if n >= len(x):
            raise RecipeError(f"strategy.labeled={n} leaves no unlabeled data: the training set has {len(x)} samples")
        loader_args = dict(batch_size=train_loader.batch_size, augment=train_loader.augment, seed=seed)
        train_loader = InMemoryLoader(x[:n], y[:n], return_index=True, **loader_args)
        if "unlabeled_loader" in params:
            kwargs["unlabeled_loader"] = InMemoryLoader(x[n:], None, **loader_args)
        else:
            kwargs["unlabeled"] = x[n:]
    # a data-free strategy is told the task's class count and image shape, never its images
    if "num_classes" in params and "num_classes" not in kwargs:
        kwargs["num_classes"] = info["num_classes"]
    if "image_shape" in params and "image_shape" not in kwargs and hasattr(train_loader, "inputs"):
        kwargs["image_shape"] = tuple(train_loader.inputs.shape[1:])
    if teacher is not None:
        if "teacher" not in params:
            raise RecipeError(f"strategy {spec.name!r} takes no teacher: remove the recipe's 'teacher'")
        kwargs["teacher"] = teacher
    fit_kwargs = {**_fit_kwargs(recipe.train), **task_evaluator(info)}
    epochs = fit_kwargs.pop("epochs")
    if resume:
        fit_kwargs["resume"] = True
    if fingerprint is not None:  # every fit (or cohort loop) of the strategy records the recipe's
        fit_kwargs["fingerprint"] = fingerprint
    torch.manual_seed(seed)

    def student() -> nn.Module:  # cohorts and generations build fresh students of the recipe's model
        return build_student(recipe.student, info["num_classes"], info["in_channels"])

    t0 = time.perf_counter()
    result = fn(student, train_loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
                **kwargs, **fit_kwargs)
    last = result.history[-1] if result.history else {}
    summary = {
        "name": recipe.name, "kind": "distill", "group": recipe.name, "strategy": spec.name,
        "strategy_args": spec.args, "losses": {}, "seed": seed, "epochs": epochs, "last_acc": result.last_acc,
        "best_acc": result.best_acc, "best_epoch": result.best_epoch,
        "time_s": _strategy_time(result, t0),
        # fit's history prefixes its validation keys with "val_"; a loop of its own (data-free) may not
        "teacher_acc": last.get("val_teacher_acc", last.get("teacher_acc")),
        "agreement": last.get("val_agreement", last.get("agreement")),
        "data": info, "notes": [],
        # a cohort's validation score (its accuracy, or the heatmap MSE of a dense strategy, which has no accuracy)
        **{k: getattr(result, k) for k in ("best_score", "last_score") if getattr(result, k, None) is not None},
    }
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "summary.json", summary, default=str)
    return run_dir


def _strategy_time(result: Any, t0: float) -> float:
    """A strategy's training time over every session (a resumed run's included): its own ``time_s``,
    else the sum of its stages' (chains), else the wall time since ``t0``."""
    if getattr(result, "time_s", None) is not None:
        return float(result.time_s)
    stages = getattr(result, "stages", None)
    if stages and all(getattr(st, "time_s", None) is not None for st in stages):
        return float(sum(st.time_s for st in stages))
    return time.perf_counter() - t0


# settings that may change when a run is resumed: where it runs, what it logs, kernel choice; the number
# of epochs is checked by fit itself (a run may be extended when its schedule does not depend on it)
_FREE_TRAIN_KEYS = {"device", "loggers", "deterministic"}


def recipe_fingerprint(recipe: Recipe, losses: dict[str, dict[str, Any]], seed: int,
                       teacher_weights: str | None = None) -> dict[str, Any]:
    """The fields of a validated recipe that determine one seed's result, as every checkpoint of the
    run records them and ``resume`` compares them (:func:`distill.train.rundir.check_fingerprint`).

    ``recipe.model_dump(mode="json")`` with the validated ``losses`` (``{"kd": 1.0}`` and
    ``{"kd": {"weight": 1.0}}`` are the same recipe) and ``seed``; left out, because they may change
    on resume without changing the result: ``seeds`` (the list; this run's seed is in), ``output_dir``,
    ``data.root``, ``device``/``loggers``/``deterministic`` of every ``train`` section,
    ``teacher.cache.path``/``verify``, and ``train.epochs``/``hint_stage.train.epochs`` (``fit`` checks
    those itself: a run may be extended when its schedule does not depend on the number of epochs).

    With ``student.init_from_teacher`` the student's first weights are the teacher's: the fingerprint
    then records ``student.init_from_teacher: true`` and ``teacher_weights``, the sha256 of the
    teacher's state dict (:func:`_weights_digest`), so a resumed student refuses a teacher that was
    retrained or replaced even under the same settings (or a teacher checkpoint file rewritten in
    place). Without it neither key is written: fingerprints of runs made before the field existed
    still match.
    """
    exclude: dict[str, Any] = {
        "seeds": True, "output_dir": True, "losses": True, "data": {"root"},
        "train": _FREE_TRAIN_KEYS | {"epochs"},
        "hint_stage": {"train": _FREE_TRAIN_KEYS | {"epochs"}},
        "teacher": {"train": _FREE_TRAIN_KEYS, "cache": {"path", "verify"}},
    }
    extra: dict[str, Any] = {}
    if recipe.student.init_from_teacher:
        extra["teacher_weights"] = teacher_weights
    else:
        exclude["student"] = {"init_from_teacher"}
    return normalize_fingerprint({**recipe.model_dump(mode="json", exclude=exclude), "losses": losses, "seed": seed,
                                  **extra})


def _weights_digest(model: nn.Module) -> str:
    """sha256 (hex) of a model's state dict (names, dtypes, shapes, bytes): what a student made by
    ``init_from_teacher`` started from."""
    from distill.synthesis.registry import teacher_fingerprint as state_digest

    return state_digest(model)


def _teacher_weights_known(recipe: Recipe, base: Path, teacher_models: list[nn.Module]) -> str | None:
    """Before any training, the digest of the teacher a student of ``init_from_teacher`` copies: the
    loaded checkpoint's, or the finished in-run teacher's that this run reuses; ``None`` when the
    teacher is still to be trained (or the recipe does not copy it)."""
    if not recipe.student.init_from_teacher or not teacher_models:
        return None
    if recipe.teacher is not None and recipe.teacher.members()[0].checkpoint is not None:
        return _weights_digest(teacher_models[0])
    from distill.train.checkpoint import load_model

    for _, _, tdir, _, now, saved in _teachers_trained_here(recipe, base):
        if (tdir / MODEL_FILE).is_file() and saved == now:
            model, _ = load_model(tdir / MODEL_FILE, copy.deepcopy(teacher_models[0]))
            return _weights_digest(model)
    return None


def _check_init_from_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """``student.init_from_teacher``: the student's state dict must have the teacher's keys and shapes
    (the models as built, before any training); the error names the first key that differs."""
    from distill.recipes import RecipeError

    mine, theirs = student.state_dict(), teacher.state_dict()
    for key in list(mine) + [k for k in theirs if k not in mine]:
        if key not in theirs or key not in mine:
            side = "student's" if key in mine else "teacher's"
            raise RecipeError(f"student.init_from_teacher: {key!r} is only in the {side} state dict: the student "
                              "copies the teacher's weights, so student.kwargs must build the teacher's model "
                              "(compare them with teacher.model.kwargs)")
        if mine[key].shape != theirs[key].shape:
            raise RecipeError(f"student.init_from_teacher: {key!r} has shape {tuple(mine[key].shape)} in the student "
                              f"and {tuple(theirs[key].shape)} in the teacher: the student copies the teacher's "
                              "weights, so student.kwargs must build the teacher's model (compare them with "
                              "teacher.model.kwargs)")


def teacher_fingerprint(recipe: Recipe, member: int) -> dict[str, Any]:
    """What ``teacher_spec.json`` records of an in-run teacher (``recipe.teacher.members()[member]``):
    its model, training protocol, label smoothing, data; a trained teacher is reused only when the
    recipe's is the same."""
    t = recipe.teacher
    assert t is not None
    spec = t.members()[member]
    # dense-target settings enter only when used: teachers trained before they existed stay valid
    unused = {"train_subset"} | ({"targets", "heatmap_sigma"} if recipe.data.targets == "labels" else set())
    # loggers change no weight: adding one (or the key itself, new) keeps a trained teacher valid
    train_spec = t.train.model_dump(mode="json", exclude={"loggers"}) if t.train else None
    return {"model": spec.model_dump(mode="json"), "train": train_spec,
            "label_smoothing": t.label_smoothing, "train_subset": t.train_subset,
            # the data the teacher trains on (with teacher_beams: its denser scan), not the student's scan
            "data": _teacher_data_spec(recipe.data).model_dump(mode="json", exclude=unused), "member": member}


def _check_folders(recipe: Recipe, losses: dict[str, dict[str, Any]], base: Path, seeds: list[int], *,
                   resume: bool, overwrite: bool, cache_only: bool, teacher_weights: str | None = None) -> None:
    """Before any training: may this run write its teacher and seed folders? (see :func:`run_recipe`).

    ``teacher_weights``: the digest of the teacher that ``student.init_from_teacher`` copies, when it
    exists already (:func:`_teacher_weights_known`); a seed resumed without it is refused."""
    from distill.train.checkpoint import load_checkpoint
    from distill.train.rundir import check_epochs

    for s in [] if cache_only else seeds:  # first: a folder that holds results is the first thing to say
        run_dir = base / f"seed{s}"
        if not has_results(run_dir, deep=True):
            if resume:
                console.print(f"[dim]nothing to resume in {run_dir}: starting afresh[/dim]")
            continue
        if overwrite:
            console.print(f"[yellow]replacing the results in {run_dir} (--overwrite)[/yellow]")
            clear_run_dir(run_dir)
            continue
        if not resume:
            raise RunFolderError(f"{run_dir} already holds results of a run: pass --resume to continue it or "
                                 "--overwrite to replace it (or --out to write elsewhere)")
        if recipe.student.init_from_teacher and teacher_weights is None:
            raise ResumeError(f"cannot resume {run_dir}: its student started as a copy of the teacher, and no "
                              "trained teacher is there to compare with (it would be trained anew, maybe to other "
                              "weights); restore the teacher folder, or pass --overwrite to start afresh")
        if recipe.strategy is not None:  # each stage's fit checks its own folder; here: something to resume
            if not any(run_dir.rglob("last.pt")):
                raise ResumeError(f"cannot resume {run_dir}: it holds results but no checkpoints/last.pt; "
                                  "pass --overwrite to replace them")
            continue
        now = recipe_fingerprint(recipe, losses, s, teacher_weights=teacher_weights)
        stages = [(run_dir, recipe.train)]
        if recipe.hint_stage is not None:
            stages.insert(0, (run_dir / "hint_stage", recipe.hint_stage.train))
        for folder, train in stages:
            last = folder / "checkpoints" / "last.pt"
            if last.is_file():
                state = load_checkpoint(last)
                check_fingerprint(state, now, last)
                check_epochs(state, train.epochs, train.schedule, train.milestones, last)
            elif has_results(folder):
                raise ResumeError(f"cannot resume {folder}: it holds results but no checkpoints/last.pt (the run "
                                  "ended before its first checkpoint, or the file was removed); pass --overwrite "
                                  "to replace them")
    # the teachers trained in the run: reused when their settings match, else retrained from nothing
    trained_here = _teachers_trained_here(recipe, base) if recipe.kind == "distill" else []
    for i, _, tdir, _, now, saved in trained_here:
        finished = (tdir / MODEL_FILE).is_file()
        if (finished and saved == now) or not has_results(tdir):
            continue  # reused as it is, or trained afresh in an empty folder
        if overwrite:
            console.print(f"[yellow]retraining the teacher in {tdir} from nothing (--overwrite)[/yellow]")
            clear_run_dir(tdir)
            continue
        if finished:
            changed = "; ".join(f"{k}: trained with {json.dumps(a)}, now {json.dumps(b)}"
                                for k, a, b in fingerprint_diff(saved, now)) if saved is not None else \
                "its teacher_spec.json is missing"
            raise SpecMismatchError(
                f"the teacher in {tdir} was trained with other settings ({changed}): pass --overwrite to retrain it "
                "from nothing (its folder is cleared, the seeds' results too), or restore the settings it was "
                "trained with", fingerprint_diff(saved, now) if saved is not None else [])
        last = tdir / "checkpoints" / "last.pt"
        if not resume:
            raise RunFolderError(f"{tdir} holds an unfinished teacher's results: pass --resume to continue it or "
                                 "--overwrite to train it afresh")
        if not last.is_file():
            raise ResumeError(f"cannot resume the teacher in {tdir}: it holds results but no checkpoints/last.pt; "
                              "pass --overwrite to train it afresh")
        check_fingerprint(load_checkpoint(last), {**now, "seed": seeds[0] + i}, last)


def _combine_metadata(members: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One teacher's metadata, or an ensemble's: label smoothing known only if known for every member."""
    if not members or any(m is None or m.get("label_smoothing") is None for m in members):
        return None if len(members) != 1 else members[0]
    return {"label_smoothing": max(float(m["label_smoothing"]) for m in members if m is not None),
            "members": members}


def _train_specs(recipe: Recipe) -> list[tuple[str, TrainSpec]]:
    """Every training protocol of a recipe with its key."""
    specs = [("train", recipe.train)]
    if recipe.teacher is not None and recipe.teacher.train is not None:
        specs.append(("teacher.train", recipe.teacher.train))
    if recipe.hint_stage is not None:
        specs.append(("hint_stage.train", recipe.hint_stage.train))
    return specs


def _check_devices(recipe: Recipe) -> None:
    """Each ``train.device`` exists on this machine; deterministic runs get cuBLAS's workspace setting
    now, before anything in this process touches CUDA."""
    from distill.recipes import RecipeError
    from distill.teachers import require_device
    from distill.train.loop import set_cublas_workspace_config

    for key, spec in _train_specs(recipe):
        if spec.device is not None:
            try:
                require_device(spec.device, f"{key}.device")
            except RuntimeError as e:
                raise RecipeError(f"{recipe.name}: {e}") from None
        if spec.deterministic:
            set_cublas_workspace_config()


def _width(model: nn.Module, x: torch.Tensor) -> int:
    """The number of outputs (logits' last dimension) of ``model`` on inputs ``x``, in eval mode."""
    from distill.taps import logits_of

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return int(logits_of(model(x)).shape[-1])
    finally:
        for m, mode in modes.items():
            m.training = mode


def _check_widths(recipe: Recipe, losses: dict[str, dict[str, Any]], student: nn.Module, teacher: Any,
                  data: tuple[Any, Any, dict[str, Any]]) -> None:
    """Before any training: the student (and each teacher) has an output per class of the data, and
    the student as many as the teacher when a loss compares their logits; a clear error names the keys."""
    from distill.distiller import reads_teacher_logits
    from distill.methods import create_method
    from distill.recipes import RecipeError

    if recipe.data.targets != "labels" or recipe.data.task != "classification":
        return  # dense target maps or a dense task: the outputs are not one logit per class
    info = data[2]
    x = next(iter(data[1])).inputs[:2]  # two validation images: eval mode, nothing is trained
    k = info["num_classes"]
    s_width = _width(student, x)
    models = teacher if isinstance(teacher, list) else [teacher] if teacher is not None else []
    t_keys = ["teacher.model"] if recipe.teacher is not None and recipe.teacher.model is not None else \
        [f"teacher.ensemble[{i}]" for i in range(len(models))]
    widths = [(key, _width(m, x)) for key, m in zip(t_keys, models)]
    for key, width in [("student", s_width), *widths]:
        if width < k:
            raise RecipeError(f"{recipe.name}: {key} has {width} outputs, but data set {info['dataset']!r} has {k} "
                              f"classes (labels 0..{k - 1}): remove {key}.kwargs.num_classes (the data's count is "
                              f"used by default) or set it to {k}")
    readers = [n for n, kw in losses.items() if reads_teacher_logits(create_method(n, **kw))]
    for key, width in widths:
        if readers and width != s_width:
            raise RecipeError(f"{recipe.name}: the student has {s_width} outputs but {key} has {width}, and the "
                              f"losses {readers} compare their logits class by class: make student.kwargs.num_classes "
                              f"and {key}.kwargs.num_classes equal")


def _check_taps(losses: dict[str, dict[str, Any]], student: nn.Module, teacher: Any) -> None:
    """Resolve every method's tap paths, naming the recipe key of a bad one."""
    from distill.methods import create_method
    from distill.recipes import RecipeError
    from distill.taps import TapError, resolve

    models = teacher if isinstance(teacher, list) else [teacher] if teacher is not None else []
    for name, kw in losses.items():
        method = create_method(name, **kw)
        for path in method.student_taps:
            try:
                resolve(student, path, model_name="student")
            except TapError as e:
                raise RecipeError(f"losses.{name}: {e}") from None
        if method.needs_teacher and len(models) == 1:
            for path in method.teacher_taps:
                try:
                    resolve(models[0], path, model_name="teacher")
                except TapError as e:
                    raise RecipeError(f"losses.{name}: {e}") from None


def _report(base: Path, dirs: list[Path], title: str) -> None:
    from distill.report import plot_runs, read_run, write_report

    if not is_main_process():  # under torchrun: one report, written by rank 0
        return
    runs = [read_run(d) for d in dirs]
    plot_runs(base, runs)
    write_report(base, runs, title=title)


# ----------------------------------------------------------------------------------- the teacher cache


def teacher_taps_of(losses: dict[str, dict[str, Any]]) -> list[str]:
    """The teacher taps the recipe's losses read (what a cache must hold for them)."""
    from distill.methods import create_method

    paths: dict[str, None] = {}
    for name, kw in losses.items():
        m = create_method(name, **kw)
        if m.needs_teacher:
            paths.update(dict.fromkeys(m.teacher_taps))
    return list(paths)


def recipe_cached_teacher(recipe: Recipe, losses: dict[str, dict[str, Any]], teacher: Any, loader: Any,
                          *, progress: bool = True) -> Any:
    """The cached teacher a recipe's ``teacher.cache`` asks for: built on first use from ``teacher``
    over ``loader``'s data and augmentation, checked against both on every later use."""
    from distill.cache import MANIFEST, CachedTeacher, build_cache
    from distill.data.augment import Augment, split_mixup
    from distill.recipes import RecipeError

    assert recipe.teacher is not None and recipe.teacher.cache is not None
    spec = recipe.teacher.cache
    path = Path(spec.path)
    stages = [recipe.train.epochs] + ([recipe.hint_stage.train.epochs] if recipe.hint_stage is not None else [])
    augmented = spec.views == "augmented" and loader.augment is not None
    if not augmented and isinstance(loader.augment, Augment) and split_mixup(loader.augment)[1] is not None:
        # crops keep most of a sample ("global" soft labels, FKD); a mixed view is two samples
        raise RecipeError("teacher.cache: views 'plain' stores the teacher's outputs on un-mixed inputs, but "
                          "data.augment.mixup_alpha mixes every view with another sample: use views 'augmented'")
    if not (path / MANIFEST).exists():
        temps = sorted(set(_teacher_temperatures(losses)))
        temperature = spec.temperature
        if temperature is None:
            if spec.topk is not None and len(temps) > 1:
                raise RecipeError(f"teacher.cache: the losses use temperatures {temps}; a top-k cache's tail is exact at "
                                  "one: set teacher.cache.temperature")
            temperature = temps[0] if temps else 1.0
        taps = spec.taps if spec.taps is not None else teacher_taps_of(losses)
        loader.augment_seed = spec.augment_seed
        build_cache(teacher, loader.inputs, path, targets=loader.targets, topk=spec.topk, dtype=spec.dtype,
                    temperature=temperature, augment=loader.augment if augmented else None,
                    epochs=(spec.epochs or max(stages)) if augmented else None, augment_seed=spec.augment_seed,
                    taps=taps, batch_size=max(256, getattr(loader, "batch_size", 256)), device=_device(recipe.train),
                    progress=progress)
    cached = CachedTeacher(path, teacher=teacher, verify=spec.verify, check_inputs=augmented or loader.augment is None)
    if cached.cache.views != ("augmented" if augmented else "plain"):
        raise RecipeError(f"teacher.cache: {str(path)!r} holds {cached.cache.views} views, the recipe asks for "
                          f"{'augmented' if augmented else 'plain'} ones: delete it or change teacher.cache.views")
    if augmented and (cached.cache.epochs or 0) < max(stages):
        raise RecipeError(f"teacher.cache: {str(path)!r} covers {cached.cache.epochs} epoch(s) of augmented views, the "
                          f"recipe trains {max(stages)}: delete it to rebuild, or build it with --epochs {max(stages)}")
    if cached.cache.topk is not None and cached.cache.topk < cached.cache.num_classes:
        off = [T for T in _teacher_temperatures(losses) if T != cached.cache.temperature]
        if off:
            raise RecipeError(f"teacher.cache: {str(path)!r} stores top-{cached.cache.topk} logits with the tail exact "
                              f"at T={cached.cache.temperature:g}, but the losses use T={sorted(set(off))}")
    cached.prepare_loader(loader)
    return cached


# ----------------------------------------------------------------------------------- kind: synth


def run_synth_recipe(recipe: SynthRecipe, *, out_dir: str | Path | None = None, progress: bool = True,
                     overwrite: bool = False) -> Path:
    """Make, evaluate and save the synthetic set of a ``kind: synth`` recipe; returns its folder.

    The folder ``OUT/NAME`` (``OUT``: ``out_dir`` or the recipe's ``output_dir``) receives
    ``synthetic.safetensors`` + ``manifest.json`` (:meth:`~distill.data.synthetic.SyntheticSet.save`),
    ``report.json`` (the synthesizer, its paper, the times and the evaluation: every accuracy,
    mean ± std) and ``grid.png`` (one row per class). A folder that already holds files is refused
    before any work unless ``overwrite``.
    """
    from distill.data import get_dataset
    from distill.recipes import validate_synthesizer_args
    from distill.synthesis.evaluate import evaluate_synthetic
    from distill.synthesis.grid import save_class_grid
    from distill.synthesis.registry import synthesizer_info, teacher_fingerprint
    from distill.teachers import require_device

    folder = Path(out_dir or recipe.output_dir) / recipe.name
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise FileExistsError(f"{str(folder)!r} already holds files; pass --overwrite to replace the synthetic set")
    args = validate_synthesizer_args(recipe.synthesizer)
    info = synthesizer_info(recipe.synthesizer.name)
    device = torch.device(recipe.device) if recipe.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require_device(device, "device")
    if "device" in inspect.signature(info.fn).parameters and "device" not in args:
        args["device"] = str(device)
    spec = recipe.data
    test = get_dataset(spec.name, spec.root, split="test") if spec is not None else None
    manifest: dict[str, Any] = {"recipe": recipe.model_dump(mode="json")}
    if spec is not None:
        manifest["source"] = {"dataset": spec.name, "root": spec.root, "options": {}}
        manifest["normalization"] = {"mean": list(test.mean), "std": list(test.std)}
    t0 = time.perf_counter()
    if info.family == "dataset":
        train = get_dataset(spec.name, spec.root, split="train")
        x, y = train.inputs, train.targets
        if spec.train_subset is not None:
            x, y = x[: spec.train_subset], y[: spec.train_subset]
        synthetic = info.fn(x, y, ipc=recipe.ipc, num_classes=train.num_classes, seed=recipe.seed,
                            progress=progress, **args)
    else:
        num_classes = recipe.num_classes or test.num_classes
        shape = tuple(recipe.image_shape) if recipe.image_shape else tuple(int(s) for s in test.inputs.shape[1:])
        teacher = build_model(recipe.teacher, num_classes, shape[0])
        from distill.train.checkpoint import load_model

        teacher, _ = load_model(recipe.teacher.checkpoint, teacher)
        teacher = teacher.to(device).eval()
        manifest["teacher"] = {"fingerprint": teacher_fingerprint(teacher), "name": recipe.teacher.name,
                               "kwargs": recipe.teacher.kwargs, "checkpoint": recipe.teacher.checkpoint}
        synthetic = info.fn(teacher, ipc=recipe.ipc, num_classes=num_classes, image_shape=shape, seed=recipe.seed,
                            progress=progress, **args)
    synth_time = time.perf_counter() - t0
    synthetic.manifest = {**synthetic.manifest, **manifest, "method": info.name, "family": info.family,
                          "paper": info.paper.cite(), "synth_time_s": synth_time}
    evaluation = None
    if recipe.evaluate is not None:
        e = recipe.evaluate
        # MTT learns the lr its set is trained with, and the paper evaluates the set with it
        lr = e.lr if e.lr is not None else float(synthetic.manifest.get("learned_lr", 0.01))
        evaluation = evaluate_synthetic(synthetic, (test.inputs, test.targets), model=e.model.name,
                                        model_kwargs=e.model.kwargs, evaluations=e.evaluations, epochs=e.epochs,
                                        lr=lr, lr_decay=e.lr_decay, batch_size=e.batch_size, dsa=e.dsa,
                                        dsa_strategy=e.dsa_strategy, seed=e.seed, progress=progress,
                                        device=device).as_dict()
    synthetic.save(folder, overwrite=overwrite)
    report = {"name": recipe.name, "synthesizer": info.name, "family": info.family, "paper": info.paper.cite(),
              "ipc": recipe.ipc, "count": len(synthetic), "num_classes": synthetic.num_classes,
              "synth_time_s": synth_time, "evaluation": evaluation}
    atomic_write_json(folder / "report.json", report)
    mean, std = synthetic.normalization
    title = f"{info.name}, {recipe.ipc} per class" + (
        f": {evaluation['mean']:.2f} ± {evaluation['std']:.2f}%" if evaluation else "")
    save_class_grid(folder / "grid.png", synthetic.images, synthetic.labels, synthetic.num_classes,
                    per_class=min(recipe.ipc, 10), mean=mean, std=std, title=title)
    return folder
