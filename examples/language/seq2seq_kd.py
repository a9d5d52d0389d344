"""Sequence-to-sequence distillation on real offline text: a docstring's summary line from the docstring.

Data: the Python standard library's docstrings (:func:`distill.data.corpus.stdlib_docstrings`); the
source is a passage, the target its first sentence (:func:`distill.data.seq2seq.summary_pairs`,
lead extraction: the closest honest small stand-in for summarisation / MT, which have no offline
corpus here). Tokens: a byte-level BPE trained here on the training passages
(:func:`distill.data.seq2seq.bpe_tokenizer`, 1024 symbols, no download); every source is cut to the
same number of tokens (no padding, so the teacher's generation sees what training saw). Models:
tiny Marian transformers built from configs (:func:`distill.models.seq2seq.tiny_marian`: shared
sinusoidal positions and tied embeddings, which learn to copy spans in a few hundred steps).

A teacher (and, for Liu et al.'s ensemble, a second teacher from another seed) is trained on the
gold pairs; then students of one size, seed and budget are trained with cross-entropy alone and
with each method, and scored on held-out passages by greedy decoding: sentence BLEU of the output
against the gold first sentence (smoothed, :func:`distill.generations.word_bleu`) and exact match.

    .venv/bin/python examples/language/seq2seq_kd.py --threads 1   # about 4.5 CPU-minutes (measured)
    .venv/bin/python examples/language/seq2seq_kd.py --quick       # a few seconds, a smoke test
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from distill import Distiller, fit
from distill.data.corpus import split_passages, stdlib_docstrings
from distill.data.seq2seq import bpe_tokenizer, seq2seq_loader, summary_pairs
from distill.generations import word_bleu
from distill.models.seq2seq import tiny_marian
from distill.strategies.search_kd import search_kd
from distill.strategies.sequence_kd import seq_kd


def fixed_length_pairs(pairs, tokenizer, source_tokens: int, max_target_tokens: int) -> list[tuple[str, str]]:
    """The pairs whose source is cut to exactly ``source_tokens`` tokens (its text re-encodes to the
    same length; shorter sources are dropped) and whose target has at most ``max_target_tokens``
    tokens: with one source length there is no padding, left (``distill.generations``) or right."""
    out = []
    for source, target in pairs:
        ids = tokenizer(source, add_special_tokens=False)["input_ids"]
        if len(ids) < source_tokens or len(tokenizer(target, add_special_tokens=False)["input_ids"]) > max_target_tokens:
            continue
        text = tokenizer.decode(ids[:source_tokens])
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == source_tokens:
            out.append((text, target))
    return out


@torch.no_grad()
def score(model, tokenizer, pairs, max_source_len: int, max_new_tokens: int) -> tuple[float, float]:
    """Mean sentence BLEU (×100) and exact-match rate of greedy outputs against the gold targets."""
    model.eval()
    bleu, exact = 0.0, 0
    for k in range(0, len(pairs), 32):
        chunk = pairs[k:k + 32]
        enc = tokenizer([s for s, _ in chunk], max_length=max_source_len, truncation=True, padding=True,
                        return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        for (_, gold), ids in zip(chunk, out):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            bleu += word_bleu(text, gold)
            exact += text == gold
    return 100 * bleu / len(pairs), exact / len(pairs)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds: tiny data and budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    t0 = time.time()
    if args.quick:
        V, S, Tmax, n_train, n_test, t_epochs, s_epochs, td, sd, s_layers = 400, 24, 24, 16, 4, 1, 1, 32, 16, 1
        modules = ["json", "textwrap", "string", "collections", "functools", "argparse", "logging", "os"]
    else:
        V, S, Tmax, n_train, n_test, t_epochs, s_epochs, td, sd, s_layers = 1024, 47, 24, 1000, 100, 12, 8, 96, 64, 1
        modules = None  # the whole standard library
    passages = stdlib_docstrings(max_chars=800, seed=args.seed, modules=modules)
    train_p, test_p = split_passages(passages, held_out=0.2)
    tok = bpe_tokenizer([p.text for p in train_p], V)
    kw = dict(max_target_chars=200, min_target_chars=10)
    train = fixed_length_pairs(summary_pairs(train_p, **kw), tok, S, Tmax - 1)[:n_train]
    test = fixed_length_pairs(summary_pairs(test_p, **kw), tok, S, Tmax - 1)[:n_test]
    S += 1  # the EOS the tokenizer appends to every source
    fit_kw = dict(optimizer="adamw", lr=3e-3, weight_decay=0.0, progress=False, seed=args.seed)
    loader = seq2seq_loader(train, tok, 16, S, Tmax, seed=args.seed)
    times: dict[str, float] = {}

    def timed(name, t):
        times[name] = time.time() - t
        b, e = results[name]
        print(f"  {name:<55} BLEU {b:5.1f}  exact {e:4.2f}  ({times[name]:.0f}s)", flush=True)

    def train_ce(model, epochs):
        fit(Distiller(model, None, {"ce": 1.0}), loader, None, epochs=epochs, **fit_kw)
        return model

    t = time.time()
    teacher = train_ce(tiny_marian(len(tok), d_model=td, layers=2, heads=4, seed=100 + args.seed), t_epochs)
    results: dict[str, tuple[float, float]] = {"teacher": score(teacher, tok, test, S, Tmax)}
    timed("teacher", t)

    def student():
        return tiny_marian(len(tok), d_model=sd, layers=s_layers, heads=4, seed=args.seed)

    t = time.time()
    results["student: ce only"] = score(train_ce(student(), s_epochs), tok, test, S, Tmax)
    timed("student: ce only", t)
    common = dict(teacher=teacher, tokenizer=tok, epochs=s_epochs, max_source_len=S, max_target_len=Tmax,
                  max_new_tokens=Tmax, batch_size=16, **fit_kw)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("word", "sequence", "interpolation"):
            t = time.time()
            m = student()
            seq_kd(m, train, mode=mode, beam_size=5, generations_path=Path(tmp) / f"{mode}.jsonl", **common)
            name = f"seq_kd mode={mode} (Kim & Rush 2016)"
            results[name] = score(m, tok, test, S, Tmax)
            timed(name, t)
    t = time.time()
    m = student()
    fit(Distiller(m, teacher, {"ce": 1.0, "teaching_attention": {}}), loader, None, epochs=s_epochs, **fit_kw)
    name = "ce + teaching_attention (Duan et al. 2019)"
    results[name] = score(m, tok, test, S, Tmax)
    timed(name, t)
    t = time.time()
    second = train_ce(tiny_marian(len(tok), d_model=td, layers=2, heads=4, seed=200 + args.seed), t_epochs)
    results["second teacher (ensemble member)"] = score(second, tok, test, S, Tmax)
    timed("second teacher (ensemble member)", t)
    t = time.time()
    m = student()
    search_kd(m, loader, teacher=[teacher, second], epochs=s_epochs, mode="both", max_new_tokens=Tmax,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, decoder_start_token_id=0, **fit_kw)
    name = "search_kd both, 2-teacher ensemble (Liu et al. 2018)"
    results[name] = score(m, tok, test, S, Tmax)
    timed(name, t)

    print(f"{len(train)} training pairs, {len(test)} held-out; BPE {len(tok)} tokens, sources {S} tokens; teachers "
          f"d_model={td} x2+2 layers, {t_epochs} epochs; students d_model={sd} x{s_layers}+{s_layers} layer(s), "
          f"{s_epochs} epochs each ({s_epochs * len(loader)} steps of 16), seed {args.seed}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'model':<55} {'BLEU':>6} {'exact':>6} {'time':>6}")
    for name, (b, e) in results.items():
        print(f"{name:<55} {b:6.1f} {e:6.2f} {times.get(name, 0):5.0f}s")
    print(f"(total {time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
