"""Self-Distilled StyleGAN (Mokady et al. SIGGRAPH 2022, arXiv 2202.12211) on a contaminated MNIST set.

MNIST digits with a share of Fashion-MNIST images mixed in (the outliers).
:func:`distill.strategies.self_distilled_stylegan.self_distilled_stylegan` trains a GAN on the raw
set, projects every image into it, drops the worst-reconstructed ones and retrains on the rest, then
clusters the new generator's latent space for multi-modal truncation. Printed: how many of the
removed images were outliers (precision) and how many outliers were removed (recall), and FID/KID
(a LeNet trained here on MNIST as the extractor) of the raw GAN, the filtered GAN, and the filtered
GAN under the mean and the multi-modal truncation at equal psi.

    python examples/generative/self_distilled_stylegan.py [--quick] [--size 2000] [--outliers 0.1]
        [--steps 600] [--keep 0.85] [--psi 0.5]

``--quick`` (a few seconds on an idle core): a few steps on 128 images, a feature net trained for one
epoch on 1,000 MNIST training images, 200 samples per FID row; the numbers say the pipeline runs, nothing
more. Nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch

from distill.data.sources import _default_mnist_root, load_fashion_mnist, load_mnist
from distill.functional.gan_truncation import removal_precision_recall
from distill.models.stylegan import StyleDiscriminator, StyleGenerator
from distill.strategies.self_distilled_stylegan import sample_truncated, self_distilled_stylegan
from distill.train.generative_eval import fid_kid, train_feature_net


def main() -> None:
    p = argparse.ArgumentParser(description="Self-Distilled StyleGAN on contaminated MNIST")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--size", type=int, default=2000)
    p.add_argument("--outliers", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.85)
    p.add_argument("--psi", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    q = args.quick
    size, steps, width, proj = (128, 4, 16, 2) if q else (args.size, args.steps, args.width, 30)
    g = torch.Generator().manual_seed(args.seed)
    mnist, mnist_labels = load_mnist(_default_mnist_root(), "train")
    fashion, _ = load_fashion_mnist(split="train")
    test, _ = load_mnist(_default_mnist_root(), "test")
    n_out = round(size * args.outliers)
    images = torch.cat([mnist[torch.randperm(len(mnist), generator=g)[:size - n_out]],
                        fashion[torch.randperm(len(fashion), generator=g)[:n_out]]])
    is_outlier = torch.arange(size) >= size - n_out
    res = self_distilled_stylegan(lambda: StyleGenerator(width=width),
                                  discriminator=lambda: StyleDiscriminator(width=width), images=images,
                                  keep_fraction=args.keep, steps=steps, projection_steps=proj,
                                  cluster_samples=100 if q else 2000, seed=args.seed, progress=not q)
    pr = removal_precision_recall(res.kept, is_outlier)
    print(f"removed {int((~res.kept).sum())} of {size} images: outlier precision {pr['precision']:.3f}, recall "
          f"{pr['recall']:.3f} ({n_out} outliers, chance precision {args.outliers:.3f})")
    # quick: the extractor on 1,000 training images (its 60,000-image epoch dominated the quick run)
    net = (train_feature_net("mnist", epochs=1, images=mnist[:1000], labels=mnist_labels[:1000], progress=False)
           if q else train_feature_net("mnist", epochs=2, progress=True))
    m = 200 if q else 1000
    rows = [("raw GAN", lambda: sample_truncated(res.raw.ema, m, 1.0)),
            ("filtered GAN", lambda: sample_truncated(res.filtered.ema, m, 1.0)),
            (f"filtered, mean truncation psi={args.psi}", lambda: sample_truncated(res.filtered.ema, m, args.psi)),
            (f"filtered, multi-modal truncation psi={args.psi}",
             lambda: sample_truncated(res.filtered.ema, m, args.psi, clusters=res.clusters))]
    for name, make in rows:
        s = fid_kid(test[:m], make(), net, kid_subset_size=min(500, m), kid_subsets=10)
        print(f"{name}: FID {s['fid']:.2f}  KID {s['kid']:.5f}")
    print(f"extractor: {net.name}")


if __name__ == "__main__":
    main()
