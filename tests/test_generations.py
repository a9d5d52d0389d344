"""Teacher generations on disk (fingerprint, resume) and sequence-level KD targets (Kim & Rush 2016)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _optional import missing

from distill.files import CorruptFileError
from distill.generations import (
    GenerationsMismatchError,
    generate,
    generation_fingerprint,
    load_generations,
    sentence_bleu,
    sequence_kd_targets,
    word_bleu,
)

_no_llm = missing("transformers", " (pip install 'distill[llm]')") or missing("tokenizers")
needs_llm = pytest.mark.skipif(_no_llm is not None, reason=_no_llm or "")

PROMPTS = ["the cat", "a dog ran", "explain this text", "the quick brown fox", "over the lazy dog"]


# ----------------------------------------------------------------------------------- BLEU, by hand


def test_sentence_bleu_hand_worked():
    hyp, ref = "the cat sat on the mat".split(), "the cat sat on a mat".split()
    # p1 = 5/6 (one "the" clipped), p2 = 3/5, p3 = 2/4, p4 = 1/3; equal lengths: BP = 1
    assert sentence_bleu(hyp, ref, smoothing="none") == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # add-one for n >= 2: p2 = 4/6, p3 = 3/5, p4 = 2/4
    assert sentence_bleu(hyp, ref) == pytest.approx((5 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25)
    # a longer hypothesis: no brevity penalty; p = 6/7, 6/7, 5/6, 4/5
    longer = "the cat sat on the mat today".split()
    assert sentence_bleu(longer, "the cat sat on the mat".split()) == pytest.approx((24 / 49) ** 0.25)
    # a short one: BP = exp(1 - 6/2); p1 = 1, p2 = (1+1)/(1+1), p3 = p4 = (0+1)/(0+1)
    short = "the cat".split()
    assert sentence_bleu(short, "the cat sat on the mat".split()) == pytest.approx(math.exp(-2))
    assert sentence_bleu(short, "the cat sat on the mat".split(), smoothing="none") == 0.0
    # clipping: "the" counts once; p = 1/3, 1/3, 1/2, 1/1 and c > r
    assert sentence_bleu("the the the".split(), "the cat".split()) == pytest.approx((1 / 18) ** 0.25)
    assert sentence_bleu([4, 8, 15, 16], [4, 8, 15, 16]) == pytest.approx(1.0)  # token ids
    assert sentence_bleu([], [1, 2]) == 0.0 and word_bleu("a b c", "d e f") == 0.0
    assert word_bleu("the cat  sat on the mat", "the cat sat on a mat") == pytest.approx(sentence_bleu(hyp, ref))
    with pytest.raises(TypeError, match="split strings"):
        sentence_bleu("the cat", "the cat")


def test_sequence_kd_targets_top_beam_and_interpolation():
    answers = [["a dog ran", "the cat sat on a mat", "the cat"], ["x y", "x y"]]
    refs = ["the cat sat on the mat", "x y"]
    assert sequence_kd_targets(answers, "sequence") == ["a dog ran", "x y"]
    # BLEU to the reference: 0, (1/6)^(1/4), e^-2: the second beam
    assert sequence_kd_targets(answers, "interpolation", refs) == ["the cat sat on a mat", "x y"]
    by_length = sequence_kd_targets(answers, "interpolation", refs, similarity=lambda h, r: -abs(len(h.split()) - 2))
    assert by_length == ["the cat", "x y"]
    ties = sequence_kd_targets([["b", "c", "a"]], "interpolation", ["z"], similarity=lambda h, r: 0.0)
    assert ties == ["b"]  # equal scores: the better beam
    with pytest.raises(ValueError, match="one reference per prompt"):
        sequence_kd_targets(answers, "interpolation")
    with pytest.raises(ValueError, match="mode"):
        sequence_kd_targets(answers, "word")


# ----------------------------------------------------------------------------------- generating


def _words(tok, ids):
    return tok.convert_ids_to_tokens(ids)


@pytest.fixture()
def lm():
    if _no_llm:
        pytest.skip(_no_llm)
    from _tiny_text import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(chat=True)
    return tiny_llama(tok, seed=0), tok


@needs_llm
def test_generate_round_trip_matches_unbatched_greedy_decoding(lm, tmp_path):
    model, tok = lm
    # a second end-of-answer token the random model does emit ("fox"), so some answers stop early
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("fox")]
    model.generation_config.eos_token_id = eos
    path = tmp_path / "gen.jsonl"
    out = generate(model, tok, PROMPTS, path, max_new_tokens=5, batch_size=2, progress=False)
    assert path.exists() and not (tmp_path / "gen.jsonl.partial").exists()
    gens = load_generations(path)
    assert gens.completions == out and gens.prompts == PROMPTS and len(gens) == 5
    assert gens.fingerprint["prompts"]["count"] == 5 and gens.fingerprint["settings"]["max_new_tokens"] == 5
    assert gens.fingerprint["settings"]["eos_token_ids"] == sorted(eos)
    for prompt, rec in zip(PROMPTS, gens.records):
        # the chat-formatted prompt alone, no padding, no batch: what the batched left-padded run must give
        ids = torch.tensor([tok.convert_tokens_to_ids(["[USER]", *prompt.split(), "[BOT]"])])
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=eos)[0, ids.shape[1]:]
        seq = seq.tolist()
        stop = next((k for k, t in enumerate(seq) if t in eos), None)
        expected = seq if stop is None else seq[:stop]
        assert rec.token_ids == [expected]
        assert rec.finished == [stop is not None]
        assert rec.completions == [" ".join(w for w in _words(tok, expected) if w not in tok.all_special_tokens)]
        assert rec.scores is None
    assert {r.finished[0] for r in gens.records} == {True, False}  # both kinds of answer were checked


@needs_llm
def test_generate_beams_give_sorted_scores(lm, tmp_path):
    model, tok = lm
    out = generate(model, tok, PROMPTS[:3], tmp_path / "beams.jsonl", max_new_tokens=4, num_beams=3,
                   num_return_sequences=3, batch_size=3, progress=False)
    gens = load_generations(tmp_path / "beams.jsonl")
    assert [len(c) for c in out] == [3, 3, 3]
    for rec in gens.records:
        assert len(rec.scores) == 3 and rec.scores == sorted(rec.scores, reverse=True)
    assert sequence_kd_targets(gens, "sequence") == [c[0] for c in out]
    # Seq-Inter on token ids: the reference is the third beam itself, which BLEU-matches it exactly
    refs = [tok.decode(r.token_ids[2]) for r in gens.records]
    assert sequence_kd_targets(gens, "interpolation", refs, similarity="token_bleu", tokenizer=tok) == \
        [c[2] for c in out]
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        generate(model, tok, PROMPTS, tmp_path / "x.jsonl", max_new_tokens=2, num_return_sequences=2)


class _Crash(RuntimeError):
    pass


@needs_llm
def test_generate_resumes_after_a_crash(lm, tmp_path, monkeypatch):
    model, tok = lm
    kwargs = dict(max_new_tokens=4, batch_size=2, do_sample=True, temperature=0.7, seed=11, progress=False)
    reference = generate(model, tok, PROMPTS, tmp_path / "whole.jsonl", **kwargs)
    real = type(model).generate
    calls = []

    def crash_after_first(self, *args, **kw):
        calls.append(kw["input_ids"].shape[0])
        if len(calls) == 2:
            raise _Crash("killed")
        return real(self, *args, **kw)

    monkeypatch.setattr(type(model), "generate", crash_after_first)
    path = tmp_path / "gen.jsonl"
    with pytest.raises(_Crash):
        generate(model, tok, PROMPTS, path, **kwargs)
    partial = tmp_path / "gen.jsonl.partial"
    assert not path.exists() and len(partial.read_text().splitlines()) == 1 + 2  # header + the first batch
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_generations(path)
    # the crash hit while the next batch was being written: one whole line of it, then a torn one.
    # Both are dropped: the batch is generated again whole (same padding, same seed)
    bogus = {"index": 2, "prompt": PROMPTS[2], "completions": ["BOGUS"], "token_ids": [[1]], "finished": [False],
             "scores": None}
    with open(partial, "a") as f:
        f.write(json.dumps(bogus) + "\n" + '{"index": 3, "prompt": "the q')
    calls.clear()
    monkeypatch.setattr(type(model), "generate", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    torch.manual_seed(1234)  # the global RNG's state plays no part, and is left as it was
    state = torch.get_rng_state()
    resumed = generate(model, tok, PROMPTS, path, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(calls) == 2  # the two batches left, not the first again
    assert resumed == reference  # sampled, yet the same: each batch's seed is (seed, batch number)
    assert not partial.exists()
    calls.clear()
    assert generate(model, tok, PROMPTS, path, **kwargs) == reference and calls == []  # finished: read back


@needs_llm
def test_generate_refuses_a_file_made_differently(lm, tmp_path):
    from _tiny_text import tiny_llama

    model, tok = lm
    path = tmp_path / "gen.jsonl"
    generate(model, tok, PROMPTS, path, max_new_tokens=3, batch_size=4, progress=False)
    with pytest.raises(GenerationsMismatchError, match="max_new_tokens=3 in the file, 4 now") as e:
        generate(model, tok, PROMPTS, path, max_new_tokens=4, batch_size=4, progress=False)
    assert e.value.parts == ["settings"]
    with pytest.raises(GenerationsMismatchError, match="model: the file's is LlamaForCausalLM") as e:
        generate(tiny_llama(tok, seed=1), tok, PROMPTS, path, max_new_tokens=3, batch_size=4, progress=False)
    assert e.value.parts == ["model"]
    with pytest.raises(GenerationsMismatchError, match="the file has 5 prompts") as e:
        generate(model, tok, PROMPTS[:4], path, max_new_tokens=3, batch_size=4, progress=False)
    assert e.value.parts == ["prompts"]
    tok.chat_template = tok.chat_template.replace("[BOT] ", "[BOT] [BOT] ")
    with pytest.raises(GenerationsMismatchError) as e:
        generate(model, tok, PROMPTS, path, max_new_tokens=3, batch_size=4, progress=False)
    assert e.value.parts == ["tokenizer"]
    fp = generation_fingerprint(model, tok, PROMPTS, max_new_tokens=3, batch_size=4)
    with pytest.raises(GenerationsMismatchError, match="tokenizer"):
        load_generations(path, expect=fp)
    regenerated = generate(model, tok, PROMPTS, path, max_new_tokens=3, batch_size=4, progress=False, overwrite=True)
    assert load_generations(path, expect=fp).completions == regenerated
    header = json.loads(path.read_text().splitlines()[0])
    assert header["fingerprint"]["sha256"] == fp["sha256"]
    path.write_text(path.read_text()[:-40])  # damaged: cut short
    with pytest.raises(CorruptFileError, match="gen.jsonl"):
        generate(model, tok, PROMPTS, path, max_new_tokens=3, batch_size=4, progress=False)
    assert generate(model, tok, PROMPTS, path, max_new_tokens=3, batch_size=4, progress=False,
                    overwrite=True) == regenerated
