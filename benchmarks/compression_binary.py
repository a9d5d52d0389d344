"""Binary and quantised students (issue 17, part E): binary-weight KT, BENN and QuPeD.

Three tables, each measuring what its paper claims:

* ``kt`` (Xu et al. 2018, arXiv 1804.06332): on Fashion-MNIST, a full-precision CNN teacher and the
  same CNN with binary weights trained with cross-entropy alone vs cross-entropy + the feature-map
  transfer loss (``binary_kt`` on the last stage). The classification analogue of the paper's
  binary-weight YOLO detector.
* ``benn`` (Zhu et al. 2019, arXiv 1806.07550): on sklearn digits (8x8), one full-precision CNN, one
  BNN (binary weights and activations), BENN bagging (soft and hard combination) and BENN boosting
  with ``k`` members.
* ``quped`` (Ozkara et al. 2021, arXiv 2107.13892): on MNIST split over Dirichlet non-IID clients,
  the clients' mean test accuracy on their own data of: local-only 1-bit models, FedAvg's
  full-precision global model, and QuPeD's 1-bit personalised models.

Usage::

    python benchmarks/compression_binary.py --quick            # < 2 min, 1 seed, tiny sizes
    python benchmarks/compression_binary.py                    # the sizes reported in docs/benchmarks.md (issue 17)
    python benchmarks/compression_binary.py --only benn        # one table
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):5.1f} ± {statistics.stdev(xs):4.1f}" if len(xs) > 1 else f"{xs[0]:5.1f}"


def _table(title: str, rows: list[tuple[str, list[float], str]]) -> str:
    out = [title, f"{'model':<44} {'acc % (mean ± sd)':>20}  note"]
    out += [f"{name:<44} {_mean_sd(accs):>20}  {note}" for name, accs, note in rows]
    return "\n".join(out)


def bench_kt(args: argparse.Namespace) -> str:
    import distill
    from distill.data import get_dataset
    from distill.data.loader import InMemoryLoader
    from distill.methods import create_method
    from distill.models import create
    from distill.models.binary import binarize, model_size_bits

    if args.kt_data == "digits":  # 8x8: the zoo's digits teacher and its binary-weight copy, longer schedules
        n, nv, epochs = (1347, 450, 3) if args.quick else (1347, 450, 15)
        tr, te = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    else:
        n, nv, epochs = (600, 500, 2) if args.quick else (2000, 1000, 3)
        tr, te = get_dataset("fashion_mnist", split="train"), get_dataset("fashion_mnist", split="test")
    epochs = args.kt_epochs or epochs
    x, y, xv, yv = tr.inputs[:n], tr.targets[:n], te.inputs[:nv], te.targets[:nv]
    val = InMemoryLoader(xv, yv, 500, shuffle=False)
    widths = (32, 64, 96) if args.kt_data == "digits" else (16, 32, 64)
    fit_args = dict(optimizer="sgd", lr=0.05, momentum=0.9, progress=False)
    torch.manual_seed(0)
    teacher = create("cnn", widths=widths)
    t_acc = distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), InMemoryLoader(x, y, 64, seed=0), val,
                        epochs=epochs, seed=0, **fit_args).last_acc
    rows = {"ce": [], "ce+kt": []}
    for seed in range(args.seeds):
        for name in rows:
            torch.manual_seed(seed)
            student = binarize(create("cnn", widths=widths))
            losses = {"ce": 1.0} if name == "ce" else {"ce": 1.0, "binary_kt": create_method("binary_kt")}
            r = distill.fit(distill.Distiller(student, teacher if name != "ce" else None, losses),
                            InMemoryLoader(x, y, 64, seed=seed), val, epochs=epochs, seed=seed, **fit_args)
            rows[name].append(r.last_acc)
    fp_bits, b_bits = model_size_bits(teacher), model_size_bits(binarize(teacher))
    return _table(f"[kt] {args.kt_data} {len(y)} train / {len(yv)} test, cnn widths {widths}, {epochs} epochs, "
                  f"{args.seeds} seed(s); size {fp_bits / 8e3:.1f} kB -> {b_bits / 8e3:.1f} kB binary", [
                      ("full-precision teacher (seed 0)", [t_acc], ""),
                      ("binary-weight student, CE", rows["ce"], ""),
                      ("binary-weight student, CE + binary_kt(stage3)", rows["ce+kt"], "Xu et al. KT"),
                  ])


def bench_benn(args: argparse.Namespace) -> str:
    import distill
    from distill.data import get_dataset
    from distill.data.loader import InMemoryLoader
    from distill.models import create
    from distill.strategies.binary_benn import benn

    members, epochs = (3, 2) if args.quick else (5, 5)
    tr, va = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    val = InMemoryLoader(va.inputs, va.targets, 512, shuffle=False)
    fit_args = dict(optimizer="sgd", lr=0.05, momentum=0.9)
    arch = {"name": "cnn", "widths": [16, 32, 32]}
    fp, bnn, rows = [], [], {"bagging/soft": [], "bagging/hard": [], "boosting/soft": [], "boosting/hard": []}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        fp.append(distill.fit(distill.Distiller(create("cnn", widths=[16, 32, 32]), None, {"ce": 1.0}),
                              InMemoryLoader(tr.inputs, tr.targets, 64, seed=seed), val, epochs=epochs, seed=seed,
                              progress=False, **fit_args).last_acc)
        for mode in ("bagging", "boosting"):
            for rule in ("soft", "hard"):
                r = benn(arch, InMemoryLoader(tr.inputs, tr.targets, 64, seed=seed), val, epochs=epochs,
                         members=members, mode=mode, rule=rule, seed=seed, progress=False, **fit_args)
                rows[f"{mode}/{rule}"].append(r.last_acc)
                if mode == "bagging" and rule == "soft":
                    bnn.append(r.member_accs[0])
    return _table(f"[benn] digits ({len(tr.targets)} train / {len(va.targets)} val), cnn widths [16, 32, 32], binary weights+activations, "
                  f"{members} members x {epochs} epochs, {args.seeds} seed(s)", [
                      ("full precision, one network", fp, ""),
                      ("BNN, one network (bagging member 1)", bnn, "bootstrap sample"),
                      *[(f"BENN-{k} {mode}", v, "") for mode, v in rows.items() for k in [members]],
                  ])


def bench_quped(args: argparse.Namespace) -> str:
    from distill.data import get_dataset
    from distill.models import create
    from distill.strategies.quped import quped

    n, clients, rounds = (800, 4, 4) if args.quick else (1500, 6, args.rounds)
    tr = get_dataset(args.quped_data, split="train")
    x, y = tr.inputs[:n], tr.targets[:n]
    kw = dict(num_clients=clients, beta=0.5, rounds=rounds, local_steps=10, lam=args.lam, lr_centers=args.lr_centers, lambda_p=args.lambda_p,
              eval_every=rounds, progress=False)
    rows = {"local": [], "fedavg": [], "quped": []}
    seeds = args.seeds
    for seed in range(seeds):
        for mode in rows:
            r = quped(lambda: create("cnn", widths=[8, 16, 16]), client_data=(x, y), mode=mode, seed=seed, **kw)
            rows[mode].append(r.last_acc)
    return _table(f"[quped] {args.quped_data} {min(n, len(y))} samples over {clients} Dirichlet(0.5) clients (75/25 train/test each), "
                  f"cnn widths [8, 16, 16], {rounds} rounds x 10 local steps, {seeds} seed(s); "
                  "mean client test accuracy", [
                      ("local only, 1-bit (2 centres) personal models", rows["local"], "no communication"),
                      ("FedAvg, full-precision global model", rows["fedavg"], "32-bit"),
                      ("QuPeD, 1-bit personalised models", rows["quped"], f"lambda_p {args.lambda_p}, T 1"),
                  ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed (< 2 min)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default 2; 1 with --quick)")
    p.add_argument("--only", choices=("kt", "benn", "quped"), action="append", help="run only these tables")
    p.add_argument("--kt-data", choices=("fashion_mnist", "digits"), default="fashion_mnist")
    p.add_argument("--kt-epochs", type=int, default=None, help="epochs of the kt table's teacher and students")
    p.add_argument("--quped-data", choices=("mnist", "digits"), default="mnist")
    p.add_argument("--rounds", type=int, default=12, help="QuPeD's rounds (real mode)")
    p.add_argument("--lambda-p", type=float, default=0.5, help="QuPeD's distillation weight lambda_p")
    p.add_argument("--lam", type=float, default=1e-3, help="QuPeD's lambda (grows as lam * (round + 1))")
    p.add_argument("--lr-centers", type=float, default=1e-4, help="QuPeD's centre learning rate")
    args = p.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 2)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print("$ python " + " ".join(shlex.quote(a) for a in ["benchmarks/compression_binary.py", *sys.argv[1:]]))
    for name, fn in (("kt", bench_kt), ("benn", bench_benn), ("quped", bench_quped)):
        if args.only is None or name in args.only:
            print(fn(args), flush=True)
            print()
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
