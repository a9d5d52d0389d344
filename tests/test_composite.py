"""Composite students from ordinary models (distill.strategies.composite) and the dense digit
targets they train on (distill.data.dense).

The builders: shapes, the parameters the pieces share really are one set, gradients reach only
the pieces a loss runs through, the cut model computes what the model computed, clear errors
for bad paths and models that cannot be cut. The targets: centres and Gaussians against numbers
worked out by hand, translation equivariance (hypothesis), and the real digits.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.data import get_dataset
from distill.data.dense import class_heatmaps, ink_centres
from distill.data.loader import InMemoryLoader
from distill.models import create
from distill.strategies.composite import (
    chain_paths,
    multi_branch_from_model,
    okdhp_student,
    rocket_from_models,
    rocket_student,
)
from distill.strategies.online import MultiBranchNet, RocketNet, fit_okdhp, fit_rocket
from distill.taps import TapError

FLAT_CNN = {"name": "cnn", "widths": [8, 8, 16], "stem_width": 4, "downsample": [False, False, False]}


@pytest.fixture(scope="module")
def digits():
    train, val = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    return train, val


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def grads_of(module: nn.Module) -> list[bool]:
    """For each parameter: did it get a non-zero gradient?"""
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


# ---------------------------------------------------------------------------- chain paths


def test_chain_paths_open_the_parents_of_each_cut():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.Tanh())),
                          nn.Linear(3, 1))
    assert chain_paths(model) == ["0", "1", "2"]
    assert chain_paths(model, ["1.1.0"]) == ["0", "1.0", "1.1.0", "1.1.1", "2"]
    cnn = create("cnn_digits_student")
    assert chain_paths(cnn, ["stage2.pre"]) == ["stem", "stage1", "stage2.body", "stage2.pre", "stage2.act", "stage3",
                                                "avgpool", "pool", "dropout", "fc"]


# ---------------------------------------------------------------------------- rocket launching


def test_rocket_from_zoo_models_shapes_and_adapter(x):
    torch.manual_seed(0)
    light, booster = create("cnn_digits_student"), create("cnn_digits_teacher")
    rocket = rocket_from_models(light, booster, shared="stage1", example=x)
    assert isinstance(rocket, RocketNet)
    seen = {}
    rocket.booster_logits.register_forward_hook(lambda m, i, o: seen.setdefault("z", o))
    assert rocket(x).shape == (6, 10) and seen["z"].shape == (6, 10)
    # the trunk ends with the light net's stage1 (8 channels); the booster's stage2 wants 32: a 1x1 conv + BN
    conv = rocket.booster.adapter[0]
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 32, (1, 1))
    assert list(dict(rocket.trunk.named_children())) == ["stem", "stage1"]
    assert list(dict(rocket.light.named_children())) == ["stage2", "stage3", "avgpool", "pool", "dropout", "fc"]


def test_rocket_light_net_is_the_light_model_and_shares_its_parameters(x):
    torch.manual_seed(0)
    light, booster = create("cnn_digits_student"), create("cnn_digits_teacher")
    light.eval()
    before = light(x)
    rocket = rocket_from_models(light, booster, shared="stage2.pre", example=x).eval()
    torch.testing.assert_close(rocket.light_net()(x), before)  # the cut changes nothing the light net computes
    torch.testing.assert_close(rocket(x), before)
    # the pieces are the models' own modules: one set of parameters, no copies
    assert rocket.trunk.stem is light.stem and rocket.light.stage3 is light.stage3
    assert rocket.booster.stage3 is booster.stage3
    assert ids(rocket.trunk) | ids(rocket.light) == ids(light)
    shared = ids(rocket.light_net()) & ids(rocket.booster_net())
    assert shared == ids(rocket.trunk) and ids(rocket.light) & ids(rocket.booster) == set()
    assert ids(rocket) == ids(light) | ids(rocket.booster)
    assert not ids(booster.stem) & ids(rocket)  # the booster's own lower layers are dropped


def test_rocket_gradient_paths(x):
    torch.manual_seed(0)
    rocket = rocket_from_models("cnn_digits_student", "cnn_digits_teacher", shared="stage1", example=x)
    taps = {}
    rocket.booster_logits.register_forward_hook(lambda m, i, o: taps.__setitem__("z", o))
    # the light net's loss: trunk and light head, never the booster head
    rocket(x).pow(2).sum().backward()
    assert all(grads_of(rocket.trunk)) and all(grads_of(rocket.light)) and not any(grads_of(rocket.booster))
    rocket.zero_grad(set_to_none=True)
    # the booster's loss: the booster head (adapter included) and, through it, the trunk; never the light head
    rocket(x)
    taps["z"].pow(2).sum().backward()
    assert all(grads_of(rocket.trunk)) and all(grads_of(rocket.booster)) and not any(grads_of(rocket.light))
    assert all(grads_of(rocket.booster.adapter))


def test_rocket_needs_no_adapter_when_shapes_agree_and_bridges_other_resolutions(x):
    torch.manual_seed(0)
    same = rocket_from_models("cnn_digits_student", {"name": "cnn", "widths": [8, 16, 16]}, shared="stage1", example=x)
    assert "adapter" not in dict(same.booster.named_children())
    # the light net's stage2 (8 x 4 x 4) feeds the booster's stage2, which wants its stage1's 32 x 8 x 8
    up = rocket_from_models("cnn_digits_student", "cnn_digits_teacher", shared="stage2", booster_from="stage1",
                            example=x)
    assert isinstance(up.booster.adapter[0], nn.ConvTranspose2d) and up(x).shape == (6, 10)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"shared": "stage9"}, TapError, r"shared='stage9'.*Nearest valid paths: 'stage3'"),
    ({"shared": "stage1", "booster_from": "stg1"}, TapError, r"booster_from='stg1'.*not a submodule of the booster"),
    ({"shared": "stage1:output"}, ValueError, r"without ':input'"),
    ({"shared": ""}, ValueError, r"shared must be a module path"),
    ({"shared": "fc"}, ValueError, r"nothing of the light net lies after 'fc'"),
    ({"shared": "hidden1", "light": "mlp_digits_student"}, ValueError,
     r"cannot cut the light net \(MLP\) at shared='hidden1': its forward is not the chain"),
    ({"shared": "stage1", "booster": {"name": "cnn_digits_teacher", "num_classes": 5}}, ValueError,
     r"light net predicts 10 classes but the booster 5"),
    ({"shared": "stage1", "booster": "resnet_nope"}, ValueError, r"unknown zoo model 'resnet_nope'"),
])
def test_rocket_bad_arguments_are_clear_errors(x, kwargs, error, match):
    light = kwargs.pop("light", "cnn_digits_student")
    booster = kwargs.pop("booster", "cnn_digits_teacher")
    with pytest.raises(error, match=match):
        rocket_from_models(light, booster, example=x, **kwargs)


def test_rocket_light_and_booster_must_differ(x):
    model = create("cnn_digits_student")
    with pytest.raises(ValueError, match="two different models"):
        rocket_from_models(model, model, shared="stage1", example=x)


def test_rocket_student_passes_a_rocketnet_and_builds_from_a_factory(x):
    loader = InMemoryLoader(x, torch.arange(6), 3, seed=0)
    ready = rocket_from_models("cnn_digits_student", "cnn_digits_teacher", shared="stage1", example=x)
    assert rocket_student(ready, loader) is ready
    with pytest.raises(ValueError, match="already a RocketNet"):
        rocket_student(ready, loader, booster="cnn_digits_teacher", shared="stage1")
    with pytest.raises(TypeError, match=r"needs a RocketNet.*booster=<model spec> and shared="):
        rocket_student(create("cnn_digits_student"), loader)
    with pytest.raises(TypeError, match=r"with only \['shared'\]"):
        rocket_student(create("cnn_digits_student"), loader, shared="stage1")
    built = rocket_student(lambda: create("cnn_digits_student"), loader, booster="cnn_digits_teacher", shared="stage1")
    assert isinstance(built, RocketNet) and built(x).shape == (6, 10)


def test_fit_rocket_trains_a_built_rocket_on_digits(digits):
    train, val = digits
    x, y = train.inputs[:192], train.targets[:192]
    torch.manual_seed(0)
    rocket = rocket_from_models("cnn_digits_student", {"name": "cnn", "widths": [8, 16, 16]}, shared="stage1",
                                example=x[:8])
    booster_head = {k: v.clone() for k, v in rocket.booster.state_dict().items()}
    result = fit_rocket(rocket, InMemoryLoader(x, y, 64, seed=0), val.loader(512, shuffle=False), epochs=3, lr=0.1,
                        progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.booster_acc is not None
    assert any(not torch.equal(v, booster_head[k]) for k, v in rocket.booster.state_dict().items())


# ---------------------------------------------------------------------------- OKDHP's multi-branch network


def test_multi_branch_shapes_head_and_fau(x):
    torch.manual_seed(0)
    model = create(**FLAT_CNN)
    net = multi_branch_from_model(model, split="stage1", until="stage3", out_channels=10, example=x)
    assert isinstance(net, MultiBranchNet) and len(net.branches) == 3
    maps, ensemble = net(x)
    assert maps.shape == (3, 6, 10, 8, 8) and ensemble.shape == (6, 10, 8, 8)
    assert net.fau(net.trunk(x)).shape == (6, 3, 10)  # per-sample, per-channel branch weights
    assert net.fau.convs[0][0].in_channels == 8  # stage1's channels
    head = net.branches[0].head
    assert isinstance(head, nn.Conv2d) and (head.in_channels, head.out_channels, head.kernel_size) == (16, 10, (1, 1))
    assert list(dict(net.branches[0].named_children())) == ["stage2", "stage3", "head"]
    # an upsampling head when the maps are larger than the branch feature (cnn_digits_student's stage3: 2x2)
    small = multi_branch_from_model("cnn_digits_student", split="stage1", until="stage3", out_channels=10,
                                    out_size=(8, 8), example=x)
    deconv = small.branches[0].head
    assert isinstance(deconv, nn.ConvTranspose2d) and (deconv.in_channels, deconv.out_channels) == (16, 10)
    assert deconv.stride == (4, 4) and small(x)[0].shape == (3, 6, 10, 8, 8)
    assert isinstance(small.branches[2].head, nn.ConvTranspose2d)
    # no head when the branch already ends in as many maps, or when no count is asked for
    same = multi_branch_from_model(create(**FLAT_CNN), split="stage1", until="stage3", out_channels=16, example=x)
    plain = multi_branch_from_model(create(**FLAT_CNN), split="stage1", until="stage3", branches=2, example=x)
    for built in (same, plain):
        assert "head" not in dict(built.branches[0].named_children()) and built(x)[1].shape == (6, 16, 8, 8)


def test_multi_branch_shares_the_trunk_and_draws_each_branch_afresh(x):
    torch.manual_seed(0)
    model = create(**FLAT_CNN)
    net = multi_branch_from_model(model, split="stage1", until="stage3", out_channels=10, example=x)
    assert net.trunk.stem is model.stem and net.branches[0].stage2 is model.stage2  # the model's own modules
    assert ids(net.trunk) == ids(model.stem) | ids(model.stage1)
    branch_ids = [ids(b) for b in net.branches]
    assert all(not (branch_ids[i] & branch_ids[j]) for i in range(3) for j in range(i + 1, 3))
    assert all(not (b & ids(net.trunk)) for b in branch_ids)
    for k in (1, 2):  # copies, each with weights of its own
        for (name, p0), (_, pk) in zip(net.branches[0].named_parameters(), net.branches[k].named_parameters()):
            if p0.dim() > 1:
                assert not torch.equal(p0, pk), f"branch {k} starts with branch 0's {name}"
    w1, w2 = net.branches[1].stage2.body[0].weight, net.branches[2].stage2.body[0].weight
    assert not torch.equal(w1, w2)


def test_multi_branch_gradient_paths(x):
    torch.manual_seed(0)
    net = multi_branch_from_model(FLAT_CNN, split="stage1", until="stage3", out_channels=10, example=x)
    maps, _ = net(x)
    maps[1].pow(2).sum().backward()  # one branch's loss: the trunk and that branch only
    assert all(grads_of(net.trunk)) and all(grads_of(net.branches[1]))
    assert not any(grads_of(net.branches[0])) and not any(grads_of(net.branches[2])) and not any(grads_of(net.fau))
    net.zero_grad(set_to_none=True)
    _, ensemble = net(x)
    ensemble.pow(2).sum().backward()  # the ensemble's: every branch, the trunk and the aggregation unit
    assert all(grads_of(net.trunk)) and all(all(grads_of(b)) for b in net.branches)
    assert any(grads_of(net.fau))


class _NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.scale


@pytest.mark.parametrize("kwargs, error, match", [
    ({"split": "stage7"}, TapError, r"split='stage7'.*Nearest valid paths"),
    ({"split": "stage2", "until": "stage1"}, ValueError, r"until='stage1' must come after split='stage2'"),
    ({"split": "stage2", "until": "stage2.pre"}, ValueError, r"split='stage2' contains until='stage2.pre'"),
    ({"split": "stage1"}, ValueError, r"branch output \(6, 10\) is not a feature map.*until= \(one of \['stage2'"),
    ({"split": "pool", "until": "fc"}, ValueError, r"trunk's output at split='pool' is \(6, 16\)"),
    ({"split": "stage1", "until": "stage3", "branches": 1}, ValueError, r"branches must be an integer >= 2"),
    ({"split": "fc"}, ValueError, r"nothing of the model lies after split='fc'"),
])
def test_multi_branch_bad_arguments_are_clear_errors(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        multi_branch_from_model(FLAT_CNN, example=x, **kwargs)


def test_multi_branch_refuses_modules_it_cannot_reinitialise(x):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 1), _NoReset())
    with pytest.raises(ValueError, match=r"cannot re-initialise branch 1: its module '2' \(_NoReset\)"):
        multi_branch_from_model(model, split="0", example=x)


def test_okdhp_student_sizes_the_head_from_the_targets_and_checks_their_shape(digits):
    train, _ = digits
    x = train.inputs[:16]
    maps = class_heatmaps(train.denormalize(x), train.targets[:16], 10)
    loader = InMemoryLoader(x, maps, 8, seed=0)
    torch.manual_seed(0)
    net = okdhp_student(lambda: create(**FLAT_CNN), loader, split="stage1", until="stage3", num_branches=2)
    assert len(net.branches) == 2 and net(x)[1].shape == maps.shape
    assert okdhp_student(net, loader) is net
    with pytest.raises(ValueError, match="already a MultiBranchNet"):
        okdhp_student(net, loader, split="stage1")
    with pytest.raises(TypeError, match=r"needs a MultiBranchNet.*split=<module path"):
        okdhp_student(create(**FLAT_CNN), loader)
    with pytest.raises(ValueError, match=r"dense target maps \(B, C, H, W\).*class_heatmaps\), got \(8,\)"):
        okdhp_student(create(**FLAT_CNN), InMemoryLoader(x, train.targets[:16], 8), split="stage1", until="stage3")
    # the zoo digits student's stage3 is 2x2: its head upsamples to the targets' 8x8 ...
    up = okdhp_student(create("cnn_digits_student"), loader, split="stage1", until="stage3")
    assert isinstance(up.branches[0].head, nn.ConvTranspose2d) and up(x)[1].shape == maps.shape
    # ... but 2x2 cannot become 5x5 with a (transposed) convolution
    odd = InMemoryLoader(x, class_heatmaps(train.denormalize(x), train.targets[:16], 10, size=(5, 5)), 8)
    with pytest.raises(ValueError, match=r"spatial sizes differ \(\(2, 2\) vs \(5, 5\)\).*branch feature"):
        okdhp_student(create("cnn_digits_student"), odd, split="stage1", until="stage3")


def test_fit_okdhp_trains_a_built_network_on_digit_heatmaps(digits):
    train, val = digits
    x, y = train.inputs[:128], train.targets[:128]
    maps = class_heatmaps(train.denormalize(x), y, 10)
    vx = val.inputs[:128]
    vmaps = class_heatmaps(val.denormalize(vx), val.targets[:128], 10)
    torch.manual_seed(0)
    net = multi_branch_from_model(FLAT_CNN, split="stage1", until="stage3", out_channels=10, example=x[:8])
    result = fit_okdhp(net, InMemoryLoader(x, maps, 32, seed=0), InMemoryLoader(vx, vmaps, 128, shuffle=False),
                       epochs=4, optimizer="adam", lr=1e-2, rampup_epochs=2, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.last_score is not None and set(result.members) == {"branch0", "branch1", "branch2", "ensemble"}


# ---------------------------------------------------------------------------- dense targets


def test_ink_centre_by_hand():
    img = torch.zeros(2, 1, 5, 6)
    img[0, 0, 1, 2], img[0, 0, 3, 2] = 1.0, 3.0  # rows (1·1 + 3·3) / 4 = 2.5, column 2
    img[1, 0, 4, 0], img[1, 0, 0, 5] = 2.0, 2.0  # the middle of (4, 0) and (0, 5)
    torch.testing.assert_close(ink_centres(img), torch.tensor([[2.5, 2.0], [2.0, 2.5]]))
    two = torch.zeros(1, 2, 3, 3)  # channels add up; negative values are no ink
    two[0, 0, 0, 0], two[0, 1, 2, 2], two[0, 1, 0, 2] = 1.0, 1.0, -5.0
    torch.testing.assert_close(ink_centres(two), torch.tensor([[1.0, 1.0]]))


def test_class_heatmaps_by_hand():
    img = torch.zeros(2, 1, 8, 8)
    img[0, 0, 2, 5] = 1.0
    img[1, 0, 6, 1] = 0.5
    maps = class_heatmaps(img, torch.tensor([3, 0]), 4, sigma=1.0)
    assert maps.shape == (2, 4, 8, 8)
    assert maps[0, 3, 2, 5] == 1.0 and maps[1, 0, 6, 1] == 1.0
    assert math.isclose(float(maps[0, 3, 2, 6]), math.exp(-1 / 2), rel_tol=1e-6)
    assert math.isclose(float(maps[0, 3, 4, 4]), math.exp(-(4 + 1) / 2), rel_tol=1e-6)
    assert math.isclose(float(maps[1, 0, 7, 3]), math.exp(-(1 + 4) / 2), rel_tol=1e-6)
    assert maps[0, [0, 1, 2]].abs().sum() == 0 and maps[1, 1:].abs().sum() == 0
    wide = class_heatmaps(img, torch.tensor([3, 0]), 4, sigma=2.0)
    assert math.isclose(float(wide[0, 3, 2, 6]), math.exp(-1 / 8), rel_tol=1e-6)
    # on a 4x4 grid the centre (3, 3) of an 8x8 image sits at (3.5·4/8 − ½) = 1.25 on both axes
    one = torch.zeros(1, 1, 8, 8)
    one[0, 0, 3, 3] = 1.0
    small = class_heatmaps(one, torch.tensor([0]), 1, size=(4, 4))
    assert small.shape == (1, 1, 4, 4)
    assert math.isclose(float(small[0, 0, 1, 1]), math.exp(-(0.25**2 + 0.25**2) / 2), rel_tol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), dr=st.integers(-2, 2), dc=st.integers(-2, 2))
def test_ink_centre_moves_with_the_ink(seed, dr, dc):
    ink = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) + 0.01
    img = torch.zeros(1, 1, 10, 10)
    img[:, :, 3:7, 3:7] = ink
    moved = torch.roll(img, shifts=(dr, dc), dims=(2, 3))  # the ink stays inside: no wrap-around
    torch.testing.assert_close(ink_centres(moved), ink_centres(img) + torch.tensor([[dr, dc]], dtype=torch.float32))
    maps, shifted = class_heatmaps(img, torch.tensor([0]), 1), class_heatmaps(moved, torch.tensor([0]), 1)
    # and the map moves with it: the moved map at (i, j) is the map at (i - dr, j - dc)
    torch.testing.assert_close(shifted[..., 2:8, 2:8], maps[..., 2 - dr:8 - dr, 2 - dc:8 - dc])


def test_class_heatmaps_of_the_real_digits(digits):
    train, _ = digits
    x, y = train.inputs[:200], train.targets[:200]
    maps = class_heatmaps(train.denormalize(x), y, 10)
    peak = maps.flatten(2).max(dim=2).values  # (N, K)
    assert torch.equal(peak.argmax(dim=1), y)  # the map lives in the label's channel
    # the peak pixel is at most half a pixel from the sub-pixel centre on each axis: value >= exp(-1/4)
    assert float(peak.max()) <= 1.0 and float(peak.max(dim=1).values.min()) >= math.exp(-0.25) - 1e-6
    centres = ink_centres(train.denormalize(x))
    assert float(centres.min()) > 1.0 and float(centres.max()) < 6.0  # digits sit in the middle of the 8x8 frame


@pytest.mark.parametrize("call, match", [
    (lambda img: ink_centres(img[:, 0]), r"float images \(N, C, H, W\)"),
    (lambda img: ink_centres(torch.cat([img, torch.zeros_like(img[:1])])), r"image 2 has no ink"),
    (lambda img: class_heatmaps(img, torch.tensor([0, 10]), 10), r"labels must lie in \[0, 10\)"),
    (lambda img: class_heatmaps(img, torch.tensor([0.0, 1.0]), 10), r"labels must be integer classes \(2,\)"),
    (lambda img: class_heatmaps(img, torch.tensor([0, 1]), 10, sigma=0), r"sigma must be a number > 0"),
    (lambda img: class_heatmaps(img, torch.tensor([0, 1]), 0), r"num_classes must be an integer >= 1"),
])
def test_dense_target_errors(call, match):
    img = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=match):
        call(img)


def test_built_dense_heads_start_small_like_pose_heads():
    """Every branch's added head starts as SimpleBaseline's / HRNet's final layers: weights of std
    0.001 and zero biases, the copies' heads too after their re-initialisation."""
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(0)
    net = multi_branch_from_model("cnn_digits_student", split="stage1", until="stage3", branches=3,
                                  out_channels=10, out_size=(8, 8), example=x)
    for branch in net.branches:
        head = branch[-1]
        weights = [m.weight for m in head.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        assert weights and all(0.0005 < float(w.detach().std()) < 0.002 for w in weights)
        assert all(float(m.bias.detach().abs().max()) == 0.0 for m in head.modules()
                   if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None)
    first, second = ([m.weight for m in b[-1].modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][0]
                     for b in net.branches[:2])
    assert not torch.equal(first, second)  # small, but drawn independently
