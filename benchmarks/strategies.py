"""Accuracy of every registered training strategy on Fashion-MNIST / MNIST beside the scratch baseline.

The sibling of accuracy.py for ``distill.strategies`` (online cohorts, self-distillation, chains,
ensembles and transfer sets, semi-supervised training), on the same scaled-down protocol: the
same student (cnn_student_mnist, ~99k parameters) and teacher (cnn_teacher_mnist, ~1.17M, trained
once), SGD lr 0.05 cosine, batch 128, crop 2, the same epochs for every trained model, several
seeds. Each strategy runs with the small protocol it needs (``PROTOCOLS`` below: a cohort of 2 for
DML, two born-again generations, one teacher assistant, ...); the output says which strategies train
more than one model. Semi-supervised strategies (those that take unlabeled data) get the first
``--labeled`` training images with labels and the rest without, and are compared, in a table of
their own, with the student trained from scratch on the labeled images alone. Dense-output strategies
(OKDHP, which learns pose-style heatmaps) run on a dense task made from the same training images: each
image's target is 10 maps, zero but its class's, which holds a Gaussian at the image's ink centre
(:func:`distill.data.dense.class_heatmaps`); they are compared, in a table of their own, with one branch
of the same network trained alone on the same heatmap loss (``dense_scratch``), by validation MSE.

    python benchmarks/strategies.py [--data fashion_mnist] [--seeds 3] [--epochs 4] [--teacher-epochs 3]
        [--train-subset 3000] [--labeled 1000] [--val-subset 4000] [--workers 2]
        [--strategies dml takd ...] [--quick] [--write-docs]

``--strategies okdhp`` runs the dense part alone: no teacher, no classification baselines (written under
``strategies-okdhp-<data>`` with --write-docs, so the full run's section stays as it is).

Prints mean ± std of last- and best-epoch top-1 of the delivered model, its agreement and KL with
the benchmark teacher on the test images (every strategy's delivered model is compared with the same
teacher, also when the strategy has none), and writes it into docs/benchmarks.md under
``strategies-<data>`` with --write-docs. A strategy that cannot run here is listed with its reason.
The teacher (and its per-epoch checkpoints, which Pro-KD follows) is kept in ``--out`` and reused
by a later run with the same teacher settings. ``--quick`` is a smoke run of every strategy on small
subsets (1 seed, 2 epochs).
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from _common import load_subsets, run_pool, train_teacher, write_section
from accuracy import FIT_ARGS
from torch import nn

import distill
from distill.batch import as_batch
from distill.data import RandomCropPad
from distill.data.dense import class_heatmaps
from distill.data.loader import InMemoryLoader
from distill.functional import heatmap_mse_loss
from distill.models import create
from distill.report import Stat, aggregate, read_run, table_markdown
from distill.strategies import self_distill, transfer
from distill.strategies.chain import born_again, pro_kd, reskd, takd
from distill.strategies.codistill import fit_codistillation
from distill.strategies.composite import okdhp_student
from distill.strategies.hsakd import fit_hsakd
from distill.strategies.knowledge_flow import fit_knowledge_flow
from distill.strategies.mean_teacher import mean_teacher
from distill.strategies.mixskd import fit_mixskd
from distill.strategies.online import (
    RocketNet,
    fit_dml,
    fit_okddip,
    fit_okdhp,
    fit_rocket,
)
from distill.strategies.registry import list_strategies, strategy_info
from distill.train.evaluate import evaluate
from distill.train.loop import seed_everything
from distill.train.schedules import Schedule, make_optimizer

STUDENT, TEACHER = "cnn_student_mnist", "cnn_teacher_mnist"
# the optimisation of accuracy.py; progress and the teacher's per-epoch evaluation are the runners' business
FIT = {k: v for k, v in FIT_ARGS.items() if k not in ("progress", "eval_teacher")}
# TAKD's assistant: the student's CNN at 1.5x its widths (~221k parameters, between the student's 99k and the
# teacher's 1.17M; 2.25x the student's compute where the teacher's widths would cost 4x)
ASSISTANT = {"name": "cnn", "widths": [48, 96, 192], "stem_width": 24, "blocks": 1,
             "downsample": [True, True, True], "in_channels": 1, "num_classes": 10}
# ResKD's res-student: a small CNN (~6.9k parameters, 7% of the student)
RES_STUDENT = {"name": "cnn", "widths": [8, 16, 32], "stem_width": 8, "blocks": 1,
               "downsample": [True, True, True], "in_channels": 1, "num_classes": 10}
# strategies registered but not run here, with the reason printed in the output
SKIP: dict[str, str] = {}


# --------------------------------------------------------------------------------------------
# What a worker gets, and how each strategy runs on it
# --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """One (strategy, seed) run: the data, the teacher and the protocol's settings."""

    seed: int
    epochs: int
    batch_size: int
    labeled: int
    quick: bool
    x: torch.Tensor
    y: torch.Tensor
    val: InMemoryLoader
    teacher: nn.Module
    footsteps: Path
    run_dir: Path
    data: Path  # the file x, y, val_x, val_y, teacher_logits were read from (for processes of a strategy's own)

    def loader(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, batch_size: int | None = None,
               augment: bool = True) -> InMemoryLoader:
        """The training images (or ``x``, ``y``) with crop 2, shuffled by the seed, with sample indices."""
        return InMemoryLoader(self.x if x is None else x, self.y if x is None else y, batch_size or self.batch_size,
                              augment=RandomCropPad(2) if augment else None, seed=self.seed, return_index=True)

    def labeled_loader(self, **kw: Any) -> InMemoryLoader:
        return self.loader(self.x[: self.labeled], self.y[: self.labeled], **kw)

    @property
    def unlabeled(self) -> torch.Tensor:
        return self.x[self.labeled:]

    def common(self) -> dict[str, Any]:
        """The keywords every strategy takes: epochs, run folder, seed, no progress bar, accuracy.py's optimiser."""
        return {"epochs": self.epochs, "run_dir": self.run_dir, "seed": self.seed, "progress": False, **FIT}

    def student(self) -> nn.Module:
        return create(STUDENT)

    def seeded_student(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return create(STUDENT)


# what a runner returns: the strategy's result (last/best accuracy), the model it delivers, other numbers
Outcome = tuple[Any, nn.Module, dict[str, float | None]]


@dataclass(frozen=True)
class Protocol:
    """How the benchmark runs one strategy: ``run(ctx)``, what it trains per seed (for the output),
    and its cost in scratch runs, roughly, from a --quick run (the longest jobs start first)."""

    run: Callable[[Ctx], Outcome]
    trains: str
    cost: float = 1.0


def _fit_self(fn: Callable[..., Any], **kw: Any) -> Callable[[Ctx], Outcome]:
    """A self-distillation strategy: one student, the model its Distiller predicts with delivered."""
    def run(ctx: Ctx) -> Outcome:
        r = fn(ctx.seeded_student(), ctx.loader(), ctx.val, **kw, **ctx.common())
        exits = {f"exit {k}": v for k, v in r.exit_acc.items()}  # BYOT/MSD: every exit and their ensemble
        return r, r.distiller.predictor(), exits
    return run


def _dml(ctx: Ctx) -> Outcome:
    r = fit_dml(ctx.student, ctx.loader(), ctx.val, num_models=2, **ctx.common())
    return r, r.models["net0"], {"net1": r.members["net1"].last_acc}


def _okddip(ctx: Ctx) -> Outcome:
    # the ramp-up is the reference code's 80 of 300 epochs, scaled to this run (80 epochs would keep the
    # distillation terms near e^-5 for the whole of a short run)
    rampup = max(1, round(ctx.epochs * 80 / 300))
    r = fit_okddip(ctx.student, ctx.loader(), ctx.val, num_models=3, rampup_epochs=rampup, **ctx.common())
    return r, r.models["leader"], {p: r.members[p].last_acc for p in r.members if p != "leader"}


def _rocket_net(seed: int) -> RocketNet:
    """The student's stem and first stage shared; the light net is the rest of the student (so the deployed
    light net is cnn_student_mnist), the booster two stages of 2 blocks at the teacher's widths (128, 256)."""
    torch.manual_seed(seed)
    s = create(STUDENT)
    b = create("cnn", widths=(32, 128, 256), stem_width=16, blocks=2, downsample=(True, True, True), in_channels=1,
               num_classes=10)
    return RocketNet(nn.Sequential(s.stem, s.stage1), nn.Sequential(s.stage2, s.stage3, s.avgpool, s.pool, s.fc),
                     nn.Sequential(b.stage2, b.stage3, b.avgpool, b.pool, b.fc))


def _rocket(ctx: Ctx) -> Outcome:
    net = _rocket_net(ctx.seed)
    r = fit_rocket(net, ctx.loader(), ctx.val, **ctx.common())
    return r, net.light_net(), {"booster": r.booster_acc}


def _dlb(ctx: Ctx) -> Outcome:
    # half batches: each step joins one with the previous step's half, so steps stay at batch_size samples
    r = self_distill.fit_dlb(ctx.seeded_student(), ctx.loader(batch_size=ctx.batch_size // 2), ctx.val, **ctx.common())
    return r, r.distiller.predictor(), {}


def _mean_teacher(ctx: Ctx) -> Outcome:
    # each step: 32 labeled + 96 unlabeled images (the reference PyTorch code's 62 of 256 labeled, ~1/4), an
    # epoch one pass over the unlabeled images; both views cropped independently (plus the paper's noise).
    # The EMA decay is scaled to a run of ~100 steps: the paper's 0.999 (0.99 during the ramp-up) averages
    # over ~1000 steps of 150000, here the teacher would stay the initial weights; 0.95 (0.9) averages over
    # ~20 (10) steps. The consistency ramps up over the first ~27% of the run, as the TensorFlow ConvNet
    # runs (40000 of 150000 steps).
    labeled = ctx.labeled_loader(batch_size=ctx.batch_size // 4, augment=False)
    unlabeled = InMemoryLoader(ctx.unlabeled, None, ctx.batch_size - ctx.batch_size // 4, seed=ctx.seed)
    model = ctx.seeded_student()
    r = mean_teacher(model, labeled, ctx.val, unlabeled_loader=unlabeled, augment=RandomCropPad(2),
                     consistency_rampup=max(1.0, 0.27 * ctx.epochs), ema_decay=0.95, ema_decay_rampup=0.9,
                     **ctx.common())
    return r, model, {"EMA model": r.ema_last_acc}


CODISTILL_WORKER = "--codistillation-worker"  # argv[1] of the processes _codistillation launches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _codistillation(ctx: Ctx) -> Outcome:
    """torch.distributed needs processes of its own: 2 workers launched with torchrun (gloo, one thread
    each) run :func:`_codistillation_worker`, each training on its half of every epoch; the pool worker
    waits for them."""
    launch = ctx.run_dir / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    spec = {"data": str(ctx.data), "epochs": ctx.epochs, "batch_size": ctx.batch_size, "seed": ctx.seed,
            "run_dir": str(ctx.run_dir), "out": str(launch / "rank0.pt")}
    (launch / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(Path(__file__).resolve()), CODISTILL_WORKER, str(launch / "spec.json")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the torchrun launch failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    saved = torch.load(launch / "rank0.pt")
    model = ctx.student()
    model.load_state_dict(saved["state"])
    return SimpleNamespace(**saved["result"]), model, {"worker 1": saved["workers"][1]["last_acc"]}


def _codistillation_worker(spec_path: str) -> None:
    """One codistillation worker (a process torchrun started); rank 0 saves its model and both results."""
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    x, y, val_x, val_y, _ = torch.load(spec["data"])
    loader = InMemoryLoader(x, y, spec["batch_size"], augment=RandomCropPad(2), seed=spec["seed"], return_index=True)
    # each worker makes len(loader) / 2 steps an epoch: exchange weights ~10 times a run (the library's 50
    # steps, also the default burn-in, would never switch the distillation on in a run this short)
    exchange = max(1, len(loader) * spec["epochs"] // 20)
    r = fit_codistillation(lambda: create(STUDENT), loader, InMemoryLoader(val_x, val_y, 1000, shuffle=False),
                           epochs=spec["epochs"], run_dir=spec["run_dir"], seed=spec["seed"], progress=False,
                           exchange_every=exchange, **FIT)
    if r.rank == 0:
        result = {"last_acc": r.last_acc, "best_acc": r.best_acc, "best_epoch": r.best_epoch}
        torch.save({"state": r.model.state_dict(), "result": result, "workers": r.workers}, spec["out"])


def _born_again(ctx: Ctx) -> Outcome:
    r = born_again(STUDENT, ctx.loader(), ctx.val, generations=2, **ctx.common())
    accs = {f"gen{k}": s.last_acc for k, s in enumerate(r.stages)}
    return r, r.models[-1], {**accs, "ensemble of gen1-2": r.ensemble_acc}


def _takd(ctx: Ctx) -> Outcome:
    r = takd(ctx.student, ctx.loader(), ctx.val, teacher=ctx.teacher, assistants=[ASSISTANT], **ctx.common())
    return r, r.models[-1], {"assistant": r.stages[0].last_acc}


def _hsakd(ctx: Ctx) -> Outcome:
    # stage 1 trains the teacher's auxiliary classifiers (its backbone frozen, the paper's main protocol) for
    # one epoch; stage 2 the student for the usual epochs
    r = fit_hsakd(ctx.student, ctx.loader(), ctx.val, teacher=ctx.teacher, teacher_epochs=1, **ctx.common())
    return r, r.models[-1], {}


def _knowledge_flow(ctx: Ctx) -> Outcome:
    r = fit_knowledge_flow(ctx.student, ctx.loader(), ctx.val, teacher=ctx.teacher, **ctx.common())
    return r, r.student, {"student + teacher flow": r.flow_last_acc}


def _pro_kd(ctx: Ctx) -> Outcome:
    r = pro_kd(ctx.student, ctx.loader(), ctx.val, teacher=create(TEACHER), checkpoints=ctx.footsteps,
               **ctx.common())
    return r, r.models[-1], {}


def _reskd(ctx: Ctx) -> Outcome:
    r = reskd(ctx.student, ctx.loader(), ctx.val, teacher=ctx.teacher, res_students=[RES_STUDENT], **ctx.common())
    return r, r.models[-1], {"student alone (stage 0)": r.stages[0].last_acc}


def _model_compression(ctx: Ctx) -> Outcome:
    # one synthetic example per training image (the paper's transfer sets are far larger; the library's 10x
    # would make each epoch 11 of the student's and of teacher forwards, and MUNGE's O(N^2) pass, ~1 CPU-minute
    # for 3000 images, 10 passes), labelled by the teacher, an ensemble of one
    model = ctx.seeded_student()
    r = transfer.fit_model_compression(model, ctx.loader(), ctx.val, teacher=ctx.teacher, multiplier=1, **ctx.common())
    return r, model, {}


def _cmm(ctx: Ctx) -> Outcome:
    model = ctx.seeded_student()
    r = transfer.fit_cmm(model, ctx.loader(), ctx.val, teacher=ctx.teacher, multiplier=1, **ctx.common())
    return r, model, {}


def _co_training(ctx: Ctx) -> Outcome:
    # 3 rounds (the paper's 30 re-train both classifiers 31 times), each classifier labelling its 5 most
    # confident images per class from a pool of 500 (the paper: 4 of 75, two classes)
    rounds = 1 if ctx.quick else 3
    r = transfer.fit_co_training(ctx.student, ctx.labeled_loader(), ctx.val, unlabeled=ctx.unlabeled, rounds=rounds,
                        pool_size=min(500, len(ctx.unlabeled)), per_class=5, **ctx.common())
    last = r.history[-1]
    return r, r.combined, {"left-half view": last.get("val_view1_acc"), "right-half view": last.get("val_view2_acc"),
                           "self-labelled images": float(len(r.added_index))}


def _data_distillation(ctx: Ctx) -> Outcome:
    # the teacher is trained here on the labeled images only (the benchmark teacher saw 30000 labels)
    model = ctx.seeded_student()
    r = transfer.fit_data_distillation(model, ctx.labeled_loader(), ctx.val, unlabeled=ctx.unlabeled, **ctx.common())
    pseudo = 100.0 * float((r.pseudo_labels == ctx.y[ctx.labeled:]).float().mean())
    return r, model, {"teacher (labeled only)": r.teacher_result.last_acc, "pseudo-label accuracy": pseudo}


def _scratch(ctx: Ctx) -> Outcome:
    return _ce_only(ctx, ctx.loader())


def _scratch_labeled(ctx: Ctx) -> Outcome:
    return _ce_only(ctx, ctx.labeled_loader())


def _ce_only(ctx: Ctx, loader: InMemoryLoader) -> Outcome:
    d = distill.Distiller(ctx.seeded_student(), None, {"ce": 1.0})
    return distill.fit(d, loader, ctx.val, **ctx.common()), d.student, {}


BASELINES: dict[str, Protocol] = {
    "scratch": Protocol(_scratch, "1 student, cross-entropy"),
    "scratch_labeled": Protocol(_scratch_labeled, "1 student, cross-entropy on the labeled images only", 0.6),
}
PROTOCOLS: dict[str, Protocol] = {
    "codistillation": Protocol(_codistillation, "2 students in 2 processes (torchrun, gloo), each on its half of "
                                                "every epoch, exchanging weights ~10 times a run; worker 0 "
                                                "reported", 2),
    "dml": Protocol(_dml, "2 students (a cohort of 2, the paper's main setting); net0 reported", 3.2),
    "okddip": Protocol(_okddip, "3 students: 2 peers + the leader (the fewest it allows), one optimizer; "
                                "the leader reported", 3.6),
    "rocket_launching": Protocol(_rocket, "1 net: the light net (= the student) and a booster (2 stages of 2 blocks, "
                                          "128/256 wide) sharing stem + stage1; the light net reported", 4.6),
    "byot": Protocol(_fit_self(self_distill.fit_byot), "1 student + exit heads on stage1, stage2 (training only)", 2.1),
    "msd": Protocol(_fit_self(self_distill.fit_msd), "1 student + exit heads on stage1, stage2 (training only)", 2.3),
    "dlb": Protocol(_dlb, "1 student; half batches joined with the last step's half: each image is seen twice "
                          "per epoch", 1.7),
    "zipf_ls": Protocol(_fit_self(self_distill.fit_zipf_ls, feature="stage3"), "1 student (ranks from the dense stage3 "
                                                                   "prediction)", 1.1),
    "tf_fd": Protocol(_fit_self(self_distill.fit_tffd), "1 student", 1.1),
    "mixskd": Protocol(_fit_self(fit_mixskd), "1 student + exit branches, a self-teacher and discriminators "
                                              "(training only); every batch with its mixup (2x the images)", 9),
    "sla": Protocol(_fit_self(self_distill.fit_sla), "1 student + a joint (class x rotation) head; every image in its 4 "
                                        "rotations (4x the forwards)", 5),
    "mean_teacher": Protocol(_mean_teacher, "1 student + its EMA copy (no gradient); steps of 32 labeled + 96 "
                                            "unlabeled images, an epoch one pass over the unlabeled; the student "
                                            "reported", 3.5),
    "born_again": Protocol(_born_again, "3 students: generation 0 from scratch, then 2 born-again generations; "
                                        "generation 2 reported", 7),
    "takd": Protocol(_takd, "2 models: the assistant (cnn 48/96/192, ~221k) from the teacher, then the student "
                            "from the assistant", 7),
    "hsakd": Protocol(_hsakd, "2 stages: the teacher's auxiliary (class x rotation) classifiers, 1 epoch, its "
                              "backbone frozen; then the student with its own; 4 rotations of every image", 20),
    "knowledge_flow": Protocol(_knowledge_flow, "1 student, fed the teacher's stage1-3 features through trainable "
                                                "transforms whose weight is driven to 0; the student alone reported", 8),
    "pro_kd": Protocol(_pro_kd, "1 student, following the teacher's per-epoch checkpoints", 6.5),
    "reskd": Protocol(_reskd, "2 models: the student by KD, then a res-student (cnn 8/16/32, ~6.9k) on the "
                              "residual; the sum reported", 5),
    "model_compression": Protocol(_model_compression, "1 student, on the training images + 1 MUNGE image each, all "
                                                      "labelled by the teacher (no true labels)", 8),
    "cmm": Protocol(_cmm, "1 student, on the training images + 1 MUNGE image each labelled by the teacher", 8),
    "co_training": Protocol(_co_training, "2 students (left- / right-half view), each trained once per round "
                                          "+ once at the end (3 rounds; --quick: 1); their product reported", 4),
    "data_distillation": Protocol(_data_distillation, "2 students: a teacher on the labeled images, then the "
                                                      "student on labeled + pseudo-labelled images", 3.2),
}


def is_semi_supervised(name: str) -> bool:
    """Whether the strategy takes unlabeled data (then it runs on the labeled subset + the rest unlabeled)."""
    params = inspect.signature(strategy_info(name).fn).parameters
    return bool({"unlabeled", "unlabeled_loader"} & set(params))


# --------------------------------------------------------------------------------------------
# One run in a worker
# --------------------------------------------------------------------------------------------


def _against_teacher(model: nn.Module, val: InMemoryLoader, teacher: nn.Module,
                     teacher_logits: torch.Tensor) -> dict[str, float]:
    """Top-1, agreement and KL of ``model`` with the benchmark teacher on the test images; the teacher's
    logits were computed once, so ``evaluate`` reads every batch of them from its cache."""
    cache = list(teacher_logits.split(val.batch_size))
    return evaluate(SimpleNamespace(student=model, teacher=teacher), val, teacher_cache=cache)


def _cpu_s() -> float:
    """CPU seconds of this process and of the children it waited for (codistillation's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """One (strategy, seed) run, in a worker process with one thread; returns its summary or its error."""
    torch.set_num_threads(1)
    name, seed, a = job["name"], job["seed"], job["args"]
    x, y, val_x, val_y, teacher_logits = torch.load(job["data"])
    teacher = create(TEACHER)
    teacher.load_state_dict(torch.load(job["teacher"]))
    run_dir = Path(job["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a strategy that saves its own stages must not find old ones
    ctx = Ctx(seed=seed, epochs=a["epochs"], batch_size=a["batch_size"], labeled=a["labeled"], quick=a["quick"],
              x=x, y=y, val=InMemoryLoader(val_x, val_y, 1000, shuffle=False), teacher=teacher,
              footsteps=Path(job["footsteps"]), run_dir=run_dir, data=Path(job["data"]))
    protocol = BASELINES.get(name) or PROTOCOLS[name]
    t0, cpu0 = time.perf_counter(), _cpu_s()
    try:
        with redirect_stdout(io.StringIO()):
            result, model, extras = protocol.run(ctx)
            ev = _against_teacher(model, ctx.val, teacher, teacher_logits)
    except Exception as e:  # noqa: BLE001 - a strategy that cannot run here is reported, not hidden
        return {"name": name, "seed": seed, "error": f"{type(e).__name__}: {e}"}
    params = _params(model)
    summary = {"name": name, "group": name, "kind": "strategy", "seed": seed, "epochs": a["epochs"],
               "semi_supervised": job["semi"], "last_acc": result.last_acc, "best_acc": result.best_acc,
               "best_epoch": result.best_epoch, "delivered_acc": ev["student_acc"], "agreement": ev["agreement"],
               "kl_to_teacher": ev["kl_to_teacher"], "teacher_acc": job["teacher_acc"], "params": params,
               "extras": {k: v for k, v in extras.items() if v is not None}, "time_s": time.perf_counter() - t0,
               # one thread: the CPU time is about what the run takes on a quiet core, whatever the load
               "cpu_s": _cpu_s() - cpu0}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, default=str))
    return summary


# --------------------------------------------------------------------------------------------
# The dense task: OKDHP and one branch trained alone, on class heatmaps of the same images
# --------------------------------------------------------------------------------------------

DENSE = ("okdhp",)  # strategies whose batches carry target maps (B, C, H, W) instead of labels
# 8x8 maps for the 28x28 images (~1/4 of the input, as pose heatmaps: 64x48 for 256x192 crops): the
# student's stage3 gives 4x4, and the branch head upsamples it x2 with one transposed convolution;
# sigma 1 map pixel (class_heatmaps' default for 8x8 maps; the pose code's 2 is for 64x48 maps)
DENSE_MAPS, DENSE_SIGMA = (8, 8), 1.0
# the student cut as recipes/digits/okdhp.yaml cuts its own: stem + stage1 (32 channels, 14x14) the shared
# trunk, stage2 + stage3 (+ the head) one branch
DENSE_CUT = {"split": "stage1", "until": "stage3"}
# the same for both: Adam (the reference code's optimizer) with the benchmark's cosine schedule and the
# reference's weight decay 1e-4; lr 1e-2 (the digits recipe's): a check on held-out training images
# (Fashion-MNIST 3000-5999; seed 0, 4 epochs) preferred it to 1e-3 for both single branches (MSE x1e-3:
# dense_scratch 2.86 vs 3.51, okdhp's branch0 2.93 vs 4.06; okdhp's ensemble 2.32 vs 2.17)
DENSE_FIT = {"optimizer": "adam", "lr": 1e-2, "weight_decay": 1e-4, "schedule": "cosine"}


def _dense_okdhp(train: InMemoryLoader, val: InMemoryLoader, seed: int, epochs: int, run_dir: Path) -> dict[str, Any]:
    """OKDHP with the reference code's defaults (3 branches, kd_weight 5, ens_weight 6, pixel-wise KL)
    but the ramp-up, the reference's 60 of 140 epochs scaled to this run (60 epochs would keep the
    distillation near e^-5 throughout)."""
    rampup = max(1, round(epochs * 60 / 140))
    r = fit_okdhp(STUDENT, train, val, epochs=epochs, run_dir=run_dir, seed=seed, progress=False,
                  rampup_epochs=rampup, num_branches=3, **DENSE_CUT, **DENSE_FIT)
    net = r.models["model"]
    # the members' FitResults hold no last_score (CohortFitResult's docstring says they do): read the history
    return {"last": r.last_score, "best": r.best_score, "ensemble": r.members["ensemble"].history[-1]["val_score"],
            "rampup": rampup, "delivered_params": _params(net.branch_net(0)), "trained_params": _params(net)}


def _dense_scratch(train: InMemoryLoader, val: InMemoryLoader, seed: int, epochs: int,
                   run_dir: Path) -> dict[str, Any]:
    """Trunk + one branch, alone, on the heatmap MSE OKDHP gives each branch: built as fit_okdhp builds
    its network at the same seed (so it starts from OKDHP's trunk + branch0), trained by the loop fit_okdhp
    runs (schedule stepped per batch, the loader's epoch set, evaluated after each epoch)."""
    seed_everything(seed)
    net = okdhp_student(STUDENT, train, num_branches=2, **DENSE_CUT).branch_net(0)  # branch 1 is dropped
    opt = make_optimizer(net.parameters(), DENSE_FIT["optimizer"], lr=DENSE_FIT["lr"],
                         weight_decay=DENSE_FIT["weight_decay"])
    schedule = Schedule(opt, DENSE_FIT["schedule"], epochs=epochs, steps_per_epoch=len(train))
    scores = []
    for epoch in range(epochs):
        train.set_epoch(epoch)
        net.train()
        for raw in train:
            batch = as_batch(raw)
            loss = heatmap_mse_loss(net(batch.inputs), batch.targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step_batch()
        schedule.step_epoch()
        scores.append(_val_mse(net, val))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "val_mse.json").write_text(json.dumps(scores))
    return {"last": scores[-1], "best": min(scores), "delivered_params": _params(net),
            "trained_params": _params(net)}


@torch.no_grad()
def _val_mse(net: nn.Module, val: InMemoryLoader) -> float:
    """The heatmap MSE over the validation maps, as fit_okdhp scores each branch (eval mode)."""
    net.eval()
    total, n = 0.0, 0
    for raw in val:
        batch = as_batch(raw)
        total += float(heatmap_mse_loss(net(batch.inputs), batch.targets)) * len(batch.inputs)
        n += len(batch.inputs)
    return total / n


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


DENSE_RUNS: dict[str, tuple[Callable[..., dict[str, Any]], str]] = {
    "dense_scratch": (_dense_scratch, "trunk + 1 branch, heatmap MSE alone"),
    "okdhp": (_dense_okdhp, "trunk + 3 branches + FAU, one optimizer; branch0 reported"),
}


def _dense_data(args: argparse.Namespace, train: Any, x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor,
                val_y: torch.Tensor, out: Path) -> tuple[Path, float]:
    """The training and test images with their class heatmaps, saved for the workers, and the
    validation MSE of predicting all-zero maps (what a network learns first: 98% of the pixels are 0)."""
    k = train.num_classes
    maps = class_heatmaps(train.denormalize(x), y, k, sigma=DENSE_SIGMA, size=DENSE_MAPS)
    val_maps = class_heatmaps(train.denormalize(val_x), val_y, k, sigma=DENSE_SIGMA, size=DENSE_MAPS)
    path = out / "dense.pt"
    torch.save((x, maps, val_x, val_maps), path)
    return path, float(heatmap_mse_loss(torch.zeros_like(val_maps), val_maps))


def _dense_job(job: dict[str, Any]) -> dict[str, Any]:
    """One dense run (dense_scratch or okdhp, one seed) in a worker process with one thread."""
    torch.set_num_threads(1)
    name, seed, a = job["name"], job["seed"], job["args"]
    x, maps, val_x, val_maps = torch.load(job["data"])
    # no augmentation: the maps were computed from the un-augmented images
    train = InMemoryLoader(x, maps, a["batch_size"], seed=seed)
    val = InMemoryLoader(val_x, val_maps, 1000, shuffle=False)
    run_dir = Path(job["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    t0, cpu0 = time.perf_counter(), _cpu_s()
    try:
        with redirect_stdout(io.StringIO()):
            res = DENSE_RUNS[name][0](train, val, seed, a["epochs"], run_dir)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return {"name": name, "seed": seed, "error": f"{type(e).__name__}: {e}"}
    res.update(name=name, seed=seed, time_s=time.perf_counter() - t0, cpu_s=_cpu_s() - cpu0)
    (run_dir / "summary.json").write_text(json.dumps(res))
    return res


def _run_dense(args: argparse.Namespace, data: Path, out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    jobs = [{"name": n, "seed": s, "args": vars(args), "data": str(data),
             "run_dir": str(out / "runs" / f"{n}-seed{s}")} for n in DENSE_RUNS for s in range(args.seeds)]
    jobs.sort(key=lambda j: j["name"] != "okdhp")  # the longer runs first
    done, failed = [], []
    for res in run_pool(_dense_job, jobs, args.workers):
        if "error" in res:
            failed.append(res)
            print(f"{res['name']} seed {res['seed']}: FAILED: {res['error']}", flush=True)
            continue
        done.append(res)
        print(f"{res['name']} seed {res['seed']}: val MSE {res['last']:.3e} ({res['time_s']:.0f} s)", flush=True)
    done.sort(key=lambda r: (list(DENSE_RUNS).index(r["name"]), r["seed"]))
    return done, failed


def _dense_report(args: argparse.Namespace, runs: list[dict[str, Any]], zero_mse: float) -> None:
    """The dense table: mean ± std over seeds of the last- and best-epoch validation MSE (x1e-3), with
    the MSE of all-zero maps, and which rows lie beyond the seed spread from dense_scratch."""
    def stat(values: list[float]) -> str:
        st = Stat.of([1e3 * v for v in values])
        return f"{st.mean:.3f}" + (f" ± {st.std:.3f}" if st.n > 1 else "")

    by = {n: [r for r in runs if r["name"] == n] for n in DENSE_RUNS}
    print(f"Dense ({', '.join(DENSE)}): the first {args.train_subset} training images with class heatmaps as targets "
          f"instead of labels: {DENSE_MAPS[0]}x{DENSE_MAPS[1]} maps, one per class, zero but the label's, which holds "
          f"a Gaussian (sigma {DENSE_SIGMA:g} map pixel) at the image's ink centre, computed once from the "
          f"un-augmented images (no crop); {STUDENT} cut after {DENSE_CUT['split']} (the shared trunk), the rest up "
          f"to {DENSE_CUT['until']} one branch, then a transposed convolution to the maps; Adam lr "
          f"{DENSE_FIT['lr']:g} cosine, weight decay {DENSE_FIT['weight_decay']:g}, batch {args.batch_size}, "
          f"{args.epochs} epochs, {args.seeds} seeds. MSE: half the mean squared error over every pixel of the maps "
          f"of the first {args.val_subset} test images (the pose code's JointsMSELoss), x1e-3, lower is better.\n")
    print("| model | trains | seeds | MSE last | MSE best | Δ last vs dense_scratch | trained params | "
          "delivered params | time (s) |")
    print("| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = Stat.of([1e3 * r["last"] for r in by["dense_scratch"]])
    okdhp = by["okdhp"]
    rows = [(n if n == "dense_scratch" else f"{n} branch0", DENSE_RUNS[n][1], rs, "last", "best", "delivered_params")
            for n, rs in by.items()]
    rows.append(("okdhp ensemble", "the FAU-weighted sum of okdhp's branches (training-time only)", okdhp,
                 "ensemble", None, "trained_params"))
    verdicts, below_zero = [], []
    for label, trains, rs, last, best, delivered in rows:
        if not rs:
            continue
        st = Stat.of([1e3 * r[last] for r in rs])
        below_zero.append(f"{label} ({st.mean - 1e3 * zero_mse:+.3f})")
        delta = "(baseline)"
        if label != "dense_scratch" and base.n:
            d, spread = st.mean - base.mean, (st.std ** 2 + base.std ** 2) ** 0.5
            delta = f"{d:+.3f}"
            verdict = "lower than" if d < -spread else "higher than" if d > spread else "within one std of"
            verdicts.append(f"- {label}: {verdict} dense_scratch ({d:+.3f}, {100 * d / base.mean:+.1f}%; their "
                            f"combined std {spread:.3f})")
        print(f"| {label} | {trains} | {len(rs)} | {stat([r[last] for r in rs])} | "
              f"{stat([r[best] for r in rs]) if best else ''} | {delta} | {rs[0]['trained_params']:,} | "
              f"{rs[0][delivered]:,} | {Stat.of([r['time_s'] for r in rs]).mean:.1f} |")
    print(f"| all-zero maps | nothing (the trivial prediction) | | {1e3 * zero_mse:.3f} | | "
          + (f"{1e3 * zero_mse - base.mean:+.3f}" if base.n else "") + " | 0 | 0 | |")
    print("\n" + "\n".join(verdicts) if verdicts else "")
    print(f"- mean last MSE vs all-zero maps (negative: better than predicting nothing): {', '.join(below_zero)}")
    if okdhp:
        rampup = "/".join(str(v) for v in sorted({r["rampup"] for r in okdhp}))
        print(f"- okdhp: the reference code's 3 branches, kd_weight 5, ens_weight 6 and pixel-wise KL; the KL's "
              f"ramp-up over {rampup} epoch(s), the reference's 60 of 140 scaled to this run (forced by the short "
              "protocol). dense_scratch starts from okdhp's trunk + branch0 weights at the same seed.")
    print()


# --------------------------------------------------------------------------------------------
# The teacher, the jobs and the report
# --------------------------------------------------------------------------------------------


def _teacher(args: argparse.Namespace, train: Any, val: InMemoryLoader, out: Path) -> tuple[nn.Module, float]:
    """The benchmark teacher and its accuracy: reused from ``out`` when it was trained with these settings,
    else trained (keeping a checkpoint per epoch in ``out/teacher/footsteps`` for Pro-KD)."""
    settings = {"data": args.data, "model": TEACHER, "epochs": args.teacher_epochs, "batch_size": args.batch_size,
                "subset": min(args.teacher_subset, len(train)), "fit": {k: str(v) for k, v in FIT_ARGS.items()}}
    meta, weights, footsteps = out / "teacher.json", out / "teacher.pt", out / "teacher" / "footsteps"
    if meta.is_file() and weights.is_file() and any(footsteps.glob("*.pt")):
        saved = json.loads(meta.read_text())
        if saved.get("settings") == settings:
            teacher = create(TEACHER)
            teacher.load_state_dict(torch.load(weights))
            print(f"teacher {saved['acc']:.2f}% (reused from {weights})", flush=True)
            return teacher, saved["acc"]
    shutil.rmtree(footsteps, ignore_errors=True)
    t0 = time.perf_counter()
    teacher, acc = train_teacher(TEACHER, train.inputs[: args.teacher_subset], train.targets[: args.teacher_subset],
                                 val, epochs=args.teacher_epochs, batch_size=args.batch_size, run_dir=out / "teacher",
                                 fit_args=FIT_ARGS, footsteps=footsteps)
    torch.save(teacher.state_dict(), weights)
    meta.write_text(json.dumps({"settings": settings, "acc": acc}))
    print(f"teacher {acc:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
    return teacher, acc


QUICK = {"seeds": 1, "epochs": 2, "teacher_epochs": 2, "teacher_subset": 5000, "train_subset": 1000, "labeled": 300,
         "val_subset": 1000, "out": "runs/strategies-quick"}
DEFAULTS = {"seeds": 3, "epochs": 4, "teacher_epochs": 3, "teacher_subset": 30000, "train_subset": 3000,
            "labeled": 1000, "val_subset": 4000, "out": "runs/strategies"}


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    ap.add_argument("--seeds", type=int, help="seeds per strategy (3; --quick: 1)")
    ap.add_argument("--epochs", type=int, help="epochs of every trained model (4; --quick: 2)")
    ap.add_argument("--teacher-epochs", type=int, help="(3; --quick: 2)")
    ap.add_argument("--teacher-subset", type=int, help="training images the teacher sees (30000; --quick: 5000)")
    ap.add_argument("--train-subset", type=int, help="training images the students see (3000; --quick: 1000)")
    ap.add_argument("--labeled", type=int, help="of those, the labeled ones for semi-supervised strategies "
                                                "(1000; --quick: 300); the rest are given unlabeled")
    ap.add_argument("--val-subset", type=int, help="test images evaluated each epoch (4000; --quick: 1000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--strategies", nargs="+", default=None, help="registered strategy names (default: all)")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each")
    ap.add_argument("--out", help="run folders (runs/strategies; --quick: runs/strategies-quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small subsets, 1 seed, 2 epochs")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and args.write_docs:
        ap.error("--quick is a smoke run: its numbers do not go into the docs (drop --write-docs)")
    for key in ("seeds", "epochs", "teacher_epochs", "teacher_subset", "train_subset", "val_subset", "workers"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.batch_size < 4:
        ap.error(f"--batch-size must be >= 4 (DLB halves it, mean teacher takes a quarter labeled), got {args.batch_size}")
    if not 0 < args.labeled < args.train_subset:
        ap.error(f"--labeled must lie in [1, {args.train_subset - 1}] (some training images must stay unlabeled), "
                 f"got {args.labeled}")
    known = {i.name for i in list_strategies()}
    for name in args.strategies or []:
        if name not in known:
            try:
                strategy_info(name)
            except KeyError as e:
                ap.error(e.args[0])
    return args


def _cite(name: str) -> str:
    p = strategy_info(name).paper
    return f"{p.venue + ' ' if p.venue else ''}{p.year}" + (f", arXiv {p.arxiv}" if p.arxiv else "")


def _verdicts(rows: list[Any], baseline: str) -> str:
    """Which rows beat ``baseline``'s mean last top-1 by more than their combined std over seeds, which fall
    below it by as much, and which are within it (with one seed every difference counts)."""
    base = next((r for r in rows if r.group == baseline), None)
    if base is None or base.last_acc.mean is None:
        return f"(no {baseline} runs to compare with)"
    found: dict[str, list[str]] = {"better than": [], "worse than": [], "within one std of": []}
    for r in rows:
        if r.group == baseline or r.last_acc.mean is None:
            continue
        delta = r.last_acc.mean - base.last_acc.mean
        spread = (r.last_acc.std ** 2 + base.last_acc.std ** 2) ** 0.5
        key = "better than" if delta > spread else "worse than" if delta < -spread else "within one std of"
        found[key].append(f"{r.group} ({delta:+.2f})")
    return "\n".join(f"- {k} {baseline}: {', '.join(v) if v else 'none'}" for k, v in found.items())


def _extras_line(name: str, runs: list[Any]) -> str | None:
    keys = list(dict.fromkeys(k for r in runs for k in r.summary.get("extras", {})))
    if not keys:
        return None
    parts = []
    for k in keys:
        s = Stat.of([r.summary["extras"][k] for r in runs if k in r.summary.get("extras", {})])
        digits = 0 if "images" in k else 2
        parts.append(f"{k} {s.mean:.{digits}f}" + (f" ± {s.std:.{digits}f}" if s.n > 1 else ""))
    return f"- {name}: " + "; ".join(parts)


def main() -> None:
    args = _parse()
    torch.set_num_threads(max(1, args.workers))
    t_start = time.perf_counter()
    registered = [i.name for i in list_strategies()]
    chosen = args.strategies or registered
    skipped = {n: SKIP[n] for n in chosen if n in SKIP}
    skipped.update({n: "no benchmark protocol for it in benchmarks/strategies.py (PROTOCOLS) yet"
                    for n in chosen if n not in SKIP and n not in PROTOCOLS and n not in DENSE})
    dense = [n for n in chosen if n not in skipped and n in DENSE]
    names = [n for n in chosen if n not in skipped and n not in DENSE]
    semi = {n for n in names if is_semi_supervised(n)}
    baselines = ["scratch"] + (["scratch_labeled"] if semi else [])
    for n, reason in skipped.items():
        print(f"{n}: not run: {reason}", flush=True)

    train, x, y, val_x, val_y = load_subsets(args.data, args.train_subset, args.val_subset)
    out = Path(args.out) / args.data
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Any] = []
    failed: list[dict[str, Any]] = []
    teacher_acc = None
    if names:  # the classification part; the dense one needs neither the teacher nor these baselines
        val = InMemoryLoader(val_x, val_y, 1000, shuffle=False)
        teacher, teacher_acc = _teacher(args, train, val, out)
        teacher.eval()
        with torch.no_grad():
            teacher_logits = torch.cat([teacher(b) for b in val_x.split(1000)])
        torch.save((x, y, val_x, val_y, teacher_logits), out / "data.pt")

        order = {n: i for i, n in enumerate(baselines + names)}
        cost = {n: (BASELINES.get(n) or PROTOCOLS[n]).cost for n in order}
        jobs = [{"name": n, "seed": s, "args": vars(args), "semi": n in semi or n == "scratch_labeled",
                 "teacher": str(out / "teacher.pt"), "footsteps": str(out / "teacher" / "footsteps"),
                 "data": str(out / "data.pt"), "teacher_acc": teacher_acc,
                 "run_dir": str(out / "runs" / f"{n}-seed{s}")}
                for n in order for s in range(args.seeds)]
        jobs.sort(key=lambda j: -cost[j["name"]])  # the longest runs first, so no worker idles at the end
        for res in run_pool(_job, jobs, args.workers):
            if "error" in res:
                failed.append(res)
                print(f"{res['name']} seed {res['seed']}: FAILED: {res['error']}", flush=True)
                continue
            runs.append(read_run(out / "runs" / f"{res['name']}-seed{res['seed']}"))
            print(f"{res['name']} seed {res['seed']}: {res['last_acc']:.2f}% ({res['time_s']:.0f} s)", flush=True)
        runs.sort(key=lambda r: (order[r.name], r.summary["seed"]))
    dense_runs: list[dict[str, Any]] = []
    zero_mse = None
    if dense:
        data, zero_mse = _dense_data(args, train, x, y, val_x, val_y, out)
        dense_runs, dense_failed = _run_dense(args, data, out)
        failed += dense_failed

    buf = io.StringIO()
    with redirect_stdout(buf):
        _report(args, runs, failed, skipped, semi, teacher_acc, len(train), time.perf_counter() - t_start,
                dense_runs, zero_mse)
    print(buf.getvalue())
    if args.write_docs:
        # the dense part alone goes into a section of its own, so the full run's stays as it is
        write_section(f"strategies-{args.data}" if names else f"strategies-okdhp-{args.data}", buf.getvalue())


def _report(args: argparse.Namespace, runs: list[Any], failed: list[dict[str, Any]], skipped: dict[str, str],
            semi: set[str], teacher_acc: float | None, n_train: int, total_s: float,
            dense_runs: list[dict[str, Any]] | None = None, zero_mse: float | None = None) -> None:
    dense_runs = dense_runs or []
    unlabeled = args.train_subset - args.labeled
    cpu_s = sum(r.summary.get("cpu_s", 0.0) for r in runs) + sum(r["cpu_s"] for r in dense_runs)
    if teacher_acc is None:  # the dense part alone
        print(f"{args.data}: the dense part alone; {args.workers} runs in parallel, one thread each; total "
              f"{total_s:.0f} s, the runs' CPU time {cpu_s:.0f} s" + (" (--quick smoke run)" if args.quick else "")
              + "\n")
    else:
        print(f"{args.data}: teacher {TEACHER} {teacher_acc:.2f}% ({args.teacher_epochs} epochs on "
              f"{min(args.teacher_subset, n_train)} training images); student {STUDENT}, {args.epochs} epochs per "
              f"trained model on the first {args.train_subset} training images, SGD lr 0.05 cosine, batch "
              f"{args.batch_size}, crop 2; {args.seeds} seeds; evaluated on the first {args.val_subset} test images; "
              f"{args.workers} runs in parallel, one thread each; total {total_s:.0f} s, the runs' CPU time "
              f"{cpu_s:.0f} s" + (" (--quick smoke run)" if args.quick else ""))
        print("\nacc last / best: the strategy's reported model (its last and best epoch); agreement and KL: that "
              "model as delivered against the benchmark teacher, also for strategies that have no teacher.")
        sup = [r for r in runs if not r.summary.get("semi_supervised")]
        print(f"\nFully supervised ({args.train_subset} labeled images):\n")
        sup_rows = aggregate(sup)
        print(table_markdown(sup_rows, baseline="scratch"))
        print(_verdicts(sup_rows, "scratch") + "\n")
        semi_runs = [r for r in runs if r.summary.get("semi_supervised")]
        if semi_runs:
            print(f"Semi-supervised ({args.labeled} labeled + {unlabeled} unlabeled images; scratch_labeled: the "
                  f"student on the {args.labeled} labeled images alone):\n")
            semi_rows = aggregate(semi_runs)
            print(table_markdown(semi_rows, baseline="scratch_labeled"))
            print(_verdicts(semi_rows, "scratch_labeled") + "\n")
    if zero_mse is not None:
        _dense_report(args, dense_runs, zero_mse)
    if runs:
        rows = aggregate(runs)
        print("What each run trains (per seed) and delivers:\n")
        print("| strategy | family | paper | trained per seed | delivered params |")
        print("| :--- | :--- | :--- | :--- | ---: |")
        for row in rows:
            proto = BASELINES.get(row.group) or PROTOCOLS[row.group]
            family = "baseline" if row.group in BASELINES else strategy_info(row.group).family
            paper = "" if row.group in BASELINES else _cite(row.group)
            print(f"| {row.group} | {family} | {paper} | {proto.trains} | {row.runs[0].summary['params']:,} |")
        lines = [line for row in rows if (line := _extras_line(row.group, row.runs))]
        if lines:
            print("\nOther numbers (mean ± std over seeds; top-1 % on the test images unless named otherwise):")
            print("\n".join(lines))
    for n, reason in skipped.items():
        print(f"\n{n}: not run: {reason}")
    for f in failed:
        print(f"\n{f['name']} seed {f['seed']} failed: {f['error']}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CODISTILL_WORKER:
        _codistillation_worker(sys.argv[2])
    else:
        main()
