"""The ViT methods of issue 15 on timm models, built through ``distill.models.create("timm:...")``.

Tiny configurations of timm's ``VisionTransformer`` (``vit_tiny_patch16_224``), its distilled DeiT
(``deit_tiny_distilled_patch16_224``, a distillation token and ``head_dist``) and one hierarchical
ViT (``swin_tiny_patch4_window7_224`` at 32×32: two stages, windows of 4×4 patches) as students,
with the zoo's CNN or a wider timm ViT as teachers: the zoo ViT's tap paths resolve on them with the
same shapes, and a few Distiller steps of each method give finite losses, move the student and
leave the teacher untouched.

timm computes attention inside ``F.scaled_dot_product_attention`` when fused attention is on, and
then its ``attn_drop`` module never runs: a tap on ``blocks.{i}.attn.attn_drop`` turns that block's
fused path off while the tap is registered (``distill.taps.Taps``); a test shows it on a model built
with fused attention on. The fixture below builds the other models unfused.

What the hierarchical Swin cannot take, and why: its stages give channels-last maps ``(B, H, W, C)``
(no token sequence with prefix tokens, no class token, no distillation head), so ViTKD and DearKD's
token-to-map alignment cannot use it: ViTKD stops with a ShapeMismatchError naming the tap; manifold
distillation and FD, which also
accept a CNN's ``(B, C, H, W)`` map, read Swin's stages when ``channels_last`` names the side (the
shape alone cannot tell the two layouts apart). DeiT runs there with
``token="class"`` (the paper's "usual distillation" on the logits), and KD on the logits. The MIM
strategies (SdAE, DMJD) drop masked tokens after the position embeddings: on timm's ViT they read
``norm_pre(_pos_embed(patch_embed(x)))``, what its ``forward_features`` does before the blocks.

Runs only where timm imports (``pip install 'distill[vision]'``); here, in the venv that has it:
``/tmp/tvv/bin/python -m pytest tests/test_vit_timm.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'distill[vision]'; timm imports "
                                          "torchvision at import time)")

import distill  # noqa: E402
from distill.adapters import ShapeMismatchError  # noqa: E402
from distill.models import create  # noqa: E402
from distill.models.vit import ViT, num_prefix_tokens, patch_grid  # noqa: E402
from distill.taps import Taps  # noqa: E402

B, K = 8, 10


@pytest.fixture(autouse=True)
def unfused_attention():
    """timm attention modules built during a test keep their probabilities visible to ``attn_drop``."""
    before = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(False)
    torch.manual_seed(0)
    yield
    timm.layers.set_fused_attn(before)


def timm_vit(distilled: bool = False, dim: int = 64, depth: int = 2, heads: int = 4,
             mlp_ratio: float = 4.0) -> torch.nn.Module:
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    return create(f"timm:{name}", num_classes=K, in_channels=1, img_size=28, patch_size=4, embed_dim=dim,
                  depth=depth, num_heads=heads, mlp_ratio=mlp_ratio)


def timm_swin() -> torch.nn.Module:
    return create("timm:swin_tiny_patch4_window7_224", num_classes=K, in_channels=1, img_size=32, patch_size=2,
                  window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4))


def batch(side: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, side, side, generator=g), torch.randint(0, K, (B,), generator=g)


def run_steps(d: distill.Distiller, batches: list, steps: int = 3) -> list[dict[str, float]]:
    """``steps`` AdamW steps of the Distiller; each step's total and parts are finite; the student moves,
    the teacher (when it is a module) does not."""
    d.prepare(batches[0])
    teacher = d.teacher_module()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()} if teacher is not None else {}
    s_before = {k: v.clone() for k, v in d.student.state_dict().items()}
    opt = torch.optim.AdamW(list(d.trainable_parameters()), lr=1e-3)
    parts = []
    for i in range(steps):
        out = d(batches[i % len(batches)])
        assert torch.isfinite(out.total), out.parts
        assert out.parts and all(math.isfinite(v) for v in out.parts.values()), out.parts
        opt.zero_grad()
        out.total.backward()
        opt.step()
        parts.append(out.parts)
    moved = [k for k, v in d.student.state_dict().items() if v.is_floating_point() and not torch.equal(v, s_before[k])]
    assert moved, "no student weight changed"
    for k, v in (teacher.state_dict().items() if teacher is not None else []):
        assert torch.equal(v, t_before[k]), f"teacher {k} changed"
    return parts


# ----------------------------------------------------------------------------- tap paths


@pytest.mark.parametrize("distilled", [False, True])
def test_zoo_tap_paths_resolve_on_timm_vits_with_the_same_shapes(distilled):
    model, zoo = timm_vit(distilled), ViT(K, 1, 28, 4, dim=64, depth=2, heads=4, distilled=distilled)
    paths = [*zoo.tap_points, "blocks.0.attn.qkv", "blocks.1.attn"]
    assert num_prefix_tokens(model) == num_prefix_tokens(zoo) == (2 if distilled else 1)
    assert patch_grid(model) == patch_grid(zoo) == (7, 7)
    x, _ = batch()
    shapes = {}
    for m in (model, zoo):
        taps = Taps(m, paths)
        with taps.recording() as store:
            m.eval()(x)
        taps.remove()
        shapes[m is zoo] = {p: tuple(store[p].shape) for p in paths}
        probs = store["blocks.1.attn.attn_drop"]
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))  # softmax rows
    assert shapes[False] == shapes[True]
    n = 49 + (2 if distilled else 1)
    assert shapes[False]["blocks.0.attn.attn_drop"] == (B, 4, n, n)
    assert shapes[False]["blocks.1"] == (B, n, 64) and shapes[False]["head:input"] == (B, 64)


def test_an_attention_tap_unfuses_timm_attention_while_it_is_registered():
    timm.layers.set_fused_attn(True)
    fused = timm_vit()
    timm.layers.set_fused_attn(False)
    attn = fused.blocks[0].attn
    assert attn.fused_attn is True
    x = batch()[0]
    with torch.no_grad():
        reference = fused(x)
    taps = Taps(fused, ["blocks.0.attn.attn_drop"])
    assert attn.fused_attn is False and fused.blocks[1].attn.fused_attn is True  # only the tapped block
    with torch.no_grad(), taps.recording() as store:
        out = fused(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)  # same function, explicit softmax
    torch.testing.assert_close(store["blocks.0.attn.attn_drop"].sum(-1), torch.ones(B, 4, 50))
    taps.remove()
    assert attn.fused_attn is True


# ----------------------------------------------------------------------------- methods on timm students

CNN = "cnn_teacher_mnist"


def _cases():
    """(id, student factory, teacher factory, losses, image side)."""
    wide = lambda: timm_vit(dim=96, depth=3)  # noqa: E731 - a wider, deeper timm ViT teacher
    return [
        ("kd_vit", lambda: timm_vit(), lambda: create(CNN), {"ce": 1.0, "kd": {"T": 2.0}}, 28),
        ("deit_hard", lambda: timm_vit(True), lambda: create(CNN), {"deit": {"mode": "hard"}}, 28),
        ("deit_soft", lambda: timm_vit(True), lambda: create(CNN), {"deit": {"mode": "soft", "T": 2.0}}, 28),
        ("manifold_kd", lambda: timm_vit(True), wide,
         {"ce": 1.0, "manifold_kd": {"pairs": [("blocks.0", "blocks.0"), ("blocks.1", "blocks.2")],
                                     "num_samples": 16}}, 28),
        ("manifold_kd_zoo_teacher", lambda: timm_vit(), lambda: create("vit_small"),
         {"ce": 1.0, "manifold_kd": {"pairs": [("blocks.1", "blocks.5")], "num_samples": 16}}, 28),
        ("vitkd", lambda: timm_vit(), wide,
         {"ce": 1.0, "vitkd": {"shallow_pairs": [("blocks.0", "blocks.0")], "deep_pair": ("norm", "norm"),
                               "mimic_weight": 1e-3, "generation_weight": 1e-3}}, 28),
        ("dearkd", lambda: timm_vit(True), lambda: create(CNN), {"dearkd": {"beta": 0.5}}, 28),
        ("dearkd_one_pair", lambda: timm_vit(True), lambda: create(CNN),
         {"dearkd": {"pairs": [("blocks.1.attn", "stage2")], "early_epochs": 1}}, 28),
        ("fd", lambda: timm_vit(), wide, {"fd": {"beta": 1.5}}, 28),
        # the unslimmed model of the zoo's sit_tiny as a timm ViT (D=64, 4 blocks, MLP ratio 2)
        ("sit_distill_timm_teacher", lambda: create("sit_tiny"), lambda: timm_vit(depth=4, mlp_ratio=2.0),
         {"ce": 1.0, "sit_distill": {}}, 28),
        ("kd_swin", timm_swin, lambda: create(CNN), {"ce": 1.0, "kd": {"T": 2.0}}, 32),
        ("deit_swin_class_token", timm_swin, lambda: create(CNN), {"deit": {"mode": "soft", "token": "class"}}, 32),
    ]


@pytest.mark.parametrize("case", _cases(), ids=[c[0] for c in _cases()])
def test_method_steps_on_timm_models(case):
    name, student, teacher, losses, side = case
    d = distill.Distiller(student(), teacher(), losses)
    parts = run_steps(d, [batch(side, 0), batch(side, 1)])
    assert set(losses) <= set(parts[0])


def test_sit_student_starts_from_a_timm_teacher():
    """SiT copies the unslimmed teacher's weights into the slimmed student: timm's names are the zoo's."""
    teacher, student = timm_vit(depth=4, mlp_ratio=2.0), create("sit_tiny")
    d = distill.Distiller(student, teacher, {"sit_distill": {}})
    d.prepare(batch())
    for name in ("patch_embed.proj.weight", "blocks.3.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "norm.weight"):
        torch.testing.assert_close(student.get_submodule(name.rpartition(".")[0]).weight,
                                   teacher.get_submodule(name.rpartition(".")[0]).weight)


def test_tinyvit_cached_sparse_logits_from_a_timm_teacher(tmp_path):
    """TinyViT: a timm teacher's top-3 logits stored per augmented view, replayed into a timm student."""
    from distill.cache import CachedTeacher, build_cache
    from distill.data import RandomCropPad
    from distill.data.loader import InMemoryLoader

    x, y = batch(28, 0)
    x, y = torch.cat([x, batch(28, 1)[0]]), torch.cat([y, batch(28, 1)[1]])
    teacher = timm_vit(dim=96, depth=3).eval()
    build_cache(teacher, x, tmp_path / "cache", targets=y, topk=3, augment=RandomCropPad(2), epochs=1,
                augment_seed=0)
    loader = InMemoryLoader(x, y, B, augment=RandomCropPad(2), augment_seed=0, seed=1, return_index=True)
    d = distill.Distiller(timm_vit(), CachedTeacher(tmp_path / "cache", teacher=teacher), {"kd": {"T": 1.0}})
    d.set_epoch(0)
    loader.set_epoch(0)
    batches = list(loader)
    parts = run_steps(d, batches, steps=len(batches))
    assert all(p["kd"] > 0 for p in parts)


# ----------------------------------------------------------------------------- what a hierarchical ViT cannot take


def test_vitkd_refuses_swin_maps_clearly():
    d = distill.Distiller(timm_swin(), timm_swin(), {"vitkd": {"shallow_pairs": [("layers.0", "layers.0")],
                                                               "deep_pair": ("layers.1", "layers.1")}})
    with pytest.raises(ShapeMismatchError, match="ViTKD"):
        d.prepare(batch(32))
        d(batch(32))


@pytest.mark.parametrize("losses", [{"manifold_kd": {"pairs": [("layers.1", "layers.1")], "num_samples": 8}},
                                    {"fd": {"student_tap": "layers.1", "teacher_tap": "layers.1"}}],
                         ids=["manifold_kd", "fd"])
def test_map_methods_read_channels_last_swin_maps_when_told(losses):
    """A 4-D tap is a CNN's (B, C, H, W) unless ``channels_last`` names the side: Swin's stages are
    (B, H, W, C). Told so, the methods read the same numbers as from the permuted map."""
    student, teacher = timm_swin(), timm_swin()
    (name, kwargs), = losses.items()
    x = batch(32)
    told = distill.Distiller(student, teacher, {name: {**kwargs, "channels_last": ("student", "teacher")}})
    told.prepare(x)
    out = told(x)
    assert torch.isfinite(out.total)
    method = told.methods[name]
    s_view, t_view = out.student, out.teacher
    path = "layers.1"
    permuted = ({**s_view, path: s_view[path].permute(0, 3, 1, 2)}, {**t_view, path: t_view[path].permute(0, 3, 1, 2)})
    method.channels_last = frozenset()
    if name == "manifold_kd":
        method.generator.manual_seed(0)
    reference = method(*permuted, x)
    method.channels_last = frozenset(("student", "teacher"))
    if name == "manifold_kd":
        method.generator.manual_seed(0)
    torch.testing.assert_close(method(s_view, t_view, x), reference)
    with pytest.raises(ValueError, match="channels_last"):
        distill.Distiller(timm_swin(), timm_swin(), {name: {**kwargs, "channels_last": ("stud",)}})


def test_encode_visible_on_a_timm_vit_is_its_forward_features_when_every_token_is_kept():
    from distill.strategies.mim import encode_visible

    model = timm_vit().eval()
    x, _ = batch()
    keep = torch.arange(49).expand(B, -1)
    torch.testing.assert_close(encode_visible(model, x, keep), model.forward_features(x))
    # a subset: the kept tokens alone, through the same blocks (attention sees only them)
    sub = torch.tensor([[0, 5, 48]] * B)
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    tokens = torch.cat([h[:, :1], h[:, 1:][:, [0, 5, 48]]], 1)
    torch.testing.assert_close(encode_visible(model, x, sub), model.norm(model.blocks(tokens)))


@pytest.mark.parametrize("strategy", ["sdae", "dmjd"])
def test_mim_strategies_pretrain_a_timm_vit(strategy):
    from distill.data.loader import InMemoryLoader
    from distill.strategies.registry import strategy_info

    x, y = batch()
    model = timm_vit()
    before = model.blocks[0].attn.qkv.weight.clone()
    extra = {"block": 1, "target": "pixels"} if strategy == "dmjd" else {"folds": 2}
    r = strategy_info(strategy).fn(model, InMemoryLoader(x, y, B), None, epochs=1, progress=False, **extra)
    assert math.isfinite(r.pretrain_history[0]["pretrain_loss"])
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="patch_drop_rate"):
        dropping = create("timm:vit_tiny_patch16_224", num_classes=K, in_channels=1, img_size=28, patch_size=4,
                          embed_dim=64, depth=2, num_heads=4, patch_drop_rate=0.5)
        strategy_info(strategy).fn(dropping, InMemoryLoader(x, y, B), None, epochs=1, progress=False, **extra)


def test_bingo_pretrains_a_timm_vit_from_a_timm_teacher():
    from distill.data.loader import InMemoryLoader
    from distill.strategies.registry import strategy_info

    x, y = batch(28, 0)
    x = torch.cat([x, batch(28, 1)[0]])
    student, teacher = timm_vit(), timm_vit(dim=96, depth=3)
    before = student.blocks[0].attn.qkv.weight.clone()
    r = strategy_info("bingo").fn(student, InMemoryLoader(x, torch.zeros(len(x), dtype=torch.long), B), None,
                                  teacher=teacher, epochs=1, k=2, queue_size=16, hidden=32, batch_size=4,
                                  progress=False)
    assert r.history and all(math.isfinite(v) for row in r.history for v in row.values()
                             if isinstance(v, float))
    assert not torch.equal(before, student.blocks[0].attn.qkv.weight)
