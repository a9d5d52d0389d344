"""A small DETR: conv backbone → transformer encoder/decoder with object queries → class and box heads.

After Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020, arXiv 2005.12872:
a CNN backbone, a 1x1 projection to ``d_model``, 2D sine positional encodings added to the
queries and keys of every attention layer, a post-norm transformer encoder over the ``h·w``
feature positions, a decoder over ``Q`` learned object queries (the decoder input is zeros and
the queries enter as positional embeddings at every layer), a shared final LayerNorm, a linear
class head with ``K + 1`` outputs (the last is "no object") and a 3-layer MLP box head with a
sigmoid giving ``(cx, cy, w, h)`` normalised to ``[0, 1]`` by the image size. The same heads run on
every decoder layer's output for the paper's auxiliary decoding losses.

Scaled for 64x64 scenes on a CPU (ours): a 3-stage conv backbone at stride 8 instead of a
ResNet-50 at stride 32, ``d_model`` 64 (paper 256), 4 heads (8), 2+2 (teacher 3+3) layers (6+6),
feed-forward 128 (2048), ``Q = 10`` queries (100), dropout 0 (0.1). DETR converges slowly (the
paper trains 300-500 epochs on COCO); expect modest mAP from short CPU runs.

Tensors: ``model(x)`` with ``x`` ``(B, C, H, W)`` returns ``{"logits": (B, Q, K+1), "boxes": (B, Q, 4)}``.

Taps (``nn.Identity`` points, or the embedding module):

* ``"backbone_out"``: the backbone's last map ``(B, C_b, H/8, W/8)``.
* ``"encoder_out"``: the encoder's memory ``(B, h·w, D)``.
* ``"decoder_out.0"`` … ``"decoder_out.{L-1}"``: each decoder layer's output after the shared final
  LayerNorm ``(B, Q, D)`` (what the heads read).
* ``"query_embed"``: the object queries ``(B, Q, D)`` (the ``nn.Embedding`` is called on the query
  indices of every image; its weight ``(Q, D)`` is ``model.query_embed.weight``).
* ``"cls_out"`` ``(B, Q, K+1)`` and ``"box_out"`` ``(B, Q, 4)``: the last layer's predictions.
* ``"aux_cls_out"`` ``(B, L-1, Q, K+1)`` and ``"aux_box_out"`` ``(B, L-1, Q, 4)``: the earlier
  layers' predictions (the auxiliary losses read them).

Box helpers, :func:`hungarian_match` (scipy's ``linear_sum_assignment``) and the set loss
:func:`detr_set_loss` live here too; the ``detr_loss`` method wraps them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = ["DETR", "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "detr_set_loss", "detr_student", "detr_teacher",
           "generalized_box_iou", "hungarian_match", "normalize_boxes", "sine_position_encoding"]


# ---------------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------------


def box_cxcywh_to_xyxy(b: Tensor) -> Tensor:
    """``(..., 4)`` boxes ``(cx, cy, w, h)`` → ``(x1, y1, x2, y2) = (cx − w/2, cy − h/2, cx + w/2, cy + h/2)``."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(b: Tensor) -> Tensor:
    """``(..., 4)`` boxes ``(x1, y1, x2, y2)`` → ``(cx, cy, w, h)``."""
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def normalize_boxes(boxes_xyxy: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Pixel boxes ``(n, 4)`` xyxy → ``(n, 4)`` ``(cx, cy, w, h)`` divided by ``(W, H, W, H)``."""
    h, w = image_hw
    scale = boxes_xyxy.new_tensor([w, h, w, h])
    return box_xyxy_to_cxcywh(boxes_xyxy.float()) / scale


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    r"""Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes ``a`` ``(n, 4)`` and ``b`` ``(m, 4)``
    → ``(n, m)``: :math:`\mathrm{GIoU} = \mathrm{IoU} - |C \setminus (A \cup B)| / |C|`, ``C`` the
    smallest box enclosing both. Degenerate boxes (``x2 < x1``) are refused."""
    if bool((a[:, 2:] < a[:, :2]).any()) or bool((b[:, 2:] < b[:, :2]).any()):
        raise ValueError("generalized_box_iou needs boxes with x2 >= x1 and y2 >= y1")
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union.clamp(min=1e-12)
    lt_c = torch.min(a[:, None, :2], b[None, :, :2])
    rb_c = torch.max(a[:, None, 2:], b[None, :, 2:])
    area_c = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (area_c - union) / area_c.clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------
# matching and the set loss
# ---------------------------------------------------------------------------------------------


def _check_targets(logits: Tensor, boxes: Tensor, target_boxes: Sequence[Tensor], target_labels: Sequence[Tensor]) -> None:
    if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
        raise ValueError(f"expected logits (B, Q, K+1) and boxes (B, Q, 4), got {tuple(logits.shape)} and {tuple(boxes.shape)}")
    if len(target_boxes) != logits.shape[0] or len(target_labels) != logits.shape[0]:
        raise ValueError(f"one target per image expected ({logits.shape[0]}), got {len(target_boxes)} box sets and "
                         f"{len(target_labels)} label sets")
    k = logits.shape[-1] - 1
    for i, (tb, tl) in enumerate(zip(target_boxes, target_labels)):
        if tb.dim() != 2 or tb.shape[-1] != 4 or tl.shape != (tb.shape[0],):
            raise ValueError(f"image {i}: target boxes must be (n, 4) and labels (n,), got {tuple(tb.shape)} and {tuple(tl.shape)}")
        if tl.numel() and (int(tl.min()) < 0 or int(tl.max()) >= k):
            raise ValueError(f"image {i}: target labels must be in [0, {k}) (K = logits' last dim − 1), "
                             f"got {tl.min().item()}..{tl.max().item()}")


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, target_boxes: Sequence[Tensor], target_labels: Sequence[Tensor],
                    cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> list[tuple[Tensor, Tensor]]:
    r"""DETR's optimal bipartite matching of queries to ground-truth objects, image by image.

    .. math:: C_{qj} = -\lambda_{cls}\, \hat p_q(c_j) + \lambda_{L1} \|\hat b_q - b_j\|_1
              - \lambda_{giou}\, \mathrm{GIoU}(\hat b_q, b_j)

    ``logits`` ``(B, Q, K+1)`` (softmax over the last axis gives ``p̂``), ``boxes`` ``(B, Q, 4)`` and
    each ``target_boxes[b]`` ``(n_b, 4)`` in normalised ``(cx, cy, w, h)``; ``target_labels[b]`` ``(n_b,)``
    long. The assignment minimising ``Σ C`` is found with ``scipy.optimize.linear_sum_assignment``.
    Returns per image ``(query_idx, gt_idx)``, two long tensors of ``min(Q, n_b)`` entries, sorted by
    query index. The paper uses the probability (not its log) in the matching cost and −GIoU
    (``1 − GIoU`` differs by a constant); defaults 1, 5, 2 are the authors' ``set_cost_*`` (code).
    """
    from scipy.optimize import linear_sum_assignment

    _check_targets(logits, boxes, target_boxes, target_labels)
    out: list[tuple[Tensor, Tensor]] = []
    prob = logits.float().softmax(-1)
    for b in range(logits.shape[0]):
        tb, tl = target_boxes[b].to(boxes.device).float(), target_labels[b].to(boxes.device).long()
        if tb.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.long)
            out.append((empty, empty.clone()))
            continue
        cost = (-cost_class * prob[b][:, tl]
                + cost_bbox * torch.cdist(boxes[b].float(), tb, p=1)
                - cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes[b].float()), box_cxcywh_to_xyxy(tb)))
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return out


def detr_set_loss(logits: Tensor, boxes: Tensor, target_boxes: Sequence[Tensor], target_labels: Sequence[Tensor],
                  matches: Sequence[tuple[Tensor, Tensor]], no_object_weight: float = 0.1) -> dict[str, Tensor]:
    r"""DETR's Hungarian loss terms for a given matching (unweighted; the caller applies λ's).

    With ``y_q`` the matched label of query ``q`` (``K``, no object, when unmatched),
    ``w_y = 1`` for objects and ``w_K = no_object_weight``, and ``N = max(1, Σ_b n_b)``:

    .. math:: L_{ce} = \frac{\sum_{b,q} w_{y_q}\,(-\log \mathrm{softmax}(z_{bq})_{y_q})}{\sum_{b,q} w_{y_q}},\quad
              L_{L1} = \frac1N \sum_{(q,j)} \|\hat b_q - b_j\|_1,\quad
              L_{giou} = \frac1N \sum_{(q,j)} (1 - \mathrm{GIoU}(\hat b_q, b_j))

    ``logits`` ``(B, Q, K+1)``, ``boxes`` ``(B, Q, 4)`` and targets in normalised ``(cx, cy, w, h)``
    (GIoU on their xyxy corners), ``matches`` from :func:`hungarian_match`. Returns
    ``{"ce", "l1", "giou"}`` scalars. The paper sums the terms and "down-weights the log-probability
    term when c = ∅ by a factor 10"; the normalisations (a weighted mean for the class term, the
    number of boxes for the box terms) are the authors' code's.
    """
    _check_targets(logits, boxes, target_boxes, target_labels)
    bsz, nq, k1 = logits.shape
    classes = torch.full((bsz, nq), k1 - 1, dtype=torch.long, device=logits.device)
    pred, gt = [], []
    for b, (qi, gi) in enumerate(matches):
        qi, gi = qi.to(logits.device), gi.to(logits.device)
        classes[b, qi] = target_labels[b].to(logits.device).long()[gi]
        pred.append(boxes[b, qi])
        gt.append(target_boxes[b].to(boxes.device).to(boxes.dtype)[gi])
    class_weight = torch.ones(k1, device=logits.device, dtype=logits.dtype)
    class_weight[-1] = no_object_weight
    ce = F.cross_entropy(logits.transpose(1, 2), classes, weight=class_weight)
    num = max(1, sum(int(t.shape[0]) for t in target_boxes))
    p, g = torch.cat(pred), torch.cat(gt)
    l1 = (p - g).abs().sum() / num
    giou = (1 - torch.diagonal(generalized_box_iou(box_cxcywh_to_xyxy(p), box_cxcywh_to_xyxy(g)))).sum() / num \
        if p.shape[0] else boxes.sum() * 0.0
    return {"ce": ce, "l1": l1, "giou": giou}


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


def sine_position_encoding(h: int, w: int, dim: int, *, temperature: float = 10000.0,
                           device: torch.device | None = None) -> Tensor:
    r"""DETR's 2D sine positional encoding ``(h·w, dim)``, rows in raster order.

    Half the channels encode ``y``, half ``x``; each coordinate is normalised to ``(0, 2π]``
    (``(i + 1) / n · 2π``) and channel pair ``2k, 2k+1`` of a half is
    ``sin(c / T^{2k/(dim/2)})``, ``cos(c / T^{2k/(dim/2)})`` (``T = temperature``). ``dim`` must be a
    multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"sine_position_encoding needs dim divisible by 4, got {dim}")
    half = dim // 2
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 1) / h * 2 * math.pi
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 1) / w * 2 * math.pi
    k = torch.arange(half // 2, dtype=torch.float32, device=device)
    freq = temperature ** (2 * k / half)  # (half/2,)

    def enc(c: Tensor) -> Tensor:  # (n,) -> (n, half)
        a = c[:, None] / freq
        return torch.stack([a.sin(), a.cos()], dim=-1).flatten(1)

    ey, ex = enc(ys), enc(xs)  # (h, half), (w, half)
    return torch.cat([ey[:, None, :].expand(h, w, half), ex[None, :, :].expand(h, w, half)], dim=-1).reshape(h * w, dim)


class _EncoderLayer(nn.Module):
    def __init__(self, d: int, nhead: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, nhead, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        q = src + pos
        src = self.norm1(src + self.drop(self.attn(q, q, src, need_weights=False)[0]))
        return self.norm2(src + self.drop(self.ffn(src)))


class _DecoderLayer(nn.Module):
    def __init__(self, d: int, nhead: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, nhead, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt = self.norm2(tgt + self.drop(self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]))
        return self.norm3(tgt + self.drop(self.ffn(tgt)))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DETR(nn.Module):
    """Small DETR (see the module docstring for the architecture, outputs and taps).

    Args:
        num_classes: object classes ``K`` (the class head has ``K + 1`` outputs, the last "no object").
        in_channels: image channels ``C``.
        widths: channels of the three backbone stages (each: a stride-2 3x3 conv and a 3x3 conv).
        d_model: transformer width ``D`` (a multiple of 4 and of ``nhead``).
        nhead: attention heads.
        num_encoder_layers, num_decoder_layers: layer counts (``L`` = decoder layers).
        dim_feedforward: the feed-forward width.
        num_queries: object queries ``Q`` (the most objects one image can yield).
        dropout: dropout in the transformer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128),
                 d_model: int = 64, nhead: int = 4, num_encoder_layers: int = 2, num_decoder_layers: int = 2,
                 dim_feedforward: int = 128, num_queries: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("nhead", nhead),
                        ("num_decoder_layers", num_decoder_layers), ("num_queries", num_queries),
                        ("dim_feedforward", dim_feedforward)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_encoder_layers < 0:
            raise ValueError(f"num_encoder_layers must be >= 0, got {num_encoder_layers}")
        if d_model % 4 or d_model % nhead:
            raise ValueError(f"d_model must be a multiple of 4 and of nhead ({nhead}), got {d_model}")
        widths = [int(w) for w in widths]
        if len(widths) != 3 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be three positive ints (one per stage), got {widths!r}")
        self.num_classes, self.in_channels, self.num_queries, self.d_model = num_classes, in_channels, num_queries, d_model
        chans = [in_channels, *widths]
        self.backbone = nn.Sequential(*(nn.Sequential(_conv_bn_relu(chans[i], chans[i + 1], stride=2),
                                                      _conv_bn_relu(chans[i + 1], chans[i + 1])) for i in range(3)))
        self.backbone_out = nn.Identity()
        self.input_proj = nn.Conv2d(widths[-1], d_model, 1)
        self.encoder = nn.ModuleList(_EncoderLayer(d_model, nhead, dim_feedforward, dropout)
                                     for _ in range(num_encoder_layers))
        self.encoder_out = nn.Identity()
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.decoder = nn.ModuleList(_DecoderLayer(d_model, nhead, dim_feedforward, dropout)
                                     for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.decoder_out = nn.ModuleList(nn.Identity() for _ in range(num_decoder_layers))
        self.class_head = nn.Linear(d_model, num_classes + 1)
        self.box_head = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model), nn.ReLU(),
                                      nn.Linear(d_model, 4))
        self.cls_out, self.box_out = nn.Identity(), nn.Identity()
        self.aux_cls_out, self.aux_box_out = nn.Identity(), nn.Identity()
        for layer in [*self.encoder, *self.decoder]:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    @property
    def tap_points(self) -> tuple[str, ...]:
        return ("backbone_out", "encoder_out", *(f"decoder_out.{i}" for i in range(len(self.decoder))),
                "query_embed", "cls_out", "box_out", "aux_cls_out", "aux_box_out")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DETR expects images (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        bsz = x.shape[0]
        feat = self.input_proj(self.backbone_out(self.backbone(x)))  # (B, D, h, w)
        h, w = feat.shape[-2:]
        src = feat.flatten(2).transpose(1, 2)  # (B, h·w, D)
        pos = sine_position_encoding(h, w, self.d_model, device=x.device).to(src.dtype)[None]
        for layer in self.encoder:
            src = layer(src, pos)
        memory = self.encoder_out(src)
        idx = torch.arange(self.num_queries, device=x.device).expand(bsz, -1)
        query_pos = self.query_embed(idx)  # (B, Q, D)
        tgt = torch.zeros_like(query_pos)
        outs = []
        for layer, tap in zip(self.decoder, self.decoder_out):
            tgt = layer(tgt, memory, pos, query_pos)
            outs.append(tap(self.decoder_norm(tgt)))
        hs = torch.stack(outs, dim=1)  # (B, L, Q, D)
        logits_all = self.class_head(hs)
        boxes_all = self.box_head(hs).sigmoid()
        self.aux_cls_out(logits_all[:, :-1])
        self.aux_box_out(boxes_all[:, :-1])
        return {"logits": self.cls_out(logits_all[:, -1]), "boxes": self.box_out(boxes_all[:, -1])}

    @torch.no_grad()
    def predict(self, x: Tensor, score_threshold: float = 0.0, max_detections: int | None = None) -> list[dict[str, Tensor]]:
        """Detections per image (no NMS: the set loss makes predictions unique).

        ``x`` ``(B, C, H, W)`` → ``B`` dicts with ``boxes`` ``(n, 4)`` xyxy pixels (clamped to the image),
        ``scores`` ``(n,)`` (the best object-class probability of each query, as DETR's
        post-processing) and ``labels`` ``(n,)`` long, sorted by score, keeping scores
        ``> score_threshold`` and at most ``max_detections`` (``None``: all ``Q``).
        """
        was_training = self.training
        self.eval()
        try:
            out = self(x)
        finally:
            self.train(was_training)
        h, w = x.shape[-2:]
        probs = out["logits"].softmax(-1)[..., :-1]
        scores, labels = probs.max(-1)
        scale = out["boxes"].new_tensor([w, h, w, h])
        boxes = box_cxcywh_to_xyxy(out["boxes"]) * scale
        boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
        results = []
        for b in range(x.shape[0]):
            keep = scores[b] > score_threshold
            s, order = scores[b][keep].sort(descending=True)
            if max_detections is not None:
                s, order = s[:max_detections], order[:max_detections]
            results.append({"boxes": boxes[b][keep][order], "scores": s, "labels": labels[b][keep][order]})
        return results


@register_model("detr_teacher")
def detr_teacher(num_classes: int = 10, in_channels: int = 1, **kwargs) -> DETR:
    """The scene-detection DETR teacher: widths (32, 64, 128), D = 64, 3 + 3 layers, FFN 128, Q = 10."""
    return DETR(num_classes, in_channels, **{"widths": (32, 64, 128), "d_model": 64, "num_encoder_layers": 3,
                                            "num_decoder_layers": 3, "dim_feedforward": 128, **kwargs})


@register_model("detr_student")
def detr_student(num_classes: int = 10, in_channels: int = 1, **kwargs) -> DETR:
    """The DETR student: widths (16, 32, 64), D = 32, 2 + 2 layers, FFN 64, Q = 10."""
    return DETR(num_classes, in_channels, **{"widths": (16, 32, 64), "d_model": 32, "num_encoder_layers": 2,
                                            "num_decoder_layers": 2, "dim_feedforward": 64, "nhead": 4, **kwargs})
