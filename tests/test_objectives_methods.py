"""Methods against their objectives with *non-default* scales (issue 10).

A method is a thin wrapper that hands its hyper-parameters to its functional. Tests run with T = 1
and weights of 1 cannot see a wrapper that drops one (passes ``T=1``, forgets ``alpha``, ignores
``lambdas``). Here:

* every registered method is built with non-default scales; perturbing each scale must change the
  loss (a dropped scale leaves it unchanged), and a newly registered method must be listed;
* the methods whose wrapper carries a scale of its own (and those of issue 10's bugs) are compared
  with an objective written out in this file from the paper's formula, with those same values.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _views import cnn_views

from distill import functional as DF
from distill.batch import Batch
from distill.methods import create_method, list_methods

B = 8


# ------------------------------------------------------------------------ independent references


def ref_log_softmax(z: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    z = z.double() / T
    return z - z.exp().sum(1, keepdim=True).log()


def ref_kl_T2(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * mean_b sum_k p_t (log p_t - log p_s) at temperature T (Hinton et al.)."""
    lt, ls = ref_log_softmax(t, T), ref_log_softmax(s, T)
    return T * T * (lt.exp() * (lt - ls)).sum(1).mean()


def ref_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -ref_log_softmax(z)[torch.arange(len(y)), y].mean()


def ref_pearson(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.pow(2).sum(dim).sqrt() * b.pow(2).sum(dim).sqrt())


def leaf_views(seed: int = 0):
    s, t, b = cnn_views(B, seed)
    return s, t, b


def indexed(batch: Batch) -> Batch:
    return Batch(batch.inputs, batch.targets, torch.arange(len(batch.targets)))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    a, b = a.detach(), torch.as_tensor(b).detach()
    assert float(a) == pytest.approx(float(b), rel=rel, abs=1e-9), (float(a), float(b))


# ------------------------------------------------------------------------ logits


def test_kd_and_dkd_with_non_default_scales():
    s, t, b = leaf_views()
    _close(create_method("kd", T=2.5)(s, t, b), ref_kl_T2(s["logits"], t["logits"], 2.5))
    m = create_method("dkd", alpha=0.7, beta=3.0, T=2.5)
    _close(m(s, t, b), DF.dkd_loss(s["logits"], t["logits"], b.targets, 0.7, 3.0, 2.5))


def test_dist_with_non_default_scales_matches_the_pearson_objective():
    """Huang et al. 2022: beta (1 - rho over classes) + gamma (1 - rho over the batch), on softmax(z/T), x T^2."""
    s, t, b = leaf_views()
    T, beta, gamma = 2.5, 1.3, 0.6
    ps, pt = ref_log_softmax(s["logits"], T).exp(), ref_log_softmax(t["logits"], T).exp()
    inter = T * T * (1 - ref_pearson(ps, pt, 1)).mean()
    intra = T * T * (1 - ref_pearson(ps, pt, 0)).mean()
    _close(create_method("dist", beta=beta, gamma=gamma, T=T)(s, t, b), beta * inter + gamma * intra)


def test_skd_with_non_default_scales_matches_the_spherical_objective():
    """Guo et al. 2020: KD at T on m * (z - mean) / std of each row, both networks."""
    s, t, b = leaf_views()
    T, mult = 2.5, 1.7

    def sphere(z):
        z = z.double()
        c = z - z.mean(1, keepdim=True)
        return mult * c / (c.pow(2).mean(1, keepdim=True) + 1e-7).sqrt()

    _close(create_method("skd", T=T, multiplier=mult)(s, t, b), ref_kl_T2(sphere(s["logits"]), sphere(t["logits"]), T))


def test_label_smoothing_and_ctkd_with_non_default_scales():
    s, t, b = leaf_views()
    eps, K = 0.23, s["logits"].shape[1]
    q = torch.full((B, K), eps / K, dtype=torch.float64)
    q[torch.arange(B), b.targets] += 1 - eps
    _close(create_method("label_smoothing", eps=eps)(s, t, b), -(q * ref_log_softmax(s["logits"])).sum(1).mean())
    m = create_method("ctkd", t_min=2.0, t_max=9.0, init_theta=0.3)
    T = float(DF.ctkd_temperature(m.theta.detach(), 2.0, 9.0))
    assert 2.0 < T < 9.0
    _close(m(s, t, b), ref_kl_T2(s["logits"], t["logits"], T))


# ------------------------------------------------------------------------ features


def test_fsp_lambdas_weight_each_pair():
    """Yim et al. 2017, eq. 2: sum_i lambda_i mean_b ||G_i^T - G_i^S||_F^2, G = (F1^T F2)/(h w)."""
    s, t, b = leaf_views()
    lambdas = [0.3, 1.7]
    m = create_method("fsp", pairs=[("stem", "stage1"), ("stage2", "stage3")], lambdas=lambdas)
    with torch.no_grad():
        m.prepare(s, t, b)

    def gram(x, y):
        if x.shape[-1] != y.shape[-1]:
            x = F.adaptive_avg_pool2d(x, y.shape[-2:])
        h, w = y.shape[-2:]
        return torch.einsum("bihw,bjhw->bij", x.double(), y.double()) / (h * w)

    want = 0.0
    for lam, (a, c) in zip(lambdas, [("stem", "stage1"), ("stage2", "stage3")]):
        gs = gram(m.adapters[f"{a}__{a}"](s[a]), m.adapters[f"{c}__{c}"](s[c]))
        gt = gram(t[a], t[c])
        want = want + lam * (gt - gs).pow(2).sum((1, 2)).mean()
    _close(m(s, t, b), want)


def test_mgd_alpha_scales_the_generation_loss():
    """Yang et al. 2022: alpha * sum (G(f_S * M) - f_T)^2 / B."""
    s, t, b = leaf_views()
    m = create_method("mgd", alpha=3e-3, mask_ratio=0.4, seed=5, student_tap="stage3", teacher_tap="stage3")
    with torch.no_grad():
        m.prepare(s, t, b)
    m.eval()  # the evaluation mask is reproducible
    mask = m.draw_mask(t["stage3"])
    gen = m.generation(m.align(s["stage3"]) * mask)
    want = 3e-3 * (gen.double() - t["stage3"].double()).pow(2).sum() / B
    _close(m(s, t, b), want)


def test_semckd_beta_scales_the_calibrated_loss():
    s, t, b = leaf_views()
    m = create_method("semckd", beta=7.0)
    with torch.no_grad():
        m.prepare(s, t, b)
    fs = [s[k] for k in ("stage1", "stage2", "stage3")]
    ft = [t[k] for k in ("stage1", "stage2", "stage3")]
    att = m.attention(fs, ft).double()
    pool = F.adaptive_avg_pool2d
    want = 0.0
    for i, x in enumerate(fs):
        for j, y in enumerate(ft):
            if x.shape[-1] > y.shape[-1]:
                p, q = m.proj[f"{i}_{j}"](pool(x, y.shape[-2:])), y
            else:
                p, q = m.proj[f"{i}_{j}"](x), pool(y, x.shape[-2:])
            dist = (p.double() - q.double()).pow(2).flatten(1).mean(1)  # (B,) mean over C, H, W
            want = want + (att[:, i, j] * dist).sum() / (B * 3)  # 1/(B S), the authors' normalisation
    _close(m(s, t, b), 7.0 * want)


def test_at_beta_and_p_and_cwd_tau():
    s, t, b = leaf_views()
    m = create_method("at", pairs=[("stage1", "stage1"), ("stage3", "stage3")], beta=37.0, p=3.0)
    want = 0.0
    for key in ("stage1", "stage3"):
        qs = s[key].double().abs().pow(3).mean(1).flatten(1)
        qt = t[key].double().abs().pow(3).mean(1).flatten(1)
        d = F.normalize(qs, dim=1) - F.normalize(qt, dim=1)
        want = want + 37.0 / (2 * qs.shape[1]) * d.norm(dim=1).mean()  # beta / (2 B N_j) sum_b
    _close(m(s, t, b), want)
    c = create_method("cwd", pairs=[("stage3", "stage3")], tau=2.5)
    with torch.no_grad():
        c.prepare(s, t, b)
    _close(c(s, t, b), DF.cwd_loss(c.align[0](s["stage3"]), t["stage3"], 2.5))


# ------------------------------------------------------------------------ relations


def test_relation_weights_reach_their_functionals():
    s, t, b = leaf_views()
    r = create_method("rkd", distance_weight=3.0, angle_weight=0.7)
    _close(r(s, t, b), 3.0 * DF.rkd_distance_loss(s["pool"], t["pool"]) + 0.7 * DF.rkd_angle_loss(s["pool"], t["pool"]))
    c = create_method("cc", gamma=0.9, order=3)
    with torch.no_grad():
        c.prepare(s, t, b)
    _close(c(s, t, b), DF.cc_loss(c.embed(s["pool"]), t["pool"], 0.9, 3))
    d = create_method("darkrank", alpha=1.5, beta=2.5)
    _close(d(s, t, b), DF.darkrank_hard_loss(s["pool"], t["pool"], 1.5, 2.5, None, True))
    irg = create_method("irg", student_transform=("stage1", "stage3"), vertex_weight=0.3, edge_weight=1.7,
                        transformation_weight=0.6)
    with torch.no_grad():
        irg.prepare(s, t, b)
    vs, vt, fs, ft, ts, tt = irg._gather(s, t)
    parts = [DF.irg_vertex_loss(vs, vt), DF.irg_edge_loss(fs, ft), DF.irg_transformation_loss(ts, tt)]
    _close(irg(s, t, b), 0.3 * parts[0] + 1.7 * parts[1] + 0.6 * parts[2])


# ------------------------------------------------------------------------ self-distillation


def hsakd_views(seed: int = 0, n: int = 2, K: int = 5, branches: int = 2):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    s = {"logits": leaf(4 * n, K), **{f"aux.{i}": leaf(4 * n, 4 * K) for i in range(branches)}}
    t = {"logits": leaf(4 * n, K), **{f"aux.{i}": leaf(4 * n, 4 * K) for i in range(branches)}}
    y = torch.tensor([1, 3]).repeat_interleave(4)
    return s, t, Batch(torch.zeros(4 * n, 1, 4, 4), y)


def test_hsakd_temperature_reaches_every_term():
    """Yang et al. 2021: CE on the unrotated rows + sum_l T^2 KL(q_l^T || q_l^S) + T^2 KL(p^T || p^S)."""
    s, t, b = hsakd_views()
    T = 2.5
    m = create_method("hsakd", branches=2, T=T)
    want = ref_ce(s["logits"][0::4], b.targets[0::4]) + ref_kl_T2(s["logits"], t["logits"], T)
    for i in range(2):
        want = want + ref_kl_T2(s[f"aux.{i}"], t[f"aux.{i}"], T)
    _close(m(s, t, b), want)


def _hint(f, g):
    return (f.double() - g.double()).pow(2).sum(1).mean()


def _soft_kl(s, t, T):  # BYOT / MSD write the KL without T^2
    return ref_kl_T2(s, t, T) / (T * T)


def test_msd_hint_is_weighted_by_lam_and_detaches_the_deepest_feature():
    """Luan et al. 2019 with BYOT's hint: sum_i [(1-a) CE_i + a/(C-1) sum_{j!=i} KL(z_j || z_i)]
    + lam sum_{i<C} ||f_i - sg(f_C)||^2."""
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(6, 5, generator=g).double().requires_grad_(True) for _ in range(3)]
    feats = [torch.randn(6, 4, generator=g).double().requires_grad_(True) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    alpha, lam, T = 0.4, 0.07, 2.5
    want = 0.0
    for i, z in enumerate(logits):
        want = want + (1 - alpha) * ref_ce(z, y)
        for j, u in enumerate(logits):
            if j != i:
                want = want + alpha / 2 * _soft_kl(z, u.detach(), T)
    hint = sum(_hint(f, feats[2].detach()) for f in feats[:2])
    got = DF.msd_loss(logits, y, feats[:2], feats[2], alpha, lam, T)
    _close(got, want + lam * hint, rel=1e-9)
    # the deepest feature is a teaching target only: no gradient reaches it through the hint
    (grad,) = torch.autograd.grad(got, feats[2], allow_unused=True)
    assert grad is None or float(grad.abs().max()) == 0.0
    # and the method hands lam on to it
    s, t, b = leaf_views()
    m = create_method("msd", exits=("stage1", "stage2"), feature="pool", alpha=alpha, lam=lam, T=T,
                      lam_decay="constant")
    with torch.no_grad():
        m.prepare(s, t, b)
    features, exit_logits = m.exit_outputs(s)
    want = DF.msd_loss([*exit_logits, s["logits"]], b.targets, features, s["pool"], alpha, lam, T)
    _close(m(s, t, b), want)


def test_byot_with_non_default_scales():
    """Zhang et al. 2019: (1-a) CE_C + sum_{i<C} [(1-a) CE_i + a KL(z_C || z_i) + lam ||f_i - f_C||^2]."""
    s, t, b = leaf_views()
    alpha, lam, T = 0.4, 0.07, 2.5
    m = create_method("byot", exits=("stage1", "stage2"), feature="pool", alpha=alpha, lam=lam, T=T)
    with torch.no_grad():
        m.prepare(s, t, b)
    features, exit_logits = m.exit_outputs(s)
    want = (1 - alpha) * ref_ce(s["logits"], b.targets)
    for z, f in zip(exit_logits, features):
        want = want + (1 - alpha) * ref_ce(z, b.targets) + alpha * _soft_kl(z, s["logits"], T) + lam * _hint(f, s["pool"])
    _close(m(s, t, b), want)


def test_dlb_and_codistillation_temperatures():
    s, t, b = leaf_views()
    b = indexed(b)
    m = create_method("dlb", T=2.5)
    m.train()
    m(s, t, b)  # remembers this step's logits
    s2, _, _ = leaf_views(seed=1)
    _close(m(s2, t, b), ref_kl_T2(s2["logits"], s["logits"], 2.5))


# ------------------------------------------------------------------------ every registered method


def _rocket(s, t, b):
    s = dict(s, booster_logits=t["logits"].detach().clone().requires_grad_(True))
    return s, t, b


def _rotations(s, t, b):
    return s, t, Batch(b.inputs, torch.tensor([1, 3]).repeat_interleave(4))


def _tokens(s, t, b):
    """Language-model views: logits (2, 5, 10) and labels (2, 5) with a prompt (-100)."""
    from distill.batch import TokenBatch

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2, 5), generator=g)
    labels[0, :2] = -100
    return ({"logits": torch.randn(2, 5, 10, generator=g).requires_grad_(True)},
            {"logits": 2 * torch.randn(2, 5, 10, generator=g)}, TokenBatch(labels.clamp_min(0), labels))


# name -> (kwargs built with non-default scales, views transform or None, scales to perturb: {name: other value})
SETUPS: dict[str, tuple[dict, object, dict]] = {
    "ce": ({}, None, {}),
    "label_smoothing": ({"eps": 0.23}, None, {"eps": 0.4}),
    "kcd": ({"T": 2.5, "num_samples": B}, "indexed", {"T": 1.5}),
    "crd": ({"num_samples": B, "feat_dim": 8, "nce_k": 4, "nce_t": 0.2, "nce_m": 0.3, "negatives": "random"},
            "indexed", {"nce_t": 0.5}),
    "ab": ({"pairs": [("stage1", "stage1"), ("stage3", "stage3")], "margin": 0.6, "layer_weights": [0.3, 1.9]}, None,
           {"margin": 1.4, "layer_weights": [1.9, 0.3]}),
    "at": ({"beta": 37.0, "p": 3.0}, None, {"beta": 11.0, "p": 2.0}),
    "cwd": ({"tau": 2.5}, None, {"tau": 1.5}),
    "fitnet": ({}, None, {}),
    "fsp": ({"lambdas": [0.3, 1.7]}, None, {"lambdas": [1.7, 0.3]}),
    "ft": ({"factor_rate": 0.75, "p": 2.0}, None, {"p": 1.0}),
    "ft_paraphraser": ({"factor_rate": 0.75}, None, {}),
    "hsakd": ({"branches": 2, "T": 2.5}, "hsakd", {"T": 1.5}),
    "ickd": ({}, None, {}),
    "jacobian": (None, None, {}),  # needs the models: its own tests (tests/test_jacobian.py)
    # score-matrix / object views: non-default scales against numpy in tests/test_lang_d.py
    "dide": (None, None, {}),
    "ernie_search": (None, None, {}),
    "aladin": (None, None, {}),
    "kd_vlp": (None, None, {}),
    "logit_mse": ({"ce_weight": 0.3, "distill_weight": 0.7}, None, {"ce_weight": 0.8, "distill_weight": 0.2}),
    # HF attention maps and [CLS] states of mapped layers: non-default weights and T in tests/test_lang_e.py
    "internal_reps": (None, None, {}),
    # per-frame views (B, T, K) with (B, T) labels: non-default T against numpy in tests/test_lang_a.py
    "frame_kd": (None, None, {}),
    "frame_ce": (None, None, {}),
    "knowledge_projection": ({}, None, {}),
    "mgd": ({"alpha": 3e-3, "mask_ratio": 0.4}, None, {"alpha": 1e-3, "mask_ratio": 0.7}),
    "nst": ({"degree": 3, "c": 0.5}, None, {"c": 1.5}),
    "ofd": ({"pairs": [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")], "margins": [torch.linspace(-1, 0, 8), torch.linspace(-1, 0, 12), torch.linspace(-1, 0, 16)],
             "layer_weights": [0.3, 0.9, 1.9]}, None, {"layer_weights": [1.9, 0.9, 0.3]}),
    "semckd": ({"beta": 7.0}, None, {"beta": 3.0}),
    "simkd": ({}, None, {}),
    "spot_adaptive": ({"routing": False, "hint": 0.7, "kd": 1.3, "T": 2.5, "route": 0.4, "distill_bias": 6.0}, None,
                      {"hint": 1.9}),  # kd, T, route act only with routing (the models): tests/test_spot.py
    "tat": ({"temperature": 2.5, "whole_weight": 1.3, "patch_weight": 0.7, "anchor_weight": 0.4, "patch_size": 2,
             "group_size": 1, "anchor_kernel": 1}, None,
            {"temperature": 1.5, "whole_weight": 0.5, "patch_weight": 0.2, "anchor_weight": 1.1}),
    "tat_hierarchical": ({"temperature": 2.5, "patch_weight": 0.7, "anchor_weight": 0.4, "patch_size": 2,
                          "group_size": 1, "anchor_kernel": 1}, None,
                         {"temperature": 1.5, "patch_weight": 0.2, "anchor_weight": 1.1}),
    "vid": ({"init_pred_var": 2.0}, None, {"init_pred_var": 4.0}),
    "ctkd": ({"t_min": 2.0, "t_max": 9.0, "init_theta": 0.3}, None, {"t_min": 1.0, "t_max": 5.0, "init_theta": 1.3}),
    "dist": ({"beta": 1.3, "gamma": 0.6, "T": 2.5}, None, {"beta": 0.4, "gamma": 1.9, "T": 1.5}),
    "dkd": ({"alpha": 0.7, "beta": 3.0, "T": 2.5}, None, {"alpha": 1.9, "beta": 5.0, "T": 1.5}),
    "kd": ({"T": 2.5}, None, {"T": 1.5}),
    "logit_regression": ({}, None, {}),
    "noisy_teacher": ({"variance": 0.3, "fraction": 0.6}, None, {"variance": 0.9, "fraction": 1.0}),
    "skd": ({"T": 2.5, "multiplier": 1.7}, None, {"T": 1.5, "multiplier": 3.0}),
    "codistillation": ({"T": 2.5}, None, {"T": 1.5}),
    "rocket_booster_ce": ({}, "rocket", {}),
    "rocket_hint": ({}, "rocket", {}),
    "cc": ({"gamma": 0.9, "order": 3}, None, {"gamma": 0.3, "order": 1}),
    "darkrank": ({"alpha": 1.5, "beta": 2.5}, None, {"alpha": 3.0, "beta": 1.0}),
    "irg": ({"student_transform": ("stage1", "stage3"), "vertex_weight": 0.3, "edge_weight": 1.7,
             "transformation_weight": 0.6}, None,
            {"vertex_weight": 1.1, "edge_weight": 0.4, "transformation_weight": 2.0}),
    "pkt": ({}, None, {}),
    "rkd": ({"distance_weight": 3.0, "angle_weight": 0.7}, None, {"distance_weight": 1.0, "angle_weight": 2.0}),
    "sp": ({}, None, {}),
    "byot": ({"feature": "pool", "alpha": 0.4, "lam": 0.07, "T": 2.5}, None, {"alpha": 0.2, "lam": 0.3, "T": 1.5}),
    "dlb": ({"T": 2.5}, "indexed", {}),  # its first step has no last batch: test_dlb_... above
    "msd": ({"feature": "pool", "alpha": 0.4, "lam": 0.07, "T": 2.5, "lam_decay": "constant"}, None,
            {"alpha": 0.2, "lam": 0.3, "T": 1.5}),
    "sla": ({"T": 2.5, "beta": 0.6}, "rotations", {"T": 1.5, "beta": 1.4}),
    "tf_fd": ({"intra": 3e-3, "inter": 7e-3}, None, {"intra": 1e-2, "inter": 2e-3}),
    "zipf_ls": ({"power": 1.7}, None, {"power": 0.6}),
    # token-level LM losses (tests/test_token_methods.py checks each against its written-out objective)
    "token_kl": ({"T": 1.7, "ce": 0.3}, "tokens", {"T": 2.5, "ce": 0.8}),
    "token_rkl": ({"T": 1.7, "ce": 0.3}, "tokens", {"T": 2.5, "ce": 0.8}),
    "gkd": ({"T": 1.7, "beta": 0.3, "ce": 0.3}, "tokens", {"T": 2.5, "beta": 0.8, "ce": 0.8}),
    "distillm": ({"T": 1.7, "alpha": 0.3, "ce": 0.3}, "tokens", {"T": 2.5, "alpha": 0.6, "ce": 0.8}),
    "skew_rkl": ({"T": 1.7, "alpha": 0.3, "ce": 0.3}, "tokens", {"T": 2.5, "alpha": 0.6, "ce": 0.8}),
    "token_tvd": ({"T": 1.7, "ce": 0.3}, "tokens", {"T": 2.5, "ce": 0.8}),
    # seq2seq soft-target losses on token views (tests/test_lang_b2.py checks each against numpy)
    "cmlm_kd": ({"T": 3.0, "kd": 0.7, "ce": 0.3}, "tokens", {"T": 5.0, "kd": 0.4, "ce": 0.8}),
    "knn_kd": ({"kd": 0.7, "ce": 0.3}, "tokens", {"kd": 0.4, "ce": 0.8}),
    "noisy_self_kd": ({"T": 1.7, "kd": 0.7, "ce": 0.3}, "tokens", {"T": 2.5, "kd": 0.4, "ce": 0.8}),
    "search_kd": ({"T": 1.7, "kd": 0.7, "ce": 0.3}, "tokens", {"T": 2.5, "kd": 0.4, "ce": 0.8}),
    # cross-attention maps of a seq2seq pair: non-default weights and T in tests/test_lang_b.py
    "teaching_attention": (None, None, {}),
    # issue 14's dense losses read detectors', segmenters' and 3D models' outputs, not (B, K) logits:
    # tests/test_dense_d2a.py (GFL's QFL + GIoU + DFL against hand numbers)
    "gfl_loss": (None, None, {}),
    # tests/test_dense_d2b.py (pixel CE with ignored pixels; DETR's set loss against hand numbers)
    "seg_ce": (None, None, {}),
    "detr_loss": (None, None, {}),
    # tests/test_dense_d3a.py (CenterNet's focal loss; MonoDistill's three terms against loops)
    "mono3d_loss": (None, None, {}),
    "monodistill": (None, None, {}),
    # tests/test_dense_d3b.py (CenterPoint's heatmap + box loss; the 3D methods against hand numbers and loops)
    "bev_loss": (None, None, {}),
    "lidar_distill": (None, None, {}),
    "pointdistiller": (None, None, {}),
    "sparse_kd3d": (None, None, {}),
    "sparse_kd3d_label": (None, None, {}),
    # tests/test_dense_m1.py (segmentation maps (B, K, H, W): every term against numpy loops)
    "skd_pixel": (None, None, {}),
    "skd_pairwise": (None, None, {}),
    "skd_holistic": (None, None, {}),
    "knowledge_adaptation": (None, None, {}),
    "ka_autoencoder": (None, None, {}),
    "ifvd": (None, None, {}),
    "cirkd": (None, None, {}),
    "graph_flow": (None, None, {}),
    "graph_flow_paraphraser": (None, None, {}),
    # tests/test_dense_m2.py (detector taps and assignments: every loss against numpy or loops)
    "quantization_mimic": (None, None, {}),
    "adl": (None, None, {}),
    "fgd": (None, None, {}),
    "rank_mimicking": (None, None, {}),
    "pfi": (None, None, {}),
    "ld": (None, None, {}),
    "ld_vlr": (None, None, {}),
    "lgd": (None, None, {}),
    # tests/test_dense_m3.py (Hungarian-matched DETR outputs: brute force over permutations)
    "detrdistill": (None, None, {}),
    # DeiT (issue 15): `token: class` reads the logits; both heads and every weight against numpy in tests/test_vit_deit.py
    "deit": ({"mode": "soft", "token": "class", "T": 2.5, "ce_weight": 0.7, "distill_weight": 0.4,
              "label_smoothing": 0.2}, None, {"T": 1.5, "ce_weight": 0.2, "distill_weight": 0.9, "label_smoothing": 0.4}),
    # KD-MVS (issue 15): depth-probability volumes of multi-view scenes, not logits; every term against loops and
    # closed forms in tests/test_vit_mvs.py
    "kd_mvs": (None, None, {}),
    "mvs_self_sup": (None, None, {}),
    # FD (issue 15): ViT tokens against a teacher's whitened tokens or map; the loss by hand (projector, class token,
    # non-affine LayerNorm, beta) in tests/test_vit_mim.py
    "fd": (None, None, {}),
    # SiT and DearKD (issue 15): slimmed-ViT tokens and a CNN's maps; every term and scale against numpy and hooked
    # tokens in tests/test_vit_slim.py and tests/test_vit_dearkd.py
    "sit_distill": (None, None, {}),
    "dearkd": (None, None, {}),
    # manifold distillation and ViTKD (issue 15): relations of ViT patch tokens, masked generation; every term,
    # weight and mask against plain loops in tests/test_vit_manifold.py and tests/test_vitkd.py
    "manifold_kd": (None, None, {}),
    "vitkd": (None, None, {}),
    # Wavelet KD (issue 16): generated images, not logits; bands and loss against hand Haar in tests/test_gen_wavelet.py
    "wavelet_kd": (None, None, {}),
    # graph methods (issue 16): node embeddings and the graph's edges (batch.edge_index), not logits of a digits batch;
    # LSP against a per-node loop for every kernel, NDR/ADR and HIRE's terms on hand numbers and plain loops in
    # tests/test_graph_lsp.py, tests/test_graph_self_distill.py and tests/test_graph_hire.py
    "lsp": (None, None, {}),
    "gnn_self_distill": (None, None, {}),
    "hire_node": (None, None, {}),
    "hire_relation": (None, None, {}),
    # issue 17 (B): generalized distillation on the digits logits; Phuong & Lampert's binary objective reads one
    # logit per sample (B, 1), not a digits batch: by hand and at its gradient-descent limit in tests/test_i17_B_theory.py
    "generalized_distillation": ({"imitation": 0.3, "T": 2.5}, None, {"imitation": 0.8, "T": 1.5}),
    "linear_soft_ce": (None, None, {}),
    # issue 17 (E): binary-weight KT, feature maps through 1x1 convs where the widths differ; hand numbers in
    # tests/test_i17_E_binary.py
    "binary_kt": ({"pairs": [("stage2", "stage2"), ("stage3", "stage3")]}, None, {}),
    # issue 17 (G): DDL reads the pooled embeddings and needs positive pairs (the rotations batch's targets 1,1,1,1,3,...);
    # every term against numpy in tests/test_i17_G_face.py
    "ddl": ({"pos_kl_weight": 0.3, "neg_kl_weight": 0.07, "order_weight": 0.9, "sigma": 0.2}, "rotations",
            {"pos_kl_weight": 0.8, "neg_kl_weight": 0.5, "order_weight": 0.2, "sigma": 0.05}),
    "neuron_selection": ({"indices": [1, 5, 2]}, None, {"indices": [0, 3, 7]}),
    # issue 17: grid-level ICKD on dense maps; numpy loops and a hand case in tests/test_i17_ickd_grid.py
    "ickd_grid": (None, None, {}),
    # issue 17: EC-KD's exclusivity reads the bound student's weights (a Linear here); hand and numpy numbers in
    # tests/test_i17_eckd.py
    "ec_kd": ({"consistency_weight": 0.7, "exclusivity_weight": 0.3, "hardness": 2.0,
               "student_model": torch.nn.Linear(5, 4)}, None,
              {"consistency_weight": 1.3, "exclusivity_weight": 0.9, "hardness": 0.5}),
}

TRANSFORMS = {"indexed": lambda s, t, b: (s, t, indexed(b)), "rocket": _rocket, "rotations": _rotations,
              "tokens": _tokens}


def test_every_registered_method_is_listed():
    assert set(SETUPS) == {i.name for i in list_methods()}


def _loss(name: str, kwargs: dict) -> torch.Tensor:
    _, transform, _ = SETUPS[name]
    if transform == "hsakd":
        s, t, b = hsakd_views()
    else:
        s, t, b = leaf_views()
        if transform is not None:
            s, t, b = TRANSFORMS[transform](s, t, b)
    torch.manual_seed(0)
    m = create_method(name, **kwargs)
    with torch.no_grad():
        m.prepare(s, t, b)
    m.train()
    return m(s, t, b)


SCALES = [(name, key) for name, (kw, _, scales) in SETUPS.items() if kw is not None for key in scales]


@pytest.mark.parametrize("name,key", SCALES, ids=[f"{n}-{k}" for n, k in SCALES])
def test_every_scale_changes_the_loss(name, key):
    """Each hyper-parameter that scales a term reaches the loss: changing it changes the value."""
    kwargs, _, scales = SETUPS[name]
    base = _loss(name, kwargs).detach()
    other = _loss(name, {**kwargs, key: scales[key]}).detach()
    assert torch.isfinite(base) and torch.isfinite(other)
    assert not math.isclose(float(base), float(other), rel_tol=1e-6, abs_tol=1e-9), (name, key, float(base))



def test_zipf_ls_correct_only_averages_over_the_correct_samples():
    """Liang et al. 2022: with ``correct_only`` the KL(pi || q_hat) over the non-target classes is averaged over
    the samples whose argmax is their label, S, as 1/|S| sum_{b in S} (here |S| = 3 of 6)."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = z.argmax(1).clone()
    y[3:] = (y[3:] + 1) % 5  # samples 0-2 correct, 3-5 wrong
    ranks = 1 + (z.unsqueeze(1) > z.unsqueeze(2)).sum(2)  # [b, k]: 1 + #{j: z_bj > z_bk}
    keep = torch.ones(6, 5, dtype=torch.bool)
    keep[torch.arange(6), y] = False
    pi = ranks.double().pow(-1.3)[keep].view(6, 4)
    pi = pi / pi.sum(1, keepdim=True)
    lq = ref_log_softmax(z[keep].view(6, 4))
    per = (pi * (pi.log() - lq)).sum(1)
    _close(DF.zipf_ls_loss(z, y, ranks, 1.3, correct_only=True), per[:3].sum() / 3, rel=1e-9)
    _close(DF.zipf_ls_loss(z, y, ranks, 1.3), per.mean(), rel=1e-9)
    # one correct sample: its own KL, not halved; none: 0
    _close(DF.zipf_ls_loss(z[2:], y[2:], ranks[2:], 1.3, correct_only=True), per[2], rel=1e-9)
    assert float(DF.zipf_ls_loss(z[3:], y[3:], ranks[3:], 1.3, correct_only=True)) == 0.0


def test_ctkd_reverses_the_temperature_gradient_with_its_curriculum_lambda():
    """Li et al. 2023: theta is trained adversarially, its gradient the KD loss's times -lambda_n, with
    lambda_n = l_min + (l_max - l_min)(1 + cos((1 + min(n, E)/E) pi))/2, n = epoch + 1 (non-default E, l_max, l_min)."""
    s, t, b = leaf_views()
    m = create_method("ctkd", t_min=2.0, t_max=9.0, init_theta=0.3, lambda_max=0.8, lambda_min=0.1,
                      curriculum_epochs=4)
    theta = m.theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(DF.kd_loss(s["logits"], t["logits"].detach(), DF.ctkd_temperature(theta, 2.0, 9.0)),
                               theta)
    for epoch in (None, 1):  # before the first epoch: n = 1; then epoch 1: n = 2 of E = 4
        if epoch is not None:
            m.on_epoch_start(epoch, 10)
        n = 1 if epoch is None else epoch + 1
        lam = 0.1 + 0.7 * (1 + math.cos((1 + n / 4) * math.pi)) / 2
        (g_rev,) = torch.autograd.grad(m(s, t, b), m.theta)
        torch.testing.assert_close(g_rev, -lam * g)


@pytest.mark.parametrize("name", [n for n, (kw, _, _) in SETUPS.items() if kw is not None])
def test_every_method_keeps_the_weight_and_warm_up_it_is_given(name):
    """The Distiller multiplies each loss by ``weight`` and the warm-up factor: a method that drops either
    when handing them to Method.__init__ trains at the wrong strength."""
    kwargs, _, _ = SETUPS[name]
    m = create_method(name, **{**kwargs, "weight": 0.37, "warmup_epochs": 3})
    assert (m.weight, m.warmup_epochs) == (0.37, 3)
    m.on_epoch_start(0, 10)
    assert m.weight_factor() == pytest.approx(1 / 3)
