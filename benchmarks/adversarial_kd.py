"""Adversarial KD (issue 17, part A): student alone vs KD vs conditional adversarial KD vs KDGAN on
Fashion-MNIST with a capacity gap, and adversarial imitation KD's token F1 on a tagging task.

Part 1, Fashion-MNIST: teacher ``cnn_teacher_mnist`` trained 3 epochs (SGD lr 0.05 momentum 0.9, cosine,
batch 128, crop 2; ``benchmarks/accuracy.py``'s quick protocol) on the first ``--teacher-subset`` training
images (30,000: more than any student sees, so the teacher knows more than a student trained alone can
learn); student a one-hidden-layer MLP of 32 units (``mlp``, hidden [32]); every student sees the first
``--train`` training images (3,000) for ``--epochs`` passes (KDGAN: 1 cross-entropy pretraining pass + the
rest in the game); last-epoch top-1 on the first ``--val`` test images, mean ± std over seeds. The runs are
spread over ``--workers`` single-thread processes. With ``--out DIR`` the trained teacher is saved there
(safetensors) and read back by later runs with the same teacher settings instead of being trained again.
The frozen-teacher rows (KD, adversarial KD and its ablation) read the teacher's logits on the students'
training and test images from a table computed once (:class:`FrozenLookup`: the same logits, without a
CNN forward per batch); KDGAN, whose teacher trains, runs the teacher itself. ``--rows`` picks rows.

Every student: Adam lr 1e-3, no weight decay, constant lr, batch 128 (the KDGAN authors' code).

* student alone: cross-entropy;
* KD: cross-entropy + Hinton KD (T = 4);
* adversarial KD (``adversarial_kd``, Xu et al. 2017): its defaults (adversarial + L1 + auxiliary
  class terms, no label CE), and the same with the adversarial and auxiliary terms off (L1 only: the
  paper's claim is that the learned loss beats a fixed one);
* KDGAN (``kdgan``, Wang et al. 2018): its defaults (Adam lr 1e-3 for all three players).

Part 2, token tagging (``distill.data.adversarial_tagging``: triggers = listed verbs followed by an
argument start, in the standard library's docstrings, split by package): a BiLSTM teacher that reads
the gold argument annotations, a student that reads the words alone (low-resource: ``--windows``
training windows of 24 words), token F1 of the trigger tag on the held-out packages.

    python benchmarks/adversarial_kd.py            # 3 seeds, teacher 30,000 / students 3,000 images, 5 epochs;
                                                   # 600 windows, 10 epochs
    python benchmarks/adversarial_kd.py --quick    # 1 seed, teacher 2,000 / students 800 images, 2 epochs;
                                                   # 300 windows, 3 epochs
    python benchmarks/adversarial_kd.py --only image   # the Fashion-MNIST rows alone (--only tagging: the others)
    python benchmarks/adversarial_kd.py --only image --epochs 20 --out runs/bench_adversarial_kd \
        --rows alone,kd,akd,akd_l1                     # longer students, teacher saved/reused, KDGAN left out
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import load_subsets, run_pool, train_teacher  # noqa: E402

import distill  # noqa: E402
from distill.data.loader import InMemoryLoader  # noqa: E402
from distill.models import create  # noqa: E402
from distill.strategies.registry import strategy_info  # noqa: E402

SGD = dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)  # the teacher's
TEACHER_EPOCHS = 3  # the image teacher's (accuracy.py's quick protocol)
ADAM = dict(optimizer="adam", lr=1e-3, weight_decay=0.0)  # every student's (the KDGAN authors' code)


def _student() -> torch.nn.Module:
    return create("mlp", num_classes=10, hidden=[32])


def _fit(losses: dict, teacher: torch.nn.Module | None, train: InMemoryLoader, val: InMemoryLoader,
         epochs: int) -> float:
    d = distill.Distiller(_student(), teacher, losses)
    with tempfile.TemporaryDirectory() as tmp:
        r = distill.fit(d, train, val, epochs=epochs, schedule="constant", progress=False, run_dir=tmp, **ADAM)
    return float(r.last_acc)


IMAGE_ROWS = ("student alone (CE)", "KD (CE + KD, T=4)", "adversarial_kd (Xu et al.)",
              "adversarial_kd, L1 only (adv 0, aux 0)", "kdgan (Wang et al.)")
ROW_KEYS = dict(zip(("alone", "kd", "akd", "akd_l1", "kdgan"), IMAGE_ROWS))  # --rows


class FrozenLookup(nn.Module):
    """A frozen teacher whose logits on known images are read from a table.

    ``inputs`` ``(N, 1, 28, 28)`` and ``logits`` ``(N, K)``: the teacher's logits on them, computed once.
    ``forward(x)`` with ``x`` ``(B, 1, 28, 28)`` returns ``(B, K)``: the stored rows when every image of the
    batch is one of ``inputs`` (matched by its exact bytes), else ``teacher(x)``. Only for a teacher that
    does not change (KD, adversarial KD): the logits are the teacher's, less a CNN forward per batch.
    """

    def __init__(self, teacher: nn.Module, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        if len(inputs) != len(logits):
            raise ValueError(f"FrozenLookup: {len(inputs)} inputs but {len(logits)} rows of logits")
        self.teacher = teacher.eval().requires_grad_(False)
        self.logits = logits.detach().float()
        self.index = {k: i for i, k in enumerate(self._keys(inputs))}

    @staticmethod
    def _keys(x: torch.Tensor) -> list[bytes]:
        return [r.tobytes() for r in x.detach().reshape(len(x), -1).contiguous().numpy()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.index.get(k) for k in self._keys(x)]
        if any(i is None for i in rows):
            return self.teacher(x)
        return self.logits[torch.tensor(rows)].clone()


def teacher_logits(teacher: nn.Module, inputs: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """``(N, K)``: the teacher's logits on ``inputs`` ``(N, 1, 28, 28)``, in eval mode, without gradients."""
    teacher.eval()
    with torch.no_grad():
        return torch.cat([teacher(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])


def _image_run(job: dict) -> tuple[int, str, float, float]:
    """One (row, seed) of the Fashion-MNIST table, in a single-thread worker: ``(seed, row, top-1, seconds)``."""
    torch.set_num_threads(1)
    seed, name, epochs = job["seed"], job["name"], job["epochs"]
    teacher = create("cnn_teacher_mnist")
    teacher.load_state_dict(job["teacher"])
    frozen = FrozenLookup(teacher, torch.cat([job["x"], job["vx"]]), job["logits"])  # KD / adversarial KD
    train = InMemoryLoader(job["x"], job["y"], 128, seed=seed)
    val = InMemoryLoader(job["vx"], job["vy"], 1000, shuffle=False)
    akd = strategy_info("adversarial_kd").fn
    runs = {
        IMAGE_ROWS[0]: lambda: _fit({"ce": 1.0}, None, train, val, epochs),
        IMAGE_ROWS[1]: lambda: _fit({"ce": 1.0, "kd": 1.0}, frozen, train, val, epochs),
        IMAGE_ROWS[2]: lambda: float(akd(_student(), train, val, teacher=frozen, epochs=epochs, seed=seed,
                                         progress=False, **ADAM).last_acc),
        IMAGE_ROWS[3]: lambda: float(akd(_student(), train, val, teacher=frozen, epochs=epochs, seed=seed,
                                         progress=False, adv_weight=0.0, aux_weight=0.0, **ADAM).last_acc),
        IMAGE_ROWS[4]: lambda: float(strategy_info("kdgan").fn(
            _student(), train, val, teacher=teacher, epochs=epochs - 1, pretrain_epochs=1, seed=seed,
            progress=False).last_acc),
    }
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    acc = runs[name]()
    return seed, name, acc, time.perf_counter() - t0


def image_rows(a: argparse.Namespace) -> tuple[float, list[tuple[str, list[float]]]]:
    """``(teacher top-1, rows)``: the teacher trained once on the first ``a.teacher_subset`` images, then every
    (row, seed) on the first ``a.train`` images."""
    train, x, y, vx, vy = load_subsets("fashion_mnist", a.train, a.val)
    tx, ty = train.inputs[: a.teacher_subset], train.targets[: a.teacher_subset]
    val = InMemoryLoader(vx, vy, 1000, shuffle=False)
    t0 = time.perf_counter()
    teacher, t_acc, how = image_teacher(a, tx, ty, val)
    print(f"  teacher cnn_teacher_mnist: {t_acc:.2f} ({len(tx)} images, {how}, {time.perf_counter() - t0:.0f} s)",
          flush=True)
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    logits = teacher_logits(teacher, torch.cat([x, vx]))
    names = [ROW_KEYS[k] for k in a.rows]
    jobs = [{"seed": seed, "name": name, "epochs": a.epochs, "teacher": state, "logits": logits,
             "x": x, "y": y, "vx": vx, "vy": vy} for seed in range(a.seeds) for name in names]
    acc: dict[tuple[int, str], float] = {}
    for seed, name, top1, seconds in run_pool(_image_run, jobs, a.workers):
        acc[seed, name] = top1
        print(f"  seed {seed} {name}: {top1:.2f} ({seconds:.0f} s)", flush=True)
    return t_acc, [(name, [acc[seed, name] for seed in range(a.seeds)]) for name in names]


def image_teacher(a: argparse.Namespace, tx: torch.Tensor, ty: torch.Tensor,
                  val: InMemoryLoader) -> tuple[nn.Module, float, str]:
    """``(teacher, top-1 on val, "trained" | "read from <path>")``: trained on ``tx``/``ty``, or read from
    ``a.out`` when a run with the same teacher settings saved it there (and saved there when ``a.out`` is set)."""
    from distill.train.checkpoint import load_model, save_model

    path = None
    if a.out is not None:
        path = a.out / f"teacher_cnn_teacher_mnist_n{len(tx)}_e{TEACHER_EPOCHS}_val{a.val}.safetensors"
        if path.exists():
            teacher, meta = load_model(path, create("cnn_teacher_mnist"))
            return teacher, float(meta["test_acc"]), f"read from {path}"
    with tempfile.TemporaryDirectory() as tmp:
        teacher, t_acc = train_teacher("cnn_teacher_mnist", tx, ty, val, epochs=TEACHER_EPOCHS, batch_size=128,
                                       run_dir=Path(tmp), fit_args=dict(schedule="cosine", progress=False, **SGD))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(path, teacher, name="cnn_teacher_mnist",
                   metadata={"test_acc": t_acc, "epochs": TEACHER_EPOCHS, "images": len(tx), "val": a.val})
        return teacher, t_acc, f"trained, saved to {path}"
    return teacher, t_acc, "trained"


def tagging_rows(a: argparse.Namespace) -> list[tuple[str, list[float]]]:
    from distill.data.adversarial_tagging import TaggingLoader, build_tagging_sets
    from distill.data.corpus import split_passages, stdlib_docstrings
    from distill.models.adversarial_tagger import TokenTagger
    from distill.strategies.adversarial_imitation import adversarial_imitation

    tr, va = split_passages(stdlib_docstrings(), 0.2)
    train_set, val_set = build_tagging_sets([p.text for p in tr], [p.text for p in va], max_train=a.windows)
    print(f"  tagging: {len(train_set)} training windows ({int((train_set.tags == 1).sum())} triggers), "
          f"{len(val_set)} held-out windows ({int((val_set.tags == 1).sum())} triggers), vocab {len(train_set.vocab)}")
    v = len(train_set.vocab)
    settings = {"student alone (own classifier, CE)": dict(adv_weight=0.0, share_classifier=False),
                "student + teacher's frozen C, no imitation": dict(adv_weight=0.0, share_classifier=True),
                "student + adversarial imitation (adv 1.0)": dict(adv_weight=1.0, share_classifier=True),
                "student + adversarial imitation (adv 0.1)": dict(adv_weight=0.1, share_classifier=True)}
    rows: dict[str, list[float]] = {}
    for seed in range(a.seeds):
        for name, kw in settings.items():
            torch.manual_seed(seed)
            r = adversarial_imitation(TokenTagger(v), TaggingLoader(train_set, 32, seed=seed),
                                      TaggingLoader(val_set, 512, shuffle=False),
                                      teacher=TokenTagger(v, annotation_vocab=2), epochs=a.tag_epochs,
                                      teacher_epochs=a.teacher_epochs, lr=0.01, seed=seed, progress=False, **kw)
            if name.startswith("student alone"):  # one teacher per seed: every setting trains the same one
                rows.setdefault("teacher (words + gold annotations)", []).append(r.history[-1]["teacher_f1"])
            rows.setdefault(name, []).append(r.last_score)
            print(f"  seed {seed} {name}: F1 {r.last_score:.2f}", flush=True)
    teacher = rows.pop("teacher (words + gold annotations)")
    return [("teacher (words + gold annotations)", teacher), *rows.items()]


def _table(title: str, metric: str, rows: list[tuple[str, list[float]]]) -> str:
    out = [f"{title}\n", f"| row | {metric} mean ± std | per seed |", "|---|---|---|"]
    for name, v in rows:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        out.append(f"| {name} | {statistics.mean(v):.2f} ± {sd:.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train", type=int, default=3000, help="training images each student sees")
    p.add_argument("--teacher-subset", type=int, default=None,
                   help="training images the image teacher sees (default 30000; --quick 2000)")
    p.add_argument("--val", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--windows", type=int, default=600)
    p.add_argument("--tag-epochs", type=int, default=10)
    p.add_argument("--teacher-epochs", type=int, default=10, help="the tagging teacher's epochs")
    p.add_argument("--workers", type=int, default=2, help="processes for the Fashion-MNIST runs")
    p.add_argument("--only", choices=("image", "tagging"), default=None, help="run one of the two tables")
    p.add_argument("--rows", default=",".join(ROW_KEYS),
                   help=f"comma-separated Fashion-MNIST rows among {', '.join(ROW_KEYS)} (default: all)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder where the image teacher is saved, and read back by later runs with the same settings")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    a.rows = [k.strip() for k in a.rows.split(",") if k.strip()]
    bad = [k for k in a.rows if k not in ROW_KEYS]
    if bad or not a.rows:
        p.error(f"--rows: unknown row(s) {bad or a.rows}; expected a comma-separated subset of {', '.join(ROW_KEYS)}")
    if a.quick:
        a.seeds, a.train, a.val, a.epochs, a.windows, a.tag_epochs, a.teacher_epochs = 1, 800, 500, 2, 300, 3, 6
    if a.teacher_subset is None:
        a.teacher_subset = 2000 if a.quick else 30000
    if a.epochs < 2:
        p.error(f"--epochs must be >= 2 (KDGAN pretrains 1 epoch, then plays the rest); got {a.epochs}")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    img = image_rows(a) if a.only in (None, "image") else None
    tag = tagging_rows(a) if a.only in (None, "tagging") else None
    if img is not None:
        t_acc, rows = img
        rows = [(f"teacher cnn_teacher_mnist ({a.teacher_subset} images)", [t_acc]), *rows]
        print()
        print(_table(f"Fashion-MNIST: teacher cnn_teacher_mnist {t_acc:.2f}% ({TEACHER_EPOCHS} epochs, SGD lr 0.05 "
                     f"cosine, batch 128, crop 2, on the first {a.teacher_subset} training images); students mlp[32] "
                     f"on the first {a.train} training images, {a.epochs} epochs; top-1 % on {a.val} test images, "
                     f"{a.seeds} seed(s)", "top-1 %", rows))
    if tag is not None:
        print()
        print(_table(f"Trigger tagging (stdlib docstrings), {a.windows} training windows, {a.tag_epochs} epochs, "
                     f"token F1 % of the trigger tag, {a.seeds} seed(s)", "F1 %", tag))
    print(f"\n{time.perf_counter() - t0:.0f} s; command: python "
          + " ".join(shlex.quote(x) for x in [f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
