"""TaT (target-aware transformer, Lin et al. CVPR 2022).

The loss against an independent numpy computation with an explicit softmax, the identity case,
the methods on synthetic views (gradients reach the student and the embeddings, never the
teacher) and end to end through the Distiller and ``fit``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill
from _views import CNN_PAIRS, prepare_and_snapshot, tiny_loader
from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch
from distill.methods import TaT, create_method, method_info

SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 10_000)


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def np_tat(q: np.ndarray, k: np.ndarray, v: np.ndarray, t: np.ndarray, temp: float = 1.0) -> tuple[float, float]:
    """Explicit loops: for each query position, softmax over key positions, weighted sum of values."""
    b, c, h, w = q.shape
    hk, wk = k.shape[2:]
    total = 0.0
    for bb in range(b):
        for i in range(h * w):
            qi = q[bb, :, i // w, i % w]
            logits = [float(np.dot(qi, k[bb, :, j // wk, j % wk])) / temp for j in range(hk * wk)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            z = sum(e)
            out = sum((e[j] / z) * v[bb, :, j // wk, j % wk] for j in range(hk * wk))
            total += float(((t[bb, :, i // w, i % w] - out) ** 2).sum())
    return total / (b * c * h * w), total / b


def test_registered_with_paper_family_and_defaults():
    info = method_info("tat")
    assert info.family == "features" and info.paper.arxiv == "2205.10793" and info.paper.year == 2022
    assert info.paper.venue == "CVPR" and "Lin" in info.paper.authors and info.summary
    d = info.defaults
    assert (d["student_tap"], d["teacher_tap"], d["query"], d["embed"]) == ("stage3", "stage3", "teacher", "conv1x1_bn")
    assert (d["temperature"], d["reduction"]) == (1.0, "mean")


def test_tat_loss_matches_explicit_softmax_loops():
    q, t = rand(1, 2, 3, 2, 3), rand(2, 2, 3, 2, 3)
    k, v = rand(3, 2, 3, 3, 2), rand(4, 2, 3, 3, 2)  # key/value grid may differ from the query's
    for temp in (1.0, 0.5, 3.0):
        mean, summed = np_tat(q.numpy(), k.numpy(), v.numpy(), t.numpy(), temp)
        assert DF.tat_loss(q, k, v, t, temp).item() == pytest.approx(mean, rel=1e-10)
        assert DF.tat_loss(q, k, v, t, temp, "sum").item() == pytest.approx(summed, rel=1e-10)


def test_tat_attention_rows_are_softmaxes():
    q, k = rand(5, 2, 4, 2, 2), rand(6, 2, 4, 1, 3)
    att = DF.tat_attention(q, k)
    assert att.shape == (2, 4, 3)
    qn, kn = q.numpy().reshape(2, 4, -1), k.numpy().reshape(2, 4, -1)
    for b in range(2):
        for i in range(4):
            e = [math.exp(float(np.dot(qn[b, :, i], kn[b, :, j]))) for j in range(3)]
            for j in range(3):
                assert att[b, i, j].item() == pytest.approx(e[j] / sum(e), rel=1e-10)


@SETTINGS
@given(seeds, st.integers(1, 3), st.integers(1, 4), st.floats(0.3, 4.0))
def test_tat_nonnegative_and_zero_for_uniform_values_matching_teacher(seed, b, c, temp):
    q, k = rand(seed, b, c, 2, 2), rand(seed + 1, b, c, 2, 3)
    t = rand(seed + 2, b, c, 2, 2)
    v = rand(seed + 3, b, c, 2, 3)
    assert DF.tat_loss(q, k, v, t, temp).item() >= 0.0
    # every value position equal to the same vector u: any convex combination is u
    u = rand(seed + 4, b, c, 1, 1)
    assert DF.tat_loss(q, k, u.expand(b, c, 2, 3), u.expand(b, c, 2, 2), temp).item() == pytest.approx(0.0, abs=1e-20)


def test_identity_case_peaked_softmax_gives_small_loss():
    # orthogonal, strongly scaled position features: each position attends (almost) only to itself
    b, c, h, w = 2, 6, 2, 2
    f = torch.zeros(b, c, h, w, dtype=torch.float64)
    for i in range(h * w):
        f[:, i, i // w, i % w] = 10.0
    f = f + 0.01 * rand(7, b, c, h, w)
    assert DF.tat_loss(f, f, f, f).item() < 1e-10
    m = TaT(embed="identity")
    view = {"stage3": f}
    m.prepare(view, view, Batch(torch.zeros(b, 1, 8, 8), torch.zeros(b, dtype=torch.long)))
    assert all(isinstance(p, torch.nn.Identity) for p in (m.theta, m.gamma, m.phi))
    assert m(view, view, None).item() < 1e-10
    # unpeaked (random, same map) it is not zero: the matching mixes positions
    g = rand(8, b, c, h, w)
    assert DF.tat_loss(g, g, g, g, temperature=100.0).item() > 1e-3


def test_rejects_bad_shapes_and_arguments():
    with pytest.raises(ValueError, match="query's shape"):
        DF.tat_loss(rand(0, 2, 3, 2, 2), rand(1, 2, 3, 2, 2), rand(2, 2, 3, 2, 2), rand(3, 2, 4, 2, 2))
    with pytest.raises(ValueError, match="channel"):
        DF.tat_attention(rand(0, 2, 3, 2, 2), rand(1, 2, 4, 2, 2))
    with pytest.raises(ValueError):
        DF.tat_loss(*(rand(i, 1, 2, 2, 2) for i in range(4)), reduction="none")
    for kw in ({"query": "both"}, {"embed": "mlp"}, {"temperature": 0.0}, {"reduction": "max"}):
        with pytest.raises(ValueError):
            TaT(**kw)


# ---------------------------------------------------------------------------- method on synthetic views

B = 6


def make_views(seed: int = 0):
    """Leaves for the taps; teacher leaves require grad too, to catch leaks."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    student = {"logits": leaf(B, 10), "stage2": leaf(B, 6, 4, 4), "stage3": leaf(B, 8, 2, 2)}
    teacher = {"logits": leaf(B, 10), "stage2": leaf(B, 12, 4, 4), "stage3": leaf(B, 16, 2, 2)}
    return student, teacher, Batch(torch.zeros(B, 1, 8, 8), torch.arange(B) % 10)


@pytest.mark.parametrize("query", ["teacher", "student"])
def test_gradients_reach_student_and_embeddings_never_teacher(query):
    student, teacher, batch = make_views()
    m = create_method("tat", query=query)
    assert m.requires_prepare
    with pytest.raises(RuntimeError, match="prepare"):
        m(student, teacher, batch)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    params = list(m.named_parameters())
    m.prepare(student, teacher, batch)  # idempotent
    assert [id(p) for _, p in m.named_parameters()] == [id(p) for _, p in params]
    assert {n.split(".")[0] for n, _ in params} == {"theta", "gamma", "phi"}
    loss = m(student, teacher, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    assert student["stage3"].grad is not None and student["stage3"].grad.abs().sum() > 0
    assert student["logits"].grad is None and student["stage2"].grad is None
    for key, t in teacher.items():
        assert t.grad is None, key
    for name, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_method_matches_functional_in_both_arrangements():
    student, teacher, batch = make_views(1)
    s, t = student["stage3"], teacher["stage3"]
    for query in ("teacher", "student"):
        m = TaT(query=query, temperature=2.0, reduction="sum")
        m.prepare(student, teacher, batch)
        conv = m.gamma[0]
        assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 16
        qkv = (m.theta(t), m.gamma(s), m.phi(s)) if query == "teacher" else (m.gamma(s), m.theta(t), m.phi(s))
        want = DF.tat_loss(*qkv, t, 2.0, "sum")
        assert torch.allclose(m(student, teacher, batch), want)


def test_teacher_query_allows_different_spatial_sizes_student_query_does_not():
    student, teacher, batch = make_views(2)
    m = TaT(student_tap="stage3", teacher_tap="stage2")
    m.prepare(student, teacher, batch)
    assert torch.isfinite(m(student, teacher, batch))
    with pytest.raises(ShapeMismatchError, match="spatial"):
        TaT(student_tap="stage3", teacher_tap="stage2", query="student").prepare(student, teacher, batch)
    with pytest.raises(ShapeMismatchError, match="identity"):
        TaT(embed="identity").prepare(student, teacher, batch)


# ---------------------------------------------------------------------------- end to end

PAIRS = CNN_PAIRS


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_end_to_end_fit_through_the_distiller(pair, tmp_path):
    torch.manual_seed(0)
    student, teacher = PAIRS[pair]()
    teacher_params = [p.detach().clone() for p in teacher.parameters()]
    method = create_method("tat")
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "tat": method})
    x, y, loader = tiny_loader()
    method_params, before = prepare_and_snapshot(d, method, loader)
    res = distill.fit(d, loader, loader, epochs=1, lr=0.01, schedule="constant", run_dir=tmp_path, progress=False)
    assert len(res.history) == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, method_params))
    assert all(torch.equal(a, p) for a, p in zip(teacher_params, teacher.parameters()))
    d.eval()
    out = d((x[:4], y[:4]))
    assert torch.isfinite(out.parts["tat"]) and out.parts["tat"].item() >= 0
