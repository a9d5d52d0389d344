"""ResKD with searched res-students (``reskd_search``) on scikit-learn's digits.

A teacher (``cnn_digits_teacher``, ~214k parameters) is trained, then ResKD's student
(``cnn_digits_student``, ~2.3k) by KD, then res-students are searched in a family of ``cnn`` widths
(cheapest first; a candidate is kept when the chain's held-out accuracy gains ``--min-gain`` points;
the search and its stop are this library's, see ``distill.strategies.reskd_search``)::

    python examples/compression/reskd_search.py             # 30 epochs per stage
    python examples/compression/reskd_search.py --quick     # seconds: 3 epochs per stage

Prints every trial, the delivered chain's accuracy and cost per stage (relative to the teacher) and
the sample-adaptive inference's accuracy and mean cost. The data ship with scikit-learn.
"""

from __future__ import annotations

import argparse

import torch

import distill
from distill.data.loader import InMemoryLoader
from distill.strategies.reskd_search import reskd_search

FAMILY_WIDTHS = [(2, 2, 2), (2, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 16)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--min-gain", type=float, default=0.5)
    p.add_argument("--max-stages", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 epochs per stage, 2 res-students at most")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.max_stages = 3, 2
    torch.set_num_threads(1)
    data, test_data = distill.data.get_dataset("digits"), distill.data.get_dataset("digits", split="test")
    perm = torch.randperm(len(data.targets), generator=torch.Generator().manual_seed(0))
    x, y = data.inputs[perm], data.targets[perm]  # the 1347 training images, shuffled once
    train = InMemoryLoader(x[:1000], y[:1000], 50, seed=args.seed)
    held_out = InMemoryLoader(x[1000:], y[1000:], 347, shuffle=False)  # the search scores on this
    test = InMemoryLoader(test_data.inputs, test_data.targets, 450, shuffle=False)
    fit = {"optimizer": "adam", "lr": 0.005, "schedule": "cosine", "progress": False}

    torch.manual_seed(args.seed)
    teacher = distill.models.create("cnn_digits_teacher")
    t = distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), train, test, epochs=args.epochs, **fit)
    print(f"teacher: test {t.last_acc:.2f}%")
    family = [{"name": "cnn", "widths": list(w), "stem_width": max(2, w[0] // 2), "num_classes": 10}
              for w in FAMILY_WIDTHS]
    torch.manual_seed(args.seed)
    r = reskd_search("cnn_digits_student", train, test, teacher=teacher, family=family, held_out=held_out,
                     epochs=args.epochs, min_gain=args.min_gain, max_stages=args.max_stages, cost="macs",
                     seed=args.seed, **fit)
    for s in r.steps:
        print(f"  stage {s.stage}: try cnn{FAMILY_WIDTHS[s.candidate]} ({s.cost / r.teacher_cost:.2%} of the "
              f"teacher's MACs): held-out {s.acc:.2f}% (gain {s.gain:+.2f}) {'kept' if s.accepted else 'dropped'}")
    print(f"search stopped: {r.stop_reason}; chain: student + {[FAMILY_WIDTHS[i] for i in r.chosen]}")
    for k, (acc, cost) in enumerate(zip(r.stage_val_acc, r.stage_cost, strict=True)):
        print(f"after stage {k}: test {acc:.2f}%  held-out {r.stage_held_out_acc[k]:.2f}%  "
              f"MACs {cost / r.teacher_cost:.2%} of the teacher's")
    print(f"sample-adaptive (max prob >= 0.9 stops): test {r.adaptive_acc:.2f}%, "
          f"{r.avg_res_students:.2f} res-students per sample, MACs {r.adaptive_cost / r.teacher_cost:.2%} of the "
          f"teacher's")


if __name__ == "__main__":
    main()
