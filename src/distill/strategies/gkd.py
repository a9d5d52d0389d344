r"""On-policy distillation of language models: Generalized Knowledge Distillation (GKD).

Paper: R. Agarwal, N. Vieillard, Y. Zhou, P. Stanczyk, S. Ramos, M. Geist, O. Bachem, "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024, arXiv 2306.13649.

Algorithm 1 of the paper, for each training step: draw :math:`u \sim \mathcal U(0, 1)`; if
:math:`u \le \lambda` (the *student data fraction*) the batch's inputs :math:`x` keep their prompts
and their outputs are sampled from the current student, :math:`y \sim p_S^\theta(\cdot \mid x)`;
otherwise the batch of (input, output) pairs is used as given (supervised KD). The student is then
updated to minimise the token-level divergence between teacher and student on the resulting
sequences, :math:`\frac{1}{|y|}\sum_n D(p_T(\cdot \mid y_{<n}, x) \,\|\, p_S^\theta(\cdot \mid
y_{<n}, x))`; the gradient does not flow through the student's sampling. The default divergence is
the generalized Jensen-Shannon divergence with :math:`\beta = 0.5` (the registered method ``gkd`` of
:mod:`distill.methods.tokens`).

Pieces:

* :func:`on_policy_batch`: one step's data: with probability ``lam`` every example's completion
  (what follows its prompt = the tokens before its first label other than ``-100``) is replaced by a
  sample of the student at temperature ``temperature`` (``0``: greedy), at most ``max_new_tokens``
  tokens long and ending at the first ``eos_token_id``; labels are rebuilt (``-100`` on the prompt and
  the padding) and so is the attention mask. Sampling runs under ``no_grad`` with the student in eval
  mode (its modes restored afterwards) and draws every random number from ``generator``.
* :class:`OnPolicy`: the same as a batch transform for :func:`distill.fit` (``batch_transform=``) and
  :func:`distill.train.hf_trainer.DistillTrainer`: batch ``i`` after ``set_epoch(e)`` draws from a
  generator seeded with ``(seed, e, i)``, so a run, and a resumed run, is reproducible.
* :func:`gkd`: the registered strategy ``gkd``: a :class:`~distill.Distiller` with the β-JSD loss
  trained by :func:`distill.fit` on on-policy batches.

Source note: the paper's abstract and summaries of its method were read; its full text (Algorithm
1 itself) was not available to the search we used, so the step above is written from those summaries
and from the paper's published description of the student data fraction λ, not checked line by line
against Algorithm 1. The default ``max_new_tokens=64`` is this library's choice, not the paper's.

MiniLLM's reverse-KL policy gradient (Gu et al., ICLR 2024, arXiv 2306.08543) is not implemented.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.batch import TokenBatch
from distill.data.augment import mix_seed
from distill.distiller import Distiller
from distill.methods.base import Paper
from distill.strategies.registry import as_model, register_strategy
from distill.taps import logits_of
from distill.train.loop import FitResult, fit

__all__ = ["PAPER", "OnPolicy", "gkd", "on_policy_batch", "prompt_lengths", "sample_completions"]

PAPER = Paper(
    title="On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
    authors="R. Agarwal, N. Vieillard, Y. Zhou, P. Stanczyk, S. Ramos, M. Geist, O. Bachem",
    year=2024,
    arxiv="2306.13649",
    venue="ICLR",
)

IGNORE = -100  # the Hugging Face label of a position without loss


# ---------------------------------------------------------------------------------------- checks


def _check_lam(lam: Any) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (the student data fraction λ) must be a number in [0, 1], got {lam!r}")
    return float(lam)


def _check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature (of the student's sampling) must be a finite number >= 0 (0: greedy), "
                         f"got {temperature!r}")
    return float(temperature)


def _check_token_id(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a token id (an int >= 0), got {value!r}")
    return value


def _check_eos(eos_token_id: Any) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
        return (_check_token_id(eos_token_id, "eos_token_id"),)
    if isinstance(eos_token_id, Sequence) and not isinstance(eos_token_id, str):
        return tuple(_check_token_id(t, "eos_token_id") for t in eos_token_id)
    raise ValueError(f"eos_token_id must be None, a token id or a list of token ids, got {eos_token_id!r}")


def _check_max_new_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------- sampling


def prompt_lengths(labels: Tensor) -> Tensor:
    """Each row's prompt length: the position of its first label other than ``-100`` ``(B,)`` long;
    a row without any label is all prompt (its length ``L``).

    Args:
        labels: ``(B, L)`` long, unshifted (the Hugging Face convention).
    """
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be a (B, L) tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    valid = labels != IGNORE
    first = valid.int().argmax(dim=1)  # the first True (0 when there is none)
    return torch.where(valid.any(dim=1), first, torch.full_like(first, labels.shape[1]))


def _accepted(model: nn.Module) -> tuple[set[str], bool]:
    params = inspect.signature(model.forward).parameters
    return set(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompts: Sequence[Tensor],
    *,
    temperature: float,
    max_new_tokens: int,
    generator: torch.Generator,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None = None,
) -> list[Tensor]:
    r"""Sample one completion per prompt from a causal LM, autoregressively.

    The prompts are left-padded into one batch (attention mask ``0`` on the padding, position ids
    counted from each prompt's first token when the model takes ``position_ids``); a Hugging Face
    model whose forward (or, behind a ``**kwargs`` wrapper, its base model's) names ``use_cache`` and
    ``cache`` (or ``past_key_values``) decodes with its key/value cache; another model, or one that
    returns no cache, reruns the whole prefix at each step. Token :math:`t` is drawn from
    :math:`\mathrm{softmax}(z_t / \tau)` by inverting the cumulative distribution at a uniform number
    from ``generator`` (one per row and step, drawn on the generator's device), or is the argmax
    when :math:`\tau = 0`. A row stops after its first ``eos_token_id`` (kept in its completion) or
    after ``max_new_tokens`` tokens. The model is called as it is: put it in eval mode first
    (:func:`on_policy_batch` does).

    Args:
        model: called as ``model(input_ids=(B, P), attention_mask=(B, P), ...)``; its output holds
            logits ``(B, P, V)``.
        prompts: ``B`` one-dimensional long tensors on the model's device, each non-empty.
        temperature: :math:`\tau \ge 0`.
        max_new_tokens: the most tokens a completion has.
        generator: every random number comes from it.
        pad_token_id: fills the padding of the batch the model sees.
        eos_token_id: a token id, or several, that end a completion; ``None``: none does.

    Returns:
        ``B`` one-dimensional long tensors: the completions (without their prompts), each of
        length 1 to ``max_new_tokens``.
    """
    temperature = _check_temperature(temperature)
    max_new_tokens = _check_max_new_tokens(max_new_tokens)
    pad = _check_token_id(pad_token_id, "pad_token_id")
    eos = _check_eos(eos_token_id)
    if not prompts:
        return []
    device = prompts[0].device
    lengths = [int(p.numel()) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: a completion needs at least one token to follow")
    names, var_kw = _accepted(model)

    def takes(name: str) -> bool:
        return var_kw or name in names

    width = max(lengths)
    if not takes("attention_mask") and min(lengths) != width:
        raise ValueError("the student's forward takes no attention_mask, so prompts of different lengths "
                         f"({min(lengths)} to {width} tokens) cannot be sampled in one batch")
    n = len(prompts)
    ids = torch.full((n, width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, width - lengths[b]:] = p.to(device=device, dtype=torch.long)
        mask[b, width - lengths[b]:] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    # the key/value cache's argument: ``cache`` (transformers 5), ``past_key_values`` (before), named in the
    # signature of the model's forward, or of its base model's behind a wrapper of **kwargs (a peft model)
    base = model.get_base_model() if var_kw and hasattr(model, "get_base_model") else None
    cache_names = names | (_accepted(base)[0] if isinstance(base, nn.Module) else set())
    cache_arg = next((a for a in ("cache", "past_key_values") if a in cache_names), None) \
        if "use_cache" in cache_names else None
    use_cache = cache_arg is not None
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device) if eos else None

    out_tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    n_new = torch.zeros(n, dtype=torch.long, device=device)  # each row's completion length
    cache = None
    last_pos = positions[:, -1:]  # (B, 1)
    step_ids, step_mask, step_pos = ids, mask, positions
    for t in range(max_new_tokens):
        kwargs: dict[str, Any] = {"input_ids": step_ids}
        if takes("attention_mask"):
            kwargs["attention_mask"] = step_mask
        if takes("position_ids"):
            kwargs["position_ids"] = step_pos
        if use_cache:
            kwargs.update({"use_cache": True, cache_arg: cache})
        if "logits_to_keep" in names:  # only the last position's logits are read
            kwargs["logits_to_keep"] = 1
        output = model(**kwargs)
        logits = logits_of(output)[:, -1].float()  # (B, V)
        if temperature == 0.0:
            token = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            cdf = probs.cumsum(dim=-1)
            u = torch.rand(n, generator=generator, device=generator.device).to(device)
            # the first index whose cumulative probability exceeds u · total: token v has probability p_v
            token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            token = token.clamp_max(logits.shape[-1] - 1)
        token = torch.where(done, torch.full_like(token, pad), token)
        out_tokens[:, t] = token
        n_new = n_new + (~done).long()
        if eos_ids is not None:
            done = done | torch.isin(token, eos_ids)
        if bool(done.all()):
            break
        # the next step's inputs: the new token at the next position of each row
        last_pos = last_pos + 1
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
        positions = torch.cat([positions, last_pos], dim=1)
        if use_cache:
            cache = getattr(output, "cache", None)
            cache = getattr(output, "past_key_values", None) if cache is None else cache
            use_cache = cache is not None  # a model that returned no cache reruns the whole prefix from now on
        if use_cache:
            step_ids, step_mask, step_pos = token.unsqueeze(1), mask, last_pos
        else:
            step_ids, step_mask, step_pos = ids, mask, positions
    return [out_tokens[b, : int(n_new[b])] for b in range(n)]


def on_policy_batch(
    student: nn.Module,
    batch: TokenBatch,
    *,
    lam: float,
    temperature: float,
    max_new_tokens: int,
    generator: torch.Generator,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None = None,
) -> TokenBatch:
    r"""One step's data of GKD (Algorithm 1 of Agarwal et al., ICLR 2024, arXiv 2306.13649).

    Draws :math:`u \sim \mathcal U[0, 1)` from ``generator``. When :math:`u < \lambda` (so never for
    ``lam=0``, always for ``lam=1``) every sequence keeps its prompt, the tokens before its first label
    other than ``-100`` (only those the attention mask keeps), and its completion is replaced by a
    sample of ``student`` (:func:`sample_completions`); otherwise ``batch`` is returned as it is.

    The new batch is right-padded to the longest prompt + completion with ``pad_token_id``; its
    labels are the completion's tokens and ``-100`` on the prompt and the padding; its attention
    mask is 1 on prompt and completion, 0 on the padding; ``index`` is kept. The student samples in
    eval mode under ``no_grad``; the training mode of each of its modules is restored afterwards.

    Args:
        student: a causal LM taking ``input_ids`` (and ``attention_mask``), its output holding logits.
        batch: a :class:`~distill.batch.TokenBatch` with labels ``(B, L)``; its only other model input
            may be ``attention_mask`` (a decoder-only model's batch).
        lam: the student data fraction :math:`\lambda \in [0, 1]`.
        temperature: the student's sampling temperature (``0``: greedy).
        max_new_tokens: the longest completion sampled.
        generator: the source of every random number (the draw of ``u`` and the samples).
        pad_token_id: the padding token of the new batch.
        eos_token_id: the token(s) that end a completion (kept, with its label), or ``None``.

    Returns:
        A :class:`~distill.batch.TokenBatch` (``batch`` itself when the draw keeps it).

    Raises:
        ValueError: a bad argument, a batch without labels, a row whose first label is at position 0
            (no prompt), or model inputs other than ``attention_mask`` (e.g. an encoder-decoder's
            ``decoder_input_ids``: not supported).
    """
    lam = _check_lam(lam)
    temperature = _check_temperature(temperature)
    max_new_tokens = _check_max_new_tokens(max_new_tokens)
    pad = _check_token_id(pad_token_id, "pad_token_id")
    _check_eos(eos_token_id)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(batch, TokenBatch):
        raise TypeError(f"on-policy sampling needs a TokenBatch (input_ids, labels, attention_mask), got "
                        f"{type(batch).__name__}")
    if batch.targets is None:
        raise ValueError("on-policy sampling needs the batch's labels: the prompt is what precedes the first label "
                         "other than -100")
    others = sorted(set(batch.model_kwargs) - {"attention_mask"})
    if others:
        raise ValueError(f"on-policy sampling rebuilds input_ids and attention_mask only, but the batch has the model "
                         f"inputs {others} too (encoder-decoder and other models are not supported)")
    labels, ids = batch.targets, batch.inputs
    if labels.shape != ids.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but input_ids {tuple(ids.shape)}")
    u = float(torch.rand((), generator=generator, device=generator.device))
    if not u < lam:
        return batch
    starts = prompt_lengths(labels)
    if bool((starts == 0).any()):
        row = int((starts == 0).nonzero()[0, 0])
        raise ValueError(f"row {row} of the batch has a label at position 0: it has no prompt for the student "
                         "to continue (mark the prompt's labels -100)")
    mask = batch.attention_mask
    keep = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    prompts = [ids[b, : int(starts[b])][keep[b, : int(starts[b])]] for b in range(ids.shape[0])]
    for b, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(f"row {b} of the batch has no attended prompt token before its first label")

    modes = {m: m.training for m in student.modules()}
    student.eval()
    try:
        completions = sample_completions(student, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                                         generator=generator, pad_token_id=pad, eos_token_id=eos_token_id)
    finally:
        for m, mode in modes.items():
            m.training = mode

    width = max(int(p.numel() + c.numel()) for p, c in zip(prompts, completions))
    n = ids.shape[0]
    new_ids = torch.full((n, width), pad, dtype=ids.dtype, device=ids.device)
    new_labels = torch.full((n, width), IGNORE, dtype=labels.dtype, device=labels.device)
    new_mask = torch.zeros((n, width), dtype=mask.dtype if mask is not None else torch.long, device=ids.device)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        k, m = int(p.numel()), int(c.numel())
        new_ids[b, :k] = p
        new_ids[b, k: k + m] = c
        new_labels[b, k: k + m] = c
        new_mask[b, : k + m] = 1
    return replace(batch, inputs=new_ids, targets=new_labels, model_kwargs={"attention_mask": new_mask})


class OnPolicy:
    """GKD's data step as a batch transform (:func:`distill.fit`'s ``batch_transform``, the
    :class:`~distill.train.hf_trainer.DistillTrainer`'s ``batch_transform``).

    Each call applies :func:`on_policy_batch` to one batch with a fresh generator seeded with
    ``mix_seed(seed, epoch, i)``, ``i`` counting the calls since the last :meth:`set_epoch` (``fit``
    calls it at each epoch start; the Trainer with each optimizer step's number): the draws depend
    on where a batch falls in the run, not on what ran before, so a resumed run samples the same
    sequences. ``on_policy`` and ``batches`` count the batches that were sampled and all batches.

    Args:
        student: the model being trained (the one the Distiller holds).
        lam: the student data fraction λ (1: on-policy GKD, the paper's Algorithm 1 with λ = 1;
            0: supervised KD on the batches as given).
        temperature: the sampling temperature (the paper samples from the student at 1).
        max_new_tokens: the longest completion (a budget of this library, not the paper's).
        pad_token_id, eos_token_id: the tokenizer's padding and end-of-sequence tokens.
        seed: the run's seed.
        device: where the generators live (default the CPU; draws are small).
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        lam: float = 1.0,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        pad_token_id: int,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        self.student = student
        self.lam = _check_lam(lam)
        self.temperature = _check_temperature(temperature)
        self.max_new_tokens = _check_max_new_tokens(max_new_tokens)
        self.pad_token_id = _check_token_id(pad_token_id, "pad_token_id")
        _check_eos(eos_token_id)
        self.eos_token_id = eos_token_id
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.device = torch.device(device)
        self.epoch = 0
        self.calls = 0
        self.on_policy = 0
        self.batches = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the draws of ``epoch`` (or of one Trainer step): the next batch is number 0."""
        self.epoch = int(epoch)
        self.calls = 0

    def __call__(self, batch: TokenBatch) -> TokenBatch:
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, self.epoch, self.calls))
        self.calls += 1
        out = on_policy_batch(self.student, batch, lam=self.lam, temperature=self.temperature,
                              max_new_tokens=self.max_new_tokens, generator=generator,
                              pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id)
        self.batches += 1
        self.on_policy += int(out is not batch)
        return out

    def __repr__(self) -> str:
        return (f"OnPolicy(lam={self.lam}, temperature={self.temperature}, max_new_tokens={self.max_new_tokens}, "
                f"pad_token_id={self.pad_token_id}, eos_token_id={self.eos_token_id}, seed={self.seed})")


# ---------------------------------------------------------------------------------------- the strategy


@register_strategy("gkd", "llm", PAPER)
def gkd(
    student: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    lam: float = 1.0,
    beta: float = 0.5,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None = None,
    losses: Mapping[str, Any] | None = None,
    **fit_kwargs: Any,
) -> FitResult:
    r"""GKD: the student trained on a λ-mixture of its own samples and the data, toward the teacher's tokens.

    Each training batch passes through :class:`OnPolicy` (with probability ``lam`` its completions
    are sampled from the current student) and the student minimises the generalized JSD
    :math:`\mathrm{JSD}_\beta(p_T \,\|\, p_S)` per token, averaged over the completion's tokens
    (the registered method ``gkd`` of :mod:`distill.methods.tokens` with ``beta``), by
    :func:`distill.fit`.

    Args:
        student: the causal LM being trained (an ``nn.Module`` or a zero-argument factory).
        train_loader: yields Hugging Face batches (``input_ids``, ``attention_mask``, ``labels`` with
            ``-100`` on the prompt and the padding, optionally ``index``).
        val_loader: evaluated by ``fit`` after each epoch, or ``None``.
        teacher: the teacher LM or teacher source (same vocabulary as the student).
        epochs, run_dir, seed, progress: as in :func:`distill.fit`.
        lam: the student data fraction λ (default 1: on-policy GKD).
        beta: β of the generalized JSD (0.5, the symmetric JSD, the ``gkd`` method's default).
        temperature: the student's sampling temperature (1 in the paper; 0: greedy).
        max_new_tokens: the longest sampled completion (this library's budget).
        pad_token_id, eos_token_id: the tokenizer's padding and end-of-sequence tokens.
        losses: the Distiller's losses instead of ``{"gkd": {"beta": beta}}`` (any token-level
            method; then ``beta`` must stay at its default).
        **fit_kwargs: passed to :func:`distill.fit` (optimizer, lr, schedule, amp...).

    Returns:
        ``fit``'s :class:`~distill.train.FitResult` of the student.
    """
    model = as_model(student, "gkd")
    if teacher is None:
        raise ValueError("gkd needs a teacher (the model whose token distributions the student learns)")
    if "batch_transform" in fit_kwargs:
        raise ValueError("gkd makes its own batch_transform (the on-policy sampling); do not pass one")
    if losses is not None and beta != 0.5:
        raise ValueError(f"beta={beta!r} sets the default loss {{'gkd': {{'beta': ...}}}}; with losses given, put it "
                         "inside them")
    if losses is None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        losses = {"gkd": {"beta": float(beta)}}
    transform = OnPolicy(model, lam=lam, temperature=temperature, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, seed=seed)
    distiller = Distiller(model, teacher, losses)
    return fit(distiller, train_loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
               batch_transform=transform, **fit_kwargs)
