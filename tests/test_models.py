"""Model registry, parameter budgets and tap points of the built-in models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.models import CNN, MLP, UnknownModelError, create, create_model, list_models, register_model

# name -> (target parameter count, input shape (C, H, W))
TARGETS = {
    "cnn_teacher_mnist": (1_200_000, (1, 28, 28)),
    "cnn_student_mnist": (100_000, (1, 28, 28)),
    "cnn_digits_teacher": (210_000, (1, 8, 8)),
    "cnn_digits_student": (2_300, (1, 8, 8)),
    "mlp_digits_student": (2_400, (1, 8, 8)),
}
INPUT_SHAPES = {name: shape for name, (_, shape) in TARGETS.items()} | {"cnn": (1, 8, 8), "mlp": (1, 28, 28)}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_builtin_models():
    assert set(TARGETS) | {"cnn", "mlp"} <= set(list_models())
    assert list_models("cnn_digits_*") == ["cnn_digits_student", "cnn_digits_teacher", "cnn_digits_teacher_binary"]
    assert create_model is create


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_parameter_count_within_10_percent(name):
    target, _ = TARGETS[name]
    count = n_params(create(name))
    assert abs(count - target) <= 0.1 * target, f"{name}: {count} parameters, target {target}"


def test_digits_student_is_much_smaller_than_teacher():
    assert n_params(create("cnn_digits_teacher")) > 50 * n_params(create("cnn_digits_student"))


def test_unknown_name_is_a_helpful_key_error():
    with pytest.raises(KeyError) as info:
        create("cnn_digit_teacher")
    message = str(info.value)
    assert isinstance(info.value, UnknownModelError)
    assert "'cnn_digit_teacher'" in message
    assert "Did you mean 'cnn_digits_teacher'" in message
    assert "mlp_digits_student" in message  # the full list of names


def test_unknown_argument_names_model_and_accepted_arguments():
    with pytest.raises(TypeError, match=r"model 'cnn' got unexpected arguments \['width'\].*widths"):
        create("cnn", width=3)


def test_register_model_refuses_to_shadow_a_name():
    with pytest.raises(ValueError, match="already registered"):
        register_model("cnn")(lambda: nn.Identity())


@pytest.mark.parametrize("name", sorted(INPUT_SHAPES))
def test_tap_points_exist_and_have_expected_shapes(name):
    model = create(name).eval()
    c, h, w = INPUT_SHAPES[name]
    batch = 3
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for path in model.tap_points:
        module = model.get_submodule(path)  # raises if the path does not exist
        handles.append(module.register_forward_hook(lambda m, i, o, path=path: captured.__setitem__(path, o)))
    with torch.no_grad():
        logits = model(torch.randn(batch, c, h, w))
    for handle in handles:
        handle.remove()

    assert set(captured) == set(model.tap_points)
    assert logits.shape == (batch, 10)
    assert torch.equal(captured["fc"], logits)
    assert captured["pool"].shape == (batch, model.feature_dim)
    feature_taps = [p for p in model.tap_points if p not in ("pool", "fc") and not p.endswith(".pre")]
    for path in feature_taps:
        pre = captured.get(f"{path}.pre")
        if pre is not None:
            assert pre.shape == captured[path].shape, path
            # pre is the tensor *before* the ReLU: it has negatives and ReLU(pre) is the output.
            assert (pre < 0).any(), f"{path}.pre looks post-activation"
            assert torch.equal(torch.relu(pre), captured[path]), path
    if isinstance(model, CNN):
        assert model.tap_points[0] == "stem"
        for path in feature_taps:
            assert captured[path].dim() == 4 and captured[path].shape[0] == batch


def test_digit_cnns_keep_every_stage_at_least_2x2():
    for name in ("cnn_digits_teacher", "cnn_digits_student", "cnn"):
        model = create(name).eval()
        sizes = {}
        hooks = [
            model.get_submodule(f"stage{k}").register_forward_hook(
                lambda m, i, o, k=k: sizes.__setitem__(k, tuple(o.shape[-2:]))
            )
            for k in range(1, model.num_stages + 1)
        ]
        model(torch.randn(2, 1, 8, 8))
        for hook in hooks:
            hook.remove()
        assert sizes == {1: (8, 8), 2: (4, 4), 3: (2, 2)}, name


@pytest.mark.parametrize("size", [(8, 8), (9, 13), (28, 28), (32, 32)])
def test_cnn_works_for_any_input_size_and_channels(size):
    model = create("cnn", widths=(4, 8, 8, 8), num_classes=7, in_channels=3)
    assert model(torch.randn(2, 3, *size)).shape == (2, 7)
    assert model.tap_points[-4:] == ("stage4.pre", "stage4", "pool", "fc")


def test_cnn_configuration_and_errors():
    model = create("cnn", widths=(8, 16), blocks=(1, 3), stem_width=4)
    body = model.get_submodule("stage2.body")
    assert len(body) == 1 + 3 * 2 + 2  # max-pool, 3 x (conv, bn), a ReLU between blocks
    assert isinstance(body[-1], nn.BatchNorm2d)  # the last ReLU lives after stage2.pre
    with pytest.raises(ValueError, match="blocks has 3 entries but the model has 2 stages"):
        create("cnn", widths=(8, 16), blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="widths must list at least one"):
        create("cnn", widths=())
    with pytest.raises(ValueError, match="CNN expects images"):
        create("cnn")(torch.randn(2, 64))


def test_mlp_configuration_and_input_check():
    model = create("mlp", hidden=(16, 8), input_size=8, num_classes=3)
    assert isinstance(model, MLP)
    assert model.tap_points == ("hidden1.pre", "hidden1", "hidden2.pre", "hidden2", "pool", "fc")
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 3)
    assert model(torch.randn(4, 64)).shape == (4, 3)  # already flat
    with pytest.raises(ValueError, match="built for 64 input features but got 784"):
        model(torch.randn(4, 1, 28, 28))
    assert create("mlp", in_features=5, hidden=())(torch.randn(2, 5)).shape == (2, 10)


def test_models_train_one_step():
    model = create("cnn_digits_student")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in model.parameters())
