"""Distilling an ensemble on reference and exploration states: the registered strategy ``search_kd``.

Paper: Y. Liu, W. Che, H. Zhao, B. Qin, T. Liu, "Distilling Knowledge for Search-based Structured
Prediction", ACL 2018, arXiv 1805.11224. Generating a target token by token is a search; its
states are (source, prefix). A single model learns the ensemble's averaged action distribution
``q`` (a :class:`~distill.teachers.EnsembleTeacher` of models trained from different
initialisations) on

* **reference states**: the gold prefixes (teacher forcing), where it also has the gold action;
* **exploration states**: prefixes of targets the *ensemble* samples (:func:`explore`: each token
  drawn from ``q`` at ``temperature``), where only ``q`` is learnt;

``mode="both"`` (the paper's full method) gives every batch its reference rows and, for the same
sources, exploration rows; the loss is the registered method ``search_kd``
(:class:`~distill.methods.seq2seq.SearchKD`). Sources: the abstract and introduction were read
("use the ensemble to explore the search space and learn from the encountered states"); the
sampling temperature 1 and the per-batch pairing of the two kinds of states are this library's
reading, not checked against the paper's algorithm.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.batch import TokenBatch, as_batch
from distill.data.augment import mix_seed
from distill.data.seq2seq import IGNORE_INDEX, shift_right
from distill.distiller import Distiller
from distill.methods.seq2seq import LIU_2018, ExploredBatch
from distill.strategies.registry import as_model, register_strategy
from distill.teachers import EnsembleTeacher, FrozenTeacher, TeacherSource
from distill.train.loop import FitResult, fit

__all__ = ["MODES", "Exploration", "explore", "search_kd"]

MODES = ("reference", "exploration", "both")


def _token(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a token id (an int >= 0); got {value!r}")
    return value


def _cached_members(teacher: TeacherSource) -> tuple[list[nn.Module], Tensor, float, str] | None:
    """The Hugging Face encoder-decoders behind ``teacher`` (a :class:`~distill.teachers.FrozenTeacher`
    or an :class:`~distill.teachers.EnsembleTeacher` of them, with no dtype/device of their own and
    no taps), their weights, temperature and combination — or ``None`` when ``teacher`` is anything
    else (then :func:`explore` re-runs the whole prefix each step)."""
    if isinstance(teacher, EnsembleTeacher):
        members, weights, T, combine = list(teacher.members), teacher.weights, teacher.temperature, teacher.combine
    elif isinstance(teacher, FrozenTeacher):
        members, weights, T, combine = [teacher], torch.ones(1), 1.0, "logits"
    else:
        return None
    models = []
    for m in members:
        model = getattr(m, "model", None)
        config = getattr(model, "config", None)
        if (not isinstance(m, FrozenTeacher) or m.dtype is not None or m.device is not None or m._taps is not None
                or not getattr(config, "is_encoder_decoder", False) or not callable(getattr(model, "get_encoder", None))):
            return None
        models.append(model)
    return models, weights, T, combine


class _CachedSteps:
    """Next-token logits ``(B, V)`` of a teacher source over a growing decoder prefix, each member's
    encoder run once and its decoder fed one token per step with its key/value cache
    (``past_key_values``): the same numbers as re-running the whole prefix, combined exactly as the
    source combines them (``EnsembleTeacher.forward``)."""

    def __init__(self, models: list[nn.Module], weights: Tensor, T: float, combine: str, batch: TokenBatch,
                 kwargs: dict[str, Any]) -> None:
        self.models, self.T, self.combine = models, T, combine
        self.weights = weights
        self.mask = kwargs.get("attention_mask")
        self.encoded = [m.get_encoder()(input_ids=batch.inputs, attention_mask=self.mask) for m in models]
        self.past: list[Any] = [None] * len(models)
        # transformers >= 5.x names the key/value cache ``cache``; earlier versions ``past_key_values``
        self.cache_arg = "cache" if "cache" in inspect.signature(models[0].forward).parameters else "past_key_values"

    def __call__(self, last: Tensor) -> Tensor:
        """``last`` ``(B, 1)``: the newest prefix token; returns the logits of the token after it."""
        logits = []
        for i, m in enumerate(self.models):
            out = m(encoder_outputs=self.encoded[i], attention_mask=self.mask, decoder_input_ids=last,
                    use_cache=True, **{self.cache_arg: self.past[i]})
            self.past[i] = getattr(out, self.cache_arg)
            logits.append(out.logits[:, -1])
        z = torch.stack(logits)  # (M, B, V)
        w = self.weights.to(device=z.device, dtype=z.dtype).view(-1, 1, 1)
        if self.combine == "logits":
            return (w * z).sum(0)
        mean_probs = (w * F.softmax(z / self.T, dim=-1)).sum(0)
        return self.T * torch.log(mean_probs.clamp_min(torch.finfo(mean_probs.dtype).tiny))


@torch.no_grad()
def explore(teacher: TeacherSource, batch: TokenBatch, *, max_new_tokens: int, generator: torch.Generator,
            eos_token_id: int, pad_token_id: int, decoder_start_token_id: int,
            temperature: float = 1.0, use_cache: bool = True) -> TokenBatch:
    """The batch's sources with targets sampled from the teacher source token by token.

    At step ``t`` the teacher (an ensemble: its view's logits are ``T_e · log q``) is run on the
    source and the prefix sampled so far; the next token is drawn from ``softmax(logits / temperature)``
    by ``torch.multinomial`` with ``generator``. A row stops after its EOS (kept as its last label)
    or after ``max_new_tokens`` tokens. Returns a :class:`~distill.batch.TokenBatch` with labels
    ``(B, T')`` (−100 after each row's end) and ``decoder_input_ids`` (labels shifted right).

    With ``use_cache`` (default) and a teacher made of Hugging Face encoder-decoders (a
    ``FrozenTeacher`` or an ``EnsembleTeacher`` of them), each member's encoder runs once and its
    decoder one token per step with its key/value cache: the same distributions (up to float
    rounding) at ``O(T)`` instead of ``O(T²)`` decoder work. Any other teacher source is re-run on
    the whole prefix each step.
    """
    if not isinstance(batch, TokenBatch):
        raise TypeError(f"explore needs a TokenBatch of an encoder-decoder; got {type(batch).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"explore max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"explore temperature must be a number > 0; got {temperature!r}")
    eos, pad, start = (_token(eos_token_id, "eos_token_id"), _token(pad_token_id, "pad_token_id"),
                       _token(decoder_start_token_id, "decoder_start_token_id"))
    B = len(batch)
    device = batch.inputs.device
    prefix = torch.full((B, 1), start, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    labels = torch.full((B, max_new_tokens), IGNORE_INDEX, dtype=torch.long, device=device)
    kwargs = {k: v for k, v in batch.model_kwargs.items() if not k.startswith("decoder_")}
    cached = _cached_members(teacher) if use_cache else None
    steps = None if cached is None else _CachedSteps(*cached, batch, kwargs)
    for t in range(max_new_tokens):
        if steps is not None:
            logits = steps(prefix[:, -1:])
        else:
            logits = teacher(replace(batch, model_kwargs={**kwargs, "decoder_input_ids": prefix}))["logits"][:, -1]
        probs = F.softmax(logits.float() / temperature, dim=-1)
        token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        labels[:, t] = torch.where(done, torch.full_like(token, IGNORE_INDEX), token)
        done = done | (token == eos)
        if bool(done.all()):
            labels = labels[:, :t + 1]
            break
        prefix = torch.cat([prefix, torch.where(done, torch.full_like(token, pad), token).unsqueeze(1)], dim=1)
    decoder = shift_right(labels, start, pad)
    return replace(batch, targets=labels, model_kwargs={**kwargs, "decoder_input_ids": decoder})


def _pad_cols(x: Tensor, width: int, value: int) -> Tensor:
    return x if x.shape[1] >= width else F.pad(x, (0, width - x.shape[1]), value=value)


class Exploration:
    """A ``fit`` batch transform: each gold batch becomes an :class:`~distill.methods.seq2seq.ExploredBatch`
    of its reference rows (``mode="reference"``), of rows with targets the teacher ensemble samples
    (``"exploration"``, :func:`explore`), or of both, stacked (``"both"``: ``2B`` rows, the same
    sources twice). Batch ``i`` of epoch ``e`` samples with a generator seeded from ``(seed, e, i)``.
    """

    def __init__(self, teacher: TeacherSource, *, mode: str = "both", max_new_tokens: int = 64,
                 temperature: float = 1.0, eos_token_id: int, pad_token_id: int, decoder_start_token_id: int,
                 seed: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"Exploration mode must be one of {MODES}; got {mode!r}")
        self.teacher, self.mode = teacher, mode
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, decoder_start_token_id=decoder_start_token_id)
        self.pad = pad_token_id
        self.seed, self.epoch, self.calls = int(seed), 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.calls = int(epoch), 0

    def __call__(self, batch: Any) -> ExploredBatch:
        batch = as_batch(batch)
        if not isinstance(batch, TokenBatch) or batch.targets is None:
            raise TypeError("search_kd needs token batches with labels (B, T) (a seq2seq loader)")
        B = len(batch)
        gold = ExploredBatch(batch.inputs, batch.targets, batch.index, model_kwargs=dict(batch.model_kwargs),
                             explored=torch.zeros(B, dtype=torch.bool, device=batch.inputs.device))
        if self.mode == "reference":
            return gold
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.calls))
        self.calls += 1
        was = self.teacher.training
        self.teacher.eval()
        try:
            sampled = explore(self.teacher, batch, generator=g, **self.kw)
        finally:
            self.teacher.train(was)
        ones = torch.ones(B, dtype=torch.bool, device=batch.inputs.device)
        if self.mode == "exploration":
            return ExploredBatch(sampled.inputs, sampled.targets, sampled.index, model_kwargs=sampled.model_kwargs,
                                 explored=ones)
        width = max(gold.targets.shape[1], sampled.targets.shape[1])
        labels = torch.cat([_pad_cols(gold.targets, width, IGNORE_INDEX), _pad_cols(sampled.targets, width,
                                                                                     IGNORE_INDEX)])
        kwargs = {k: torch.cat([v, v]) for k, v in batch.model_kwargs.items() if not k.startswith("decoder_")}
        kwargs["decoder_input_ids"] = torch.cat([_pad_cols(gold.model_kwargs["decoder_input_ids"], width, self.pad),
                                                 _pad_cols(sampled.model_kwargs["decoder_input_ids"], width, self.pad)])
        index = None if batch.index is None else torch.cat([batch.index, batch.index])
        return ExploredBatch(torch.cat([batch.inputs, batch.inputs]), labels, index, model_kwargs=kwargs,
                             explored=torch.cat([~ones, ones]))


@register_strategy("search_kd", "seq2seq", LIU_2018)
def search_kd(
    student: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Sequence[nn.Module] | EnsembleTeacher,
    epochs: int,
    mode: str = "both",
    kd: float = 1.0,
    ce: float = 1.0,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    eos_token_id: int,
    pad_token_id: int,
    decoder_start_token_id: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs: Any,
) -> FitResult:
    """Distil an ensemble into one encoder-decoder on reference and exploration states (Liu et al. 2018).

    Args:
        student: the model trained (a module or a zero-argument factory).
        train_loader: gold seq2seq batches (:func:`distill.data.seq2seq.seq2seq_loader`).
        val_loader: evaluated by ``fit`` after each epoch, or ``None``.
        teacher: the ensemble's members (averaged distributions: ``EnsembleTeacher(combine="probs")``)
            or an :class:`~distill.teachers.EnsembleTeacher`.
        mode: ``"reference"``, ``"exploration"`` or ``"both"`` (the module docstring).
        kd, ce: weights of the distillation term and of the reference-state NLL
            (:class:`~distill.methods.seq2seq.SearchKD`).
        temperature, max_new_tokens: the ensemble's sampling.
        eos_token_id, pad_token_id, decoder_start_token_id: the tokenizer's and model's ids.
        epochs, run_dir, seed, progress, **fit_kwargs: as in :func:`distill.fit`.
    """
    model = as_model(student, "search_kd")
    if "batch_transform" in fit_kwargs:
        raise ValueError("search_kd makes its own batch_transform (the exploration); do not pass one")
    ensemble = teacher if isinstance(teacher, EnsembleTeacher) else EnsembleTeacher(list(teacher), combine="probs")
    if ensemble.combine != "probs":
        raise ValueError("search_kd distils the ensemble's averaged distribution: use EnsembleTeacher(combine='probs')")
    transform = Exploration(ensemble, mode=mode, max_new_tokens=max_new_tokens, temperature=temperature,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                            decoder_start_token_id=decoder_start_token_id, seed=seed)
    distiller = Distiller(model, ensemble, {"search_kd": {"kd": kd, "ce": ce, "T": ensemble.temperature}})
    return fit(distiller, train_loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
               batch_transform=transform, **fit_kwargs)
