"""Sequence-level knowledge distillation for encoder-decoders: the registered strategy ``seq_kd``.

Paper: Y. Kim, A. M. Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016, arXiv 1606.07947.
Its three students, all here on (source, target) pairs (e.g. :func:`distill.data.seq2seq.summary_pairs`):

* ``mode="word"`` (Word-KD): the gold targets, ``ce · NLL + kd · KL(p_T ‖ p_S)`` per target token
  (the registered methods ``ce`` and ``token_kl``);
* ``mode="sequence"`` (Seq-KD): the targets replaced by the teacher's beam-search output
  (:func:`distill.generations.generate` with ``num_beams=beam_size``, the top beam), trained with
  ``ce`` (plus ``kd · token_kl`` on those targets when ``kd > 0``: their Seq-KD + Word-KD);
* ``mode="interpolation"`` (Seq-Inter): the target is the hypothesis of the teacher's ``beam_size``-best
  list closest to the gold by smoothed sentence BLEU
  (:func:`distill.generations.sequence_kd_targets`, ``mode="interpolation"``).

The teacher's targets are made by :func:`sequence_kd_pairs` (which reuses
:mod:`distill.generations`: its fingerprinted, resumable generations file, its BLEU and its
target selection) and the student is trained by :func:`distill.fit`. Defaults: ``beam_size=5``
(the paper's beam for Seq-KD, as we know it: the full text was not read, see
:mod:`distill.generations`); ``ce = 1``; ``kd`` 1 for ``mode="word"`` and 0 otherwise (weights
named for what they weight, instead of the paper's ``(1 − α) NLL + α KD``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from distill.data.seq2seq import seq2seq_loader
from distill.distiller import Distiller
from distill.generations import generate, load_generations, sequence_kd_targets
from distill.methods.base import Paper
from distill.strategies.registry import as_model, register_strategy
from distill.teachers import FrozenTeacher
from distill.train.loop import FitResult, fit

__all__ = ["PAPER", "MODES", "seq_kd", "sequence_kd_pairs"]

PAPER = Paper(
    title="Sequence-Level Knowledge Distillation",
    authors="Y. Kim, A. M. Rush",
    year=2016,
    arxiv="1606.07947",
    venue="EMNLP",
)

MODES = ("word", "sequence", "interpolation")


def _check_pairs(pairs: Any, who: str) -> list[tuple[str, str]]:
    if isinstance(pairs, str) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"{who} needs a non-empty list of (source, target) string pairs")
    bad = [i for i, p in enumerate(pairs) if not (isinstance(p, (tuple, list)) and len(p) == 2
                                                   and all(isinstance(x, str) for x in p))]
    if bad:
        raise TypeError(f"{who}: pair {bad[0]} is not a (source, target) pair of strings: {pairs[bad[0]]!r}")
    return [(s, t) for s, t in pairs]


def sequence_kd_pairs(teacher: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], path: str | Path, *,
                      mode: str = "sequence", beam_size: int = 5, max_new_tokens: int = 64, batch_size: int = 16,
                      progress: bool = False) -> list[tuple[str, str]]:
    """The (source, new target) pairs of Seq-KD (``mode="sequence"``: the teacher's top beam) or Seq-Inter
    (``"interpolation"``: the beam hypothesis with the best smoothed sentence BLEU against the gold).

    The teacher's beams are generated once into ``path`` (:func:`distill.generations.generate`, the
    sources as plain text, ``chat_template=False``; an existing file made by the same teacher and
    settings is read instead) with ``num_beams=beam_size`` and all ``beam_size`` hypotheses kept for
    ``"interpolation"``. An empty top hypothesis is kept (the student learns to stop at once, as the
    teacher would).
    """
    who = "sequence_kd_pairs"
    pairs = _check_pairs(pairs, who)
    if mode not in ("sequence", "interpolation"):
        raise ValueError(f"{who} mode must be 'sequence' or 'interpolation'; got {mode!r}")
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"{who} beam_size must be an int >= 1; got {beam_size!r}")
    sources = [s for s, _ in pairs]
    k = beam_size if mode == "interpolation" else 1
    generate(teacher, tokenizer, sources, path, max_new_tokens=max_new_tokens, num_beams=beam_size,
             num_return_sequences=k, batch_size=batch_size, chat_template=False, progress=progress)
    gens = load_generations(path)
    targets = sequence_kd_targets(gens, mode, references=[t for _, t in pairs] if mode == "interpolation" else None)
    return list(zip(sources, targets))


@register_strategy("seq_kd", "seq2seq", PAPER)
def seq_kd(
    student: nn.Module,
    train_pairs: Sequence[tuple[str, str]],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    tokenizer: Any,
    epochs: int,
    mode: str = "sequence",
    ce: float = 1.0,
    kd: float | None = None,
    T: float = 1.0,
    beam_size: int = 5,
    max_new_tokens: int = 64,
    max_source_len: int = 256,
    max_target_len: int = 64,
    batch_size: int = 16,
    generations_path: str | Path | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs: Any,
) -> FitResult:
    """Sequence-level KD: the student trained on gold targets with word-level KD, on the teacher's beam
    output, or on the beam hypothesis closest to the gold (Kim & Rush 2016).

    Args:
        student: the encoder-decoder being trained (a module or a zero-argument factory); the same
            vocabulary as the teacher.
        train_pairs: (source, gold target) strings; the strategy needs the texts (not a loader)
            because Seq-KD replaces the targets.
        val_loader: evaluated by ``fit`` after each epoch, or ``None``.
        teacher: the trained teacher encoder-decoder (a Hugging Face model with ``generate``).
        tokenizer: encodes sources and targets for both.
        epochs, run_dir, seed, progress: as in :func:`distill.fit`.
        mode: ``"word"``, ``"sequence"`` or ``"interpolation"`` (see the module docstring).
        ce: weight of the cross-entropy on the (gold or teacher) targets.
        kd: weight of word-level KD ``token_kl`` at temperature ``T`` (default 1 for ``"word"``,
            0 otherwise).
        beam_size, max_new_tokens: the teacher's beam search.
        max_source_len, max_target_len, batch_size: the training batches
            (:func:`distill.data.seq2seq.seq2seq_loader`).
        generations_path: where the teacher's beams are stored (default: ``run_dir/generations.jsonl``,
            or a temporary folder without ``run_dir``).
        **fit_kwargs: passed to :func:`distill.fit` (optimizer, lr, ...).
    """
    who = "seq_kd"
    model = as_model(student, who)
    pairs = _check_pairs(train_pairs, who)
    if mode not in MODES:
        raise ValueError(f"{who} mode must be one of {MODES}; got {mode!r}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"{who} needs the teacher model (an nn.Module with .generate); got {type(teacher).__name__}")
    kd = (1.0 if mode == "word" else 0.0) if kd is None else kd
    for name, value in (("ce", ce), ("kd", kd)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{who} {name} must be a number >= 0; got {value!r}")
    if not ce and not kd:
        raise ValueError(f"{who}: ce and kd are both 0: nothing to train")
    with tempfile.TemporaryDirectory() as tmp:
        if mode != "word":
            path = Path(generations_path) if generations_path is not None else \
                (Path(run_dir) / "generations.jsonl" if run_dir is not None else Path(tmp) / "generations.jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            pairs = sequence_kd_pairs(teacher, tokenizer, pairs, path, mode=mode, beam_size=beam_size,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    loader = seq2seq_loader(pairs, tokenizer, batch_size, max_source_len, max_target_len, seed=seed,
                            decoder_start_token_id=start)
    losses: dict[str, Any] = {}
    if ce:
        losses["ce"] = float(ce)
    if kd:
        losses["token_kl"] = {"T": float(T), "causal": False, "weight": float(kd)}
    distiller = Distiller(model, FrozenTeacher(teacher) if kd else None, losses)
    return fit(distiller, loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
               **fit_kwargs)
