"""Noise on token sequences: word drop, word replacement and sentence drop.

The student-side noise of Liu, Shen & Lapata, "Noisy Self-Knowledge Distillation for Text
Summarization" (NAACL 2021, arXiv 2009.07032), applied to a batch of token ids ``(B, L)`` with its
attention mask ``(B, L)`` (1 = a real token). Tokens are the model's sub-word units (the paper
perturbs words); special tokens named in ``keep`` are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["noise_tokens"]


def _rate(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


def noise_tokens(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    drop: float = 0.0,
    replace: float = 0.0,
    sentence_drop: float = 0.0,
    vocab_size: int | None = None,
    keep: Sequence[int] = (),
    sentence_end: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A noisy copy of a batch of token sequences.

    Shapes: ``input_ids`` ``(B, L)`` long, ``attention_mask`` ``(B, L)`` (all ones if ``None``) →
    ``(ids (B, L), mask (B, L))``: the surviving tokens of each row moved to its front in order, the
    rest ``pad_id`` with mask 0.

    * ``sentence_drop``: each sentence (a run of tokens ending with one of ``sentence_end``) is
      removed with this probability (no-op when ``sentence_end`` is empty);
    * ``drop``: each remaining token is removed with this probability;
    * ``replace``: each remaining token is replaced by a token drawn uniformly from
      ``[0, vocab_size)`` minus ``keep`` with this probability.

    Tokens in ``keep`` (BOS, EOS, separators) and padding are never dropped nor replaced, and a row
    never loses all of its droppable tokens (its first one is kept).
    """
    drop, replace, sentence_drop = _rate(drop, "drop"), _rate(replace, "replace"), _rate(sentence_drop, "sentence_drop")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if replace > 0 and (vocab_size is None or vocab_size <= len(set(keep))):
        raise ValueError(f"replace > 0 needs vocab_size larger than the kept special tokens, got {vocab_size!r}")
    device = input_ids.device

    def rand(shape: tuple[int, ...]) -> Tensor:
        return torch.rand(shape, generator=generator, device="cpu").to(device)

    special = torch.isin(input_ids, torch.tensor(list(keep), dtype=input_ids.dtype, device=device)) \
        if keep else torch.zeros_like(mask)
    free = mask & ~special
    alive = mask.clone()
    if sentence_drop > 0 and sentence_end:
        ends = torch.isin(input_ids, torch.tensor(list(sentence_end), dtype=input_ids.dtype, device=device))
        # sentence number of each token: ends counted before it
        sid = torch.cumsum(ends.long(), dim=1) - ends.long()
        n_sent = int(sid.max()) + 1
        gone = rand((input_ids.shape[0], n_sent)) < sentence_drop
        alive &= ~(gone.gather(1, sid) & free)
    if drop > 0:
        alive &= ~((rand(tuple(input_ids.shape)) < drop) & free)
    # never empty a row of its content: keep its first free token if every free token went
    emptied = (free.any(1) & ~(alive & free).any(1)).nonzero().squeeze(1)
    if emptied.numel():
        first = free.long().argmax(1)
        alive[emptied, first[emptied]] = True
    ids = input_ids.clone()
    if replace > 0:
        assert vocab_size is not None
        hit = (rand(tuple(ids.shape)) < replace) & free & alive
        n = int(hit.sum())
        if n:
            allowed = torch.ones(vocab_size, dtype=torch.bool)
            allowed[[i for i in keep if 0 <= i < vocab_size]] = False
            pool = allowed.nonzero().squeeze(1)
            pick = torch.randint(len(pool), (n,), generator=generator)
            ids[hit] = pool[pick].to(device=device, dtype=ids.dtype)
    # pack the survivors to the front of each row
    order = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)
    packed = ids.gather(1, order)
    new_mask = alive.gather(1, order)
    packed = torch.where(new_mask, packed, torch.full_like(packed, pad_id))
    out_mask = new_mask.to(attention_mask.dtype if attention_mask is not None else torch.long)
    return packed, out_mask

