"""Issue 13 diagnosis: why ``dfad`` and ``deepinversion_kd`` stay far under the papers on MNIST.

Same cached LeNet-5 (BN) teacher as ``benchmarks/datafree.py`` (32x32 MNIST, trained once on the real
training images), student LeNet-5-half (no BN), short runs of each setting side by side, same budget.

``--part dfad`` (Fang et al., "Data-Free Adversarial Distillation", 2019, arXiv 1912.11006):
``--iterations`` outer iterations (5 student steps + 1 generator step each), and per setting the test
top-1 every ``--eval-every`` iterations, the student's L1 on the first and last evaluation rows, the
generator's discrepancy (``-L_G``), the teacher's confidence/class counts on 1,000 final generator
images, and whether the teacher is in eval mode in every forward and has no hook left. Settings:

* ``old``: the benchmark's FULL (batch 128, generator width 32, student SGD lr 0.01);
* ``b512``: the authors' batch 512 (``DFAD_mnist.py``), width 32;
* ``w128``: the authors' generator width 128 (``ngf`` 64), batch 128;
* ``lr0.1``: batch 128, width 32, student lr 0.1.

``--part deepinversion`` (Yin et al., "Dreaming to Distill", CVPR 2020, arXiv 1912.08795): one
DeepInversion set per seed (``--ipc`` per class, ``--di-iterations``), reused by every KD setting
(``synthetic=``) so that only the KD differs; for the set: the teacher's mean top-1 probability,
hits (argmax = the class it was synthesised for), class counts, hooks left, objective first -> last;
per KD setting: the test curve, the KD loss of the first and last epoch, the number of KD steps.
Settings (``T`` 20, ``--kd-epochs`` epochs):

* ``old``: the benchmark's (``distill.fit`` defaults: SGD lr 0.05, momentum 0.9, wd 5e-4, multistep
  at 50/75%; batch 256);
* ``lr0.01``: student SGD lr 0.01, wd 1e-4 (DFAD's MNIST student optimiser), batch 256;
* ``lr0.01_b64``: the same, batch 64 (4x the KD steps per epoch);
* ``old_b64``: fit's defaults, batch 64;
* ``lr0.01_b64_T4``: ``lr0.01_b64`` at ``T`` 4 instead of 20.

    python benchmarks/datafree_diagnosis_dfad.py --part dfad [--iterations 150] [--eval-every 50]
    python benchmarks/datafree_diagnosis_dfad.py --part deepinversion [--ipc 50] [--di-iterations 300]
        [--kd-epochs 30]
    common: [--seeds 1] [--workers 2] [--configs ...] [--val-subset 2000] [--out runs/bench_datafree]
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

DFAD_CONFIGS: dict[str, dict[str, Any]] = {
    "old": {"batch_size": 128, "width": 32},
    "b512": {"batch_size": 512, "width": 32},
    "w128": {"batch_size": 128, "width": 128},
    "lr0.1": {"batch_size": 128, "width": 32, "lr_student": 0.1},
}
DI_CONFIGS: dict[str, dict[str, Any]] = {
    "old": {"batch_size": 256},
    "lr0.01": {"batch_size": 256, "lr": 0.01, "weight_decay": 1e-4},
    "lr0.01_b64": {"batch_size": 64, "lr": 0.01, "weight_decay": 1e-4},
    "old_b64": {"batch_size": 64},
    "lr0.01_b64_T4": {"batch_size": 64, "lr": 0.01, "weight_decay": 1e-4, "T": 4.0},
}


def _teacher_probe(teacher: torch.nn.Module) -> tuple[list[bool], Any]:
    """A forward pre-hook recording ``teacher.training`` at every forward (removed by the caller)."""
    modes: list[bool] = []
    return modes, teacher.register_forward_pre_hook(lambda m, _: modes.append(m.training))


def _hooks_left(teacher: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in teacher.modules())


def _pool_stats(teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, Any]:
    with torch.no_grad():
        p = teacher(x).softmax(1)
    counts = torch.bincount(p.argmax(1), minlength=10)
    out = {"t_conf": float(p.max(1).values.mean()), "cls_min": int(counts.min()), "cls_max": int(counts.max()),
           "n": int(x.shape[0])}
    if y is not None:
        out["t_hits"] = float((p.argmax(1) == y).float().mean())
    return out


def run_dfad(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    import datafree as bench

    from distill.models import create
    from distill.strategies.data_free_dfad import dfad
    from distill.train.checkpoint import load_model

    teacher, _ = load_model(job["teacher"])
    teacher.eval()
    val = bench.test_loader(job["val_subset"])
    cfg = dict(DFAD_CONFIGS[job["config"]])
    torch.manual_seed(job["seed"])
    student = create("lenet5_half")
    generator = create("dfad_generator", latent_dim=100, image_size=32, channels=1, width=cfg.pop("width"))
    modes, probe = _teacher_probe(teacher)
    t0 = time.perf_counter()
    res = dfad(student, None, val, teacher=teacher, generator=generator, iterations=job["iterations"],
               eval_every=job["eval_every"], seed=job["seed"], progress=False, **cfg)
    wall = time.perf_counter() - t0
    probe.remove()
    generator.eval()
    with torch.no_grad():
        x = generator(torch.randn(1000, 100, generator=torch.Generator().manual_seed(123)))
    h = res.history
    return {"config": job["config"], "seed": job["seed"], "wall": wall,
            "curve": [r["student_acc"] for r in h], "l1_first": h[0]["loss_student"], "l1_last": h[-1]["loss_student"],
            "d_first": h[0]["discrepancy"], "d_last": h[-1]["discrepancy"],
            "teacher_eval": not any(modes), "hooks": _hooks_left(teacher), **_pool_stats(teacher, x, None)}


def run_di(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    import datafree as bench

    from distill.models import create
    from distill.strategies.data_free_deepinversion import fit_deepinversion_kd
    from distill.synthesis.deepinversion import deepinversion
    from distill.train.checkpoint import load_model

    teacher, _ = load_model(job["teacher"])
    teacher.eval()
    val = bench.test_loader(job["val_subset"])
    t0 = time.perf_counter()
    syn = deepinversion(teacher, ipc=job["ipc"], num_classes=10, image_shape=(1, 32, 32), seed=job["seed"],
                        iterations=job["di_iterations"], progress=False)
    synth_s = time.perf_counter() - t0
    out = {"seed": job["seed"], "synth_s": synth_s, "hooks_after_synth": _hooks_left(teacher),
           "obj": (syn.manifest["objective_initial"], syn.manifest["objective_final"]),
           **_pool_stats(teacher, syn.images, syn.labels), "runs": []}
    for name in job["configs"]:
        cfg = dict(DI_CONFIGS[name])
        torch.manual_seed(job["seed"])
        modes, probe = _teacher_probe(teacher)
        t1 = time.perf_counter()
        res = fit_deepinversion_kd(create("lenet5_half"), None, val, teacher=teacher, num_classes=10,
                                   image_shape=(1, 32, 32), epochs=job["kd_epochs"], synthetic=syn, seed=job["seed"],
                                   progress=False, **cfg)
        probe.remove()
        h = res.history
        steps = job["kd_epochs"] * -(-syn.images.shape[0] // cfg["batch_size"])
        out["runs"].append({"config": name, "wall": time.perf_counter() - t1, "steps": steps,
                            "curve": [r["val_student_acc"] for r in h],
                            "kd_first": h[0].get("train_kd", h[0].get("train_loss")),
                            "kd_last": h[-1].get("train_kd", h[-1].get("train_loss")),
                            "teacher_eval_kd": not any(modes),
                            "hooks": _hooks_left(teacher)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["dfad", "deepinversion"], required=True)
    p.add_argument("--configs", nargs="+")
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--ipc", type=int, default=50)
    p.add_argument("--di-iterations", type=int, default=300)
    p.add_argument("--kd-epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--val-subset", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("runs/bench_datafree"))
    a = p.parse_args()
    torch.set_num_threads(1)
    import datafree as bench

    t0 = time.perf_counter()
    tpath, tacc = bench.get_teacher(a.out, a.teacher_epochs, False, a.val_subset)
    print("$ python " + " ".join(shlex.quote(s) for s in sys.argv))
    if a.part == "dfad":
        configs = a.configs or list(DFAD_CONFIGS)
        jobs = [{"config": c, "seed": s, "teacher": str(tpath), "val_subset": a.val_subset,
                 "iterations": a.iterations, "eval_every": a.eval_every} for c in configs for s in range(a.seeds)]
        rows = sorted(run_pool(run_dfad, jobs, a.workers), key=lambda r: (configs.index(r["config"]), r["seed"]))
        print(f"dfad on MNIST 32x32: LeNet-5 (BN) teacher (test top-1 {tacc:.2f}%) -> LeNet-5-half; {a.iterations} "
              f"iterations x (5 student + 1 generator steps), {a.seeds} seed(s); {a.val_subset} test images; total "
              f"{time.perf_counter() - t0:.0f} s\n")
        print("| setting | test top-1 every %d it. (%%, seed 0) | last (mean ± std) | student L1 first -> last | "
              "generator D first -> last | teacher on 1000 G(z): conf / class min-max | teacher eval, hooks left "
              "| wall s |" % a.eval_every)
        print("|---|---|---|---|---|---|---|---|")
        for c in configs:
            rs = [r for r in rows if r["config"] == c]
            last = [r["curve"][-1] for r in rs]
            ms = f"{statistics.mean(last):.2f} ± {statistics.stdev(last) if len(last) > 1 else 0:.2f}"
            r = rs[0]
            print(f"| {c} {DFAD_CONFIGS[c]} | {' '.join(f'{v:.1f}' for v in r['curve'])} | {ms} | "
                  f"{r['l1_first']:.3f} -> {r['l1_last']:.3f} | {r['d_first']:.3f} -> {r['d_last']:.3f} | "
                  f"{r['t_conf']:.3f} / {r['cls_min']}-{r['cls_max']} | {r['teacher_eval']}, {r['hooks']} | "
                  f"{r['wall']:.0f} |")
    else:
        configs = a.configs or list(DI_CONFIGS)
        jobs = [{"configs": configs, "seed": s, "teacher": str(tpath), "val_subset": a.val_subset, "ipc": a.ipc,
                 "di_iterations": a.di_iterations, "kd_epochs": a.kd_epochs} for s in range(a.seeds)]
        outs = sorted(run_pool(run_di, jobs, a.workers), key=lambda r: r["seed"])
        print(f"deepinversion_kd on MNIST 32x32: LeNet-5 (BN) teacher (test top-1 {tacc:.2f}%) -> LeNet-5-half; "
              f"DeepInversion {a.ipc} images/class x {a.di_iterations} iterations (shared by the KD settings), "
              f"KD T 20 for {a.kd_epochs} epochs; {a.seeds} seed(s); {a.val_subset} test images; total "
              f"{time.perf_counter() - t0:.0f} s\n")
        for o in outs:
            print(f"seed {o['seed']}: set of {o['n']}: teacher conf {o['t_conf']:.3f}, hits {o['t_hits']:.3f}, class "
                  f"counts {o['cls_min']}-{o['cls_max']}; objective {o['obj'][0]:.2f} -> {o['obj'][1]:.2f}; hooks "
                  f"left after synthesis {o['hooks_after_synth']}; synthesis {o['synth_s']:.0f} s")
        print("\n| setting | KD steps | test top-1 per epoch (%, seed 0, every 5th) | last (mean ± std) | "
              "KD loss first -> last epoch | teacher eval, hooks left | wall s |")
        print("|---|---|---|---|---|---|---|")
        for c in configs:
            rs = [r for o in outs for r in o["runs"] if r["config"] == c]
            last = [r["curve"][-1] for r in rs]
            ms = f"{statistics.mean(last):.2f} ± {statistics.stdev(last) if len(last) > 1 else 0:.2f}"
            r = rs[0]
            curve = r["curve"][4::5] if len(r["curve"]) >= 5 else r["curve"]
            print(f"| {c} {DI_CONFIGS[c]} | {r['steps']} | {' '.join(f'{v:.1f}' for v in curve)} | {ms} | "
                  f"{r['kd_first']:.3f} -> {r['kd_last']:.3f} | {r['teacher_eval_kd']}, {r['hooks']} | "
                  f"{r['wall']:.0f} |")


if __name__ == "__main__":
    main()
