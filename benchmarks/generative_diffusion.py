"""Guided-diffusion distillation (Meng et al. 2023, arXiv 2210.03142) and progressive distillation
(Salimans & Ho 2022, arXiv 2202.00512) on a small class-conditional DDPM trained here on MNIST.

Pipeline (CPU-sized, everything trained in this run, one seed):

1. a classifier-free teacher (diffusers ``UNet2DModel``, v-prediction, cosine schedule) on MNIST
   downsampled to ``--size`` px (area), ``--teacher-steps`` updates;
2. stage one: a ``w``-conditioned student matches the guided teacher for ``w ~ U[0, --w-max]``;
3. stage two: progressive distillation from ``--start-steps`` DDIM steps, ``--rounds`` halvings.

Rows, all at guidance ``--w``: the teacher with classifier-free guidance and plain DDIM at
``--start-steps`` steps (2 network evaluations per step: the reference), the teacher's conditional model
alone (no guidance: where the stage-one student starts from), the stage-one student at the
same step count (1 evaluation per step), then for each step count ``n`` of stage two the teacher's
guided DDIM at ``n`` steps (without the method), the distilled student at ``n`` steps (with it) and,
unless ``--no-stochastic``, the same student with Meng et al.'s ``n``-step stochastic sampler (a DDIM step
of twice the step length, then a step back by re-noising; the same ``n`` network evaluations).
FID/KID against MNIST test images (resized to ``--size`` and back to 28 px like the samples) with the
LeNet extractor trained here (``distill.train.generative_eval``; not Inception: scores compare rows
of this table only). ``--seeds N`` draws N sets of sampling noise (mean +- std over them; the models
are trained once). PSNR compares each row's samples with the reference's from the same noise ``z_1``
(deterministic DDIM: a faithful distillation reproduces the reference image by image); it is not printed
for the stochastic sampler's rows (fresh noise at every step: no image-by-image reference), which are judged
by FID/KID only. Time ratio = the row's sampling time / the reference's.

    python benchmarks/generative_diffusion.py --quick       # < 2 min smoke run
    python benchmarks/generative_diffusion.py               # the real mode (~10 min of CPU; longer on a shared machine)
    python benchmarks/generative_diffusion.py --teacher-cache t.safetensors   # train the teacher once, reuse it
    python benchmarks/generative_diffusion.py --teacher-cache t.safetensors --feature-images 10000 \
        --stage-one-steps 300 --round-steps 100 --seeds 2     # the reduced run of docs (a loaded machine)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (< 2 min): tiny budgets, 64 samples")
    p.add_argument("--seeds", type=int, default=1, help="sampling-noise seeds per row (models are trained once)")
    p.add_argument("--size", type=int, default=16, help="image size the DDPM works at (MNIST area-resized)")
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--stage-one-steps", type=int, default=1500)
    p.add_argument("--start-steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate of stage one and stage two")
    p.add_argument("--teacher-cache", default=None,
                   help="a .safetensors path: the teacher is loaded from it when it exists, else trained and saved")
    p.add_argument("--w", type=float, default=1.0, help="guidance strength of every row")
    p.add_argument("--w-max", type=float, default=4.0)
    p.add_argument("--samples", type=int, default=300, help="generated images per row (balanced classes)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--feature-images", type=int, default=0,
                   help="train the FID/KID LeNet for 1 epoch on this many MNIST training images (not cached; for a "
                        "loaded machine) instead of the cached 2-epoch net on all 60,000 (0, the default)")
    p.add_argument("--no-stochastic", action="store_true",
                   help="leave out the rows of Meng et al.'s stochastic sampler for the progressive students")
    a = p.parse_args()
    if a.quick:
        a.train_images, a.teacher_steps, a.stage_one_steps, a.batch_size = 1000, 60, 15, 32
        a.start_steps, a.rounds, a.round_steps, a.samples = 4, 2, 10, 64
    return a


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    from distill.data.sources import _default_mnist_root, load_mnist
    from distill.integrations.diffusers import build_unet
    from distill.strategies.diffusion_distill import (diffusion_images, guided_diffusion_distill,
                                                      load_diffusion_model, progressive_distill, sample_diffusion,
                                                      train_diffusion_teacher)
    from distill.train.generative_eval import fid_kid, psnr, train_feature_net

    t_all = time.time()
    root = _default_mnist_root()
    x_train, y_train = load_mnist(root, "train")
    x_test, _ = load_mnist(root, "test")
    images = diffusion_images(x_train[:a.train_images], a.size)
    labels = y_train[:a.train_images].long()

    def to_eval(x: torch.Tensor) -> torch.Tensor:  # [-1, 1] at --size -> [0, 1] at 28 px, for the extractor
        return F.interpolate((x + 1) / 2, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)

    real = to_eval(diffusion_images(x_test[:max(a.samples, 500)], a.size))
    if a.feature_images:
        feat = train_feature_net("mnist", epochs=1, seed=0, images=x_train[:a.feature_images],
                                 labels=y_train[:a.feature_images], progress=False)
        feat.name = f"lenet-mnist (trained here, 1 epoch on {a.feature_images} training images, seed 0)"
    else:
        feat = train_feature_net("mnist", epochs=2, seed=0, progress=False)

    def unet() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_unet(img_size=a.size, channels=1, num_classes=10, block_out_channels=(16, 32), layers_per_block=1,
                          attention=False, norm_num_groups=8)

    t0 = time.time()
    teacher = unet()
    cache = Path(a.teacher_cache) if a.teacher_cache else None
    loaded = cache is not None and cache.is_file()
    if loaded:
        load_diffusion_model(cache, teacher)
    else:
        train_diffusion_teacher(teacher, images, labels, steps=a.teacher_steps, batch_size=a.batch_size,
                                progress=False, checkpoint=cache)
    t_teacher = time.time() - t0
    how = f"loaded from {cache}" if loaded else f"{a.teacher_steps} updates"
    t0 = time.time()
    one = guided_diffusion_distill(teacher=teacher, images=images, labels=labels, steps=a.stage_one_steps,
                                   batch_size=a.batch_size, lr=a.lr, w_min=0.0, w_max=a.w_max, progress=False)
    t_one = time.time() - t0
    t0 = time.time()
    two = progressive_distill(teacher=one.model, images=images, labels=labels, start_steps=a.start_steps,
                              rounds=a.rounds, steps_per_round=a.round_steps, batch_size=a.batch_size, lr=a.lr,
                              w_min=0.0, w_max=a.w_max, progress=False)
    t_two = time.time() - t0

    eval_labels = torch.arange(a.samples) % 10

    reference: dict[int, torch.Tensor] = {}  # seed -> the reference's samples, in [0, 1]

    def measure(model: torch.nn.Module, steps: int, w: float | None = a.w,
                stochastic: bool = False) -> tuple[list[dict[str, float]], float]:
        scores, times = [], []
        for seed in range(a.seeds):
            t = time.perf_counter()
            fake = sample_diffusion(model, eval_labels, steps, w=w, seed=1000 + seed, batch_size=250,
                                    stochastic=stochastic)
            times.append(time.perf_counter() - t)
            sc = fid_kid(real, to_eval(fake), feat, kid_subset_size=min(100, a.samples), seed=seed)
            fake01 = (fake + 1) / 2
            reference.setdefault(seed, fake01)  # the first row measured is the reference
            sc["psnr"] = float("nan") if stochastic else psnr(fake01, reference[seed])
            scores.append(sc)
        return scores, statistics.median(times)

    def fmt(vals: list[float], scale: float = 1.0, digits: int = 2) -> str:
        vals = [v * scale for v in vals]
        if len(vals) == 1:
            return f"{vals[0]:.{digits}f}"
        return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"

    rows: list[tuple[str, int, int, list[dict[str, float]], float]] = []
    ref_scores, ref_time = measure(teacher, a.start_steps)
    rows.append(("teacher, CFG + DDIM (reference)", a.start_steps, 2 * a.start_steps, ref_scores, ref_time))
    s, tm = measure(teacher, a.start_steps, None)
    rows.append(("teacher, conditional only (no guidance; the student's start)", a.start_steps, a.start_steps, s, tm))
    s, tm = measure(one.model, a.start_steps)
    rows.append(("stage-one student (Meng), DDIM", a.start_steps, a.start_steps, s, tm))
    for r in two.rounds:
        n = r["steps"]
        s, tm = measure(teacher, n)
        rows.append(("teacher, CFG + DDIM (no distillation)", n, 2 * n, s, tm))
        s, tm = measure(r["model"], n)
        rows.append(("progressive student (Meng stage two)", n, n, s, tm))
        if not a.no_stochastic and n > 1:  # one step: the stochastic sampler is the deterministic one
            s, tm = measure(r["model"], n, stochastic=True)
            rows.append(("progressive student, Meng's stochastic sampler", n, n, s, tm))

    print(f"MNIST at {a.size}x{a.size} px (area-resized; evaluated at 28 px), {a.train_images} training images; "
          f"teacher {how} ({t_teacher:.0f} s), stage one {a.stage_one_steps} updates "
          f"({t_one:.0f} s), stage two {a.rounds} rounds x {a.round_steps} updates ({t_two:.0f} s), batch "
          f"{a.batch_size}, Adam lr {a.lr} (distillation); guidance w = {a.w} (students trained on w in "
          f"[0, {a.w_max}]); {a.samples} samples per row, "
          f"{a.seeds} noise seed(s); extractor: {feat.name}; {torch.get_num_threads()} CPU thread(s).")
    print()
    print("| model | sampling steps | network evals / sample | FID | KID | PSNR vs reference, same noise (dB) | "
          "sampling s | time ratio vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for name, steps, nfe, sc, tm in rows:
        ps = "-" if name == rows[0][0] else "n/a (stochastic)" if "stochastic" in name else \
            fmt([d["psnr"] for d in sc])
        print(f"| {name} | {steps} | {nfe} | {fmt([d['fid'] for d in sc])} | {fmt([d['kid'] for d in sc])} | "
              f"{ps} | {tm:.2f} | {tm / ref_time:.3f} |")
    print()
    print("command: python " + " ".join(shlex.quote(v) for v in ["benchmarks/generative_diffusion.py", *sys.argv[1:]]))
    print(f"total wall time {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
