"""Side-by-side table of fast_dfkd runs of a one-factor scan (issue 13), read from their per-epoch logs.

``benchmarks/datafree.py --log-dir DIR`` makes each run write ``DIR/fast_dfkd_s<seed>/metrics.jsonl``
(one row per epoch: test top-1 of the student, the KD loss, the lr, seconds since the run's start). This
script prints, for runs that were started together (same machine, same load), the test top-1 after
each epoch, one column per setting, and each run's last epoch reached. Runs stopped before their last
epoch are read as far as they went: compare settings at the same epoch (same cosine-schedule point when
their ``epochs`` are equal), never a stopped run's accuracy against a finished one's.

    python benchmarks/datafree_diagnosis_scan.py base=/tmp/log_base kd200=/tmp/log_kd200 [--seed 0] [--every 1]
    python benchmarks/datafree_diagnosis_scan.py --speedup /tmp/log_t2a [--seed 0] [--target 60]

``--speedup DIR`` reads one ``benchmarks/datafree.py --methods fast_dfkd dfad --workers 2 --log-dir DIR`` run,
finished or stopped (fast_dfkd's ``metrics.jsonl``; dfad's history in its checkpoint ``dfad_s<seed>/last.pt``,
written at each evaluation, read weights-only), and prints the benchmark's own time-to-accuracy comparison
(``datafree.speedup``) over the evaluations logged so far, with how far each run got.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    """The rows of one ``metrics.jsonl`` (a missing file: no rows)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(runs: dict[str, list[dict]], every: int = 1) -> str:
    """Markdown: one row per epoch (every ``every``-th and each run's last), one column per run
    (``acc (seconds)``; blank where that run had not reached the epoch)."""
    if every < 1:
        raise ValueError(f"every must be >= 1; got {every}")
    by_epoch = {name: {r["epoch"]: r for r in rows} for name, rows in runs.items()}
    lasts = {max(rows) for rows in by_epoch.values() if rows}
    epochs = sorted({e for rows in by_epoch.values() for e in rows if e % every == 0 or e in lasts})
    names = list(runs)
    lines = ["| epoch | " + " | ".join(f"{n}: top-1 % (s)" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for e in epochs:
        cells = []
        for n in names:
            r = by_epoch[n].get(e)
            cells.append("" if r is None else f"{r['val_student_acc']:.2f} ({r['time_s']:.0f})")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines.append("| last epoch reached | " + " | ".join(str(max(by_epoch[n])) if by_epoch[n] else "-" for n in names)
                 + " |")
    return "\n".join(lines)


def curves(log_dir: Path, seed: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]], str]:
    """``(fast_dfkd curve, dfad curve, how far each got)`` of one ``--log-dir``: (seconds since the run's
    start, test top-1 %) per evaluation."""
    from distill.train.checkpoint import load_checkpoint

    fast = read_log(log_dir / f"fast_dfkd_s{seed}" / "metrics.jsonl")
    ckpt = log_dir / f"dfad_s{seed}" / "last.pt"
    if not fast or not ckpt.exists():
        raise SystemExit(f"{log_dir}: expected fast_dfkd_s{seed}/metrics.jsonl and dfad_s{seed}/last.pt "
                         f"(a benchmarks/datafree.py --methods fast_dfkd dfad --log-dir run)")
    state = load_checkpoint(ckpt)
    dfad = [(float(r["time_s"]), float(r["student_acc"])) for r in state["history"] if "student_acc" in r]
    reached = (f"fast_dfkd to epoch {fast[-1]['epoch']} ({fast[-1]['time_s']:.0f} s), "
               f"dfad to iteration {state['iteration']} ({float(state['time_s']):.0f} s)")
    return [(float(r["time_s"]), float(r["val_student_acc"])) for r in fast], dfad, reached


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", metavar="LABEL=LOG_DIR", help="a --log-dir of benchmarks/datafree.py")
    p.add_argument("--speedup", type=Path, default=None, metavar="LOG_DIR",
                   help="time-to-accuracy of fast_dfkd vs dfad from one run's logs")
    p.add_argument("--target", type=float, default=None, help="with --speedup (default: dfad's best so far)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=1, help="print every n-th epoch (and each run's last)")
    a = p.parse_args()
    if a.speedup is not None:
        import datafree

        fast, dfad, reached = curves(a.speedup, a.seed)
        target, times, ratio = datafree.speedup([{"seed": a.seed, "curve": dfad}], [{"seed": a.seed, "curve": fast}],
                                                a.target)
        show = {m: "-" if v[0] is None else f"{v[0]:.0f}" for m, v in times.items()}
        print(f"{a.speedup}: {reached}\n"
              f"dfad curve: {', '.join(f'{acc:.2f} ({t:.0f} s)' for t, acc in dfad)}\n"
              f"time to {target:.2f}% ({'--target' if a.target is not None else 'dfad best so far'}; seconds since "
              f"each run's start, evaluations included): fast_dfkd {show['fast_dfkd']}, dfad {show['dfad']}\n"
              f"speed-up of fast_dfkd over dfad to that accuracy: {'-' if ratio is None else f'{ratio:.1f}x'}")
        return
    if not a.runs:
        raise SystemExit("give LABEL=LOG_DIR runs to tabulate, or --speedup LOG_DIR")
    runs = {}
    for item in a.runs:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"{item!r}: expected LABEL=LOG_DIR")
        runs[label] = read_log(Path(folder) / f"fast_dfkd_s{a.seed}" / "metrics.jsonl")
    print(table(runs, a.every))


if __name__ == "__main__":
    main()
