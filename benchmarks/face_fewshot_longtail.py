"""Issue 17 (part G): DDL on a handwriting-identity verification task, SKD few-shot episodes, SSD on
long-tailed Fashion-MNIST.

    python benchmarks/face_fewshot_longtail.py --quick        # < 2 min, one seed, small sets
    python benchmarks/face_fewshot_longtail.py                # 3 seeds, larger sets (sized for a shared 2-core CPU)
    python benchmarks/face_fewshot_longtail.py --only ssd     # one section (ddl, ec_kd, neurons, skd, ssd)

* ddl: identities are k-means writing-style clusters within MNIST digits (8 per digit); students train on
  the identities of digits 0-5, verification pairs come from held-out digits 6-9 (MNIST test images). Hard
  samples are degraded images (4x lower resolution plus noise, :func:`distill.data.face_verification.degrade`).
  Teacher: the same CNN trained on clean images. Student: trained with cross-entropy on degraded images;
  + DDL: the teacher's similarity histograms on the clean images distilled into the student's on their
  degraded copies. Reported: LFW-style accuracy and TAR@FAR on degraded-vs-degraded pairs.
* ec_kd (Wang et al., ECCV 2020): DDL's protocol (identities, degraded student inputs, clean teacher inputs,
  degraded and clean pairs of held-out identities) with a narrower student CNN (widths 8, 16, 64: the same
  64-wide embedding as the teacher's, no adapter). Rows: the student by cross-entropy; + feature consistency
  alone (hardness 0, no exclusivity); + hardness-aware feature consistency alone; + weight exclusivity alone;
  + EC-KD (both). Method defaults (consistency 1, exclusivity 0.05 over every conv/linear layer, hardness 1).
* neurons (Luo et al. AAAI 2016): the same identities, clean images; a wide teacher CNN (pooled 64 neurons)
  and a narrow student (pooled 16). Rows: the student by cross-entropy; by KD on soft labels (T = 4); by
  regressing all 64 teacher neurons (through a linear adapter); by regressing the 16 neurons chosen by
  :func:`distill.functional.select_neurons` (attributes: the one-hot digit of each identity) or 16 random
  ones; verification accuracy on clean pairs of held-out identities.
* skd: base classes 0-4 of Fashion-MNIST train, novel classes 5-9 of its test set; 5-way 1-/5-shot
  episodes with a logistic regression on frozen, L2-normalised features. Rows: plain CE, Gen-0, Gen-1.
* ssd: Fashion-MNIST long-tailed (exponential profile, imbalance 100, n_max 500 in real mode); the balanced
  test set; many (> 100 train images) / medium / few (< 20) and overall accuracy. Rows: plain CE, cRT
  (CE then a class-balanced classifier re-training), SSD's teacher (stages I-II), SSD student hard and soft
  heads, and the soft head after the optional class-balanced fine-tuning.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.batch import Batch
from distill.data.face_verification import cluster_identities, degrade, verification_metrics, verification_pairs
from distill.data.fewshot import episode_accuracy
from distill.data.longtail import long_tailed_counts, long_tailed_indices, shot_accuracy
from distill import functional as DF
from distill.data.sources import load_fashion_mnist, load_mnist
from distill.methods import create_method
from distill.models import create
from distill.strategies.fewshot_skd import fit_skd_fewshot, sgd_epochs, tap_features
from distill.strategies.longtail_ssd import fit_ssd_longtail
from distill.taps import Taps


def _cnn(num_classes: int) -> nn.Module:
    return create("cnn", num_classes=num_classes, in_channels=1, widths=(16, 32, 64))


def _mnist_root() -> Path:
    for c in (os.environ.get("DISTILL_MNIST"), "/work/shared/data/mnist", Path(__file__).resolve().parents[2] / "shared"
              / "data" / "mnist"):
        if c and Path(c).is_dir():
            return Path(c)
    raise SystemExit("MNIST not found: set DISTILL_MNIST")


def _ms(vals: list[float]) -> str:
    vals = [v for v in vals if v == v]
    if not vals:
        return "n/a"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def _table(title: str, cols: list[str], rows: dict[str, dict[str, list[float]]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(["row", *cols]) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for name, r in rows.items():
        print("| " + " | ".join([name, *(_ms(r.get(c, [])) for c in cols)]) + " |")


# --------------------------------------------------------------------------------------------- DDL


def _pk_epochs(model, x, ids, loss_fn, *, epochs, p, k, lr, seed):
    """SGD over P identities x K images batches (DDL needs positive pairs in every batch)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    by_id = [(ids == i).nonzero().flatten() for i in range(int(ids.max()) + 1)]
    steps = len(x) // (p * k)
    model.train()
    for e in range(epochs):
        for _ in range(steps):
            chosen = torch.randperm(len(by_id), generator=g)[:p]
            idx = torch.cat([by_id[i][torch.randint(len(by_id[i]), (k,), generator=g)] for i in chosen])
            loss = loss_fn(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()


def verification_protocol(quick: bool) -> tuple[Any, ...]:
    """DDL's and EC-KD's shared protocol: writing-style identities of MNIST digits 0-5 to train on, verification
    pairs of held-out digits 6-9 (clean and degraded), and ``score(name, model)`` adding a model's verification
    metrics (degraded pairs, plus clean-pair accuracy) to ``rows``."""
    root = _mnist_root()
    xtr, ytr = load_mnist(root, "train")
    xte, yte = load_mnist(root, "test")
    per_class, n_train = 8, (2000 if quick else 3000)
    keep = (ytr <= 5).nonzero().flatten()[:n_train]
    xtr, ytr = xtr[keep], ytr[keep]
    ids_tr = cluster_identities(xtr, ytr, per_class)
    keep = (yte >= 6).nonzero().flatten()
    xte, yte = xte[keep], yte[keep]
    ids_te = cluster_identities(xte, yte, per_class)
    pi, pj, same = verification_pairs(ids_te, 1000 if quick else 2000, seed=123)
    hard_te = degrade(xte, seed=7)
    rows: dict[str, dict[str, list[float]]] = {}

    def score(name: str, model: torch.nn.Module) -> None:
        f = F.normalize(tap_features(model, hard_te, "pool"), dim=1)
        m = verification_metrics((f[pi] * f[pj]).sum(1), same)
        fc = F.normalize(tap_features(model, xte, "pool"), dim=1)
        m["clean accuracy"] = verification_metrics((fc[pi] * fc[pj]).sum(1), same)["accuracy"]
        for key, v in m.items():
            rows.setdefault(name, {}).setdefault(key, []).append(v)

    return xtr, ids_tr, int(ids_tr.max()) + 1, (2 if quick else 3), rows, score


def run_ddl(quick: bool, seeds: list[int]) -> None:
    xtr, ids_tr, n_id, epochs, rows, score = verification_protocol(quick)

    for seed in seeds:
        hard_tr = degrade(xtr, seed=seed + 100)
        torch.manual_seed(seed)
        teacher = _cnn(n_id)
        _pk_epochs(teacher, xtr, ids_tr, lambda i: F.cross_entropy(teacher(xtr[i]), ids_tr[i]), epochs=epochs,
                   p=16, k=4, lr=0.05, seed=seed)
        teacher.eval().requires_grad_(False)
        score("teacher (clean images)", teacher)
        torch.manual_seed(seed + 1)
        base = _cnn(n_id)
        _pk_epochs(base, xtr, ids_tr, lambda i: F.cross_entropy(base(hard_tr[i]), ids_tr[i]), epochs=epochs,
                   p=16, k=4, lr=0.05, seed=seed)
        score("student CE (degraded images)", base)
        torch.manual_seed(seed + 1)
        student = _cnn(n_id)
        ddl = create_method("ddl")
        s_taps, t_taps = Taps(student, ["pool"]), Taps(teacher, ["pool"])

        def with_ddl(i):
            with t_taps.recording() as tv, torch.no_grad():
                teacher(xtr[i])
            with s_taps.recording() as sv:
                z = student(hard_tr[i])
            return F.cross_entropy(z, ids_tr[i]) + ddl(sv, tv, Batch(hard_tr[i], ids_tr[i]))

        _pk_epochs(student, xtr, ids_tr, with_ddl, epochs=epochs, p=16, k=4, lr=0.05, seed=seed)
        score("student CE + DDL (degraded; teacher clean)", student)
    _table("DDL: verification of held-out identities (degraded pairs unless 'clean')",
           ["accuracy", "tar@far=0.01", "tar@far=0.1", "clean accuracy"], rows)


# --------------------------------------------------------------------------------------------- EC-KD


def run_eckd(quick: bool, seeds: list[int]) -> None:
    xtr, ids_tr, n_id, epochs, rows, score = verification_protocol(quick)

    variants = {
        "student CE (degraded images)": None,
        "+ feature consistency (hardness 0), no exclusivity": dict(hardness=0.0, exclusivity_weight=0.0),
        "+ hardness-aware feature consistency, no exclusivity": dict(exclusivity_weight=0.0),
        "+ weight exclusivity alone": dict(consistency_weight=0.0),
        "+ EC-KD (both)": {},
    }
    for seed in seeds:
        hard_tr = degrade(xtr, seed=seed + 100)
        torch.manual_seed(seed)
        teacher = _cnn(n_id)
        _pk_epochs(teacher, xtr, ids_tr, lambda i: F.cross_entropy(teacher(xtr[i]), ids_tr[i]), epochs=epochs,
                   p=16, k=4, lr=0.05, seed=seed)
        teacher.eval().requires_grad_(False)
        score("teacher (clean images)", teacher)
        t_taps = Taps(teacher, ["pool"])
        for name, kw in variants.items():
            torch.manual_seed(seed + 1)
            student = create("cnn", num_classes=n_id, in_channels=1, widths=(8, 16, 64))
            if kw is None:
                _pk_epochs(student, xtr, ids_tr, lambda i, s=student: F.cross_entropy(s(hard_tr[i]), ids_tr[i]),
                           epochs=epochs, p=16, k=4, lr=0.05, seed=seed)
            else:
                method = create_method("ec_kd", student_model=student, **kw)
                s_taps = Taps(student, ["pool"])
                with torch.no_grad(), s_taps.recording() as sv, t_taps.recording() as tv:
                    student(hard_tr[:4])
                    teacher(xtr[:4])
                method.prepare(sv, tv, Batch(hard_tr[:4]))  # equal widths: an identity adapter

                def loss(i, student=student, method=method, s_taps=s_taps):
                    with t_taps.recording() as tv, torch.no_grad():
                        teacher(xtr[i])
                    with s_taps.recording() as sv:
                        z = student(hard_tr[i])
                    return F.cross_entropy(z, ids_tr[i]) + method(sv, tv, Batch(hard_tr[i], ids_tr[i]))

                _pk_epochs(student, xtr, ids_tr, loss, epochs=epochs, p=16, k=4, lr=0.05, seed=seed)
            score(name, student)
    _table("EC-KD: verification of held-out identities, student CNN (8, 16, 64) on degraded images, teacher "
           "(16, 32, 64) on clean ones (degraded pairs unless 'clean')",
           ["accuracy", "tar@far=0.01", "tar@far=0.1", "clean accuracy"], rows)


# --------------------------------------------------------------------------------------------- neurons


def run_neurons(quick: bool, seeds: list[int]) -> None:
    root = _mnist_root()
    xtr, ytr = load_mnist(root, "train")
    xte, yte = load_mnist(root, "test")
    keep = (ytr <= 5).nonzero().flatten()[:(2000 if quick else 3000)]
    xtr, ytr = xtr[keep], ytr[keep]
    ids_tr = cluster_identities(xtr, ytr, 8)
    keep = (yte >= 6).nonzero().flatten()
    xte, yte = xte[keep], yte[keep]
    pi, pj, same = verification_pairs(cluster_identities(xte, yte, 8), 1000 if quick else 2000, seed=123)
    n_id, epochs, k = int(ids_tr.max()) + 1, (2 if quick else 3), 16
    attrs = F.one_hot(ytr, 6).double()
    rows: dict[str, dict[str, list[float]]] = {}

    def score(name, model):
        f = F.normalize(tap_features(model, xte, "pool"), dim=1)
        rows.setdefault(name, {}).setdefault("accuracy", []).append(
            verification_metrics((f[pi] * f[pj]).sum(1), same)["accuracy"])

    def student():
        return create("cnn", num_classes=n_id, in_channels=1, widths=(8, 16, k))

    for seed in seeds:
        torch.manual_seed(seed)
        teacher = create("cnn", num_classes=n_id, in_channels=1, widths=(16, 32, 64))
        _pk_epochs(teacher, xtr, ids_tr, lambda i: F.cross_entropy(teacher(xtr[i]), ids_tr[i]), epochs=epochs + 1,
                   p=16, k=4, lr=0.05, seed=seed)
        teacher.eval().requires_grad_(False)
        score("teacher (64 neurons)", teacher)
        t_feats = tap_features(teacher, xtr, "pool")
        t_logits = torch.cat([teacher(xtr[s:s + 500]) for s in range(0, len(xtr), 500)])
        selected = DF.select_neurons(t_feats, attrs, k)
        random_k = torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:k]
        variants = {
            "student CE": lambda m, i: F.cross_entropy(m(xtr[i]), ids_tr[i]),
            "student KD (T = 4) + CE": lambda m, i: F.cross_entropy(z := m(xtr[i]), ids_tr[i]) + DF.kd_loss(
                z, t_logits[i], 4.0),
            "student regresses all 64 neurons": None,
            f"student regresses {k} selected neurons": selected,
            f"student regresses {k} random neurons": random_k,
        }
        for name, how in variants.items():
            torch.manual_seed(seed + 1)
            m = student()
            if callable(how):
                _pk_epochs(m, xtr, ids_tr, lambda i, m=m, how=how: how(m, i), epochs=epochs, p=16, k=4, lr=0.05,
                           seed=seed)
            else:
                method = create_method("neuron_selection", indices=how)
                taps = Taps(m, ["pool"])
                with torch.no_grad(), taps.recording() as sv:
                    m(xtr[:4])
                method.prepare(sv, {"pool": t_feats[:4]}, Batch(xtr[:4]))
                opt_extra = list(method.parameters())

                def loss(i, m=m, method=method, taps=taps):
                    with taps.recording() as sv:
                        m(xtr[i])
                    return method(sv, {"pool": t_feats[i]}, Batch(xtr[i]))

                m.extra = nn.ParameterList(opt_extra)  # the adapter trains with the student
                _pk_epochs(m, xtr, ids_tr, loss, epochs=epochs, p=16, k=4, lr=0.05, seed=seed)
            score(name, m)
    _table("Neuron selection: verification accuracy of held-out identities (clean pairs)", ["accuracy"], rows)


# --------------------------------------------------------------------------------------------- SKD


def run_skd(quick: bool, seeds: list[int]) -> None:
    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    per = 150 if quick else 300
    base = torch.cat([(ytr == c).nonzero().flatten()[:per] for c in range(5)])
    xb, yb = xtr[base], ytr[base]
    novel = (yte >= 5).nonzero().flatten()
    xn, yn = xte[novel], yte[novel]
    epochs = 2 if quick else 3
    episodes = 50 if quick else 100
    rows: dict[str, dict[str, list[float]]] = {}

    def score(name, model):
        f = tap_features(model, xn, "pool")
        for shot in (1, 5):
            acc, _ = episode_accuracy(f, yn, 5, shot, 15, episodes, seed=11)
            rows.setdefault(name, {}).setdefault(f"5-way {shot}-shot", []).append(acc)

    for seed in seeds:
        torch.manual_seed(seed)
        plain = _cnn(5)
        sgd_epochs(list(plain.parameters()), lambda x, y: F.cross_entropy(plain(x), y), xb, yb, epochs=epochs,
                   batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, seed=seed, progress=False,
                   what="CE", modules=[plain])
        score("plain CE", plain)
        torch.manual_seed(seed)
        r = fit_skd_fewshot(lambda: _cnn(5), (xb, yb), epochs=epochs, seed=seed, batch_size=64, progress=False)
        score("SKD Gen-0 (CE + rotation)", r.teacher)
        score("SKD Gen-1 (KD + rotation consistency)", r.model)
    _table(f"SKD: novel Fashion-MNIST classes 5-9, mean accuracy over {episodes} episodes (15 queries per class)",
           ["5-way 1-shot", "5-way 5-shot"], rows)


# --------------------------------------------------------------------------------------------- SSD


def run_ssd(quick: bool, seeds: list[int]) -> None:
    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    n_max = 300 if quick else 500
    counts = long_tailed_counts(10, n_max, 100.0)
    epochs = 3 if quick else 5
    rows: dict[str, dict[str, list[float]]] = {}
    cols = ["many", "medium", "few", "overall"]

    def score(name, model):
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xte[s:s + 1000]).argmax(1) for s in range(0, len(xte), 1000)])
        for key, v in shot_accuracy(pred, yte, counts).items():
            rows.setdefault(name, {}).setdefault(key, []).append(v)

    for seed in seeds:
        idx = long_tailed_indices(ytr, n_max, 100.0, seed=seed)
        x, y = xtr[idx], ytr[idx]
        kw = dict(batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, progress=False)
        torch.manual_seed(seed)
        plain = _cnn(10)
        sgd_epochs(list(plain.parameters()), lambda a, b: F.cross_entropy(plain(a), b), x, y, epochs=epochs,
                   seed=seed, what="CE", modules=[plain], **kw)
        score("plain CE", plain)
        plain.eval().requires_grad_(False)
        feats = tap_features(plain, x, "pool")
        plain.fc.reset_parameters()
        plain.fc.requires_grad_(True)
        w = 1.0 / y.bincount(minlength=10).float()[y]
        sgd_epochs(list(plain.fc.parameters()), lambda f, b: F.cross_entropy(plain.fc(f), b), feats, y,
                   epochs=epochs, seed=seed, what="cRT", sample_weights=w, modules=[plain.fc], **kw)
        score("cRT (CE, class-balanced classifier)", plain)
        torch.manual_seed(seed)
        r = fit_ssd_longtail(lambda: _cnn(10), (x, y), epochs=epochs, seed=seed, **kw)
        score("SSD teacher (stages I-II)", r.teacher)
        hard = r.model.model
        score("SSD student, hard head", hard)
        score("SSD student, soft head", r.model)
        torch.manual_seed(seed)  # the same stage-I teacher, stages II-III again, then the optional fine-tuning
        r2 = fit_ssd_longtail(lambda: _cnn(10), (x, y), teacher=r.teacher, epochs=epochs, finetune_epochs=epochs,
                              seed=seed, **kw)
        score("SSD student, soft head + class-balanced fine-tuning", r2.model)
    _table(f"SSD: long-tailed Fashion-MNIST (n_max {n_max}, imbalance 100: {counts}), balanced test set",
           cols, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["ddl", "ec_kd", "neurons", "skd", "ssd"], action="append")
    ap.add_argument("--seeds", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seeds if args.seeds else (1 if args.quick else 3)))
    print("command: python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(sys.argv[0]).name}",
                                                                   *sys.argv[1:]]))
    for name, fn in (("ddl", run_ddl), ("ec_kd", run_eckd), ("neurons", run_neurons), ("skd", run_skd),
                     ("ssd", run_ssd)):
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        fn(args.quick, seeds)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s, seeds {seeds})")


if __name__ == "__main__":
    main()
