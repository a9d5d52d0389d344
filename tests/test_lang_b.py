"""Part B of issue 12: seq2seq data, Kim & Rush's seq_kd, Liu et al.'s search_kd, Duan et al.'s teaching_attention."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill import Distiller
from distill.batch import as_batch
from distill.data.seq2seq import (IGNORE_INDEX, byte_tokenizer, encode_seq2seq, first_sentence, seq2seq_loader,
                                  shift_right, summary_pairs)
from distill.functional.seq2seq import masked_token_kl, relay_top_k, teaching_attention_loss
from distill.methods.base import method_info
from distill.methods.seq2seq import ExploredBatch, SearchKD, TeachingAttention
from distill.strategies.registry import strategy_info
from distill.strategies.search_kd import Exploration, explore
from distill.strategies.sequence_kd import sequence_kd_pairs
from distill.teachers import EnsembleTeacher

pytest.importorskip("transformers")

from distill.models.seq2seq import tiny_t5  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("Return the number of items. The container may be a list.", "Return the number of items."),
         ("Open a file and return a stream. Raise OSError on failure.", "Open a file and return a stream."),
         ("Split the string at sep. Return a 3-tuple.", "Split the string at sep."),
         ("Wait for a signal. Suspend the calling thread.", "Wait for a signal.")]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------- data


def test_first_sentence_and_pairs():
    assert first_sentence("Do this.  Then\nthat.") == ("Do this.", "Then\nthat.")
    assert first_sentence("No end here") == ("No end here", "")
    pairs = summary_pairs(["Compute the sum of values. It adds them one\nby one, left to right."], min_target_chars=5)
    assert pairs == [("Compute the sum of values. It adds them one by one, left to right.", "Compute the sum of values.")]
    pairs = summary_pairs(["Compute the sum of values. It adds them one\nby one, left to right."], keep_lead=False,
                          min_target_chars=5, min_source_chars=10)
    assert pairs == [("It adds them one by one, left to right.", "Compute the sum of values.")]
    with pytest.raises(ValueError, match="max_target_chars"):
        summary_pairs(["x"], min_target_chars=10, max_target_chars=5)


def test_loader_batches_are_hf_seq2seq():
    tok = byte_tokenizer()
    loader = seq2seq_loader(PAIRS, tok, 3, 64, 40, shuffle=False)
    b = next(iter(loader))
    src = list(tok(PAIRS[0][0])["input_ids"])  # bytes + EOS
    assert b["input_ids"][0, :len(src)].tolist() == src and int(b["attention_mask"][0].sum()) == len(src)
    tgt = list(tok(PAIRS[0][1], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    assert b["labels"][0, :len(tgt)].tolist() == tgt and bool((b["labels"][0, len(tgt):] == IGNORE_INDEX).all())
    assert b["decoder_input_ids"][0, 0] == 0 and b["decoder_input_ids"][0, 1:len(tgt)].tolist() == tgt[:-1]
    tb = as_batch(b)
    assert tb.targets is b["labels"] and "decoder_input_ids" in tb.model_kwargs and "labels" not in tb.model_kwargs
    assert len(loader) == 2 and sum(len(x["index"]) for x in loader) == 4
    with pytest.raises(TypeError, match="pair 0"):
        encode_seq2seq(tok, [("only one",)], 8, 8)


def test_shift_right():
    labels = torch.tensor([[5, 6, 1, -100], [7, 1, -100, -100]])
    assert shift_right(labels, 0, 0).tolist() == [[0, 5, 6, 1], [0, 7, 1, 0]]


# ------------------------------------------------------------------------------------- Duan et al.


def test_teaching_attention_loss_against_numpy():
    rng = np.random.default_rng(3)
    B, Hs, Ht, T, S = 2, 2, 3, 4, 5
    a_s = _softmax(rng.normal(size=(B, Hs, T, S)) * 2)
    a_t = _softmax(rng.normal(size=(B, Ht, T, S)) * 2)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    diff = (a_s.mean(1) - a_t.mean(1)) * mask[..., None]
    want = math.sqrt((diff ** 2).sum()) / mask.sum()
    got = teaching_attention_loss(torch.tensor(a_s), torch.tensor(a_t), torch.tensor(mask))
    assert float(got) == pytest.approx(want, rel=1e-6)
    # the authors' sparse target: 0.3 at each teacher row's 3 largest source positions
    tm = a_t.mean(1)
    sparse = np.zeros_like(tm)
    for b in range(B):
        for t in range(T):
            sparse[b, t, np.argsort(-tm[b, t])[:3]] = 0.3
    diff = (a_s.mean(1) - sparse) * mask[..., None]
    got = teaching_attention_loss(torch.tensor(a_s), torch.tensor(a_t), torch.tensor(mask), top_k=3, top_value=0.3)
    assert float(got) == pytest.approx(math.sqrt((diff ** 2).sum()) / mask.sum(), rel=1e-6)
    assert relay_top_k(torch.tensor([[0.1, 0.5, 0.4]]), 1, 1.0).tolist() == [[0.0, 1.0, 0.0]]


def test_masked_token_kl_against_numpy():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6)) * 2
    mask = np.array([[1, 0, 1], [1, 1, 0]], bool)
    T = 2.0
    p, q = _softmax(t / T), _softmax(s / T)
    kl = (p * (np.log(p) - np.log(q))).sum(-1) * T * T
    want = (kl * mask).sum() / mask.sum()
    got = masked_token_kl(torch.tensor(s), torch.tensor(t), torch.tensor(mask), T)
    assert float(got) == pytest.approx(want, rel=1e-6)


def _views(seed: int, B=2, T=3, S=4, V=7, H=2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    sa = torch.softmax(torch.randn(B, H, T, S, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    ta = torch.softmax(torch.randn(B, H, T, S, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, -1] = IGNORE_INDEX
    return s, t, sa, ta, labels


def test_teaching_attention_method_weights_both_terms():
    s, t, sa, ta, labels = _views(0)
    batch = as_batch({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels})
    m = TeachingAttention(generation=0.7, attention=2.5, layer=-1, T=1.5)
    assert m.student_taps == ["cross_attentions.-1"] and m.teacher_taps == ["cross_attentions.-1"]
    got = m({"logits": s, "cross_attentions.-1": sa}, {"logits": t, "cross_attentions.-1": ta}, batch)
    # reference written plainly
    mask = labels != IGNORE_INDEX
    p, lq = torch.softmax(t / 1.5, -1), torch.log_softmax(s.detach() / 1.5, -1)
    kl = ((p * (p.log() - lq)).sum(-1) * 1.5 ** 2 * mask).sum() / mask.sum()
    att = (((sa.detach().mean(1) - ta.mean(1)) * mask[..., None]) ** 2).sum().sqrt() / mask.sum()
    assert float(got.detach()) == pytest.approx(float(0.7 * kl + 2.5 * att), rel=1e-6)
    got.backward()
    assert sa.grad is not None and s.grad is not None
    with pytest.raises(KeyError, match="cross_attentions.-1"):
        m({"logits": s}, {"logits": t, "cross_attentions.-1": ta}, batch)
    with pytest.raises(ValueError, match="top_k"):
        TeachingAttention(top_k=0)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_teaching_attention_zero_at_agreement_and_nonnegative(seed):
    s, t, sa, ta, labels = _views(seed)
    batch = as_batch({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels})
    m = TeachingAttention(generation=1.0, attention=1.0)
    same = m({"logits": s, "cross_attentions.-1": sa}, {"logits": s.detach(), "cross_attentions.-1": sa.detach()},
             batch)
    assert abs(float(same.detach())) < 1e-9
    same.backward()  # the norm's gradient at 0 is defined (no nan)
    assert bool(torch.isfinite(sa.grad).all())
    assert float(m({"logits": s, "cross_attentions.-1": sa}, {"logits": t, "cross_attentions.-1": ta}, batch).detach()) > 0


def test_teaching_attention_on_tiny_t5_reads_cross_attention():
    tok = byte_tokenizer()
    student, teacher = tiny_t5(len(tok), d_model=32, heads=2, seed=1), tiny_t5(len(tok), d_model=48, heads=4, seed=2)
    batch = next(iter(seq2seq_loader(PAIRS, tok, 2, 64, 40, shuffle=False)))
    d = Distiller(student, teacher, {"teaching_attention": {"generation": 0.0, "attention": 1.0}})
    out = d(batch)
    with torch.no_grad():
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
        a_s = student(**kw, output_attentions=True).cross_attentions[-1]
        a_t = teacher(**kw, output_attentions=True).cross_attentions[-1]
    want = teaching_attention_loss(a_s, a_t, batch["labels"] != IGNORE_INDEX)
    assert float(out.parts["teaching_attention"]) == pytest.approx(float(want), rel=1e-5)
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------------- Liu et al.


def test_search_kd_loss_against_plain_reference():
    s, t, _, _, labels = _views(5, B=3)
    s = s.detach()  # the reference sums floats: no graph is needed here
    explored = torch.tensor([False, True, False])
    batch = ExploredBatch(torch.zeros(3, 4, dtype=torch.long), labels, explored=explored)
    got = SearchKD(kd=0.6, ce=1.7)({"logits": s}, {"logits": t}, batch)
    mask = labels != IGNORE_INDEX
    total, n = 0.0, int(mask.sum())
    for b in range(3):
        for k in range(labels.shape[1]):
            if not mask[b, k]:
                continue
            p, lq = torch.softmax(t[b, k], -1), torch.log_softmax(s[b, k], -1)
            total += 0.6 * float((p * (p.log() - lq)).sum())
            if not explored[b]:
                total += 1.7 * float(-lq[labels[b, k]])
    assert float(got.detach()) == pytest.approx(total / n, rel=1e-6)
    # a plain batch is all reference rows
    plain = as_batch({"input_ids": torch.zeros(3, 4, dtype=torch.long), "labels": labels})
    ref = SearchKD(kd=0.0, ce=1.0)({"logits": s}, {"logits": t}, plain)
    lq = torch.log_softmax(s, -1)
    want = -lq[mask].gather(-1, labels[mask].unsqueeze(-1)).sum() / n
    assert float(ref) == pytest.approx(float(want), rel=1e-6)


def test_ensemble_exploration_samples_from_averaged_distribution():
    tok = byte_tokenizer()
    members = [tiny_t5(len(tok), d_model=32, seed=11), tiny_t5(len(tok), d_model=32, seed=12)]
    ens = EnsembleTeacher(members, combine="probs")
    batch = as_batch(next(iter(seq2seq_loader(PAIRS[:2], tok, 2, 64, 40, shuffle=False))))
    out = explore(ens, batch, max_new_tokens=5, generator=torch.Generator().manual_seed(0), eos_token_id=1,
                  pad_token_id=0, decoder_start_token_id=0)
    # replay the draws by hand: the mean of the two members' softmaxes, torch.multinomial with the same seed
    g = torch.Generator().manual_seed(0)
    prefix = torch.zeros(2, 1, dtype=torch.long)
    done = torch.zeros(2, dtype=torch.bool)
    want = []
    with torch.no_grad():
        for _ in range(out.targets.shape[1]):
            probs = sum(torch.softmax(m(input_ids=batch.inputs, attention_mask=batch.attention_mask,
                                        decoder_input_ids=prefix).logits[:, -1], -1) for m in members) / 2
            tok_ = torch.multinomial(probs, 1, generator=g).squeeze(1)
            want.append(torch.where(done, torch.full_like(tok_, IGNORE_INDEX), tok_))
            done = done | (tok_ == 1)
            prefix = torch.cat([prefix, torch.where(done, torch.zeros_like(tok_), tok_)[:, None]], 1)
    assert out.targets.tolist() == torch.stack(want, 1).tolist()
    assert out.model_kwargs["decoder_input_ids"].tolist() == shift_right(out.targets, 0, 0).tolist()
    both = Exploration(ens, mode="both", max_new_tokens=5, eos_token_id=1, pad_token_id=0,
                       decoder_start_token_id=0)(batch)
    assert len(both) == 4 and both.explored.tolist() == [False, False, True, True]
    assert both.targets[:2, :batch.targets.shape[1]].tolist() == batch.targets.tolist()


# ------------------------------------------------------------------------------------- Kim & Rush


def test_sequence_kd_pairs_pick_top_beam_or_closest_to_gold(tmp_path):
    tok = byte_tokenizer()
    teacher = tiny_t5(len(tok), d_model=32, seed=3)
    pairs = PAIRS[:2]
    seq = sequence_kd_pairs(teacher, tok, pairs, tmp_path / "s.jsonl", mode="sequence", beam_size=3, max_new_tokens=6)
    inter = sequence_kd_pairs(teacher, tok, pairs, tmp_path / "i.jsonl", mode="interpolation", beam_size=3,
                              max_new_tokens=6)
    from distill.generations import load_generations, word_bleu

    beams = load_generations(tmp_path / "i.jsonl").completions
    top = load_generations(tmp_path / "s.jsonl").completions
    assert [s for s, _ in seq] == [s for s, _ in pairs]
    assert [t for _, t in seq] == [b[0] for b in top]
    for (_, gold), (_, chosen), hyps in zip(pairs, inter, beams):
        scores = [word_bleu(h, gold) for h in hyps]
        assert chosen == hyps[int(np.argmax(scores))]


def test_sequence_kd_pairs_interpolation_on_fixed_beams(tmp_path, monkeypatch):
    import distill.strategies.sequence_kd as skd

    beams = [["the cat sat", "a dog ran on the mat", "the dog ran on the mat"],
             ["open it now", "open the file and read", "close the file"]]
    gold = ["the dog ran on the mat today", "open the file and read it"]
    monkeypatch.setattr(skd, "generate", lambda *a, **k: None)
    monkeypatch.setattr(skd, "load_generations", lambda path: beams)
    pairs = [("src one", gold[0]), ("src two", gold[1])]
    inter = skd.sequence_kd_pairs(None, None, pairs, tmp_path / "x", mode="interpolation", beam_size=3)
    # by hand: BLEU ranks "the dog ran on the mat" (6 of 7 gold words in order) and "open the file and read" first
    assert inter == [("src one", "the dog ran on the mat"), ("src two", "open the file and read")]
    seq = skd.sequence_kd_pairs(None, None, pairs, tmp_path / "x", mode="sequence", beam_size=3)
    assert seq == [("src one", "the cat sat"), ("src two", "open it now")]


def test_registered_with_papers():
    assert strategy_info("seq_kd").paper.arxiv == "1606.07947"
    assert strategy_info("search_kd").paper.arxiv == "1805.11224"
    assert method_info("search_kd").paper.arxiv == "1805.11224"
    info = method_info("teaching_attention")
    assert info.paper.year == 2019 and info.defaults["attention"] == 1.0


def test_seq_kd_rejects_bad_mode():
    from distill.strategies.sequence_kd import seq_kd

    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="mode"):
        seq_kd(tiny_t5(len(tok), d_model=32), PAIRS, teacher=tiny_t5(len(tok), d_model=32), tokenizer=tok, epochs=1,
               mode="beam")


def test_example_quick_runs():
    path = ROOT / "examples" / "language" / "seq2seq_kd.py"
    spec = importlib.util.spec_from_file_location("seq2seq_kd_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.main(["--quick"])
    assert "search_kd both, 2-teacher ensemble (Liu et al. 2018)" in results
