"""Distilling word embeddings by encoding (Mou et al., CIKM 2016, arXiv 1506.04488) on real text, offline.

Task: which standard-library package (asyncio, email, logging, http) a docstring passage documents
(``_docstring_task.py``), read as a bag of WordPiece tokens. Teacher: a mean-of-embeddings
classifier whose 384-d table starts from the real pretrained all-MiniLM-L6-v2 word embeddings
(30,522 x 384) and is tuned on the task (the paper encodes a cumbersome model's task-tuned
embeddings). Students: a mean-of-embeddings classifier
with 32-d word vectors,

* ``random 32-d``: its table randomly initialised and trained on the task (the paper's baseline);
* ``encoded 32-d``: its table is ``tanh(E_MiniLM W^T + b)``, ``W`` (32 x 384) trained on the task,
  then baked into a plain 32-d table (strategy ``embedding_encoding``);
* ``encoded + softmax``: the same, also matching the softmax of a teacher classifier that reads
  the 384-d table (the paper's combination with matching softmax).

Same seed, optimiser and epochs for every student. Run::

    .venv/bin/python examples/language/word_embeddings.py            # a few minutes (459 s wall on a shared, overloaded machine)
    .venv/bin/python examples/language/word_embeddings.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch
from torch import nn

import distill
from distill.data import InMemoryLoader
from distill.models.sequence import BagOfEmbeddings
from distill.strategies.word_embeddings import fit_embedding_encoding
from distill.train.evaluate import evaluate


def _task_module():
    spec = importlib.util.spec_from_file_location("_docstring_task", Path(__file__).with_name("_docstring_task.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minilm_word_table(model_dir: str) -> torch.Tensor:
    """all-MiniLM-L6-v2's word-embedding table ``(30522, 384)``, read from its safetensors file."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    key = next(k for k in weights if k.endswith("embeddings.word_embeddings.weight"))
    return weights[key].float()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data and few epochs")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.time()
    task = _task_module()
    per_class, epochs = (8, 2) if args.quick else (None, args.epochs)
    tr_x, tr_y, te_x, te_y = task.docstring_task(max_words=40, per_class=per_class, seed=args.seed)
    tok = task.load_tokenizer()
    train_ids = task.encode(tok, tr_x)["input_ids"]
    test_ids = task.encode(tok, te_x)["input_ids"]
    table = minilm_word_table(task.minilm_dir())
    vocab, k = table.shape[0], len(task.PACKAGES)
    train = InMemoryLoader(train_ids, torch.tensor(tr_y), 32, shuffle=True, seed=args.seed)
    test = InMemoryLoader(test_ids, torch.tensor(te_y), 64, shuffle=False)
    fit_kw = dict(epochs=epochs, optimizer="adam", lr=1e-2, weight_decay=0.0, schedule="cosine", seed=args.seed,
                  progress=False, eval_teacher=False)

    # the cumbersome model: 384-d embeddings initialised from MiniLM and tuned on the task (the paper
    # encodes such task-tuned embeddings); its tuned table is what the students' encoder reads
    torch.manual_seed(args.seed)
    teacher = BagOfEmbeddings(k, embedding=nn.Embedding.from_pretrained(table.clone(), freeze=False))
    t_res = distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), train, test, **{**fit_kw, "lr": 3e-3})
    table = teacher.embedding.weight.detach().clone()

    torch.manual_seed(args.seed)
    plain = BagOfEmbeddings(k, vocab_size=vocab, dim=args.dim)
    p_res = distill.fit(distill.Distiller(plain, None, {"ce": 1.0}), train, test, **fit_kw)

    torch.manual_seed(args.seed)
    enc = BagOfEmbeddings(k, vocab_size=vocab, dim=args.dim)
    e_res = fit_embedding_encoding(enc, train, test, teacher_table=table, **fit_kw)

    torch.manual_seed(args.seed)
    enc_kd = BagOfEmbeddings(k, vocab_size=vocab, dim=args.dim)
    k_res = fit_embedding_encoding(enc_kd, train, test, teacher_table=table, teacher=teacher, kd=1.0, T=2.0,
                                   **fit_kw)

    baked = evaluate(distill.Distiller(enc, None, {"ce": 1.0}), test,
                                            with_teacher=False)["student_acc"]
    print(f"package-of-docstring task: {len(tr_y)} train / {len(te_y)} test passages, {k} classes, "
          f"{epochs} epochs each (adam, cosine)")
    print(f"{'model':<34}{'word-table params':>18}{'test acc last':>15}{'best':>8}")
    rows = [(f"teacher: MiniLM table {table.shape[1]}-d, tuned", table.numel(), t_res),
            (f"student: random {args.dim}-d", vocab * args.dim, p_res),
            (f"student: encoded {args.dim}-d (Mou)", vocab * args.dim, e_res),
            (f"student: encoded {args.dim}-d + softmax", vocab * args.dim, k_res)]
    for name, params, res in rows:
        print(f"{name:<34}{params:>18,}{res.last_acc:>14.1f}%{res.best_acc:>7.1f}%")
    print(f"encoded student after baking its table into nn.Embedding: {baked:.1f}% (same as before baking)")
    print(f"({time.time() - t0:.0f} s)")
    return {"teacher": t_res.last_acc, "random": p_res.last_acc, "encoded": e_res.last_acc,
            "encoded_kd": k_res.last_acc, "baked": baked}


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
