"""Peak memory and time of the token-level KD loss: chunked (fused with the lm_head) vs naive.

At SmolLM2's sizes (vocabulary 49,152, hidden 576) and 2,048 tokens, the loss's forward and
backward from the student's last hidden states through its ``lm_head`` (teacher logits given):

* ``chunked``: ``distill.functional.tokens.fused_linear_token_loss(hidden, W, teacher_logits, weights,
  divergence, chunk_size=...)``: the student's logits of one chunk of tokens at a time, gradients
  per chunk in the forward, so the (N, V) fp32 student logits never exist;
* ``naive``: ``logits = hidden @ W.T`` (fp32, (N, V)), then ``token_divergence(logits, teacher_logits)``
  weighted and summed, then backward;
* where installed, the same loss written with TRL (``GKDTrainer.generalized_jsd_loss`` on the
  naive logits: β = 0 is forward KL, β = 0.5 the JSD) and torchtune
  (``ForwardKLWithChunkedOutputLoss`` / ``ReverseKLWithChunkedOutputLoss`` on the logits of 8
  chunks of the hidden states, the way torchtune's KD recipe calls it).

Each variant's peak runs in a FRESH process (this script with ``--child``) so peaks do not mix:
on a GPU the peak of ``torch.cuda.max_memory_allocated`` above what the inputs hold; on the CPU the
process's peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``) above its value once the inputs
are allocated and touched. Times: the median of interleaved repetitions (every variant in turn,
``_common.time_interleaved``) in one other process, which also checks that every variant gives the
same loss and gradients. The inputs: student hidden states and ``lm_head`` weight in fp32 (trained),
teacher logits in ``--teacher-dtype`` (bf16 by default, as a bf16 teacher gives them), every token
weighted 1/N, temperature 1.

    python benchmarks/llm_memory.py [--tokens 2048] [--vocab 49152] [--hidden 576] [--chunk-size 256]
        [--divergences forward_kl jsd] [--reps 5] [--device cpu] [--threads N] [--write-docs]

Goals: peak memory chunked / naive <= 0.25 and time chunked / naive <= 1.10.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import torch

from _common import time_interleaved, write_section

HERE = Path(__file__).resolve()
PEERS = {"trl": "TRL GKDTrainer.generalized_jsd_loss", "torchtune": "torchtune *KLWithChunkedOutputLoss"}
TRL_BETA = {"forward_kl": 0.0, "jsd": 0.5, "reverse_kl": 1.0}  # TRL's β: 0 = KL(teacher || student)
TORCHTUNE = {"forward_kl": "ForwardKLWithChunkedOutputLoss", "reverse_kl": "ReverseKLWithChunkedOutputLoss"}
TORCHTUNE_CHUNKS = 8  # torchtune's default num_output_chunks


def installed(peer: str) -> bool:
    try:
        if peer == "trl":
            from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: F401
        else:
            import torchtune.modules.loss  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - absent, or present but not importable here
        return False


def supports(variant: str, divergence: str) -> bool:
    if variant == "trl":
        return divergence in TRL_BETA
    if variant == "torchtune":
        return divergence in TORCHTUNE
    return True


def make_inputs(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Seeded inputs; the teacher's logits are drawn a block of rows at a time straight into their
    dtype, so no (N, V) fp32 temporary raises the baseline's peak."""
    g = torch.Generator().manual_seed(0)
    n, v, h = args.tokens, args.vocab, args.hidden
    hidden = torch.randn(n, h, generator=g).to(device).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(device).requires_grad_(True)
    teacher = torch.empty(n, v, dtype=getattr(torch, args.teacher_dtype), device=device)
    for start in range(0, n, 128):
        rows = min(128, n - start)
        student_part = (hidden[start:start + rows].detach() @ weight.detach().T).cpu()
        teacher[start:start + rows] = (0.7 * student_part + 1.5 * torch.randn(rows, v, generator=g)).to(teacher)
    weights = torch.full((n,), 1.0 / n, device=device)
    return {"hidden": hidden, "weight": weight, "teacher": teacher, "weights": weights}


def make_loss(variant: str, divergence: str, x: dict[str, torch.Tensor], chunk_size: int):
    """A function computing the loss (forward only; the caller runs backward)."""
    from distill.functional.tokens import fused_linear_token_loss, token_divergence

    hidden, weight, teacher, weights = x["hidden"], x["weight"], x["teacher"], x["weights"]
    if variant == "chunked":
        return lambda: fused_linear_token_loss(hidden, weight, teacher, weights, divergence, chunk_size=chunk_size)
    if variant == "naive":
        return lambda: (weights * token_divergence(hidden @ weight.T, teacher, divergence)).sum()
    labels = torch.zeros(1, hidden.shape[0], dtype=torch.long, device=hidden.device)  # every token counts
    if variant == "trl":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        beta = TRL_BETA[divergence]
        return lambda: GKDTrainer.generalized_jsd_loss((hidden @ weight.T)[None], teacher[None], labels, beta=beta)
    if variant == "torchtune":
        import torchtune.modules.loss as tt

        loss_fn = getattr(tt, TORCHTUNE[divergence])(num_output_chunks=TORCHTUNE_CHUNKS)
        t_chunks = [c[None] for c in teacher.chunk(TORCHTUNE_CHUNKS, dim=0)]
        return lambda: loss_fn([(c @ weight.T)[None] for c in hidden.chunk(TORCHTUNE_CHUNKS, dim=0)], t_chunks, labels)
    raise ValueError(f"unknown variant {variant!r}")


def step(loss_fn, x: dict[str, torch.Tensor]) -> torch.Tensor:
    x["hidden"].grad = None
    x["weight"].grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach()


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child_peak(args: argparse.Namespace) -> None:
    """In a fresh process: one forward+backward of one variant; prints its peak above the inputs."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    x = make_inputs(args, device)
    loss_fn = make_loss(args.child, args.divergence, x, args.chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(loss_fn, x)
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated above the inputs"
    else:
        base = rss_bytes()
        step(loss_fn, x)
        peak, how = rss_bytes() - base, "peak RSS (getrusage ru_maxrss) above the inputs"
    print(json.dumps({"peak": peak, "how": how}))


def child_time(args: argparse.Namespace) -> None:
    """In one process: the interleaved timings of every variant, and their agreement."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    x = make_inputs(args, device)
    fns, values = {}, {}
    for variant in args.variants:
        loss_fn = make_loss(variant, args.divergence, x, args.chunk_size)
        loss = step(loss_fn, x)
        values[variant] = (float(loss), x["hidden"].grad.clone(), x["weight"].grad.clone())
        fns[variant] = lambda f=loss_fn: step(f, x)
    ref = values["naive"]
    agree = {v: (abs(val[0] - ref[0]) / abs(ref[0]),
                 max(float((val[1] - ref[1]).abs().max() / ref[1].abs().max()),
                     float((val[2] - ref[2]).abs().max() / ref[2].abs().max()))) for v, val in values.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = time_interleaved(fns, steps=1, reps=args.reps, warmup=1, sync=sync)
    print(json.dumps({"times": times, "loss": ref[0], "agree": agree}))


def run_child(args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, str(HERE), "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden",
           str(args.hidden), "--chunk-size", str(args.chunk_size), "--teacher-dtype", args.teacher_dtype,
           "--device", args.device, "--threads", str(args.threads), "--reps", str(args.reps), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--teacher-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--divergences", nargs="+", default=["forward_kl", "jsd"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-peers", action="store_true", help="leave out TRL and torchtune even when installed")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--divergence", help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "time":
        return child_time(args)
    if args.child:
        return child_peak(args)

    from distill.functional.tokens import DIVERGENCES

    bad = [d for d in args.divergences if d not in DIVERGENCES]
    if bad:
        raise SystemExit(f"--divergences: {bad} are not among {DIVERGENCES}")
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    peers = [] if args.no_peers else [peer for peer in PEERS if installed(peer)]
    buf = io.StringIO()
    with redirect_stdout(buf):
        print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {args.device}, "
              f"{args.threads} threads")
        print(f"N = {args.tokens} tokens, V = {args.vocab}, H = {args.hidden}; student hidden and lm_head fp32, "
              f"teacher logits {args.teacher_dtype}; chunked: chunk_size = {args.chunk_size}; "
              f"time: median of {args.reps} interleaved repetitions")
        print("peers: " + (", ".join(PEERS[q] for q in peers) if peers else "none installed"))
        for div in args.divergences:
            variants = ["chunked", "naive", *(q for q in peers if supports(q, div))]
            peaks, how = {}, ""
            for variant in variants:
                got = run_child(args, ["--child", variant, "--divergence", div])
                peaks[variant], how = got["peak"], got["how"]
            timed = run_child(args, ["--child", "time", "--divergence", div, "--variants", *variants])
            times = timed["times"]
            print(f"\n[{div}] peak memory: {how}; loss {timed['loss']:.6f}")
            for variant in variants:
                d_loss, d_grad = timed["agree"][variant]
                print(f"  {variant:<10} peak {peaks[variant] / 2**20:8.1f} MiB   time {times[variant]:6.2f} s   "
                      f"rel. difference from naive: loss {d_loss:.1e}, gradients {d_grad:.1e}")
            if "torchtune" in variants:
                print("  (torchtune's loss is the cross-entropy to the teacher, -sum p log q: the KL less the "
                      "teacher's entropy, a constant; its gradients are the KL's)")
            for other in variants[1:]:
                ratio = f"{peaks['chunked'] / peaks[other]:.2f}" if peaks[other] > 0 else "n/a (no peak measured)"
                print(f"[{div}] peak memory chunked / {other} = {ratio}")
                print(f"[{div}] time chunked / {other} = {times['chunked'] / times[other]:.2f}")
    output = buf.getvalue()
    print(output, end="")
    if args.write_docs:
        write_section("llm memory (issue 11)", output)


if __name__ == "__main__":
    main()
