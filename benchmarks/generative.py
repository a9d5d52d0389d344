"""Generative distillation benchmarks (issue 16): runs every part script and collects one report.

The parts, each a script beside this one with a ``--quick`` smoke mode and a real mode, each
printing its own table (per row the student with and without the method; FID/KID with the
named extractor trained here, PSNR, sampling steps, time ratio student / teacher):

* ``generative_diffusion.py``: guided-diffusion distillation (Meng et al. 2023) and progressive
  distillation on a small DDPM;
* ``generative_stylegan.py``: StyleKD (Xu et al. 2022) and Self-Distilled StyleGAN (Mokady et al. 2022);
* ``generative_img2img.py``: StyleGAN2 distillation for image manipulation (Viazovetskyi et al. 2020)
  and wavelet KD (Zhang et al. 2022);
* ``generative_lightfield.py``: R2L, NeRF to neural light field (Wang et al. 2022);
* ``generative_darkgan.py``: DarkGAN (Nistal et al. 2021).

Each part runs in its own process with this Python (``sys.executable``), ``--quick`` and
``--seeds N`` passed on when given here, ``src/`` on ``PYTHONPATH``; its standard output is kept.
The report has a summary table (part, status, wall time, the exact command) and then each part's
output: its markdown table lines (``| ... |``) as they are when it printed any, else its whole
output in a fenced block. A missing script, a failure (its exit status and the end of its error
output) or a timeout is reported in its place: one part never stops the others.

    python benchmarks/generative.py [--quick] [--seeds 3] [--parts darkgan stylegan ...]
        [--timeout SECONDS] [--out report.md] [--dir benchmarks]

The report goes to standard output, and to ``--out`` when given. Exit status 0 when every part
that was asked for ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS: tuple[str, ...] = ("diffusion", "stylegan", "img2img", "lightfield", "darkgan")
TITLES = {
    "diffusion": "Guided diffusion / progressive distillation (Meng et al. 2023; Salimans & Ho 2022)",
    "stylegan": "StyleKD (Xu et al. 2022) and Self-Distilled StyleGAN (Mokady et al. 2022)",
    "img2img": "StyleGAN2 distillation for image manipulation (Viazovetskyi et al. 2020), wavelet KD (Zhang et al. 2022)",
    "lightfield": "R2L: NeRF to neural light field (Wang et al. 2022)",
    "darkgan": "DarkGAN (Nistal et al. 2021)",
}
_TAIL = 2000  # characters of a failed part's error output kept in the report


@dataclass
class PartResult:
    """What one part script did: ``status`` is "ok", "missing", "failed (exit N)" or "timed out"."""

    name: str
    script: Path
    command: list[str]
    status: str
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def script_of(name: str, folder: Path) -> Path:
    """The part script of ``name``: ``folder/generative_<name>.py``."""
    return folder / f"generative_{name}.py"


def part_command(script: Path, *, quick: bool, seeds: int | None, extra: list[str] | None = None) -> list[str]:
    """The command that runs one part: this Python, the script, ``--quick``, ``--seeds N``, ``extra``."""
    cmd = [sys.executable, str(script)]
    if quick:
        cmd.append("--quick")
    if seeds is not None:
        cmd += ["--seeds", str(seeds)]
    return cmd + list(extra or [])


def run_part(name: str, folder: Path, *, quick: bool, seeds: int | None, timeout: float | None = None,
             extra: list[str] | None = None) -> PartResult:
    """Run one part script in a child process and keep its output; never raises for the part's faults."""
    script = script_of(name, folder)
    cmd = part_command(script, quick=quick, seeds=seeds, extra=extra)
    if not script.is_file():
        return PartResult(name, script, cmd, "missing")
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return PartResult(name, script, cmd, "timed out", time.perf_counter() - t0, out, err)
    seconds = time.perf_counter() - t0
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    return PartResult(name, script, cmd, status, seconds, proc.stdout, proc.stderr)


def table_lines(text: str) -> list[str]:
    """The markdown table lines of a part's output (stripped lines that start and end with ``|``)."""
    return [s for s in (line.strip() for line in text.splitlines()) if len(s) > 1 and s[0] == "|" and s[-1] == "|"]


def _shown(cmd: list[str]) -> str:
    """A command as a reader would type it from the repository root."""
    return " ".join(shlex.quote(p) for p in ["python", _rel(cmd[1]), *cmd[2:]])


def _rel(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies inside it, else as it is."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def report(results: list[PartResult], *, quick: bool, seeds: int | None) -> str:
    """One markdown report: a summary table, then each part's tables (or output, or what went wrong)."""
    mode = "quick (smoke run: its numbers mean nothing)" if quick else "real"
    lines = ["# Generative distillation benchmarks", "",
             (f"Mode: {mode}; seeds: {seeds if seeds is not None else 'each part default'}; "
              f"python: {sys.version.split()[0]}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."), "",
             "| part | status | wall (s) | command |", "|---|---|---|---|"]
    for r in results:
        wall = f"{r.seconds:.1f}" if r.status != "missing" else "-"
        lines.append(f"| {r.name} | {r.status} | {wall} | `{_shown(r.command)}` |")
    for r in results:
        lines += ["", f"## {TITLES.get(r.name, r.name)}", "", f"`{_shown(r.command)}`", ""]
        if r.status == "missing":
            lines.append(f"Not run: {_rel(r.script)} does not exist.")
            continue
        if not r.ok:
            lines.append(f"**{r.status}** after {r.seconds:.1f} s. End of its error output:")
            lines += ["", "```text", (r.stderr or r.stdout)[-_TAIL:].rstrip() or "(nothing)", "```"]
            if not table_lines(r.stdout):
                continue
            lines += ["", "What it printed before:", ""]
        tables = table_lines(r.stdout)
        if tables:
            # keep the text between tables as the part printed it, minus blank runs
            lines += _with_tables(r.stdout)
        else:
            lines += ["```text", r.stdout.rstrip() or "(no output)", "```"]
    return "\n".join(lines).rstrip() + "\n"


def _with_tables(text: str) -> list[str]:
    """A part's output with its table lines kept as markdown and every other line kept as text; a blank
    line between a table and text so that markdown renders the table."""
    out: list[str] = []
    prev_table: bool | None = None
    for raw in text.rstrip().splitlines():
        s = raw.strip()
        is_table = len(s) > 1 and s[0] == "|" and s[-1] == "|"
        if not s:
            if out and out[-1] != "":
                out.append("")
            prev_table = None
            continue
        if prev_table is not None and prev_table != is_table and out and out[-1] != "":
            out.append("")
        out.append(s if is_table else raw.rstrip())
        prev_table = is_table
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each part's smoke mode (< 2 min each)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per row, passed on to every part")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), metavar="PART",
                    help=f"which parts to run (default all: {' '.join(PARTS)})")
    ap.add_argument("--timeout", type=float, default=None, help="seconds one part may run (default no limit)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    ap.add_argument("--dir", type=Path, default=HERE, help="folder of the part scripts (default: this one)")
    args = ap.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds must be a positive int; got {args.seeds}")
    if args.timeout is not None and args.timeout <= 0:
        ap.error(f"--timeout must be positive; got {args.timeout}")
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; expected some of {list(PARTS)}")
    results = []
    for name in args.parts:
        print(f"[generative] {name}: running {script_of(name, args.dir).name} ...", file=sys.stderr, flush=True)
        r = run_part(name, args.dir, quick=args.quick, seeds=args.seeds, timeout=args.timeout)
        print(f"[generative] {name}: {r.status} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
        results.append(r)
    text = report(results, quick=args.quick, seeds=args.seeds)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
