"""Image-to-image distillation benchmark (issue 16, part G3): Wavelet KD and StyleGAN2 distillation.

Wavelet KD (Zhang et al. CVPR 2022, arXiv 2203.06321), on Fashion-MNIST edges -> image
(:mod:`distill.data.img2img`): a pix2pix teacher U-Net (width 32) and a student U-Net (width 8)
trained with pix2pix's loss (L1 x 100 + PatchGAN) from scratch, with Wavelet KD (high bands of 4
Haar levels) and with plain output L1 KD, each at the KD weights ``--kd-weights`` (default 100).
Measures on the test pairs: PSNR (dB, MSE over all pixels) and FID / KID of the outputs against the
real target images in the feature space of a LeNet trained here on Fashion-MNIST
(``train_feature_net``; Inception weights cannot be downloaded), parameters, and the CPU inference
time ratio student / teacher (batch 256, one thread).

StyleGAN2 distillation (Viazovetskyi et al. ECCV 2020, arXiv 2003.03581): a StyleGAN2-like teacher
trained here on MNIST digits 1 and 7 (``teacher_gan``), the edit 1 -> 7 found with a LeNet classifier
trained here on MNIST; a student U-Net learns the edit from the generated pairs. Measures on held-out
generated pairs: PSNR of the student's edit against the teacher's (and of the unedited source), FID of
the student's edits against the teacher's; the classifier's rate of "7" on the teacher's edits, the
student's edits, and on real MNIST test 1s before / after the student's edit.

    python benchmarks/generative_img2img.py [--quick] [--seeds 1] [--parts wavelet stylegan2]

``--quick`` is a smoke run (< 2 min): tiny budgets, the numbers say the pipeline works, not how good
a method is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from distill.data.img2img import img2img_pairs  # noqa: E402
from distill.models import create  # noqa: E402
from distill.strategies.img2img import predict_images, train_img2img  # noqa: E402
from distill.strategies.stylegan2_distillation import stylegan2_distillation, teacher_gan  # noqa: E402
from distill.train.generative_eval import fid_kid, train_feature_net  # noqa: E402


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _infer_time(m: torch.nn.Module, x: torch.Tensor, reps: int = 5) -> float:
    predict_images(m, x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        predict_images(m, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def wavelet_rows(args: argparse.Namespace) -> list[str]:
    q = args.quick
    n_train, n_test = (400, 200) if q else (args.train_pairs, 1000)
    t_steps, s_steps = (60, 40) if q else (args.teacher_steps, args.student_steps)
    src, tgt = img2img_pairs("edges2image", "fashion_mnist", "train", limit=n_train, seed=0)
    vsrc, vtgt = img2img_pairs("edges2image", "fashion_mnist", "test", limit=n_test, seed=0)
    fnet = train_feature_net("fashion_mnist", epochs=1 if q else 2, progress=not q)
    torch.manual_seed(0)
    teacher = create("unet_img2img_teacher")
    tr = train_img2img(teacher, src, tgt, steps=t_steps, batch_size=32, val=(vsrc, vtgt), progress=not q)
    t_out = predict_images(teacher, vsrc)
    t_fid = fid_kid(vtgt, t_out, fnet)
    t_time = _infer_time(teacher, vsrc[:256])
    lines = [f"Wavelet KD, Fashion-MNIST edges -> image: {n_train} train / {n_test} test pairs, teacher "
             f"{t_steps} steps, students {s_steps} steps, batch 32, seeds {list(range(args.seeds))}; "
             f"FID/KID extractor: {fnet.name}",
             "",
             "| row | params | PSNR (dB) | FID | KID | time ratio (student / teacher) | train time (s) |",
             "|---|---|---|---|---|---|---|",
             f"| teacher U-Net (width 32) | {_params(teacher):,} | {tr.psnr:.2f} | {t_fid['fid']:.2f} | "
             f"{t_fid['kid']:.4f} | 1.00 | {tr.time_s:.0f} |"]
    variants = [("student U-Net (width 8) from scratch", None, 0.0)]
    variants += [(f"student + Wavelet KD (weight {w:g})", "wavelet", w) for w in args.kd_weights]
    variants += [(f"student + output L1 KD (weight {w:g})", "l1", w) for w in args.kd_weights]
    for label, kd, kd_weight in variants:
        ps, fids, kids, ratios, secs = [], [], [], [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            student = create("unet_img2img_student")
            r = train_img2img(student, src, tgt, teacher=teacher if kd else None, kd=kd, kd_weight=kd_weight,
                              steps=s_steps, batch_size=32, val=(vsrc, vtgt), seed=seed, progress=not q)
            m = fid_kid(vtgt, predict_images(student, vsrc), fnet)
            ps.append(r.psnr)
            fids.append(m["fid"])
            kids.append(m["kid"])
            secs.append(r.time_s)
            ratios.append(_infer_time(student, vsrc[:256]) / t_time)
        lines.append(f"| {label} | {_params(student):,} | {_fmt(ps)} | {_fmt(fids)} | {_fmt(kids, 4)} | "
                     f"{_fmt(ratios)} | {statistics.mean(secs):.0f} |")
    return lines


def stylegan2_rows(args: argparse.Namespace) -> list[str]:
    q = args.quick
    from distill.data.sources import _default_mnist_root, load_mnist

    gan_steps = 150 if q else args.gan_steps
    teacher = teacher_gan("mnist", (1, 7), steps=gan_steps, limit=2000 if q else 6000, progress=not q)
    clf = train_feature_net("mnist", epochs=2, progress=not q)
    x_test, y_test = load_mnist(_default_mnist_root(), "test")
    real_ones = x_test[y_test == 1][: 200 if q else 1000]
    lines = [f"StyleGAN2 distillation, MNIST edit 1 -> 7: teacher GAN stylegan_mnist width 32 trained {gan_steps} "
             f"steps on the 1s and 7s; students {20 if q else args.student_steps} steps; classifier and FID extractor: "
             f"{clf.name}",
             "",
             "| row | params | PSNR vs teacher edit (dB) | FID vs teacher edits | '7' rate on generated test "
             "sources | '7' rate on real 1s | latents giving a pair | train time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    rows: dict[str, list[tuple]] = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        student = create("unet_img2img_student")
        out = stylegan2_distillation(student, teacher=teacher, classifier=clf, source_class=1, target_class=7,
                                     direction_samples=512 if q else 4096, top_k=64 if q else 256,
                                     confidence=0.5 if q else 0.9, train_pairs=64 if q else 2000,
                                     test_pairs=32 if q else 500, steps=20 if q else args.student_steps,
                                     batch_size=32, feature_net=clf, real_images=real_ones, seed=seed,
                                     progress=not q)
        rows.setdefault("teacher", []).append((out.edit_rate_teacher,))
        rows.setdefault("student", []).append((out.psnr_student, out.fid_student, out.edit_rate_student,
                                               out.real_edit_rate, out.keep_rate, out.train.time_s))
        rows.setdefault("identity", []).append((out.psnr_identity, out.edit_rate_source, out.real_base_rate))
        n_params = _params(student)
    st = rows["student"]
    ident = rows["identity"]
    lines.append(f"| teacher GAN edit G(w + d) | {_params(teacher):,} | (reference) | (reference) | "
                 f"{_fmt([r[0] for r in rows['teacher']])} | (needs inversion) | | |")
    lines.append(f"| no edit (source image unchanged) | 0 | {_fmt([r[0] for r in ident])} | | "
                 f"{_fmt([r[1] for r in ident])} | {_fmt([r[2] for r in ident])} | | |")
    lines.append(f"| student U-Net (width 8), feed-forward edit | {n_params:,} | {_fmt([r[0] for r in st])} | "
                 f"{_fmt([r[1] for r in st])} | {_fmt([r[2] for r in st])} | {_fmt([r[3] for r in st])} | "
                 f"{_fmt([r[4] for r in st])} | {statistics.mean(r[5] for r in st):.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run with tiny budgets (< 2 min)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--parts", nargs="+", default=["wavelet", "stylegan2"], choices=["wavelet", "stylegan2"])
    p.add_argument("--train-pairs", type=int, default=4000)
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--student-steps", type=int, default=800)
    p.add_argument("--gan-steps", type=int, default=1500)
    p.add_argument("--kd-weights", type=float, nargs="+", default=[100.0],
                   help="weights of the KD term (Wavelet KD and output L1 KD rows, one row each)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out: list[str] = []
    if "wavelet" in args.parts:
        out += wavelet_rows(args) + [""]
    if "stylegan2" in args.parts:
        out += stylegan2_rows(args) + [""]
    print("\n".join(out))
    print(f"command: python benchmarks/generative_img2img.py {' '.join(sys.argv[1:])}  "
          f"({time.perf_counter() - t0:.0f} s, CPU, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
