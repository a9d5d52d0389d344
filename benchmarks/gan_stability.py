"""Does the GAN trainer hold at its defaults? ``train_gan`` (lr 0.0025, R1 γ 0.1) on 5,000 MNIST images,
a width-32 ``StyleGenerator`` / ``StyleDiscriminator``, several seeds; per seed the FID of 1,000 EMA
samples against 1,000 test images (LeNet extractor trained here) and whether it collapsed (every
sample the same image: the per-pixel std over samples is 0).

    python benchmarks/gan_stability.py                 # 3 seeds x 600 steps, ~1.5 min per seed on a free core
    python benchmarks/gan_stability.py --quick         # 1 seed x 50 steps

Written for issue 16: the zoo's generator had no equalised learning rate at first, and StyleGAN2's lr
0.0025 collapsed 2 of 3 seeds (run this script in a checkout of commit e8c49c9 to see it).
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.data.sources import _default_mnist_root, load_mnist
from distill.models.stylegan import StyleDiscriminator, StyleGenerator
from distill.strategies.gan import train_gan
from distill.train.generative_eval import fid_kid, train_feature_net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.steps = 1, 50
    torch.set_num_threads(1)
    x, _ = load_mnist(_default_mnist_root(), "train")
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:a.images]]
    real, _ = load_mnist(_default_mnist_root(), "test")
    net = train_feature_net("mnist", progress=False)
    print(f"train_gan defaults, {a.steps} steps of batch {a.batch} on {len(x)} MNIST images, width {a.width}; "
          f"FID extractor: {net.name}; KID x1000 on its features standardised by the MNIST training split\n")
    print("| seed | FID | KID x1000 | per-pixel std over samples | collapsed | train s |\n|---|---|---|---|---|---|")
    for seed in range(a.seeds):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        r = train_gan(StyleGenerator(width=a.width), StyleDiscriminator(width=a.width), x, steps=a.steps,
                      batch_size=a.batch, seed=seed, progress=False)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            fake = torch.cat([(r.ema.eval()(torch.randn(250, r.ema.z_dim, generator=torch.Generator().manual_seed(100 + i)))
                               + 1) / 2 for i in range(4)])
        s = fid_kid(real[:1000], fake, net)
        spread = float(fake.std(0).mean())
        print(f"| {seed} | {s['fid']:.2f} | {1000 * s['kid']:.2f} | {spread:.4f} | {'yes' if spread < 1e-3 else 'no'} | {secs:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
