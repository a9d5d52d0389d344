"""Retrieval distillation on real text: all-MiniLM-L6-v2 → a 2-layer dual encoder, with and without
DiDE, ERNIE-Search and ALADIN.

    .venv/bin/python examples/language/retrieval.py            # 512 pairs, 5 epochs (--threads 1 on a busy machine)
    .venv/bin/python examples/language/retrieval.py --quick    # a few seconds

Data: the Python standard library's docstrings, each split into a query (its first sentence) and a
passage (the rest) by :func:`distill.data.retrieval.query_passage_pairs`; train and test come from
different top-level packages (:func:`distill.data.corpus.split_passages`).

Teacher (frozen): all-MiniLM-L6-v2 scoring a pair by *late interaction* over its contextual token
embeddings (ColBERT's MaxSim, averaged over query tokens, cosine): every query token meets every
passage token. Why not the pair concatenated through the model ("[CLS] q [SEP] p [SEP]")? The
checkpoint is a bi-encoder with no trained relevance head, so a joint score would be untrained; its
token embeddings, on the other hand, are trained (their mean is its sentence embedding). The
joint pass is used for what it does give: its last layer's attention between the query's and the
passage's tokens, the "fusion" attention DiDE and ERNIE-Search distil.

Student: a 2-layer BERT (hidden 128, 2 heads, MiniLM's tokenizer, random init) as a dual encoder
(mean-pooled, L2-normalised; score = cosine / 0.05). Every student trains with the in-batch
contrastive loss; the distilled ones add one method (same seed, data order and steps).

Measured: nDCG@10 of the student's ranking of all test passages for each test query against the
teacher's ranking (the teacher's top 10 as graded relevance 10..1; sklearn's ``ndcg_score``), the
mean reciprocal rank of the query's own passage, and encode time student ÷ teacher.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.batch import Batch
from distill.data.corpus import split_passages, stdlib_docstrings
from distill.data.retrieval import query_passage_pairs
from distill.functional import retrieval as FR
from distill.integrations.minilm import load_minilm
from distill.methods import create_method

SCORE_T = 0.05           # cosine / 0.05: the scale of every score matrix, student's and teacher's


@dataclass
class Config:
    n_train: int = 512
    n_test: int = 200
    q_len: int = 24
    p_len: int = 48
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    methods: tuple[str, ...] = ("baseline", "dide", "ernie_search", "aladin")
    modules: tuple[str, ...] | None = None      # None: the whole standard library
    timing_reps: int = 5


QUICK = Config(n_train=32, n_test=16, q_len=12, p_len=16, epochs=1, batch_size=16,
               modules=("json", "textwrap", "argparse", "collections", "functools", "pathlib", "string", "typing"),
               timing_reps=1)


# ------------------------------------------------------------------------------------------ data

def _pairs(cfg: Config):
    docs = stdlib_docstrings(modules=None if cfg.modules is None else list(cfg.modules))
    train_p, test_p = split_passages(docs, held_out=0.3 if cfg.modules else 0.2, seed=cfg.seed)
    train = query_passage_pairs(train_p, limit=cfg.n_train)
    test = query_passage_pairs(test_p, limit=cfg.n_test)
    if len(train) < cfg.n_train or len(test) < cfg.n_test:
        raise ValueError(f"asked for {cfg.n_train}/{cfg.n_test} pairs, the corpus gives {len(train)}/{len(test)}")
    return train, test


def _tokenize(tok, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    return dict(tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"))


@torch.inference_mode()
def _token_states(model, enc: dict[str, torch.Tensor], bs: int = 64) -> torch.Tensor:
    out = [model(input_ids=enc["input_ids"][i:i + bs], attention_mask=enc["attention_mask"][i:i + bs]).last_hidden_state
           for i in range(0, len(enc["input_ids"]), bs)]
    return torch.cat(out)


@torch.inference_mode()
def _fusion_attention(model, q: dict[str, torch.Tensor], p: dict[str, torch.Tensor], bs: int = 32):
    """The teacher's last-layer attention (mean over heads) between the tokens of each pair encoded
    jointly as ``[CLS] q [SEP] p [SEP]``, laid out on the separate encodings' positions:
    ``q2p`` ``(N, Lq, Lp)`` (column 0, the passage's own [CLS], gets no mass) and ``p2q``
    ``(N, Lp, Lq)``; each row renormalised over the other text's tokens."""
    n, lq, lp = q["input_ids"].shape[0], q["input_ids"].shape[1], p["input_ids"].shape[1]
    q2p, p2q = torch.zeros(n, lq, lp), torch.zeros(n, lp, lq)
    qlen, plen = q["attention_mask"].sum(1), p["attention_mask"].sum(1)
    for start in range(0, n, bs):
        idx = range(start, min(n, start + bs))
        seqs = [torch.cat([q["input_ids"][i, :qlen[i]], p["input_ids"][i, 1:plen[i]]]) for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        types = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, (i, s) in enumerate(zip(idx, seqs)):
            ids[j, :len(s)], mask[j, :len(s)], types[j, int(qlen[i]):len(s)] = s, 1, 1
        att = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True).attentions[-1]
        att = att.mean(1)                                               # (b, width, width)
        for j, i in enumerate(idx):
            a, b = int(qlen[i]), int(plen[i]) - 1                       # query tokens, passage tokens after [CLS]
            block = att[j, :a, a:a + b]
            q2p[i, :a, 1:1 + b] = block / block.sum(-1, keepdim=True)
            back = att[j, a:a + b, :a]
            p2q[i, 1:1 + b, :a] = back / back.sum(-1, keepdim=True)
    return q2p, p2q


# ------------------------------------------------------------------------------------------ student

def _student(cfg: Config, vocab: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(cfg.seed)
    conf = BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=256, max_position_embeddings=max(cfg.q_len, cfg.p_len),
                      attn_implementation="eager")
    return BertModel(conf)


def _encode(student, enc: dict[str, torch.Tensor], hidden: bool = False):
    out = student(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=hidden)
    tokens = out.last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    pooled = F.normalize((tokens * m).sum(1) / m.sum(1), dim=-1)
    return pooled, tokens, out.hidden_states


def _cross_attention_logits(student, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """DiDE's student-side cross-modal attention: the last layer's query projection of one text's
    states against the key projection of the other's (``xs`` ``(B, Lx, H)`` and ``ys`` ``(B, Ly, H)``:
    the inputs of the last layer), per head, averaged over heads as probabilities; returned as the
    log of that mean ``(B, Lx, Ly)`` (a valid logit for a softmax over ``Ly``)."""
    att = student.encoder.layer[-1].attention.self
    heads = student.config.num_attention_heads
    dh = xs.shape[-1] // heads
    q = att.query(xs).view(*xs.shape[:2], heads, dh).transpose(1, 2)
    k = att.key(ys).view(*ys.shape[:2], heads, dh).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1).mean(1)
    return torch.log(probs.clamp_min(1e-12))


def _train(cfg: Config, name: str, vocab: int, data: dict) -> torch.nn.Module:
    student = _student(cfg, vocab)
    method = None if name == "baseline" else create_method(
        name, **({"query_mask": "qmask", "passage_mask": "pmask"} if name in ("dide", "ernie_search") else {}))
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    order_rng = random.Random(cfg.seed)
    n = data["q"]["input_ids"].shape[0]
    dummy = Batch(torch.zeros(cfg.batch_size, 1), None)
    student.train()
    for _ in range(cfg.epochs):
        order = list(range(n))
        order_rng.shuffle(order)
        for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            idx = torch.tensor(order[start:start + cfg.batch_size])
            q = {k: v[idx] for k, v in data["q"].items()}
            p = {k: v[idx] for k, v in data["p"].items()}
            q_vec, q_tok, q_hid = _encode(student, q, hidden=name == "dide")
            p_vec, p_tok, p_hid = _encode(student, p, hidden=name == "dide")
            scores = q_vec @ p_vec.T / SCORE_T                           # (B, B), positives on the diagonal
            loss = FR.in_batch_contrastive(scores)
            teacher = {"logits": data["teacher_scores"][idx][:, idx] / SCORE_T,
                       "qmask": q["attention_mask"].bool(), "pmask": data["pmask"][idx]}
            view = {"logits": scores}
            if name == "ernie_search":
                late = FR.late_interaction(q_tok, p_tok, q["attention_mask"], p["attention_mask"], reduce="mean")
                view["late_logits"] = late / SCORE_T
                u, v = F.normalize(q_tok, dim=-1), F.normalize(p_tok, dim=-1)
                view["interaction"] = torch.einsum("bad,bld->bal", u, v) / SCORE_T
                teacher["attention"] = data["q2p"][idx]
                loss = loss + FR.in_batch_contrastive(view["late_logits"])   # the on-the-fly late-interaction model
            elif name == "dide":
                view["q2p"] = _cross_attention_logits(student, q_hid[-2], p_hid[-2])
                view["p2q"] = _cross_attention_logits(student, p_hid[-2], q_hid[-2])
                teacher["q2p"], teacher["p2q"] = data["q2p"][idx], data["p2q"][idx]
            if method is not None:
                loss = loss + method.weight * method(view, teacher, dummy)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return student.eval()


# ------------------------------------------------------------------------------------------ evaluation

def _ndcg_against_teacher(student_scores: torch.Tensor, teacher_scores: torch.Tensor, k: int = 10) -> float:
    from sklearn.metrics import ndcg_score

    ranks = teacher_scores.argsort(dim=1, descending=True)
    gains = torch.zeros_like(teacher_scores)
    top = min(k, teacher_scores.shape[1])
    gains.scatter_(1, ranks[:, :top], torch.arange(top, 0, -1, dtype=gains.dtype).expand(len(gains), top))
    return float(ndcg_score(gains.numpy(), student_scores.numpy(), k=k))


def _mrr(scores: torch.Tensor) -> float:
    own = scores.diagonal().unsqueeze(1)
    return float((1.0 / ((scores > own).sum(1) + 1).float()).mean())


def _interleaved_times(teacher_fn, student_fn, reps: int = 5) -> tuple[float, float]:
    """Median seconds of each, measured alternately so load changes on the machine hit both alike."""
    teacher_fn(), student_fn()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((teacher_fn, times[0]), (student_fn, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def run(cfg: Config, log=print) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train, test = _pairs(cfg)
    teacher, tok = load_minilm(attn_implementation="eager")
    enc = {split: (_tokenize(tok, [x.query for x in pairs], cfg.q_len), _tokenize(tok, [x.passage for x in pairs], cfg.p_len))
           for split, pairs in (("train", train), ("test", test))}

    def teacher_scores(split: str) -> torch.Tensor:
        q, p = enc[split]
        return FR.late_interaction(_token_states(teacher, q), _token_states(teacher, p), q["attention_mask"],
                                   p["attention_mask"], reduce="mean")

    q_tr, p_tr = enc["train"]
    q2p, p2q = _fusion_attention(teacher, q_tr, p_tr)
    pmask = p_tr["attention_mask"].bool().clone()
    pmask[:, 0] = False                                                  # the passage's [CLS] is not attended across
    data = {"q": q_tr, "p": p_tr, "teacher_scores": teacher_scores("train"), "q2p": q2p, "p2q": p2q, "pmask": pmask}
    q_te, p_te = enc["test"]
    t_test = teacher_scores("test")
    log(f"pairs: {len(train)} train / {len(test)} test (held-out packages); teacher prepared in "
        f"{time.perf_counter() - t_start:.0f}s")

    rows = {"teacher (MiniLM-L6, late interaction)": {"ndcg": 1.0, "mrr": _mrr(t_test)}}
    students = {}
    for name in cfg.methods:
        t0 = time.perf_counter()
        student = _train(cfg, name, len(tok), data)
        with torch.inference_mode():
            sq, _, _ = _encode(student, q_te)
            sp, _, _ = _encode(student, p_te)
        s = sq @ sp.T
        label = "student, contrastive only" if name == "baseline" else f"student + {name}"
        rows[label] = {"ndcg": _ndcg_against_teacher(s, t_test), "mrr": _mrr(s)}
        students[name] = student
        log(f"  {label:30s} nDCG@10 vs teacher {rows[label]['ndcg']:.4f}  own-passage MRR {rows[label]['mrr']:.4f}  "
            f"({time.perf_counter() - t0:.0f}s)")

    student = students[cfg.methods[0]]
    with torch.inference_mode():
        t_teacher, t_student = _interleaved_times(
            lambda: (_token_states(teacher, p_te), _token_states(teacher, q_te)),
            lambda: (_encode(student, p_te), _encode(student, q_te)), reps=cfg.timing_reps)
    return {"rows": rows, "encode_teacher_s": t_teacher, "encode_student_s": t_student,
            "params_teacher": sum(p.numel() for p in teacher.parameters()),
            "params_student": sum(p.numel() for p in student.parameters()),
            "n_train": len(train), "n_test": len(test), "seconds": time.perf_counter() - t_start}


def table(res: dict) -> str:
    lines = ["| model | nDCG@10 vs teacher ranking | MRR of own passage |", "|---|---|---|"]
    for label, r in res["rows"].items():
        lines.append(f"| {label} | {r['ndcg']:.4f} | {r['mrr']:.4f} |")
    ratio = res["encode_student_s"] / res["encode_teacher_s"]
    lines.append("")
    lines.append(f"encode time of the {res['n_test']} test queries + passages: student {res['encode_student_s']:.3f}s, "
                 f"teacher {res['encode_teacher_s']:.3f}s, student ÷ teacher = {ratio:.3f} "
                 f"(parameters {res['params_student'] / 1e6:.1f}M vs {res['params_teacher'] / 1e6:.1f}M)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds: tiny data, one epoch")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--train", type=int, default=None, help="training pairs")
    ap.add_argument("--test", type=int, default=None, help="test queries (and as many passages)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 on a crowded machine)")
    args = ap.parse_args(argv)
    cfg = dataclasses.replace(QUICK if args.quick else Config(), seed=args.seed)
    for key, value in (("epochs", args.epochs), ("n_train", args.train), ("n_test", args.test)):
        if value is not None:
            setattr(cfg, key, value)
    torch.set_num_threads(max(1, args.threads))
    res = run(cfg)
    print(table(res))
    print(f"total {res['seconds']:.0f}s")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
