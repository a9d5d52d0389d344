"""Systematic diffusion (Chandrasegaran et al., ICML 2022, arXiv 2206.14532): does a student distilled at T > 1
from a label-smoothed teacher spread its target class toward a semantically similar one?

Trains a plain teacher (CE) and an LS teacher (α = 0.1) on Fashion-MNIST, distils a student from each at
each temperature (KD loss only, as the authors' student script trains), and prints the student's accuracy
and our diffusion measure (:func:`distill.functional.ls_diffusion.systematic_diffusion`) for the three
classes of Müller et al.'s projection (target, the plain teacher's most confused class, its least
confused one). With ``--png`` it saves the projections (needs the ``plot`` extra: matplotlib).

    python examples/explain/ls_diffusion.py --quick
    python examples/explain/ls_diffusion.py --temps 1 4 8 --png ls_diffusion.png
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import distill
from distill.data.loader import InMemoryLoader
from distill.functional.ls_diffusion import (
    DiffusionStats,
    pick_diffusion_classes,
    project_to_template_plane,
    systematic_diffusion,
)

FASHION = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


@dataclass
class StudentResult:
    """One student: its teacher's label smoothing, temperature, accuracy and diffusion."""

    alpha: float
    T: float
    acc: float
    stats: DiffusionStats
    coords: Tensor      # (N, 2) Müller coordinates of the three classes' test examples
    labels: Tensor      # (N,)
    templates: Tensor   # (3, 2)


def _data(n_train: int, n_test: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    train = distill.data.get_dataset("fashion_mnist", split="train")
    test = distill.data.get_dataset("fashion_mnist", split="test")
    g = torch.Generator().manual_seed(seed)
    i = torch.randperm(len(train), generator=g)[:n_train]
    return train.inputs[i], train.targets[i], test.inputs[:n_test], test.targets[:n_test]


def _fit(student: nn.Module, teacher: nn.Module | None, losses: dict[str, Any], x: Tensor, y: Tensor,
         epochs: int, seed: int) -> None:
    loader = InMemoryLoader(x, y, batch_size=128, shuffle=True, seed=seed)
    distill.fit(distill.Distiller(student, teacher, losses), loader, None, epochs=epochs, optimizer="adam",
                lr=1e-3, weight_decay=0.0, schedule="cosine", progress=False, seed=seed)


@torch.no_grad()
def penultimate(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The input of ``model.fc`` (B, D) — the zoo MLP's ``pool`` tap — and the logits (B, K), in eval mode."""
    model.eval()
    feats: list[Tensor] = []
    handle = model.fc.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return feats[0], logits


def run(*, temps: list[float], alphas: list[float], seed: int, n_train: int, n_test: int, teacher_epochs: int,
        student_epochs: int, target: int, classes: tuple[int, int, int] | None = None
        ) -> tuple[tuple[int, int, int], dict[float, tuple[float, DiffusionStats]], list[StudentResult]]:
    """Train the teachers and students of one seed.

    Returns ``(classes, {α: (teacher accuracy %, teacher's own diffusion stats)}, students)``; every
    measure is on the test images.
    """
    torch.manual_seed(seed)
    x, y, xt, yt = _data(n_train, n_test, seed)
    teachers, t_acc = {}, {}
    for a in alphas:
        torch.manual_seed(seed)
        t = distill.models.create("mlp", num_classes=10, hidden=(256, 128))
        _fit(t, None, {"label_smoothing": {"eps": a}} if a > 0 else {"ce": 1.0}, x, y, teacher_epochs, seed)
        teachers[a] = t.eval().requires_grad_(False)
    if classes is None:  # the plain (or first) teacher's most / least confused class, fixed for every student
        classes = pick_diffusion_classes(target, logits=penultimate(teachers[alphas[0]], x)[1], labels=y,
                                         by="confusion")
    for a, t in teachers.items():  # Müller's check: does LS tighten the teacher's own clusters?
        feats, logits = penultimate(t, xt)
        t_acc[a] = (float((logits.argmax(1) == yt).double().mean() * 100),
                    systematic_diffusion(feats, yt, t.fc.weight, t.fc.bias, classes))
    keep = (yt == classes[0]) | (yt == classes[1]) | (yt == classes[2])
    out = []
    for a in alphas:
        for T in temps:
            torch.manual_seed(seed + 1)
            s = distill.models.create("mlp", num_classes=10, hidden=(64,))
            _fit(s, teachers[a], {"kd": {"T": T}}, x, y, student_epochs, seed)
            feats, logits = penultimate(s, xt)
            acc = float((logits.argmax(1) == yt).double().mean() * 100)
            stats = systematic_diffusion(feats, yt, s.fc.weight, s.fc.bias, classes)
            coords, templates = project_to_template_plane(feats[keep], s.fc.weight, s.fc.bias, classes)
            out.append(StudentResult(a, T, acc, stats, coords, yt[keep], templates))
    return classes, t_acc, out


def save_png(path: str, classes: tuple[int, int, int], results: list[StudentResult]) -> None:
    """One panel per student (rows: teacher α; columns: T) of Müller's projection; needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # optional: the `plot` extra
        raise ImportError("saving the projection needs matplotlib: pip install 'distill[plot]'") from e
    alphas = sorted({r.alpha for r in results})
    temps = sorted({r.T for r in results})
    fig, axes = plt.subplots(len(alphas), len(temps), figsize=(3.2 * len(temps), 3.2 * len(alphas)), squeeze=False)
    colours = ("tab:red", "tab:green", "tab:blue")
    for r in results:
        ax = axes[alphas.index(r.alpha)][temps.index(r.T)]
        for c, col in zip(classes, colours):
            pts = r.coords[r.labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.5, c=col, label=FASHION[c])
        ax.set_title(f"teacher α={r.alpha:g}, T={r.T:g}\nspread→sim {r.stats.spread_similar:.2f}", fontsize=8)
        ax.set_aspect("equal", adjustable="datalim")  # the plane is Euclidean: keep its angles
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--temps", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--alpha", type=float, default=0.1, help="the LS teacher's smoothing")
    p.add_argument("--target", type=int, default=6, help="target class (6 = shirt)")
    p.add_argument("--classes", type=int, nargs=3, default=None, metavar=("TARGET", "SIMILAR", "DISSIMILAR"),
                   help="by hand instead of the plain teacher's confusion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=None, help="save Müller's projections here (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="5k training images, 2+2 epochs (< 30 s)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes = dict(n_train=5000, n_test=2000, teacher_epochs=2, student_epochs=2) if args.quick else \
        dict(n_train=20000, n_test=10000, teacher_epochs=8, student_epochs=8)
    classes, t_acc, results = run(temps=args.temps, alphas=[0.0, args.alpha], seed=args.seed,
                                  target=args.target if args.classes is None else args.classes[0],
                                  classes=tuple(args.classes) if args.classes else None, **sizes)
    print(f"classes: target {FASHION[classes[0]]}, similar {FASHION[classes[1]]}, dissimilar {FASHION[classes[2]]}")
    for a, (acc, st) in t_acc.items():
        print(f"teacher α={a:g}: accuracy {acc:.1f}%, its own spread→sim {st.spread_similar:.3f}, "
              f"spread→dis {st.spread_dissimilar:.3f}")
    print(f"{'teacher α':>9} {'T':>4} {'student acc':>11} {'spread→sim':>10} {'spread→dis':>10} "
          f"{'overlap→sim':>11} {'direction':>9}")
    for r in results:
        s = r.stats
        print(f"{r.alpha:>9g} {r.T:>4g} {r.acc:>10.1f}% {s.spread_similar:>10.3f} {s.spread_dissimilar:>10.3f} "
              f"{s.overlap_similar:>11.3f} {s.directionality:>9.2f}")
    if args.png:
        save_png(args.png, classes, results)
        print(f"saved {args.png}")


if __name__ == "__main__":
    main()
