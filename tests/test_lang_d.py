"""Part D of issue 12: retrieval and vision-language distillation (DiDE, ERNIE-Search, ALADIN, KD-VLP).

Every expected value below is worked out by hand or by a plainly written numpy reference,
independently of distill.functional.retrieval.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _mnist import mnist_dir
from hypothesis import given, settings, strategies as st

from distill.batch import Batch
from distill.functional import retrieval as FR
from distill.methods import create_method, method_info

ROOT = Path(__file__).resolve().parents[1]
BATCH = Batch(torch.zeros(2, 1), None)


# ----------------------------------------------------------------------------- numpy references

def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p||q) per row (last axis), 0 log 0 = 0."""
    out = np.zeros(p.shape[:-1])
    for idx in np.ndindex(*p.shape[:-1]):
        out[idx] = sum(pi * math.log(pi / qi) for pi, qi in zip(p[idx], q[idx]) if pi > 0)
    return out


def np_listwise(s: np.ndarray, t: np.ndarray, T: float) -> float:
    return float(np_kl_rows(np_softmax(t / T), np_softmax(s / T)).mean() * T * T)


# ----------------------------------------------------------------------------- the functional core

def test_listwise_kl_hand_worked():
    # q = softmax([0, ln 3]) = [1/4, 3/4], p = softmax([ln 3, 0]) = [3/4, 1/4]:
    # KL(p||q) = 3/4 ln 3 - 1/4 ln 3 = ln(3)/2.
    s = torch.tensor([[0.0, math.log(3)]])
    t = torch.tensor([[math.log(3), 0.0]])
    assert FR.listwise_kl(s, t, 1.0).item() == pytest.approx(math.log(3) / 2, rel=1e-6)
    # the same distributions at T = 2 (scores doubled), times T^2 = 4
    assert FR.listwise_kl(2 * s, 2 * t, 2.0).item() == pytest.approx(2 * math.log(3), rel=1e-6)
    # a masked third candidate changes nothing
    s3 = torch.tensor([[0.0, math.log(3), 9.0]])
    t3 = torch.tensor([[math.log(3), 0.0, -5.0]])
    mask = torch.tensor([[True, True, False]])
    assert FR.listwise_kl(s3, t3, 1.0, mask=mask).item() == pytest.approx(math.log(3) / 2, rel=1e-6)


def test_late_interaction_hand_worked():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])              # (1, 2, 2)
    d = torch.tensor([[[1.0, 0.0], [1.0, 1.0]],                 # doc 0
                      [[0.0, 2.0], [0.0, 0.0]]])                # doc 1
    # dot products: q·doc0 -> token maxima 1 and 1 -> 2; q·doc1 -> 0 and 2 -> 2
    raw = FR.late_interaction(q, d, normalize=False)
    assert raw.tolist() == [[2.0, 2.0]]
    # cosine: doc0 maxima 1 and 1/sqrt2 ... q0 vs [1,0] = 1; q1 vs [1,1]/sqrt2 = 0.7071 -> 1.7071
    cos = FR.late_interaction(q, d[:1], normalize=True)
    assert cos.item() == pytest.approx(1 + 1 / math.sqrt(2), rel=1e-6)
    # doc mask hides doc0's second token: q1's best is 0 -> 1; mean over query tokens -> 0.5
    dm = torch.tensor([[True, False]])
    assert FR.late_interaction(q, d[:1], doc_mask=dm, normalize=False).item() == pytest.approx(1.0)
    assert FR.late_interaction(q, d[:1], doc_mask=dm, normalize=False, reduce="mean").item() == pytest.approx(0.5)
    qm = torch.tensor([[True, False]])
    assert FR.late_interaction(q, d[1:], query_mask=qm, normalize=False).item() == pytest.approx(0.0)


def test_token_attention_kl_masks_rows_and_keys():
    g = np.random.default_rng(0)
    logits = g.normal(size=(2, 3, 4))
    teacher = np_softmax(g.normal(size=(2, 3, 4)))
    key_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    row_mask = np.array([[1, 0, 1], [1, 1, 0]], bool)
    teacher[0, :, 3] = 0.0
    teacher[0] /= teacher[0].sum(-1, keepdims=True)
    rows = []
    for b in range(2):
        for r in range(3):
            if not row_mask[b, r]:
                continue
            keys = key_mask[b]
            q = np_softmax(logits[b, r][keys])
            rows.append(np_kl_rows(teacher[b, r][keys][None], q[None])[0])
    got = FR.token_attention_kl(torch.tensor(logits), torch.tensor(teacher), torch.tensor(key_mask),
                                torch.tensor(row_mask))
    assert got.item() == pytest.approx(float(np.mean(rows)), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 5), st.floats(0.3, 5.0), st.integers(0, 10_000))
def test_listwise_kl_properties(b, c, T, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, c, generator=g) * 3
    s = torch.randn(b, c, generator=g, requires_grad=True)
    teacher = t.clone().requires_grad_(True)
    loss = FR.listwise_kl(s, teacher, T)
    assert loss.item() >= -1e-6                                         # non-negative
    loss.backward()
    assert teacher.grad is None and s.grad is not None                  # only the student learns
    assert FR.listwise_kl(t + 2.5, t, T).item() == pytest.approx(0.0, abs=1e-5)  # zero at agreement (shift-free)


# ----------------------------------------------------------------------------- the registered methods

def test_aladin_rows_and_columns_against_numpy():
    s = np.array([[0.9, 0.1, -0.3], [0.2, 0.8, 0.0], [-0.1, 0.4, 0.7]])
    t = np.array([[3.0, 1.0, 0.5], [0.0, 2.5, 2.0], [1.0, 0.2, 1.5]])
    T, tT = 0.5, 2.0
    rows = float(np_kl_rows(np_softmax(t / tT), np_softmax(s / T)).mean())
    cols = float(np_kl_rows(np_softmax(t.T / tT), np_softmax(s.T / T)).mean())
    expected = T * T * 0.5 * (rows + cols)
    m = create_method("aladin", T=T, teacher_T=tT)
    got = m({"logits": torch.tensor(s)}, {"logits": torch.tensor(t)}, BATCH)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    rows_only = create_method("aladin", T=T, teacher_T=tT, directions="rows")
    assert rows_only({"logits": torch.tensor(s)}, {"logits": torch.tensor(t)}, BATCH).item() == \
        pytest.approx(T * T * rows, rel=1e-5)


def test_ernie_search_cascade_against_numpy():
    g = np.random.default_rng(1)
    de, late, ce = g.normal(size=(3, 2, 4))
    inter = g.normal(size=(2, 3, 5))
    attn = np_softmax(g.normal(size=(2, 3, 5)) * 2)
    qmask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    T, wc, ws, wi = 2.0, 0.7, 0.3, 0.5
    inter_rows = np_kl_rows(attn, np_softmax(inter))[qmask]
    expected = wc * np_listwise(late, ce, T) + ws * np_listwise(de, late, T) + wi * float(inter_rows.mean())
    m = create_method("ernie_search", ce_weight=wc, self_weight=ws, interaction_weight=wi, T=T,
                      query_mask="qmask")
    sv = {"logits": torch.tensor(de, requires_grad=True), "late_logits": torch.tensor(late, requires_grad=True),
          "interaction": torch.tensor(inter, requires_grad=True)}
    tv = {"logits": torch.tensor(ce), "attention": torch.tensor(attn), "qmask": torch.tensor(qmask)}
    got = m(sv, tv, BATCH)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    # the self term treats the late-interaction distribution as a target: with ce_weight 0 and no
    # interaction, no gradient reaches the late-interaction scores
    sv2 = {k: v.detach().clone().requires_grad_(True) for k, v in sv.items()}
    create_method("ernie_search", ce_weight=0.0, interaction_weight=0.0, T=T)(sv2, tv, BATCH).backward()
    assert sv2["late_logits"].grad is None or float(sv2["late_logits"].grad.abs().max()) == 0.0
    assert float(sv2["logits"].grad.abs().max()) > 0
    # without the cascade the cross-encoder teaches the dual encoder directly
    direct = create_method("ernie_search", student_late_key=None, interaction_weight=0.0, T=T, ce_weight=wc)
    assert direct({"logits": torch.tensor(de)}, tv, BATCH).item() == pytest.approx(wc * np_listwise(de, ce, T),
                                                                                  rel=1e-5)


def test_dide_soft_labels_and_both_attention_directions():
    g = np.random.default_rng(2)
    s, t = g.normal(size=(2, 3, 4))
    q2p_s, q2p_t = g.normal(size=(2, 3, 5)), np_softmax(g.normal(size=(2, 3, 5)))
    p2q_s, p2q_t = g.normal(size=(2, 5, 3)), np_softmax(g.normal(size=(2, 5, 3)))
    T, ws, wa = 3.0, 0.4, 1.5
    expected = ws * np_listwise(s, t, T) + wa * 0.5 * (np_kl_rows(q2p_t, np_softmax(q2p_s)).mean()
                                                      + np_kl_rows(p2q_t, np_softmax(p2q_s)).mean())
    m = create_method("dide", soft_weight=ws, attention_weight=wa, T=T)
    sv = {"logits": torch.tensor(s), "q2p": torch.tensor(q2p_s), "p2q": torch.tensor(p2q_s)}
    tv = {"logits": torch.tensor(t), "q2p": torch.tensor(q2p_t), "p2q": torch.tensor(p2q_t)}
    assert m(sv, tv, BATCH).item() == pytest.approx(float(expected), rel=1e-5)
    # passage padding: the last passage token of example 0 is masked as a key (q2p) and as a row (p2q)
    pm = np.ones((2, 5), bool)
    pm[0, 4] = False
    q2p_t2 = q2p_t.copy()
    q2p_t2[0, :, 4] = 0
    q2p_t2[0] /= q2p_t2[0].sum(-1, keepdims=True)
    kl_q2p = [np_kl_rows(q2p_t2[b][:, pm[b]], np_softmax(q2p_s[b][:, pm[b]])) for b in range(2)]
    kl_p2q = np_kl_rows(p2q_t, np_softmax(p2q_s))[pm]
    expected2 = 0.5 * (np.concatenate(kl_q2p).mean() + kl_p2q.mean())
    m2 = create_method("dide", soft_weight=0.0, passage_mask="pm")
    tv2 = dict(tv, q2p=torch.tensor(q2p_t2), pm=torch.tensor(pm))
    assert m2(sv, tv2, BATCH).item() == pytest.approx(float(expected2), rel=1e-5)


def test_kd_vlp_feature_and_label_terms():
    h = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]])                  # (1, 2, 2)
    f = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])                   # detector features
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])                   # detector class distributions
    m = create_method("kd_vlp", feature_weight=2.0, label_weight=0.5, mask_key="masked")
    sv = {"regions": h, "masked": torch.tensor([[True, True]])}
    tv = {"object_features": f, "object_probs": p}
    m.prepare(sv, tv, BATCH)
    with torch.no_grad():                                           # identity heads: W h = h
        for lin in (m.regressor, m.classifier):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    # feature MSE: ((1-0)^2 + 0 + (0-1)^2 + (-1-1)^2) / 4 = 6/4
    feat = 6 / 4
    q0, q1 = np_softmax(np.array([1.0, 2.0])), np_softmax(np.array([0.0, -1.0]))
    label = (np_kl_rows(np.array([[0.5, 0.5]]), q0[None])[0] + np_kl_rows(np.array([[0.9, 0.1]]), q1[None])[0]) / 2
    assert m(sv, tv, BATCH).item() == pytest.approx(2.0 * feat + 0.5 * label, rel=1e-5)
    # only the first object masked: the mean runs over it alone
    sv1 = dict(sv, masked=torch.tensor([[True, False]]))
    label0 = np_kl_rows(np.array([[0.5, 0.5]]), q0[None])[0]
    assert m(sv1, tv, BATCH).item() == pytest.approx(2.0 * (1 / 2) + 0.5 * label0, rel=1e-5)


def test_registry_papers_and_clear_errors():
    for name, arxiv in (("dide", "2112.08723"), ("ernie_search", "2205.09153"), ("aladin", "2207.14757"),
                        ("kd_vlp", "2109.10504")):
        assert method_info(name).paper.arxiv == arxiv
    with pytest.raises(ValueError, match="temperature"):
        FR.listwise_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        FR.listwise_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(KeyError, match="late_logits"):
        create_method("ernie_search", interaction_weight=0.0)({"logits": torch.zeros(2, 2)},
                                                              {"logits": torch.zeros(2, 2)}, BATCH)
    with pytest.raises(ValueError, match="directions"):
        create_method("aladin", directions="cols")
    with pytest.raises(RuntimeError, match="prepare"):
        create_method("kd_vlp")({"regions": torch.zeros(1, 2, 3)},
                                {"object_features": torch.zeros(1, 2, 4), "object_probs": torch.zeros(1, 2, 5)}, BATCH)


# ----------------------------------------------------------------------------- data

def test_query_passage_split_on_real_docstrings():
    from distill.data.corpus import stdlib_docstrings
    from distill.data.retrieval import query_passage_pairs, split_query

    assert split_query("Return the thing. It is\nlong and  useful.") == ("Return the thing.", "It is long and useful.")
    assert split_query("No period here\n\nSecond paragraph.") == ("No period here", "Second paragraph.")
    pairs = query_passage_pairs(stdlib_docstrings(modules=["json", "textwrap"]), min_passage_words=5)
    assert len(pairs) >= 5
    assert all(len(p.query.split()) >= 4 and len(p.passage.split()) >= 5 for p in pairs)
    assert len({p.query.lower() for p in pairs}) == len(pairs)


# ----------------------------------------------------------------------------- examples (smoke)

def _example(name: str):
    path = ROOT / "examples" / "language" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"lang_d_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_kd_vlp_example_quick(monkeypatch):
    root = mnist_dir()
    if root is None:
        pytest.skip("MNIST not found beside the repository (../shared/data/mnist) nor in DISTILL_MNIST")
    monkeypatch.setenv("DISTILL_MNIST", str(root))  # the example reads the default root, wherever pytest runs
    res = _example("kd_vlp").main(["--quick"])
    for key in ("student, ITM + MLM", "student + kd_vlp"):
        assert 0.0 <= res[key]["itm_accuracy"] <= 1.0
    assert 0.0 <= res["student + kd_vlp"]["masked_object_accuracy"] <= 1.0


def test_retrieval_example_quick():
    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    try:
        from distill.integrations.minilm import minilm_dir

        minilm_dir()
    except ImportError as e:
        pytest.skip(str(e))
    res = _example("retrieval").main(["--quick"])
    rows = res["rows"]
    assert set(rows) == {"teacher (MiniLM-L6, late interaction)", "student, contrastive only", "student + dide",
                         "student + ernie_search", "student + aladin"}
    assert all(0.0 <= r["ndcg"] <= 1.0 for r in rows.values())
    assert res["encode_student_s"] > 0 and res["encode_teacher_s"] > 0
