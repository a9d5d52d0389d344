"""Explain an MLP trained on tabular data by distilling it into an additive spline model (Tan et al. 2018,
arXiv 1801.08640): print its fidelity to the teacher's logits and the most important features' shape
functions as small text plots (the log-odds for a 2-class set, logit 0 otherwise).

    python examples/explain/additive_explanations.py --quick
    python examples/explain/additive_explanations.py --data wine --knots 5
    python examples/explain/additive_explanations.py --student trees
"""

from __future__ import annotations

import argparse

import torch

import distill
from distill.data.explain_tabular import TABULAR, load_tabular_split
from distill.data.loader import InMemoryLoader
from distill.strategies.explain_additive import fit_additive_explanation


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=TABULAR, default="breast_cancer")
    p.add_argument("--epochs", type=int, default=60, help="the teacher's epochs")
    p.add_argument("--student", choices=("spline", "trees"), default="spline",
                   help="cubic B-splines (SAS) or bagged additive boosted trees (SAT)")
    p.add_argument("--knots", type=int, default=5, help="interior knots per feature")
    p.add_argument("--ridge", type=float, default=1.0)
    p.add_argument("--top", type=int, default=4, help="shape functions to print")
    p.add_argument("--quick", action="store_true", help="a 20-epoch teacher")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = load_tabular_split(args.data)
    train = InMemoryLoader(s.train_inputs, s.train_targets, batch_size=32, shuffle=True, seed=0)
    val = InMemoryLoader(s.val_inputs, s.val_targets, batch_size=256)
    torch.manual_seed(0)
    teacher = distill.models.create("mlp", num_classes=int(s.train_targets.max()) + 1,
                                    in_features=s.train_inputs.shape[1], hidden=(64, 64))
    distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), train, val, epochs=20 if args.quick else args.epochs,
                optimizer="adam", lr=0.003, weight_decay=0.0, schedule="constant", progress=False)
    extra = dict(interior_knots=args.knots, ridge=args.ridge) if args.student == "spline" else dict(bags=4)
    res = fit_additive_explanation(args.student, train, val, teacher=teacher, **extra)
    print(f"{args.data}: teacher acc {res.teacher_acc:.1f}%, additive student acc {res.last_acc:.1f}%, "
          f"agreement {res.agreement:.1f}%, val R² {res.fidelity_val['r2']:.3f}, RMSE {res.fidelity_val['rmse']:.3f}")
    x = s.train_inputs.double()
    for j in sorted(range(x.shape[1]), key=lambda j: -res.importance[j])[:args.top]:
        grid = torch.linspace(float(x[:, j].min()), float(x[:, j].max()), 9, dtype=torch.float64)
        probe = x.mean(0).repeat(len(grid), 1)
        probe[:, j] = grid
        h = res.model.shapes(probe)[:, j].detach()
        h = h[:, 1] - h[:, 0] if h.shape[1] == 2 else h[:, 0]
        raw = grid * s.std[j] + s.mean[j]
        print(f"\n{s.feature_names[j]} (importance {res.importance[j]:.2f})")
        lo, hi = float(h.min()), float(h.max())
        for v, hv in zip(raw.tolist(), h.tolist()):
            bar = int(round(30 * (hv - lo) / (hi - lo))) if hi > lo else 0
            print(f"  {v:10.3f} {hv:+7.2f} {'#' * bar}")


if __name__ == "__main__":
    main()
