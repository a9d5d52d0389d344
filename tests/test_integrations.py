"""Models of the optional ecosystems by prefixed spec (``timm:``, ``torchvision:``, ``hf:``), their
local weights, taps on them, and the clear errors when a prefix or a package is wrong or absent.

timm and torchvision tests run only where those import: timm 1.0 imports torchvision at import
time, and PyPI's torchvision is a CUDA build that does not load with the CPU torch of this
project's environment. The Hugging Face tests build tiny configs locally (nothing is downloaded).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from distill import Distiller, fit
from distill.data import InMemoryLoader, get_dataset
from distill.integrations import (
    MissingExtraError,
    adapt_input_conv,
    check_model_spec,
    load_pretrained,
    read_state_dict,
    split_spec,
)
from distill.methods import FitNet, create_method
from distill.models import create
from distill.recipes import RecipeError, parse_recipe
from distill.taps import logits_of
from distill.teachers import FrozenTeacher

from _optional import missing


NO_TIMM = missing("timm")
if NO_TIMM and "torchvision" in NO_TIMM:
    NO_TIMM += ": timm 1.0 imports torchvision at import time and PyPI's torchvision (a CUDA build) does not load " \
               "with the CPU torch"
NO_TORCHVISION = missing("torchvision")
NO_TRANSFORMERS = missing("transformers")
NO_SAFETENSORS = missing("safetensors")


@pytest.fixture(scope="module")
def digits():
    tr = get_dataset("digits", split="train")
    va = get_dataset("digits", split="val")
    return tr.inputs[:64].clone(), tr.targets[:64].clone(), va.inputs[:32].clone(), va.targets[:32].clone()


def _loaders(digits):
    x, y, vx, vy = digits
    return (InMemoryLoader(x, y, 32, shuffle=True, seed=0),
            InMemoryLoader(vx, vy, 32, shuffle=False))


def _recipe(student: dict, **extra) -> dict:
    return {"name": "eco", "data": {"name": "digits", "val_split": "val", "train_subset": 64},
            "student": student, "train": {"epochs": 1, "device": "cpu"}, **extra}


# --------------------------------------------------------------------------- specs and their errors


def test_split_spec_keeps_a_path_whole():
    assert split_spec("timm:resnet18") == ("timm", "resnet18")
    assert split_spec("hf:C:/models/vit") == ("hf", "C:/models/vit")
    assert split_spec("resnet8x4") is None


def test_unknown_prefix_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown prefix 'tim'.*Did you mean 'timm'.*'torchvision:'"):
        create("tim:resnet18", num_classes=10)
    with pytest.raises(ValueError, match="nothing after 'timm:'"):
        check_model_spec("timm:")


def test_unknown_prefix_in_a_recipe_names_the_key():
    with pytest.raises(RecipeError, match=r"student.*unknown prefix 'tv'"):
        parse_recipe(_recipe({"name": "tv:resnet18"}))
    with pytest.raises(RecipeError, match=r"unknown model 'resnet18x'.*timm:NAME"):
        parse_recipe(_recipe({"name": "resnet18x"}))


@pytest.mark.parametrize("spec, package, extra", [("timm:resnet18", "timm", "vision"),
                                                  ("torchvision:resnet18", "torchvision", "vision"),
                                                  ("hf:some/model", "transformers", "hf")])
def test_absent_package_names_the_extra(spec, package, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # what `import package` sees when it is not installed
    message = f"model spec '{spec}' needs {package}: pip install 'distill[{extra}]'"
    with pytest.raises(MissingExtraError) as info:
        create(spec, num_classes=10)
    assert str(info.value) == message
    assert isinstance(info.value, ImportError)
    # a recipe says so while validating, before any data is loaded or model built
    with pytest.raises(RecipeError, match=r"student: .*needs " + package + r": pip install 'distill\[" + extra):
        parse_recipe(_recipe({"name": spec}))


def test_a_package_that_fails_to_import_says_why(monkeypatch):
    real_import = importlib.import_module

    def broken(name, *args):  # timm installed but its own import of torchvision failing
        if name == "timm":
            raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(MissingExtraError, match=r"needs timm: pip install 'distill\[vision\]' \(timm is installed but "
                                                r"importing it failed: No module named 'torchvision'\)"):
        check_model_spec("timm:resnet18")


def test_core_import_loads_no_ecosystem():
    import subprocess

    code = ("import sys, distill, distill.recipes, distill.runner, distill.cli, distill.train, distill.train.hf_trainer, "
            "distill.strategies.gkd; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('timm', 'torchvision', 'transformers', 'tensorboard', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- local weights (no package needed)


def test_adapt_input_conv_keeps_the_response_to_grey_images():
    w = torch.randn(4, 3, 3, 3)
    grey = torch.randn(2, 1, 5, 5)
    rgb = grey.expand(2, 3, 5, 5)
    ref = nn.functional.conv2d(rgb, w)
    assert torch.allclose(nn.functional.conv2d(grey, adapt_input_conv(w, 1)), ref, atol=1e-5)
    six = grey.expand(2, 6, 5, 5)
    assert torch.allclose(nn.functional.conv2d(six, adapt_input_conv(w, 6)), ref, atol=1e-5)
    assert adapt_input_conv(w, 5).shape == (4, 5, 3, 3)


def _cnn(num_classes=10, in_channels=1):
    torch.manual_seed(num_classes + in_channels)
    return create("cnn", num_classes=num_classes, in_channels=in_channels, widths=(4, 8))


def test_load_pretrained_adapts_the_input_conv_and_only_reinitialises_the_classifier(tmp_path):
    source = _cnn(num_classes=100, in_channels=3)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = _cnn(num_classes=10, in_channels=1)
    fresh_fc = model.fc.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"\['fc.weight', 'fc.bias'\] have 10 classes"):
        report = load_pretrained(model, tmp_path / "w.pt", num_classes=10, in_channels=1, spec="cnn")
    first = report["adapted"][0]
    assert report["reinitialised"] == ["fc.weight", "fc.bias"]
    assert torch.equal(model.state_dict()[first], source.state_dict()[first].sum(1, keepdim=True))
    assert torch.equal(model.fc.weight, fresh_fc)
    for key, value in source.state_dict().items():
        if key != first and not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key


def test_load_pretrained_refuses_other_differences(tmp_path):
    torch.save(create("cnn", num_classes=10, widths=(4, 16)).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"do not fit CNN: .*file \(16, .*vs model \(8, "):
        load_pretrained(_cnn(), tmp_path / "wide.pt", num_classes=10, in_channels=1)
    torch.save({"stem.conv.weight": torch.zeros(1)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"missing \['stem.0.weight'|missing \["):
        load_pretrained(_cnn(), tmp_path / "partial.pt")


class Payload:  # an object whose unpickling would run this module's code
    pass


def test_read_state_dict_never_unpickles_code(tmp_path):
    torch.save({"weight": torch.zeros(2), "obj": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pt")
    torch.save({"state_dict": {"module.a": torch.ones(1)}, "epoch": 3}, tmp_path / "wrapped.pt")
    assert list(read_state_dict(tmp_path / "wrapped.pt")) == ["a"]


@pytest.mark.skipif(NO_SAFETENSORS is not None, reason=str(NO_SAFETENSORS))
def test_read_state_dict_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.arange(3.0)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["a"], torch.arange(3.0))


# --------------------------------------------------------------------------- timm


@pytest.mark.skipif(NO_TIMM is not None, reason=str(NO_TIMM))
def test_timm_model_sized_by_the_data():
    model = create("timm:resnet10t", num_classes=10, in_channels=1)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    vit = create("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, img_size=8, patch_size=2)
    assert vit(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"timm has no model 'resnet10tt'.*Did you mean 'timm:resnet10t'"):
        create("timm:resnet10tt", num_classes=10)


@pytest.mark.skipif(NO_TIMM is not None, reason=str(NO_TIMM))
def test_timm_pretrained_from_a_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet10t", num_classes=1000, in_chans=3)
    save_file(source.state_dict(), str(tmp_path / "r10t.safetensors"))
    with pytest.warns(UserWarning, match="fresh initialisation"):
        model = create("timm:resnet10t", num_classes=10, in_channels=1, pretrained=str(tmp_path / "r10t.safetensors"))
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True))
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    with pytest.raises(ValueError, match="never downloads"):
        create("timm:resnet10t", pretrained=True)


@pytest.mark.skipif(NO_TIMM is not None, reason=str(NO_TIMM))
def test_distiller_with_a_timm_teacher_and_a_tap_fits(digits, tmp_path):
    train, val = _loaders(digits)
    teacher = create("timm:resnet10t", num_classes=10, in_channels=1)
    student = create("cnn_digits_student")
    d = Distiller(student, FrozenTeacher(teacher), losses={
        "ce": 1.0, "kd": create_method("kd", T=4.0),
        "fitnet": FitNet(student_tap="stage3", teacher_tap="layer1", weight=0.5)})  # (B, 16|64, 2, 2)
    result = fit(d, train, val, epochs=1, lr=0.05, progress=False, device="cpu", run_dir=tmp_path / "run")
    row = result.history[0]
    assert {"train_fitnet", "val_teacher_acc"} <= set(row) and torch.isfinite(torch.tensor(row["train_loss"]))


@pytest.mark.skipif(NO_TIMM is not None, reason=str(NO_TIMM))
def test_recipe_with_a_timm_teacher_validates():
    recipe = parse_recipe(_recipe({"name": "cnn_digits_student"}, teacher={
        "model": {"name": "timm:resnet10t"}, "train": {"epochs": 1}}))
    assert recipe.teacher.model.name == "timm:resnet10t"
    with pytest.raises(RecipeError, match="pretrained weights file .*does not exist"):
        parse_recipe(_recipe({"name": "timm:resnet10t", "kwargs": {"pretrained": "/no/such.safetensors"}}))


# --------------------------------------------------------------------------- torchvision


@pytest.mark.skipif(NO_TORCHVISION is not None, reason=str(NO_TORCHVISION))
def test_torchvision_model_for_grey_images_and_local_weights(tmp_path):
    import torchvision

    model = create("torchvision:resnet18", num_classes=10, in_channels=1)
    assert model.conv1.in_channels == 1 and model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    with pytest.warns(UserWarning, match="fresh initialisation"):
        model = create("torchvision:resnet18", num_classes=10, in_channels=1, pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        create("torchvision:fasterrcnn_resnet50_fpn", num_classes=10)


# --------------------------------------------------------------------------- Hugging Face


def _tiny_vit(folder: Path, *, num_labels: int = 10, weights: bool = True) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=num_labels)
    model = ViTForImageClassification(config)
    if weights:
        model.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return model


@pytest.mark.skipif(NO_TRANSFORMERS is not None, reason=str(NO_TRANSFORMERS))
def test_hf_model_from_a_local_folder(tmp_path):
    source = _tiny_vit(tmp_path / "vit")
    model = create(f"hf:{tmp_path / 'vit'}", num_classes=10, in_channels=1)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(3, 1, 8, 8)
    out = model.eval()(x)
    assert not isinstance(out, torch.Tensor)  # a ModelOutput ...
    assert torch.equal(logits_of(out), out.logits) and out.logits.shape == (3, 10)  # ... whose logits we read
    with pytest.warns(UserWarning, match=r"classifier.*fresh initialisation"):
        three = create(f"hf:{tmp_path / 'vit'}", num_classes=3, in_channels=1)
    assert torch.equal(three.vit.embeddings.patch_embeddings.projection.weight,
                       source.vit.embeddings.patch_embeddings.projection.weight)


@pytest.mark.skipif(NO_TRANSFORMERS is not None, reason=str(NO_TRANSFORMERS))
def test_hf_errors_are_clear_and_early(tmp_path):
    _tiny_vit(tmp_path / "vit")
    _tiny_vit(tmp_path / "config_only", weights=False)
    spec = f"hf:{tmp_path / 'vit'}"
    with pytest.raises(ValueError, match="does not exist"):
        create(f"hf:{tmp_path / 'nothing'}", num_classes=10)
    with pytest.raises(TypeError, match=r"\['hiden_size'\] are not attributes of its ViTConfig"):
        create(spec, num_classes=10, hiden_size=8)
    with pytest.raises(ValueError, match="holds no weights .*pretrained: false"):
        create(f"hf:{tmp_path / 'config_only'}", num_classes=10)
    with pytest.raises(ValueError, match=r"mismatched .*patch_embeddings.*num_channels"):
        create(spec, num_classes=10, in_channels=3)
    fresh = create(f"hf:{tmp_path / 'config_only'}", num_classes=4, in_channels=3, pretrained=False)
    assert fresh(torch.randn(1, 3, 8, 8)).logits.shape == (1, 4)
    with pytest.raises(RecipeError, match="student: .*holds no weights"):
        parse_recipe(_recipe({"name": f"hf:{tmp_path / 'config_only'}"}))


@pytest.mark.skipif(NO_TRANSFORMERS is not None, reason=str(NO_TRANSFORMERS))
def test_distiller_with_an_hf_teacher_and_a_tap_fits(digits, tmp_path):
    _tiny_vit(tmp_path / "vit")
    teacher = create(f"hf:{tmp_path / 'vit'}", num_classes=10, in_channels=1)
    train, val = _loaders(digits)
    student = create("cnn_digits_student")
    d = Distiller(student, FrozenTeacher(teacher), losses={
        "ce": 1.0, "kd": create_method("kd", T=4.0),
        "fitnet": FitNet(student_tap="fc:input", teacher_tap="classifier:input", adapter="linear",
                         weight=0.5)})  # pooled feature (B, 16) -> the [CLS] token (B, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the exact folder: no weight left fresh
        result = fit(d, train, val, epochs=1, lr=0.05, progress=False, device="cpu")
    row = result.history[0]
    assert "train_fitnet" in row and 0 <= row["val_teacher_acc"] <= 100
