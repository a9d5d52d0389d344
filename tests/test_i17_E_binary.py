"""Issue 17 (E): binary-weight layers, the binary-weight KT loss (Xu et al. 2018) and BENN (Zhu et al. 2019),
checked against numbers worked out by hand, numpy and plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill import functional as DF
from distill.batch import Batch
from distill.data.loader import InMemoryLoader
from distill.methods import create_method
from distill.models.binary import BinaryConv2d, BinaryLinear, binarize, binary_layers, model_size_bits, sign_ste
from distill.strategies.binary_benn import BinaryEnsemble, benn

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- binary layers


def test_binary_conv_uses_alpha_times_sign_per_filter_and_passes_gradients_straight_through():
    g = torch.Generator().manual_seed(0)
    conv = BinaryConv2d(2, 3, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(3, 2, 3, 3, generator=g))
    x = torch.randn(2, 2, 5, 5, generator=g)
    w = conv.weight.detach().numpy()
    alpha = np.abs(w).reshape(3, -1).mean(1)  # XNOR-Net: mean |W| of each output filter
    wb = alpha[:, None, None, None] * np.where(w >= 0, 1.0, -1.0)
    expected = F.conv2d(x, torch.from_numpy(wb).float(), conv.bias.detach(), padding=1)
    out = conv(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # straight-through: dL/dW = dL/dW_b, the gradient of the same conv taken at W_b
    wb_t = torch.from_numpy(wb).float().requires_grad_(True)
    F.conv2d(x, wb_t, conv.bias.detach(), padding=1).pow(2).sum().backward()
    out.pow(2).sum().backward()
    torch.testing.assert_close(conv.weight.grad, wb_t.grad, rtol=1e-5, atol=1e-5)


def test_sign_ste_with_binary_inputs_clips_the_gradient_at_one():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]
    lin = BinaryLinear(2, 1, bias=False, activations=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.5]]))  # alpha = 1, sign = (+1, -1)
    assert lin(torch.tensor([[0.3, 0.2], [-4.0, 0.1]])).flatten().tolist() == [0.0, -2.0]


def test_binarize_swaps_all_but_the_first_and_last_layers_and_keeps_the_state_dict():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 8), nn.Linear(8, 3))
    b = binarize(model)
    assert binary_layers(b) == ["2", "5"] and binary_layers(model) == []  # the original is untouched
    assert type(b[0]) is nn.Conv2d and type(b[6]) is nn.Linear and type(b[1]) is nn.ReLU
    assert {k: v.shape for k, v in b.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)
    bnn = binarize(model, activations=True, keep_first=False)
    assert binary_layers(bnn) == ["0", "2", "5"] and type(bnn[1]) is nn.Hardtanh and bnn[2].activations
    # bits: binary layers 1 bit/weight + 32 bits per filter's alpha; everything else 32 bits
    bits = (4 * 4 * 9 + 32 * 4) + (8 * 64 + 32 * 8) + 32 * (4 * 9 + 4 + 4 + 8 + 8 * 3 + 3)
    assert model_size_bits(b) == bits
    assert model_size_bits(model) == 32 * sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="no Conv2d/Linear layer left"):
        binarize(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


# ----------------------------------------------------------------------------- binary-weight KT


def test_binary_kt_loss_and_method_on_hand_numbers():
    s = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])  # (2, 1, 1, 2)
    t = torch.tensor([[[[0.0, 2.0]]], [[[3.0, 1.0]]]])
    # 1/2 mean of (1, 0, 9, 4) = 14 / 8
    assert float(DF.binary_kt_loss(s, t)) == pytest.approx(14 / 8)
    m = create_method("binary_kt", pairs=[("a", "a"), ("b", "c")], weight=0.3)
    sv, tv = {"logits": torch.zeros(2, 3), "a": s, "b": 2 * s}, {"logits": torch.zeros(2, 3), "a": t, "c": t}
    b = Batch(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))
    m.prepare(sv, tv, b)
    # pair 2: 2s - t = (2, 2, -3, -3) -> 1/2 mean(4, 4, 9, 9) = 26 / 8
    assert float(m(sv, tv, b)) == pytest.approx(14 / 8 + 26 / 8) and m.weight == 0.3


def test_binary_kt_adapts_a_narrower_student_and_detaches_the_teacher():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    t = torch.randn(3, 5, 4, 4, generator=g, requires_grad=True)
    m = create_method("binary_kt", pairs=[("stage3", "stage3")])
    b = Batch(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        m.prepare({"stage3": s}, {"stage3": t}, b)
    conv = m.adapters[0]
    loss = m({"stage3": s}, {"stage3": t}, b)
    ref = 0.5 * ((conv(s) - t) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    loss.backward()
    assert t.grad is None and s.grad is not None


# ----------------------------------------------------------------------------- BENN's math


def test_samme_alpha_and_boosting_weights_on_hand_numbers():
    assert DF.benn_samme_alpha(0.25, 10) == pytest.approx(math.log(3) + math.log(9))
    assert DF.benn_samme_alpha(0.9, 10) == pytest.approx(0.0, abs=1e-12)  # chance level: 1 - 1/K
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    wrong = torch.tensor([True, False, True, False])
    new = DF.benn_boost_weights(w, wrong, math.log(2.0))  # mistakes doubled: (0.2, 0.2, 0.6, 0.4) / 1.4
    torch.testing.assert_close(new, torch.tensor([0.2, 0.2, 0.6, 0.4], dtype=torch.float64) / 1.4)


def test_benn_combine_hard_and_soft_with_votes():
    z = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]]])  # (M=3, B=1, K=3)
    assert DF.benn_combine(z, "hard")[0].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    # member 0 has the larger vote: 3 / 4 against 1/8 + 1/8
    assert DF.benn_combine(z, "hard", [3.0, 0.5, 0.5])[0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    p = [np.exp(r) / np.exp(r).sum() for r in (np.array([2.0, 0, 0]), np.array([0, 1.0, 0]))]
    soft = (0.5 * p[0] + 0.25 * p[1] + 0.25 * p[1])
    assert DF.benn_combine(z, "soft", [2.0, 1.0, 1.0])[0].tolist() == pytest.approx(soft.tolist())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(2, 6), st.floats(0.1, 10.0), st.integers(0, 10_000))
def test_benn_combine_properties(m, b, k, scale, seed):
    """Soft scores are distributions; hard scores count votes; both ignore a common scale of the votes."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, b, k, generator=g, dtype=torch.float64)
    a = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    for rule in ("soft", "hard"):
        s = DF.benn_combine(z, rule, a.tolist())
        torch.testing.assert_close(s.sum(1), torch.ones(b, dtype=torch.float64))
        torch.testing.assert_close(s, DF.benn_combine(z, rule, (scale * a).tolist()))


# ----------------------------------------------------------------------------- BENN's strategy


def _digits(n: int = 96):
    from distill.data import get_dataset

    tr, va = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    return (InMemoryLoader(tr.inputs[:n], tr.targets[:n], 32, seed=0),
            InMemoryLoader(va.inputs[:64], va.targets[:64], 64, shuffle=False), tr.inputs[:n], tr.targets[:n])


def test_benn_boosting_votes_follow_samme_on_the_members_training_mistakes():
    train, val, x, y = _digits(64)
    r = benn({"name": "cnn_digits_student"}, train, val, epochs=1, members=2, mode="boosting", rule="soft",
             progress=False, lr=0.05)
    assert len(r.models) == 2 and all(binary_layers(m) for m in r.models)
    w = np.full(len(y), 1 / len(y))
    for model, alpha in zip(r.models, r.alphas):  # AdaBoost/SAMME replayed with numpy
        model.eval()
        with torch.no_grad():
            wrong = (model(x).argmax(1) != y).numpy()
        err = float((w * wrong).sum())
        a = math.log((1 - err) / err) + math.log(10 - 1)
        if a <= 0:
            assert alpha == 0.0
            w = np.full(len(y), 1 / len(y))
            continue
        assert alpha == pytest.approx(a, rel=1e-9)
        w = w * np.exp(a * wrong)
        w = w / w.sum()
    # the reported accuracy is the alpha-weighted soft vote of the members
    votes = r.alphas if sum(r.alphas) > 0 else None
    ens = BinaryEnsemble(r.models, "soft", votes).eval()
    xv, yv = val.inputs, val.targets
    with torch.no_grad():
        p = sum(a * m(xv).softmax(1) for a, m in zip(r.alphas, r.models))
    assert r.last_acc == pytest.approx(100.0 * float((p.argmax(1) == yv).double().mean()))
    with torch.no_grad():
        assert (ens(xv).argmax(1) == p.argmax(1)).all()


def test_benn_bagging_members_see_bootstrap_samples_and_errors_are_clear():
    train, val, _, _ = _digits(64)
    r = benn({"name": "cnn_digits_student"}, train, val, epochs=1, members=2, rule="hard", progress=False, lr=0.05)
    assert r.alphas == [1.0, 1.0] and len(r.history) == 2 and 0 <= r.last_acc <= 100
    with pytest.raises(ValueError, match="mode must be one of"):
        benn({"name": "cnn_digits_student"}, train, val, epochs=1, mode="stacking")
    with pytest.raises(ValueError, match="kd_weight > 0 needs a teacher"):
        benn({"name": "cnn_digits_student"}, train, val, epochs=1, kd_weight=1.0)
    with pytest.raises(ValueError, match="InMemoryLoader"):
        benn({"name": "cnn_digits_student"}, [Batch(torch.zeros(2, 1, 8, 8), torch.zeros(2).long())], None, epochs=1)
