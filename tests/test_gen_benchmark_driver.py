"""benchmarks/generative.py: runs fake part scripts in a tmp folder, passes --quick/--seeds on, collects their
tables into one markdown report, and reports a missing, failing or hanging part instead of crashing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "generative.py"


def _driver():
    spec = importlib.util.spec_from_file_location("bench_generative_driver", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


_TABLE_PART = textwrap.dedent("""
    import sys
    print("some preamble")
    print("| row | FID | args |")
    print("|---|---|---|")
    print("| {name} | 12.5 | " + " ".join(sys.argv[1:]) + " |")
    print("python benchmarks/generative_{name}.py done")
""")


def _write(folder: Path, name: str, body: str) -> None:
    (folder / f"generative_{name}.py").write_text(body)


def test_report_collects_tables_passes_flags_and_survives_bad_parts(tmp_path, capsys):
    g = _driver()
    _write(tmp_path, "diffusion", _TABLE_PART.format(name="diffusion"))
    _write(tmp_path, "stylegan", "print('plain text, no table')\n")
    _write(tmp_path, "img2img", "import sys\nprint('| half | table |')\nsys.stderr.write('boom: bad thing\\n')\n"
                                "sys.exit(3)\n")
    # lightfield is missing; darkgan sleeps past the timeout
    _write(tmp_path, "darkgan", "import time\ntime.sleep(30)\n")
    out = tmp_path / "sub" / "report.md"
    rc = g.main(["--quick", "--seeds", "2", "--dir", str(tmp_path), "--out", str(out), "--timeout", "5"])
    text = capsys.readouterr().out
    assert rc == 1  # not every part ran
    assert out.read_text() == text
    # the summary: one row per part, each status as it happened
    lines = text.splitlines()
    start = lines.index("| part | status | wall (s) | command |") + 2
    summary = lines[start:lines.index("", start)]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary}
    assert rows == {"diffusion": "ok", "stylegan": "ok", "img2img": "failed (exit 3)", "lightfield": "missing",
                    "darkgan": "timed out"}
    # the part's table is kept as markdown, with the flags it was given
    assert "| diffusion | 12.5 | --quick --seeds 2 |" in text.splitlines()
    assert "python benchmarks/generative_diffusion.py done" in text
    i = lines.index("| row | FID | args |")
    assert lines[i - 1] == "" and lines[i - 2] == "some preamble"  # markdown, not a fenced block
    # output without a table is kept in a fenced block; a failure keeps its error output and its partial table
    assert "```text\nplain text, no table\n```" in text
    assert "boom: bad thing" in text and "| half | table |" in text
    assert "generative_lightfield.py does not exist" in text
    # one section per part, in the order asked
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert [h[3:] for h in heads] == [g.TITLES[p] for p in g.PARTS]


def test_flags_are_passed_only_when_given_and_real_mode_is_the_default(tmp_path, capsys):
    g = _driver()
    _write(tmp_path, "darkgan", _TABLE_PART.format(name="darkgan"))
    assert g.main(["--parts", "darkgan", "--dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| darkgan | 12.5 |  |" in text.splitlines()  # no --quick, no --seeds
    assert "Mode: real" in text
    r = g.run_part("darkgan", tmp_path, quick=True, seeds=3)
    assert r.command[0] == sys.executable and r.command[2:] == ["--quick", "--seeds", "3"]


def test_bad_arguments_are_refused_before_any_part_runs(tmp_path):
    for args in (["--parts", "nerf"], ["--seeds", "0"], ["--timeout", "-1"]):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--dir", str(tmp_path)], capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 2, args
        assert args[1] in proc.stderr


def test_table_lines_keeps_only_markdown_rows():
    g = _driver()
    assert g.table_lines("a\n| x | y |\n  |---|---|  \n|not closed\n| 1 | 2 |\n") == ["| x | y |", "|---|---|",
                                                                                   "| 1 | 2 |"]
