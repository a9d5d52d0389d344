"""Moonshine cheap-convolution WRN students (Crowley et al., arXiv 1711.02613)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distill import Distiller
from distill.batch import Batch
from distill.methods.features import AT
from distill.models import (
    create,
    list_models,
    moonshine,  # registers the cheap WRNs
)
from distill.models.moonshine import CheapWideResNet, wrn_cheap
from distill.models.registry import _MODELS
from distill.recipes import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cifar100" / "moonshine_at_wrn_40_2.yaml"

# name -> (conv, groups g, bottleneck b)
SPECS = {
    "wrn_40_2_g2": ("G", 2, 1),
    "wrn_40_2_g4": ("G", 4, 1),
    "wrn_40_2_g8": ("G", 8, 1),
    "wrn_40_2_g16": ("G", 16, 1),
    "wrn_40_2_gN": ("G", "N", 1),
    "wrn_40_2_b2": ("B", 1, 2),
    "wrn_40_2_b4": ("B", 1, 4),
    "wrn_40_2_b2g2": ("BG", 2, 2),
    "wrn_40_2_b2g4": ("BG", 4, 2),
}
NAMES = sorted(SPECS)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv3x3_cost(conv: str, c_in: int, c_out: int, g, b: int) -> int:
    """Weights + BN parameters of the substitute for one 3x3 conv c_in -> c_out (paper Fig. 1)."""
    if conv == "conv":
        return 9 * c_in * c_out
    if conv == "G":  # grouped 3x3 c_in -> c_in, BN(c_in), 1x1 c_in -> c_out
        groups = c_in if g == "N" else g
        return 9 * c_in * c_in // groups + 2 * c_in + c_in * c_out
    m = c_out // b  # 1x1 c_in -> m, BN(m), 3x3 m -> m (grouped for BG), BN(m), 1x1 m -> c_out
    groups = 1 if conv == "B" else (m if g == "N" else g)
    return c_in * m + 2 * m + 9 * m * m // groups + 2 * m + m * c_out


def wrn_formula(depth: int, k: int, conv: str = "conv", g=1, b: int = 1, classes: int = 100) -> int:
    """Parameter count of a (cheap) pre-activation WRN-depth-k, from the block definition."""
    n = (depth - 4) // 6
    total = 9 * 3 * 16  # stem
    c_in = 16
    for stage, w in enumerate((16 * k, 32 * k, 64 * k)):
        for i in range(n):
            block_in = c_in if i == 0 else w
            if not (i == 0 and stage > 0):  # first block of stages 2, 3 reuses the previous stage's BN
                total += 2 * block_in
            total += conv3x3_cost(conv, block_in, w, g, b) + 2 * w + conv3x3_cost(conv, w, w, g, b)
            if block_in != w:
                total += block_in * w  # 1x1 projection shortcut
        total += 2 * w  # the stage's closing BN
        c_in = w
    return total + 64 * k * classes + classes


def run_with_taps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(path).register_forward_hook(lambda m, i, o, path=path: captured.__setitem__(path, o))
        for path in model.tap_points
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return captured


def test_formula_matches_the_full_teacher():
    assert n_params(create("wrn_40_2")) == wrn_formula(40, 2) == 2_255_156
    assert n_params(create("wrn_16_2")) == wrn_formula(16, 2)
    assert n_params(wrn_cheap(40, 2, conv="conv")) == wrn_formula(40, 2)


def test_all_variants_registered():
    assert set(NAMES) | {"wrn_cheap"} <= set(list_models())
    assert set(moonshine.VARIANTS) == set(SPECS)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_formula_and_docstring(name):
    conv, g, b = SPECS[name]
    model = create(name)
    count = n_params(model)
    assert count == wrn_formula(40, 2, conv, g, b)
    assert count < n_params(create("wrn_40_2"))
    assert count == moonshine.VARIANTS[name][3]
    assert f"{count:,}" in moonshine.__doc__ and f"{count:,}" in _MODELS[name].__doc__
    assert n_params(create(name, num_classes=10)) == wrn_formula(40, 2, conv, g, b, classes=10)


@pytest.mark.parametrize("name", NAMES)
def test_taps_match_teacher_shapes(name):
    torch.manual_seed(0)
    teacher, student = create("wrn_40_2").eval(), create(name).eval()
    assert isinstance(student, CheapWideResNet)
    assert student.tap_points == teacher.tap_points
    x = torch.randn(2, 3, 32, 32)
    t_taps, s_taps = run_with_taps(teacher, x), run_with_taps(student, x)
    for path in teacher.tap_points:
        assert s_taps[path].shape == t_taps[path].shape, path
    for k in (1, 2, 3):
        assert torch.equal(s_taps[f"stage{k}"], torch.relu(s_taps[f"stage{k}.pre"]))
    assert torch.isfinite(s_taps["fc"]).all()


def test_blocks_use_the_cheap_convolutions():
    g4 = create("wrn_40_2_g4")
    block = g4.stage2.blocks[0]
    assert block.conv1.grouped.groups == 4 and block.conv1.grouped.stride == (2, 2)
    assert block.conv1.pointwise.kernel_size == (1, 1)
    assert isinstance(block.bn1, nn.Identity)  # same pre-activation wiring as the zoo's WRN
    dw = create("wrn_40_2_gN")
    assert dw.stage3.blocks[1].conv2.grouped.groups == 128
    b4 = create("wrn_40_2_b4").stage1.blocks[0].conv1
    assert (b4.reduce.in_channels, b4.reduce.out_channels, b4.conv.groups) == (16, 8, 1)
    bg = create("wrn_40_2_b2g4").stage3.blocks[0].conv2
    assert (bg.conv.in_channels, bg.conv.groups) == (64, 4)


def test_at_training_step_between_teacher_and_cheap_student():
    torch.manual_seed(0)
    teacher, student = create("wrn_40_2"), create("wrn_40_2_g4")
    pairs = [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]
    d = Distiller(student, teacher, losses={"ce": 1.0, "at": AT(pairs=pairs, beta=1000.0)})
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    d.prepare((x, y))
    assert not list(d.methods["at"].parameters())  # identical shapes: no adapter
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in student.parameters()]
    d.train()
    out = d(Batch(x, y))
    assert torch.isfinite(out.total) and float(out.parts["at"]) > 0
    opt.zero_grad()
    out.total.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="conv must be"):
        wrn_cheap(conv="X")
    with pytest.raises(ValueError, match="does not divide"):
        wrn_cheap(conv="G", groups=3)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wrn_cheap(depth=12)


def test_recipe_validates():
    recipe = load_recipe(RECIPE)
    assert RECIPE.read_text().lstrip().startswith("#")
    assert recipe.student.name == "wrn_40_2_g4" and recipe.teacher.model.name == "wrn_40_2"
    assert recipe.teacher.model.checkpoint == "runs/cifar100_teacher_wrn_40_2/seed0/model.safetensors"
    assert recipe.losses["ce"] == 1.0
    assert recipe.losses["at"]["beta"] == 1000.0
    assert [tuple(p) for p in recipe.losses["at"]["pairs"]] == [(f"stage{k}", f"stage{k}") for k in (1, 2, 3)]
    assert recipe.train.epochs == 200 and recipe.train.milestones == [60, 120, 160] and recipe.train.gamma == 0.2
