"""Issue 17 (H): MetaDistil vs KD, D3Former vs LwF-like KD vs fine-tuning (class-incremental), and the
function-matching ablation of "A good teacher is patient and consistent", on MNIST / Fashion-MNIST.

    python benchmarks/meta_incremental.py --quick        # < 2 min, one seed, tiny budgets
    python benchmarks/meta_incremental.py                # the real mode (~10 min on 1 CPU thread)
    python benchmarks/meta_incremental.py --only fm      # one section: meta, incremental or fm

Regimes (chosen so that each paper's effect can show on a CPU):

* meta: Fashion-MNIST. A LeNet-5 teacher trained on 20,000 images (Adam, 8 epochs, ~88%); a LeNet-5-half student
  (with BatchNorm, like the authors' CIFAR students) on 1,000 images: 90% to train on, 10% MetaDistil's quiz set
  (every row trains on the same 90%). SGD momentum 0.9, wd 5e-4, lr 0.05 for 30 epochs then 0.005 for 10 (the
  authors' CV lr and its x0.1 decay). Rows: the student alone (CE), KD from the fixed teacher (0.1 CE + 0.9 T²KL;
  T = 1, ours: at the authors' T = 4 KD gained < 0.5 point over CE here), ``fit_metadistil`` with its default
  teacher warm-up (the teacher fixed, plain KD, until the first lr milestone, as the authors' CV script keeps it
  until epoch 150 of 240; the pilot step and the student's lr decay together) at teacher lr μ = 0.05 (the
  authors') and 1e-3, and without the warm-up (the paper's Algorithm 1 from the first step) at μ = 0.05. Seeds
  0-2. Sizes: --meta-teacher-images, --meta-student-images, --meta-epochs, --meta-finetune-epochs, --meta-T,
  --meta-seeds, --meta-skip-no-warmup.
* incremental: MNIST, 5 tasks of 2 digits, 100 training images per class, 10 exemplars per class, a
  ``vit_tiny`` with 7x7 patches (16 tokens), AdamW 1e-3, epochs per task as printed. Average incremental
  accuracy (mean over phases of the accuracy on all classes seen), final accuracy, average forgetting.
* fm: Fashion-MNIST, the student (LeNet-5-half) sees only 1,000 images (the paper's small-data regime where
  function matching matters), a LeNet-5 teacher trained on 10,000 (5 epochs); KL only, T = 1, Adam 1e-3; the four
  teacher/student view modes at a short and a patient budget (epochs).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
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


def _meta_student() -> torch.nn.Module:
    return create("lenet5_half", num_classes=10, image_size=28, batch_norm=True)


def _meta_seed(seed: int, teacher_state: dict, n: int, e1: int, e2: int, T: float,
               no_warmup_row: bool) -> list[tuple[str, float]]:
    """One seed of the meta section: its rows as (label, top-1) pairs (run in a worker process)."""
    torch.set_num_threads(1)
    tr, te = get_dataset("fashion_mnist", split="train"), get_dataset("fashion_mnist", split="test")
    val = InMemoryLoader(te.inputs[:2000], te.targets[:2000], 500, shuffle=False)
    teacher = create("lenet5", num_classes=10, image_size=28)
    teacher.load_state_dict(teacher_state)
    teacher.eval()
    x, y = tr.inputs[:n], tr.targets[:n]
    lr, lr2 = 0.05, 0.005  # the authors' student lr, and after their decay (x0.1)
    out: list[tuple[str, float]] = []
    # the same 90% training split for every row (MetaDistil's quiz set is the other 10%)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keep = order[round(0.1 * n):]
    for label, losses, t in (("student alone (CE)", {"ce": 1.0}, None),
                             ("KD (fixed teacher)", {"ce": 0.1, "kd": distill.methods.KD(T=T, weight=0.9)}, teacher)):
        torch.manual_seed(seed)
        res = distill.fit(distill.Distiller(_meta_student(), t, losses), InMemoryLoader(x[keep], y[keep], 64, seed=seed),
                          val, epochs=e1 + e2, lr=lr, schedule="multistep", milestones=[e1], gamma=lr2 / lr,
                          progress=False, seed=seed, eval_teacher=False)
        out.append((label, float(res.last_acc)))
    data = InMemoryLoader(x, y, 64, seed=seed)
    # fit_metadistil's own schedule: lr 0.05, x0.1 at epoch e1 (student and pilot step); the teacher fixed until e1
    # (the default warm-up: the first milestone, as the authors' epoch 150 of 240), then meta-updates.
    # Last row: no warm-up (the paper's Algorithm 1 from the first step), for the contrast.
    for label, mu, warm in ((f"MetaDistil, warm-up {e1} ep, μ=0.05", 0.05, None),
                            (f"MetaDistil, warm-up {e1} ep, μ=1e-3", 1e-3, None),
                            ("MetaDistil, no warm-up, μ=0.05", 0.05, 0))[:3 if no_warmup_row else 2]:
        meta = fit_metadistil(_meta_student, data, val, teacher=teacher, epochs=e1 + e2, seed=seed, progress=False,
                              lr=lr, teacher_lr=mu, T=T, milestones=[e1], teacher_warmup_epochs=warm)
        out.append((label, float(meta.last_acc)))
        out.append((f"  its teacher ({label.split(', ', 1)[1]})", float(meta.history[-1]["val_teacher_acc"])))
    print(f"[meta] seed {seed} done: " + ", ".join(f"{k.strip()} {v:.2f}" for k, v in out), file=sys.stderr,
          flush=True)
    return out


def bench_meta(quick: bool, n_teacher: int | None = None, n_student: int | None = None,
               epochs: int | None = None, finetune_epochs: int | None = None, seeds: list[int] | None = None,
               teacher_epochs: int | None = None, T: float | None = None, no_warmup_row: bool = True,
               workers: int = 1) -> str:
    tr, te = get_dataset("fashion_mnist", split="train"), get_dataset("fashion_mnist", split="test")
    d_nt, d_ns, d_e1, d_e2, d_te, d_seeds = (2000, 600, 2, 1, 2, [0]) if quick else (20000, 1000, 30, 10, 8, [0, 1, 2])
    n_teacher, n, e1, e2 = n_teacher or d_nt, n_student or d_ns, epochs or d_e1, finetune_epochs or d_e2
    seeds, teacher_epochs, T = seeds or d_seeds, teacher_epochs or d_te, T or 1.0
    lr, lr2 = 0.05, 0.005
    val = InMemoryLoader(te.inputs[:2000], te.targets[:2000], 500, shuffle=False)
    teacher, t_acc = _teacher(tr.inputs[:n_teacher], tr.targets[:n_teacher], val, teacher_epochs)
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    args = [(seed, state, n, e1, e2, T, no_warmup_row) for seed in seeds]
    if workers > 1:  # seeds in parallel processes (the same computation per seed as in one process)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(seeds)), mp_context=ctx) as pool:
            per_seed = list(pool.map(_meta_seed, *zip(*args)))
    else:
        per_seed = [_meta_seed(*a) for a in args]
    rows: dict[str, list[float]] = {}
    for out in per_seed:
        for label, value in out:
            rows.setdefault(label, []).append(value)
    lines = [f"[meta] Fashion-MNIST; teacher LeNet-5 trained on {n_teacher} images ({t_acc:.2f}%); student "
             f"LeNet-5-half (BatchNorm) on {n} images (90% train, 10% MetaDistil's quiz set), SGD momentum 0.9, "
             f"lr {lr:g} for {e1} epochs then {lr2:g} for {e2}; KD/MetaDistil loss 0.1 CE + 0.9 T²KL, T={T:g}; "
             f"μ = teacher lr; MetaDistil quiz loss over the whole quiz set per teacher step; seeds {seeds}; "
             "test top-1 (%) on 2000 test images",
             f"{'row':<44} {'top-1':>16}"]
    lines += [f"{k:<44} {_mean_sd(v):>16}" for k, v in rows.items()]
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
    ap.add_argument("--meta-teacher-images", type=int, help="meta: the teacher's training images (default 20000)")
    ap.add_argument("--meta-student-images", type=int, help="meta: the student's images, quiz set included (1000)")
    ap.add_argument("--meta-epochs", type=int, help="meta: student epochs at lr 0.05 (default 30)")
    ap.add_argument("--meta-finetune-epochs", type=int, help="meta: student epochs at lr 0.005 after it (default 10)")
    ap.add_argument("--meta-T", type=float, help="meta: the KD temperature of KD and MetaDistil (default 1)")
    ap.add_argument("--meta-seeds", type=int, nargs="+", help="meta: seeds (default 0 1 2)")
    ap.add_argument("--meta-skip-no-warmup", action="store_true",
                    help="meta: leave out the MetaDistil row without the teacher's warm-up")
    ap.add_argument("--meta-workers", type=int, default=1, help="meta: seeds run in this many processes (default 1)")
    ap.add_argument("--fm-budgets", type=int, nargs="+", help="fm: the epoch budgets (default 4 20)")
    ap.add_argument("--fm-modes", choices=FM_MODES, nargs="+", default=list(FM_MODES), help="fm: the view modes")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sections = {"meta": lambda quick: bench_meta(quick, args.meta_teacher_images, args.meta_student_images,
                                                 args.meta_epochs, args.meta_finetune_epochs, args.meta_seeds,
                                                 T=args.meta_T, no_warmup_row=not args.meta_skip_no_warmup,
                                                 workers=args.meta_workers), "incremental": bench_incremental,
                "fm": lambda quick: bench_fm(quick, tuple(args.fm_budgets or ()), tuple(args.fm_modes))}
    for name, fn in sections.items():
        if args.only in (None, name):
            print(fn(args.quick), flush=True)
            print(flush=True)
    cmd = "python " + " ".join(["benchmarks/meta_incremental.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {cmd}   ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
