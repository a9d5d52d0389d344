"""Checks that need a CUDA GPU (the CI machines have none): short runs, not measurements.

1. every registered method takes training steps on the GPU (the accuracy benchmark's loss
   settings, ``cnn_student_mnist`` <- ``cnn_teacher_mnist`` on random 28x28 inputs): the loss stays
   finite and the student's and the method's parameters stay on the GPU;
2. one step's gradients on the GPU equal the CPU's, and a short fit ends at the same loss (MLP on
   digits, float32);
3. mixed precision (``amp="bf16"`` and ``"fp16"``) trains KD on the GPU with finite losses;
4. a teacher cache built on the GPU trains the student as the live teacher does;
5. every registered strategy runs from its recipe (the recipes of tests/test_strategy_recipes.py)
   with ``train.device: cuda``.

    python benchmarks/cuda_check.py [--out DIR] [--only methods,parity,amp,cache,strategies]

Prints one line per check and a summary; exits 1 when a check failed, 0 without CUDA (nothing to check).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import distill
from distill.data import get_dataset
from distill.data.loader import InMemoryLoader
from distill.models import create

CHECKS = ("methods", "parity", "amp", "cache", "strategies")
# terms that need their strategy's model or batches (a RocketNet, rotation batches, auxiliary heads):
# the strategies check runs them
STRATEGY_TERMS = {"hsakd", "rocket_booster_ce", "rocket_hint", "sla"}
QUIET = {"progress": False}


def _digits(n: int = 256) -> tuple[torch.Tensor, ...]:
    tr, va = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    return tr.inputs[:n], tr.targets[:n], va.inputs[:128], va.targets[:128]


def _on_cuda(module: torch.nn.Module) -> bool:
    return all(t.is_cuda for t in [*module.parameters(), *module.buffers()] if t.numel())


def check_methods(out: Path) -> list[tuple[str, bool, str]]:
    from accuracy import SKIP, _losses

    from distill.methods import list_methods

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g)
    teacher = create("cnn_teacher_mnist").eval()
    rows = []
    for info in list_methods():
        if info.name in SKIP or info.name in STRATEGY_TERMS:
            continue
        try:
            torch.manual_seed(0)
            d = distill.Distiller(create("cnn_student_mnist"), teacher, _losses(info.name, len(x)))
            loader = InMemoryLoader(x, y, 32, seed=0, return_index=True, device="cuda")
            with redirect_stdout(io.StringIO()):
                r = distill.fit(d, loader, InMemoryLoader(x[:32], y[:32], 32, shuffle=False, device="cuda"),
                                epochs=1, lr=0.01, device="cuda", **QUIET)
            loss = r.history[-1]["train_loss"]
            ok = torch.isfinite(torch.tensor(loss)).item() and _on_cuda(d.student) and _on_cuda(d.methods)
            rows.append((f"method {info.name}", bool(ok), f"loss {loss:.4g}"))
        except Exception as e:  # noqa: BLE001 - every method is reported
            rows.append((f"method {info.name}", False, f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


def _mlp_fit(device: str) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """One step's gradients from the initial weights, then a 2-epoch fit's weights and last loss."""
    x, y, xv, yv = _digits()
    torch.manual_seed(0)
    d = distill.Distiller(create("mlp_digits_student"), None, {"ce": 1.0}).to(device)
    d.prepare(distill.batch.Batch(x[:32].to(device), y[:32].to(device)))
    d(distill.batch.Batch(x[:32].to(device), y[:32].to(device))).total.backward()
    grads = [p.grad.detach().cpu().clone() for p in d.student.parameters()]
    d.student.zero_grad(set_to_none=True)
    r = distill.fit(d, InMemoryLoader(x, y, 32, seed=1), InMemoryLoader(xv, yv, 128, shuffle=False), epochs=2,
                    lr=0.05, momentum=0.9, schedule="constant", device=device, seed=0, **QUIET)
    return grads, [p.detach().cpu() for p in d.student.parameters()], r.history[-1]["train_loss"]


def check_parity(out: Path) -> list[tuple[str, bool, str]]:
    cpu_g, cpu_w, cpu_loss = _mlp_fit("cpu")
    gpu_g, gpu_w, gpu_loss = _mlp_fit("cuda")
    g_diff = max(float((a - b).abs().max()) for a, b in zip(cpu_g, gpu_g))
    w_diff = max(float((a - b).abs().max()) for a, b in zip(cpu_w, gpu_w))
    # float32 sums in another order drift apart over 16 momentum steps; the loss must still agree
    return [("one step's gradients cpu == cuda (MLP, fp32)", g_diff < 1e-5, f"max |Δg| {g_diff:.2e}"),
            ("2-epoch fit cpu ~ cuda (MLP, fp32)", abs(cpu_loss - gpu_loss) < 1e-2 * abs(cpu_loss),
             f"loss {cpu_loss:.5f} vs {gpu_loss:.5f}, max |Δw| {w_diff:.2e}")]


def check_amp(out: Path) -> list[tuple[str, bool, str]]:
    x, y, xv, yv = _digits()
    torch.manual_seed(0)
    teacher = create("cnn_digits_teacher").eval()
    rows = []
    for amp in ("bf16", "fp16"):
        torch.manual_seed(0)
        d = distill.Distiller(create("cnn_digits_student"), teacher, {"ce": 1.0, "kd": {"T": 4.0}})
        r = distill.fit(d, InMemoryLoader(x, y, 32, seed=1), InMemoryLoader(xv, yv, 128, shuffle=False), epochs=2,
                        lr=0.05, amp=amp, device="cuda", **QUIET)
        losses = [h["train_loss"] for h in r.history]
        ok = all(torch.isfinite(torch.tensor(losses)).tolist()) and r.last_acc is not None
        rows.append((f"amp {amp}", bool(ok), f"losses {[round(v, 4) for v in losses]}, val acc {r.last_acc}"))
    return rows


def check_cache(out: Path) -> list[tuple[str, bool, str]]:
    from distill.cache import CachedTeacher, build_cache

    x, y, _, _ = _digits()
    torch.manual_seed(0)
    teacher = create("cnn_digits_teacher").eval().cuda()
    results = {}
    for kind in ("live", "cached"):
        loader = InMemoryLoader(x, y, 32, seed=1, return_index=True)
        source: object = teacher
        if kind == "cached":
            path = out / "cache"
            build_cache(teacher, x, path, targets=y, dtype="fp16", device="cuda")
            source = CachedTeacher(path, teacher=teacher)
            source.prepare_loader(loader)
        torch.manual_seed(0)
        d = distill.Distiller(create("mlp_digits_student"), source, {"ce": 1.0, "kd": {"T": 4.0}})
        r = distill.fit(d, loader, None, epochs=2, lr=0.05, schedule="constant", device="cuda", seed=0, **QUIET)
        results[kind] = ([p.detach().cpu() for p in d.student.parameters()], r.history[-1]["train_loss"])
    diff = max(float((a - b).abs().max()) for a, b in zip(results["live"][0], results["cached"][0]))
    return [("cached teacher == live teacher on cuda (dense fp16 cache)", diff < 1e-2,
             f"max |Δw| {diff:.2e}, loss {results['live'][1]:.5f} vs {results['cached'][1]:.5f}")]


def check_strategies(out: Path) -> list[tuple[str, bool, str]]:
    from distill.recipes import parse_recipe
    from distill.runner import run_recipe

    spec = importlib.util.spec_from_file_location("strategy_recipes", HERE.parent / "tests" / "test_strategy_recipes.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    rows = []
    for name in module.RUNNABLE:
        recipe = module._recipe(name)
        recipe["train"]["device"] = "cuda"
        try:
            t0 = time.perf_counter()
            with redirect_stdout(io.StringIO()):
                dirs = run_recipe(parse_recipe(recipe), out_dir=out / "strategies", progress=False)
            summary = (dirs[0] / "summary.json").read_text()
            rows.append((f"strategy {name}", '"last_acc"' in summary, f"{time.perf_counter() - t0:.1f} s"))
        except Exception as e:  # noqa: BLE001
            rows.append((f"strategy {name}", False, f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


RUNNERS: dict[str, Callable[[Path], list[tuple[str, bool, str]]]] = {
    "methods": check_methods, "parity": check_parity, "amp": check_amp, "cache": check_cache,
    "strategies": check_strategies}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {CHECKS}")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, distill {distill.__version__}")
    out = args.out or Path(tempfile.mkdtemp(prefix="distill_cuda_check_"))
    failed = 0
    for check in only:
        t0 = time.perf_counter()
        try:
            rows = RUNNERS[check](out / check)
        except Exception:  # noqa: BLE001 - a broken check is a failure, with its traceback
            rows = [(check, False, traceback.format_exc(limit=3))]
        for what, ok, detail in rows:
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}", flush=True)
        print(f"[{check}: {sum(ok for _, ok, _ in rows)}/{len(rows)} passed, {time.perf_counter() - t0:.0f} s]",
              flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
