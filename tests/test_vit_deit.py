"""DeiT (distillation token, hard and soft) and TinyViT (cached sparse top-k soft labels, replayed).

Formulas are checked against numbers worked out here with numpy loops, never with the functions
under test; the models are the zoo's ``deit_tiny`` / ``vit_tiny`` on tiny inputs.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.methods import create_method, method_info
from distill.models import create

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- independent references


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _ref_label_ce(logits: np.ndarray, y: np.ndarray, eps: float) -> float:
    """The paper's smoothing written out: 1 − ε on the true class, ε/(K − 1) on each other one."""
    b, k = logits.shape
    lp = _log_softmax(logits)
    total = 0.0
    for i in range(b):
        for c in range(k):
            q = 1 - eps if c == y[i] else eps / (k - 1)
            total -= q * lp[i, c]
    return total / b


def _ref_hard(cls: np.ndarray, dist: np.ndarray, t: np.ndarray, y: np.ndarray, wc: float, wd: float,
              eps: float) -> float:
    lp = _log_softmax(dist)
    yt = t.argmax(axis=1)
    ce_t = -np.mean([lp[i, yt[i]] for i in range(len(y))])
    return wc * _ref_label_ce(cls, y, eps) + wd * ce_t


def _ref_soft(cls: np.ndarray, dist: np.ndarray, t: np.ndarray, y: np.ndarray, T: float, wc: float, wd: float,
              eps: float) -> float:
    lq, lp = _log_softmax(dist / T), _log_softmax(t / T)
    kl = 0.0
    for i in range(len(y)):
        for c in range(t.shape[1]):
            kl += math.exp(lp[i, c]) * (lp[i, c] - lq[i, c])
    return wc * _ref_label_ce(cls, y, eps) + wd * T * T * kl / len(y)


def _logits(seed: int, b: int = 5, k: int = 6) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cls, dist, t = (torch.randn(b, k, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    return cls, dist, t, torch.randint(0, k, (b,), generator=g)


# --------------------------------------------------------------------------- the math


def test_smoothed_targets_follow_the_paper() -> None:
    q = DF.deit_smoothed_targets(torch.tensor([2, 0]), 5, 0.2)
    expected = torch.full((2, 5), 0.05)
    expected[0, 2] = expected[1, 0] = 0.8
    torch.testing.assert_close(q, expected)


def test_hard_loss_matches_a_hand_computation() -> None:
    # by hand: K = 2, ε = 0; class head (0, 0) with y = 0 → ln 2; teacher argmax = 1, dist head (0, ln 3):
    # CE = −ln(3/4); weights 0.3 / 0.7
    cls = torch.zeros(1, 2, dtype=torch.float64)
    dist = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    t = torch.tensor([[0.1, 2.0]], dtype=torch.float64)
    got = DF.deit_hard_loss(cls, dist, t, torch.tensor([0]), 0.3, 0.7, 0.0)
    assert got.item() == pytest.approx(0.3 * math.log(2) - 0.7 * math.log(0.75), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_hard_loss_matches_numpy(seed: int) -> None:
    cls, dist, t, y = _logits(seed)
    got = DF.deit_hard_loss(cls, dist, t, y, 0.35, 0.8, 0.15)
    ref = _ref_hard(cls.numpy(), dist.numpy(), t.numpy(), y.numpy(), 0.35, 0.8, 0.15)
    assert got.item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("seed", [2, 3])
def test_soft_loss_matches_numpy(seed: int) -> None:
    cls, dist, t, y = _logits(seed)
    got = DF.deit_soft_loss(cls, dist, t, y, 2.5, 0.6, 0.4, 0.05)
    ref = _ref_soft(cls.numpy(), dist.numpy(), t.numpy(), y.numpy(), 2.5, 0.6, 0.4, 0.05)
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_mixed_label_term_matches_numpy() -> None:
    cls, dist, t, y = _logits(4)
    y2 = torch.tensor([1, 1, 0, 5, 3])
    lam = torch.tensor([0.2, 0.9, 0.5, 1.0, 0.0], dtype=torch.float64)
    got = DF.deit_label_loss(cls, y, 0.1, y2, lam)
    lp = _log_softmax(cls.numpy())
    ref = 0.0
    for i in range(5):
        for c in range(6):
            q1 = 0.9 if c == y[i] else 0.1 / 5
            q2 = 0.9 if c == y2[i] else 0.1 / 5
            ref -= (lam[i].item() * q1 + (1 - lam[i].item()) * q2) * lp[i, c]
    assert got.item() == pytest.approx(ref / 5, rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.floats(0.5, 8.0), eps=st.floats(0.0, 0.5))
def test_soft_term_vanishes_when_the_distillation_head_equals_the_teacher(seed: int, T: float, eps: float) -> None:
    cls, _, t, y = _logits(seed)
    full = DF.deit_soft_loss(cls, t.clone(), t, y, T, 0.7, 0.3, eps)
    label = DF.deit_label_loss(cls, y, eps)
    assert full.item() == pytest.approx(0.7 * label.item(), rel=1e-9, abs=1e-12)
    assert DF.deit_soft_loss(cls, *_logits(seed + 1)[1:3], y, T, 0.0, 1.0).item() >= -1e-12  # KL >= 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-5, 5))
def test_hard_term_depends_only_on_the_teacher_argmax(seed: int, shift: float) -> None:
    cls, dist, t, y = _logits(seed)
    a = DF.deit_hard_loss(cls, dist, t, y, 0.5, 0.5, 0.1)
    b = DF.deit_hard_loss(cls, dist, 2.0 * t + shift, y, 0.5, 0.5, 0.1)  # a monotone map keeps each argmax
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_loss_shape_errors_name_the_shapes() -> None:
    cls, dist, t, y = _logits(0)
    with pytest.raises(ValueError, match=r"\(5, 6\), \(5, 5\)"):
        DF.deit_hard_loss(cls, dist[:, :5], t, y)
    with pytest.raises(ValueError, match=r"\(B,\) = \(5,\) integer targets"):
        DF.deit_soft_loss(cls, dist, t, y[:3])
    with pytest.raises(ValueError, match="eps must be in"):
        DF.deit_smoothed_targets(y, 6, 1.0)


# --------------------------------------------------------------------------- the method


def test_registered_with_its_paper_and_defaults() -> None:
    info = method_info("deit")
    assert info.family == "vit" and info.paper.arxiv == "2012.12877" and info.paper.year == 2021
    hard, soft = create_method("deit"), create_method("deit", mode="soft")
    assert (hard.mode, hard.ce_weight, hard.distill_weight, hard.label_smoothing) == ("hard", 0.5, 0.5, 0.1)
    # τ = 3.0, λ = 0.1: the paper, Section 6 ("Initialization and hyper-parameters"): "we take the typical
    # values τ = 3.0 and λ = 0.1 for the usual (soft) distillation" -- not the authors' main.py (τ = 1, λ = 0.5)
    assert (soft.ce_weight, soft.distill_weight, soft.T) == (0.9, 0.1, 3.0)
    assert (soft.mode, soft.label_smoothing) == ("soft", 0.1)  # Section 4: "we fix this parameter to ε = 0.1"
    import inspect
    params = inspect.signature(type(soft).__init__).parameters
    assert params["T"].default == 3.0 and params["label_smoothing"].default == 0.1
    assert hard.needs_targets and hard.student_taps == ["head", "head_dist"]
    assert create_method("deit", token="class").student_taps == []


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "medium"}, "mode must be one of"), ({"token": "cls"}, "token must be 'dist'"),
    ({"T": 0.0}, "temperature T must be"), ({"label_smoothing": 1.0}, "label_smoothing must be in"),
    ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
])
def test_bad_arguments_are_named(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_method("deit", **kwargs)


def _models() -> tuple[torch.nn.Module, torch.nn.Module, Batch]:
    torch.manual_seed(0)
    student = create("deit_tiny", num_classes=10, in_channels=1, img_size=16, patch_size=4)
    teacher = create("vit_tiny", num_classes=10, in_channels=1, img_size=16, patch_size=4)
    for p in teacher.parameters():  # a confident, distinct teacher
        p.data.mul_(3.0)
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(6, 1, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g))
    return student, teacher, batch


@pytest.mark.parametrize("kwargs", [{"mode": "hard", "ce_weight": 0.3, "distill_weight": 0.9, "label_smoothing": 0.2},
                                    {"mode": "soft", "T": 2.0, "ce_weight": 0.8, "distill_weight": 0.25}])
def test_method_reads_the_class_head_for_labels_and_the_distillation_head_for_the_teacher(
        kwargs: dict[str, Any]) -> None:
    student, teacher, batch = _models()
    d = distill.Distiller(student, teacher, losses={"deit": kwargs})
    d.prepare(batch)
    got = d(batch).parts["deit"]
    with torch.no_grad():
        tokens = student.forward_features(batch.inputs)
        cls = student.head(tokens[:, 0]).double().numpy()
        dist = student.head_dist(tokens[:, 1]).double().numpy()
        t = teacher.eval()(batch.inputs).double().numpy()
    y = batch.targets.numpy()
    if kwargs["mode"] == "hard":
        ref = _ref_hard(cls, dist, t, y, 0.3, 0.9, 0.2)
    else:
        ref = _ref_soft(cls, dist, t, y, 2.0, 0.8, 0.25, 0.1)
    assert float(got) == pytest.approx(ref, rel=1e-5)


def test_usual_distillation_puts_both_terms_on_the_class_head() -> None:
    _, teacher, batch = _models()
    student = create("vit_tiny", num_classes=10, in_channels=1, img_size=16, patch_size=4)
    d = distill.Distiller(student, teacher, losses={"deit": {"token": "class", "distill_weight": 0.7}})
    d.prepare(batch)
    got = d(batch).parts["deit"]
    with torch.no_grad():
        s = student(batch.inputs).double().numpy()
        t = teacher.eval()(batch.inputs).double().numpy()
    assert float(got) == pytest.approx(_ref_hard(s, s, t, batch.targets.numpy(), 0.5, 0.7, 0.1), rel=1e-5)


def test_a_student_without_a_distillation_token_is_refused_before_training() -> None:
    _, teacher, _ = _models()
    with pytest.raises(KeyError, match="head_dist"):
        distill.Distiller(create("vit_tiny", img_size=16), teacher, losses={"deit": {}})


def test_different_class_counts_are_refused_at_prepare() -> None:
    _, teacher, batch = _models()
    d = distill.Distiller(create("deit_tiny", num_classes=5, img_size=16), teacher, losses={"deit": {}})
    with pytest.raises(ValueError, match="5 classes but the teacher's have 10"):
        d.prepare(batch)


def test_gradient_reaches_the_student_heads_and_never_the_teacher() -> None:
    student, teacher, batch = _models()
    d = distill.Distiller(student, teacher, losses={"deit": {"mode": "soft"}})
    d.prepare(batch)
    d(batch).total.backward()
    assert student.head_dist.weight.grad is not None and student.head_dist.weight.grad.abs().sum() > 0
    assert student.head.weight.grad is not None and student.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_hard_distillation_head_learns_the_teacher_only() -> None:
    """With the label term off, the class head gets no gradient; with the teacher term off, head_dist gets none."""
    student, teacher, batch = _models()
    for kwargs, zero in (({"ce_weight": 0.0}, "head"), ({"distill_weight": 0.0}, "head_dist")):
        student.zero_grad(set_to_none=True)
        d = distill.Distiller(student, teacher, losses={"deit": kwargs})
        d.prepare(batch)
        d(batch).total.backward()
        assert getattr(student, zero).weight.grad.abs().sum() == 0, zero


def test_a_distilled_vit_predicts_the_mean_of_its_two_heads_in_eval() -> None:
    student, _, batch = _models()
    student.eval()
    from distill.taps import Taps

    taps = Taps(student, ["head", "head_dist"])
    with torch.no_grad(), taps.recording() as store:
        out = student(batch.inputs)
    taps.remove()
    torch.testing.assert_close(out, (store["head"] + store["head_dist"]) / 2)
    assert not torch.allclose(store["head"], store["head_dist"])  # two different heads, really averaged


def test_a_few_training_steps_move_the_distillation_head_towards_the_teacher() -> None:
    student, teacher, batch = _models()
    d = distill.Distiller(student, teacher, losses={"deit": {"mode": "hard", "ce_weight": 0.0, "distill_weight": 1.0}})
    d.prepare(batch)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    first = last = None
    for _ in range(12):
        loss = d(batch).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    assert last < 0.5 * first


def test_timm_distilled_deit_has_the_same_taps() -> None:
    timm = pytest.importorskip("timm", reason="timm is an optional extra (distill[vision])")
    student = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, img_size=32,
                                patch_size=8, embed_dim=48, depth=2, num_heads=2, in_chans=1)
    teacher = create("cnn_teacher_mnist", num_classes=10, in_channels=1)
    batch = Batch(torch.randn(2, 1, 32, 32), torch.tensor([1, 2]))
    teacher = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(28), teacher)
    d = distill.Distiller(student, teacher, losses={"deit": {"mode": "soft"}})
    d.prepare(batch)
    assert torch.isfinite(d(batch).total)
    student.eval()
    from distill.taps import Taps

    taps = Taps(student, ["head", "head_dist"])
    with torch.no_grad(), taps.recording() as store:
        out = student(batch.inputs)
    taps.remove()
    torch.testing.assert_close(out, (store["head"] + store["head_dist"]) / 2)


# --------------------------------------------------------------------------- TinyViT: what the cache replays


def test_cached_top_k_view_is_tinyvit_sparse_soft_label(tmp_path: Path) -> None:
    """TinyViT (arXiv 2207.10666, authors' main.py): keep the teacher's top-k probabilities, give each other
    class (1 − Σ top-k)/(K − k); the view replayed for (epoch, sample) is the teacher's on that augmented view."""
    from distill.cache import CachedTeacher, build_cache, replay_views
    from distill.data.augment import Compose, RandomCropPad, RandomHorizontalFlip

    torch.manual_seed(0)
    teacher = create("cnn_teacher_mnist", num_classes=10, in_channels=1).eval()
    inputs = torch.randn(12, 1, 28, 28)
    aug = Compose([RandomCropPad(2), RandomHorizontalFlip()])
    build_cache(teacher, inputs, tmp_path / "c", topk=3, temperature=1.0, augment=aug, epochs=2, augment_seed=5)
    cached = CachedTeacher(tmp_path / "c", teacher=teacher)
    index = torch.tensor([0, 4, 7, 11])
    for epoch in (0, 1):
        view = cached.cache.view(epoch, index)["logits"]
        with torch.no_grad():
            p = torch.softmax(teacher(replay_views(inputs, index, epoch, aug, 5)).double(), 1).numpy()
        expected = np.empty_like(p)
        for i in range(len(index)):  # TinyViT's reconstruction, written out
            top = np.argsort(-p[i])[:3]
            expected[i] = (1.0 - p[i, top].sum()) / (10 - 3)
            expected[i, top] = p[i, top]
        np.testing.assert_allclose(torch.softmax(view.double(), 1).numpy(), expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- recipes


def _write_idx(root: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(x), 28, 28) + x.astype(np.uint8).tobytes())
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes())


def _tiny_fashion(root: Path, n_train: int = 96, n_test: int = 64) -> Path:
    """The first images of the real Fashion-MNIST files, written as a small IDX set."""
    from distill.data.sources import load_fashion_mnist

    root.mkdir()
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = load_fashion_mnist(FASHION, split)
        x8 = (x[:n, 0].numpy() * 255).round() if x.dtype.is_floating_point else x[:n, 0].numpy()
        _write_idx(root, split, x8, y[:n].numpy())
    return root


@pytest.mark.parametrize("name", ["deit_hard", "deit_soft", "deit_usual_hard", "tinyvit_cached"])
def test_vit_recipes_validate(name: str) -> None:
    from distill.recipes import load_recipe

    recipe = load_recipe(REPO / "recipes" / "vit" / f"{name}.yaml")
    assert recipe.data.name == "fashion_mnist" and recipe.teacher is not None
    assert recipe.teacher.model is not None and recipe.teacher.model.name == "cnn_teacher_mnist"
    if name == "tinyvit_cached":
        assert recipe.teacher.cache is not None and recipe.teacher.cache.topk == 3
        assert recipe.teacher.cache.temperature == 1.0 and recipe.losses == {"kd": {"T": 1.0}}
    elif name == "deit_usual_hard":  # the paper's baseline: no distillation token, the class head takes both terms
        assert recipe.student.name == "vit_tiny" and recipe.losses == {"deit": {"mode": "hard", "token": "class",
                                                                                "label_smoothing": 0.1}}
    else:
        assert recipe.student.name == "deit_tiny" and list(recipe.losses) == ["deit"]


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"Fashion-MNIST files not found in {FASHION} "
                    "(apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("name", ["tinyvit_cached", "deit_hard"])
def test_vit_recipe_runs_at_a_tiny_size(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.recipes import load_recipe
    from distill.runner import run_recipe

    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load((REPO / "recipes" / "vit" / f"{name}.yaml").read_text())
    data["seeds"] = [0]
    data["data"].update(root=str(_tiny_fashion(tmp_path / "fm")), batch_size=32, eval_batch_size=64)
    data["teacher"]["train"]["epochs"] = 1
    data["train"].update(epochs=2, device="cpu")
    if "cache" in data["teacher"]:
        data["teacher"]["cache"]["path"] = "cache"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    dirs = run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert summary["data"]["train_size"] == 96 and 0 <= summary["last_acc"] <= 100
    rows = [json.loads(line) for line in (dirs[0] / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 2
    if name == "tinyvit_cached":
        manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
        assert manifest["topk"] == 3 and manifest["epochs"] == 2 and manifest["temperature"] == 1.0
