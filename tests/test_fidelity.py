"""Fidelity of AT's pooling order and CC's bilinear kernel (issue 10), on numbers worked out
independently: exact closed forms of hand-built tensors, and plain-torch step-by-step
computations (block means by reshape, norms by sums of squares) that do not call the library.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill import functional as DF
from distill.methods import AT, CC, create_method, method_info

# ---------------------------------------------------------------------------- AT: pooling order

# One sample, one channel: student 2x2 map, teacher 1x2 map (the student's rows are pooled).
S_HAND = torch.tensor([[[[1.0, 2.0], [-1.0, 2.0]]]], dtype=torch.float64)
T_HAND = torch.tensor([[[[1.0, 1.0]]]], dtype=torch.float64)


def _at(pool: str, p: float, beta: float, s=S_HAND, t=T_HAND) -> float:
    m = AT(pairs=[("x", "x")], p=p, beta=beta, pool=pool)
    return m({"x": s}, {"x": t}, None).item()


def test_at_pools_the_feature_map_before_the_attention_map_by_default() -> None:
    # Feature first: pooled student (0, 2) -> |.|^3 = (0, 8) -> unit (0, 1); teacher (1, 1)/sqrt 2.
    # ||(0, 1) - (1, 1)/sqrt 2||^2 = 2 - sqrt 2;  N = 2, B = 1:  loss = beta/4 * sqrt(2 - sqrt 2).
    want_feature = 500.0 / 4 * math.sqrt(2 - math.sqrt(2))
    # Attention first: |.|^3 per pixel (1, 8 / 1, 8) -> pooled (1, 8) -> unit (1, 8)/sqrt 65;
    # <(1, 8)/sqrt 65, (1, 1)/sqrt 2> = 9/sqrt 130:  loss = beta/4 * sqrt(2 - 18/sqrt 130).
    want_attention = 500.0 / 4 * math.sqrt(2 - 18 / math.sqrt(130))
    assert _at("feature", 3.0, 500.0) == pytest.approx(want_feature, rel=1e-12)
    assert create_method("at", pairs=[("x", "x")], p=3.0, beta=500.0)(
        {"x": S_HAND}, {"x": T_HAND}, None
    ).item() == pytest.approx(want_feature, rel=1e-12)
    assert _at("attention", 3.0, 500.0) == pytest.approx(want_attention, rel=1e-12)
    assert abs(want_feature - want_attention) > 10.0  # the order matters here: 95.67 vs 46.4


def test_at_documented_example_p2_beta1000() -> None:
    # The numbers quoted in AT's docstring and docs/methods.md.
    assert _at("feature", 2.0, 1000.0) == pytest.approx(250 * math.sqrt(2 - math.sqrt(2)), rel=1e-12)
    assert _at("attention", 2.0, 1000.0) == pytest.approx(250 * math.sqrt(2 - 10 / math.sqrt(34)), rel=1e-12)
    assert round(_at("feature", 2.0, 1000.0), 2) == 191.34
    assert round(_at("attention", 2.0, 1000.0), 2) == 133.47


def _block_mean(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, c, hh, ww = x.shape
    return x.reshape(b, c, h, hh // h, w, ww // w).mean(dim=(3, 5))


def _at_layer_by_hand(fs: torch.Tensor, ft: torch.Tensor, p: float, beta: float, pool: str) -> torch.Tensor:
    """beta/(2 B N) sum_b ||q_s/|q_s| - q_t/|q_t|||, pooling by block means before or after |.|^p."""
    h = min(fs.shape[2], ft.shape[2])
    w = min(fs.shape[3], ft.shape[3])
    if pool == "feature":
        qs = _block_mean(fs, h, w).abs().pow(p).sum(dim=1)
        qt = _block_mean(ft, h, w).abs().pow(p).sum(dim=1)
    else:
        qs = _block_mean(fs.abs().pow(p).sum(dim=1, keepdim=True), h, w)[:, 0]
        qt = _block_mean(ft.abs().pow(p).sum(dim=1, keepdim=True), h, w)[:, 0]
    b = fs.shape[0]
    qs, qt = qs.reshape(b, -1), qt.reshape(b, -1)
    us = qs / qs.pow(2).sum(dim=1, keepdim=True).sqrt()
    ut = qt / qt.pow(2).sum(dim=1, keepdim=True).sqrt()
    return beta / (2 * b * qs.shape[1]) * (us - ut).pow(2).sum(dim=1).sqrt().sum()


@pytest.mark.parametrize("pool", ["feature", "attention"])
def test_at_pooling_matches_a_step_by_step_computation(pool: str) -> None:
    g = torch.Generator().manual_seed(3)
    # pair 1: the student is larger (8x4 -> 4x2); pair 2: the teacher is larger (6x6 -> 3x3)
    student = {"a": torch.randn(3, 2, 8, 4, generator=g, dtype=torch.float64),
               "b": torch.randn(3, 5, 3, 3, generator=g, dtype=torch.float64)}
    teacher = {"a": torch.randn(3, 7, 4, 2, generator=g, dtype=torch.float64),
               "b": torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)}
    p, beta = 1.5, 250.0
    want = sum(_at_layer_by_hand(student[k], teacher[k], p, beta, pool) for k in ("a", "b"))
    other = sum(_at_layer_by_hand(student[k], teacher[k], p, beta, "attention" if pool == "feature" else "feature")
                for k in ("a", "b"))
    m = AT(pairs=[("a", "a"), ("b", "b")], p=p, beta=beta, pool=pool)
    got = m(student, teacher, None)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    assert abs(got.item() - other.item()) > 1e-3 * want.item()  # the test can tell the two orders apart


def test_at_pool_option_is_validated_and_the_default_is_feature() -> None:
    assert method_info("at").defaults["pool"] == "feature"
    with pytest.raises(ValueError, match="'features'"):
        AT(pool="features")


# ---------------------------------------------------------------------------- CC: bilinear kernel


def test_cc_bilinear_hand_example() -> None:
    # Teacher rows (1,0), (0,1), (1,1) -> unit rows; Gram [[1,0,r],[0,1,r],[r,r,1]], r = 1/sqrt 2.
    # Student rows (2,0), (2,0), (0,3) -> Gram [[1,1,0],[1,1,0],[0,0,1]].
    # Difference: two entries of -1 and four of r:  ||.||_F^2 = 2 + 4 * 1/2 = 4;  n = 3: 4/9.
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    s = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    assert DF.cc_loss(s, t, gamma=0.7, order=3, kernel="bilinear").item() == pytest.approx(4 / 9, rel=1e-12)
    r = 1 / math.sqrt(2)
    want_k = torch.tensor([[1.0, 0.0, r], [0.0, 1.0, r], [r, r, 1.0]], dtype=torch.float64)
    assert torch.allclose(DF.cc_kernel_matrix(t, kernel="bilinear"), want_k, atol=1e-15)
    # the Gaussian kernel of the same inputs gives another value: the kernel argument is used
    assert abs(DF.cc_loss(s, t, gamma=0.7, order=3).item() - 4 / 9) > 0.1
    # through the method, non-default settings (gamma/order are ignored by the bilinear pool)
    m = CC(adapter=None, kernel="bilinear", gamma=0.7, order=3, weight=0.5)
    m.prepare({"pool": s}, {"pool": t}, None)
    assert m({"pool": s}, {"pool": t}, None).item() == pytest.approx(4 / 9, rel=1e-12)


def test_cc_bilinear_random_against_explicit_cosines() -> None:
    g = torch.Generator().manual_seed(11)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def cos_matrix(x: torch.Tensor) -> list[list[float]]:
        rows = [x[i].tolist() for i in range(x.shape[0])]
        norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
        return [[sum(a * b for a, b in zip(ri, rj)) / (ni * nj) for rj, nj in zip(rows, norms)]
                for ri, ni in zip(rows, norms)]

    ks, kt = cos_matrix(s), cos_matrix(t)
    want = sum((kt[i][j] - ks[i][j]) ** 2 for i in range(5) for j in range(5)) / 25
    assert DF.cc_loss(s, t, kernel="bilinear").item() == pytest.approx(want, rel=1e-12)


def test_cc_defaults_unchanged_and_kernel_validated() -> None:
    d = method_info("cc").defaults
    assert (d["kernel"], d["gamma"], d["order"], d["adapter"], d["weight"]) == ("gaussian", 0.4, 2, "linear", 1.0)
    with pytest.raises(ValueError, match="'rbf'"):
        CC(kernel="rbf")
    with pytest.raises(ValueError, match="'linear'"):
        DF.cc_kernel_matrix(torch.ones(2, 3), kernel="linear")
