"""Tiny Hugging Face language models and tokenizers built in the test, for the LM tests (never the
real SmolLM2: nothing is downloaded or loaded from a wheel)."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SAMPLE_TEXT = [
    "Return the number of items in a container. The container may be a sequence or a collection.",
    "Open a file and return a stream. Raise OSError upon failure; the mode defaults to reading text.",
    "Split the string at the first occurrence of sep, and return a 3-tuple of the parts.",
    "Wait for a signal: suspend execution of the calling thread until one of the signals is delivered.",
]


def byte_tokenizer(vocab_size: int = 320, texts: list[str] | None = None):
    """A byte-level BPE tokenizer (any text encodes) trained in a fraction of a second, with pad/eos
    tokens and a chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or SAMPLE_TEXT * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(vocab_size: int, *, seed: int = 0, hidden: int = 32, layers: int = 2, **config):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=hidden // 4, max_position_embeddings=512, pad_token_id=0,
                                   eos_token_id=1, bos_token_id=None, tie_word_embeddings=True, **config)
    return transformers.LlamaForCausalLM(cfg).eval()


def saved_teacher(folder: Path, *, seed: int = 0) -> Path:
    """A tiny causal LM and its tokenizer saved with save_pretrained into ``folder``."""
    tokenizer = byte_tokenizer()
    model = tiny_causal_lm(len(tokenizer), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def scaled_llama(seed: int, vocab_size: int, head_scale: float = 1.0):
    """A 2-layer random Llama (hidden 32) whose lm_head is scaled by ``head_scale``: wider margins
    between the logits (no near-ties in greedy tests; a peaked teacher, a KL far from 0)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model.eval()
