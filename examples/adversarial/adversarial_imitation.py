"""Adversarial imitation KD (Liu, Chen, Liu, AAAI 2019) on a real token-tagging task built offline.

Event triggers in the Python standard library's docstrings (``distill.data.adversarial_tagging``: a verb
of a fixed list followed by an argument start, "return the value" but not "the return value"). The
teacher tagger reads the words and the gold argument annotations; the student reads the words alone and
imitates the teacher's per-token features through a discriminator, on the teacher's frozen classifier.
Prints the token F1 of the trigger tag of the teacher, the student alone and the imitating student.

    python examples/adversarial/adversarial_imitation.py            # 600 windows, 10 epochs
    python examples/adversarial/adversarial_imitation.py --quick    # 300 windows, 4 epochs (< 60 s)
"""

from __future__ import annotations

import argparse

import torch

from distill.data.adversarial_tagging import TaggingLoader, build_tagging_sets
from distill.data.corpus import split_passages, stdlib_docstrings
from distill.models.adversarial_tagger import TokenTagger
from distill.strategies.adversarial_imitation import adversarial_imitation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=600)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--adv-weight", type=float, default=1.0)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.windows, a.epochs = 300, 4
    torch.set_num_threads(1)
    train_part, held_out = split_passages(stdlib_docstrings(), 0.2)  # split by package
    train, val = build_tagging_sets([x.text for x in train_part], [x.text for x in held_out], max_train=a.windows)
    print(f"{len(train)} training windows ({int((train.tags == 1).sum())} triggers), {len(val)} held-out windows "
          f"({int((val.tags == 1).sum())} triggers)")
    v = len(train.vocab)
    for name, kw in (("student alone", dict(adv_weight=0.0, share_classifier=False)),
                     (f"student + adversarial imitation (adv {a.adv_weight})", dict(adv_weight=a.adv_weight))):
        torch.manual_seed(0)
        r = adversarial_imitation(TokenTagger(v), TaggingLoader(train, 32), TaggingLoader(val, 512, shuffle=False),
                                  teacher=TokenTagger(v, annotation_vocab=2), epochs=a.epochs, teacher_epochs=10,
                                  lr=0.01, progress=False, **kw)
        last = r.history[-1]
        print(f"teacher (gold annotations) F1 {last['teacher_f1']:.1f} | {name}: F1 {last['student_f1']:.1f} "
              f"(precision {last['student_precision']:.1f}, recall {last['student_recall']:.1f})")


if __name__ == "__main__":
    main()
