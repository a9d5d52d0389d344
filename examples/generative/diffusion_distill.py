"""Distil a classifier-free-guided MNIST diffusion model into a few-step, guidance-conditioned student.

Meng et al., "On Distillation of Guided Diffusion Models" (CVPR 2023, arXiv 2210.03142):

1. train a small class-conditional DDPM teacher (diffusers ``UNet2DModel``, v-prediction, cosine schedule,
   labels dropped 10% of the time for classifier-free guidance);
2. stage one (``guided_diffusion_distill``): a student with a guidance-strength input ``w`` learns the guided
   teacher ``(1 + w) x_c - w x_null`` for every ``w`` in [0, 4] in one network evaluation;
3. stage two (``progressive_distill``, Salimans & Ho 2022, arXiv 2202.00512): halve its DDIM steps each round.

Writes a PNG grid (rows: teacher with guidance at N steps, then each student; columns: digits 0-9) and the
students' weights (safetensors) to ``--out``.

    python examples/generative/diffusion_distill.py --quick          # < 60 s, a smoke run (noise-like samples)
    python examples/generative/diffusion_distill.py                  # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description="guided + progressive diffusion distillation on MNIST")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline runs (< 60 s)")
    p.add_argument("--out", default="runs/diffusion_distill", help="folder for samples.png and the weights")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=2000)
    p.add_argument("--stage-one-steps", type=int, default=600)
    p.add_argument("--start-steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-steps", type=int, default=300)
    p.add_argument("--w", type=float, default=1.0, help="guidance strength of the samples")
    a = p.parse_args()
    batch = 64
    if a.quick:
        a.teacher_steps, a.stage_one_steps, a.start_steps, a.rounds, a.round_steps, batch = 20, 5, 4, 2, 4, 16
    torch.set_num_threads(1)

    from distill.data.sources import _default_mnist_root, load_mnist
    from distill.integrations.diffusers import build_unet
    from distill.strategies.diffusion_distill import (diffusion_images, guided_diffusion_distill, progressive_distill,
                                                      sample_diffusion, save_diffusion_model, train_diffusion_teacher)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    x, y = load_mnist(_default_mnist_root(), "train")
    n = 2000 if a.quick else 20000
    images, labels = diffusion_images(x[:n], a.size), y[:n].long()

    torch.manual_seed(0)
    teacher = build_unet(img_size=a.size, block_out_channels=(16, 32), attention=False)
    train_diffusion_teacher(teacher, images, labels, steps=a.teacher_steps, batch_size=batch,
                            checkpoint=out / "teacher.safetensors")
    one = guided_diffusion_distill(teacher=teacher, images=images, labels=labels, steps=a.stage_one_steps,
                                   batch_size=batch, w_min=0.0, w_max=4.0, run_dir=out)
    two = progressive_distill(teacher=one.model, images=images, labels=labels, start_steps=a.start_steps,
                              rounds=a.rounds, steps_per_round=a.round_steps, batch_size=batch, run_dir=out)

    digits = torch.arange(10)
    rows = [sample_diffusion(teacher, digits, a.start_steps, w=a.w)]
    names = [f"teacher, guided, {a.start_steps} steps (2 evaluations each)"]
    for r in two.rounds:
        rows.append(sample_diffusion(r["model"], digits, r["steps"], w=a.w))
        names.append(f"student, {r['steps']} steps")
    grid = torch.cat([torch.cat(list(row[:, 0]), dim=1) for row in rows], dim=0)  # (rows*H, 10*W) in [-1, 1]
    from PIL import Image

    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).resize((pixels.shape[1] * 3, pixels.shape[0] * 3), Image.NEAREST).save(out / "samples.png")
    save_diffusion_model(out / "student_final.safetensors", two.model, {"steps": two.sampling_steps})
    print("rows of samples.png:", "; ".join(names))
    print(f"wrote {out / 'samples.png'} and the weights in {out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
