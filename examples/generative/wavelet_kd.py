"""Wavelet KD (Zhang et al. CVPR 2022, arXiv 2203.06321) on a small pix2pix task from Fashion-MNIST.

A teacher U-Net (width 32) learns edges -> image with pix2pix's loss; a student U-Net (width 8) then
learns the same task with and without Wavelet KD from the teacher (the high-frequency Haar bands of
the teacher's output images); the test PSNR of each is printed.

    python examples/generative/wavelet_kd.py [--quick] [--task edges2image|thicken]
        [--dataset fashion_mnist|mnist] [--teacher-steps 1500] [--student-steps 800]

``--quick`` (< 60 s): a few hundred pairs and a few dozen steps; the numbers show the pipeline runs.
Needs ptwt (``pip install 'distill[generative]'``) and the data files; nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch

from distill.data.img2img import img2img_pairs
from distill.models import create
from distill.strategies.img2img import train_img2img


def main() -> None:
    p = argparse.ArgumentParser(description="Wavelet KD on a pix2pix task")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--task", default="edges2image", choices=["edges2image", "thicken"])
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    p.add_argument("--train-pairs", type=int, default=4000)
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--student-steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    n_train, n_test = (300, 100) if args.quick else (args.train_pairs, 1000)
    t_steps, s_steps = (40, 30) if args.quick else (args.teacher_steps, args.student_steps)
    src, tgt = img2img_pairs(args.task, args.dataset, "train", limit=n_train, seed=args.seed)
    val = img2img_pairs(args.task, args.dataset, "test", limit=n_test, seed=args.seed)
    torch.manual_seed(args.seed)
    teacher = create("unet_img2img_teacher")
    r = train_img2img(teacher, src, tgt, steps=t_steps, batch_size=32, val=val, seed=args.seed,
                      progress=not args.quick)
    print(f"teacher (width 32):          PSNR {r.psnr:.2f} dB  ({r.time_s:.0f} s)")
    for label, kd in (("student from scratch", None), ("student + Wavelet KD", "wavelet")):
        torch.manual_seed(args.seed)
        student = create("unet_img2img_student")
        r = train_img2img(student, src, tgt, teacher=teacher if kd else None, kd=kd, steps=s_steps, batch_size=32,
                          val=val, seed=args.seed, progress=not args.quick)
        print(f"{label + ' (width 8):':28s} PSNR {r.psnr:.2f} dB  ({r.time_s:.0f} s)")


if __name__ == "__main__":
    main()
