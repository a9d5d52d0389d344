"""Token counts, multiply-accumulates and CPU inference time of a ViT with and without SiT's token
slimming (Self-slimmed Vision Transformer, Zong et al. ECCV 2022, arXiv 2111.12624).

    python examples/vit/sit_speed.py            # vit_tiny / sit_tiny and vit_small / sit_small, 28x28
    python examples/vit/sit_speed.py --quick    # fewer repeats, smaller batch

Random weights: the cost of a forward pass does not depend on them. Timings are the median of
``--repeats`` forward passes under ``torch.inference_mode`` on ``--threads`` CPU threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill.models.slimmed_vit import SlimmedViT

CONFIGS = {  # name: (dim, depth, slim_after), as the zoo's vit_tiny / sit_tiny and vit_small / sit_small
    "tiny": (64, 4, (0, 1)),
    "small": (128, 6, (0, 1, 2)),
}


def _time(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(x)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="batch 64, 5 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 64, 5
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    print(f"| model | patch tokens entering each block | MACs/image (M) | ms / batch of {args.batch} | speed-up |")
    print("|---|---|---|---|---|")
    for name, (dim, depth, slim_after) in CONFIGS.items():
        rows = []
        for slim in ((), slim_after):
            model = SlimmedViT(dim=dim, depth=depth, slim_after=slim).eval()
            rows.append((f"{'sit' if slim else 'vit'}_{name}", model.token_counts[:-1], model.flops()["total"],
                         _time(model, x, args.repeats)))
        base = rows[0][3]
        for label, counts, macs, secs in rows:
            print(f"| {label} | {counts} | {macs / 1e6:.2f} | {secs * 1e3:.1f} | {base / secs:.2f}x |")


if __name__ == "__main__":
    main()
