"""Part B2 of issue 12: C-MLM distillation (Chen et al. 2020), kNN-KD (Yang et al. 2022) and noisy
self-KD (Liu et al. 2021), checked against numbers computed here with numpy or plain loops."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill
from distill.batch import TokenBatch
from distill.data.token_noise import noise_tokens
from distill.functional.knn import knn_distribution, knn_search
from distill.functional.seq2seq_kd import soft_target_token_loss
from distill.methods.cmlm import CMLMKD, CMLMTeacher, cmlm_inputs, cmlm_mlm_inputs
from distill.methods.knn_kd import KNNKD, KNNDatastore, KNNTeacher
from distill.methods.noisy_self_kd import NoisyInput, NoisySelfKD, NoisyTeacher

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ references (numpy, by the formulas)
def np_softmax(x, T=1.0):
    z = x / T
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def reference_loss(s, t, labels, *, kd, ce, teacher_T, student_T, scale, causal=False):
    """Mean over labelled tokens of kd·scale·Σ p(log p − log q) + ce·(−log softmax(s)[y])."""
    s, t, labels = s.astype(np.float64), t.astype(np.float64), labels
    total, n = 0.0, 0
    B, L, _ = s.shape
    for b in range(B):
        for i in range(L):
            y = (labels[b, i + 1] if i + 1 < L else -100) if causal else labels[b, i]
            if y == -100:
                continue
            p, q = np_softmax(t[b, i], teacher_T), np_softmax(s[b, i], student_T)
            kl = sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q) if pv > 0)
            nll = -math.log(np_softmax(s[b, i])[y])
            total += kd * scale * kl + ce * nll
            n += 1
    return total / n


def tiny_bart(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                                  dropout=dropout, attention_dropout=0.0, activation_dropout=0.0)
    return transformers.BartForConditionalGeneration(cfg).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64, type_vocab_size=2)
    return transformers.BertForMaskedLM(cfg).eval()


def seq2seq_batch(seed=0, index=(0, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    B = len(index)
    src = torch.randint(5, 40, (B, 6), generator=g)
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[1, 4:] = 0
    src[1, 4:] = 0
    labels = torch.randint(5, 40, (B, 4), generator=g)
    labels[0, 3] = -100
    dec = torch.full_like(labels, 0)
    dec[:, 0] = 2
    dec[:, 1:] = labels[:, :-1].clamp_min(0)
    return TokenBatch(src, labels, torch.tensor(index), model_kwargs={"attention_mask": mask, "decoder_input_ids": dec})


# ------------------------------------------------------------------ the shared soft-target loss
@pytest.mark.parametrize("causal", [False, True])
def test_soft_target_loss_matches_numpy(causal):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    t = torch.randn(2, 4, 6, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([[3, 1, -100, 5], [0, 2, 4, -100]])
    got = soft_target_token_loss(s, t, labels, kd=0.7, ce=0.3, teacher_T=2.0, student_T=1.5, scale=3.0, causal=causal)
    ref = reference_loss(s.numpy(), t.numpy(), labels.numpy(), kd=0.7, ce=0.3, teacher_T=2.0, student_T=1.5,
                         scale=3.0, causal=causal)
    assert float(got) == pytest.approx(ref, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 5.0))
def test_soft_target_loss_properties(seed, T):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 2], [4, 0, -100]])
    loss = soft_target_token_loss(s, t, labels, kd=1.0, teacher_T=T, student_T=T)
    assert float(loss.detach()) >= -1e-12                                        # KL is non-negative
    loss.backward()
    assert t.grad is None                                               # the teacher is a target
    assert s.grad[0, 1].abs().sum() == 0 and s.grad[1, 2].abs().sum() == 0   # unlabelled rows get nothing
    same = soft_target_token_loss(t.detach(), t.detach(), labels, kd=1.0, teacher_T=T, student_T=T)
    assert abs(float(same)) < 1e-12                                     # zero at agreement


def test_soft_target_loss_rejects_bad_values():
    s = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="kd"):
        soft_target_token_loss(s, s, torch.tensor([[0, 1]]), kd=-1.0)
    with pytest.raises(ValueError, match="teacher_T"):
        soft_target_token_loss(s, s, torch.tensor([[0, 1]]), teacher_T=0.0)
    with pytest.raises(ValueError, match="labels"):
        soft_target_token_loss(s, s, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="both 0"):
        CMLMKD(kd=0.0, ce=0.0)


# ------------------------------------------------------------------ C-MLM (row 12)
def test_cmlm_kd_tempers_the_teacher_only():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g) * 3
    labels = torch.tensor([[1, 2, -100], [6, 0, 3]])
    batch = TokenBatch(torch.zeros(2, 2, dtype=torch.long), labels)
    got = CMLMKD(kd=0.6, ce=0.4, T=3.0)({"logits": s}, {"logits": t}, batch)
    ref = reference_loss(s.numpy(), t.numpy(), labels.numpy(), kd=0.6, ce=0.4, teacher_T=3.0, student_T=1.0, scale=1.0)
    assert float(got) == pytest.approx(ref, rel=1e-5)
    assert distill.methods.base.method_info("cmlm_kd").paper.arxiv == "1911.03829"


def test_cmlm_inputs_pack_by_hand():
    src = torch.tensor([[11, 12, 13], [21, 22, 0]])
    smask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    tgt = torch.tensor([[31, 32], [41, -100]])
    masked = torch.tensor([[False, True], [True, False]])
    inputs, pos = cmlm_inputs(src, smask, tgt, masked, cls_id=101, sep_id=102, mask_id=103, pad_id=0)
    assert inputs["input_ids"].tolist() == [[101, 11, 12, 13, 102, 31, 103, 102],
                                            [101, 21, 22, 102, 103, 102, 0, 0]]
    assert inputs["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0, 0]]
    assert pos.tolist() == [[5, 6], [4, -1]]
    with pytest.raises(ValueError, match="contiguous"):
        cmlm_inputs(src, smask, torch.tensor([[-100, 3], [4, 5]]), masked, cls_id=1, sep_id=2, mask_id=3)
    inputs, mlm = cmlm_mlm_inputs(src, smask, tgt, mask_prob=0.5, cls_id=101, sep_id=102, mask_id=103,
                                  generator=torch.Generator().manual_seed(0))
    hidden = inputs["input_ids"] == 103
    assert hidden.any(1).all() and bool(((mlm != -100) == hidden).all())
    assert bool((inputs["token_type_ids"][hidden] == 1).all())          # only target tokens are hidden
    assert mlm[0][hidden[0]].tolist() == [t for t, h in zip([31, 32], hidden[0, 5:7].tolist()) if h]
    assert mlm[1][hidden[1]].tolist() == [41]


@pytest.mark.parametrize("rounds", [None, 2])
def test_cmlm_teacher_reads_each_position_with_its_group_masked(rounds):
    bert = tiny_bert()
    batch = seq2seq_batch()
    view = CMLMTeacher(bert, cls_id=3, sep_id=4, mask_id=1, rounds=rounds, top_k=None)(batch)["logits"]
    labels = batch.targets
    for b in range(3):
        src = [int(x) for x, m in zip(batch.inputs[b], batch.attention_mask[b]) if m]
        tgt = [int(x) for x in labels[b] if x != -100]
        for t in range(len(tgt)):
            group = [t] if rounds is None else [j for j in range(len(tgt)) if j % rounds == t % rounds]
            row = [3] + src + [4] + [1 if j in group else y for j, y in enumerate(tgt)] + [4]
            types = [0] * (len(src) + 2) + [1] * (len(tgt) + 1)
            with torch.no_grad():
                ref = bert(input_ids=torch.tensor([row]), token_type_ids=torch.tensor([types])).logits[0]
            torch.testing.assert_close(view[b, t], ref[len(src) + 2 + t], atol=1e-5, rtol=1e-5)
    assert view[0, 3].abs().sum() == 0                                   # an unlabelled row stays 0


def test_cmlm_teacher_top_k_and_distiller_step():
    bert, bart = tiny_bert(), tiny_bart()
    teacher = CMLMTeacher(bert, cls_id=3, sep_id=4, mask_id=1, top_k=5)
    batch = seq2seq_batch()
    t = teacher(batch)["logits"]
    assert (torch.isfinite(t[batch.targets != -100]).sum(-1) == 5).all()
    before = [p.clone() for p in bert.parameters()]
    d = distill.Distiller(bart, teacher, losses={"cmlm_kd": CMLMKD(T=2.0)})
    bart.train()
    out = d(batch)
    out.total.backward()
    assert all(p.grad is not None for p in bart.parameters() if p.requires_grad and p.dim() > 1)
    assert all(torch.equal(a, b) for a, b in zip(before, bert.parameters())) and not bert.training


# ------------------------------------------------------------------ kNN-KD (row 14)
def test_knn_search_and_distribution_by_hand():
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    d, i = knn_search(torch.tensor([[0.0, 0.0], [1.0, 0.9]]), keys, 2, exclude=torch.tensor([0, -1]))
    assert i.tolist() == [[1, 2], [1, 0]]
    torch.testing.assert_close(d, torch.tensor([[1.0, 4.0], [0.81, 1.81]]))
    p = knn_distribution(torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[3, 3, 1]]), 5, temperature=2.0)
    e = [math.exp(-0.5), math.exp(-1.0), math.exp(-2.0)]
    z = sum(e)
    torch.testing.assert_close(p[0], torch.tensor([0, e[2] / z, 0, (e[0] + e[1]) / z, 0]))
    with pytest.raises(ValueError, match="k=5"):
        knn_search(keys, keys, 5)


def _loader(batches):
    return [{"input_ids": b.inputs, "labels": b.targets, "index": b.index, **b.model_kwargs} for b in batches]


def test_knn_datastore_teacher_and_loss(tmp_path):
    bart = tiny_bart(seed=1)
    batches = [seq2seq_batch(0, (0, 1, 2)), seq2seq_batch(1, (3, 4, 5))]
    ds = KNNDatastore.build(bart, _loader(batches), causal=False)
    assert len(ds) == 22                                                # 2 × 12 target tokens, one -100 each
    path = ds.precompute(4).save(tmp_path / "ds.safetensors")
    with pytest.raises(FileExistsError):
        ds.save(path)
    loaded = KNNDatastore.load(path)
    torch.testing.assert_close(loaded.keys, ds.keys)
    assert torch.equal(loaded.neighbours, ds.neighbours) and loaded.causal is False

    batch = batches[1]
    view = KNNTeacher(loaded, 40, k=3, T=5.0)(batch)["logits"]
    again = KNNTeacher(KNNDatastore(ds.keys, ds.values, ds.sample, ds.position, causal=False), 40, k=3, T=5.0)(batch)
    torch.testing.assert_close(view, again["logits"])                   # precomputed = searched now
    # reference: sequence 4 (row 1 of the batch), position 2, by numpy over the stored keys
    with torch.no_grad():
        out = bart(**batch.model_inputs(), output_hidden_states=True)
    h = out.decoder_hidden_states[-1].numpy()
    keys, values = ds.keys.numpy(), ds.values.numpy()
    q = h[1, 2]
    dist = ((keys - q) ** 2).sum(1)
    self_j = int(np.argmin(dist))
    assert dist[self_j] < 1e-8                                          # the token itself is in the store ...
    dist[self_j] = np.inf                                               # ... and excluded
    near = np.argsort(dist)[:3]
    w = np.exp(-dist[near] / 5.0)
    w /= w.sum()
    ref = np.zeros(40)
    np.add.at(ref, values[near], w)
    np.testing.assert_allclose(view[1, 2].exp().numpy(), ref, atol=1e-5)

    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 40, generator=g)
    got = KNNKD(kd=0.8, ce=0.2)({"logits": s}, {"logits": view}, batch)
    ref_loss = reference_loss(s.numpy(), view.numpy(), batch.targets.numpy(), kd=0.8, ce=0.2, teacher_T=1.0,
                              student_T=1.0, scale=1.0)
    assert float(got) == pytest.approx(ref_loss, rel=1e-5)

    stranger = seq2seq_batch(2, (9, 10, 11))
    with pytest.raises(KeyError, match="no datastore entry"):
        KNNTeacher(loaded, 40, k=3)(stranger)


# ------------------------------------------------------------------ noisy self-KD (row 18)
def test_noise_tokens_drop_replace_and_sentences():
    ids = torch.tensor([[1, 10, 11, 9, 12, 13, 9, 2, 0, 0]])
    mask = (ids != 0).long()
    same, m = noise_tokens(ids, mask)
    assert torch.equal(same, ids) and torch.equal(m, mask)
    g = torch.Generator().manual_seed(0)
    out, m = noise_tokens(ids, mask, sentence_drop=0.5, sentence_end=(9,), keep=(1, 2), generator=g)
    kept = out[0][m[0].bool()].tolist()
    # sentences [1 10 11 9] [12 13 9] [2]; 1 and 2 are kept; both dropped leaves the first content token
    assert kept in ([1, 12, 13, 9, 2], [1, 10, 11, 9, 2], [1, 10, 11, 9, 12, 13, 9, 2], [1, 10, 2])
    out, m = noise_tokens(ids, mask, drop=0.99, keep=(1, 2), generator=g)
    kept = out[0][m[0].bool()].tolist()
    assert kept[0] == 1 and kept[-1] == 2 and len(kept) == 3             # one content token always survives
    out, m = noise_tokens(ids, mask, replace=0.99, vocab_size=20, keep=(0, 1, 2), generator=g)
    assert out[0, 0] == 1 and out[0, 7] == 2 and not torch.isin(out[0, 1:7], torch.tensor([0, 1, 2])).any()
    assert (out[0, 1:7] != ids[0, 1:7]).sum() >= 3
    with pytest.raises(ValueError, match="drop"):
        noise_tokens(ids, mask, drop=1.5)


def test_noisy_teacher_dropout_and_frozen_copy():
    bart = tiny_bart(dropout=0.5)
    batch = seq2seq_batch()
    noisy = NoisyTeacher(bart, dropout=True, seed=0)
    a, b = noisy(batch)["logits"], noisy(batch)["logits"]
    assert not torch.allclose(a, b)                                       # dropout is on in the teacher
    clean = NoisyTeacher(bart, dropout=False)
    torch.testing.assert_close(clean(batch)["logits"], clean(batch)["logits"])
    assert not noisy.model.training and all(not p.requires_grad for p in noisy.model.parameters())
    assert all(p.requires_grad for p in bart.parameters())               # the given model is not frozen
    live = NoisyTeacher(bart, copy_model=False, dropout=False)
    bart.train()
    live(batch)
    assert bart.training and all(p.requires_grad for p in bart.parameters())
    assert not list(live.parameters())                                   # not registered twice


def test_noisy_self_kd_loss_and_step():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    labels = torch.tensor([[1, 2, -100], [6, 0, 3]])
    batch = TokenBatch(torch.zeros(2, 2, dtype=torch.long), labels)
    got = NoisySelfKD(kd=0.3, ce=0.9, T=2.0)({"logits": s}, {"logits": t}, batch)
    ref = reference_loss(s.numpy(), t.numpy(), labels.numpy(), kd=0.3, ce=0.9, teacher_T=2.0, student_T=2.0, scale=4.0)
    assert float(got) == pytest.approx(ref, rel=1e-5)

    bart = tiny_bart(dropout=0.2)
    student = NoisyInput(tiny_bart(seed=3, dropout=0.2), drop=0.2, replace=0.2)
    d = distill.Distiller(student, NoisyTeacher(bart), losses={"noisy_self_kd": NoisySelfKD()})
    student.train()
    seen = []
    h = student.model.model.encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()),
                                                              with_kwargs=True)
    b = seq2seq_batch()
    d(b).total.backward()
    h.remove()
    assert not torch.equal(seen[-1][:, :b.inputs.shape[1]], b.inputs)     # the student read a noisy source
    assert student.model.model.shared.weight.grad is not None


def test_registry_lists_the_three():
    infos = {i.name: i for i in distill.methods.base.list_methods("seq2seq")}
    assert infos["knn_kd"].paper.arxiv == "2205.00479" and infos["knn_kd"].paper.year == 2022
    assert infos["noisy_self_kd"].paper.arxiv == "2009.07032" and infos["noisy_self_kd"].paper.venue == "NAACL"
    assert infos["cmlm_kd"].defaults["T"] == 10.0


def test_example_quick():
    path = ROOT / "examples" / "language" / "seq2seq_self_knn.py"
    spec = importlib.util.spec_from_file_location("seq2seq_self_knn_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick"])
    assert {r[0] for r in rows} >= {"ce only", "cmlm_kd", "knn_kd", "noisy_self_kd"}
