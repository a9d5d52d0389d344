"""The self-supervised evaluation protocols: linear probe on frozen features, and fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distill.data.loader import InMemoryLoader
from distill.models.small import cnn_student_mnist
from distill.models.vit import ViT
from distill.taps import TapError
from distill.train.probe import extract_features, finetune, linear_probe, train_linear

torch.set_num_threads(1)


def _vit(num_classes: int = 3) -> ViT:
    torch.manual_seed(0)
    return ViT(num_classes, 1, img_size=8, patch_size=4, dim=16, depth=1, heads=2)


def _images(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, torch.arange(n) % 3


def test_extract_features_reads_the_tap_in_loader_order() -> None:
    model = _vit()
    x, y = _images()
    loader = InMemoryLoader(x, y, batch_size=5, shuffle=False)
    feats, labels = extract_features(model, loader, features="head:input")
    with torch.no_grad():
        tokens = model.forward_features(x)  # head:input is the normed class token
    assert torch.allclose(feats, tokens[:, 0], atol=1e-6)
    assert torch.equal(labels, y)
    mean_patch, _ = extract_features(model, loader, features="norm", pool="mean")
    assert torch.allclose(mean_patch, tokens[:, 1:].mean(1), atol=1e-6)  # the class token is left out
    out, _ = extract_features(model, loader, features=lambda m, inp: m.forward_features(inp)[:, 1])
    assert torch.allclose(out, tokens[:, 1], atol=1e-6)


def test_extract_features_freezes_nothing_and_restores_modes() -> None:
    model = _vit()
    model.train()
    model.blocks[0].eval()  # a user's frozen sub-module stays as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _images()
    extract_features(model, InMemoryLoader(x, y, 8, shuffle=False))
    assert model.training and not model.blocks[0].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_extract_features_errors_are_clear() -> None:
    model = _vit()
    x, y = _images()
    loader = InMemoryLoader(x, y, 8, shuffle=False)
    with pytest.raises(ValueError, match="pool='cls'"):
        extract_features(model, loader, features="norm")
    with pytest.raises(TapError, match="blocks.0"):
        extract_features(model, loader, features="blocks.9")
    with pytest.raises(ValueError, match="pool must be one of"):
        extract_features(model, loader, features="norm", pool="max")


def test_lbfgs_probe_is_sklearn_logistic_regression() -> None:
    # the same objective: mean CE + wd/2 ||W||^2  <=>  sklearn's C = 1 / (N wd); probabilities are unique
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    x = rng.normal(size=(90, 4))
    y = (x @ rng.normal(size=(4, 3)) + 0.8 * rng.normal(size=(90, 3))).argmax(1)
    wd = 0.05
    clf = train_linear(torch.tensor(x, dtype=torch.float32), torch.tensor(y), 3, solver="lbfgs", epochs=500,
                       weight_decay=wd)
    ref = LogisticRegression(C=1.0 / (len(x) * wd), tol=1e-10, max_iter=10000).fit(x, y)
    with torch.no_grad():
        ours = torch.softmax(clf(torch.tensor(x, dtype=torch.float32)), 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x), atol=2e-3)  # float32 on a flat optimum

    def objective(w: np.ndarray, b: np.ndarray) -> float:  # written out in numpy, float64
        z = x @ w.T + b
        log_p = z - z.max(1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
        return float(-log_p[np.arange(len(y)), y].mean() + 0.5 * wd * (w ** 2).sum())

    ours_obj = objective(clf.weight.detach().double().numpy(), clf.bias.detach().double().numpy())
    assert ours_obj == pytest.approx(objective(ref.coef_, ref.intercept_), rel=1e-5)


def test_sgd_probe_minimises_the_same_objective() -> None:
    # SGD with enough steps reaches (close to) the L-BFGS optimum of the convex objective
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    wd = 0.1

    def objective(clf: nn.Linear) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(clf(x), y) + 0.5 * wd * clf.weight.pow(2).sum())

    best = objective(train_linear(x, y, 2, solver="lbfgs", epochs=300, weight_decay=wd))
    sgd = objective(train_linear(x, y, 2, solver="sgd", epochs=200, lr=0.5, batch_size=16, weight_decay=wd))
    assert best <= sgd + 1e-6 and sgd - best < 2e-3


class _Linear(nn.Module):
    """A fixed 'encoder': features = flattened inputs times a matrix, scaled."""

    def __init__(self, scale: float, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight.data.copy_(weight * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))


def test_linear_probe_accuracy_and_standardisation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 2, 2, generator=g)
    w_true = torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, -1.0, 1.0], [-1.0, 0.0, 0.5, -1.0]])
    y = (x.flatten(1) @ w_true.T).argmax(1)
    tr, va = InMemoryLoader(x[:150], y[:150], 32, shuffle=False), InMemoryLoader(x[150:], y[150:], 32, shuffle=False)
    weight = torch.eye(4)
    out = linear_probe(_Linear(1.0, weight), tr, va, features=None, solver="lbfgs", epochs=200, progress=False)
    assert out["top1"] >= 94.0 and out["num_features"] == 4 and out["num_train"] == 150 and out["num_val"] == 50
    # standardisation makes the probe blind to the features' scale: SGD (not scale-invariant by itself)
    # gives the same accuracy at scale 1e-3 as at scale 1, and barely moves without standardisation
    sgd = dict(features=None, solver="sgd", epochs=10, lr=0.1, progress=False)
    unit, tiny = linear_probe(_Linear(1.0, weight), tr, va, **sgd), linear_probe(_Linear(1e-3, weight), tr, va, **sgd)
    assert unit["top1"] >= 85.0 and tiny["top1"] == pytest.approx(unit["top1"])
    assert tiny["train_top1"] == pytest.approx(unit["train_top1"])
    raw = linear_probe(_Linear(1e-3, weight), tr, va, **sgd, standardize=False)
    assert raw["train_top1"] < unit["train_top1"] - 5
    # an encoder that throws the information away gives chance-level accuracy
    blind = linear_probe(_Linear(1.0, torch.zeros(4, 4)), tr, va, features=None, epochs=5, progress=False)
    assert blind["top1"] < 60.0


def test_linear_probe_needs_labels() -> None:
    x, _ = _images()
    with pytest.raises(ValueError, match="labelled"):
        linear_probe(_vit(), InMemoryLoader(x, None, 8), InMemoryLoader(x, None, 8), progress=False)


def test_finetune_replaces_the_head_and_trains_everything() -> None:
    encoder = _vit(num_classes=3)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    x, _ = _images(32)
    y = (x.mean((1, 2, 3)) > 0).long()
    tr, va = InMemoryLoader(x, y, 16, shuffle=False), InMemoryLoader(x, y, 16, shuffle=False)
    res = finetune(encoder, 2, tr, va, epochs=2, lr=1e-3, progress=False)
    model = res.model
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 2 and model.head.in_features == 16
    assert encoder.head.out_features == 3  # the caller's encoder is copied, never changed
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(before[k], v)
               and not k.startswith("head")]
    assert any(k.startswith("blocks.0") for k in changed) and "patch_embed.proj.weight" in changed
    assert res.last_acc is not None and len(res.history) == 2


def test_finetune_cnn_head_path_and_errors() -> None:
    torch.manual_seed(0)
    cnn = cnn_student_mnist(num_classes=10)
    x = torch.randn(16, 1, 28, 28)
    y = torch.arange(16) % 4
    loader = InMemoryLoader(x, y, 8, shuffle=False)
    res = finetune(cnn, 4, loader, None, epochs=1, lr=1e-3, progress=False)  # the default finds "fc"
    assert res.model.fc.out_features == 4
    feats, _ = extract_features(cnn, loader)  # "classifier": fc's input for a CNN
    explicit, _ = extract_features(cnn, loader, features="pool")
    assert feats.shape == (16, 128) and torch.allclose(feats, explicit)  # cnn_student_mnist: 128 wide
    with pytest.raises(TapError, match="fc"):
        finetune(cnn, 4, loader, None, epochs=1, lr=1e-3, head="fcc", progress=False)
    with pytest.raises(ValueError, match="lr must be"):
        finetune(cnn, 4, loader, None, epochs=1, lr=0.0, head="fc", progress=False)
