"""Teacher generations on disk, and sequence-level knowledge-distillation targets made from them.

Sequence-level KD (Kim & Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016,
arXiv 1606.07947) trains the student with plain cross-entropy on what the *teacher* generates,
instead of (or besides) matching the teacher's per-token distributions:

- **word-level KD** (their Word-KD): cross-entropy to the teacher's distribution at each position of
  the reference: the token-level losses of :mod:`distill.methods.tokens`, not this module;
- **sequence-level KD** (Seq-KD): the student is trained on the teacher's beam-search output
  ``ŷ ≈ argmax_y q(y | s)``, an approximation of the mode of the teacher's sequence distribution;
- **sequence-level interpolation** (Seq-Inter): the student is trained on the hypothesis of the
  teacher's K-best beam list closest to the reference, ``ŷ = argmax_{y ∈ K-best} sim(y, y_ref)``,
  with ``sim`` a smoothed sentence-level BLEU: a target the teacher finds likely *and* close to the
  ground truth.

The paper combines them (Seq-KD + Seq-Inter + Word-KD was its best student): feed
:func:`sequence_kd_targets` to :func:`distill.data.text.prompt_completion` and train with ``ce``
(and a token-level method for Word-KD). Note: the search tool held the paper's abstract and
summaries; the Seq-Inter selection rule and the choice of smoothed sentence BLEU (Chen & Cherry,
WMT 2014) are stated here from the paper as we know it, not quoted from its text.

Storage (:func:`generate`, :func:`load_generations`): one JSON-lines file per run, its first line a
header with the fingerprint (the model's weights, the tokenizer, the prompts and every generation
setting), then one record per prompt. While generation runs, finished batches are appended (and
``fsync``-ed) to ``PATH.partial``; a crash keeps them and a rerun with the same fingerprint goes on
from there. The finished file is written atomically (:func:`distill.files.atomic_write_text`) and the
partial file removed, so ``PATH`` is always either absent or whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.data.text import encode_prompt
from distill.files import CorruptFileError, atomic_write_text

__all__ = [
    "FORMAT",
    "Generation",
    "Generations",
    "GenerationsMismatchError",
    "generate",
    "generation_fingerprint",
    "load_generations",
    "sentence_bleu",
    "sequence_kd_targets",
    "word_bleu",
]

FORMAT = "distill.generations/1"
_PARTS = ("model", "tokenizer", "prompts", "settings")


class GenerationsMismatchError(ValueError):
    """A generations file made by another model, tokenizer, prompt list or generation settings.

    ``parts`` names what differs (among ``"model"``, ``"tokenizer"``, ``"prompts"``, ``"settings"``).
    """

    def __init__(self, message: str, parts: list[str]) -> None:
        self.parts = parts
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.parts)


@dataclass
class Generation:
    """The teacher's answers to one prompt.

    Attributes:
        prompt: the prompt (plain text, before any chat template).
        completions: the decoded answers, best beam first (beam search), or in sampling order.
        token_ids: each answer's generated token ids, up to (not including) the first EOS.
        finished: whether each answer ended with EOS (``False``: cut at ``max_new_tokens``).
        scores: beam search's score of each answer (the length-normalised log-probability
            ``sequences_scores`` of ``transformers``), or ``None`` without beam search.
    """

    prompt: str
    completions: list[str]
    token_ids: list[list[int]]
    finished: list[bool]
    scores: list[float] | None = None

    def record(self, index: int) -> dict[str, Any]:
        return {"index": index, "prompt": self.prompt, "completions": self.completions, "token_ids": self.token_ids,
                "finished": self.finished, "scores": self.scores}


@dataclass
class Generations:
    """A generations file: its fingerprint and one :class:`Generation` per prompt, in prompt order."""

    fingerprint: dict[str, Any]
    records: list[Generation]
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    @property
    def completions(self) -> list[list[str]]:
        return [list(r.completions) for r in self.records]


# ----------------------------------------------------------------------------------- fingerprints


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def _model_part(model: nn.Module) -> dict[str, Any]:
    """sha256 over the class and the state dict (names, dtypes, shapes, raw bytes), in order."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}|".encode())
    count = 0
    dtypes: set[str] = set()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        count += t.numel()
        dtypes.add(str(t.dtype).removeprefix("torch."))
    return {"sha256": h.hexdigest(),
            "description": f"{type(model).__name__} ({count:,} state-dict values, {'/'.join(sorted(dtypes))})"}


def _tokenizer_part(tokenizer: Any, chat_template: bool) -> dict[str, Any]:
    """sha256 over the tokenizer's full definition where it has one (a fast tokenizer's JSON:
    vocabulary, merges, normalisation), else its vocabulary; its special tokens; and the chat
    template when prompts go through it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {k: str(v) for k, v in sorted(dict(getattr(tokenizer, "special_tokens_map", {}) or {}).items())}
    template = getattr(tokenizer, "chat_template", None) if chat_template else None
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    for piece in (body, json.dumps(special, sort_keys=True), json.dumps(template)):
        h.update(b"|" + piece.encode("utf-8"))
    return {"sha256": h.hexdigest(), "description": f"{type(tokenizer).__name__} ({len(tokenizer):,} tokens)"}


def _model_generation_config(model: nn.Module) -> dict[str, Any]:
    """The model's own generation defaults our settings leave in force (``length_penalty``,
    ``repetition_penalty``...), without version bookkeeping."""
    config = getattr(model, "generation_config", None)
    if config is None or not hasattr(config, "to_diff_dict"):
        return {}
    diff = dict(config.to_diff_dict())
    for key in ("transformers_version", "_from_model_config", "_commit_hash", "output_attentions",
                "output_hidden_states", "use_cache"):
        diff.pop(key, None)
    return json.loads(json.dumps(diff, sort_keys=True, default=str))


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    for e in ([eos] if isinstance(eos, int) else list(eos or [])):
        ids.add(int(e))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _settings(model: nn.Module, tokenizer: Any, *, max_new_tokens: int, num_beams: int, num_return_sequences: int,
              do_sample: bool, temperature: float, batch_size: int, seed: int, chat_template: bool) -> dict[str, Any]:
    return {
        "max_new_tokens": max_new_tokens, "num_beams": num_beams, "num_return_sequences": num_return_sequences,
        "do_sample": do_sample, "temperature": float(temperature) if do_sample else None,
        "top_k": 0 if do_sample else None, "top_p": 1.0 if do_sample else None,
        "batch_size": batch_size, "seed": seed, "chat_template": chat_template,
        "eos_token_ids": _eos_ids(model, tokenizer), "model_generation_config": _model_generation_config(model),
    }


def _check_args(prompts: Any, max_new_tokens: Any, num_beams: Any, num_return_sequences: Any, do_sample: Any,
                temperature: Any, batch_size: Any, seed: Any) -> list[str]:
    who = "generate"
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"{who} prompts must be a non-empty list of strings; got {type(prompts).__name__}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{who} prompts must be strings; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams),
                        ("num_return_sequences", num_return_sequences), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{who} {name} must be an int >= 1; got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{who} seed must be an int; got {seed!r}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"{who} do_sample must be a bool; got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"{who} temperature must be a finite number > 0; got {temperature!r}")
    if not do_sample and num_return_sequences > num_beams:
        raise ValueError(f"{who}: deterministic decoding returns at most num_beams={num_beams} sequence(s) per prompt; "
                         f"got num_return_sequences={num_return_sequences} (raise num_beams or set do_sample=True)")
    return list(prompts)


def generation_fingerprint(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                           num_beams: int = 1, num_return_sequences: int = 1, do_sample: bool = False,
                           temperature: float = 1.0, batch_size: int = 8, seed: int = 0,
                           chat_template: bool = True) -> dict[str, Any]:
    """What fixes a generations file, the same arguments as :func:`generate`:

    ``{"model": {sha256, description}, "tokenizer": {sha256, description}, "prompts": {sha256,
    count}, "settings": {...every generation setting...}, "sha256": of all of it}``. The model's part
    hashes its state dict's bytes (names, dtypes, shapes, values); the tokenizer's its full
    definition, special tokens and (when used) chat template; the settings include the batch size
    (padding changes the numbers slightly) and the model's own generation defaults.
    """
    prompts = _check_args(prompts, max_new_tokens, num_beams, num_return_sequences, do_sample, temperature,
                          batch_size, seed)
    fp: dict[str, Any] = {
        "model": _model_part(model),
        "tokenizer": _tokenizer_part(tokenizer, chat_template),
        "prompts": {"sha256": _sha(json.dumps(prompts)), "count": len(prompts)},
        "settings": _settings(model, tokenizer, max_new_tokens=max_new_tokens, num_beams=num_beams,
                              num_return_sequences=num_return_sequences, do_sample=do_sample,
                              temperature=temperature, batch_size=batch_size, seed=seed, chat_template=chat_template),
    }
    fp["sha256"] = _sha(json.dumps({k: fp[k] for k in _PARTS}, sort_keys=True))
    return fp


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str]]:
    """``(part, what differs)`` between two fingerprints."""
    out: list[tuple[str, str]] = []
    for part in ("model", "tokenizer"):
        a, b = stored.get(part, {}), current.get(part, {})
        if a.get("sha256") != b.get("sha256"):
            out.append((part, f"{part}: the file's is {a.get('description')} hashing to {str(a.get('sha256'))[:12]}…, "
                              f"this one is {b.get('description')} hashing to {str(b.get('sha256'))[:12]}…"))
    a, b = stored.get("prompts", {}), current.get("prompts", {})
    if a.get("sha256") != b.get("sha256"):
        out.append(("prompts", f"prompts: the file has {a.get('count')} prompts hashing to {str(a.get('sha256'))[:12]}…, "
                               f"these are {b.get('count')} hashing to {str(b.get('sha256'))[:12]}…"))
    a, b = stored.get("settings", {}), current.get("settings", {})
    changed = [f"{k}={a.get(k)!r} in the file, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if changed:
        out.append(("settings", "settings: " + "; ".join(changed)))
    return out


def _mismatch(where: Path, stored: dict[str, Any], current: dict[str, Any], remedy: str) -> GenerationsMismatchError:
    diffs = _differences(stored, current) or [("fingerprint", "the fingerprint (its parts agree, but not its hash: "
                                                              "the file was edited)")]
    return GenerationsMismatchError(f"generations file {str(where)!r} was made differently: "
                                    + " | ".join(d for _, d in diffs) + f". {remedy}", [p for p, _ in diffs])


# ----------------------------------------------------------------------------------- the file


def _partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _header(fingerprint: dict[str, Any]) -> str:
    return json.dumps({"format": FORMAT, "fingerprint": fingerprint}) + "\n"


def _line(record: Generation, index: int) -> str:
    return json.dumps(record.record(index), ensure_ascii=False) + "\n"


def _parse(path: Path, *, partial: bool) -> tuple[dict[str, Any], list[Generation], bool]:
    """``(fingerprint, records, torn)`` of a generations file; ``torn``: a partial file whose last line
    was cut by a crash (it is ignored). Anything else unreadable is a :class:`CorruptFileError`."""
    what = "partial generations file" if partial else "generations file"
    remedy = "delete it and run generate again" if not partial else "delete it to start the generation over"
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise CorruptFileError(path, f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}); {remedy}") from None
    lines = text.split("\n")
    torn = False
    if lines and lines[-1] == "":
        lines.pop()
    elif partial and lines:  # the last line has no newline: its write was interrupted
        lines.pop()
        torn = True
    if not lines:
        raise CorruptFileError(path, f"{what} {str(path)!r} is empty; {remedy}")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        raise CorruptFileError(path, f"{what} {str(path)!r} does not start with a generations header; {remedy}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("fingerprint"), dict):
        raise CorruptFileError(path, f"{what} {str(path)!r} is not a {FORMAT} file (header {lines[0][:80]!r}); {remedy}")
    records: list[Generation] = []
    for k, line in enumerate(lines[1:], start=2):
        try:
            r = json.loads(line)
            records.append(Generation(str(r["prompt"]), [str(c) for c in r["completions"]],
                                      [[int(t) for t in ids] for ids in r["token_ids"]],
                                      [bool(f) for f in r["finished"]],
                                      None if r["scores"] is None else [float(s) for s in r["scores"]]))
            if int(r["index"]) != len(records) - 1:
                raise ValueError("out of order")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise CorruptFileError(path, f"{what} {str(path)!r} line {k} is not a generation record of prompt "
                                         f"{len(records)}; {remedy}") from None
    return header["fingerprint"], records, torn


def load_generations(path: str | os.PathLike[str], expect: dict[str, Any] | str | None = None) -> Generations:
    """Read a finished generations file written by :func:`generate`.

    Args:
        path: the file.
        expect: a fingerprint (:func:`generation_fingerprint`'s dict, or its ``"sha256"``) the file
            must have; ``None`` accepts any.

    Raises:
        FileNotFoundError: no such file (the message says when an unfinished ``.partial`` exists).
        CorruptFileError: damaged, or fewer records than prompts.
        GenerationsMismatchError: the file's fingerprint is not ``expect``; the message names the
            parts that differ.
    """
    path = Path(path)
    if not path.exists() and _partial_path(path).exists():
        raise FileNotFoundError(f"generations file {str(path)!r} does not exist, but {str(_partial_path(path))!r} does: "
                                "its generation was interrupted; run generate again with the same arguments to finish it")
    fingerprint, records, _ = _parse(path, partial=False)
    count = fingerprint.get("prompts", {}).get("count")
    if count != len(records):
        raise CorruptFileError(path, f"generations file {str(path)!r} holds {len(records)} records for {count} prompts: "
                                     "it is incomplete; delete it and run generate again")
    if expect is not None:
        want = expect.get("sha256") if isinstance(expect, dict) else expect
        if not isinstance(want, str):
            raise TypeError(f"load_generations expect must be a fingerprint dict, its sha256 or None; got {expect!r}")
        if fingerprint.get("sha256") != want:
            if isinstance(expect, dict):
                raise _mismatch(path, fingerprint, expect, "Generate them again for this teacher and these prompts.")
            raise GenerationsMismatchError(f"generations file {str(path)!r} has fingerprint "
                                           f"{str(fingerprint.get('sha256'))[:12]}…, expected {want[:12]}…", ["fingerprint"])
    return Generations(fingerprint, records, path)


# ----------------------------------------------------------------------------------- generating


def _batch_seed(seed: int, batch: int) -> int:
    digest = hashlib.sha256(f"distill.generate|{seed}|{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Bar:
    """A rich progress bar over the prompts (silent when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self._p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                               transient=True)
            self._p.start()
            self._task = self._p.add_task("generating", total=total, completed=done)

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=n)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def _generate_batch(model: nn.Module, tokenizer: Any, prompts: list[str], settings: dict[str, Any],
                    device: torch.device, batch_seed: int) -> list[Generation]:
    """One batch: prompts left-padded, ``model.generate``, answers cut at the first EOS and decoded."""
    encoded = [encode_prompt(tokenizer, p, settings["chat_template"]) for p in prompts]
    if any(not e for e in encoded):
        raise ValueError(f"generate: prompt {[len(e) for e in encoded].index(0)} of this batch encodes to no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else settings["eos_token_ids"][0]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), int(pad), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(encoded):  # left padding: every prompt ends where generation starts
        ids[r, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[r, width - len(e):] = 1
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings["max_new_tokens"], "num_beams": settings["num_beams"],
        "num_return_sequences": settings["num_return_sequences"], "do_sample": settings["do_sample"],
        "use_cache": True, "pad_token_id": int(pad), "eos_token_id": settings["eos_token_ids"],
        "return_dict_in_generate": True, "output_scores": settings["num_beams"] > 1,
    }
    if settings["do_sample"]:  # plain sampling at temperature T: no top-k / top-p truncation
        kwargs.update(temperature=settings["temperature"], top_k=0, top_p=1.0)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(batch_seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    sequences: Tensor = out.sequences.cpu()
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    new = sequences[:, 1:] if encoder_decoder else sequences[:, width:]
    scores = getattr(out, "sequences_scores", None) if settings["num_beams"] > 1 else None
    eos = set(settings["eos_token_ids"])
    k = settings["num_return_sequences"]
    records = []
    for r, prompt in enumerate(prompts):
        texts, token_ids, finished = [], [], []
        for j in range(k):
            row = new[r * k + j].tolist()
            stop = next((t for t, tok in enumerate(row) if tok in eos), None)
            kept = row if stop is None else row[:stop]
            token_ids.append(kept)
            finished.append(stop is not None)
            texts.append(tokenizer.decode(kept, skip_special_tokens=True))
        beam_scores = None if scores is None else [float(s) for s in scores[r * k:(r + 1) * k].cpu()]
        records.append(Generation(prompt, texts, token_ids, finished, beam_scores))
    return records


def _append(path: Path, lines: list[str]) -> None:
    """Append whole lines and make them durable (one write, flush, fsync)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())


def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], path: str | os.PathLike[str], *,
             max_new_tokens: int, num_beams: int = 1, num_return_sequences: int = 1, do_sample: bool = False,
             temperature: float = 1.0, batch_size: int = 8, seed: int = 0, progress: bool = True,
             chat_template: bool = True, overwrite: bool = False) -> list[list[str]]:
    """The teacher's answers to ``prompts``, generated in batches and stored at ``path`` with their
    fingerprint (:func:`generation_fingerprint`); ``num_return_sequences`` answers per prompt.

    Each batch of prompts (:func:`~distill.data.text.encode_prompt`: the chat template unless
    ``chat_template=False``) is left-padded and run through ``model.generate`` (``use_cache=True``,
    the model in eval mode for the call, its training mode restored after). Beam search
    (``num_beams > 1``) returns the best ``num_return_sequences`` beams, best first, with their
    scores; ``do_sample=True`` draws plain samples at ``temperature`` (no top-k or top-p
    truncation), from a seed that is a function of ``(seed, batch number)``, so a resumed run
    draws what an uninterrupted one would. An answer ends at its first EOS (not kept in the text)
    or after ``max_new_tokens`` tokens (``finished`` says which).

    Resuming: finished batches go to ``PATH.partial`` as they are made; after a crash, calling
    ``generate`` again with the same arguments continues after the last whole batch. When ``path``
    already holds a finished file with this fingerprint, it is read and nothing is generated.
    A file (finished or partial) with another fingerprint is a :class:`GenerationsMismatchError`
    naming what differs (model, tokenizer, prompts, settings), and a damaged one a
    :class:`~distill.files.CorruptFileError`, unless ``overwrite=True`` (which replaces either).

    Returns:
        One list of ``num_return_sequences`` answers per prompt, in prompt order (all of them,
        with :func:`load_generations` for token ids, ``finished`` flags and beam scores).
    """
    fp = generation_fingerprint(model, tokenizer, prompts, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                num_return_sequences=num_return_sequences, do_sample=do_sample,
                                temperature=temperature, batch_size=batch_size, seed=seed, chat_template=chat_template)
    prompts = list(prompts)
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"generate needs a model with a Hugging Face style .generate method; got {type(model).__name__}")
    path = Path(path)
    partial = _partial_path(path)
    remedy = "Pass overwrite=True to replace it, or another path."
    if path.exists():
        try:
            stored = _parse(path, partial=False)[0]
        except CorruptFileError:
            if not overwrite:
                raise
            stored = {}
        if stored.get("sha256") == fp["sha256"]:
            return load_generations(path, expect=fp).completions
        if not overwrite:
            raise _mismatch(path, stored, fp, remedy)
        path.unlink()
    done: list[Generation] = []
    if partial.exists():
        try:
            stored, done, torn = _parse(partial, partial=True)
        except CorruptFileError:
            if not overwrite:
                raise
            stored, done, torn = {}, [], False
        if stored.get("sha256") != fp["sha256"]:
            if not overwrite:
                raise _mismatch(partial, stored, fp, remedy)
            done, torn = [], False
            partial.unlink()
        whole = len(done) // batch_size * batch_size  # resume on a batch boundary: batches pad alike
        if torn or whole != len(done):
            done = done[:whole]
            atomic_write_text(partial, _header(fp) + "".join(_line(r, i) for i, r in enumerate(done)))
    if not partial.exists():
        atomic_write_text(partial, _header(fp))
    settings = fp["settings"]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    bar = _Bar(progress, len(prompts), len(done))
    try:
        model.eval()
        for start in range(len(done), len(prompts), batch_size):
            batch = _generate_batch(model, tokenizer, prompts[start:start + batch_size], settings, device,
                                    _batch_seed(seed, start // batch_size))
            _append(partial, [_line(r, start + i) for i, r in enumerate(batch)])
            done += batch
            bar.advance(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    atomic_write_text(path, _header(fp) + "".join(_line(r, i) for i, r in enumerate(done)))
    partial.unlink()
    return [list(r.completions) for r in done]


# ----------------------------------------------------------------------------------- targets


def sentence_bleu(hypothesis: Sequence[Hashable], reference: Sequence[Hashable], max_n: int = 4,
                  smoothing: str = "add1") -> float:
    """Sentence-level BLEU of one hypothesis against one reference (tokens: words, ids, anything hashable).

    ``BLEU = BP · exp((1/N) Σ_{n=1..N} log p_n)`` with ``p_n = m_n / l_n``, where ``m_n`` is the number
    of the hypothesis's n-grams found in the reference (each counted at most as often as it occurs
    there: "clipped") and ``l_n = max(c − n + 1, 0)`` the number of its n-grams, ``c`` and ``r``
    the two lengths, and the brevity penalty ``BP = 1`` if ``c > r`` else ``exp(1 − r / c)``
    (Papineni et al., ACL 2002).

    ``smoothing="add1"`` (Lin & Och, COLING 2004; "smoothing 2" of Chen & Cherry, WMT 2014):
    ``p_n = (m_n + 1) / (l_n + 1)`` for ``n ≥ 2`` (unigrams unsmoothed), so one missing 4-gram does
    not zero a sentence. ``"none"``: unsmoothed; any ``p_n = 0`` (or ``l_n = 0``) gives 0.
    An empty hypothesis scores 0; a hypothesis sharing no word with the reference scores 0.
    """
    if smoothing not in ("add1", "none"):
        raise ValueError(f"sentence_bleu smoothing must be 'add1' or 'none'; got {smoothing!r}")
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"sentence_bleu max_n must be an int >= 1; got {max_n!r}")
    if isinstance(hypothesis, str) or isinstance(reference, str):
        raise TypeError("sentence_bleu compares token sequences; split strings first (word_bleu does)")
    hyp, ref = list(hypothesis), list(reference)
    c, r = len(hyp), len(ref)
    if c == 0:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        grams = Counter(tuple(hyp[i:i + n]) for i in range(c - n + 1))
        ref_grams = Counter(tuple(ref[i:i + n]) for i in range(r - n + 1))
        matches = sum(min(k, ref_grams[g]) for g, k in grams.items())
        total = max(c - n + 1, 0)
        if smoothing == "add1" and n >= 2:
            matches, total = matches + 1, total + 1
        if matches == 0 or total == 0:
            return 0.0
        log_sum += math.log(matches / total)
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_sum / max_n)


def word_bleu(hypothesis: str, reference: str) -> float:
    """:func:`sentence_bleu` (add-one smoothed, up to 4-grams) on whitespace-separated words."""
    return sentence_bleu(hypothesis.split(), reference.split())


def sequence_kd_targets(generations: Generations | Sequence[Sequence[str]], mode: str = "sequence",
                        references: Sequence[str] | None = None,
                        similarity: Callable[[str, str], float] | str = "word_bleu",
                        tokenizer: Any = None) -> list[str]:
    """The completion to train on for each prompt, for sequence-level KD (Kim & Rush 2016, arXiv 1606.07947).

    Args:
        generations: a :class:`Generations` (from :func:`load_generations`) or one list of teacher
            answers per prompt, best beam first.
        mode: ``"sequence"`` (Seq-KD): the teacher's top beam (the first answer);
            ``"interpolation"`` (Seq-Inter): among each prompt's answers (the K-best beam list), the
            one closest to its reference, ``argmax_k sim(answer_k, reference)``; ties go to the
            better-ranked beam.
        references: the ground-truth completion of each prompt (``"interpolation"`` only).
        similarity: ``sim(hypothesis, reference) -> float``: ``"word_bleu"`` (smoothed sentence
            BLEU on words, the paper's choice), ``"token_bleu"`` (the same on token ids: the
            stored ids of a :class:`Generations` against ``tokenizer``'s ids of the reference), or
            any callable on two strings.
        tokenizer: for ``"token_bleu"``.

    Returns:
        One completion per prompt, for :func:`distill.data.text.prompt_completion`.
    """
    if isinstance(generations, Generations):
        answers = generations.completions
        ids: list[list[list[int]]] | None = [r.token_ids for r in generations.records]
    else:
        if isinstance(generations, str) or not isinstance(generations, Sequence):
            raise TypeError(f"sequence_kd_targets expects Generations or one list of answers per prompt; got "
                            f"{type(generations).__name__}")
        answers = [[a] if isinstance(a, str) else list(a) for a in generations]
        ids = None
    empty = [i for i, a in enumerate(answers) if not a]
    if empty:
        raise ValueError(f"sequence_kd_targets: prompt {empty[0]} has no teacher answer")
    if mode == "sequence":
        return [a[0] for a in answers]
    if mode != "interpolation":
        raise ValueError(f"sequence_kd_targets mode must be 'sequence' or 'interpolation'; got {mode!r}")
    if references is None or isinstance(references, str) or len(references) != len(answers):
        got = "none" if references is None else (f"{len(references)}" if not isinstance(references, str) else "a string")
        raise ValueError(f"sequence_kd_targets mode='interpolation' needs one reference per prompt ({len(answers)}); "
                         f"got {got}")
    if similarity == "token_bleu":
        if ids is None or tokenizer is None:
            raise ValueError("similarity='token_bleu' needs Generations (with their token ids) and the tokenizer")
        targets = []
        for k, (a, ref) in enumerate(zip(answers, references)):
            ref_ids = tokenizer(ref, add_special_tokens=False)["input_ids"]
            scores = [sentence_bleu(h, ref_ids) for h in ids[k]]
            targets.append(a[scores.index(max(scores))])
        return targets
    sim = word_bleu if similarity == "word_bleu" else similarity
    if not callable(sim):
        raise ValueError(f"sequence_kd_targets similarity must be 'word_bleu', 'token_bleu' or a callable; got "
                         f"{similarity!r}")
    targets = []
    for a, ref in zip(answers, references):
        scores = [float(sim(h, ref)) for h in a]
        targets.append(a[scores.index(max(scores))])  # the first of equal scores: the better beam
    return targets
