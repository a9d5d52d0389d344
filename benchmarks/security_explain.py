"""Issue 17 (F): defensive distillation, the nasty teacher, global additive explanations and YASENN, measured.

* **defensive distillation** (digits, the zoo's ``cnn_digits_student``): a network trained with CE at T = 1
  beside the same network defensively distilled at T = 100 and deployed at T = 1. Clean accuracy, the share
  of validation samples whose softmax-CE input gradient is exactly 0 (the gradient masking), and the attack
  success rates (% of correctly classified samples turned wrong) of FGSM and PGD on the softmax CE and of
  PGD on the C&W logit margin (the attack that breaks the defence), at L∞ radius ε.
* **nasty teacher** (digits): a normal ``cnn_digits_teacher``; a nasty one trained against it (τ = 4,
  ω = 0.04, the authors' CIFAR-10 values); ``mlp_digits_student`` students trained alone (CE), by KD from
  the normal teacher and by KD from the nasty one (T = 4, λ = 0.9).
* **global additive explanation** (sklearn's breast_cancer and wine, an MLP teacher): the teacher's logits
  fitted by an additive spline model (cubic B-splines, 5 interior knots, ridge 1) and by bagged additive
  boosted trees (100 rounds, 3 leaves, shrinkage 0.1, 4 bags) beside the linear additive baseline (one
  slope per feature, ridge 1); validation fidelity (R², RMSE to the logits), agreement with the teacher's
  class, accuracy.
* **YASENN** (same data and teachers, 2 hidden layers): layer-wise boosted trees (2 stages of depth 2);
  partitions, each layer's agreement with the teacher, partition fidelity and coverage on validation data,
  beside model-agnostic distillation: the same boosted trees fitted on the inputs.

Each row: mean ± standard deviation over the seeds (model initialisation; the tabular split too).

    python benchmarks/security_explain.py --quick      # 1 seed, short training (< 2 min)
    python benchmarks/security_explain.py              # 3 seeds, the full lengths
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import distill  # noqa: E402
import distill.functional as DF  # noqa: E402
from distill.data.explain_tabular import load_tabular_split  # noqa: E402
from distill.data.loader import InMemoryLoader  # noqa: E402
from distill.data.sources import load_digits_split  # noqa: E402
from distill.methods.logits import KD, CrossEntropy  # noqa: E402
from distill.strategies.defensive_distillation import fit_defensive_distillation  # noqa: E402
from distill.strategies.explain_additive import fit_additive_explanation  # noqa: E402
from distill.strategies.explain_yasenn import activation_sequences, fit_yasenn  # noqa: E402
from distill.strategies.nasty_teacher import fit_nasty_teacher  # noqa: E402

ADAM = dict(optimizer="adam", weight_decay=0.0, schedule="constant", progress=False)


def _ms(values: list[float]) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def _train(model: torch.nn.Module, teacher: torch.nn.Module | None, losses: dict, train, val, epochs: int,
           seed: int, lr: float) -> float:
    result = distill.fit(distill.Distiller(model, teacher, losses), train, val, epochs=epochs, seed=seed, lr=lr, **ADAM)
    model.eval().requires_grad_(False)
    return result.last_acc


def _digits(seed: int) -> tuple[InMemoryLoader, InMemoryLoader, torch.Tensor, torch.Tensor]:
    d = load_digits_split(seed=0)
    return (InMemoryLoader(d.train_inputs, d.train_targets, batch_size=64, shuffle=True, seed=seed),
            InMemoryLoader(d.val_inputs, d.val_targets, batch_size=256), d.val_inputs, d.val_targets)


def _zero_grad_share(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(DF.attack_loss(model(x), y, "ce"), x)
    return 100.0 * float((g.flatten(1).abs().amax(1) == 0).double().mean())


def defensive(seeds: list[int], quick: bool) -> str:
    epochs = 25 if quick else 40
    eps_list = (0.1, 0.2)
    cols = ["acc", "zero-grad %"] + [f"{a} ε={e}" for e in eps_list for a in ("FGSM-CE", "PGD-CE", "PGD-margin")]
    rows: dict[str, dict[str, list[float]]] = {"CE, T=1": {c: [] for c in cols},
                                               "defensive distillation, T=100": {c: [] for c in cols}}
    make = lambda: distill.models.create("cnn_digits_student", num_classes=10)  # noqa: E731
    for seed in seeds:
        train, val, x, y = _digits(seed)
        torch.manual_seed(seed)
        base = make()
        acc_b = _train(base, None, {"ce": CrossEntropy()}, train, val, epochs, seed, 0.02)
        torch.manual_seed(seed)
        res = fit_defensive_distillation(make, train, val, epochs=epochs, teacher_epochs=epochs, T=100.0, seed=seed,
                                         lr=0.02, **ADAM)
        dd = res.models[-1].eval().requires_grad_(False)
        for name, model, acc in (("CE, T=1", base, acc_b), ("defensive distillation, T=100", dd, res.last_acc)):
            r = rows[name]
            r["acc"].append(acc)
            r["zero-grad %"].append(_zero_grad_share(model, x, y))
            for e in eps_list:
                r[f"FGSM-CE ε={e}"].append(DF.attack_success_rate(model, x, DF.fgsm(model, x, y, e), y))
                r[f"PGD-CE ε={e}"].append(DF.attack_success_rate(model, x, DF.pgd(model, x, y, e, steps=20), y))
                r[f"PGD-margin ε={e}"].append(
                    DF.attack_success_rate(model, x, DF.pgd(model, x, y, e, steps=20, loss="margin"), y))
    head = f"| model ({len(seeds)} seed(s), {epochs} epochs, digits val n={len(y)}) | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    lines += [f"| {name} | " + " | ".join(_ms(r[c]) for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines)


def nasty(seeds: list[int], quick: bool) -> str:
    epochs = 8 if quick else 20
    cols = ["teacher acc", "student acc"]
    rows: dict[str, dict[str, list[float]]] = {k: {c: [] for c in cols} for k in (
        "student alone (CE)", "KD from the normal teacher", "KD from the nasty teacher (τ=4, ω=0.04)")}
    student = lambda: distill.models.create("mlp_digits_student", num_classes=10)  # noqa: E731
    for seed in seeds:
        train, val, _, _ = _digits(seed)
        torch.manual_seed(seed)
        normal = distill.models.create("cnn_digits_teacher", num_classes=10)
        acc_t = _train(normal, None, {"ce": CrossEntropy()}, train, val, epochs, seed, 0.003)
        torch.manual_seed(seed)
        alone = _train(student(), None, {"ce": CrossEntropy()}, train, val, epochs, seed, 0.003)
        torch.manual_seed(seed)
        from_normal = _train(student(), normal, {"kd": KD(T=4.0, weight=0.9), "ce": CrossEntropy(weight=0.1)},
                             train, val, epochs, seed, 0.003)
        torch.manual_seed(seed)
        res = fit_nasty_teacher(student, train, val, teacher=normal, epochs=epochs, tau=4.0, omega=0.04, seed=seed,
                                lr=0.003, **ADAM)
        for name, t_acc, s_acc in (("student alone (CE)", float("nan"), alone),
                                   ("KD from the normal teacher", acc_t, from_normal),
                                   ("KD from the nasty teacher (τ=4, ω=0.04)", res.nasty_acc, res.last_acc)):
            rows[name]["teacher acc"].append(t_acc)
            rows[name]["student acc"].append(s_acc)
    lines = [f"| digits, {len(seeds)} seed(s), {epochs} epochs each | teacher acc | student acc |", "|---|---|---|"]
    lines += [f"| {name} | {_ms(r['teacher acc'])} | {_ms(r['student acc'])} |" for name, r in rows.items()]
    return "\n".join(lines)


def _tabular_teacher(name: str, seed: int, epochs: int, hidden: tuple[int, ...]):
    s = load_tabular_split(name, seed=seed)
    train = InMemoryLoader(s.train_inputs, s.train_targets, batch_size=32, shuffle=True, seed=seed)
    val = InMemoryLoader(s.val_inputs, s.val_targets, batch_size=256)
    torch.manual_seed(seed)
    teacher = distill.models.create("mlp", num_classes=int(s.train_targets.max()) + 1,
                                    in_features=s.train_inputs.shape[1], hidden=hidden)
    acc = _train(teacher, None, {"ce": CrossEntropy()}, train, val, epochs, seed, 0.003)
    return s, train, val, teacher, acc


def additive(seeds: list[int], quick: bool, plot: Path | None) -> str:
    epochs = 30 if quick else 60
    lines = [f"| data ({len(seeds)} seed(s)) | teacher acc | student | val R² | val RMSE | agreement % | acc |",
             "|---|---|---|---|---|---|---|"]
    for name in ("breast_cancer", "wine"):
        rows: dict[str, dict[str, list[float]]] = {}
        t_accs = []
        for seed in seeds:
            s, train, val, teacher, acc = _tabular_teacher(name, seed, epochs, (64, 64))
            t_accs.append(acc)
            for label, kind, kw in (
                    ("linear (1 slope per feature)", "spline", dict(interior_knots=0, degree=1, ridge=1.0)),
                    ("additive splines (5 knots)", "spline", dict(interior_knots=5, degree=3, ridge=1.0)),
                    ("bagged additive boosted trees", "trees", dict(rounds=100, leaves=3, learning_rate=0.1, bags=4))):
                res = fit_additive_explanation(kind, train, val, teacher=teacher, seed=seed, **kw)
                r = rows.setdefault(label, {"r2": [], "rmse": [], "agree": [], "acc": []})
                r["r2"].append(res.fidelity_val["r2"])
                r["rmse"].append(res.fidelity_val["rmse"])
                r["agree"].append(res.agreement)
                r["acc"].append(res.last_acc)
                if plot is not None and name == "breast_cancer" and seed == seeds[0] and kw.get("degree") == 3:
                    _plot_shapes(res, s, plot)
        for label, r in rows.items():
            r2 = f"{statistics.mean(r['r2']):.3f}"
            rmse = f"{statistics.mean(r['rmse']):.2f}"
            lines.append(f"| {name} | {_ms(t_accs)} | {label} | {r2} | {rmse} | {_ms(r['agree'])} | {_ms(r['acc'])} |")
    return "\n".join(lines)


def _plot_shapes(res, split, path: Path) -> None:
    """The six most important shape functions of the breast-cancer log-odds (logit 1 − logit 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = split.train_inputs.double()
    order = sorted(range(x.shape[1]), key=lambda j: -res.importance[j])[:6]
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5))
    for ax, j in zip(axes.flat, order):
        grid = torch.linspace(float(x[:, j].min()), float(x[:, j].max()), 100, dtype=torch.float64)
        probe = x.mean(0).repeat(100, 1)
        probe[:, j] = grid
        h = res.model.shapes(probe)[:, j]
        raw = grid * split.std[j] + split.mean[j]
        ax.plot(raw.numpy(), (h[:, 1] - h[:, 0]).detach().numpy())
        ax.set_title(split.feature_names[j], fontsize=9)
        ax.axhline(0, color="grey", lw=0.5)
    fig.suptitle("breast_cancer: shape functions of the MLP teacher's log-odds (additive spline student)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def yasenn(seeds: list[int], quick: bool) -> str:
    from sklearn.ensemble import GradientBoostingClassifier

    epochs = 30 if quick else 60
    lines = [f"| data ({len(seeds)} seed(s)) | teacher acc | partitions | layer agreement (val %) | "
             "partition fidelity val % | val coverage % | same trees on the inputs: agreement % |",
             "|---|---|---|---|---|---|---|"]
    for name in ("breast_cancer", "wine"):
        acc_t, parts, agree1, agree2, fid, cov, inputs_agree = [], [], [], [], [], [], []
        for seed in seeds:
            s, train, val, teacher, acc = _tabular_teacher(name, seed, epochs, (32, 32))
            res = fit_yasenn("gbdt", train, val, teacher=teacher, n_trees=2, depth=2, seed=seed)
            acc_t.append(acc)
            parts.append(res.num_partitions)
            agree1.append(res.layer_agreement_val[0])
            agree2.append(res.layer_agreement_val[1])
            fid.append(res.partition_fidelity_val)
            cov.append(res.val_coverage)
            _, logits = activation_sequences(teacher, s.train_inputs, [])
            _, logits_v = activation_sequences(teacher, s.val_inputs, [])
            g = GradientBoostingClassifier(n_estimators=2, max_depth=2, learning_rate=0.5, random_state=seed)
            g.fit(s.train_inputs.numpy(), logits.argmax(1).numpy())
            inputs_agree.append(100.0 * float((g.predict(s.val_inputs.numpy()) == logits_v.argmax(1).numpy()).mean()))
        lines.append(f"| {name} | {_ms(acc_t)} | {_ms(parts)} | hidden1 {_ms(agree1)}, hidden2 {_ms(agree2)} | "
                     f"{_ms(fid)} | {_ms(cov)} | {_ms(inputs_agree)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, short training (< 2 min)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 1 with --quick, else 3)")
    p.add_argument("--only", choices=("defensive", "nasty", "additive", "yasenn"), default=None)
    p.add_argument("--plot", type=Path, default=None, help="write the breast-cancer shape functions to this PNG")
    args = p.parse_args(argv)
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    t0 = time.perf_counter()
    print("python " + " ".join(shlex.quote(a) for a in ["benchmarks/security_explain.py", *sys.argv[1:]]))
    sections = {"defensive": ("Defensive distillation (attack success %, lower is more robust)",
                              lambda: defensive(seeds, args.quick)),
                "nasty": ("Nasty teacher (top-1 %)", lambda: nasty(seeds, args.quick)),
                "additive": ("Global additive explanation (fidelity to the teacher's logits)",
                             lambda: additive(seeds, args.quick, args.plot)),
                "yasenn": ("YASENN (partitions of the activation sequences)", lambda: yasenn(seeds, args.quick))}
    for key, (title, run) in sections.items():
        if args.only in (None, key):
            print(f"\n### {title}\n\n{run()}", flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
