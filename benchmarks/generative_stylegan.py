"""StyleKD and Self-Distilled StyleGAN benchmark (issue 16, part G2), on MNIST.

**StyleKD** (Xu et al., ECCV 2022, arXiv 2208.08840). A teacher StyleGAN-like generator
(``--teacher-width`` channels) is trained here with :func:`distill.strategies.gan.train_gan` on
``--train-subset`` MNIST training images; a narrower student (``--student-width``, ``min_width``
``--student-min-width``) is trained for the same steps by the same loop

* from scratch (a plain GAN: no teacher),
* with StyleKD (:func:`distill.strategies.stylekd.stylekd`: mapping network copied from the teacher,
  image L1 + feature-net perceptual distance + latent-direction relation, the authors' weights 3/3/30),
* with each of StyleKD's parts off in turn (``no-relation``, ``no-l1``, ``no-perceptual``, ``no-init`` = no
  mapping initialisation).

Measures: FID and KID (x 1000) of ``--eval-size`` samples (the EMA generator, no truncation) against
as many MNIST test images, in the feature space of a LeNet trained here on MNIST (2 epochs, seed 0:
Inception weights cannot be downloaded, so the numbers compare rows of this table only; KID on its
features standardised by the MNIST training split, see :mod:`distill.train.generative_eval`); the L1
distance to the teacher's image of the same ``z`` (output consistency, what StyleKD is about); the
generator's parameters and its sampling time ÷ the teacher's (batches of 250, interleaved medians).

**Self-Distilled StyleGAN** (Mokady et al., SIGGRAPH 2022, arXiv 2202.12211). A contaminated set:
``--sd-size`` images, of which ``--outlier-fraction`` are Fashion-MNIST images (the outliers) and
the rest MNIST digits. :func:`distill.strategies.self_distilled_stylegan.self_distilled_stylegan`
trains a GAN on it, projects every image, drops the worst-reconstructed ``1 - keep`` share
(pixel MSE: no network that knows digits scores them), and retrains. Rows: the filtering's
precision / recall of the outliers; FID/KID against clean MNIST test images of the raw and the
filtered GAN; then, for the filtered GAN at equal psi, the mean-truncation trick against the
multi-modal one (10 k-means clusters of 2,000 samples' pixels): FID, the share of samples the MNIST
LeNet recognises (max softmax >= 0.9), and the number of digit classes among them holding at least
2% of the samples (diversity).

    python benchmarks/generative_stylegan.py [--quick] [--seeds 1] [--steps 400] [--batch 32]
        [--train-subset 5000] [--eval-size 1000] [--teacher-width 32] [--student-width 16]
        [--parts stylekd selfdistill] [--threads 1] [--first-seed 0] [--teacher-cache DIR] [--skip-scratch]

``--teacher-cache DIR`` saves the trained teacher (EMA generator, safetensors) under a name made of every
argument that changes it and loads it on the next run: a converged teacher is trained once.

``--quick`` is a smoke run (< 2 min): its numbers say the pipeline runs, not how good a method is.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from _common import time_interleaved  # noqa: E402

from distill.data.sources import _default_mnist_root, load_fashion_mnist, load_mnist  # noqa: E402
from distill.functional.gan_truncation import removal_precision_recall  # noqa: E402
from distill.models.stylegan import StyleDiscriminator, StyleGenerator  # noqa: E402
from distill.strategies.gan import train_gan  # noqa: E402
from distill.strategies.self_distilled_stylegan import sample_truncated, self_distilled_stylegan  # noqa: E402
from distill.strategies.stylekd import StyleKDWeights, stylekd  # noqa: E402
from distill.train.generative_eval import fid_kid, train_feature_net  # noqa: E402

ABLATIONS = {"stylekd": {}, "no-relation": {"relation": 0.0}, "no-l1": {"l1": 0.0}, "no-perceptual": {"perceptual": 0.0},
             "no-init": {}}


@torch.no_grad()
def samples(g: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    g.eval()
    z = torch.randn(n, g.z_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([(g(z[i:i + 250]).clamp(-1, 1) + 1) / 2 for i in range(0, n, 250)])


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def sampler(g: torch.nn.Module):
    """A call that generates 250 images (timed round-robin by ``time_interleaved``)."""
    z = torch.randn(250, g.z_dim)

    def run() -> None:
        with torch.no_grad():
            g(z)

    return run


def train_teacher(args, x, seed: int) -> tuple[torch.nn.Module, float]:
    """The teacher's EMA generator and its training wall seconds (0 when read from ``--teacher-cache``)."""
    steps, batch = args.teacher_steps or args.steps, args.teacher_batch or args.batch
    path = None
    if args.teacher_cache:
        path = Path(args.teacher_cache) / (f"stylekd-teacher-eqlr-w{args.teacher_width}-s{steps}-b{batch}-n{len(x)}"
                                           f"-r1{args.r1_gamma}-seed{seed}.safetensors")
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        g = StyleGenerator(width=args.teacher_width)
        g.load_state_dict(load_file(str(path)))
        return g.eval().requires_grad_(False), 0.0
    torch.manual_seed(seed)
    teacher_g, teacher_d = StyleGenerator(width=args.teacher_width), StyleDiscriminator(width=args.teacher_width)
    t0 = time.perf_counter()
    teacher = train_gan(teacher_g, teacher_d, x, steps=steps, batch_size=batch, seed=seed, progress=False,
                        r1_gamma=args.r1_gamma).ema
    secs = time.perf_counter() - t0
    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp))
        tmp.replace(path)  # atomic: a reader never sees half a file
    return teacher, secs


def run_stylekd(args, x, real_test, net, seed: int) -> list[str]:
    teacher, t_teacher = train_teacher(args, x, seed)

    def student() -> StyleGenerator:
        torch.manual_seed(seed + 100)
        return StyleGenerator(width=args.student_width, min_width=args.student_min_width)

    def disc() -> StyleDiscriminator:
        torch.manual_seed(seed + 200)
        return StyleDiscriminator(width=args.teacher_width)

    models: dict[str, tuple[torch.nn.Module, float]] = {"teacher": (teacher, t_teacher)}
    if not args.skip_scratch:  # a run of ablation rows only can leave out the scratch row another run measured
        t0 = time.perf_counter()
        models["student, scratch"] = (train_gan(student(), disc(), x, steps=args.steps, batch_size=args.batch,
                                                seed=seed, progress=False, r1_gamma=args.r1_gamma).ema,
                                      time.perf_counter() - t0)
    for name in args.rows:
        w = StyleKDWeights(**ABLATIONS[name])
        t0 = time.perf_counter()
        res = stylekd(student(), teacher=teacher, images=x, discriminator=disc(), feature_net=net, weights=w,
                      init_mapping=name != "no-init", steps=args.steps, batch_size=args.batch, seed=seed, progress=False,
                      r1_gamma=args.r1_gamma)
        models[f"student, {name}"] = (res.ema, time.perf_counter() - t0)
    n = args.eval_size
    z_seed = 1000 + seed
    t_imgs = samples(teacher, n, z_seed)
    times = time_interleaved({name: sampler(g) for name, (g, _) in models.items()}, steps=1, reps=args.time_reps,
                             warmup=1)
    lines = [f"| StyleKD row (seed {seed}) | params | FID | KID x1000 | L1 to teacher (same z) | sampling time ÷ teacher "
             f"| train s |", "|---|---|---|---|---|---|---|"]
    for name, (g, secs) in models.items():
        imgs = samples(g, n, z_seed)
        s = fid_kid(real_test[:n], imgs, net, kid_subset_size=min(500, n), kid_subsets=20)
        l1 = float((imgs - t_imgs).abs().mean())
        ratio = times[name] / times["teacher"]
        lines.append(f"| {name} | {n_params(g):,} | {s['fid']:.2f} | {1000 * s['kid']:.2f} | {l1:.4f} | {ratio:.2f} "
                     f"| {f'{secs:.0f}' if secs else 'cached'} |")
    return lines


def class_stats(net, imgs: torch.Tensor) -> tuple[float, int]:
    with torch.no_grad():
        p = torch.softmax(torch.cat([net.classify(imgs[i:i + 500]) for i in range(0, len(imgs), 500)]), 1)
    conf, cls = p.max(1)
    recognised = conf >= 0.9
    counts = torch.bincount(cls[recognised], minlength=10).float() / len(imgs)
    return float(recognised.float().mean()), int((counts >= 0.02).sum())


def run_selfdistill(args, real_test, net, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    mnist, _ = load_mnist(_default_mnist_root(), "train")
    fashion, _ = load_fashion_mnist(split="train")
    n_out = round(args.sd_size * args.outlier_fraction)
    inl = mnist[torch.randperm(len(mnist), generator=g)[:args.sd_size - n_out]]
    out = fashion[torch.randperm(len(fashion), generator=g)[:n_out]]
    images = torch.cat([inl, out])
    is_outlier = torch.cat([torch.zeros(len(inl), dtype=torch.bool), torch.ones(n_out, dtype=torch.bool)])
    perm = torch.randperm(len(images), generator=g)
    images, is_outlier = images[perm], is_outlier[perm]
    torch.manual_seed(seed)
    res = self_distilled_stylegan(lambda: StyleGenerator(width=args.teacher_width),
                                  discriminator=lambda: StyleDiscriminator(width=args.teacher_width), images=images,
                                  keep_fraction=args.keep, steps=args.steps, batch_size=args.batch,
                                  projection_steps=args.projection_steps, num_clusters=10,
                                  cluster_samples=args.cluster_samples, seed=seed, progress=False,
                                  r1_gamma=args.r1_gamma)
    pr = removal_precision_recall(res.kept, is_outlier)
    n = args.eval_size
    lines = [f"Contaminated set (seed {seed}): {len(images)} images, {n_out} Fashion-MNIST outliers "
             f"({100 * args.outlier_fraction:.0f}%); kept {int(res.kept.sum())}; outlier precision of the removed "
             f"{pr['precision']:.3f}, recall {pr['recall']:.3f} (chance precision {args.outlier_fraction:.3f}); "
             f"outliers left in the kept set: {int((res.kept & is_outlier).sum())}; total {res.time_s:.0f} s", "",
             "| Self-Distilled StyleGAN row | psi | FID | KID x1000 | recognised (p >= 0.9) | classes >= 2% |",
             "|---|---|---|---|---|---|"]
    for name, gan in (("GAN on the raw set", res.raw.ema), ("GAN on the filtered set", res.filtered.ema)):
        imgs = samples(gan, n, 2000 + seed)
        s = fid_kid(real_test[:n], imgs, net, kid_subset_size=min(500, n), kid_subsets=20)
        rec, ncls = class_stats(net, imgs)
        lines.append(f"| {name} | 1.0 | {s['fid']:.2f} | {1000 * s['kid']:.2f} | {rec:.3f} | {ncls} |")
    for psi in args.psi:
        for name, clusters in (("filtered, mean truncation", None), ("filtered, multi-modal truncation", res.clusters)):
            imgs = sample_truncated(res.filtered.ema, n, psi, clusters=clusters, seed=3000 + seed)
            s = fid_kid(real_test[:n], imgs, net, kid_subset_size=min(500, n), kid_subsets=20)
            rec, ncls = class_stats(net, imgs)
            lines.append(f"| {name} | {psi} | {s['fid']:.2f} | {1000 * s['kid']:.2f} | {rec:.3f} | {ncls} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--teacher-width", type=int, default=32)
    p.add_argument("--teacher-steps", type=int, default=None, help="default: --steps")
    p.add_argument("--teacher-batch", type=int, default=None, help="default: --batch")
    p.add_argument("--student-width", type=int, default=16)
    p.add_argument("--student-min-width", type=int, default=4)
    p.add_argument("--rows", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--parts", nargs="+", default=["stylekd", "selfdistill"], choices=["stylekd", "selfdistill"])
    p.add_argument("--sd-size", type=int, default=2000)
    p.add_argument("--outlier-fraction", type=float, default=0.1)
    p.add_argument("--keep", type=float, default=0.85)
    p.add_argument("--projection-steps", type=int, default=30)
    p.add_argument("--cluster-samples", type=int, default=2000)
    p.add_argument("--psi", type=float, nargs="+", default=[0.5])
    p.add_argument("--time-reps", type=int, default=5)
    p.add_argument("--r1-gamma", type=float, default=0.1, help="R1 weight of every GAN trained here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--teacher-cache", default=None, help="folder caching the StyleKD teacher (safetensors)")
    p.add_argument("--skip-scratch", action="store_true", help="leave out the student-from-scratch row")
    args = p.parse_args()
    if args.quick:
        args.steps, args.train_subset, args.eval_size, args.sd_size = 8, 256, 200, 200
        args.teacher_width, args.student_width = 16, 8
        args.rows, args.projection_steps, args.cluster_samples, args.time_reps = ["stylekd", "no-relation"], 3, 200, 2
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/generative_stylegan.py", *sys.argv[1:]])
    net = train_feature_net("mnist", epochs=2, seed=0, progress=False)
    x_all, _ = load_mnist(_default_mnist_root(), "train")
    real_test, _ = load_mnist(_default_mnist_root(), "test")
    x = x_all[:args.train_subset]
    print(f"## StyleKD / Self-Distilled StyleGAN on MNIST ({'quick smoke run' if args.quick else 'real mode'})\n")
    print(f"extractor: {net.name} (KID on its features standardised by the MNIST training split); R1 gamma {args.r1_gamma}; {args.steps} steps of batch {args.batch} (teacher: "
          f"{args.teacher_steps or args.steps} of {args.teacher_batch or args.batch}); teacher width {args.teacher_width}, "
          f"student width {args.student_width} (min {args.student_min_width}); {args.eval_size} samples vs as many "
          f"MNIST test images; CPU, {args.threads} thread(s)\n")
    t0 = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if "stylekd" in args.parts:
            print("\n".join(run_stylekd(args, x, real_test, net, seed)) + "\n", flush=True)
        if "selfdistill" in args.parts:
            print("\n".join(run_selfdistill(args, real_test, net, seed)) + "\n", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s\n\n```sh\n{command}\n```")


if __name__ == "__main__":
    main()
