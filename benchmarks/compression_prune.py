"""Compression I (issue 17, part D) on the embedded digits (8x8, 10 classes), one CPU thread:

1. **Net2Net** (Chen et al., ICLR 2016, arXiv 1511.05641). The paper's claim: a student grown from a
   trained teacher by function-preserving transformations reaches a given accuracy much sooner than the
   same architecture from a random initialisation. A cnn (stem 2, stages 4-4-8) trained on the digits is
   widened to cnn_digits_student's widths (stem 4, 8-8-16) and deepened after stage2; validation accuracy
   per epoch, Net2Net init vs random init (same lr; and random init at the teacher's higher lr).
2. **Prune, then distill** (Park & No, ECCV 2022, arXiv 2109.14960). The claim: a teacher pruned by
   iterative magnitude pruning with learning-rate rewinding teaches better than the unpruned one. The
   digits student protocol (270 labelled images, crop augmentation, 40 epochs cosine); cnn_digits_teacher
   pruned to 79% sparsity (7 rounds of 20%); KD ce 0.05 + kd 0.95 at T = 10 (the authors' code) into
   cnn_digits_student, and into the student built from the pruned teacher (the paper's scheme).
3. **DDSL** (Liu et al., TPAMI 2023). Accuracy vs remaining channels of a student pruned by ADMM while
   distilled, with and without the distillability term (kd = 0, no dean) and with KD at a fixed weight
   (no dean).

    python benchmarks/compression_prune.py --quick   # < 2 min: 1 seed, short schedules
    python benchmarks/compression_prune.py           # 3 seeds, the full schedules (~20 min, one busy CPU thread)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _data(train_subset: int | None, batch_size: int, augment: bool):
    from distill.data import get_dataset
    from distill.data.augment import RandomCropPad
    from distill.data.loader import InMemoryLoader

    tr, va = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    x, y = (tr.inputs, tr.targets) if train_subset is None else (tr.inputs[:train_subset], tr.targets[:train_subset])
    aug = RandomCropPad(1) if augment else None
    train = InMemoryLoader(x, y, batch_size, shuffle=True, seed=0, augment=aug)
    return train, va.loader(512)


def _train(model, train, val, epochs: int, lr: float, seed: int, schedule: str = "cosine"):
    from distill import Distiller, fit

    return fit(Distiller(model, None, {"ce": 1.0}), train, val, epochs=epochs, lr=lr, schedule=schedule, seed=seed,
               progress=False, eval_teacher=False)


def net2net_section(seeds: list[int], teacher_epochs: int, epochs: int) -> list[str]:
    from distill.models import create
    from distill.strategies.net2net import fit_net2net

    train, val = _data(None, 64, False)
    torch.manual_seed(0)
    teacher = create("cnn", num_classes=10, widths=(4, 4, 8), stem_width=2)
    t_acc = _train(teacher, train, val, teacher_epochs, 0.05, 0).last_acc
    rows: dict[str, list[list[float]]] = {"net2net (lr 0.01)": [], "random init (lr 0.01)": [],
                                          "random init (lr 0.05)": []}
    gaps = []
    for seed in seeds:
        for label, init, lr in (("net2net (lr 0.01)", "net2net", 0.01), ("random init (lr 0.01)", "random", 0.01),
                                ("random init (lr 0.05)", "random", 0.05)):
            res = fit_net2net(lambda: create("cnn_digits_student", num_classes=10), train, val, teacher=teacher,
                              epochs=epochs, deepen=["stage2.act"], init=init, seed=seed, progress=False, lr=lr,
                              schedule="constant", eval_teacher=False)
            rows[label].append([h["val_student_acc"] for h in res.history])
            if res.function_gap is not None:
                gaps.append(res.function_gap)
    marks = [e for e in (1, 2, 3, 5, 10, 20, 40) if e <= epochs]
    out = [f"teacher cnn(stem 2, 4-4-8), {teacher_epochs} epochs: {t_acc:.1f}% val; grown to cnn_digits_student + one "
           f"identity conv after stage2; max |grown - teacher| logits before training: {max(gaps):.1e}",
           "", "| init | " + " | ".join(f"ep {e}" for e in marks) + f" | epochs to ≥ {t_acc:.0f}% (teacher) |",
           "|---|" + "---|" * (len(marks) + 1)]
    for label, curves in rows.items():
        cells = [_fmt([c[e - 1] for c in curves]) for e in marks]
        reach = [next((i + 1 for i, a in enumerate(c) if a >= t_acc), None) for c in curves]
        reach_s = ", ".join(str(r) if r is not None else f">{epochs}" for r in reach)
        out.append(f"| {label} | " + " | ".join(cells) + f" | {reach_s} |")
    return out


def prune_section(seeds: list[int], teacher_epochs: int, prune_epochs: int, epochs: int) -> list[str]:
    from distill import Distiller, fit
    from distill.models import create
    from distill.strategies.prune_distill import (
        fit_prune_then_distill,
        prune_rounds,
        prune_teacher,
        student_from_pruned,
        weight_sparsity,
    )

    train, val = _data(270, 32, True)
    torch.manual_seed(0)
    teacher = create("cnn_digits_teacher", num_classes=10)
    t_acc = _train(teacher, train, val, teacher_epochs, 0.05, 0).last_acc
    rounds = prune_rounds(0.8)
    t0 = time.perf_counter()
    pruned, round_accs = prune_teacher(teacher, train, val, rounds=rounds, epochs=prune_epochs, progress=False,
                                       lr=0.05, schedule="cosine", eval_teacher=False)
    prune_s = time.perf_counter() - t0
    teachers = {"unpruned": teacher, f"pruned {100 * weight_sparsity(pruned):.0f}%": pruned}
    small = create("cnn_digits_student", num_classes=10)
    scheme = student_from_pruned(pruned)
    n_small = sum(p.numel() for p in small.parameters())
    n_scheme = sum(p.numel() for p in scheme.parameters())
    rows: list[tuple[str, str, list[float]]] = []
    for seed in seeds:
        torch.manual_seed(seed)
        ce = fit(Distiller(create("cnn_digits_student", num_classes=10), None, {"ce": 1.0}), train, val, epochs=epochs,
                 lr=0.05, schedule="cosine", seed=seed, progress=False, eval_teacher=False)
        rows.append(("cnn_digits_student", "none (CE)", [ce.last_acc]))
    for student_name, make in (("cnn_digits_student", lambda s: create("cnn_digits_student", num_classes=10)),
                               ("from pruned teacher", lambda s: student_from_pruned(pruned, seed=s))):
        for t_name, t in teachers.items():
            for seed in seeds:
                torch.manual_seed(seed)
                res = fit_prune_then_distill(make(seed), train, val, teacher=t, epochs=epochs, sparsity=0.0, seed=seed,
                                             progress=False, lr=0.05, schedule="cosine", eval_teacher=False)
                rows.append((student_name, t_name, [res.last_acc]))
    merged: dict[tuple[str, str], list[float]] = {}
    for s, t, a in rows:
        merged.setdefault((s, t), []).extend(a)
    out = [f"teacher cnn_digits_teacher, {teacher_epochs} epochs on 270 images: {t_acc:.1f}% val; pruned in {rounds} "
           f"rounds x {prune_epochs} epochs (lr rewinding, {prune_s:.0f} s): "
           + ", ".join(f"{a:.1f}" for a in round_accs) + "% val after each round",
           f"students: cnn_digits_student {n_small} params; built from the pruned teacher {n_scheme} params "
           f"(teacher {sum(p.numel() for p in teacher.parameters())}, non-zero after pruning "
           f"{sum(int((p != 0).sum()) for p in pruned.parameters())})",
           "", "| student | teacher | student val acc (last epoch) |", "|---|---|---|"]
    out += [f"| {s} | {t} | {_fmt(a)} |" for (s, t), a in merged.items()]
    return out


def ddsl_section(seeds: list[int], teacher_epochs: int, epochs: int, finetune: int, keeps: list[float]) -> list[str]:
    from distill.models import create
    from distill.strategies.dissparse import fit_dissparse

    train, val = _data(270, 32, True)
    torch.manual_seed(0)
    teacher = create("cnn_digits_teacher", num_classes=10)
    t_acc = _train(teacher, train, val, teacher_epochs, 0.05, 0).last_acc
    variants = {"DDSL (kd + dean)": {"kd": 1.0, "dean": True}, "kd fixed, no dean": {"kd": 1.0, "dean": False},
                "no distillability term (kd 0)": {"kd": 0.0, "dean": False}}
    out = [f"teacher cnn_digits_teacher {t_acc:.1f}% val; student cnn(stem 8, 16-16-32); {epochs} joint epochs + "
           f"{finetune} fine-tuning epochs with the masks held; 270 images",
           "", "| keep | remaining / total gated channels | variant | pruned student val acc | final λ_ce, λ_kd, λ_sp |",
           "|---|---|---|---|---|"]
    for keep in keeps:
        for label, kw in variants.items():
            accs, lams, chans = [], [], ""
            for seed in seeds:
                torch.manual_seed(seed)
                student = create("cnn", num_classes=10, widths=(16, 16, 32), stem_width=8)
                res = fit_dissparse(student, train, val, teacher=teacher, epochs=epochs, keep=keep,
                                    finetune_epochs=finetune, seed=seed, progress=False, lr=0.05, schedule="cosine",
                                    eval_teacher=False, **kw)
                accs.append(res.last_acc)
                lams.append(res.lambdas[-1])
                chans = f"{res.remaining_channels} / {res.total_channels}"
            lam_s = ", ".join(f"{statistics.mean(d[k] for d in lams):.2f}" for k in ("ce", "kd", "sp"))
            out.append(f"| {keep} | {chans} | {label} | {_fmt(accs)} | {lam_s} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed and short schedules (< 2 min)")
    ap.add_argument("--only", choices=("net2net", "prune", "ddsl"), default=None, help="run one section")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    start = time.perf_counter()
    lines = ["$ python " + " ".join(shlex.quote(a) for a in ["benchmarks/compression_prune.py", *sys.argv[1:]]), ""]
    if args.only in (None, "net2net"):
        lines += ["## Net2Net: time to accuracy of the grown student (digits, all 1347 training images)", ""]
        lines += net2net_section(seeds, 3 if args.quick else 15, 3 if args.quick else 10) + [""]
    if args.only in (None, "prune"):
        lines += ["## Prune, then distill: KD from the unpruned vs the pruned teacher (digits, 270 images)", ""]
        lines += prune_section(seeds, 5 if args.quick else 20, 1 if args.quick else 5, 5 if args.quick else 40) + [""]
    if args.only in (None, "ddsl"):
        lines += ["## DDSL: accuracy vs remaining channels, with and without the distillability term", ""]
        lines += ddsl_section(seeds, 5 if args.quick else 20, 3 if args.quick else 30, 1 if args.quick else 10,
                              [0.5] if args.quick else [0.5, 0.25]) + [""]
    lines.append(f"({time.perf_counter() - start:.0f} s, 1 CPU thread; seeds {seeds})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
