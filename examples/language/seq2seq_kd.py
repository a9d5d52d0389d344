"""Sequence-to-sequence distillation on real offline text: a docstring's summary line from the docstring.

Data: the Python standard library's docstrings (:func:`distill.data.corpus.stdlib_docstrings`); the
source is a passage, the target its first sentence (:func:`distill.data.seq2seq.summary_pairs`,
lead extraction: the closest honest small stand-in for summarisation / MT, which have no offline
corpus here). Byte-level tokens (ByT5's tokenizer, no download); tiny T5s built from configs.

A teacher (and, for Liu et al.'s ensemble, a second teacher from another seed) is trained on the
gold pairs; then students of one size, seed and budget are trained with cross-entropy alone and
with each method, and scored on held-out passages by greedy decoding: sentence BLEU of the output
against the gold first sentence (smoothed, :func:`distill.generations.word_bleu`) and exact match.

    .venv/bin/python examples/language/seq2seq_kd.py            # about 2 minutes on 2 CPU cores
    .venv/bin/python examples/language/seq2seq_kd.py --quick    # a few seconds, a smoke test
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from distill import Distiller, fit
from distill.data.corpus import split_passages, stdlib_docstrings
from distill.data.seq2seq import byte_tokenizer, seq2seq_loader, summary_pairs
from distill.generations import word_bleu
from distill.models.seq2seq import tiny_t5
from distill.strategies.search_kd import search_kd
from distill.strategies.sequence_kd import seq_kd


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
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message=".*were cut to max_source_len.*")
    t0 = time.time()
    if args.quick:
        n_train, n_test, t_epochs, s_epochs, S, Tmax, td, sd = 8, 4, 1, 1, 24, 8, 32, 16
        modules = ["json", "textwrap", "string", "collections", "functools", "argparse", "logging", "os"]
    else:
        n_train, n_test, t_epochs, s_epochs, S, Tmax, td, sd = 256, 48, 10, 5, 64, 40, 96, 48
        modules = None  # the whole standard library
    passages = stdlib_docstrings(max_chars=800, seed=args.seed, modules=modules)
    train_p, test_p = split_passages(passages, held_out=0.2)
    kw = dict(max_target_chars=max(Tmax - 4, 20), min_target_chars=10)
    train = summary_pairs(train_p, **kw)[:n_train]
    test = summary_pairs(test_p, **kw)[:n_test]
    tok = byte_tokenizer()
    V = len(tok)
    fit_kw = dict(optimizer="adamw", lr=3e-3, weight_decay=0.0, progress=False, seed=args.seed)
    loader = seq2seq_loader(train, tok, 16, S, Tmax, seed=args.seed)

    def train_ce(model, epochs):
        fit(Distiller(model, None, {"ce": 1.0}), loader, None, epochs=epochs, **fit_kw)
        return model

    teacher = train_ce(tiny_t5(V, d_model=td, layers=2, heads=4, seed=100 + args.seed), t_epochs)
    results: dict[str, tuple[float, float]] = {"teacher": score(teacher, tok, test, S, Tmax)}

    def student():
        return tiny_t5(V, d_model=sd, layers=1, heads=4, seed=args.seed)

    results["student: ce only"] = score(train_ce(student(), s_epochs), tok, test, S, Tmax)
    common = dict(teacher=teacher, tokenizer=tok, epochs=s_epochs, max_source_len=S, max_target_len=Tmax,
                  max_new_tokens=Tmax, batch_size=16, **fit_kw)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("word", "sequence", "interpolation"):
            m = student()
            seq_kd(m, train, mode=mode, beam_size=4, generations_path=Path(tmp) / f"{mode}.jsonl", **common)
            results[f"seq_kd mode={mode} (Kim & Rush 2016)"] = score(m, tok, test, S, Tmax)
    m = student()
    fit(Distiller(m, teacher, {"ce": 1.0, "teaching_attention": {}}), loader, None, epochs=s_epochs, **fit_kw)
    results["ce + teaching_attention (Duan et al. 2019)"] = score(m, tok, test, S, Tmax)
    second = train_ce(tiny_t5(V, d_model=td, layers=2, heads=4, seed=200 + args.seed), t_epochs)
    m = student()
    search_kd(m, loader, teacher=[teacher, second], epochs=s_epochs, mode="both", max_new_tokens=Tmax,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, decoder_start_token_id=0, **fit_kw)
    results["search_kd both, 2-teacher ensemble (Liu et al. 2018)"] = score(m, tok, test, S, Tmax)

    print(f"{len(train)} training pairs, {len(test)} held-out; teacher d_model={td} x2 layers, students d_model={sd} "
          f"x1 layer, {s_epochs} epochs each, seed {args.seed}")
    print(f"{'model':<55} {'BLEU':>6} {'exact':>6}")
    for name, (b, e) in results.items():
        print(f"{name:<55} {b:6.1f} {e:6.2f}")
    print(f"({time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
