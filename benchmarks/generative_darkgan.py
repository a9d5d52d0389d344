"""DarkGAN benchmark (issue 16, part G5): a classifier teacher's soft labels as a GAN's conditioning.

DarkGAN (Nistal et al., ISMIR 2021, arXiv 2108.01216) on Fashion-MNIST (``--dataset mnist`` for
MNIST) instead of the paper's audio. The teacher is a LeNet-style classifier trained here
(:func:`~distill.train.generative_eval.train_feature_net` with seed 1, its logits); every training
image is labelled with its soft labels ``c = softmax(t / 3)``. Three GANs of one architecture (a small
StyleGAN2-like generator of ``--width`` channels and its discriminator with an auxiliary head) are
trained by the same loop (:func:`distill.strategies.darkgan.darkgan`), the same steps and seeds:

* ``darkgan``: conditioned on the teacher's soft labels (the method);
* ``onehot``: conditioned on the teacher's top-1 class as a one-hot vector (AC-GAN, no dark knowledge);
* ``uncond``: no conditioning (a plain GAN).

Measures, on ``--eval-size`` held-out test images: each GAN generates one image per test image's soft
label ``c_i`` (the one-hot GAN gets ``c_i``'s top-1 class, the plain GAN nothing), and the teacher
judges it: ``KL(c_i || softmax(t(G(z, c_i)) / 3))`` (lower: the image carries more of its soft label)
and top-1 agreement (the teacher's class of the image is ``c_i``'s top class); FID and KID
against the held-out test images in the feature space of a LeNet trained here (seed 0, the other
parts' extractor; Inception weights cannot be downloaded); the training time. A reference row gives
the same measures for real test images: for each ``c_i`` another test image of the same teacher class
(what an ideal class-conditional generator would reach on KL), and FID/KID of a second held-out half.

    python benchmarks/generative_darkgan.py [--quick] [--seeds 1] [--dataset fashion_mnist|mnist]
        [--steps 800] [--batch 32] [--width 32] [--train-subset 20000] [--eval-size 1000]
        [--rows darkgan onehot uncond] [--threads 1] [--first-seed 0] [--results-json FILE]
    python benchmarks/generative_darkgan.py --merge FILE [FILE ...]   # one table from seeds run apart

``--quick`` is a smoke run (< 2 min): tiny budgets and nets trained on a slice; its numbers say the
pipeline runs, not how good a method is.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from distill.data.sources import _default_mnist_root, load_fashion_mnist, load_mnist
from distill.functional.darkgan import darkgan_condition_agreement
from distill.models.stylegan import StyleDiscriminator, StyleGenerator
from distill.strategies.darkgan import (
    AuxDiscriminator,
    darkgan,
    darkgan_evaluate,
    teacher_soft_labels,
)
from distill.train.generative_eval import FeatureNet, fid_kid, train_feature_net

ROWS = ("darkgan", "onehot", "uncond")
CONDITIONING = {"darkgan": "soft", "onehot": "onehot", "uncond": "none"}
T = 3.0


class Classifier(nn.Module):
    """A :class:`FeatureNet` used as a classifier: images ``(B, C, H, W)`` in [0, 1] -> logits ``(B, K)``."""

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.classify(x)


def _load(dataset: str, split: str) -> tuple[Tensor, Tensor]:
    if dataset == "mnist":
        return load_mnist(_default_mnist_root(), split)
    return load_fashion_mnist(split=split)


def _nets(args: argparse.Namespace, x: Tensor, y: Tensor) -> tuple[FeatureNet, FeatureNet]:
    """(teacher net, FID extractor). Real mode: the full training split, cached; quick: a slice, 1 epoch."""
    if args.quick:
        sub = slice(0, 3000)
        teacher = train_feature_net(args.dataset, 3, seed=1, images=x[sub], labels=y[sub], progress=False)
        fnet = train_feature_net(args.dataset, 1, seed=0, images=x[sub], labels=y[sub], progress=False)
        teacher.name += " [quick: 3000 images]"
        fnet.name += " [quick: 3000 images]"
        return teacher, fnet
    return (train_feature_net(args.dataset, args.teacher_epochs, seed=1, progress=True),
            train_feature_net(args.dataset, 2, seed=0, progress=True))


def _fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def reference_row(targets: Tensor, test_logits: Tensor, real_a: Tensor, real_b: Tensor, fnet: FeatureNet,
                  seed: int) -> dict[str, float]:
    """Real images as the 'generator': for each target ``c_i`` a random other test image of its teacher class
    (the KL an ideal class-conditional generator reaches); FID/KID of two disjoint held-out halves."""
    g = torch.Generator().manual_seed(seed)
    cls = test_logits.argmax(1)
    pick = torch.empty(len(targets), dtype=torch.long)
    for i in range(len(targets)):
        same = torch.nonzero(cls == targets[i].argmax(), as_tuple=False).flatten()
        same = same[same != i] if len(same) > 1 else same
        pick[i] = same[torch.randint(0, len(same), (1,), generator=g)]
    out = darkgan_condition_agreement(test_logits[pick], targets, T)
    out.update({k: v for k, v in fid_kid(real_a, real_b, fnet, seed=seed).items() if k in ("fid", "kid")})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--dataset", choices=("fashion_mnist", "mnist"), default="fashion_mnist")
    ap.add_argument("--steps", type=int, default=800, help="GAN steps per row")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=32, help="generator/discriminator width (StyleGenerator)")
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--results-json", default=None, help="also write every seed's numbers to this JSON file")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="print one table from --results-json files of runs with the same settings, train nothing")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge)
    if args.seeds < 1:
        ap.error(f"--seeds must be a positive int; got {args.seeds}")
    if args.quick:
        args.steps, args.batch, args.width, args.train_subset, args.eval_size = 15, 16, 16, 512, 128
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/generative_darkgan.py", *sys.argv[1:]])
    t_start = time.perf_counter()

    x_all, y_all = _load(args.dataset, "train")
    xt_all, yt_all = _load(args.dataset, "test")
    teacher_net, fnet = _nets(args, x_all, y_all)
    teacher = Classifier(teacher_net).eval()
    x_train = x_all[:args.train_subset]
    m = args.eval_size
    if 2 * m > len(xt_all):
        ap.error(f"--eval-size {m} needs {2 * m} test images; the split has {len(xt_all)}")
    x_eval, x_ref = xt_all[:m], xt_all[m:2 * m]
    test_logits, targets = teacher_soft_labels(teacher, x_eval, T)
    teacher_acc = float((teacher_soft_labels(teacher, xt_all, T)[0].argmax(1) == yt_all).float().mean())
    k = targets.shape[1]

    results: dict[str, list[dict[str, float]]] = {r: [] for r in ("reference", *args.rows)}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for seed in seeds:
        results["reference"].append(reference_row(targets, test_logits, x_eval, x_ref, fnet, seed))
        for row in args.rows:
            cond = CONDITIONING[row]
            torch.manual_seed(seed)
            gen = StyleGenerator(c_dim=0 if cond == "none" else k, width=args.width)
            base = StyleDiscriminator(width=args.width)
            disc = base if cond == "none" else AuxDiscriminator(base, k)
            res = darkgan(gen, teacher=teacher, images=x_train, discriminator=disc, conditioning=cond,
                          temperature=T, steps=args.steps, batch_size=args.batch, progress=not args.quick, seed=seed)
            inputs = {"soft": None, "onehot": F.one_hot(targets.argmax(1), k).float(), "none": None}[cond]
            ev = darkgan_evaluate(res.ema, teacher, targets, inputs=inputs, real=x_eval, feature_net=fnet,
                                  temperature=T, seed=1000 + seed)
            ev["time_s"] = res.time_s
            results[row].append(ev)
            print(f"[darkgan bench] seed {seed} {row}: kl {ev['kl']:.4f} top1 {ev['top1']:.3f} fid {ev['fid']:.2f} "
                  f"kid {ev['kid']:.4f} "
                  f"({res.time_s:.0f} s)", file=sys.stderr, flush=True)

    header = [f"DarkGAN on {args.dataset}: {len(x_train)} training images, {args.steps} steps, batch {args.batch}, "
              f"width {args.width}, seeds {seeds}.",
              f"Teacher: {teacher_net.name}, test top-1 {teacher_acc:.4f}. FID/KID extractor: {fnet.name} (KID on its "
              f"features standardised by the training split). {m} held-out test images."]
    if args.results_json:
        import json

        Path(args.results_json).write_text(json.dumps({"header": header, "seeds": seeds, "results": {
            row: [{k: float(v) for k, v in r.items() if not isinstance(v, str)} for r in rs]  # numbers only
            for row, rs in results.items()}}))
    _table(header, results)
    print()
    print(f"command: {command}  (total {time.perf_counter() - t_start:.0f} s)")
    return 0


LABELS = {"reference": "real test images (same teacher class; held-out half for FID)",
          "darkgan": "DarkGAN: teacher soft labels (T = 3)", "onehot": "teacher top-1, one-hot (AC-GAN)",
          "uncond": "none (plain GAN)"}


def merge(paths: list[str]) -> int:
    """One table (mean ± std over every seed) from several ``--results-json`` files (runs of other seeds
    or other rows with the same settings)."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    by_key: dict[str, dict[int, dict[str, float]]] = {}  # row -> seed -> numbers: runs of single rows repeat
    for run in runs:                                     # the reference row of their seed; it is kept once
        for row, rs in run["results"].items():
            by_key.setdefault(row, {}).update(zip(run["seeds"], rs))
    order = ["reference", *[r for r in LABELS if r != "reference"]]
    results = {row: [by_key[row][s] for s in sorted(by_key[row])] for row in order if row in by_key}
    seeds = sorted({s for run in runs for s in run["seeds"]})
    header = [runs[0]["header"][0].rsplit(", seeds", 1)[0] + f", seeds {seeds} (merged from {len(runs)} runs).",
              *runs[0]["header"][1:]]
    _table(header, results)
    return 0


def _table(header: list[str], results: dict[str, list[dict[str, float]]]) -> None:
    print("\n".join(header))
    print()
    print("| row | conditioning | teacher KL(c ‖ t(G(z, c)) / T) ↓ | teacher top-1 agreement ↑ | FID ↓ | KID ↓ "
          "| train (s) |")
    print("|---|---|---|---|---|---|---|")
    for row, rs in results.items():
        train = _fmt([r["time_s"] for r in rs], 0) if row != "reference" else "-"
        print(f"| {row} | {LABELS[row]} | {_fmt([r['kl'] for r in rs], 4)} | {_fmt([r['top1'] for r in rs])} | "
              f"{_fmt([r['fid'] for r in rs], 2)} | {_fmt([r['kid'] for r in rs], 3)} | {train} |")


if __name__ == "__main__":
    sys.exit(main())
