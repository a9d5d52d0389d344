"""The token teacher cache: round trips against the live teacher (values, ids, tail mass, losses),
fingerprints (teacher, tokenizer, data, k, T), per-batch token checks, corruption, resume and overwrite."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import distill.token_cache as tc
from distill.batch import TokenBatch, as_batch
from distill.cache import CacheError, CacheMismatchError
from distill.functional.tokens import token_loss, topk_token_divergence
from distill.token_cache import (
    CachedTokenTeacher,
    TokenCache,
    build_token_cache,
    is_token_cache,
    token_data_fingerprint,
    tokenizer_fingerprint,
)
from tests._optional import missing

pytestmark = pytest.mark.skipif(missing("transformers"), reason="transformers is not installed")

V, N, L = 97, 6, 11
K, T = 8, 2.0


def tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_tokenizer(extra: str | None = None):
    import tokenizers
    import transformers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(V - 2)}}
    if extra is not None:
        vocab[extra] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def data(seed: int = 1) -> dict[str, torch.Tensor]:
    """N sequences right-padded to L, of lengths L, 7, 3, L, 5, 9."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (N, L), generator=g)
    mask = torch.ones(N, L, dtype=torch.long)
    for row, n in enumerate([L, 7, 3, L, 5, 9]):
        mask[row, n:] = 0
        ids[row, n:] = 1  # the pad token
    return {"input_ids": ids, "attention_mask": mask}


def loader(d: dict[str, torch.Tensor], order: list[list[int]]):
    """HF dict batches of the sequences in ``order``, each trimmed to its longest sequence (dynamic padding)."""
    for idx in order:
        i = torch.tensor(idx)
        n = int(d["attention_mask"][i].sum(1).max())
        ids, mask = d["input_ids"][i, :n], d["attention_mask"][i, :n]
        labels = ids.masked_fill(mask == 0, -100)
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": i}


def reference(model, d: dict[str, torch.Tensor], row: int):
    """Each sequence alone, unpadded, through the live teacher: full log-probs at T in float64 ``(n, V)``."""
    n = int(d["attention_mask"][row].sum())
    with torch.no_grad():
        z = model(input_ids=d["input_ids"][row:row + 1, :n]).logits[0].double()
    return torch.log_softmax(z / T, -1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    model, d = tiny_llama(), data()
    path = tmp_path_factory.mktemp("tokcache") / "cache"
    # a shuffled loader with dynamic padding: rows are stored by index, whatever the order
    build_token_cache(model, loader(d, [[4, 1], [0, 5, 2], [3]]), path, k=K, temperature=T,
                      tokenizer=tiny_tokenizer(), progress=False)
    return model, d, path


def test_round_trip_equals_the_live_teacher_topk_at_fp16(built) -> None:
    model, d, path = built
    teacher = CachedTokenTeacher(path, teacher=model, tokenizer=tiny_tokenizer(), data=d, k=K, temperature=T)
    idx = [2, 0, 4]
    batch = next(loader(d, [idx]))
    view = teacher(as_batch(batch))
    assert set(view) == {"topk_values", "topk_indices", "topk_tail", "topk_temperature"}
    assert float(view["topk_temperature"]) == T
    assert view["topk_values"].shape == (3, L, K) and view["topk_values"].dtype == torch.float32
    assert view["topk_indices"].dtype == torch.long and view["topk_tail"].shape == (3, L)
    for b, row in enumerate(idx):
        logp = reference(model, d, row)
        n = logp.shape[0]
        top, ids = logp.sort(-1, descending=True)
        assert torch.equal(view["topk_indices"][b, :n], ids[:, :K])
        # fp16 storage: relative rounding 2^-11
        torch.testing.assert_close(view["topk_values"][b, :n].double(), top[:, :K], rtol=2 ** -10, atol=1e-6)
        tail = 1 - top[:, :K].exp().sum(-1)
        torch.testing.assert_close(view["topk_tail"][b, :n].double(), tail, rtol=2 ** -10, atol=1e-7)
        # padding: the uniform placeholder over k + 1 bins
        assert torch.allclose(view["topk_values"][b, n:], torch.tensor(-math.log(K + 1)))
        assert torch.allclose(view["topk_tail"][b, n:], torch.tensor(1 / (K + 1)))
    total = view["topk_tail"] + view["topk_values"].exp().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=2e-3)


def test_only_the_sequences_own_positions_are_stored(built) -> None:
    _, d, path = built
    cache = TokenCache(path)
    lengths = d["attention_mask"].sum(1)
    assert cache.num_sequences == N and cache.num_tokens == int(lengths.sum()) == 46
    assert np.array_equal(cache.lengths, lengths.numpy())
    assert (path / "topk_values.bin").stat().st_size == 46 * K * 2  # fp16, no padding stored
    assert (path / "topk_indices.bin").stat().st_size == 46 * K * 4
    whole, cut = cache.read([1, 2]), cache.read([1, 2], length=4)  # stored lengths 7 and 3
    assert whole["topk_values"].shape == (2, 7, K) and cut["topk_values"].shape == (2, 4, K)
    full, mixed = cache.read([3, 0]), cache.read([3, 0, 2])  # two whole rows (no placeholder) and a short one
    for name in ("topk_values", "topk_indices", "topk_tail"):
        assert torch.equal(cut[name], whole[name][:, :4])
        assert torch.equal(full[name], mixed[name][:2])
    assert not torch.equal(full["topk_values"][0], full["topk_values"][1])


def test_loss_from_the_cache_equals_the_k_plus_one_bin_divergence_of_the_live_teacher(built) -> None:
    model, d, path = built
    teacher = CachedTokenTeacher(path)
    idx = [3, 1]
    batch = as_batch(next(loader(d, [idx])))
    view = teacher(batch)
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, batch.inputs.shape[1], V, generator=g, dtype=torch.float64) * 3
    for b, row in enumerate(idx):
        logp = reference(model, d, row)
        n = logp.shape[0]
        # written out: p on the teacher's k tokens + one tail bin; q on the same bins at T; KL(p || q) T^2
        top, ids = logp.sort(-1, descending=True)
        p = torch.cat([top[:, :K].exp(), 1 - top[:, :K].exp().sum(-1, keepdim=True)], -1)
        logq = torch.log_softmax(student[b, :n] / T, -1)
        q_top = logq.gather(-1, ids[:, :K]).exp()
        q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
        expected = (p * (p.log() - q.log())).sum(-1) * T * T
        got = topk_token_divergence(student[b, :n].float(), view["topk_values"][b, :n], view["topk_indices"][b, :n],
                                    "forward_kl", tail=view["topk_tail"][b, :n], temperature=T)
        torch.testing.assert_close(got.double(), expected, rtol=3e-3, atol=1e-4)


def test_a_full_vocabulary_fp32_cache_gives_the_live_token_loss(tmp_path: Path) -> None:
    model, d = tiny_llama(), data()
    build_token_cache(model, d, tmp_path / "c", k=V, temperature=T, dtype=torch.float32, batch_size=4,
                      progress=False)
    teacher = CachedTokenTeacher(tmp_path / "c", teacher=model)
    batch = as_batch(next(loader(d, [[5, 0, 2]])))
    view = teacher(batch)
    student = torch.randn(3, batch.inputs.shape[1], V, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        live = model(**batch.model_inputs()).logits
    mask = batch.targets[:, 1:] != -100  # causal: position t is scored against label t + 1
    rows = torch.nn.functional.pad(mask, (0, 1), value=False)
    cached = topk_token_divergence(student[rows], view["topk_values"][rows], view["topk_indices"][rows],
                                   "reverse_kl", tail=view["topk_tail"][rows], temperature=T).mean()
    expected = token_loss(student, live, batch.targets, "reverse_kl", temperature=T)
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-6)


def test_data_fingerprint_ignores_right_padding_but_not_tokens_masks_or_order() -> None:
    d = data()
    fp = token_data_fingerprint(d["input_ids"], d["attention_mask"])
    wider = {k: torch.nn.functional.pad(v, (0, 4), value=0) for k, v in d.items()}
    assert token_data_fingerprint(wider["input_ids"], wider["attention_mask"]) == fp
    ids = d["input_ids"].clone()
    ids[2, 1] += 1
    assert token_data_fingerprint(ids, d["attention_mask"]) != fp
    ids = d["input_ids"].clone()
    ids[2, 5] += 1  # a padded position: not part of the data
    assert token_data_fingerprint(ids, d["attention_mask"]) == fp
    mask = d["attention_mask"].clone()
    mask[0, 0] = 0  # left-masked first token
    assert token_data_fingerprint(d["input_ids"], mask) != fp
    assert token_data_fingerprint(d["input_ids"][[1, 0, 2, 3, 4, 5]], d["attention_mask"][[1, 0, 2, 3, 4, 5]]) != fp


def test_mismatches_are_named(built) -> None:
    model, d, path = built
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(CacheMismatchError, match=r"teacher: the cache was built from LlamaForCausalLM") as e:
        CachedTokenTeacher(path, teacher=other)
    assert "data" not in str(e.value) and "tokenizer:" not in str(e.value)
    ids = d["input_ids"].clone()
    ids[4, 2] = (ids[4, 2] + 1) % V
    with pytest.raises(CacheMismatchError, match=r"data: the cache was built from 6 sequences"):
        CachedTokenTeacher(path, data={"input_ids": ids, "attention_mask": d["attention_mask"]})
    with pytest.raises(CacheMismatchError, match=r"k: the cache stores the top 8 tokens per position, 16 were"):
        CachedTokenTeacher(path, k=16)
    with pytest.raises(CacheMismatchError, match=r"temperature: .* T=2, the losses use T=1"):
        CachedTokenTeacher(path, temperature=1.0)
    with pytest.raises(CacheMismatchError, match=r"tokenizer: .*another vocabulary"):
        CachedTokenTeacher(path, tokenizer=tiny_tokenizer(extra="<extra>"))
    with pytest.raises(CacheMismatchError) as e:  # every difference at once
        CachedTokenTeacher(path, teacher=other, k=4, tokenizer=tiny_tokenizer(extra="x"))
    assert all(s in str(e.value) for s in ("teacher:", "k:", "tokenizer:"))
    CachedTokenTeacher(path, teacher=model, tokenizer=tiny_tokenizer(), data=d, k=K, temperature=T)  # all agree


def test_tokenizer_fingerprint_sees_special_tokens() -> None:
    a, b, c = tiny_tokenizer(), tiny_tokenizer(), tiny_tokenizer()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) == tokenizer_fingerprint(c)
    b.eos_token, c.bos_token = "w5", "w5"  # same special-token list, other roles
    assert b.all_special_tokens == c.all_special_tokens
    assert len({tokenizer_fingerprint(a), tokenizer_fingerprint(b), tokenizer_fingerprint(c)}) == 3


def test_each_batch_is_checked_against_the_stored_tokens(built) -> None:
    _, d, path = built
    teacher = CachedTokenTeacher(path)
    good = next(loader(d, [[1, 2]]))
    teacher(as_batch(good))
    swapped = dict(good, index=torch.tensor([2, 1]))  # another order of indices than the cache's
    with pytest.raises(CacheMismatchError, match=r"sequences \[2, 1\]"):
        teacher(as_batch(swapped))
    changed = {k: v.clone() for k, v in good.items()}
    changed["input_ids"][1, 2] = (changed["input_ids"][1, 2] + 1) % V  # sequence 2, a real token
    with pytest.raises(CacheMismatchError, match=r"sequences \[2\]"):
        teacher(as_batch(changed))
    truncated = {k: v.clone() for k, v in good.items()}
    truncated["attention_mask"][0, 6] = 0  # sequence 1 is 7 tokens long in the cache, 6 here
    with pytest.raises(CacheMismatchError, match=r"sequences \[1\]"):
        teacher(as_batch(truncated))
    with pytest.raises(ValueError, match="reads sequences by index"):
        teacher(TokenBatch(good["input_ids"]))


def test_corrupted_truncated_and_unfinished_caches_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tc, "BLOCK_BYTES", 64)  # 4 positions of k=8 fp16 values per block
    model, d = tiny_llama(), data()
    path = tmp_path / "c"
    build_token_cache(model, d, path, k=K, progress=False)
    raw = bytearray((path / "topk_values.bin").read_bytes())
    raw[-1] ^= 0x40  # the last stored position: sequence 5's last token
    (path / "topk_values.bin").write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=r"corrupted: block \d+ of topk_values.bin"):
        TokenCache(path)
    lazy = CachedTokenTeacher(path, verify="lazy")
    lazy(as_batch(next(loader(d, [[0, 1]]))))  # blocks of other sequences read fine
    with pytest.raises(CacheError, match="corrupted"):
        lazy(as_batch(next(loader(d, [[5]]))))
    (path / "topk_tail.bin").write_bytes((path / "topk_tail.bin").read_bytes()[:-2])
    with pytest.raises(CacheError, match="truncated: topk_tail.bin"):
        TokenCache(path, verify="lazy")
    (path / "manifest.json").unlink()
    with pytest.raises(CacheError, match="unfinished"):
        TokenCache(path)
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        TokenCache(tmp_path / "nothing")


def test_existing_cache_is_refused_unless_overwrite_and_an_interrupted_build_restarts(tmp_path: Path) -> None:
    model, d = tiny_llama(), data()
    path = tmp_path / "c"
    build_token_cache(model, d, path, k=K, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_token_cache(model, d, path, k=4, progress=False)
    assert TokenCache(path).k == K
    build_token_cache(model, d, path, k=4, overwrite=True, progress=False)
    assert TokenCache(path).k == 4

    def interrupted():
        yield from loader(d, [[0, 1]])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_token_cache(model, interrupted(), path, k=K, overwrite=True, progress=False)
    with pytest.raises(CacheError, match="unfinished"):
        TokenCache(path)
    build_token_cache(model, d, path, k=K, progress=False)  # an unfinished cache is rebuilt without overwrite
    assert TokenCache(path).k == K and not (path / ".lock").exists()


def test_bad_arguments_are_refused_before_the_teacher_runs(tmp_path: Path) -> None:
    model, d = tiny_llama(), data()

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.calls = model, 0

        def forward(self, **kw):
            self.calls += 1
            return self.inner(**kw)

    counted = Counting()
    for kw, msg in [({"k": 0}, "k must be an int >= 1"), ({"k": V + 1}, "exceeds the teacher's vocabulary of 97"),
                    ({"temperature": 0.0}, "temperature must be"), ({"dtype": torch.bfloat16}, "dtype must be")]:
        with pytest.raises(ValueError, match=msg):
            build_token_cache(model if "k" in kw and kw["k"] > V else counted, d, tmp_path / "c", progress=False, **kw)
    with pytest.raises(TypeError, match="loader_or_dataset"):
        build_token_cache(counted, d["input_ids"], tmp_path / "c", progress=False)
    assert counted.calls == 0
    no_index = [{k: v for k, v in b.items() if k != "index"} for b in loader(d, [[0, 1]])]
    with pytest.raises(ValueError, match="'index'"):
        build_token_cache(model, no_index, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"not \[2\]"):  # a loader that skips a sequence (drop_last)
        build_token_cache(model, list(loader(d, [[0, 1], [3, 4, 5]])), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="come twice"):
        build_token_cache(model, list(loader(d, [[0, 1], [1, 2]])), tmp_path / "c", progress=False)


def test_cli_builds_a_token_cache_of_an_hf_teacher_and_describes_it(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from distill.cli import main
    from distill.data.text import pack_causal
    from distill.integrations import hf as HF
    from tests._lm import SAMPLE_TEXT, saved_teacher

    folder = saved_teacher(tmp_path / "teacher")
    (tmp_path / "docs.txt").write_text("\n\n".join(SAMPLE_TEXT))
    out = tmp_path / "cache"
    args = ["cache", "build", "--text-teacher", f"hf:{folder}", "--text-data", str(tmp_path / "docs.txt"),
            "--seq-len", "16", "--topk", "5", "--temperature", "1.5", "--batch-size", "3", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    cache = TokenCache(out)
    tokenizer = HF.load_tokenizer(str(folder))
    blocks = pack_causal(SAMPLE_TEXT, tokenizer, 16)
    assert cache.k == 5 and cache.temperature == 1.5 and cache.manifest["dtype"] == "fp16"
    assert cache.num_sequences == blocks["input_ids"].shape[0] > 3
    CachedTokenTeacher(out, tokenizer=tokenizer, data=blocks, k=5, temperature=1.5)  # the same blocks, tokenizer
    assert cache.manifest["data"]["source"]["packing"] == "pack_causal(seq_len=16)"
    assert is_token_cache(out) and not is_token_cache(tmp_path / "teacher")
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "manifest.json").write_text('{"format": "distill.teacher-cache/1"}')
    assert not is_token_cache(tmp_path / "image")
    capsys.readouterr()
    assert main(["cache", "info", str(out)]) == 0
    assert "token teacher cache" in capsys.readouterr().out
    assert main(args) == 2
    assert "already exists" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("extra, message", [
    (["--topk", "0", "--out", "x"], "--topk must be >= 1"),
    (["--seq-len", "1", "--out", "x"], "--seq-len must be >= 2"),
    (["--temperature", "0", "--out", "x"], "--temperature must be a finite number > 0"),
    (["--epochs", "2", "--out", "x"], "--epochs belong to the recipe form"),
    (["--text-data", "nowhere.txt", "--out", "x"], "'nowhere.txt' is neither"),
    ([], "needs --out FOLDER"),
])
def test_cli_text_options_are_checked_before_the_teacher_loads(extra: list[str], message: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from distill.cli import main

    # the teacher folder does not exist: each error must come before any attempt to load it
    assert main(["cache", "build", "--text-teacher", "hf:/no/such/teacher", *extra]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_a_distiller_step_on_the_cache_equals_one_on_the_live_teacher(tmp_path: Path, chunk_size: int | None) -> None:
    """k = V in fp32: the cached top-k is the whole distribution, so the gradients of TokenKD (plain or
    fused with the lm_head) through the cache equal those through the live teacher."""
    from distill import Distiller
    from distill.methods.tokens import TokenKD

    model, d = tiny_llama(), data()
    build_token_cache(model, d, tmp_path / "c", k=V, temperature=T, dtype=torch.float32, progress=False)
    batch = next(loader(d, [[4, 2, 0]]))
    grads = []
    for teacher in (model, CachedTokenTeacher(tmp_path / "c", teacher=model)):
        student = tiny_llama(seed=3)
        loss = TokenKD("jsd", T=T, beta=0.3, chunk_size=chunk_size)
        out = Distiller(student, teacher, losses={"kd": loss})(batch)
        out.total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="made at temperature 2"):  # the cache's T travels with its view
        Distiller(tiny_llama(seed=3), CachedTokenTeacher(tmp_path / "c"), losses={"kd": TokenKD(T=1.0)})(batch)
