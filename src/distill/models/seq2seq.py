"""Tiny Hugging Face encoder-decoders built from a config (nothing downloaded), for seq2seq examples and tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["tiny_marian", "tiny_t5"]


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


def tiny_marian(vocab_size: int, *, d_model: int = 64, layers: int = 2, decoder_layers: int | None = None,
                heads: int = 4, d_ff: int | None = None, max_positions: int = 128, dropout: float = 0.0, seed: int = 0,
                **config: Any) -> nn.Module:
    """A randomly initialised ``MarianMTModel`` (the Marian NMT transformer) with the ids of
    :func:`tiny_t5` (pad 0, EOS 1, decoder start 0; no BOS), for tokenizers built with those ids
    (:func:`distill.data.seq2seq.byte_tokenizer`, :func:`distill.data.seq2seq.bpe_tokenizer`).

    Marian adds the **same sinusoidal absolute positions** to encoder and decoder inputs and ties
    the token table of encoder, decoder and output layer, so decoder position ``t`` finds source
    position ``t`` by position alone and a logit is the dot product of the state with the token's
    embedding: tiny Marians learn to copy spans in a few hundred steps, where tiny T5s (whose
    cross-attention sees no position) plateau. The price: positions count from the first column,
    so a **left-padded** source is seen shifted (``distill.generations.generate`` left-pads): feed
    sources of one length, or right-pad, when generation must see what training saw. Attention
    runs in ``eager`` mode so that ``output_attentions`` returns the cross-attention weights
    ``(B, H, T, S)`` (the ``cross_attentions.N`` taps); all dropouts default to 0.

    Args:
        vocab_size: the tokenizer's ``len``.
        d_model: width; ``d_ff`` (default ``2 · d_model``) the feed-forward width.
        layers, decoder_layers: encoder and decoder depths (decoder default: ``layers``).
        heads: attention heads (``d_model`` must be a multiple).
        max_positions: the longest source or target (tokens) the position tables cover.
        seed: the initialisation seed.
        **config: other ``MarianConfig`` fields.
    """
    from distill.integrations import require

    transformers = require("transformers", "llm", "a tiny Marian")
    if d_model % heads:
        raise ValueError(f"tiny_marian: d_model={d_model} must be a multiple of heads={heads}")
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"tiny_marian: max_positions must be an int >= 1; got {max_positions!r}")
    ff = d_ff or 2 * d_model
    cfg = transformers.MarianConfig(vocab_size=vocab_size, d_model=d_model, encoder_layers=layers,
                                    decoder_layers=decoder_layers or layers, encoder_attention_heads=heads,
                                    decoder_attention_heads=heads, encoder_ffn_dim=ff, decoder_ffn_dim=ff,
                                    max_position_embeddings=max_positions, dropout=dropout, attention_dropout=dropout,
                                    activation_dropout=dropout, pad_token_id=0, eos_token_id=1,
                                    decoder_start_token_id=0, forced_eos_token_id=None, scale_embedding=True,
                                    share_encoder_decoder_embeddings=True, tie_word_embeddings=True, **config)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.MarianMTModel(cfg)
    return model
