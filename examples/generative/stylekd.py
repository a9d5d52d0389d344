"""StyleKD (Xu et al. ECCV 2022, arXiv 2208.08840): distil a StyleGAN-like teacher into a narrower student.

A teacher generator is trained here on MNIST (:func:`distill.strategies.gan.train_gan`), then a
narrower student learns from it with :func:`distill.strategies.stylekd.stylekd`: its mapping network
starts as a copy of the teacher's, and its GAN loss gains the image L1, a perceptual distance (the
penultimate features of a LeNet trained here on MNIST, in place of LPIPS whose weights cannot be
downloaded) and the latent-direction relation loss. Printed: FID/KID of teacher and student against
MNIST test images (same LeNet extractor) and the student's L1 to the teacher's image of the same z.
The student is saved as safetensors (G, G_ema, D) under ``--out``.

    python examples/generative/stylekd.py [--quick] [--steps 600] [--teacher-width 32] [--student-width 16]
        [--out runs/stylekd_example]

``--quick`` (< 60 s): a few steps on a few hundred images; the numbers say the pipeline runs.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distill.data.sources import _default_mnist_root, load_mnist
from distill.models.stylegan import StyleDiscriminator, StyleGenerator
from distill.strategies.gan import train_gan
from distill.strategies.stylekd import stylekd
from distill.train.generative_eval import fid_kid, train_feature_net


@torch.no_grad()
def sample(g: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return (g.eval()(z).clamp(-1, 1) + 1) / 2


def main() -> None:
    p = argparse.ArgumentParser(description="StyleKD on MNIST")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--teacher-width", type=int, default=32)
    p.add_argument("--student-width", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/stylekd_example"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    q = args.quick
    steps, n, tw, sw = (6, 256, 16, 8) if q else (args.steps, args.train_subset, args.teacher_width, args.student_width)
    x, labels = load_mnist(_default_mnist_root(), "train")
    test, _ = load_mnist(_default_mnist_root(), "test")
    # --quick: the FID/KID extractor on 2,000 images (uncached; the full one is cached once per machine)
    net = (train_feature_net("mnist", epochs=1, images=x[:2000], labels=labels[:2000], progress=False)
           if q else train_feature_net("mnist", epochs=2, progress=True))
    x = x[:n]
    torch.manual_seed(args.seed)
    teacher = train_gan(StyleGenerator(width=tw), StyleDiscriminator(width=tw), x, steps=steps,
                        batch_size=args.batch, seed=args.seed, progress=not q).ema
    student = StyleGenerator(width=sw, min_width=4)
    res = stylekd(student, teacher=teacher, images=x, discriminator=StyleDiscriminator(width=tw), feature_net=net,
                  steps=steps, batch_size=args.batch, seed=args.seed, progress=not q,
                  checkpoint=args.out / "student.safetensors")
    m = 200 if q else 1000
    z = torch.randn(m, teacher.z_dim, generator=torch.Generator().manual_seed(1))
    t_img, s_img = sample(teacher, z), sample(res.ema, z)
    for name, imgs in (("teacher", t_img), ("student (StyleKD)", s_img)):
        s = fid_kid(test[:m], imgs, net, kid_subset_size=min(500, m), kid_subsets=10)
        print(f"{name}: FID {s['fid']:.2f}  KID {s['kid']:.5f}  ({s['extractor']})")
    print(f"student L1 to the teacher's image of the same z: {float((s_img - t_img).abs().mean()):.4f}")
    print(f"last losses: {res.history[-1]}")
    print(f"saved {res.checkpoint}")


if __name__ == "__main__":
    main()
