"""Adversarial imitation KD for event detection: a student encoder imitates, through a discriminator, the
representation of a teacher encoder that read the gold annotations.

J. Liu, Y. Chen, K. Liu, "Exploiting the Ground-Truth: An Adversarial Imitation Based Knowledge
Distillation Approach for Event Detection", AAAI 2019 (no arXiv version). Four parts: the teacher encoder
``E_tea`` (words + gold annotations), the student encoder ``E_stu`` (words only), the discriminator ``D``
and the event classifier ``C``. Stage 1 trains ``E_tea`` + ``C`` for detection; stage 2 has ``D`` and
``E_stu`` contest (``D`` tells teacher features from student features, ``E_stu`` learns to fool it) while
``E_stu`` + ``C`` keeps detecting; at test time ``E_stu`` + ``C`` tags raw text. Only the abstract and
the architecture figure's caption could be read here (not the method section): the losses' forms
(binary cross-entropy per token, non-saturating for the student), their weights, the frozen shared ``C``
and the discriminator are ours.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.adversarial_common import check_weight
from distill.strategies.registry import as_model, register_strategy
from distill.train import FitResult

__all__ = ["PAPER", "TokenDiscriminator", "adversarial_imitation", "evaluate_tagger", "token_f1"]

PAPER = Paper("Exploiting the Ground-Truth: An Adversarial Imitation Based Knowledge Distillation Approach for "
              "Event Detection", "J. Liu, Y. Chen, K. Liu", 2019, None, "AAAI 2019")


def token_f1(predictions: Tensor, tags: Tensor, positive: int = 1) -> dict[str, float]:
    """Token-level precision, recall and F1 (in %) of the tag ``positive`` over the labelled tokens
    (``tags != -100``); ``predictions`` and ``tags`` are (B, L) long. An empty denominator counts as 0."""
    if predictions.shape != tags.shape:
        raise ValueError(f"token_f1: predictions {tuple(predictions.shape)} and tags {tuple(tags.shape)} differ")
    keep = tags != -100
    pred, gold = (predictions == positive) & keep, (tags == positive) & keep
    tp = float((pred & gold).sum())
    p = tp / float(pred.sum()) if pred.any() else 0.0
    r = tp / float(gold.sum()) if gold.any() else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    acc = float(((predictions == tags) & keep).sum()) / max(1.0, float(keep.sum()))
    return {"precision": 100 * p, "recall": 100 * r, "f1": 100 * f, "acc": 100 * acc}


@torch.no_grad()
def evaluate_tagger(model: nn.Module, loader: Any, annotated: bool = False) -> dict[str, float]:
    """:func:`token_f1` of ``model`` (a :class:`~distill.models.adversarial_tagger.TokenTagger`) over a
    :class:`~distill.data.adversarial_tagging.TaggingLoader`; ``annotated``: feed the gold annotations."""
    was = model.training
    model.eval()
    preds, golds = [], []
    for b in loader:
        logits = model(b["ids"], b["annotations"]) if annotated else model(b["ids"])
        preds.append(logits.argmax(-1))
        golds.append(b["tags"])
    model.train(was)
    return token_f1(torch.cat(preds), torch.cat(golds))


class TokenDiscriminator(nn.Module):
    """Per-token real/fake logits ``(N,)`` from features ``(N, D)`` and, with ``vocab_size``, the token's
    word id ``(N,)`` (an embedding of the word concatenated to the feature: the discriminator compares
    teacher and student features of the same word, a conditional discriminator). Linear → LeakyReLU(0.2)
    → Linear (ours: the paper's discriminator could not be read here)."""

    def __init__(self, dim: int, hidden: int = 64, vocab_size: int = 0, word_dim: int = 16) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, word_dim) if vocab_size else None
        self.net = nn.Sequential(nn.Linear(dim + (word_dim if vocab_size else 0), hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, 1))

    def forward(self, features: Tensor, words: Tensor | None = None) -> Tensor:
        x = features if self.word is None else torch.cat([features, self.word(words)], dim=-1)
        return self.net(x)[..., 0]


def _tag_ce(logits: Tensor, tags: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tags.reshape(-1), ignore_index=-100)


@register_strategy("adversarial_imitation", "adversarial", PAPER)
def adversarial_imitation(student: Any, train_loader: Any, val_loader: Any = None, *, teacher: nn.Module,
                          epochs: int = 10, teacher_epochs: int = 10, adv_weight: float = 1.0, ce_weight: float = 1.0,
                          share_classifier: bool = True, discriminator_hidden: int = 64, condition_on_word: bool = True,
                          lr: float = 1e-3,
                          lr_discriminator: float = 1e-3, seed: int = 0, progress: bool = True,
                          run_dir: Any = None) -> FitResult:
    """Adversarial imitation KD (Liu et al., AAAI 2019) on a token-tagging task.

    Stage 1 (``teacher_epochs`` epochs, 0 for a trained teacher): the teacher tagger (encoder ``E_tea``
    reading ``ids`` and the gold ``annotations`` + classifier ``C``) learns the tags with cross-entropy.
    Stage 2 (``epochs`` epochs), per batch, on the labelled tokens (``tags != -100``):

    * discriminator step on :func:`~distill.functional.adversarial_bce`: teacher features ``E_tea`` real,
      student features ``E_stu`` fake, one score per token ``(N,)``;
    * student step: ``ce_weight`` · CE(C(E_stu(ids)), tags) + ``adv_weight`` · BCE(D(E_stu(ids)), real).

    ``share_classifier=True``: the student's classifier is the teacher's ``C``, copied and frozen (the paper
    puts the trained ``C`` on the student encoder at test time); ``False`` with ``adv_weight=0`` is the
    plain student trained alone. Adam (lr ``lr``) for the teacher and the student, Adam (lr
    ``lr_discriminator``, betas (0.5, 0.999)) for the discriminator (ours).

    Args:
        student, teacher: :class:`~distill.models.adversarial_tagger.TokenTagger` (the teacher with
            ``annotation_vocab > 0``), or factories; one feature width.
        train_loader, val_loader: :class:`~distill.data.adversarial_tagging.TaggingLoader`.
    Returns: a :class:`~distill.train.FitResult` whose rows hold the student's (and teacher's) token
        precision / recall / F1 (%); ``last_score`` / ``best_score`` are the student's F1,
        ``last_acc`` / ``best_acc`` its token accuracy; ``result.teacher``, ``result.discriminator``.
    """
    who = "adversarial_imitation"
    student = as_model(student, who)
    teacher = as_model(teacher, who)
    adv_weight, ce_weight = check_weight(who, "adv_weight", adv_weight), check_weight(who, "ce_weight", ce_weight)
    for name, v, low in (("epochs", epochs, 1), ("teacher_epochs", teacher_epochs, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{who}: {name} must be an int >= {low}; got {v!r}")
    if getattr(teacher, "annotation", None) is None:
        raise ValueError(f"{who}: the teacher must read the gold annotations (a TokenTagger with annotation_vocab > 0)")
    if getattr(student, "feature_dim", None) != getattr(teacher, "feature_dim", None):
        raise ValueError(f"{who}: student and teacher features must have one width to be compared; got "
                         f"{getattr(student, 'feature_dim', None)} and {getattr(teacher, 'feature_dim', None)}")
    torch.manual_seed(seed)
    t0, result = time.perf_counter(), FitResult(run_dir=None)
    steps = len(train_loader)
    opt_t = torch.optim.Adam(teacher.parameters(), lr=lr)
    with StepProgress(progress and teacher_epochs > 0, "teacher (gold annotations)", teacher_epochs * steps) as bar:
        teacher.train()
        for _ in range(teacher_epochs):
            for b in train_loader:
                loss = _tag_ce(teacher(b["ids"], b["annotations"]), b["tags"])
                opt_t.zero_grad(set_to_none=True)
                loss.backward()
                opt_t.step()
                bar.advance(f"ce {float(loss.detach()):.3f}")
    teacher.eval().requires_grad_(False)
    if share_classifier:
        student.classifier.load_state_dict(teacher.classifier.state_dict())
        student.classifier.requires_grad_(False)
    disc = TokenDiscriminator(student.feature_dim, discriminator_hidden,
                              student.embed.num_embeddings if condition_on_word else 0)
    opt_s = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr_discriminator, betas=(0.5, 0.999))
    teacher_scores = evaluate_tagger(teacher, val_loader, annotated=True) if val_loader is not None else {}
    with StepProgress(progress, "adversarial imitation", epochs * steps) as bar:
        for epoch in range(1, epochs + 1):
            sums, n = {"d": 0.0, "s": 0.0}, 0
            for b in train_loader:
                keep = b["tags"] != -100
                student.train()
                h_s = student.encode(b["ids"])
                loss_d = torch.zeros(())
                if adv_weight:
                    with torch.no_grad():
                        h_t = teacher.encode(b["ids"], b["annotations"])
                    words = b["ids"][keep]
                    loss_d = DF.adversarial_bce(disc(h_t[keep], words), True) + \
                        DF.adversarial_bce(disc(h_s.detach()[keep], words), False)
                    opt_d.zero_grad(set_to_none=True)
                    loss_d.backward()
                    opt_d.step()
                loss_s = ce_weight * _tag_ce(student.classifier(h_s), b["tags"])
                if adv_weight:
                    loss_s = loss_s + adv_weight * DF.adversarial_bce(disc(h_s[keep], b["ids"][keep]), True)
                opt_s.zero_grad(set_to_none=True)
                loss_s.backward()
                opt_s.step()
                value = float(loss_s.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"{who}: the student loss became {value} in epoch {epoch}")
                sums["d"] += float(loss_d.detach())
                sums["s"] += value
                n += 1
                bar.advance(f"D {float(loss_d.detach()):.3f} S {value:.3f}")
            row: dict[str, Any] = {"epoch": epoch, "time_s": time.perf_counter() - t0, "loss_d": sums["d"] / n,
                                   "loss_s": sums["s"] / n}
            if val_loader is not None:
                s = evaluate_tagger(student, val_loader)
                row |= {f"student_{k}": v for k, v in s.items()}
                row |= {f"teacher_{k}": v for k, v in teacher_scores.items()}
            result.history.append(row)
    student.eval()
    if val_loader is not None:
        f1s = [r["student_f1"] for r in result.history]
        accs = [r["student_acc"] for r in result.history]
        result.last_score, result.best_score = f1s[-1], max(f1s)  # type: ignore[attr-defined]
        result.last_acc, result.best_acc = accs[-1], max(accs)
        result.best_epoch = result.history[f1s.index(max(f1s))]["epoch"]
    result.time_s = time.perf_counter() - t0
    result.teacher, result.discriminator = teacher, disc  # type: ignore[attr-defined]
    return result
