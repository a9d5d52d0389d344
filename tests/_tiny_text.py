"""A tiny word-level tokenizer and a tiny random Llama for the text tests (nothing downloaded)."""

from __future__ import annotations

from typing import Any

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "explain this text please",
    "the quick brown fox jumps over a lazy dog",
]
CHAT_TEMPLATE = ("{% for m in messages %}[USER] {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}[BOT] {% endif %}")


def tiny_tokenizer(chat: bool = False) -> Any:
    """A WordLevel tokenizer trained on :data:`SENTENCES` (words split on whitespace), with
    ``[PAD]``=0, ``[UNK]``=1, ``[BOS]``=2, ``[EOS]``=3, ``[USER]``=4, ``[BOT]``=5; with ``chat``, a
    chat template ``[USER] <prompt> [BOT] ``."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[USER]", "[BOT]"])
    backend.train_from_iterator(SENTENCES, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                               bos_token="[BOS]", eos_token="[EOS]")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(tokenizer: Any, seed: int = 0) -> Any:
    """A 2-layer random Llama over ``tokenizer``'s vocabulary, in eval mode."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()
