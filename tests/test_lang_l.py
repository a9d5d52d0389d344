"""Issue 12, follow-up L: the cached exploration of search_kd, tiny Marian, the BPE tokenizer and the
caption masking helpers used by the seq2seq and KD-VLP examples."""

from __future__ import annotations

import pytest
import torch

from distill import Distiller
from distill.batch import as_batch
from distill.data.captions import CAPTION_VOCAB, MASK_ID, caption_ids, digit_positions
from distill.data.seq2seq import IGNORE_INDEX, byte_tokenizer, seq2seq_loader
from distill.functional.seq2seq import teaching_attention_loss
from distill.strategies.search_kd import explore
from distill.teachers import EnsembleTeacher, FrozenTeacher

pytest.importorskip("transformers")

from distill.models.seq2seq import tiny_marian, tiny_t5  # noqa: E402

PAIRS = [("Return the number of items. The container may be a list.", "Return the number of items."),
         ("Open a file and return a stream. Raise OSError on failure.", "Open a file and return a stream."),
         ("Wait. Suspend the calling thread.", "Wait.")]


def _batch(tok, pairs=PAIRS):
    return as_batch(next(iter(seq2seq_loader(pairs, tok, len(pairs), 64, 40, shuffle=False))))


@pytest.mark.parametrize("make", [tiny_t5, tiny_marian])
@pytest.mark.parametrize("kind", ["ensemble", "single"])
def test_cached_exploration_equals_full_prefix_reruns(make, kind):
    torch.manual_seed(0)
    tok = byte_tokenizer()
    if kind == "ensemble":
        teacher = EnsembleTeacher([make(len(tok), d_model=32, seed=1), make(len(tok), d_model=32, seed=2)],
                                  combine="probs", temperature=1.7, weights=[0.3, 0.7])
    else:
        teacher = FrozenTeacher(make(len(tok), d_model=32, seed=3))
    batch = _batch(tok)
    kw = dict(max_new_tokens=30, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0, temperature=0.6)
    fast = explore(teacher, batch, generator=torch.Generator().manual_seed(4), **kw)
    slow = explore(teacher, batch, generator=torch.Generator().manual_seed(4), use_cache=False, **kw)
    assert fast.targets.tolist() == slow.targets.tolist()
    assert fast.model_kwargs["decoder_input_ids"].tolist() == slow.model_kwargs["decoder_input_ids"].tolist()
    # a random model rarely stops: some rows run the whole length, so many steps were compared
    assert fast.targets.shape[1] > 5
    # and the distributions themselves agree at every step of the sampled prefixes
    from distill.strategies.search_kd import _cached_members, _CachedSteps
    kwargs = {k: v for k, v in batch.model_kwargs.items() if not k.startswith("decoder_")}
    steps = _CachedSteps(*_cached_members(teacher), batch, kwargs)
    prefix = fast.model_kwargs["decoder_input_ids"]
    with torch.no_grad():
        full = teacher(batch.__class__(batch.inputs, batch.targets, batch.index,
                                       model_kwargs={**kwargs, "decoder_input_ids": prefix}))["logits"]
        for t in range(prefix.shape[1]):
            torch.testing.assert_close(steps(prefix[:, t:t + 1]), full[:, t], rtol=1e-4, atol=1e-4)


def test_explore_without_a_cacheable_teacher_reruns_the_prefix():
    tok = byte_tokenizer()
    model = tiny_t5(len(tok), d_model=32, seed=5)

    class Plain(torch.nn.Module):  # a teacher source that is neither Frozen nor an Ensemble
        training = False

        def __call__(self, batch):
            with torch.no_grad():
                return {"logits": model(input_ids=batch.inputs, **batch.model_kwargs).logits}

    batch = _batch(tok)
    kw = dict(max_new_tokens=8, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
    a = explore(Plain(), batch, generator=torch.Generator().manual_seed(1), **kw)
    b = explore(FrozenTeacher(model), batch, generator=torch.Generator().manual_seed(1), **kw)
    assert a.targets.tolist() == b.targets.tolist()


def test_tiny_marian_cross_attention_feeds_teaching_attention():
    tok = byte_tokenizer()
    student, teacher = tiny_marian(len(tok), d_model=32, heads=2, seed=1), tiny_marian(len(tok), d_model=48, seed=2)
    cfg = student.config
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 1, 0)
    gen = student.generation_config
    assert getattr(gen, "forced_eos_token_id", None) is None and getattr(gen, "forced_bos_token_id", None) is None
    batch = next(iter(seq2seq_loader(PAIRS, tok, 3, 64, 40, shuffle=False)))
    d = Distiller(student, teacher, {"teaching_attention": {"generation": 0.0, "attention": 1.0}})
    out = d(batch)
    with torch.no_grad():
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
        a_s = student(**kw, output_attentions=True).cross_attentions[-1]
        a_t = teacher(**kw, output_attentions=True).cross_attentions[-1]
    assert a_s.shape == (3, 2, batch["labels"].shape[1], batch["input_ids"].shape[1])
    want = teaching_attention_loss(a_s, a_t, batch["labels"] != IGNORE_INDEX)
    assert float(out.parts["teaching_attention"]) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="multiple of heads"):
        tiny_marian(10, d_model=30, heads=4)
    with pytest.raises(ValueError, match="max_positions"):
        tiny_marian(10, max_positions=0)


def test_tiny_marian_positions_are_absolute():
    """The same source, right- or left-padded, reads differently (why the example feeds sources of
    one length); a T5 with its relative positions reads both alike."""
    tok = byte_tokenizer()
    ids = torch.tensor([list(tok("Open a file.")["input_ids"])])
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask_r, mask_l = (right != 0).long(), (left != 0).long()
    mask_r[0, ids.shape[1] - 1] = mask_l[0, -1] = 1
    dec = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        for make, same in ((tiny_marian, False), (tiny_t5, True)):
            m = make(len(tok), d_model=32, seed=0).eval()
            a = m(input_ids=right, attention_mask=mask_r, decoder_input_ids=dec).logits
            b = m(input_ids=left, attention_mask=mask_l, decoder_input_ids=dec).logits
            assert torch.allclose(a, b, atol=1e-5) is same


def test_bpe_tokenizer_round_trip_and_ids():
    from distill.data.seq2seq import bpe_tokenizer

    texts = ["Return the number of items in the container.", "Open the file and return the stream."] * 5
    tok = bpe_tokenizer(texts, vocab_size=300)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    text = "Return  the\nnumber — of ünïcode items."
    ids = tok(text)["input_ids"]
    assert ids[-1] == 1 and 2 not in ids          # EOS appended, nothing unknown (byte level)
    assert tok.decode(ids, skip_special_tokens=True) == text
    # merges learnt from the texts make a seen phrase shorter than its bytes
    assert len(tok("Return the number of items", add_special_tokens=False)["input_ids"]) < 15
    assert bpe_tokenizer(texts, vocab_size=300).get_vocab() == tok.get_vocab()  # deterministic
    with pytest.raises(ValueError, match="vocab_size"):
        bpe_tokenizer(texts, vocab_size=100)
    with pytest.raises(TypeError, match="list of strings"):
        bpe_tokenizer("just one string")


def test_caption_mask_token_and_digit_positions():
    caps = caption_ids(torch.tensor([[3, 7], [0, 9]]))
    words = [[CAPTION_VOCAB[i] for i in row] for row in caps.tolist()]
    assert words[0] == ["[CLS]", "a", "3", "left", "of", "a", "7"]
    assert [words[1][digit_positions(k)] for k in range(2)] == ["0", "9"]
    assert CAPTION_VOCAB[MASK_ID] == "[MASK]" and MASK_ID not in caps
    assert digit_positions(torch.tensor([0, 1, 2])).tolist() == [2, 6, 10]
