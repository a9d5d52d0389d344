"""Issue 17 (H): MetaDistil vs KD, D3Former vs LwF-like KD vs fine-tuning (class-incremental), and the
function-matching ablation of "A good teacher is patient and consistent", on MNIST / Fashion-MNIST.

    python benchmarks/meta_incremental.py --quick        # < 2 min, one seed, tiny budgets
    python benchmarks/meta_incremental.py                # the real mode (~10 min on 1 CPU thread)
    python benchmarks/meta_incremental.py --only fm      # one section: meta, incremental or fm

Regimes (chosen so that each paper's effect can show on a CPU):

* meta: Fashion-MNIST, 2,000 training images, a LeNet-5 teacher trained on them (Adam, 6 epochs), a LeNet-5-half
  student; KD (w_ce 0.1, w_kd 0.9, T 4, SGD 0.05) with a fixed teacher vs MetaDistil (the same loss, the teacher
  updated by the meta-gradient on a 10% quiz split). Both train on the same 90% split. Seeds 0-2.
* incremental: MNIST, 5 tasks of 2 digits, 100 training images per class, 10 exemplars per class, a
  ``vit_tiny`` with 7x7 patches (16 tokens), AdamW 1e-3, epochs per task as printed. Average incremental
  accuracy (mean over phases of the accuracy on all classes seen), final accuracy, average forgetting.
* fm: Fashion-MNIST, the student (LeNet-5-half) sees only 1,000 images (the paper's small-data regime where
  function matching matters), a LeNet-5 teacher trained on 10,000 (5 epochs); KL only, T = 1, Adam 1e-3; the four
  teacher/student view modes at a short and a patient budget (epochs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import distill  # noqa: E402
from distill.data import get_dataset  # noqa: E402
from distill.data.loader import InMemoryLoader  # noqa: E402
from distill.models import create  # noqa: E402
from distill.strategies.function_matching import FM_MODES, fit_function_matching  # noqa: E402
from distill.strategies.incremental import fit_class_incremental  # noqa: E402
from distill.strategies.metadistil import fit_metadistil  # noqa: E402
from distill.train.evaluate import evaluate  # noqa: E402


def _teacher(x: torch.Tensor, y: torch.Tensor, val: InMemoryLoader, epochs: int) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(0)
    model = create("lenet5", num_classes=10, image_size=28)
    d = distill.Distiller(model, None, {"ce": 1.0})
    res = distill.fit(d, InMemoryLoader(x, y, 64, seed=0), val, epochs=epochs, optimizer="adam", lr=2e-3,
                      weight_decay=0.0, schedule="constant", progress=False, eval_teacher=False)
    return model.eval(), float(res.last_acc)


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def bench_meta(quick: bool) -> str:
    tr, te = get_dataset("fashion_mnist", split="train"), get_dataset("fashion_mnist", split="test")
    n, epochs, seeds = (600, 1, [0]) if quick else (2000, 4, [0, 1, 2])
    x, y = tr.inputs[:n], tr.targets[:n]
    val = InMemoryLoader(te.inputs[:2000], te.targets[:2000], 500, shuffle=False)
    teacher, t_acc = _teacher(x, y, val, 2 if quick else 6)
    rows: dict[str, list[float]] = {"KD (fixed teacher)": []}
    for seed in seeds:
        # the same 90% training split for both (MetaDistil's quiz set is the other 10%)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        keep = order[round(0.1 * n):]
        torch.manual_seed(seed)
        student = create("lenet5_half", num_classes=10, image_size=28)
        d = distill.Distiller(student, teacher, {"ce": 0.1, "kd": distill.methods.KD(T=4.0, weight=0.9)})
        res = distill.fit(d, InMemoryLoader(x[keep], y[keep], 64, seed=seed), val, epochs=epochs, lr=0.05,
                          schedule="constant", progress=False, seed=seed)
        rows["KD (fixed teacher)"].append(float(res.last_acc))
        for mu in (0.05, 1e-3):  # the authors' CV default, and a 50x smaller teacher step
            torch.manual_seed(seed)
            meta = fit_metadistil(lambda: create("lenet5_half", num_classes=10, image_size=28),
                                  InMemoryLoader(x, y, 64, seed=seed), val, teacher=teacher, epochs=epochs, seed=seed,
                                  progress=False, lr=0.05, teacher_lr=mu)
            rows.setdefault(f"MetaDistil, teacher lr {mu:g}", []).append(float(meta.last_acc))
            rows.setdefault(f"  its teacher (lr {mu:g})", []).append(float(meta.history[-1]["val_teacher_acc"]))
    lines = [f"[meta] Fashion-MNIST, {n} train images, {epochs} epochs, seeds {seeds}; teacher LeNet-5 "
             f"{t_acc:.2f}% (fixed), student LeNet-5-half; test top-1 (%) on 2000 test images",
             f"{'row':<24} {'student top-1':>18}"]
    lines += [f"{k:<24} {_mean_sd(v):>18}" for k, v in rows.items()]
    return "\n".join(lines)


def bench_incremental(quick: bool) -> str:
    tr, te = get_dataset("mnist", split="train"), get_dataset("mnist", split="test")
    per_class, epochs, seeds = (30, 2, [0]) if quick else (100, 6, [0, 1])
    idx = torch.cat([(tr.targets == c).nonzero()[:per_class, 0] for c in range(10)])
    vidx = torch.cat([(te.targets == c).nonzero()[:200, 0] for c in range(10)])
    train = InMemoryLoader(tr.inputs[idx], tr.targets[idx], 64)
    val = InMemoryLoader(te.inputs[vidx], te.targets[vidx], 500, shuffle=False)
    out = {}
    # the last row: D3Former with the cosine head's scale starting at 10 instead of LUCIR's 1 (ours)
    for label, method, extra in (("finetune", "finetune", {}), ("lwf", "lwf", {}), ("d3former", "d3former", {}),
                                 ("d3former s0=10", "d3former", {"cosine_scale": 10.0})):
        res = [fit_class_incremental(lambda: create("vit_tiny", num_classes=10, patch_size=7), train, val,
                                     epochs=epochs, method=method, num_tasks=5, memory_per_class=10, seed=s,
                                     optimizer="adamw", lr=1e-3, weight_decay=0.05, progress=False, **extra)
               for s in seeds]
        out[label] = res
    lines = [f"[incremental] MNIST, 5 tasks x 2 classes, {per_class} train images/class, 10 exemplars/class, "
             f"vit_tiny (7x7 patches), {epochs} epochs/task, seeds {seeds}; 200 test images/class",
             f"{'method':<15} {'avg incr. acc':>16} {'final acc':>16} {'forgetting':>16}  last-phase per-task acc"]
    for m, res in out.items():
        lines.append(f"{m:<15} {_mean_sd([r.avg_incremental_acc for r in res]):>16} "
                     f"{_mean_sd([r.last_acc for r in res]):>16} {_mean_sd([r.forgetting for r in res]):>16}  "
                     f"{[round(a) for a in res[0].acc_matrix[-1]]}")
    return "\n".join(lines)


def bench_fm(quick: bool, budgets: tuple[int, ...] | None = None, modes: tuple[str, ...] = FM_MODES) -> str:
    tr, te = get_dataset("fashion_mnist", split="train"), get_dataset("fashion_mnist", split="test")
    n_teacher, n_student, default = (2000, 300, (1, 3)) if quick else (10000, 1000, (4, 20))
    budgets = budgets or default
    val = InMemoryLoader(te.inputs[:2000], te.targets[:2000], 500, shuffle=False)
    teacher, t_acc = _teacher(tr.inputs[:n_teacher], tr.targets[:n_teacher], val, 2 if quick else 5)
    x, y = tr.inputs[:n_student], tr.targets[:n_student]
    lines = [f"[fm] Fashion-MNIST: teacher LeNet-5 on {n_teacher} images ({t_acc:.2f}%), student LeNet-5-half on "
             f"{n_student} images, KL only (T=1), Adam 1e-3, cosine schedule; student top-1 (%) / agreement with "
             "the teacher (%) on 2000 test images, seed 0",
             f"{'mode':<20} " + " ".join(f"{f'{e} epochs':>20}" for e in budgets)]
    for mode in modes:
        cells = []
        for e in budgets:
            torch.manual_seed(0)
            student = create("lenet5_half", num_classes=10, image_size=28)
            fit_function_matching(student, InMemoryLoader(x, y, 64, seed=0), None, teacher=teacher, epochs=e,
                                  mode=mode, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine",
                                  grad_clip=1.0, progress=False)
            m = evaluate(distill.Distiller(student, teacher, {"ce": 1.0}), val)
            cells.append(f"{m['student_acc']:.2f} / {m['agreement']:.1f}")
        lines.append(f"{mode:<20} " + " ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, one seed (< 2 min)")
    ap.add_argument("--only", choices=("meta", "incremental", "fm"), help="run one section")
    ap.add_argument("--fm-budgets", type=int, nargs="+", help="fm: the epoch budgets (default 4 20)")
    ap.add_argument("--fm-modes", choices=FM_MODES, nargs="+", default=list(FM_MODES), help="fm: the view modes")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sections = {"meta": bench_meta, "incremental": bench_incremental,
                "fm": lambda quick: bench_fm(quick, tuple(args.fm_budgets or ()), tuple(args.fm_modes))}
    for name, fn in sections.items():
        if args.only in (None, name):
            print(fn(args.quick), flush=True)
            print(flush=True)
    cmd = "python " + " ".join(["benchmarks/meta_incremental.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {cmd}   ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
