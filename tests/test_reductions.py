"""Our losses against the reductions of the authors' / reference code (docs/methods.md,
"Reductions against the reference code"): for each method, ours == factor x reference on random
inputs with non-default batch sizes and channel counts.

The reference formulas below are re-written here from the reference code's definitions
(RepDistiller ``distiller_zoo``, ADLab-AutoDrive/ICKD ``ICKDLoss``, szagoruyko/attention-transfer
``utils.at_loss``, AberHu/Knowledge-Distillation-Zoo ``kd_losses/cc.py``, torchdistill
``CCKDLoss``), in plain torch, without calling the library.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill import functional as DF


def rand(seed: int, *shape: int, relu: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.relu() if relu else x


# ---------------------------------------------------------------------------- reference formulas


def ref_sp(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """RepDistiller ``Similarity``: sum of squared differences of row-normalised Grams / bsz^2."""
    b = fs.shape[0]
    gs, gt = fs.reshape(b, -1) @ fs.reshape(b, -1).T, ft.reshape(b, -1) @ ft.reshape(b, -1).T
    gs = gs / gs.pow(2).sum(1, keepdim=True).sqrt()
    gt = gt / gt.pow(2).sum(1, keepdim=True).sqrt()
    return (gt - gs).pow(2).sum() / (b * b)


def ref_fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """RepDistiller ``FSP.compute_fsp`` (equal sizes): (B, C_top, C_bottom), mean over positions."""
    b = bottom.shape[0]
    return (top.reshape(b, top.shape[1], 1, -1) * bottom.reshape(b, 1, bottom.shape[1], -1)).mean(-1)


def ref_fsp(s_feats: list[torch.Tensor], t_feats: list[torch.Tensor]) -> torch.Tensor:
    """RepDistiller ``FSP``: each consecutive pair's element mean of squared differences, summed."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(s_feats) - 1):
        gs = ref_fsp_matrix(s_feats[i], s_feats[i + 1])
        gt = ref_fsp_matrix(t_feats[i], t_feats[i + 1])
        total = total + (gs - gt).pow(2).mean()
    return total


def ref_cc_zoo(fs: torch.Tensor, ft: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """Knowledge-Distillation-Zoo ``CC``: MSE (mean over n^2) of Taylor-RBF matrices of unit rows."""

    def k(x: torch.Tensor) -> torch.Tensor:
        u = x / x.pow(2).sum(1, keepdim=True).sqrt()
        c = u @ u.T
        return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c**p for p in range(order + 1))

    return (k(fs) - k(ft)).pow(2).mean()


def ref_cc_torchdistill_bilinear(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """torchdistill ``CCKDLoss`` (bilinear, batchmean): Frobenius norm (not squared) of ΔK / n^2."""
    n = fs.shape[0]
    return (fs @ fs.T - ft @ ft.T).pow(2).sum().sqrt() / n**2


def ref_rkd(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller ``RKDLoss``: smooth-L1 means over all B^2 distances and all B^3 angles."""

    def dist(e: torch.Tensor) -> torch.Tensor:
        d = (e[:, None, :] - e[None, :, :]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
        d = d * (1 - torch.eye(e.shape[0], dtype=e.dtype))
        return d / d[d > 0].mean()

    def angles(e: torch.Tensor) -> torch.Tensor:
        diff = e[None, :, :] - e[:, None, :]  # [a, b] = e_b - e_a
        unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.einsum("abd,acd->abc", unit, unit).reshape(-1)

    distance = F.smooth_l1_loss(dist(fs), dist(ft))
    angle = F.smooth_l1_loss(angles(fs), angles(ft))
    return distance, angle


def ref_pkt(fs: torch.Tensor, ft: torch.Tensor, eps: float = 1e-7, keep_diagonal: bool = True) -> torch.Tensor:
    """RepDistiller / passalis ``cosine_similarity_loss``: mean over all B^2 entries of p log((p+eps)/(q+eps)),
    the self-similarities kept in the normalisation. ``keep_diagonal=False, eps=0`` drops them."""

    def cond(x: torch.Tensor) -> torch.Tensor:
        u = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
        k = (u @ u.T + 1) / 2
        if not keep_diagonal:
            k = k * (1 - torch.eye(x.shape[0], dtype=x.dtype))
        return k / k.sum(1, keepdim=True)

    p, q = cond(ft), cond(fs)
    terms = p * torch.log((p + eps) / (q + eps))
    if not keep_diagonal:
        terms = torch.where(p > 0, terms, torch.zeros_like(terms))
    return terms.mean()


def ref_ickd(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """ADLab-AutoDrive/ICKD ``ICKDLoss.batch_loss`` (after its embedding): sum of squared differences
    of row-normalised channel Grams / (ch * bsz)."""
    b, c = fs.shape[:2]

    def gram(x: torch.Tensor) -> torch.Tensor:
        v = x.reshape(b, c, -1)
        g = v @ v.transpose(1, 2)
        return g / g.pow(2).sum(2, keepdim=True).sqrt()

    return (gram(fs) - gram(ft)).pow(2).sum() / (c * b)


def ref_at(fs: torch.Tensor, ft: torch.Tensor, beta: float) -> torch.Tensor:
    """szagoruyko/attention-transfer ``utils.at_loss`` times ``--beta``: beta * mean over (b, i) of the
    squared difference of unit attention vectors (channel mean of squares)."""
    b = fs.shape[0]
    qs, qt = fs.pow(2).mean(1).reshape(b, -1), ft.pow(2).mean(1).reshape(b, -1)
    qs = qs / qs.pow(2).sum(1, keepdim=True).sqrt()
    qt = qt / qt.pow(2).sum(1, keepdim=True).sqrt()
    return beta * (qs - qt).pow(2).mean()


# ---------------------------------------------------------------------------- ours == factor x reference


def test_sp_equals_repdistiller() -> None:  # factor 1
    fs, ft = rand(0, 7, 3, 4, 4), rand(1, 7, 5, 2, 2)
    assert DF.sp_loss([fs], [ft]).item() == pytest.approx(ref_sp(fs, ft).item(), rel=1e-12)


def test_fsp_is_repdistiller_times_c1_c2_per_pair() -> None:
    # two consecutive pairs with different channel products: (C1, C2) = (3, 5), then (5, 4)
    b = 6
    s = [rand(2, b, 3, 4, 4), rand(3, b, 5, 4, 4), rand(4, b, 4, 4, 4)]
    t = [rand(5, b, 3, 4, 4), rand(6, b, 5, 4, 4), rand(7, b, 4, 4, 4)]
    ours = [DF.fsp_loss([DF.fsp_matrix(s[i], s[i + 1])], [DF.fsp_matrix(t[i], t[i + 1])]) for i in range(2)]
    refs = [ref_fsp(s[i:i + 2], t[i:i + 2]) for i in range(2)]
    assert ours[0].item() == pytest.approx(15 * refs[0].item(), rel=1e-12)
    assert ours[1].item() == pytest.approx(20 * refs[1].item(), rel=1e-12)
    # lambda_i = 1 / (C1_i C2_i) reproduces the reference's sum over pairs exactly
    both = DF.fsp_loss([DF.fsp_matrix(s[0], s[1]), DF.fsp_matrix(s[1], s[2])],
                       [DF.fsp_matrix(t[0], t[1]), DF.fsp_matrix(t[1], t[2])], lambdas=[1 / 15, 1 / 20])
    assert both.item() == pytest.approx(ref_fsp(s, t).item(), rel=1e-12)


def test_cc_gaussian_equals_knowledge_distillation_zoo() -> None:  # factor 1
    fs, ft = rand(8, 9, 6), rand(9, 9, 4)
    assert DF.cc_loss(fs, ft, 0.3, 3).item() == pytest.approx(ref_cc_zoo(fs, ft, 0.3, 3).item(), rel=1e-12)


def test_cc_bilinear_is_torchdistill_squared_times_n2_on_unit_rows() -> None:
    # torchdistill takes the norm, not its square: ours = n^2 * ref^2 (no constant factor)
    n = 6
    fs = F.normalize(rand(10, n, 5), dim=1)
    ft = F.normalize(rand(11, n, 8), dim=1)
    ref = ref_cc_torchdistill_bilinear(fs, ft).item()
    assert DF.cc_loss(fs, ft, kernel="bilinear").item() == pytest.approx(n**2 * ref**2, rel=1e-12)


@pytest.mark.parametrize("b", [5, 9])
def test_rkd_terms_are_repdistiller_times_b_over_distinct_sets(b: int) -> None:
    fs, ft = rand(12, b, 7), rand(13, b, 3)
    ref_d, ref_a = ref_rkd(fs, ft)
    ours_d, ours_a = DF.rkd_distance_loss(fs, ft), DF.rkd_angle_loss(fs, ft)
    assert ours_d.item() == pytest.approx(ref_d.item() * b / (b - 1), rel=1e-10)
    assert ours_a.item() == pytest.approx(ref_a.item() * b**2 / ((b - 1) * (b - 2)), rel=1e-10)
    # RepDistiller's 25 / 50 translate to 25 (B-1)/B and 50 (B-1)(B-2)/B^2 here
    ours = DF.rkd_loss(fs, ft, distance_weight=25 * (b - 1) / b, angle_weight=50 * (b - 1) * (b - 2) / b**2)
    assert ours.item() == pytest.approx((25 * ref_d + 50 * ref_a).item(), rel=1e-10)


def test_pkt_is_b_times_the_reference_without_self_similarities() -> None:
    b = 7
    fs, ft = rand(14, b, 5), rand(15, b, 9)
    exact = ref_pkt(fs, ft, eps=0.0, keep_diagonal=False)
    assert DF.pkt_loss(fs, ft).item() == pytest.approx(b * exact.item(), rel=1e-10)


def test_pkt_with_the_reference_self_similarities_is_about_b_times_at_batch_64() -> None:
    # The reference keeps K(x_i, x_i) = 1 in each row: no exact factor. Measured on ReLU
    # features (B = 64, D = 256): ours / (B * reference) = 1.021 (docs/methods.md).
    b = 64
    fs, ft = rand(16, b, 256, relu=True), rand(17, b, 256, relu=True)
    ratio = DF.pkt_loss(fs, ft).item() / (b * ref_pkt(fs, ft).item())
    assert ratio == pytest.approx(1.021, abs=0.001)


def test_ickd_is_the_official_code_over_c() -> None:
    b, c = 3, 5
    fs, ft = rand(18, b, c, 4, 4), rand(19, b, c, 2, 3)
    assert DF.ickd_loss(fs, ft).item() == pytest.approx(ref_ickd(fs, ft).item() / c, rel=1e-12)


def test_at_has_no_constant_factor_but_a_per_sample_one() -> None:
    # ours = beta/(2 B N) sum_b |d_b|, reference = beta/(B N) sum_b |d_b|^2: per sample ours = ref / (2 |d|)
    fs, ft = rand(20, 3, 4, 4, 4), rand(21, 3, 6, 4, 4)
    for i in range(3):
        s, t = fs[i:i + 1], ft[i:i + 1]
        ours = DF.at_loss([DF.attention_map(s)], [DF.attention_map(t)], beta=1000.0).item()
        qs = s.pow(2).sum(1).flatten()
        qt = t.pow(2).sum(1).flatten()
        d = (qs / qs.norm() - qt / qt.norm()).norm().item()
        assert ours == pytest.approx(ref_at(s, t, 1000.0).item() / (2 * d), rel=1e-10)
