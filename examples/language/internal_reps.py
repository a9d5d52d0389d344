"""Knowledge distillation from internal representations (Aguilar et al., AAAI 2020, arXiv 1910.03723):
a fine-tuned all-MiniLM-L6-v2 teacher (6 layers, 12 heads, width 384) → a 2-layer BERT student of
the same width and heads, on a real offline task (which standard-library package a docstring passage
documents; a stand-in for the paper's GLUE tasks, not available offline).

Arms, same seed, data, steps and optimizer; the student's embeddings start from the teacher's in
every arm (its two transformer layers are random):

  ce+kd            cross-entropy + soft labels (Hinton KD, T=1)
  ce+internal      cross-entropy + internal_reps, schedule "all" (attention KL + [CLS] cosine at the
                   uniform map 1→3, 2→6, plus soft labels)
  internal SID     internal_reps alone, schedule "stacked" (layer 1, then layers 1+2, then soft labels)

    .venv/bin/python examples/language/internal_reps.py            # ~2 minutes on 2 CPU cores
    .venv/bin/python examples/language/internal_reps.py --quick    # a few seconds, a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

import distill
from distill.methods import create_method


def _task_module():
    spec = importlib.util.spec_from_file_location("_docstring_task", Path(__file__).with_name("_docstring_task.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_student(teacher, layers: int = 2, seed: int = 0):
    """A BERT of ``layers`` layers with the teacher's width, heads and vocabulary; embeddings copied;
    no attention dropout in any arm (the attention KL needs the probabilities themselves)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = teacher.config
    config = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=layers,
                        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                        max_position_embeddings=cfg.max_position_embeddings, num_labels=cfg.num_labels,
                        attention_probs_dropout_prob=0.0,  # HF returns attention weights after dropout
                        attn_implementation="eager")
    student = BertForSequenceClassification(config)
    student.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
    return student


def run_arm(name, losses, teacher, T, train_enc, train_y, test_enc, epochs, batch_size, lr, seed):
    student = make_student(teacher, seed=seed)
    d = distill.Distiller(student, teacher, losses=losses)
    first = T.batches(train_enc, train_y, batch_size, seed, 0)[0]
    d.prepare(first)
    opt = torch.optim.AdamW(list(d.trainable_parameters()), lr=lr)
    student.train()
    for epoch in range(epochs):
        d.set_epoch(epoch, epochs)
        for b in T.batches(train_enc, train_y, batch_size, seed, epoch):
            out = d(b)
            out.total.backward()
            opt.step()
            opt.zero_grad()
    return T.predict(student, test_enc)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny data, one epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    T = _task_module()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    t0 = time.time()
    per_class, epochs, teacher_epochs, max_len = (6, 1, 1, 16) if args.quick else (60, args.epochs, 3, 32)
    train_x, train_y, test_x, test_y = T.docstring_task(per_class=per_class, seed=args.seed)
    tok = T.load_tokenizer()
    train_enc, test_enc = T.encode(tok, train_x, max_len), T.encode(tok, test_x, max_len)
    teacher = T.finetune_teacher(train_enc, train_y, epochs=teacher_epochs, seed=args.seed)
    t_logits = T.predict(teacher, test_enc)
    print(f"task: {len(T.PACKAGES)} packages {T.PACKAGES}, {len(train_x)} train / {len(test_x)} test passages; "
          f"teacher all-MiniLM-L6-v2 fine-tuned {teacher_epochs} epochs: test acc {T.accuracy(t_logits, test_y):.3f}")
    n_layers = teacher.config.num_hidden_layers
    arms = {
        "ce+kd": {"ce": 1.0, "kd": create_method("kd", T=1.0)},
        "ce+internal": {"ce": 1.0, "internal": create_method("internal_reps", student_layers=2,
                                                             teacher_layers=n_layers)},
        "internal SID": {"internal": create_method("internal_reps", student_layers=2, teacher_layers=n_layers,
                                                   schedule="stacked", epochs_per_layer=max(1, epochs // 3))},
    }
    results = {"teacher": T.accuracy(t_logits, test_y)}
    print(f"{'student (2 layers)':<18} {'test acc':>8} {'agree w/ teacher':>17}")
    for name, losses in arms.items():
        logits = run_arm(name, losses, teacher, T, train_enc, train_y, test_enc, epochs, 16, 1e-4, args.seed)
        acc, agree = T.accuracy(logits, test_y), T.accuracy(logits, t_logits.argmax(-1))
        results[name] = acc
        print(f"{name:<18} {acc:>8.3f} {agree:>17.3f}")
    print(f"({epochs} epochs per arm, seed {args.seed}, {time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
