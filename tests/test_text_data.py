"""The text data path: the offline stdlib corpus, prompts, packing, prompt/completion labels, the loader."""

from __future__ import annotations

import inspect
import json
import sys
import textwrap

import pytest
import torch

from _optional import missing

from distill.data.corpus import _chunks, _documented
from distill.data.text import (
    Passage,
    TokenLoader,
    chat_prompts,
    corpus_fingerprint,
    pack_causal,
    prompt_completion,
    split_passages,
    stdlib_docstrings,
)

_no_llm = missing("transformers", " (pip install 'distill[llm]')") or missing("tokenizers")
needs_llm = pytest.mark.skipif(_no_llm is not None, reason=_no_llm or "")


# ----------------------------------------------------------------------------------- the corpus


def test_stdlib_docstrings_small_walk_is_clean_deduplicated_and_reproducible():
    ps = stdlib_docstrings(min_chars=200, max_chars=600, modules=["json", "textwrap"])
    assert ps == stdlib_docstrings(min_chars=200, max_chars=600, modules=["json", "textwrap"])
    assert {p.package for p in ps} == {"json", "textwrap"}
    assert {"json.decoder", "json.encoder"} <= {p.module for p in ps}  # submodules are walked
    assert all(200 <= len(p.text) <= 600 for p in ps)
    assert len({p.text for p in ps}) == len(ps) and len({p.source for p in ps}) == len(ps)
    for p in ps:
        assert "\n\n\n" not in p.text and p.text == p.text.strip("\n") == textwrap.dedent(p.text)
        assert all(line == line.rstrip() for line in p.text.splitlines())
    by_source = {p.source: p.text for p in ps}
    # a docstring between the limits comes whole, cleaned as inspect.cleandoc cleans it
    assert by_source["textwrap:dedent"] == inspect.cleandoc(textwrap.dedent.__doc__).strip()
    # a docstring over max_chars is cut at paragraph boundaries into parts that rebuild it
    whole = inspect.cleandoc(json.dumps.__doc__)
    parts = [by_source[s] for s in sorted(by_source) if s.split("#")[0] == "json:dumps"]
    assert len(parts) >= 3 and "json:dumps#2" in by_source
    assert all(part in whole for part in parts)
    # only what the module defines: json re-exports JSONDecoder, which is json.decoder's
    assert any(s.startswith("json.decoder:JSONDecoder") for s in by_source)
    assert not any(s.startswith("json:JSONDecoder") for s in by_source)
    assert not any(qual.startswith("JSONDecoder") for qual, _ in _documented(json))
    # the seed orders the list, the set stays
    other = stdlib_docstrings(min_chars=200, max_chars=600, seed=1, modules=["json", "textwrap"])
    assert [p.source for p in other] != [p.source for p in ps] and set(other) == set(ps)
    ordered = stdlib_docstrings(min_chars=200, max_chars=600, seed=None, modules=["json", "textwrap"])
    assert [p.source for p in ordered] == sorted(p.source for p in ps)
    # the isolated interpreter reads what this one reads
    assert stdlib_docstrings(min_chars=200, max_chars=600, modules=["json", "textwrap"], isolated=False) == ps


def test_corpus_fingerprint_records_python_and_content():
    ps = [Passage("a:x", "one text"), Passage("b:y", "another text")]
    fp = corpus_fingerprint(ps)
    assert fp["python"] == sys.version and fp["passages"] == 2
    assert fp == corpus_fingerprint(list(ps))
    assert corpus_fingerprint([ps[0], Passage("b:y", "another text!")])["sha256"] != fp["sha256"]
    assert corpus_fingerprint(ps[::-1])["sha256"] != fp["sha256"]


def test_stdlib_docstrings_refuses_bad_requests():
    with pytest.raises(ValueError, match="antigravity"):
        stdlib_docstrings(modules=["antigravity"])
    with pytest.raises(ValueError, match="numpy"):
        stdlib_docstrings(modules=["numpy"])
    with pytest.raises(ValueError, match="max_chars >= min_chars"):
        stdlib_docstrings(min_chars=500, max_chars=100)


def test_chunks_pack_paragraphs_and_cut_long_ones_at_whitespace():
    text = "aaaa bbbb\n\ncc\n\ndddddddddddd eeee"
    assert _chunks(text, 13) == ["aaaa bbbb\n\ncc", "dddddddddddd", "eeee"]
    assert _chunks(text, 100) == [text]
    # an introducing paragraph ("...::") goes with what it introduces; code is cut at line breaks, dedented
    assert _chunks("aaaaaaaaaa\n\nIntro::\n\n    code", 20) == ["aaaaaaaaaa", "Intro::\n\n    code"]
    assert _chunks("    line one\n    line two", 14) == ["line one", "line two"]


def test_split_passages_keeps_packages_whole():
    ps = [Passage(f"{pkg}.sub:f{i}", f"{pkg} text {i}") for pkg, n in (("a", 5), ("b", 3), ("c", 1), ("d", 1))
          for i in range(n)]
    for seed in range(6):
        train, held = split_passages(ps, held_out=0.2, seed=seed)
        assert sorted(train + held, key=ps.index) == ps
        assert not {p.package for p in train} & {p.package for p in held}
        assert held and train
        assert train == [p for p in ps if p in train]  # input order kept
    assert split_passages(ps, 0.2, seed=3) == split_passages(ps, 0.2, seed=3)
    assert all(split_passages(ps, 0.99, seed=s)[0] for s in range(6))  # training always keeps a package
    with pytest.raises(ValueError, match="at least two packages"):
        split_passages(ps[:5], 0.5)
    with pytest.raises(ValueError, match="held_out"):
        split_passages(ps, 1.0)


def test_chat_prompts_fill_the_template():
    p = Passage("json:loads", "Deserialize {s}.")
    assert chat_prompts([p, "plain"], template="[{module}] {text}") == ["[json] Deserialize {s}.", "[] plain"]
    assert chat_prompts([p])[0].endswith("\n\nDeserialize {s}.")
    with pytest.raises(ValueError, match=r"\{text\}"):
        chat_prompts([p], template="no field")
    with pytest.raises(ValueError, match="other"):
        chat_prompts([p], template="{text} {other}")


# ----------------------------------------------------------------------------------- tokenisation


def _ids(tok, words: str) -> list[int]:
    return tok.convert_tokens_to_ids(words.split())


@needs_llm
def test_pack_causal_joins_with_eos_and_cuts_blocks():
    from _tiny_text import tiny_tokenizer

    tok = tiny_tokenizer()
    out = pack_causal(["the cat sat", "a dog"], tok, seq_len=3)
    expected = torch.tensor([_ids(tok, "the cat sat [EOS]")[:3], _ids(tok, "[EOS] a dog")])
    assert torch.equal(out["input_ids"], expected)
    assert torch.equal(out["labels"], expected) and torch.equal(out["attention_mask"], torch.ones(2, 3).long())
    padded = pack_causal(["the cat sat", "a dog"], tok, seq_len=3, remainder="pad")
    assert padded["input_ids"].shape == (3, 3)
    assert padded["input_ids"][2].tolist() == _ids(tok, "[EOS] [PAD] [PAD]")
    assert padded["labels"][2].tolist() == [tok.eos_token_id, -100, -100]
    assert padded["attention_mask"][2].tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_causal(["the cat"], tok, seq_len=8)


@needs_llm
def test_prompt_completion_labels_only_the_completion():
    from _tiny_text import tiny_tokenizer

    tok = tiny_tokenizer(chat=True)
    out = prompt_completion(tok, ["the cat", "a dog ran"], ["sat on the mat", "in"], max_len=32)
    row0 = _ids(tok, "[USER] the cat [BOT] sat on the mat [EOS]")
    row1 = _ids(tok, "[USER] a dog ran [BOT] in [EOS] [PAD] [PAD]")
    assert out["input_ids"].tolist() == [row0, row1]
    assert out["labels"].tolist() == [[-100] * 4 + row0[4:], [-100] * 5 + row1[5:7] + [-100] * 2]
    assert out["attention_mask"].tolist() == [[1] * 9, [1] * 7 + [0] * 2]
    assert out.truncated == [] and out.dropped == [] and out.kept == [0, 1]
    # without the chat template: the plain prompt; a per-example EOS choice
    plain = prompt_completion(tok, ["the cat"], ["sat"], max_len=8, chat_template=False, add_eos=[False])
    assert plain["input_ids"].tolist() == [_ids(tok, "the cat sat")]
    assert plain["labels"].tolist() == [[-100, -100] + _ids(tok, "sat")]


@needs_llm
def test_prompt_completion_truncation_is_counted_never_silent():
    from _tiny_text import tiny_tokenizer

    tok = tiny_tokenizer(chat=True)
    with pytest.warns(UserWarning, match="1 of 1 completion"):
        out = prompt_completion(tok, ["the cat"], ["sat on the mat"], max_len=6)
    assert out["input_ids"].tolist() == [_ids(tok, "[USER] the cat [BOT] sat on")]
    assert out["labels"].tolist() == [[-100] * 4 + _ids(tok, "sat on")]
    assert out.truncated == [0]
    with pytest.raises(ValueError, match="example 1's prompt is 6 tokens"):
        prompt_completion(tok, ["the cat", "a dog ran in"], ["sat", "the park"], max_len=6)
    with pytest.warns(UserWarning, match="dropped"):
        kept = prompt_completion(tok, ["the cat", "a dog ran in"], ["sat", "the park"], max_len=6, overlong="drop")
    assert kept.dropped == [1] and kept.kept == [0] and kept["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match="no chat template"):
        prompt_completion(tiny_tokenizer(chat=False), ["the"], ["cat"], max_len=8)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        prompt_completion(tok, ["the", "a"], ["cat"], max_len=8)


# ----------------------------------------------------------------------------------- the loader


def _data(n: int = 10, width: int = 6):
    lengths = torch.tensor([(3 * i) % width + 1 for i in range(n)])  # 1..width tokens per row
    cols = torch.arange(width)
    mask = (cols[None, :] < lengths[:, None]).long()
    ids = (torch.arange(n * width).view(n, width) % 50 + 1) * mask
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return ids, labels, mask, lengths


def test_token_loader_order_index_and_trimming():
    ids, labels, mask, lengths = _data()
    loader = TokenLoader(ids, labels, mask, batch_size=4, seed=3)
    assert len(loader) == 3 and loader.num_samples == 10
    first = list(loader)
    again = list(TokenLoader(ids, labels, mask, batch_size=4, seed=3))
    assert all(torch.equal(a["index"], b["index"]) for a, b in zip(first, again))
    seen = torch.cat([b["index"] for b in first])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    for b in first:
        width = int(lengths[b["index"]].max())
        assert b["input_ids"].shape == (len(b["index"]), width)  # cut to the batch's longest row
        assert torch.equal(b["input_ids"], ids[b["index"], :width])
        assert torch.equal(b["labels"], labels[b["index"], :width])
        assert torch.equal(b["attention_mask"], mask[b["index"], :width])
        assert set(b) == {"input_ids", "attention_mask", "labels", "index"}
    loader.set_epoch(1)
    assert torch.cat([b["index"] for b in loader]).tolist() != seen.tolist()
    loader.set_epoch(0)
    assert torch.cat([b["index"] for b in loader]).tolist() == seen.tolist()
    assert len(TokenLoader(ids, labels, mask, batch_size=4, drop_last=True)) == 2
    plain = list(TokenLoader(ids, labels, mask, batch_size=4, shuffle=False, trim_padding=False))
    assert plain[0]["index"].tolist() == [0, 1, 2, 3] and plain[0]["input_ids"].shape[1] == 6


def test_token_loader_batches_read_as_token_batches():
    from distill.batch import TokenBatch, as_batch

    ids, labels, mask, _ = _data()
    batch = as_batch(next(iter(TokenLoader(ids, labels, mask, batch_size=4, seed=0))))
    assert isinstance(batch, TokenBatch)
    assert torch.equal(batch.targets, labels[batch.index, :batch.inputs.shape[1]])
    assert set(batch.model_kwargs) == {"attention_mask"}


def test_token_loader_shards_split_the_global_batch():
    ids, labels, mask, _ = _data(n=11)
    whole = TokenLoader(ids, labels, mask, batch_size=4, seed=5)
    parts = []
    for rank in range(2):
        shard = TokenLoader(ids, labels, mask, batch_size=4, seed=5)
        shard.set_shard(rank, 2)
        parts.append([b["index"] for b in shard])
    for k, b in enumerate(whole):
        assert torch.cat([parts[0][k], parts[1][k]]).tolist() == b["index"].tolist()


def test_token_loader_validates_its_tensors():
    ids, labels, mask, _ = _data()
    with pytest.raises(ValueError, match="labels has shape"):
        TokenLoader(ids, labels[:, :3], mask, batch_size=2)
    with pytest.raises(TypeError, match="torch.long"):
        TokenLoader(ids.float(), labels, mask, batch_size=2)
    bad = labels.clone()
    bad[0, -1] = 7  # a label on a padded position
    with pytest.raises(ValueError, match="labels must be −100 where attention_mask is 0"):
        TokenLoader(ids, bad, mask, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TokenLoader(ids, labels, mask, batch_size=0)
