"""Issue 18: systematic diffusion (Chandrasegaran et al., ICML 2022, arXiv 2206.14532) measured on Fashion-MNIST.

A plain teacher (CE) and an LS teacher (α = 0.1), MLP 784-256-128-10, trained with Adam; students MLP 784-64-10
distilled from each by KD alone (no CE term) at each temperature, all in one run with the same data, seeds and
schedule. Per cell: the student's test accuracy and our diffusion measure
(:func:`distill.functional.ls_diffusion.systematic_diffusion`) on the test set for (target shirt, similar
T-shirt/top, dissimilar sneaker: fixed by hand for every seed; ``--auto`` picks them per seed by the plain
teacher's confusion); the teachers' own rows come first: ``spread→sim`` is the std of the target examples'
position along the target→similar template axis in units of the gap between the two clusters; ``direction``
is that spread over the same toward the dissimilar class. Mean ± std over the seeds (data subset and init).

Small sizes on purpose (a shared CPU): 10k training images, 5 + 5 epochs. The paper's setting is ImageNet
ResNet-50 → ResNet-18 at T ∈ {1, 2, 3, 64}.

    python benchmarks/ls_diffusion.py --quick      # 1 seed, T ∈ {1, 4}, 5k images, 2 + 2 epochs
    python benchmarks/ls_diffusion.py              # 3 seeds, T ∈ {1, 4, 8}
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "explain"))
from ls_diffusion import FASHION, run  # noqa: E402  (the example's experiment, shared on purpose)


def _ms(v: list[float], fmt: str) -> str:
    return format(v[0], fmt) if len(v) == 1 else f"{format(statistics.mean(v), fmt)} ± {format(statistics.stdev(v), fmt)}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--classes", type=int, nargs=3, default=[6, 0, 7], metavar=("TARGET", "SIMILAR", "DISSIMILAR"),
                   help="fixed for every seed (default shirt, T-shirt/top, sneaker: what the plain teacher's "
                        "confusion picks on most seeds); 'auto' picking per seed: pass --auto")
    p.add_argument("--auto", action="store_true", help="pick similar/dissimilar per seed from the plain teacher")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        temps, seeds, sizes = [1.0, 4.0], [0], dict(n_train=5000, n_test=2000, teacher_epochs=2, student_epochs=2)
    else:
        temps, seeds = [1.0, 4.0, 8.0], list(range(args.seeds))
        sizes = dict(n_train=10000, n_test=10000, teacher_epochs=5, student_epochs=5)
    cells: dict[tuple[float, float], list] = {}
    teacher_acc: dict[float, list[float]] = {}
    picked = []
    for seed in seeds:
        classes, t_acc, results = run(temps=temps, alphas=[0.0, 0.1], seed=seed, target=args.classes[0],
                                      classes=None if args.auto else tuple(args.classes), **sizes)
        picked.append(classes)
        for a, v in t_acc.items():
            teacher_acc.setdefault(a, []).append(v)  # (accuracy, the teacher's own stats)
        for r in results:
            cells.setdefault((r.alpha, r.T), []).append(r)
    print(f"Fashion-MNIST, {sizes['n_train']} train / {sizes['n_test']} test images, seeds {seeds}; classes "
          "(target, similar, dissimilar) per seed: " + "; ".join("/".join(FASHION[c] for c in cl) for cl in picked))
    print("| teacher α | T | acc % | spread→sim | spread→dis | overlap→sim | direction |")
    print("|---|---|---|---|---|---|---|")
    for a, vs in teacher_acc.items():  # the teachers themselves (Müller et al.: LS should tighten these)
        st = [v[1] for v in vs]
        print(f"| {a:g} (teacher) | — | {_ms([v[0] for v in vs], '.1f')} | {_ms([x.spread_similar for x in st], '.3f')} "
              f"| {_ms([x.spread_dissimilar for x in st], '.3f')} | {_ms([x.overlap_similar for x in st], '.3f')} "
              f"| {_ms([x.directionality for x in st], '.2f')} |")
    for (a, T), rs in cells.items():
        print(f"| {a:g} | {T:g} | {_ms([r.acc for r in rs], '.1f')} | {_ms([r.stats.spread_similar for r in rs], '.3f')} "
              f"| {_ms([r.stats.spread_dissimilar for r in rs], '.3f')} | {_ms([r.stats.overlap_similar for r in rs], '.3f')} "
              f"| {_ms([r.stats.directionality for r in rs], '.2f')} |")


if __name__ == "__main__":
    main()
