"""Retrieval distillation measured on a real teacher (issue 12): all-MiniLM-L6-v2 → a 2-layer dual
encoder on query/passage pairs from the standard library's docstrings; nDCG@10 of the student's
ranking against the teacher's, with each of DiDE, ERNIE-Search and ALADIN and without (in-batch
contrastive only), and encode time student ÷ teacher. The protocol is the docstring of
``examples/language/retrieval.py``; this script runs it (by default at the example's size;
``--train 1024 --test 256`` for a larger run) and prints the table with its protocol line.

    .venv/bin/python benchmarks/retrieval.py
    .venv/bin/python benchmarks/retrieval.py --quick
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "language" / "retrieval.py"


def _example():
    spec = importlib.util.spec_from_file_location("retrieval_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 on a crowded machine)")
    ap.add_argument("--train", type=int, default=None, help="training pairs (default: the example's 512)")
    ap.add_argument("--test", type=int, default=None, help="test queries and passages (default: 200)")
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args(argv)
    ex = _example()
    import dataclasses

    import torch

    cfg = dataclasses.replace(ex.QUICK if args.quick else ex.Config(), seed=args.seed)
    for key, value in (("n_train", args.train), ("n_test", args.test), ("epochs", args.epochs)):
        if value is not None:
            setattr(cfg, key, value)
    torch.set_num_threads(max(1, args.threads))
    res = ex.run(cfg)
    print(f"{res['n_train']} training pairs, {res['n_test']} test queries x {res['n_test']} test passages, "
          f"{cfg.epochs} epochs of batch {cfg.batch_size}, seed {cfg.seed}")
    print(ex.table(res))
    print(f"total {res['seconds']:.0f}s")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
