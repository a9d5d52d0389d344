"""Issue 17 (C) benchmark: cross-lingual distillation, MSDN and KDDAug, each in the regime its paper targets.

* Cross-lingual distillation (arXiv 1705.02073): standard-library docstrings of the 8 largest packages
  (class = package); English is the source language, a keyed word cipher with synonyms, reversed word
  order and 10% dropped words the target (:func:`distill.data.transfer_x.cipher_translate`). Rows: the
  target-language student trained on 5 labels per class; distilled from the English teacher over the
  unlabelled parallel corpus (T = 3); the same with adversarial feature adaptation; and the English
  teacher on the English side of the test documents (what the student could reach).
* MSDN (arXiv 2203.03137): Fashion-MNIST zero-shot split (unseen Pullover, Dress, Sneaker; 14 hand-written
  attributes), ZSL accuracy and GZSL S / U / H with the mutual distillation weight 0 (the ablation), the
  authors' 0.001 and our 0.1.
* KDDAug (arXiv 2207.08739): Fashion-MNIST long-tailed training set (imbalance 50), balanced test. Rows:
  the student on the long-tailed data; plus as many composed (mixed) samples with mixup's heuristic labels;
  with the ID teacher's, the OOD teacher's, and KDDAug's weighted two-teacher soft labels.

    python benchmarks/transfer_cross.py --quick     # < 2 min: one seed, small sets, few epochs
    python benchmarks/transfer_cross.py             # 3 seeds (26 min wall on the shared 2-core machine)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from distill import functional as DF  # noqa: E402
from distill.data.sources import load_fashion_mnist  # noqa: E402
from distill.data.transfer_x import (  # noqa: E402
    FASHION_ATTRIBUTES,
    FASHION_UNSEEN,
    docstring_parallel_task,
    long_tailed_indices,
)
from distill.models import create  # noqa: E402
from distill.strategies.transfer_x_common import train_in_memory  # noqa: E402
from distill.strategies.transfer_x_crosslingual import fit_cross_lingual_distill  # noqa: E402
from distill.strategies.transfer_x_kddaug import fit_kddaug  # noqa: E402
from distill.strategies.transfer_x_msdn import fit_msdn, small_region_backbone  # noqa: E402


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _table(title: str, header: list[str], rows: dict[str, list[list[float]]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, cols in rows.items():
        print(f"| {name} | " + " | ".join(_fmt(c) for c in cols) + " |")


def cross_lingual(seeds: list[int], quick: bool) -> None:
    sizes = dict(n_source=200, n_parallel=300, n_test=200) if quick else {}
    epochs = 10 if quick else 30
    rows: dict[str, list[list[float]]] = {}
    for seed in seeds:
        d = docstring_parallel_task(seed=seed, **sizes)
        k = len(d["classes"])
        val = [(d["test_x"], d["test_y"])]

        def bag(vocab: int) -> torch.nn.Module:
            return create("bag_of_embeddings", num_classes=k, vocab_size=vocab, dim=64, hidden=64)

        torch.manual_seed(seed)
        few = train_in_memory(bag(d["target_vocab"]), d["few_x"], d["few_y"], F.cross_entropy, epochs=epochs * 2,
                              batch_size=64, seed=seed, progress=False, what="few", val_loader=val, lr=0.01)
        torch.manual_seed(seed)
        teacher = bag(d["source_vocab"])
        res = fit_cross_lingual_distill(lambda: bag(d["target_vocab"]), (d["parallel_source"], d["parallel_target"]),
                                        val, teacher_model=teacher, source_labelled=(d["source_x"], d["source_y"]),
                                        epochs=epochs, seed=seed, progress=False, lr=0.01, batch_size=64)
        torch.manual_seed(seed)
        adv = fit_cross_lingual_distill(lambda: bag(d["target_vocab"]), (d["parallel_source"], d["parallel_target"]),
                                        val, teacher=teacher, epochs=epochs, seed=seed, progress=False, lr=0.01,
                                        batch_size=64, adversarial=True, target_unlabelled=d["test_x"], grl_lambda=0.1)
        for name, acc in (("target student, 5 labels/class (CE)", few.last_acc),
                          ("target student distilled on parallel text (T=3)", res.last_acc),
                          ("+ adversarial feature adaptation (GRL 0.1, ours)", adv.last_acc)):
            rows.setdefault(name, [[]])[0].append(acc)
        rows.setdefault("teacher on the parallel corpus's source side (its labels' accuracy)", [[]])[0].append(
            float((res.teacher_logits.argmax(1) == d["parallel_y"]).float().mean()) * 100)
    _table("Cross-lingual distillation (stdlib docstrings, 8 package classes; accuracy % on target-language test)",
           ["row", "accuracy %"], rows)


def _fashion() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_fashion_mnist(split="train")
    xt, yt = load_fashion_mnist(split="test")
    return x, y, xt, yt


def _take(x: torch.Tensor, y: torch.Tensor, classes: list[int], n: int, g: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.cat([(y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=g)[:n]]
                     for c in classes])
    return x[idx], y[idx]


def msdn(seeds: list[int], quick: bool, data: tuple[torch.Tensor, ...]) -> None:
    x, y, xt, yt = data
    seen = [c for c in range(10) if c not in FASHION_UNSEEN]
    per, test, epochs = (100, 100, 3) if quick else (300, 200, 8)
    rows: dict[str, list[list[float]]] = {}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        tr = _take(x, y, seen, per, g)
        ev = (*_take(xt, yt, seen, test, g), *_take(xt, yt, list(FASHION_UNSEEN), test, g))
        for name, w in (("MSDN without distillation (λ_distill = 0)", 0.0),
                        ("MSDN, λ_distill = 0.001 (authors' CUB code)", 0.001),
                        ("MSDN, λ_distill = 0.1 (ours)", 0.1)):
            torch.manual_seed(seed)
            r = fit_msdn(lambda: small_region_backbone(1, 32), tr, ev, attributes=FASHION_ATTRIBUTES,
                         unseen=FASHION_UNSEEN, channels=32, epochs=epochs, seed=seed, progress=False,
                         lambda_distill=w, optimizer="adam", lr=1e-3)
            cols = rows.setdefault(name, [[], [], [], []])
            for c, key in zip(cols, ("zsl", "seen", "unseen", "h")):
                c.append(r.scores[key])
    _table("MSDN zero-shot (Fashion-MNIST, unseen Pullover/Dress/Sneaker; per-class mean accuracy %, last epoch)",
           ["row", "ZSL", "GZSL S", "GZSL U", "GZSL H"], rows)


def kddaug(seeds: list[int], quick: bool, data: tuple[torch.Tensor, ...]) -> None:
    x, y, xt, yt = data
    head, epochs, t_epochs, n_test = (150, 4, 6, 1000) if quick else (300, 10, 15, 2000)
    rows: dict[str, list[list[float]]] = {}
    teachers: dict[str, list[float]] = {"ID teacher (CE)": [], "OOD teacher (logit-adjusted)": []}
    for seed in seeds:
        idx = long_tailed_indices(y, max_per_class=head, imbalance=50, seed=seed)
        tr = (x[idx], y[idx])
        te = torch.randperm(len(yt), generator=torch.Generator().manual_seed(100 + seed))[:n_test]
        val = [(xt[te[i:i + 500]], yt[te[i:i + 500]]) for i in range(0, n_test, 500)]

        def cnn() -> torch.nn.Module:
            return create("cnn", num_classes=10, widths=[8, 16, 32])

        torch.manual_seed(seed)
        plain = train_in_memory(cnn(), *tr, F.cross_entropy, epochs=epochs, batch_size=64, seed=seed, progress=False,
                                what="plain", val_loader=val, lr=3e-3)
        rows.setdefault("student on the long-tailed set (CE)", [[]])[0].append(plain.last_acc)
        torch.manual_seed(seed)
        id_t = cnn()
        train_in_memory(id_t, *tr, F.cross_entropy, epochs=t_epochs, batch_size=64, seed=seed + 1, progress=False,
                        what="id", lr=3e-3)
        prior = torch.bincount(tr[1], minlength=10).float() / len(idx)
        torch.manual_seed(seed)
        ood_t = cnn()
        train_in_memory(ood_t, *tr, lambda z, t: DF.logit_adjusted_cross_entropy(z, t, prior), epochs=t_epochs,
                        batch_size=64, seed=seed + 2, progress=False, what="ood", lr=3e-3)
        for name, labels in (("+ composed samples, mixup heuristic labels", "heuristic"),
                             ("+ composed samples, ID teacher's soft labels", "id_teacher"),
                             ("+ composed samples, OOD teacher's soft labels", "ood_teacher"),
                             ("+ composed samples, KDDAug two-teacher labels", "teacher")):
            torch.manual_seed(seed)
            r = fit_kddaug(cnn, tr, val, teacher=id_t.eval(), ood_teacher=ood_t.eval(), epochs=epochs, teacher_epochs=t_epochs,
                           labels=labels, seed=seed, progress=False, batch_size=64, lr=3e-3)
            rows.setdefault(name, [[]])[0].append(r.last_acc)
            if labels == "teacher":
                teachers["ID teacher (CE)"].append(r.id_teacher_acc)
                teachers["OOD teacher (logit-adjusted)"].append(r.ood_teacher_acc)
    for name, accs in teachers.items():
        rows[name] = [accs]
    _table(f"KDDAug stand-in (Fashion-MNIST, long-tailed train {head}→{round(head / 50)} per class, balanced test; "
           "accuracy %, last epoch)",
           ["row", "balanced test accuracy %"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, small sets, few epochs (< 2 min)")
    parser.add_argument("--only", choices=("cross_lingual", "msdn", "kddaug"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    t0 = time.perf_counter()
    print("command: python benchmarks/transfer_cross.py" + (" --quick" if args.quick else "")
          + (f" --only {args.only}" if args.only else ""))
    if args.only in (None, "cross_lingual"):
        cross_lingual(seeds, args.quick)
    if args.only in (None, "msdn", "kddaug"):
        data = _fashion()
        if args.only in (None, "msdn"):
            msdn(seeds, args.quick, data)
        if args.only in (None, "kddaug"):
            kddaug(seeds, args.quick, data)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
