"""Distilling a fine-tuned BERT-style encoder into a BiLSTM (Tang et al. 2019, arXiv 1903.12136):
logit squared error on the teacher's logits, on the training set enlarged by the paper's augmentation
(masking, same-class word replacement, n-gram sampling), the new sentences labelled by the teacher.

Task (offline, real text): which standard-library package a docstring passage documents (4 classes),
standing in for SST-2 / QQP / MNLI, which are not available offline. Teacher: all-MiniLM-L6-v2 with a
classification head, fine-tuned here. Student: the paper's single-layer BiLSTM (300-d embeddings,
150 hidden units per direction, 200-unit ReLU layer) over a word vocabulary of the training set.

Arms, same seed, optimizer and number of steps (batch 50):

  ce (no teacher)       cross-entropy on the labels of the training set
  logit_mse             the paper's distillation term on the training set (teacher logits)
  logit_mse + augment   the same on the training set plus its augmented sentences (n_iter=20,
                        p_mask=p_pos=0.1, p_ng=0.25: the paper's defaults)

    .venv/bin/python examples/language/bert_to_bilstm.py            # ~2 minutes on 2 idle CPU cores
    .venv/bin/python examples/language/bert_to_bilstm.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

import distill
from distill.batch import Batch, View
from distill.data.augment_text import MASK_TOKEN, augment_texts, split_words
from distill.methods import create_method
from distill.models import create
from distill.teachers import TeacherSource

PAD, UNK = "[PAD]", "[UNK]"


def _task_module():
    spec = importlib.util.spec_from_file_location("_docstring_task", Path(__file__).with_name("_docstring_task.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LogitTable(TeacherSource):
    """The teacher's logits computed once per training sentence, read by ``batch.index`` (the BiLSTM
    reads word ids, the teacher WordPiece ids, so the teacher cannot run on the student's batch)."""

    static = True

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, batch: Batch) -> View:
        return {"logits": self.logits[batch.index]}


def build_vocab(texts: list[str]) -> dict[str, int]:
    vocab = {PAD: 0, UNK: 1, MASK_TOKEN: 2}
    for t in texts:
        for w in split_words(t):
            vocab.setdefault(w.lower() if w != MASK_TOKEN else w, len(vocab))
    return vocab


def word_ids(texts: list[str], vocab: dict[str, int], max_len: int = 64) -> dict[str, torch.Tensor]:
    rows = [[vocab.get(w.lower() if w != MASK_TOKEN else w, 1) for w in split_words(t)][:max_len] or [1]
            for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def train_student(losses, teacher, enc, labels, vocab_size, steps, batch_size, seed):
    torch.manual_seed(seed)
    student = create("bilstm_tang", vocab_size=vocab_size, num_classes=4)
    d = distill.Distiller(student, teacher, losses=losses)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    n, y = enc["input_ids"].shape[0], torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    student.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        lens = enc["attention_mask"][idx].sum(1).max()
        out = d({"input_ids": enc["input_ids"][idx, :lens], "attention_mask": enc["attention_mask"][idx, :lens],
                 "labels": y[idx], "index": idx})
        out.total.backward()
        opt.step()
        opt.zero_grad()
    return student


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data and few steps")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--n-iter", type=int, default=20, help="augmented sentences per sentence (paper: 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    T = _task_module()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    t0 = time.time()
    per_class, steps, n_iter, teacher_epochs = (6, 5, 2, 1) if args.quick else (60, args.steps, args.n_iter, 3)
    train_x, train_y, test_x, test_y = T.docstring_task(max_words=24, per_class=per_class, seed=args.seed)
    tok = T.load_tokenizer()
    teacher = T.finetune_teacher(T.encode(tok, train_x, 32), train_y, epochs=teacher_epochs, seed=args.seed)
    t_test = T.predict(teacher, T.encode(tok, test_x, 32))
    augmented = [text for _, text in augment_texts(train_x, n_iter=n_iter, seed=args.seed)]
    t_train = T.predict(teacher, T.encode(tok, train_x, 32))
    t_aug = T.predict(teacher, T.encode(tok, augmented, 32)) if augmented else t_train[:0]
    print(f"task: {len(T.PACKAGES)} packages {T.PACKAGES}, {len(train_x)} train / {len(test_x)} test passages "
          f"(first 24 words); {len(augmented)} augmented sentences labelled by the teacher")
    print(f"teacher all-MiniLM-L6-v2 fine-tuned {teacher_epochs} epochs: test acc {T.accuracy(t_test, test_y):.3f}")
    print("e.g. augmented:", augmented[0] if augmented else "-")
    vocab = build_vocab(train_x)
    test_enc = word_ids(test_x, vocab)
    plain = word_ids(train_x, vocab)
    both = word_ids(train_x + augmented, vocab)
    unlabelled = [-1] * len(augmented)  # the paper: the teacher's label stands in (logit_mse's CE term)
    arms = {
        "ce (no teacher)": ({"ce": 1.0}, None, plain, train_y),
        "logit_mse": ({"mse": create_method("logit_mse")}, LogitTable(t_train), plain, train_y),
        "logit_mse + augment": ({"mse": create_method("logit_mse")}, LogitTable(torch.cat([t_train, t_aug])), both,
                                train_y + unlabelled),
    }
    results = {"teacher": T.accuracy(t_test, test_y)}
    print(f"{'BiLSTM student':<22} {'test acc':>8} {'agree w/ teacher':>17}")
    for name, (losses, teacher_src, enc, labels) in arms.items():
        student = train_student(losses, teacher_src, enc, labels, len(vocab), steps, 50, args.seed)
        logits = T.predict(student, test_enc)
        results[name] = T.accuracy(logits, test_y)
        print(f"{name:<22} {results[name]:>8.3f} {T.accuracy(logits, t_test.argmax(-1)):>17.3f}")
    print(f"({steps} steps of 50 per arm, seed {args.seed}, {time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
