"""D3Former (Mohamed et al., arXiv 2208.00777): Grad-CAM over tokens, the dual distillation terms, the debiased
loss of a phase, the protocol's metrics, and a short class-incremental run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill import functional as DF
from distill.data import get_dataset
from distill.data.loader import InMemoryLoader
from distill.models import create
from distill.strategies.incremental import CosineHead, _gradcam, _phase_loss, fit_class_incremental


def _gradcam_loop(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    out = np.zeros(a.shape[:2])
    for b in range(a.shape[0]):
        w = [sum(g[b, l, d] for l in range(a.shape[1])) / a.shape[1] for d in range(a.shape[2])]
        c = [max(0.0, sum(w[d] * a[b, l, d] for d in range(a.shape[2]))) for l in range(a.shape[1])]
        out[b] = [(v - min(c)) / (max(c) - min(c) + 1e-7) for v in c]
    return out


def test_token_gradcam_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    a, g = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
    cam = DF.token_gradcam(torch.from_numpy(a), torch.from_numpy(g))
    np.testing.assert_allclose(cam.numpy(), _gradcam_loop(a, g), rtol=1e-10, atol=1e-12)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.1, 10.0), seed=st.integers(0, 1000))
def test_gradcam_is_invariant_to_scaling_the_gradient(scale, seed):
    g = torch.Generator().manual_seed(seed)
    a, grads = torch.randn(2, 6, 3, generator=g, dtype=torch.float64), torch.randn(2, 6, 3, generator=g,
                                                                                    dtype=torch.float64)
    torch.testing.assert_close(DF.token_gradcam(a, scale * grads, 1e-12), DF.token_gradcam(a, grads, 1e-12))


def test_distillation_terms_on_hand_numbers():
    f, ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    assert float(DF.cosine_feature_distillation(f, ref)) == pytest.approx((1 - 1 / math.sqrt(2) + 0.0) / 2)
    cam, ref_cam = torch.tensor([[0.0, 1.0], [0.5, 0.5]]), torch.tensor([[1.0, 1.0], [0.0, 0.25]])
    assert float(DF.cam_distillation_loss(cam, ref_cam)) == pytest.approx((1 + 0 + 0.5 + 0.25) / 4)


def test_protocol_metrics_on_a_hand_matrix():
    acc = torch.tensor([[90.0, 0, 0], [60, 80, 0], [30, 50, 70]])
    assert DF.average_incremental_accuracy(acc) == pytest.approx((90 + 70 + 50) / 3)
    assert DF.average_incremental_accuracy(acc, torch.tensor([1, 3, 1])) == pytest.approx(
        (90 + (60 + 240) / 4 + (30 + 150 + 70) / 5) / 3)
    assert DF.forgetting(acc) == pytest.approx(((90 - 30) + (80 - 50)) / 2)
    assert DF.forgetting(torch.tensor([[50.0, 0.0], [70.0, 60.0]])) == pytest.approx(-20.0)  # it improved
    assert DF.forgetting(torch.tensor([[55.0]])) == 0.0
    with pytest.raises(ValueError, match="square"):
        DF.forgetting(torch.zeros(2, 3))


def _vit(classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = create("vit_tiny", num_classes=10, img_size=8, patch_size=2)
    m.head = CosineHead(m.head.in_features, classes, 3.0)
    return m


def test_a_phase_loss_is_debiased_ce_plus_feature_and_attention_distillation():
    model, ref = _vit(4), _vit(2)
    with torch.no_grad():
        ref.head.weight.copy_(model.head.weight[:2] + 0.3)
        for p in ref.blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.eval().requires_grad_(False)
    model.eval()  # no dropout in the zoo ViT; eval mode keeps the two forward passes below identical
    x, y = get_dataset("digits", split="train").inputs[:6], torch.tensor([0, 1, 2, 3, 2, 3])
    prior = torch.tensor([0.1, 0.1, 0.4, 0.4], dtype=torch.float64)
    lam, gamma, tau = 2.5, 0.7, 0.6
    loss = _phase_loss(model, ref, "d3former", x, y, 2, prior, lam, gamma, tau, 2.0, "blocks.3.norm1", 1)
    # the same three terms, written out
    feats = {}
    hook = model.head.register_forward_pre_hook(lambda _m, a: feats.__setitem__("f", a[0]))
    z = model(x)
    hook.remove()
    ce = F.cross_entropy(z + tau * torch.log(prior.float()), y)
    rhook = ref.head.register_forward_pre_hook(lambda _m, a: feats.__setitem__("r", a[0]))
    ref(x[:2])
    rhook.remove()
    cos = (1 - F.cosine_similarity(feats["f"][:2], feats["r"], dim=1)).mean()
    cam = (_gradcam(model, x[:2], "blocks.3.norm1", 1, True) - _gradcam(ref, x[:2], "blocks.3.norm1", 1, False)).abs().mean()
    assert float(cam.detach()) > 1e-3 and float(cos.detach()) > 1e-4
    torch.testing.assert_close(loss, ce + lam * cos + gamma * cam, atol=1e-5, rtol=1e-5)
    qkv = model.blocks[0].attn.qkv.weight
    (g_loss,) = torch.autograd.grad(loss, qkv, retain_graph=True)
    (g_rest,) = torch.autograd.grad(ce + lam * cos, qkv, retain_graph=True)
    (g_cam,) = torch.autograd.grad(gamma * cam, qkv, retain_graph=True)
    scale = float(g_cam.abs().max())
    assert scale > 0  # the attention term trains the model (the authors' numpy Grad-CAM does not)
    torch.testing.assert_close(g_loss - g_rest, g_cam, atol=1e-3 * scale, rtol=0)


def test_baselines_phase_losses():
    model, ref = _vit(4), _vit(2)
    head = torch.nn.Linear(64, 4)
    model.head, ref.head = head, torch.nn.Linear(64, 2)
    ref.eval().requires_grad_(False)
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 2])
    prior = torch.full((4,), 0.25, dtype=torch.float64)
    z = model(x)
    ft = _phase_loss(model, ref, "finetune", x, y, 2, prior, 1.0, 1.0, 1.0, 2.0, "blocks.3.norm1", 1)
    torch.testing.assert_close(ft, F.cross_entropy(z, y))
    lwf = _phase_loss(model, ref, "lwf", x, y, 2, prior, 1.0, 1.0, 1.0, 3.0, "blocks.3.norm1", 1)
    p, q = F.softmax(ref(x) / 3.0, 1), F.log_softmax(z[:, :2] / 3.0, 1)
    kd = 9.0 * (p * (p.log() - q)).sum(1).mean()
    torch.testing.assert_close(lwf, F.cross_entropy(z, y) + kd, atol=1e-6, rtol=1e-6)


def test_a_short_class_incremental_run_and_its_errors():
    torch.set_num_threads(1)
    tr, va = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    keep = tr.targets < 4
    train = InMemoryLoader(tr.inputs[keep][:120], tr.targets[keep][:120], 32)
    val = InMemoryLoader(va.inputs[va.targets < 4], va.targets[va.targets < 4], 64)
    factory = lambda: create("vit_tiny", num_classes=4, img_size=8, patch_size=2)  # noqa: E731
    res = fit_class_incremental(factory, train, val, epochs=1, num_tasks=2, memory_per_class=3, progress=False,
                                optimizer="adamw", lr=1e-3, the_lambda=5.0)
    assert len(res.history) == 2 and [len(r) for r in res.acc_matrix] == [1, 2]
    assert isinstance(res.student.head, CosineHead) and res.student.head.weight.shape == (4, 64)
    expected = DF.average_incremental_accuracy(torch.tensor([[res.acc_matrix[0][0], 0.0], res.acc_matrix[1]]),
                                               torch.tensor([int((val.targets < 2).sum()), int((val.targets >= 2).sum())]))
    assert res.avg_incremental_acc == pytest.approx(expected)
    assert res.forgetting == pytest.approx(res.acc_matrix[0][0] - res.acc_matrix[1][0])
    with pytest.raises(ValueError, match="equal tasks"):
        fit_class_incremental(factory, train, val, epochs=1, num_tasks=3, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_class_incremental(factory, train, val, epochs=1, method="icarl", num_tasks=2, progress=False)
    with pytest.raises(TypeError, match="linear classifier `head`"):
        fit_class_incremental(lambda: create("cnn_digits_student"), train, val, epochs=1, num_tasks=2, progress=False)
    assert copy.deepcopy(res.student.head)(torch.randn(2, 64)).shape == (2, 4)
