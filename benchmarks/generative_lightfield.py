"""R2L benchmark (Wang et al. ECCV 2022, arXiv 2203.17261): NeRF teacher vs a residual MLP light field
trained on the real views only vs the same light field distilled by R2L (teacher pseudo-data, then the real
views), on a procedurally rendered scene (``distill.data.lightfield``), CPU-sized.

Per seed: the scene ``make_scene(seed)``; ``--views`` training views and ``--test-views`` held-out views
(other random poses on the same hemisphere band) at ``--size``² pixels; a NeRF teacher trained
``--teacher-steps`` steps; then two students of one architecture:

* ``real views only``: ``--distill-steps + --finetune-steps`` steps on the training views' pixels;
* ``R2L``: ``--distill-steps`` steps on ``--pseudo`` teacher-rendered random views, then ``--finetune-steps``
  on the training views (the row "R2L, pseudo-data only" is the same student before that fine-tuning).

Measures: test PSNR (dB, mean per image), seconds per rendered image (1 CPU thread, median of 3), the ratio
teacher time ÷ student time, and multiply-accumulates per ray (teacher: ``--samples`` MLP passes).

``--hierarchical``: a second teacher with NeRF's hierarchical volume sampling (Mildenhall et al. ECCV 2020, arXiv
2003.08934, Section 5.2: ``--coarse`` stratified samples through a coarse network, ``--fine`` more drawn from
the PDF of its weights, the fine network at all ``--coarse + --fine``), trained the same number of steps on the
same batches, and R2L's student distilled from each teacher (same start weights, same pseudo poses). The
budgets are equalised in network evaluations per ray: the uniform teacher's ``--samples`` must equal
``2 · --coarse + --fine`` (the coarse network sees ``N_c`` points, the fine one ``N_c + N_f``), in training
and in rendering; the hierarchical teacher has two networks, so twice the weights. ``--no-baseline`` skips
the student trained on the real views only; ``--teachers-only`` skips every student.

    python benchmarks/generative_lightfield.py [--quick] [--seeds 1] [--first-seed 0] [--hierarchical]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from distill.data.lightfield import make_scene, make_views  # noqa: E402
from distill.models.nerf import NeLF, NeRF  # noqa: E402
from distill.strategies.r2l import evaluate_views, r2l, time_per_image, train_nelf, train_nerf  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (< 2 min): tiny budgets")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--views", type=int, default=30)
    p.add_argument("--test-views", type=int, default=8)
    p.add_argument("--samples", type=int, default=48, help="teacher samples per ray")
    p.add_argument("--teacher-steps", type=int, default=2500)
    p.add_argument("--pseudo", type=int, default=300, help="pseudo images rendered by the teacher")
    p.add_argument("--distill-steps", type=int, default=3000)
    p.add_argument("--finetune-steps", type=int, default=500)
    p.add_argument("--batch-rays", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=96, help="student width")
    p.add_argument("--depth", type=int, default=16, help="student linear layers")
    p.add_argument("--points", type=int, default=8, help="student points per ray")
    p.add_argument("--freqs", type=int, default=6, help="student positional-encoding frequencies")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hierarchical", action="store_true",
                   help="also a hierarchical-sampling teacher (NeRF Sec. 5.2) and R2L from it")
    p.add_argument("--coarse", type=int, default=16, help="hierarchical teacher: coarse samples N_c")
    p.add_argument("--fine", type=int, default=16, help="hierarchical teacher: fine samples N_f")
    p.add_argument("--no-baseline", action="store_true", help="skip the light field trained on real views only")
    p.add_argument("--teachers-only", action="store_true", help="train and measure the teacher(s) only")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.views, args.test_views, args.samples = 16, 12, 3, 24
        args.teacher_steps, args.pseudo, args.distill_steps, args.finetune_steps = 250, 40, 250, 50
        args.batch_rays, args.width, args.depth = 256, 48, 8
        args.coarse, args.fine = 8, 8
    if args.hierarchical and args.samples != 2 * args.coarse + args.fine:
        p.error(f"--samples ({args.samples}) must equal 2 * --coarse + --fine ({2 * args.coarse + args.fine}): "
                "the two teachers are compared at equal network evaluations per ray")
    return args


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    scene = make_scene(seed)
    train = make_views(scene, args.views, H=args.size, W=args.size, seed=seed)
    test = make_views(scene, args.test_views, H=args.size, W=args.size, seed=seed + 1000)
    teacher = NeRF(num_freqs=6, width=64, depth=4)
    train_nerf(teacher, train, steps=args.teacher_steps, batch_rays=args.batch_rays // 2, num_samples=args.samples,
               seed=seed, progress=False)
    if args.hierarchical:
        torch.manual_seed(seed)  # the coarse network starts from the uniform teacher's weights
        hier = NeRF(num_freqs=6, width=64, depth=4, num_fine_samples=args.fine)
        train_nerf(hier, train, steps=args.teacher_steps, batch_rays=args.batch_rays // 2, num_samples=args.coarse,
                   seed=seed, progress=False)

    def student() -> NeLF:
        torch.manual_seed(seed + 1)  # both students start from the same weights
        return NeLF(train.near, train.far, num_points=args.points, num_freqs=args.freqs, width=args.width,
                    depth=args.depth)

    common = dict(batch_rays=args.batch_rays, lr=args.lr, progress=False)
    rows: dict[str, dict[str, float]] = {}
    t_teacher = time_per_image(teacher, test, num_samples=args.samples)
    tag = f" (uniform, {args.samples})" if args.hierarchical else ""
    rows["teacher NeRF" + tag] = {"psnr": evaluate_views(teacher, test, num_samples=args.samples)["psnr"],
                                  "time": t_teacher, "macs": teacher.macs_per_ray(args.samples)}
    if args.hierarchical:
        rows[f"teacher NeRF (hierarchical, {args.coarse}+{args.fine})"] = {
            "psnr": evaluate_views(hier, test, num_samples=args.coarse)["psnr"],
            "time": time_per_image(hier, test, num_samples=args.coarse), "macs": hier.macs_per_ray(args.coarse)}

    if args.teachers_only:
        rows["_"] = {"pseudo_rays": 0}
        return rows
    o, d, colors = train.rays()
    if not args.no_baseline:
        base = student()
        train_nelf(base, torch.cat([o, d], -1), colors, steps=args.distill_steps + args.finetune_steps, seed=seed,
                   **common)
        t_student = time_per_image(base, test)
        rows["light field, real views only"] = {"psnr": evaluate_views(base, test)["psnr"], "time": t_student,
                                                "macs": base.macs_per_ray()}

    teachers = [("", teacher, args.samples)]
    if args.hierarchical:
        teachers = [(" from uniform", teacher, args.samples),
                    (" from hierarchical", hier, args.coarse)]
    for suffix, t, samples in teachers:
        distilled = student()
        res = r2l(distilled, train, teacher=t, num_samples=samples, pseudo_images=args.pseudo,
                  distill_steps=args.distill_steps, finetune_steps=0, seed=seed, **common)
        rows[f"R2L{suffix}, pseudo-data only"] = {"psnr": evaluate_views(distilled, test)["psnr"],
                                                  "time": time_per_image(distilled, test),
                                                  "macs": distilled.macs_per_ray()}
        train_nelf(distilled, torch.cat([o, d], -1), colors, steps=args.finetune_steps, seed=seed + 1, **common)
        rows[f"R2L{suffix} (pseudo-data + real views)"] = {"psnr": evaluate_views(distilled, test)["psnr"],
                                                           "time": time_per_image(distilled, test),
                                                           "macs": distilled.macs_per_ray()}
    rows["_"] = {"pseudo_rays": res.pseudo_rays}
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    per_seed = [run_seed(args, s) for s in range(args.first_seed, args.first_seed + args.seeds)]
    names = [k for k in per_seed[0] if k != "_"]
    teacher_time = statistics.fmean(r[names[0]]["time"] for r in per_seed)  # the (uniform) teacher's

    def fmt(values: list[float], digits: int) -> str:
        m = statistics.fmean(values)
        return f"{m:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")

    print(f"R2L on a procedural scene: {args.views} training / {args.test_views} test views at {args.size}x{args.size}, "
          f"seed(s) {args.first_seed}..{args.first_seed + args.seeds - 1} (scene and training), {args.threads} CPU thread(s)")
    hier = (f" / hierarchical: 2 networks, {args.coarse} coarse + {args.fine} fine samples "
            f"({2 * args.coarse + args.fine} evaluations/ray)" if args.hierarchical else "")
    students = ("no students (--teachers-only)" if args.teachers_only else
                f"student NeLF: {args.points} points x PE {args.freqs} freqs, {args.depth} layers x {args.width} "
                f"(residual); {args.pseudo} pseudo images ({per_seed[0]['_']['pseudo_rays']} rays), "
                f"{args.distill_steps} + {args.finetune_steps} steps")
    print(f"teacher NeRF: PE 6 freqs, 4x64 MLP, {args.samples} stratified samples/ray{hier}, {args.teacher_steps} steps "
          f"of {args.batch_rays // 2} rays; {students}, {args.batch_rays} rays/batch, lr {args.lr}")
    print()
    print("| model | test PSNR (dB) | ms / image | teacher time ÷ this | MACs / ray |")
    print("|---|---|---|---|---|")
    for name in names:
        psnrs = [r[name]["psnr"] for r in per_seed]
        times = [r[name]["time"] for r in per_seed]
        print(f"| {name} | {fmt(psnrs, 2)} | {fmt([t * 1e3 for t in times], 1)} | "
              f"{teacher_time / statistics.fmean(times):.1f}x | {int(per_seed[0][name]['macs']):,} |")
    print()
    print(f"command: python {' '.join(shlex.quote(a) for a in ['benchmarks/generative_lightfield.py', *(argv if argv is not None else sys.argv[1:])])}"
          f"  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
