"""StyleGAN2 distillation for feed-forward image manipulation (Viazovetskyi et al. ECCV 2020, arXiv 2003.03581).

A StyleGAN2-like teacher is trained here on MNIST 1s and 7s (cached as safetensors), a LeNet
classifier on MNIST; the edit 1 -> 7 is found in the teacher's w-space from the classifier's scores,
turned into paired images, and a small U-Net learns it feed-forward. Printed: PSNR against the
teacher's edits on held-out pairs, and how often the classifier sees a 7 after the student's edit,
on generated and on real MNIST 1s.

    python examples/generative/stylegan2_distillation.py [--quick] [--gan-steps 1500] [--steps 800]
        [--source 1] [--target 7]

``--quick`` (~15 s of CPU): the GAN trains 20 steps on 1,000 images (cached too), the classifier one epoch
on 2,000 training images (not cached), the confidence threshold is off (0: with a GAN this raw a confident
1 -> 7 pair is rare, and collecting pairs 2,048 latents at a time dominated the old quick run) and the
student trains 3 steps on 16 pairs: the run shows the pipeline works, not a good edit. Nothing is
downloaded; the MNIST files are needed.
"""

from __future__ import annotations

import argparse

import torch

from distill.data.sources import _default_mnist_root, load_mnist
from distill.models import create
from distill.strategies.stylegan2_distillation import stylegan2_distillation, teacher_gan
from distill.train.generative_eval import train_feature_net


def main() -> None:
    p = argparse.ArgumentParser(description="StyleGAN2 distillation on MNIST")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--gan-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--source", type=int, default=1)
    p.add_argument("--target", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    q = args.quick
    teacher = teacher_gan("mnist", (args.source, args.target), steps=20 if q else args.gan_steps,
                          limit=1000 if q else 6000, progress=not q)
    if q:  # not the full classifier's two epochs on 60,000 images
        x_train, y_train = load_mnist(_default_mnist_root(), "train")
        classifier = train_feature_net("mnist", epochs=1, images=x_train[:2000], labels=y_train[:2000],
                                       progress=False)
    else:
        classifier = train_feature_net("mnist", epochs=2, progress=True)
    x, y = load_mnist(_default_mnist_root(), "test")
    real = x[y == args.source][: 32 if q else 1000]
    out = stylegan2_distillation(create("unet_img2img_student"), teacher=teacher, classifier=classifier,
                                 source_class=args.source, target_class=args.target,
                                 direction_samples=128 if q else 4096, top_k=16 if q else 256,
                                 confidence=0.0 if q else 0.9, train_pairs=16 if q else 2000,
                                 test_pairs=8 if q else 500, steps=3 if q else args.steps, batch_size=8 if q else 32,
                                 real_images=real, seed=args.seed, progress=not q)
    print(f"pairs kept: {out.keep_rate:.1%} of the sampled latents")
    print(f"held-out generated pairs: PSNR student {out.psnr_student:.2f} dB, no edit {out.psnr_identity:.2f} dB")
    print(f"classifier sees a {args.target}: teacher's edits {out.edit_rate_teacher:.1%}, student's edits "
          f"{out.edit_rate_student:.1%}, unedited sources {out.edit_rate_source:.1%}")
    print(f"real {args.source}s: {out.real_base_rate:.1%} seen as {args.target} before, {out.real_edit_rate:.1%} after "
          "the student's edit")


if __name__ == "__main__":
    main()
