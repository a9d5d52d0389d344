"""Fine-grained manifold distillation (manifold_kd): formulas against plain loops, properties, the method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from distill import Distiller
from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch
from distill.methods import ManifoldKD, create_method, method_info
from distill.models import create


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (math.sqrt(float(np.dot(a, a))) * math.sqrt(float(np.dot(b, b)))))


def _loop_terms(s: np.ndarray, t: np.ndarray, idx: list[int]) -> tuple[float, float, float]:
    """Intra, inter and random relation losses written out entry by entry."""
    b, n, _ = s.shape
    intra = sum((_cos(t[k, i], t[k, j]) - _cos(s[k, i], s[k, j])) ** 2
                for k in range(b) for i in range(n) for j in range(n)) / (b * n * n)
    inter = sum((_cos(t[i, l], t[j, l]) - _cos(s[i, l], s[j, l])) ** 2
                for l in range(n) for i in range(b) for j in range(b)) / (n * b * b)
    picked = [(p // n, p % n) for p in idx]
    rand = sum((_cos(t[a], t[c]) - _cos(s[a], s[c])) ** 2 for a in picked for c in picked) / len(idx) ** 2
    return intra, inter, rand


def _tokens(seed: int, b: int = 3, n: int = 4, ds: int = 5, dt: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, ds, generator=g, dtype=torch.float64),
            torch.randn(b, n, dt, generator=g, dtype=torch.float64))


def test_registered_with_paper_and_authors_defaults():
    info = method_info("manifold_kd")
    assert info.family == "vit" and info.paper.arxiv == "2107.01378" and info.paper.year == 2022
    d = info.defaults
    assert (d["intra_weight"], d["inter_weight"], d["random_weight"], d["num_samples"]) == (4.0, 0.1, 0.2, 192)
    assert isinstance(create_method("manifold_kd"), ManifoldKD)


def test_relation_terms_match_loops():
    s, t = _tokens(0)
    idx = [11, 0, 5, 7, 2]
    intra, inter, rand = _loop_terms(s.numpy(), t.numpy(), idx)
    assert DF.manifold_intra_loss(s, t).item() == pytest.approx(intra, rel=1e-10)
    assert DF.manifold_inter_loss(s, t).item() == pytest.approx(inter, rel=1e-10)
    assert DF.manifold_random_loss(s, t, torch.tensor(idx)).item() == pytest.approx(rand, rel=1e-10)
    got = DF.manifold_layer_loss(s, t, torch.tensor(idx), intra_weight=1.5, inter_weight=0.7, random_weight=2.5)
    assert got.item() == pytest.approx(1.5 * intra + 0.7 * inter + 2.5 * rand, rel=1e-10)
    # the three terms differ, so swapped weights would show
    assert len({round(intra, 6), round(inter, 6), round(rand, 6)}) == 3


def test_random_indices_distinct_seeded_and_capped():
    a = DF.manifold_random_indices(4, 6, 10, torch.Generator().manual_seed(5))
    assert a.shape == (10,) and len(set(a.tolist())) == 10 and 0 <= a.min() and a.max() < 24
    assert torch.equal(a, DF.manifold_random_indices(4, 6, 10, torch.Generator().manual_seed(5)))
    assert sorted(DF.manifold_random_indices(2, 3, 100).tolist()) == list(range(6))
    with pytest.raises(ValueError, match="num_samples"):
        DF.manifold_random_indices(2, 3, 0)


def test_merge_patches_concatenates_neighbour_blocks():
    x = torch.arange(2 * 16 * 3, dtype=torch.float64).reshape(2, 16, 3)  # a 4x4 grid
    y = DF.manifold_merge_patches(x, 4)
    assert y.shape == (2, 4, 12)
    for b in range(2):
        for gi in range(2):
            for gj in range(2):
                want = torch.cat([x[b, (2 * gi + di) * 4 + 2 * gj + dj] for di in range(2) for dj in range(2)])
                assert torch.equal(y[b, gi * 2 + gj], want)
    with pytest.raises(ValueError, match="cannot merge 49 patch tokens into 36"):
        DF.manifold_merge_patches(torch.zeros(1, 49, 2), 36)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_properties_zero_scale_and_rotation_invariance(seed, scale):
    s, t = _tokens(seed)
    idx = DF.manifold_random_indices(3, 4, 6, torch.Generator().manual_seed(seed))
    loss = DF.manifold_layer_loss(s, t, idx)
    assert loss.item() >= 0
    # zero when the teacher's tokens are positive multiples of the student's (cosines agree)
    assert DF.manifold_layer_loss(s, s * scale, idx).item() == pytest.approx(0.0, abs=1e-12)
    # width-free: rotating the student's channels changes no relation
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    assert DF.manifold_layer_loss(s @ q, t, idx).item() == pytest.approx(loss.item(), rel=1e-9, abs=1e-12)


def test_shape_errors_name_both_tensors():
    with pytest.raises(ValueError, match=r"\(3, 4, 5\).*\(3, 5, 7\)"):
        DF.manifold_intra_loss(torch.zeros(3, 4, 5), torch.zeros(3, 5, 7))
    with pytest.raises(ValueError, match="intra_weight"):
        ManifoldKD(intra_weight=-1.0)
    with pytest.raises(ValueError, match="num_samples"):
        ManifoldKD(num_samples=0)


def _views(seed: int = 1):
    """Student with 2 prefix tokens (DeiT), teacher with 1; two layer pairs; B=3, L=4."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    sv = {"logits": leaf(3, 10), "blocks.0": leaf(3, 6, 5), "blocks.3": leaf(3, 6, 5)}
    tv = {"logits": leaf(3, 10), "blocks.1": leaf(3, 5, 7), "blocks.5": leaf(3, 5, 7)}
    return sv, tv, Batch(torch.zeros(3, 1, 4, 4), torch.arange(3))


def test_method_drops_prefix_tokens_averages_pairs_and_uses_seeded_samples():
    sv, tv, batch = _views()
    m = ManifoldKD(pairs=[("blocks.0", "blocks.1"), ("blocks.3", "blocks.5")], intra_weight=2.0, inter_weight=0.5,
                   random_weight=3.0, num_samples=5, student_prefix=2, teacher_prefix=1, seed=7)
    got = m(sv, tv, batch)
    gen = torch.Generator().manual_seed(7)  # one draw per pair, in pair order
    want = 0.0
    for sp, tp in m.pairs:
        idx = torch.randperm(12, generator=gen)[:5].tolist()
        intra, inter, rand = _loop_terms(sv[sp][:, 2:].detach().numpy(), tv[tp][:, 1:].detach().numpy(), idx)
        want += (2.0 * intra + 0.5 * inter + 3.0 * rand) / 2
    assert got.item() == pytest.approx(want, rel=1e-10)
    got.backward()
    assert sv["blocks.0"].grad is not None and sv["blocks.0"].grad[:, :2].abs().sum() == 0  # prefix untouched
    assert sv["blocks.0"].grad[:, 2:].abs().sum() > 0
    assert tv["blocks.1"].grad is None and tv["blocks.5"].grad is None  # the teacher gets no gradient
    m.eval()  # evaluation draws from a fresh generator seeded with `seed`: the same value twice
    assert m(sv, tv, batch).item() == m(sv, tv, batch).item()


def test_method_errors_token_counts_and_unbound_prefixes():
    sv, tv, batch = _views()
    with pytest.raises(RuntimeError, match="bind_models"):
        ManifoldKD(pairs=[("blocks.0", "blocks.1")])(sv, tv, batch)
    bad = ManifoldKD(pairs=[("blocks.0", "blocks.1")], student_prefix=1, teacher_prefix=1)  # 5 vs 4 patches
    with pytest.raises(ShapeMismatchError, match="5 patch tokens.*4"):
        bad(sv, tv, batch)


def test_method_merges_a_finer_student_grid():
    g = torch.Generator().manual_seed(3)
    sv = {"blocks.0": torch.randn(2, 1 + 16, 4, generator=g, dtype=torch.float64)}
    tv = {"blocks.0": torch.randn(2, 1 + 4, 6, generator=g, dtype=torch.float64)}
    m = ManifoldKD(pairs=[("blocks.0", "blocks.0")], num_samples=3, student_prefix=1, teacher_prefix=1)
    merged = DF.manifold_merge_patches(sv["blocks.0"][:, 1:], 4)
    idx = torch.randperm(8, generator=torch.Generator().manual_seed(0))[:3].tolist()
    want = sum(w * v for w, v in zip((4.0, 0.1, 0.2), _loop_terms(merged.numpy(), tv["blocks.0"][:, 1:].numpy(), idx)))
    assert m(sv, tv, Batch(torch.zeros(2, 1, 4, 4), torch.arange(2))).item() == pytest.approx(want, rel=1e-10)


def test_distiller_vit_small_to_vit_tiny_trains_and_leaves_teacher_alone():
    torch.manual_seed(0)
    teacher, student = create("vit_small", num_classes=10), create("vit_tiny", num_classes=10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(student, teacher, losses={"manifold_kd": {"num_samples": 64}})
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    d.prepare((x, y))
    m = d.methods["manifold_kd"]
    assert (m.student_prefix, m.teacher_prefix) == (1, 1) and not list(m.parameters())  # width-free: no projector
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        out = d((x, y))
        losses.append(out.total.item())
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_cnn_teacher_map_is_read_as_row_major_tokens_and_merged():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 1 + 4, 3, generator=g, dtype=torch.float64)  # a ViT with a 2x2 patch grid
    fmap = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)  # a CNN map, 4x4: merged 2x2 -> 2x2
    tokens = torch.stack([torch.stack([fmap[b, :, i, j] for i in range(4) for j in range(4)]) for b in range(2)])
    m = ManifoldKD(pairs=[("blocks.0", "stage1")], num_samples=3, student_prefix=1, teacher_prefix=1)
    idx = torch.randperm(8, generator=torch.Generator().manual_seed(0))[:3].tolist()
    terms = _loop_terms(s[:, 1:].numpy(), DF.manifold_merge_patches(tokens, 4).numpy(), idx)
    want = sum(w * v for w, v in zip((4.0, 0.1, 0.2), terms))
    got = m({"blocks.0": s}, {"stage1": fmap}, Batch(torch.zeros(2, 1, 4, 4), torch.arange(2)))
    assert got.item() == pytest.approx(want, rel=1e-10)
