"""Issue 17 (B): generalized distillation, supervision transfer, cross-quality distillation.

Every number is worked out here independently of the library: the losses by a plain loop over
samples and classes, the degradations and renderings by hand, the strategies' views by
recording what each model is given.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill import functional as DF
from distill.batch import Batch
from distill.data.loader import InMemoryLoader
from distill.methods import create_method
from distill.strategies.transfer_pi import (
    ModalityView,
    fit_cross_quality_distillation,
    fit_generalized_distillation,
    fit_supervision_transfer,
)

torch.set_num_threads(1)


def _gd_by_hand(s: np.ndarray, t: np.ndarray, y: np.ndarray, lam: float, T: float) -> float:
    """(1/B) sum_b [(1-lam) * -log q_b[y_b] + lam * -sum_k p_bk log q_bk], q = softmax(s), p = softmax(t / T)."""
    total = 0.0
    for b in range(s.shape[0]):
        q = [math.exp(v) for v in s[b]]
        zq = sum(q)
        p = [math.exp(v / T) for v in t[b]]
        zp = sum(p)
        hard = -math.log(q[y[b]] / zq)
        soft = -sum(p[k] / zp * math.log(q[k] / zq) for k in range(s.shape[1]))
        total += (1 - lam) * hard + lam * soft
    return total / s.shape[0]


def test_generalized_distillation_loss_matches_a_loop_with_non_default_lambda_and_T():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 4, generator=g, dtype=torch.float64), 3 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    for lam, T in ((0.3, 2.5), (0.0, 1.0), (1.0, 0.7)):
        want = _gd_by_hand(s.numpy(), t.numpy(), y.numpy(), lam, T)
        got = DF.generalized_distillation_loss(s, t, y, imitation=lam, T=T)
        assert float(got) == pytest.approx(want, rel=1e-12)
    # the method hands both scales through, and reads the teacher's logits on x* from the teacher's view
    m = create_method("generalized_distillation", imitation=0.3, T=2.5)
    got = m({"logits": s}, {"logits": t}, Batch(torch.zeros(5, 2), y))
    assert float(got) == pytest.approx(_gd_by_hand(s.numpy(), t.numpy(), y.numpy(), 0.3, 2.5), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(lam=st.floats(0.0, 1.0), T=st.floats(0.2, 8.0), seed=st.integers(0, 10_000))
def test_generalized_distillation_gradient_is_softmax_minus_its_target(lam, T, seed):
    """Eq. 4's gradient w.r.t. the student's logits is (q - (1 - lam) onehot(y) - lam p) / B: the student's
    softmax is not tempered (a T on the student would scale and shift it)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = 2 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    (grad,) = torch.autograd.grad(DF.generalized_distillation_loss(s, t, y, imitation=lam, T=T), s)
    onehot = torch.nn.functional.one_hot(y, 5).double()
    want = (s.detach().softmax(1) - (1 - lam) * onehot - lam * (t / T).softmax(1)) / 6
    torch.testing.assert_close(grad, want)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"imitation .* must be in \[0, 1\]; got 1.5"):
        create_method("generalized_distillation", imitation=1.5)
    with pytest.raises(ValueError, match="unknown view kind 'blur'"):
        ModalityView(nn.Linear(2, 2), "blur:2")
    with pytest.raises(ValueError, match=r"'columns' takes 2 number\(s\), got 1"):
        DF.parse_view("columns:3")
    with pytest.raises(ValueError, match="does not fit an input of shape"):
        DF.apply_view(torch.zeros(4, 3), "columns:0:5")
    with pytest.raises(ValueError, match=r"integer factor >= 1 dividing the image size \(6, 6\); got 4"):
        DF.degrade(torch.zeros(1, 1, 6, 6), "downsample", 4)
    loader = InMemoryLoader(torch.zeros(8, 3), torch.zeros(8, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="needs teacher="):
        fit_generalized_distillation(nn.Linear(3, 2), loader, epochs=1, progress=False)
    with pytest.raises(ValueError, match="degradation must be"):
        fit_cross_quality_distillation(nn.Linear(3, 2), loader, teacher=nn.Linear(3, 2), degradation="columns:0:1",
                                       epochs=1, progress=False)


def test_degradations_by_hand():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    low = DF.degrade(x, "downsample", 2)
    # 2x2 block means: [[2.5, 4.5], [10.5, 12.5]]; bilinear (half-pixel) upsampling keeps them at the corners and
    # puts the average of the two neighbouring blocks between them
    assert low.shape == x.shape
    assert [float(low[0, 0, 0, 0]), float(low[0, 0, 0, 3]), float(low[0, 0, 3, 0]), float(low[0, 0, 3, 3])] == \
        [2.5, 4.5, 10.5, 12.5]
    assert float(low[0, 0, 0, 1]) == pytest.approx(2.5 + 0.25 * (4.5 - 2.5))  # 1/4 of the way to the next block
    # edges: a vertical step 0 | 1 gives Sobel |G_x| = 1 + 2 + 1 = 4 on both sides of it in the interior rows, and
    # 4 again at the last column (the zero padding is a 1 | 0 step); the largest magnitude is at the corners of the
    # ones, |(-3, 3)| = 3 sqrt(2) (the padded row above), which the rescaling maps to 1
    step = torch.zeros(1, 1, 5, 6)
    step[..., 3:] = 1.0
    e = DF.sobel_edges(step)
    torch.testing.assert_close(e[0, 0, 2], torch.tensor([0.0, 0.0, 4.0, 4.0, 0.0, 4.0]) / (3 * math.sqrt(2)))
    assert float(e[0, 0, 0, 5]) == pytest.approx(1.0)
    noisy = DF.degrade(x, "noise", 0.5, generator=torch.Generator().manual_seed(1))
    want = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy, want)


def test_distance_field_is_exp_of_the_distance_to_the_nearest_stroke():
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 2, 3] = 1.0
    img[0, 0, 6, 6] = 0.9
    out = DF.distance_field(img, threshold=0.5, scale=2.0)
    strokes = [(2, 3), (6, 6)]
    for i in range(8):
        for j in range(8):
            dist = min(math.hypot(i - a, j - b) for a, b in strokes)
            assert float(out[0, 0, i, j]) == pytest.approx(math.exp(-dist / 2.0), abs=1e-6)
    assert float(DF.distance_field(torch.zeros(1, 1, 4, 4)).abs().sum()) == 0.0  # no stroke: zeros


class Recorder(nn.Module):
    """A linear classifier on flattened inputs that keeps the last input it was given."""

    def __init__(self, d: int, k: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(d, k)
        self.seen: torch.Tensor | None = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.fc(x.flatten(1))


def test_generalized_distillation_student_learns_the_tempered_teacher_on_its_own_view():
    """lam = 1: the student (regular columns 0:2) converges to the teacher's softmax(t / T) (T = 2.5, privileged
    column 2); the teacher only ever sees column 2, the student columns 0:2."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 2, generator=g)
    xs = (x @ torch.tensor([1.0, -2.0])).unsqueeze(1)  # the privileged feature, a function of x
    packed = torch.cat([x, xs], 1)
    teacher = Recorder(1)
    with torch.no_grad():
        teacher.fc.weight.copy_(torch.tensor([[1.5], [0.0], [-1.5]]))
        teacher.fc.bias.zero_()
    y = torch.randint(0, 3, (48,), generator=g)  # labels unused at lam = 1
    student = Recorder(2)
    loader = InMemoryLoader(packed, y, 48, shuffle=False)
    fit_generalized_distillation(student, loader, teacher=teacher, regular="columns:0:2", privileged="columns:2:3",
                                 imitation=1.0, T=2.5, epochs=400, optimizer="adam", lr=0.05, weight_decay=0.0,
                                 schedule="constant", progress=False, eval_teacher=False)
    assert teacher.seen.shape == (48, 1) and torch.equal(teacher.seen, xs)
    assert student.seen.shape == (48, 2) and torch.equal(student.seen, x)
    with torch.no_grad():
        q = student(x).softmax(1)
        p = (teacher.fc(xs) / 2.5).softmax(1)
        p_untempered = teacher.fc(xs).softmax(1)
    assert (q - p).abs().max() < 0.02
    assert (q - p_untempered).abs().max() > 0.1  # the temperature reached the soft labels


def test_cross_quality_student_sees_the_degraded_copy_and_teacher_the_clean_image():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    teacher, student = Recorder(16), Recorder(16)
    loader = InMemoryLoader(x, y, 16, shuffle=False)
    r = fit_cross_quality_distillation(student, loader, loader, teacher=teacher, degradation="downsample:2", T=3.0,
                                       kd_weight=0.4, ce_weight=0.7, epochs=1, lr=1e-9, progress=False)
    assert torch.equal(teacher.seen, x)
    torch.testing.assert_close(student.seen, DF.degrade(x, "downsample", 2))
    # the recorded training loss (lr = 1e-9: the models do not move) is 0.7 CE + 0.4 T^2 KL on the degraded view
    with torch.no_grad():
        s, t = student.fc(DF.degrade(x, "downsample", 2).flatten(1)).double(), teacher.fc(x.flatten(1)).double()
    ls, lt = (s / 3.0).log_softmax(1), (t / 3.0).log_softmax(1)
    kl = (lt.exp() * (lt - ls)).sum(1).mean() * 9.0
    ce = -s.log_softmax(1)[torch.arange(16), y].mean()
    assert r.history[-1]["train_loss"] == pytest.approx(float(0.7 * ce + 0.4 * kl), rel=1e-5)


def test_supervision_transfer_regresses_the_teachers_features_then_fine_tunes():
    """Stage 1 (no labels) brings the student's pooled feature on modality B (channel 1) to the teacher's on A
    (channel 0); stage 2 trains its classifier on the labelled pairs."""
    import distill

    g = torch.Generator().manual_seed(2)
    a = torch.rand(64, 1, 8, 8, generator=g)
    packed = torch.cat([a, 1.0 - a], 1)  # modality B: the negative of A, aligned pixel by pixel
    y = torch.randint(0, 10, (64,), generator=g)
    torch.manual_seed(0)
    teacher = distill.models.create("cnn_digits_student", num_classes=10)
    student = distill.models.create("cnn_digits_student", num_classes=10)
    labelled = InMemoryLoader(packed[:16], y[:16], 16)
    r = fit_supervision_transfer(student, labelled, None, teacher=teacher, unlabeled=packed, student_view="channels:1:2",
                                 teacher_view="channels:0:1", epochs=1, transfer_epochs=30, batch_size=32,
                                 optimizer="adam", lr=0.01, weight_decay=0.0, schedule="constant", progress=False)
    losses = [h["train_transfer"] for h in r.transfer_result.history]
    assert losses[-1] < 0.25 * losses[0]
    assert r.history and "train_ce" in r.history[-1]
    assert all(not p.requires_grad for p in teacher.parameters())  # the teacher stayed frozen
