"""Tiny Hugging Face encoder-decoders built from a config (nothing downloaded), for seq2seq examples and tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["tiny_t5"]


def tiny_t5(vocab_size: int, *, d_model: int = 64, layers: int = 2, decoder_layers: int | None = None, heads: int = 4,
            d_ff: int | None = None, dropout: float = 0.0, seed: int = 0, **config: Any) -> nn.Module:
    """A randomly initialised ``T5ForConditionalGeneration`` (pad 0, EOS 1, decoder start 0: the
    ByT5 byte tokenizer's ids, :func:`distill.data.seq2seq.byte_tokenizer`).

    Attention runs in ``eager`` mode so that ``output_attentions`` returns the cross-attention
    weights ``(B, H, T, S)`` (the ``cross_attentions.N`` taps). T5's relative position buckets make
    the encoder indifferent to left padding, so :func:`distill.generations.generate` (which
    left-pads sources) sees what training sees. ``dropout`` defaults to 0 (attention rows then sum to
    1 in training too).

    Args:
        vocab_size: the tokenizer's ``len``.
        d_model: width; ``d_ff`` (default ``2 · d_model``) the feed-forward width.
        layers, decoder_layers: encoder and decoder depths (decoder default: ``layers``).
        heads: attention heads (``d_kv = d_model // heads``).
        seed: the initialisation seed.
        **config: other ``T5Config`` fields.
    """
    from distill.integrations import require

    transformers = require("transformers", "llm", "a tiny T5")
    if d_model % heads:
        raise ValueError(f"tiny_t5: d_model={d_model} must be a multiple of heads={heads}")
    cfg = transformers.T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads,
                                d_ff=d_ff or 2 * d_model, num_layers=layers,
                                num_decoder_layers=decoder_layers or layers, num_heads=heads, dropout_rate=dropout,
                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                tie_word_embeddings=False, **config)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.T5ForConditionalGeneration(cfg)
    return model
