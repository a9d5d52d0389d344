"""Issue 13 diagnosis: why ``fast_dfkd`` stays near chance in ``benchmarks/datafree.py`` on MNIST.

Runs ``fast_dfkd`` (Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022,
arXiv 2112.06253) side by side under several settings with the same budget, from the same cached
LeNet-5 (BN) teacher as ``benchmarks/datafree.py`` (trained once on the 60,000 real MNIST training
images, 32x32), into LeNet-5-half, and prints for each setting:

* the student's MNIST test top-1 after every epoch (the curve);
* the student's KD loss on the pool batches, mean of the first and of the last training epoch
  (does the student learn from the synthesised batches at all?);
* the synthesis loss (``bn * R_bn^mmt + oh * CE (+ adv * L_adv)``) of the first and last synthesis
  (does the teacher's BN loss fall?);
* on the final synthetic pool: the teacher's mean top-1 probability, how often the teacher's argmax
  is the class the image was synthesised for, the smallest and largest class count of the teacher's
  argmax (confident, class-balanced?), and the student's agreement with the teacher;
* after the run: whether the teacher is back in its mode and has no forward hook left.

Settings (``--configs``; every one uses the benchmark's ``FULL`` budget shape: 1 synthesis of 256
images + ``--kd-steps`` KD steps of 256 per epoch, generator width 32, ``T = 20``):

* ``old``: the strategy's defaults, i.e. the Fast-DFKD authors' CIFAR student optimiser
  (``scripts/fast_cifar.sh``: SGD lr 0.2, momentum 0.9, wd 1e-4, cosine to 2e-4) and Reptile;
* ``lr0.01``: the same with student lr 0.01, DFAD's MNIST student lr for LeNet-5-half
  (``DFAD_mnist.py`` of VainF/Data-Free-Adversarial-Distillation: SGD lr 0.01, momentum 0.9, wd 1e-4);
* ``lr0.01_fomaml``: lr 0.01 and the first-order-MAML meta update the authors' scripts run
  (``--is_maml 1``);
* ``bn_lr0.2``: the authors' lr 0.2 with a LeNet-5-half that has BatchNorm after each conv (the
  authors' CIFAR students, ResNets and WRNs, all have BN).

Epochs are cut to ``--epochs`` (default 8; warm-up ``round(epochs * 20 / 220)`` as the strategy's
default) to fit a shared CPU; the numbers show the trend under each setting, not final accuracies.

    python benchmarks/datafree_diagnosis.py [--epochs 8] [--kd-steps 100] [--seeds 1] [--workers 4]
        [--configs old lr0.01 lr0.01_fomaml bn_lr0.2] [--val-subset 2000] [--out runs/bench_datafree]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import run_pool

CONFIGS: dict[str, dict[str, Any]] = {
    "old": {},
    "lr0.01": {"lr": 0.01},
    "lr0.01_fomaml": {"lr": 0.01, "meta": "fomaml"},
    "bn_lr0.2": {"student_bn": True},
}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (setting, seed) in a worker process: fast_dfkd from the cached teacher, plus the diagnostics."""
    torch.set_num_threads(1)
    import datafree as bench

    from distill.models import create
    from distill.strategies.data_free_fast import fit_fast_dfkd
    from distill.train.checkpoint import load_model

    teacher, _ = load_model(job["teacher"])
    teacher.eval()
    val = bench.test_loader(job["val_subset"])
    kwargs = dict(CONFIGS[job["config"]])
    student_bn = kwargs.pop("student_bn", False)
    torch.manual_seed(job["seed"])
    student = create("lenet5_half", batch_norm=student_bn)
    generator = create("dfad_generator", latent_dim=256, image_size=32, channels=1, width=32)
    t0 = time.perf_counter()
    res = fit_fast_dfkd(student, None, val, teacher=teacher, num_classes=10, image_shape=(1, 32, 32),
                        generator=generator, epochs=job["epochs"], kd_steps=job["kd_steps"], batch_size=256,
                        seed=job["seed"], progress=False, **kwargs)
    wall = time.perf_counter() - t0
    trained = [r for r in res.history if "train_kd" in r]
    x, y = res.synthetic.images, res.synthetic.labels
    with torch.no_grad():
        p = teacher(x).softmax(1)
        s = res.student.eval()(x)
    counts = torch.bincount(p.argmax(1), minlength=10)
    hooks = sum(len(m._forward_hooks) for m in teacher.modules())
    return {"config": job["config"], "seed": job["seed"], "wall": wall,
            "curve": [r["val_student_acc"] for r in res.history],
            "kd_first": trained[0]["train_kd"], "kd_last": trained[-1]["train_kd"],
            "synth_first": res.history[0]["synth_loss"], "synth_last": res.history[-1]["synth_loss"],
            "t_conf": float(p.max(1).values.mean()), "t_hits": float((p.argmax(1) == y).float().mean()),
            "cls_min": int(counts.min()), "cls_max": int(counts.max()),
            "agree": float((s.argmax(1) == p.argmax(1)).float().mean()),
            "teacher_eval": not teacher.training, "hooks": hooks, "pool": int(x.shape[0])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--kd-steps", type=int, default=100)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--val-subset", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("runs/bench_datafree"))
    a = p.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    import datafree as bench

    t0 = time.perf_counter()
    tpath, tacc = bench.get_teacher(a.out, a.teacher_epochs, False, 10000)
    jobs = [{"config": c, "seed": s, "teacher": str(tpath), "epochs": a.epochs, "kd_steps": a.kd_steps,
             "val_subset": a.val_subset} for s in range(a.seeds) for c in a.configs]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in a.configs}
    for r in run_pool(run_one, jobs, a.workers):
        runs[r["config"]].append(r)
        print(f"  {r['config']} seed {r['seed']}: last {r['curve'][-1]:.2f} ({r['wall']:.0f} s)", file=sys.stderr)
    warm = round(a.epochs * 20 / 220)
    lines = [(f"fast_dfkd on MNIST 32x32: LeNet-5 (BN) teacher (test top-1 {tacc:.2f}%) -> LeNet-5-half; "
              f"{a.epochs} epochs (warm-up {warm}) x (1 synthesis of 256 + {a.kd_steps} KD steps of 256), "
              f"generator width 32, T 20; {a.seeds} seed(s); {a.val_subset} test images; "
              f"total {time.perf_counter() - t0:.0f} s"), "",
             ("| setting | test top-1 after each epoch (%, seed 0) | last (mean ± std) | KD loss first -> last "
              "epoch | synth loss first -> last | teacher on pool: conf / hits / class min-max | "
              "student-teacher agreement on pool | teacher eval, hooks left | wall s |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for c in a.configs:
        rs = sorted(runs[c], key=lambda r: r["seed"])
        lasts = [r["curve"][-1] for r in rs]
        spread = f" ± {statistics.stdev(lasts):.2f}" if len(lasts) > 1 else ""
        r0 = rs[0]
        lines.append(
            f"| {c} {CONFIGS[c] or '(defaults)'} | {' '.join(f'{v:.1f}' for v in r0['curve'])} | "
            f"{statistics.mean(lasts):.2f}{spread} | {r0['kd_first']:.3f} -> {r0['kd_last']:.3f} | "
            f"{r0['synth_first']:.1f} -> {r0['synth_last']:.1f} | "
            f"{r0['t_conf']:.3f} / {r0['t_hits']:.3f} / {r0['cls_min']}-{r0['cls_max']} of {r0['pool']} | "
            f"{r0['agree']:.3f} | {r0['teacher_eval']}, {r0['hooks']} | "
            f"{statistics.mean(r['wall'] for r in rs):.0f} |")
    command = "python " + " ".join(shlex.quote(x) for x in ["benchmarks/datafree_diagnosis.py", *sys.argv[1:]])
    print(f"```sh\n{command}\n```\n\n```text\n" + "\n".join(lines) + "\n```")


if __name__ == "__main__":
    main()
