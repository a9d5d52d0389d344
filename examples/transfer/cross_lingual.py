"""Cross-lingual distillation (Xu & Yang, ACL 2017, arXiv 1705.02073) on a parallel corpus built offline.

The Python standard library's docstrings of its 8 largest packages are the documents (class = package);
English is the source language, and a deterministic word cipher with synonyms, reversed word order and
dropped words (``distill.data.transfer_x.cipher_translate``) is the "target language". An English teacher
trained on labelled English documents labels the English side of unlabelled parallel pairs; the
target-language student learns those soft labels (T = 3) from the target side and is tested on
target-language documents. Printed: the student trained on 5 labels per class alone, and the distilled one.

    python examples/transfer/cross_lingual.py                # 400/700/400 documents, 30 epochs
    python examples/transfer/cross_lingual.py --quick        # 200/300/200 documents, 8 epochs (< 60 s)
    python examples/transfer/cross_lingual.py --adversarial  # with adversarial feature adaptation
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from distill.data.transfer_x import docstring_parallel_task
from distill.models import create
from distill.strategies.transfer_x_common import train_in_memory
from distill.strategies.transfer_x_crosslingual import fit_cross_lingual_distill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--adversarial", action="store_true")
    p.add_argument("--grl-lambda", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    sizes = dict(n_source=200, n_parallel=300, n_test=200) if args.quick else {}
    epochs = 8 if args.quick else args.epochs
    d = docstring_parallel_task(seed=args.seed, **sizes)
    k, val = len(d["classes"]), [(d["test_x"], d["test_y"])]
    print(f"classes: {d['classes']}\nsource: {d['example'][0][:80]!r}\ntarget: {d['example'][1][:80]!r}")

    def bag(vocab: int) -> torch.nn.Module:
        return create("bag_of_embeddings", num_classes=k, vocab_size=vocab, dim=64, hidden=64)

    torch.manual_seed(args.seed)
    few = train_in_memory(bag(d["target_vocab"]), d["few_x"], d["few_y"], F.cross_entropy, epochs=2 * epochs,
                          batch_size=64, seed=args.seed, progress=True, what="few-label student", val_loader=val, lr=0.01)
    torch.manual_seed(args.seed)
    res = fit_cross_lingual_distill(lambda: bag(d["target_vocab"]), (d["parallel_source"], d["parallel_target"]), val,
                                    teacher_model=bag(d["source_vocab"]), source_labelled=(d["source_x"], d["source_y"]),
                                    epochs=epochs, seed=args.seed, temperature=args.temperature, lr=0.01, batch_size=64,
                                    adversarial=args.adversarial, target_unlabelled=d["test_x"], grl_lambda=args.grl_lambda)
    teacher_acc = float((res.teacher_logits.argmax(1) == d["parallel_y"]).float().mean()) * 100
    print(f"target student, {len(d['few_y']) // k} labels per class: {few.last_acc:.1f}%")
    print(f"English teacher on the parallel corpus's English side: {teacher_acc:.1f}%")
    print(f"target student distilled on parallel text: {res.last_acc:.1f}%")


if __name__ == "__main__":
    main()
