"""KD-VLP object knowledge distillation on MNIST canvases with generated captions.

    .venv/bin/python examples/language/kd_vlp.py            # 93 training steps per student (--threads 1 on a busy machine)
    .venv/bin/python examples/language/kd_vlp.py --quick    # a few seconds

Task (:mod:`distill.data.captions`): canvases of two real MNIST digits side by side, captioned
"a 3 left of a 7"; the image-text objective is image–text matching (ITM) against hard negatives
(one digit of the caption changed). Detector teacher: a small CNN trained on single MNIST digits,
read at each digit's known box: its penultimate features (64-d) and its class distribution.
Student: an end-to-end image-text model (a CNN's 7×14 grid features + caption tokens through a
2-layer transformer; ITM head on [CLS]); its region feature of an object is the mean of its output
grid tokens inside the box.

KD-VLP's object-guided masked vision modelling: one object's grid cells are replaced by a mask
token, and the student's region output there regresses the detector's feature and matches the
detector's label distribution (method ``kd_vlp``) — which it can only do from the rest of the image
and the caption. Both students take the same ITM steps (same seed, data order); the distilled one
adds the masked pass and the KD-VLP loss. Reported: ITM accuracy on held-out canvases (MNIST test
digits) and, for the distilled student, its object-label accuracy at masked boxes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.batch import Batch
from distill.data.captions import CAPTION_VOCAB, caption_ids, digit_canvases, negative_labels
from distill.data.sources import _default_mnist_root, load_mnist
from distill.methods import create_method


@dataclass
class Config:
    n_train: int = 2000
    n_test: int = 1000
    detector_digits: int = 12000
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


QUICK = Config(n_train=64, n_test=64, detector_digits=512, epochs=1, batch_size=32)


class Detector(nn.Module):
    """The teacher: a digit classifier whose penultimate layer is the "RoI feature"."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(32 * 7 * 7, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return f, self.head(f)


class ImageText(nn.Module):
    """End-to-end image-text student: CNN grid features and caption tokens in one transformer."""

    def __init__(self, d: int = 64, max_cols: int = 28) -> None:
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, d, 3, stride=2, padding=1), nn.ReLU())
        self.words = nn.Embedding(len(CAPTION_VOCAB), d)
        self.word_pos = nn.Embedding(32, d)
        self.row_pos, self.col_pos = nn.Embedding(7, d), nn.Embedding(max_cols, d)
        self.kind = nn.Embedding(2, d)
        self.mask_token = nn.Parameter(torch.zeros(d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.itm = nn.Linear(d, 2)

    @staticmethod
    def cell_membership(boxes: torch.Tensor, rows: int, cols: int, stride: int = 4) -> torch.Tensor:
        """``(B, K, rows·cols)`` bool: grid cell (r, c) belongs to box k when its centre is inside."""
        cy = (torch.arange(rows) * stride + stride / 2).repeat_interleave(cols)
        cx = (torch.arange(cols) * stride + stride / 2).repeat(rows)
        x0, y0, x1, y1 = (boxes[..., i, None].float() for i in range(4))
        return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)

    def forward(self, images, captions, boxes, masked=None) -> dict[str, torch.Tensor]:
        grid = self.cnn(images)                                         # (B, d, 7, 7K)
        b, d, rows, cols = grid.shape
        img = grid.flatten(2).transpose(1, 2)                           # (B, rows·cols, d)
        member = self.cell_membership(boxes, rows, cols)                # (B, K, cells)
        if masked is not None:
            hide = (member & masked[..., None]).any(1)                  # (B, cells)
            img = torch.where(hide[..., None], self.mask_token.expand_as(img), img)
        r = torch.arange(rows).repeat_interleave(cols)
        c = torch.arange(cols).repeat(rows)
        img = img + self.row_pos(r) + self.col_pos(c) + self.kind.weight[1]
        txt = self.words(captions) + self.word_pos(torch.arange(captions.shape[1])) + self.kind.weight[0]
        out = self.encoder(torch.cat([txt, img], 1))
        grid_out = out[:, captions.shape[1]:]                            # (B, cells, d)
        w = member.float()
        regions = (w @ grid_out) / w.sum(-1, keepdim=True).clamp_min(1)  # (B, K, d)
        return {"logits": self.itm(out[:, 0]), "regions": regions}


def _train_detector(cfg: Config, x: torch.Tensor, y: torch.Tensor) -> Detector:
    torch.manual_seed(cfg.seed)
    det = Detector()
    opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    for _ in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(det(x[idx])[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return det.eval().requires_grad_(False)


@torch.no_grad()
def _detect(det: Detector, canvases) -> tuple[torch.Tensor, torch.Tensor]:
    """The detector at each known box: features ``(N, K, 64)`` and class probabilities ``(N, K, 10)``."""
    feats, probs = [], []
    for k in range(canvases.labels.shape[1]):
        x0, y0, x1, y1 = canvases.boxes[0, k].tolist()                  # boxes are the same on every canvas
        f, logits = det(canvases.images[:, :, y0:y1, x0:x1])
        feats.append(f)
        probs.append(logits.softmax(-1))
    return torch.stack(feats, 1), torch.stack(probs, 1)


def _itm_accuracy(model: ImageText, canvases, seed: int) -> float:
    neg = negative_labels(canvases.labels, seed=seed + 1)
    with torch.no_grad():
        pos = model(canvases.images, caption_ids(canvases.labels), canvases.boxes)["logits"].argmax(-1) == 1
        negp = model(canvases.images, caption_ids(neg), canvases.boxes)["logits"].argmax(-1) == 0
    return float(torch.cat([pos, negp]).float().mean())


def _train(cfg: Config, train, teacher_feats, teacher_probs, distill: bool):
    torch.manual_seed(cfg.seed)
    model = ImageText()
    method = create_method("kd_vlp", mask_key="masked") if distill else None
    n = len(train)
    if method is not None:
        with torch.no_grad():
            ex = model(train.images[:2], caption_ids(train.labels[:2]), train.boxes[:2])
        method.prepare(ex, {"object_features": teacher_feats[:2], "object_probs": teacher_probs[:2]},
                       Batch(train.images[:2], None))
    params = list(model.parameters()) + ([] if method is None else list(method.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    negs = negative_labels(train.labels, seed=cfg.seed)
    caps, neg_caps = caption_ids(train.labels), caption_ids(negs)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        masked_obj = torch.randint(0, train.labels.shape[1], (n,), generator=g)
        for i in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            imgs, boxes = train.images[idx], train.boxes[idx]
            out = model(torch.cat([imgs, imgs]), torch.cat([caps[idx], neg_caps[idx]]), torch.cat([boxes, boxes]))
            target = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))]).long()
            loss = F.cross_entropy(out["logits"], target)
            if method is not None:
                masked = F.one_hot(masked_obj[idx], train.labels.shape[1]).bool()
                view = model(imgs, caps[idx], boxes, masked=masked)
                view["masked"] = masked
                teacher = {"object_features": teacher_feats[idx], "object_probs": teacher_probs[idx]}
                loss = loss + method.weight * method(view, teacher, Batch(imgs, None))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), method


def run(cfg: Config, log=print) -> dict:
    t0 = time.perf_counter()
    root = _default_mnist_root()
    x_tr, y_tr = load_mnist(root, "train")
    x_te, y_te = load_mnist(root, "test")
    det = _train_detector(cfg, x_tr[:cfg.detector_digits], y_tr[:cfg.detector_digits])
    with torch.no_grad():
        det_acc = float((det(x_te[:2000])[1].argmax(-1) == y_te[:2000]).float().mean())
    # canvases: training digits disjoint from the detector's own training digits; test from MNIST test
    pool = slice(cfg.detector_digits, None)
    train = digit_canvases(x_tr[pool], y_tr[pool], cfg.n_train, digits=2, seed=cfg.seed)
    test = digit_canvases(x_te, y_te, cfg.n_test, digits=2, seed=cfg.seed + 100)
    feats, probs = _detect(det, train)
    log(f"detector (teacher) digit accuracy on MNIST test: {det_acc:.3f}; {len(train)} train / {len(test)} test canvases")
    res = {"detector_accuracy": det_acc}
    for distill in (False, True):
        t1 = time.perf_counter()
        model, method = _train(cfg, train, feats, probs, distill)
        acc = _itm_accuracy(model, test, cfg.seed)
        key = "student + kd_vlp" if distill else "student, ITM only"
        res[key] = {"itm_accuracy": acc}
        if method is not None:
            masked = F.one_hot(torch.zeros(len(test), dtype=torch.long), 2).bool()
            with torch.no_grad():
                view = model(test.images, caption_ids(test.labels), test.boxes, masked=masked)
                pred = method.classifier(view["regions"][:, 0]).argmax(-1)
            res[key]["masked_object_accuracy"] = float((pred == test.labels[:, 0]).float().mean())
        log(f"  {key:20s} ITM accuracy {acc:.4f}  ({time.perf_counter() - t1:.0f}s)")
    res["seconds"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds: tiny data, one epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 on a crowded machine)")
    args = ap.parse_args(argv)
    cfg = dataclasses.replace(QUICK if args.quick else Config(), seed=args.seed)
    torch.set_num_threads(max(1, args.threads))
    res = run(cfg)
    print("| student | ITM accuracy (held-out canvases, hard negatives) | object label at a masked box |")
    print("|---|---|---|")
    for key in ("student, ITM only", "student + kd_vlp"):
        r = res[key]
        extra = f"{r['masked_object_accuracy']:.4f}" if "masked_object_accuracy" in r else "—"
        print(f"| {key} | {r['itm_accuracy']:.4f} | {extra} |")
    print(f"teacher (detector) digit accuracy {res['detector_accuracy']:.4f}; total {res['seconds']:.0f}s")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
