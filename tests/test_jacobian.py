"""Jacobian matching and knowledge projection: losses against independent computations, the
linear-model case worked by hand, double backprop into the student, an untouched teacher, and
end to end through the Distiller and fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distill
from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch
from distill.methods import JacobianMatching, KnowledgeProjection, create_method, method_info
from distill.models import create

SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 10_000)


def rand(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def np_jacobian_loss(gs: np.ndarray, gt: np.ndarray, squared: bool = True) -> float:
    total = 0.0
    for a, b in zip(gs.reshape(len(gs), -1), gt.reshape(len(gt), -1)):
        ua = a / math.sqrt(sum(v * v for v in a))
        ub = b / math.sqrt(sum(v * v for v in b))
        d2 = sum((x - y) ** 2 for x, y in zip(ub, ua))
        total += d2 if squared else math.sqrt(d2)
    return total / len(gs)


@SETTINGS
@given(seeds, st.integers(1, 5), st.booleans())
def test_jacobian_matching_loss_matches_numpy(seed, b, squared):
    gs, gt = rand(seed, b, 2, 3), rand(seed + 1, b, 2, 3)
    got = DF.jacobian_matching_loss(gs, gt, squared=squared).item()
    assert got == pytest.approx(np_jacobian_loss(gs.numpy(), gt.numpy(), squared), rel=1e-9, abs=1e-12)


@SETTINGS
@given(seeds, st.floats(0.1, 10.0))
def test_jacobian_loss_is_scale_invariant_zero_at_agreement_and_bounded(seed, scale):
    g = rand(seed, 4, 6)
    assert DF.jacobian_matching_loss(g * scale, g).item() == pytest.approx(0.0, abs=1e-12)
    other = rand(seed + 7, 4, 6)
    val = DF.jacobian_matching_loss(other, g).item()
    assert 0.0 <= val <= 4.0 + 1e-12
    cos = torch.nn.functional.cosine_similarity(other, g, dim=1)
    assert val == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-9)


def test_input_gradient_of_a_linear_model_is_the_weight_row():
    W = rand(0, 3, 5)
    x = rand(1, 4, 5)
    classes = torch.tensor([0, 2, 1, 2])
    g, logits = DF.input_gradient(lambda v: v @ W.T, x, classes)
    assert torch.allclose(g, W[classes])
    assert torch.allclose(logits, x @ W.T)
    g_top, _ = DF.input_gradient(lambda v: v @ W.T, x)  # None: each sample's top logit
    assert torch.allclose(g_top, W[(x @ W.T).argmax(1)])
    assert not x.requires_grad


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0], bias=True)
        with torch.no_grad():
            self.fc.weight.copy_(w)
            self.fc.bias.normal_()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_method_on_linear_models_equals_the_hand_computation():
    torch.manual_seed(0)
    Ws, Wt = rand(2, 4, 6).float(), rand(3, 4, 6).float()
    student, teacher = Linear(Ws), Linear(Wt)
    teacher.requires_grad_(False)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 3, 3, 2])
    m = JacobianMatching(student_model=student, teacher_model=teacher)
    loss = m({}, {}, Batch(x, y))
    by_hand = np_jacobian_loss(Ws[y].numpy().astype(np.float64), Wt[y].numpy().astype(np.float64))
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    # without labels: the teacher's top class
    top = teacher(x).argmax(1)
    loss_top = m({}, {}, Batch(x))
    assert loss_top.item() == pytest.approx(np_jacobian_loss(Ws[top].double().numpy(), Wt[top].double().numpy()),
                                            rel=1e-5)
    m2 = JacobianMatching(student, teacher, component="teacher_top")
    assert m2({}, {}, Batch(x, y)).item() == pytest.approx(loss_top.item(), rel=1e-6)


def test_double_backprop_reaches_the_student_and_never_the_teacher():
    torch.manual_seed(0)
    student, teacher = create("cnn", widths=(4, 8, 8)), create("cnn", widths=(8, 16, 16))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_buffers = {k: v.clone() for k, v in student.named_buffers()}
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % 10
    m = JacobianMatching(student, teacher)
    loss = m({}, {}, Batch(x, y))
    loss.backward()
    # a loss on an input-gradient of the student trains the student's weights (second-order terms)
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    conv_w = student.stem[0].weight if hasattr(student, "stem") and isinstance(student.stem, nn.Sequential) else None
    if conv_w is not None:
        assert conv_w.grad is not None and conv_w.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k])
    for k, v in student.named_buffers():  # the extra forward leaves BatchNorm statistics alone
        assert torch.equal(v, student_buffers[k]), k
    assert teacher.training and student.training  # modes restored
    assert x.grad is None


def test_unbound_method_fails_clearly_and_bind_works():
    m = create_method("jacobian")
    with pytest.raises(RuntimeError, match="bind"):
        m({}, {}, Batch(torch.randn(2, 1, 8, 8)))
    s, t = create("cnn", widths=(4, 8, 8)), create("cnn", widths=(8, 16, 16))
    assert m.bind(s, t) is m and m.student_model is s and m.teacher_model is t
    assert list(m.parameters()) == [] and m.state_dict() == {}  # references, not submodules
    with pytest.raises(ValueError, match="component"):
        JacobianMatching(component="all")


# ---------------------------------------------------------------------------- knowledge projection


@SETTINGS
@given(seeds, st.integers(1, 4))
def test_knowledge_projection_loss_matches_numpy(seed, b):
    s, p = rand(seed, b, 3, 2, 2), rand(seed + 1, b, 3, 2, 2)
    ref = sum(float(((s[i].numpy() - p[i].numpy()) ** 2).sum()) for i in range(b)) / b
    assert DF.knowledge_projection_loss(s, p).item() == pytest.approx(ref, rel=1e-9)


def test_knowledge_projection_layer_is_a_1x1_projection_with_relu_and_stride():
    torch.manual_seed(0)
    sv = {"stage2": torch.randn(3, 4, 2, 2, requires_grad=True)}
    tv = {"stage2": torch.randn(3, 16, 4, 4)}
    m = KnowledgeProjection()
    m.prepare(sv, tv, Batch(torch.randn(3, 1, 8, 8)))
    conv = m.projection[0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert conv.in_channels == 16 and conv.out_channels == 4
    # independent: P(t) = relu(W t[:, :, ::2, ::2] + b) as an einsum
    w, bias = conv.weight[:, :, 0, 0], conv.bias
    proj = torch.relu(torch.einsum("oc,bchw->bohw", w, tv["stage2"][:, :, ::2, ::2]) + bias.view(1, -1, 1, 1))
    ref = ((sv["stage2"] - proj) ** 2).flatten(1).sum(1).mean()
    loss = m(sv, tv, Batch(torch.randn(3, 1, 8, 8)))
    assert torch.allclose(loss, ref, rtol=1e-5)
    loss.backward()
    assert sv["stage2"].grad is not None and conv.weight.grad is not None
    with pytest.raises(ShapeMismatchError):
        KnowledgeProjection().prepare({"stage2": torch.randn(3, 4, 3, 3)}, tv, Batch(torch.randn(3, 1)))
    lin = KnowledgeProjection("pool", "pool", relu=False)
    lin.prepare({"pool": torch.randn(3, 5)}, {"pool": torch.randn(3, 9)}, Batch(torch.randn(3, 1)))
    assert isinstance(lin.projection, nn.Linear) and lin.projection.weight.shape == (5, 9)


def test_registry_entries():
    j, k = method_info("jacobian"), method_info("knowledge_projection")
    assert j.family == k.family == "features"
    assert j.paper.arxiv == "1803.00443" and k.paper.arxiv == "1710.09505"
    assert j.defaults["weight"] == k.defaults["weight"] == 1.0
    assert j.defaults["warmup_epochs"] == k.defaults["warmup_epochs"] == 0
    assert k.defaults["student_tap"] == k.defaults["teacher_tap"] == "stage2"
    assert j.defaults["component"] == "target" and j.defaults["squared"] is True


# ---------------------------------------------------------------------------- end to end

PAIRS = {
    "cnn": (lambda: create("cnn", widths=(4, 8, 8)), lambda: create("cnn", widths=(8, 16, 16))),
    "digits": (lambda: create("mlp_digits_student"), lambda: create("cnn_digits_teacher")),
}


def build(name, student, teacher):
    if name == "jacobian":
        return JacobianMatching(student_model=student, teacher_model=teacher)
    if isinstance(student, type(create("mlp_digits_student"))):
        return KnowledgeProjection("pool", "pool")  # an MLP has no stage2 map: project the pooled vector
    return create_method(name)


@pytest.mark.parametrize("name", ["jacobian", "knowledge_projection"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_end_to_end_through_the_distiller_and_fit(name, pair):
    torch.manual_seed(0)
    make_s, make_t = PAIRS[pair]
    student, teacher = make_s(), make_t()
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, name: build(name, student, teacher)})
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    d.prepare((x[:8], y[:8]))
    params = list(d.trainable_parameters())
    assert all(any(p is q for q in params) for p in d.methods[name].parameters())
    out = d((x[:8], y[:8]))
    assert torch.isfinite(out.parts[name]) and out.parts[name].item() >= 0
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for p in d.methods[name].parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    student.zero_grad()
    for p in d.methods[name].parameters():
        p.grad = None
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    res = distill.fit(d, DataLoader(TensorDataset(x, y), batch_size=8), epochs=1, progress=False,
                      eval_teacher=False)
    assert len(res.history) == 1
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
