"""Bad input gets a clear error, naming what is wrong, before any work is wasted (issue 10).

Recipes (parsed, then run), the Python API (Distiller, fit, methods), data (empty, NaN/inf pixels),
devices and teacher-cache manifests; then the training loop's guards: fp16 with a confident
teacher, strict and restored determinism, the caller's random state, non-finite gradients, the
schedule under a skipping gradient scaler and the asynchronous NaN check. Everything runs on the
embedded digits data or tiny tensors.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distill.data
from distill import Distiller, fit
from distill import functional as DF
from distill import runner
from distill.batch import Batch
from distill.cache import CacheError, build_cache, open_cache
from distill.data import InMemoryLoader, get_dataset
from distill.data.loader import NonFiniteInputError
from distill.methods import KD, Method, create_method
from distill.models import create
from distill.recipes import RecipeError, parse_recipe
from distill.runner import run_recipe
from distill.teachers import FrozenTeacher
from distill.train import NonFiniteLossError, load_checkpoint

K = 10
TRAIN = {"epochs": 1, "schedule": "constant", "device": "cpu"}
HAS_CUDA = torch.cuda.is_available()


def recipe(**overrides: Any) -> dict[str, Any]:
    """A small distillation recipe on digits (96 training images, a teacher trained in-run)."""
    data: dict[str, Any] = {
        "name": "bad",
        "data": {"name": "digits", "val_split": "val", "train_subset": 96, "batch_size": 32},
        "student": {"name": "cnn_digits_student"},
        "teacher": {"model": {"name": "cnn_digits_teacher"}, "train": dict(TRAIN)},
        "losses": {"ce": 1.0, "kd": {"T": 4.0}},
        "train": dict(TRAIN),
    }
    data.update(overrides)
    return data


@pytest.fixture(autouse=True)
def _restore_global_modes():
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    bench, cudnn_det = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = bench, cudnn_det


@pytest.fixture(scope="module")
def digits():
    tr = get_dataset("digits", split="train")
    va = get_dataset("digits", split="val")
    return tr.inputs[:128].clone(), tr.targets[:128].clone(), va.inputs[:64].clone(), va.targets[:64].clone()


def _student(seed: int = 0, num_classes: int = K) -> nn.Module:
    torch.manual_seed(seed)
    return create("cnn", widths=(4, 8), num_classes=num_classes)


def _teacher(seed: int = 100, num_classes: int = K) -> nn.Module:
    torch.manual_seed(seed)
    return create("cnn", widths=(8, 16), num_classes=num_classes)


def _loaders(digits, batch_size: int = 32):
    xt, yt, xv, yv = digits
    return InMemoryLoader(xt, yt, batch_size, seed=0), InMemoryLoader(xv, yv, 64, shuffle=False)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())


# ------------------------------------------------------------------------------ recipes: parsing

PARSE_CASES = [
    # (id, recipe overrides, what the message must name)
    ("device_gpu", {"train": {**TRAIN, "device": "gpu"}}, ["train.device", "'gpu'", "cuda"]),
    ("device_gpu0", {"train": {**TRAIN, "device": "gpu:0"}}, ["train.device", "'gpu:0'"]),
    ("device_bad_index", {"train": {**TRAIN, "device": "cuda:x"}}, ["train.device", "'cuda:x'"]),
    ("device_tpu", {"train": {**TRAIN, "device": "tpu"}}, ["train.device", "'tpu'"]),
    ("device_meta", {"train": {**TRAIN, "device": "meta"}}, ["train.device", "'meta'"]),
    ("teacher_device", {"teacher": {"model": {"name": "cnn_digits_teacher"}, "train": {**TRAIN, "device": "GPU"}}},
     ["teacher.train.device", "'GPU'"]),
    ("seeds_twice", {"seeds": [0, 0]}, ["seeds", "[0]"]),
    ("seeds_repeat", {"seeds": [1, 2, 1]}, ["seeds", "[1]"]),
    ("name_escapes", {"name": "../../x"}, ["name", "'../../x'", "OUTPUT_DIR/NAME"]),
    ("name_slash", {"name": "a/b"}, ["name", "'a/b'"]),
    ("name_dotdot", {"name": ".."}, ["name", "'..'"]),
    ("name_backslash", {"name": "a\\b"}, ["name"]),
    ("weight_negative", {"losses": {"ce": -1.0, "kd": {"T": 4.0}}}, ["losses.ce.weight", "-1.0", ">= 0"]),
    ("weight_nan", {"losses": {"ce": 1.0, "kd": {"T": 4.0, "weight": float("nan")}}}, ["losses.kd.weight", "nan"]),
    ("weight_inf", {"losses": {"ce": float("inf"), "kd": {"T": 4.0}}}, ["losses.ce.weight", "inf"]),
    ("weight_negative_dict", {"losses": {"ce": 1.0, "kd": {"T": 4.0, "weight": -0.1}}}, ["losses.kd.weight", "-0.1"]),
    ("T_zero", {"losses": {"ce": 1.0, "kd": {"T": 0}}}, ["losses.kd.T", "0"]),
    ("T_negative", {"losses": {"ce": 1.0, "kd": {"T": -2.0}}}, ["losses.kd.T", "-2"]),
    ("T_nan", {"losses": {"ce": 1.0, "kd": {"T": float("nan")}}}, ["losses.kd.T", "nan"]),
    ("dkd_T_zero", {"losses": {"ce": 1.0, "dkd": {"T": 0.0}}}, ["losses.dkd.T"]),
    ("dkd_beta_nan", {"losses": {"ce": 1.0, "dkd": {"beta": float("nan")}}}, ["losses.dkd.beta", "nan"]),
    ("milestones_unsorted", {"train": {**TRAIN, "epochs": 4, "schedule": "multistep", "milestones": [3, 1]}},
     ["train.milestones", "[3, 1]", "increasing"]),
    ("milestones_repeated", {"train": {**TRAIN, "epochs": 4, "schedule": "multistep", "milestones": [2, 2]}},
     ["train.milestones", "[2, 2]"]),
    ("teacher_milestones", {"teacher": {"model": {"name": "cnn_digits_teacher"},
                                        "train": {**TRAIN, "epochs": 4, "milestones": [3, 2]}}},
     ["teacher.train.milestones", "[3, 2]"]),
]


@pytest.mark.parametrize("overrides,needles", [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_recipe_refused_at_parse_naming_the_key(overrides: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe(**overrides))
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_a_good_recipe_still_parses() -> None:
    parse_recipe(recipe(seeds=[0, 1], name="ok_name", train={**TRAIN, "device": "cuda:1", "milestones": None}))


# ------------------------------------------------------------------------------ recipes: running


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any model training or fit the runner starts (there must be none)."""
    calls: list[str] = []
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: calls.append("train_model"))
    import distill.train

    monkeypatch.setattr(distill.train, "fit", lambda *a, **k: calls.append("fit"))
    return calls


def _run_error(data: dict[str, Any], tmp_path: Path, calls: list[str], exc: type = RecipeError) -> str:
    with pytest.raises(exc) as info:
        run_recipe(parse_recipe(data), out_dir=tmp_path, progress=False)
    assert calls == [], "work started before the error"
    assert not list(tmp_path.rglob("teacher")), "a teacher folder was created"
    assert not list(tmp_path.rglob("metrics.jsonl"))
    return str(info.value)


def test_student_with_fewer_classes_than_the_data(tmp_path: Path, no_training: list[str]) -> None:
    msg = _run_error(recipe(student={"name": "cnn_digits_student", "kwargs": {"num_classes": 5}}), tmp_path,
                     no_training)
    assert "student" in msg and "5 outputs" in msg and "10 classes" in msg and "student.kwargs.num_classes" in msg


def test_student_and_teacher_class_counts_differ(tmp_path: Path, no_training: list[str]) -> None:
    msg = _run_error(recipe(teacher={"model": {"name": "cnn_digits_teacher", "kwargs": {"num_classes": 12}},
                                     "train": dict(TRAIN)}), tmp_path, no_training)
    assert "10 outputs" in msg and "12" in msg
    assert "student.kwargs.num_classes" in msg and "teacher.model.kwargs.num_classes" in msg and "kd" in msg


def test_ensemble_member_class_count_differs(tmp_path: Path, no_training: list[str]) -> None:
    members = [{"name": "cnn_digits_teacher"}, {"name": "cnn_digits_teacher", "kwargs": {"num_classes": 11}}]
    msg = _run_error(recipe(teacher={"ensemble": members, "train": dict(TRAIN)}), tmp_path, no_training)
    assert "teacher.ensemble[1]" in msg and "11" in msg


def test_feature_only_losses_allow_other_class_counts(tmp_path: Path, no_training: list[str]) -> None:
    """FitNets reads features only: a teacher with more classes is fine (no error, the run goes on)."""
    data = recipe(teacher={"model": {"name": "cnn_digits_teacher", "kwargs": {"num_classes": 12}},
                           "train": dict(TRAIN)},
                  losses={"ce": 1.0, "fitnet": {"student_tap": "stage2", "teacher_tap": "stage2"}})
    with pytest.raises(Exception):  # the fake fit returns None: the runner stops after it, past every check
        run_recipe(parse_recipe(data), out_dir=tmp_path, progress=False)
    assert "train_model" in no_training


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("key,device", [("train", "cuda"), ("teacher.train", "cuda:3")])
def test_cuda_on_a_cpu_build_is_refused_before_the_teacher(key: str, device: str, tmp_path: Path,
                                                         no_training: list[str]) -> None:
    if key == "train":
        data = recipe(train={**TRAIN, "device": device})
    else:
        data = recipe(teacher={"model": {"name": "cnn_digits_teacher"}, "train": {**TRAIN, "device": device}})
    msg = _run_error(data, tmp_path, no_training)
    assert f"{key}.device" in msg and repr(device) in msg and "CUDA" in msg


@pytest.mark.parametrize("data,needles", [
    ({"name": "digits", "val_split": "val", "train_subset": 100000}, ["data.train_subset=100000", "digits"]),
    ({"name": "digits", "val_split": "val", "train_subset": 96, "batch_size": 200}, ["data.batch_size=200", "96"]),
])
def test_subset_or_batch_larger_than_the_data(data: dict[str, Any], needles: list[str], tmp_path: Path,
                                              no_training: list[str]) -> None:
    msg = _run_error(recipe(data=data), tmp_path, no_training)
    for needle in needles:
        assert needle in msg, msg


def _patched_digits(monkeypatch: pytest.MonkeyPatch, change) -> None:
    real = distill.data.get_dataset

    def fake(name: str, root: Any = None, split: str = "train") -> Any:
        ds = real(name, root, split=split)
        if split == "train":
            change(ds)
        return ds

    monkeypatch.setattr(distill.data, "get_dataset", fake)


def test_empty_data_set(tmp_path: Path, no_training: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def empty(ds: Any) -> None:
        ds.inputs, ds.targets = ds.inputs[:0], ds.targets[:0]

    _patched_digits(monkeypatch, empty)
    msg = _run_error(recipe(), tmp_path, no_training)
    assert "data set 'digits' has 0 training samples" in msg


@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_pixels_in_a_recipe_data_set(value: float, word: str, tmp_path: Path, no_training: list[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def poison(ds: Any) -> None:
        ds.inputs = ds.inputs.clone()
        ds.inputs[3, 0, 2, 2] = value
        ds.inputs[7, 0, 1, 1] = value

    _patched_digits(monkeypatch, poison)
    msg = _run_error(recipe(), tmp_path, no_training, NonFiniteInputError)
    assert "data set 'digits'" in msg and f"2 {word}" in msg and "2 sample(s)" in msg


def test_deterministic_recipe_sets_cublas_before_any_model_is_built(tmp_path: Path, no_training: list[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen: list[str | None] = []
    real = runner.build_model
    monkeypatch.setattr(runner, "build_model",
                        lambda *a, **k: seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG")) or real(*a, **k))
    with pytest.raises(Exception):  # the fake training stops the run after the checks
        run_recipe(parse_recipe(recipe(train={**TRAIN, "deterministic": True})), out_dir=tmp_path, progress=False)
    assert seen and seen[0] == ":4096:8"


# ------------------------------------------------------------------------------ Python API


@pytest.mark.parametrize("build,needles", [
    (lambda: KD(T=0), ["T", "0"]),
    (lambda: KD(T=float("nan")), ["T", "nan"]),
    (lambda: KD(T=-1.0), ["T", "-1"]),
    (lambda: KD(weight=-0.5), ["weight", "-0.5"]),
    (lambda: KD(weight=float("nan")), ["weight", "nan"]),
    (lambda: create_method("dkd", beta=float("nan")), ["dkd", "beta"]),
    (lambda: create_method("ce", weight=float("inf")), ["weight", "inf"]),
    (lambda: Distiller(_student(), _teacher(), losses={"kd": (-1.0, KD())}), ["kd", "weight", "-1.0"]),
    (lambda: Distiller(_student(), None, losses={"ce": float("nan")}), ["ce", "weight", "nan"]),
], ids=["kd_T0", "kd_Tnan", "kd_Tneg", "weight_neg", "weight_nan", "dkd_beta_nan", "ce_weight_inf",
        "distiller_tuple_neg", "distiller_float_nan"])
def test_method_arguments_refused_at_construction(build, needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        build()
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_distiller_prepare_compares_the_logits_widths(digits, tmp_path: Path) -> None:
    train, val = _loaders(digits)
    student = _student(num_classes=12)
    d = Distiller(student, _teacher(num_classes=K), losses={"ce": 1.0, "kd": 1.0})
    with pytest.raises(ValueError) as info:
        d.prepare(next(iter(train)))
    msg = str(info.value)
    assert "12 classes" in msg and "10" in msg and "kd" in msg
    before = _params(student)
    with pytest.raises(ValueError, match="12 classes"):
        fit(d, train, val, epochs=1, run_dir=tmp_path, progress=False)
    assert _unchanged(student, before) and not (tmp_path / "metrics.jsonl").exists()


def test_feature_losses_accept_other_teacher_widths(digits) -> None:
    train, _ = _loaders(digits)
    d = Distiller(_student(), _teacher(num_classes=12),
                  losses={"ce": 1.0, "fitnet": {"student_tap": "stage2", "teacher_tap": "stage2"}})
    d.prepare(next(iter(train)))  # no error: FitNets compares features, not logits


@pytest.mark.parametrize("kwargs,exc,needles", [
    ({"device": "gpu"}, ValueError, ["'gpu'", "cuda"]),
    ({"device": "tpu:0"}, ValueError, ["'tpu:0'"]),
    ({"nan_check_every": 0}, ValueError, ["nan_check_every", "0"]),
    ({"epochs": 4, "schedule": "multistep", "milestones": [3, 1]}, ValueError, ["[3, 1]", "increasing"]),
    ({"epochs": 4, "schedule": "multistep", "milestones": [2, 2]}, ValueError, ["[2, 2]"]),
])
def test_fit_arguments_refused_before_training(digits, tmp_path: Path, kwargs: dict[str, Any], exc: type,
                                               needles: list[str]) -> None:
    train, _ = _loaders(digits)
    d = Distiller(_student(), None, losses={"ce": 1.0})
    before = _params(d.student)
    with pytest.raises(exc) as info:
        fit(d, train, run_dir=tmp_path, progress=False, **{"epochs": 1, **kwargs})
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert _unchanged(d.student, before) and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_fit_on_cuda_without_cuda(digits, tmp_path: Path) -> None:
    train, _ = _loaders(digits)
    d = Distiller(_student(), None, losses={"ce": 1.0})
    with pytest.raises(RuntimeError, match=r"device: 'cuda' was asked for.*no CUDA"):
        fit(d, train, epochs=1, device="cuda", run_dir=tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("where", ["train", "val", "first_batch"])
def test_fit_refuses_non_finite_inputs(digits, tmp_path: Path, where: str) -> None:
    xt, yt, xv, yv = (t.clone() for t in digits)
    if where == "val":
        xv[5, 0, 3, 3] = float("inf")
    else:
        xt[0, 0, 0, 0] = float("nan")
        xt[0, 0, 0, 1] = float("nan")
        xt[1, 0, 4, 4] = float("-inf")
    if where == "first_batch":  # a loader that is not in memory: its first batch is checked
        train: Any = DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=False)
    else:
        train = InMemoryLoader(xt, yt, 32, seed=0)
    d = Distiller(_student(), None, losses={"ce": 1.0})
    before = _params(d.student)
    with pytest.raises(NonFiniteInputError) as info:
        fit(d, train, InMemoryLoader(xv, yv, 64, shuffle=False), epochs=1, run_dir=tmp_path, progress=False)
    msg = str(info.value)
    expected = {"train": ["training set", "2 NaN", "1 inf", "2 sample(s)"],
                "val": ["validation set", "0 NaN", "1 inf"],
                "first_batch": ["first training batch", "2 NaN", "1 inf"]}[where]
    for needle in expected:
        assert needle in msg, msg
    assert _unchanged(d.student, before) and not (tmp_path / "metrics.jsonl").exists()


def test_fit_on_an_empty_loader_names_it(tmp_path: Path) -> None:
    d = Distiller(_student(), None, losses={"ce": 1.0})
    loader = InMemoryLoader(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long), 8, drop_last=True)
    with pytest.raises(ValueError, match=r"yielded no batch \(it holds 3 samples\)"):
        fit(d, loader, epochs=1, run_dir=tmp_path, progress=False)


# ------------------------------------------------------------------------------ cache manifests


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    path = tmp_path_factory.mktemp("cache") / "c"
    build_cache(teacher, torch.randn(12, 1, 4, 4), path, progress=False)
    return path


def _drop(manifest: dict[str, Any], key: str) -> None:
    if key == "teacher.fingerprint":
        del manifest["teacher"]["fingerprint"]
    elif key == "blocks[0].sha256":
        del manifest["blocks"][0]["sha256"]
    elif key.startswith("arrays."):
        name = next(iter(manifest["arrays"]))
        del manifest["arrays"][name]["offset"]
    else:
        del manifest[key]


@pytest.mark.parametrize("key", ["blocks", "num_classes", "arrays", "file_bytes", "teacher.fingerprint",
                                 "blocks[0].sha256", "arrays.offset"])
def test_cache_manifest_missing_a_key_names_file_and_key(built_cache: Path, tmp_path: Path, key: str) -> None:
    import shutil

    path = tmp_path / "c"
    shutil.copytree(built_cache, path)
    manifest = json.loads((path / "manifest.json").read_text())
    _drop(manifest, key)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError) as info:
        open_cache(path)
    msg = str(info.value)
    assert str(path / "manifest.json") in msg
    shown = "offset" if key == "arrays.offset" else key
    assert shown in msg and "missing" in msg, msg


# ------------------------------------------------------------------------------ fp16


class _Confident(nn.Module):
    """A teacher whose logits reach 7e4 (beyond float16's 65504)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return z / z.abs().amax(1, keepdim=True) * 7e4


def test_teacher_runs_outside_fp16_autocast(digits) -> None:
    teacher = FrozenTeacher(_Confident(_teacher()))
    with torch.autocast("cpu", dtype=torch.float16):
        view = teacher(Batch(digits[0][:4]))
    assert view["logits"].dtype == torch.float32
    assert torch.isfinite(view["logits"]).all() and view["logits"].abs().max() > 6.9e4


def test_bf16_autocast_still_reaches_the_teacher(digits) -> None:
    teacher = FrozenTeacher(_teacher())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert teacher(Batch(digits[0][:4]))["logits"].dtype == torch.bfloat16


@pytest.mark.parametrize("loss", [
    lambda s, t: DF.kd_loss(s, t, 0.5),
    lambda s, t: DF.dist_loss(s, t, 1.0, 1.0, 0.5),
    lambda s, t: DF.dkd_loss(s, t, torch.tensor([0, 1]), 1.0, 8.0, 0.5),
], ids=["kd", "dist", "dkd"])
def test_losses_take_their_softmax_in_fp32(loss) -> None:
    s = torch.tensor([[6e4, 0.0, -6e4], [1.0, 6e4, 2.0]], dtype=torch.float16)
    t = torch.tensor([[5e4, 1.0, 0.0], [0.0, 6e4, 1.0]], dtype=torch.float16)
    out = loss(s, t)
    assert out.dtype == torch.float32 and torch.isfinite(out), out


def test_fp16_training_with_a_confident_teacher(digits) -> None:
    train, _ = _loaders(digits)
    d = Distiller(_student(), _Confident(_teacher()), losses={"ce": 1.0, "kd": {"T": 4.0}})
    result = fit(d, train, epochs=1, amp="fp16", device="cpu", schedule="constant", progress=False)
    assert np.isfinite(result.history[-1]["train_kd"])


class _NaNLoss(Method):
    needs_teacher = False

    def forward(self, student_view, teacher_view, batch):
        return student_view["logits"].sum() * float("nan")


def test_non_finite_loss_under_fp16_says_fp16(digits) -> None:
    train, _ = _loaders(digits)
    d = Distiller(_student(), None, losses={"ce": 1.0, "boom": _NaNLoss()})
    with pytest.raises(NonFiniteLossError, match="fp16") as info:
        fit(d, train, epochs=1, amp="fp16", device="cpu", schedule="constant", progress=False)
    assert "boom" in str(info.value)


# ------------------------------------------------------------------------------ determinism


def test_deterministic_is_strict_during_fit_and_restored_after(digits) -> None:
    train, _ = _loaders(digits)
    torch.use_deterministic_algorithms(True, warn_only=True)  # the caller's mode
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    seen: list[tuple[bool, bool, bool, bool]] = []

    def probe(row: dict[str, Any]) -> None:
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(),
                     torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic))

    d = Distiller(_student(), None, losses={"ce": 1.0})
    fit(d, train, epochs=1, deterministic=True, schedule="constant", progress=False, on_epoch_end=probe)
    assert seen == [(True, False, False, True)]  # strict: no warn_only
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


@pytest.mark.parametrize("raises", [False, True])
def test_fit_gives_back_the_callers_random_state(digits, raises: bool) -> None:
    train, _ = _loaders(digits)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = _draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    losses = {"ce": 1.0, "boom": _NaNLoss()} if raises else {"ce": 1.0}
    d = Distiller(_student(seed=3), None, losses=losses)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    if raises:
        with pytest.raises(NonFiniteLossError):
            fit(d, train, epochs=1, seed=123, progress=False)
    else:
        fit(d, train, epochs=1, seed=123, progress=False)
    got = _draws()
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ------------------------------------------------------------------------------ gradients, scaler, async check


class _NaNGrad(Method):
    """A finite loss (0) whose gradient is NaN: d sqrt(u)/du at u = 0 is inf, times du/dz = 0."""

    needs_teacher = False

    def forward(self, student_view, teacher_view, batch):
        z = student_view["logits"]
        return torch.sqrt((z - z.detach()).pow(2).sum())


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_nan_gradient_from_a_finite_loss_stops_training(digits, tmp_path: Path, grad_clip: float | None) -> None:
    train, _ = _loaders(digits)
    d = Distiller(_student(), None, losses={"ce": 1.0, "sneaky": _NaNGrad()})
    before = _params(d.student)
    with pytest.raises(NonFiniteLossError) as info:
        fit(d, train, epochs=1, grad_clip=grad_clip, schedule="constant", run_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert "gradient" in msg and "epoch 0 step 0" in msg and "student." in msg and "not applied" in msg
    assert _unchanged(d.student, before)


def test_schedule_does_not_step_when_the_scaler_skips(digits, tmp_path: Path) -> None:
    train, _ = _loaders(digits)  # 4 steps, every one with NaN gradients: the scaler skips them all
    d = Distiller(_student(), None, losses={"ce": 1.0, "sneaky": _NaNGrad()})
    before = _params(d.student)
    fit(d, train, epochs=1, amp="fp16", device="cpu", schedule="cosine", run_dir=tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["schedule"]["last_epoch"] == 0  # no optimizer step, no schedule step
    assert _unchanged(d.student, before)


class _NaNAtEpoch1(Method):
    needs_teacher = False

    def forward(self, student_view, teacher_view, batch):
        z = student_view["logits"]
        return z.sum() * (float("nan") if self.epoch == 1 else 0.0)


def test_async_nan_check_names_the_first_bad_step_and_rolls_back(digits, tmp_path: Path) -> None:
    train, _ = _loaders(digits)  # 4 steps per epoch; read every 4: the bad step 0 is found at step 3
    d = Distiller(_student(), None, losses={"ce": 1.0, "boom": _NaNAtEpoch1()})
    with pytest.raises(NonFiniteLossError) as info:
        fit(d, train, epochs=3, schedule="constant", run_dir=tmp_path, progress=False, nan_check_every=4)
    msg = str(info.value)
    assert "boom=nan" in msg and "epoch 1 step 0" in msg and "found at step 3" in msg and "reloaded" in msg
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert saved["epoch"] == 0
    for k, p in d.student.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p.detach(), saved["distiller"]["student"][k]), k


def test_async_nan_check_without_a_checkpoint_says_the_model_is_unusable(digits) -> None:
    train, _ = _loaders(digits)
    d = Distiller(_student(), None, losses={"ce": 1.0, "boom": _NaNAtEpoch1()})
    with pytest.raises(NonFiniteLossError, match="not usable"):
        fit(d, train, epochs=2, schedule="constant", progress=False, nan_check_every=50)  # found at the epoch's end


def test_ensemble_members_with_other_class_counts(digits) -> None:
    from distill.teachers import EnsembleTeacher

    ens = EnsembleTeacher([_teacher(num_classes=K), _teacher(seed=5, num_classes=K + 2)])
    with pytest.raises(ValueError, match=r"member 1: \(4, 12\).*same classes"):
        ens(Batch(digits[0][:4]))


def test_a_strategy_loop_gives_back_the_determinism_flags(digits) -> None:
    from distill.strategies.online import fit_dml

    train, _ = _loaders(digits)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = True
    fit_dml(lambda: _student(), train, epochs=1, progress=False, deterministic=True, schedule="constant")
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.benchmark is True
