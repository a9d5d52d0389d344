"""DarkGAN on Fashion-MNIST: a GAN conditioned on a classifier teacher's soft labels.

DarkGAN (Nistal, Lattner, Richard, ISMIR 2021, arXiv 2108.01216) distils a classifier into a GAN:
the teacher labels each real image with its temperature-softened probabilities ``c``, the generator
``G(z, c)`` takes them as its conditioning and the discriminator's auxiliary head learns to predict
them (:func:`distill.strategies.darkgan.darkgan`). The paper does this for audio; here the data are
Fashion-MNIST (or MNIST) images and the teacher a LeNet-style classifier trained here.

The script trains the teacher (cached), the GAN, then asks the teacher how well generated images
follow their soft labels (KL and top-1 agreement), and writes a grid of samples as a PGM image
(rows: one held-out test image's soft label each, the first column that real image).

    python examples/generative/darkgan.py [--dataset fashion_mnist|mnist] [--steps 1000] [--width 32]
        [--out runs/darkgan_example] [--quick]

``--quick``: tiny budgets (< 60 s; a smoke run: the numbers say the pipeline works, not how good it is).
Nothing is downloaded; the data are the local Fashion-MNIST / MNIST files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from distill.data.sources import _default_mnist_root, load_fashion_mnist, load_mnist
from distill.models.stylegan import StyleGenerator
from distill.strategies.darkgan import darkgan, darkgan_evaluate, teacher_soft_labels
from distill.train.generative_eval import train_feature_net


class Classifier(torch.nn.Module):
    """The trained LeNet's logits: images ``(B, 1, H, W)`` in [0, 1] -> ``(B, K)``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.classify(x)


def write_pgm(path: Path, images: torch.Tensor, cols: int) -> None:
    """``images`` ``(N, 1, H, W)`` in [0, 1] as one grey PGM grid of ``cols`` columns (no image library needed)."""
    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    grid = torch.zeros(rows * (h + 1), cols * (w + 1))
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = images[i, 0]
    data = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"P5 {data.shape[1]} {data.shape[0]} 255\n".encode() + data.numpy().tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("fashion_mnist", "mnist"), default="fashion_mnist")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("runs/darkgan_example"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    load = (lambda s: load_mnist(_default_mnist_root(), s)) if args.dataset == "mnist" else (
        lambda s: load_fashion_mnist(split=s))
    x, y = load("train")
    xt, yt = load("test")
    if args.quick:
        args.steps, args.width, args.batch = 10, 16, 16
        net = train_feature_net(args.dataset, 3, seed=1, images=x[:2000], labels=y[:2000], progress=False)
        x, xt, yt = x[:512], xt[:256], yt[:256]
    else:
        net = train_feature_net(args.dataset, 2, seed=1)
    teacher = Classifier(net).eval()
    logits, targets = teacher_soft_labels(teacher, xt, args.temperature)
    print(f"teacher {net.name}: test top-1 {float((logits.argmax(1) == yt).float().mean()):.4f}")

    gen = StyleGenerator(c_dim=targets.shape[1], width=args.width)
    res = darkgan(gen, teacher=teacher, images=x, temperature=args.temperature, steps=args.steps,
                  batch_size=args.batch, progress=not args.quick, checkpoint=args.out / "darkgan.safetensors")
    ev = darkgan_evaluate(res.ema, teacher, targets, temperature=args.temperature)
    print(f"DarkGAN, {args.steps} steps ({res.time_s:.0f} s): on {len(targets)} held-out soft labels the teacher's "
          f"KL(c || t(G(z, c)) / T) = {ev['kl']:.4f}, top-1 agreement {ev['top1']:.3f} (chance ~ 0.1)")

    # a grid: 8 held-out images' soft labels, the real image then 7 samples each
    with torch.no_grad():
        z = torch.randn(8 * 7, gen.z_dim, generator=torch.Generator().manual_seed(0))
        fakes = (res.ema(z, targets[:8].repeat_interleave(7, 0)) + 1) / 2
    tiles = torch.cat([torch.cat([xt[i:i + 1], fakes[7 * i:7 * i + 7]]) for i in range(8)])
    write_pgm(args.out / "samples.pgm", tiles, cols=8)
    print(f"wrote {args.out / 'samples.pgm'} and {res.checkpoint} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
