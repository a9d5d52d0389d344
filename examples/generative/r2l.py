"""R2L on a procedurally rendered scene: a NeRF teacher distilled into a one-pass neural light field.

R2L (Wang et al., ECCV 2022, arXiv 2203.17261): a NeRF renders a pixel by querying its MLP at many points
along the ray and compositing them; a neural light field (NeLF) maps the ray to its colour in one forward
pass. R2L trains a deep residual MLP light field on pseudo-data, images the trained NeRF renders from random
new camera poses, then fine-tunes it on the real views (:func:`distill.strategies.r2l.r2l`).

The scene is analytic (spheres, boxes and a checkered ground disc, ray-cast exactly:
:mod:`distill.data.lightfield`), so nothing is downloaded. The script trains the teacher on ``--views``
random views, runs R2L, reports the test PSNR of teacher and student and the time per image of each (one
CPU thread), and writes a PPM image of the test views (rows: ground truth, teacher, student).

    python examples/generative/r2l.py [--scene 0] [--size 32] [--views 30] [--teacher-steps 2500]
        [--pseudo 300] [--distill-steps 3000] [--finetune-steps 500] [--out runs/r2l_example] [--quick]

``--quick``: tiny budgets (< 60 s; a smoke run: the numbers say the pipeline works, not how good it is).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from distill.data.lightfield import make_scene, make_views
from distill.models.nerf import NeLF, NeRF
from distill.strategies.r2l import evaluate_views, r2l


def write_ppm(path: Path, rows: list[torch.Tensor]) -> None:
    """Write rows of images (each (V, H, W, 3) in [0, 1]) as one binary PPM, 4x enlarged."""
    grid = torch.cat([torch.cat(list(r), 1) for r in rows], 0)
    grid = grid.repeat_interleave(4, 0).repeat_interleave(4, 1)
    data = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"P6 {data.shape[1]} {data.shape[0]} 255\n".encode() + data.tobytes())


def main() -> None:
    p = argparse.ArgumentParser(description="R2L: NeRF -> neural light field on a procedural scene")
    p.add_argument("--scene", type=int, default=0, help="scene seed")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--views", type=int, default=30)
    p.add_argument("--test-views", type=int, default=6)
    p.add_argument("--samples", type=int, default=48, help="teacher samples per ray")
    p.add_argument("--teacher-steps", type=int, default=2500)
    p.add_argument("--pseudo", type=int, default=300)
    p.add_argument("--distill-steps", type=int, default=3000)
    p.add_argument("--finetune-steps", type=int, default=500)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/r2l_example"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.size, args.views, args.test_views, args.samples = 16, 12, 3, 24
        args.teacher_steps, args.pseudo, args.distill_steps, args.finetune_steps = 300, 40, 300, 60
        args.width, args.depth = 48, 8
    torch.set_num_threads(1)
    t0 = time.time()
    scene = make_scene(args.scene)
    train = make_views(scene, args.views, H=args.size, W=args.size, seed=args.scene)
    test = make_views(scene, args.test_views, H=args.size, W=args.size, seed=args.scene + 1000)
    torch.manual_seed(args.scene)
    teacher = NeRF(num_freqs=6, width=64, depth=4)
    student = NeLF(train.near, train.far, num_points=8, num_freqs=6, width=args.width, depth=args.depth)
    res = r2l(student, train, test, teacher=teacher, teacher_steps=args.teacher_steps, num_samples=args.samples,
              pseudo_images=args.pseudo, distill_steps=args.distill_steps, finetune_steps=args.finetune_steps,
              batch_rays=1024 if not args.quick else 256, lr=1e-3, teacher_kwargs={"batch_rays": 512},
              seed=args.scene)
    print(f"teacher NeRF ({args.samples} samples/ray): test PSNR {res.teacher_psnr:.2f} dB, "
          f"{res.teacher_time_s * 1e3:.1f} ms/image")
    print(f"student NeLF ({args.depth} layers x {args.width}, one pass/ray): test PSNR {res.student_psnr:.2f} dB, "
          f"{res.student_time_s * 1e3:.1f} ms/image")
    print(f"speed-up teacher/student: {res.speedup:.1f}x measured, {1 / res.macs_ratio:.1f}x in MACs per ray; "
          f"{res.pseudo_rays} pseudo rays")
    images = [test.images, evaluate_views(teacher, test, num_samples=args.samples)["images"],
              evaluate_views(student, test)["images"]]
    write_ppm(args.out / "test_views.ppm", images)
    print(f"wrote {args.out / 'test_views.ppm'} (rows: ground truth, teacher, student)  [{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
