"""The CIFAR-100 KD benchmark zoo: names, parameter counts, tap points."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.models import create, list_models
from distill.models.cifar import CifarNet, WideResNet

# name -> parameter count with num_classes=100, as published in the CRD / RepDistiller tables
# (in millions) or, where noted, as computed from RepDistiller's architecture.
PARAMS = {
    "resnet8": 0.084e6,  # quoted as 0.08M (rounded); RepDistiller's resnet8 has 83,892
    "resnet14": 0.181e6,  # often quoted as 0.17M; RepDistiller's resnet14 has 181,108
    "resnet20": 0.28e6,
    "resnet32": 0.47e6,
    "resnet44": 0.67e6,
    "resnet56": 0.86e6,
    "resnet110": 1.74e6,
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "wrn_16_1": 0.18e6,
    "wrn_16_2": 0.70e6,
    "wrn_40_1": 0.57e6,
    "wrn_40_2": 2.26e6,
    "vgg8": 3.96e6,
    "vgg11": 9.28e6,  # computed from the architecture
    "vgg13": 9.46e6,
    "vgg16": 14.77e6,  # computed from the architecture
    "vgg19": 20.09e6,  # computed from the architecture
    "MobileNetV2": 0.81e6,
    "ShuffleV1": 0.95e6,
    "ShuffleV2": 1.36e6,
    "ResNet18": 11.2e6,
    "ResNet34": 21.33e6,  # computed from the architecture
    "ResNet50": 23.7e6,
}
NAMES = sorted(PARAMS)

# Families whose stages end in a ReLU (so "stageK.pre" has negatives and "stageK" == relu(pre)).
RELU_STAGES = [n for n in NAMES if n != "MobileNetV2"]

# name -> (number of stages, spatial side of the last stage for 32x32 inputs)
LAYOUT = {n: (3, 8) for n in NAMES if n.startswith(("resnet", "wrn_"))}
LAYOUT |= {n: (4, 4) for n in NAMES if n.startswith(("vgg", "ResNet"))}
LAYOUT |= {"MobileNetV2": (4, 2), "ShuffleV1": (3, 4), "ShuffleV2": (3, 4)}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_with_taps(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(path).register_forward_hook(lambda m, i, o, path=path: captured.__setitem__(path, o))
        for path in model.tap_points
    ]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured, logits


def test_the_whole_zoo_is_registered():
    assert set(NAMES) <= set(list_models())
    assert set(LAYOUT) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_within_3_percent(name):
    count = n_params(create(name))
    target = PARAMS[name]
    assert abs(count - target) <= 0.03 * target, f"{name}: {count:,} parameters, published {target:,.0f}"


@pytest.mark.parametrize("name", NAMES)
def test_tap_points_shapes_and_pre_activations(name):
    torch.manual_seed(0)
    model = create(name).eval()
    n_stages, last_side = LAYOUT[name]
    stages = [f"stage{k}" for k in range(1, n_stages + 1)]
    assert model.tap_points == ("stem", *[t for s in stages for t in (f"{s}.pre", s)], "pool", "fc")
    for path in model.tap_points:
        model.get_submodule(path)  # raises if the path does not exist
    assert isinstance(model.get_submodule("stage1.pre"), nn.Identity)

    taps, logits = run_with_taps(model, torch.randn(2, 3, 32, 32))

    assert set(taps) == set(model.tap_points)
    assert taps["stem"].dim() == 4 and taps["stem"].shape[0] == 2
    for s in stages:
        assert taps[f"{s}.pre"].shape == taps[s].shape
        assert taps[s].dim() == 4 and taps[s].shape[0] == 2
        if name in RELU_STAGES:
            assert taps[f"{s}.pre"].min() < 0, f"{s}.pre has no negative values"
            assert taps[s].min() >= 0
            assert torch.equal(taps[s], torch.relu(taps[f"{s}.pre"]))
        else:  # MobileNetV2: linear bottleneck, no ReLU after the stage
            assert torch.equal(taps[f"{s}.pre"], taps[s])
    assert taps[stages[-1]].shape[-2:] == (last_side, last_side)
    assert taps["pool"].shape == (2, model.feature_dim)
    assert model.fc.in_features == model.feature_dim
    assert logits.shape == (2, 100)
    assert torch.equal(taps["fc"], logits)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_create_with_ten_classes(name):
    model = create(name, num_classes=10)
    assert isinstance(model, CifarNet)
    assert model.num_classes == 10 and model.fc.out_features == 10


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_small_models_train_step_with_other_classes_and_channels(name):
    model = create(name, num_classes=10, in_channels=1).train()
    logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_wrn_stage_norm_gives_repdistiller_preact():
    # stageK.pre = BN(raw residual sum of stage K), the tensor RepDistiller returns with preact=True.
    model = create("wrn_16_2").eval()
    assert isinstance(model, WideResNet)
    raw: dict[str, torch.Tensor] = {}
    model.stage2.blocks.register_forward_hook(lambda m, i, o: raw.__setitem__("sum", o))
    taps, _ = run_with_taps(model, torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        assert torch.allclose(taps["stage2.pre"], model.stage2.norm(raw["sum"]))
    # the first block of stages 2 and 3 has no BN of its own (it lives in the previous stage)
    assert isinstance(model.stage2.blocks[0].bn1, nn.Identity)
    assert isinstance(model.stage1.blocks[0].bn1, nn.BatchNorm2d)


def test_arch_specific_arguments_and_validation():
    assert isinstance(create("wrn_40_2", drop_rate=0.3).stage1.blocks[0].dropout, nn.Dropout)
    assert create("MobileNetV2", width_mult=1.0).feature_dim == 1280
    with pytest.raises(TypeError, match="unexpected arguments"):
        create("resnet8", drop_rate=0.1)
    from distill.models.cifar import CifarResNet

    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth=10)
    with pytest.raises(ValueError, match="num_classes"):
        create("resnet8", num_classes=0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        create("resnet8")(torch.randn(3, 32, 32))
