"""Issue 14, part D1: the scene data sets (distill.data.scenes) and the dense evaluators
(distill.train.dense_eval). The scene checks rebuild every object from its source image and its
recorded placement, independently of the generator's code path; the metrics are checked against
numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _mnist import mnist_dir
from distill import Distiller, fit
from distill.batch import DenseBatch
from distill.data import get_dataset, make_scenes
from distill.data.scenes import SceneSet
from distill.methods.base import Method
from distill.train.dense_eval import (
    detection_evaluator,
    detection_map,
    evaluate_detection,
    evaluate_segmentation,
    segmentation_evaluator,
)

torch.set_num_threads(1)
pytest.importorskip("pycocotools")
pytest.importorskip("torchmetrics")

T = torch.tensor


# --------------------------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------------------------


def _source(source: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = get_dataset(source, str(mnist_dir()) if source == "mnist" else None, split=split, normalize=False)
    return d.inputs, d.targets


def _check_scenes(s: SceneSet, source_images: torch.Tensor, source_labels: torch.Tensor, *,
                  max_objects: int, min_visible: float) -> None:
    thr = s.ink_threshold
    h, w = s.images.shape[-2:]
    for i in range(len(s)):
        sc = s[i]
        n = len(sc.labels)
        assert n <= max_objects and sc.boxes.shape == (n, 4) and sc.instance_masks.shape == (n, h, w)
        # classes are the source images' labels
        assert torch.equal(sc.labels, source_labels[sc.sources])
        # rebuild each object's ink on the canvas from its source image and placement
        inks, patches = [], []
        for src, (top, left, side) in zip(sc.sources.tolist(), sc.placements.tolist()):
            patch = F.interpolate(source_images[src][None], size=(side, side), mode="bilinear",
                                  align_corners=False, antialias=True).clamp(0, 1)[0, 0]
            ink = torch.zeros(h, w, dtype=torch.bool)
            ink[top:top + side, left:left + side] = patch > thr
            full = torch.zeros(h, w)
            full[top:top + side, left:left + side] = patch
            inks.append(ink)
            patches.append(full)
        for k in range(n):
            later = torch.zeros(h, w, dtype=torch.bool)
            for j in range(k + 1, n):
                later |= inks[j]
            expected = inks[k] & ~later  # a later paste covers an earlier one
            assert torch.equal(sc.instance_masks[k], expected), (i, k)
            assert sc.instance_masks[k].sum() >= min_visible * inks[k].sum()
            # on its visible ink the canvas shows the object's own pixels
            m = sc.instance_masks[k]
            assert torch.allclose(sc.image[0][m], patches[k][m], atol=1e-6)
            # the box is the tight box of the mask, pixel edges: (min col, min row, max col + 1, max row + 1)
            rows, cols = m.nonzero(as_tuple=True)
            tight = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
            assert sc.boxes[k].tolist() == tight, (i, k)
        union = sc.instance_masks.any(0) if n else torch.zeros(h, w, dtype=torch.bool)
        assert int(sc.instance_masks.sum(0).max()) <= 1 if n else True  # disjoint
        # a pixel is in a mask exactly when it is ink; outside the masks: background
        assert torch.equal(union, sc.image[0] > thr)
        expected_sem = torch.zeros(h, w, dtype=torch.long)
        for k in range(n):
            expected_sem[sc.instance_masks[k]] = int(sc.labels[k]) + 1
        assert torch.equal(sc.semantic, expected_sem)
        assert float(sc.image.min()) >= 0 and float(sc.image.max()) <= 1


def test_digits_scenes_agree_with_the_pasted_pixels() -> None:
    s = make_scenes("digits", "train", n_scenes=40, canvas=48, objects=(2, 5), scale=(0.7, 1.1), seed=3,
                    max_overlap=0.3, min_visible=0.5, ink_threshold=0.3)
    images, labels = _source("digits", "train")
    _check_scenes(s, images, labels, max_objects=5, min_visible=0.5)
    counts = [len(b) for b in s.boxes]
    assert max(counts) >= 3 and min(counts) >= 1  # crowded enough that occlusion is exercised
    occluded = sum(int(sc.instance_masks.sum()) < sum(int(((F.interpolate(images[src][None], size=(side, side),
                   mode="bilinear", align_corners=False, antialias=True)) > 0.3).sum()) for src, (_, _, side) in
                   zip(sc.sources.tolist(), sc.placements.tolist())) for sc in (s[i] for i in range(len(s))))
    assert occluded > 0  # some scene has a covered pixel, so the rule above was tested
    assert s.num_seg_classes == 11 and s.input_shape == (1, 48, 48)


@pytest.mark.skipif(mnist_dir() is None, reason="MNIST files not found (set DISTILL_MNIST)")
def test_mnist_scenes_agree_with_the_pasted_pixels() -> None:
    s = make_scenes("mnist", "test", n_scenes=25, canvas=64, objects=(1, 4), seed=1, root=mnist_dir())
    images, labels = _source("mnist", "test")
    _check_scenes(s, images, labels, max_objects=4, min_visible=0.6)
    assert s.name == "mnist_scenes"


def test_boxes_of_objects_pasted_later_respect_the_overlap_bound() -> None:
    s = make_scenes("digits", "train", n_scenes=30, objects=(3, 5), seed=0, max_overlap=0.0)
    for b in s.boxes:  # max_overlap=0: no two boxes intersect
        x1 = torch.maximum(b[:, None, 0], b[None, :, 0])
        x2 = torch.minimum(b[:, None, 2], b[None, :, 2])
        y1 = torch.maximum(b[:, None, 1], b[None, :, 1])
        y2 = torch.minimum(b[:, None, 3], b[None, :, 3])
        inter = (x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0)
        assert float(inter.fill_diagonal_(0).max()) == 0.0


def test_min_visible_bounds_what_later_objects_cover() -> None:
    # no box constraint, crowded canvas: only min_visible keeps earlier objects visible
    s = make_scenes("digits", "train", n_scenes=25, canvas=32, objects=(4, 6), scale=(0.7, 1.0), seed=1,
                    max_overlap=1.0, min_visible=0.9, max_tries=30)
    images, labels = _source("digits", "train")
    _check_scenes(s, images, labels, max_objects=6, min_visible=0.9)


def test_scenes_are_a_function_of_the_seed() -> None:
    a = make_scenes("digits", "train", n_scenes=12, seed=5)
    b = make_scenes("digits", "train", n_scenes=12, seed=5)
    c = make_scenes("digits", "train", n_scenes=12, seed=6)
    v = make_scenes("digits", "val", n_scenes=12, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.semantic, b.semantic)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert all(torch.equal(x, y) for x, y in zip(a.instance_masks, b.instance_masks))
    assert not torch.equal(a.images, c.images) and not torch.equal(a.images, v.images)


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="svhn"), "source must be one of"),
    (dict(split="valid"), "has splits"),
    (dict(scale=(0.5, 3.0)), "fit the canvas"),
    (dict(objects=(3, 2)), "objects must be a pair"),
    (dict(max_overlap=1.5), "max_overlap must be a number in"),
    (dict(n_scenes=0), "n_scenes must be an int"),
])
def test_bad_scene_options_are_named(kwargs: dict, match: str) -> None:
    args = {"source": "digits", "split": "train", "n_scenes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_scenes(args.pop("source"), args.pop("split"), **args)


def test_loader_yields_dense_batches_in_a_seeded_order() -> None:
    s = make_scenes("digits", "train", n_scenes=10, canvas=32, scale=(0.5, 1.0), seed=2).with_normalization((0.2,), (0.5,))
    loader = s.loader(4, shuffle=True, seed=7)
    assert len(loader) == 3
    batches = list(loader)
    assert all(isinstance(b, DenseBatch) for b in batches)
    first = batches[0]
    i = first.index.tolist()
    assert first.inputs.shape == (4, 1, 32, 32) and first.targets.shape == (4, 32, 32)
    assert first.targets.dtype == torch.long
    assert torch.allclose(first.inputs, (s.images[i] - 0.2) / 0.5)
    assert torch.equal(first.targets, s.semantic[i].long())
    assert all(torch.equal(b, s.boxes[j]) for b, j in zip(first.boxes, i))
    assert all(torch.equal(m, s.instance_masks[j]) for m, j in zip(first.instance_masks, i))
    order = torch.cat([b.index for b in batches])
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    assert torch.equal(order, torch.cat([b.index for b in s.loader(4, shuffle=True, seed=7)]))  # same (seed, epoch)
    loader.set_epoch(1)
    assert not torch.equal(order, torch.cat([b.index for b in loader]))
    loader.set_shard(1, 2)
    halves = [b.index.tolist() for b in loader]
    loader.set_shard(0, 1)
    whole = [b.index.tolist() for b in loader]
    assert [w[len(w) - len(h):] for w, h in zip(whole, halves)] == halves  # rank 1: the back half of each batch
    assert len(list(s.loader(4, drop_last=True))) == 2


def test_get_dataset_normalises_scenes_with_the_train_statistics() -> None:
    test = get_dataset("digits_scenes", split="test", n_scenes=6, canvas=32, scale=(0.5, 1.0), seed=4)
    train = make_scenes("digits", "train", n_scenes=500, canvas=32, scale=(0.5, 1.0), seed=4)  # the stats' set
    x = train.images.double()
    assert test.mean[0] == pytest.approx(float(x.mean()), rel=1e-9) and test.std[0] == pytest.approx(float(x.std()))
    assert len(test) == 6 and test.split == "val" and test.name == "digits_scenes"
    raw = get_dataset("digits_scenes", split="test", normalize=False, n_scenes=6, canvas=32, scale=(0.5, 1.0), seed=4)
    assert torch.equal(raw.images, test.images) and raw.mean == (0.0,)


# --------------------------------------------------------------------------------------------
# detection mAP (pycocotools), hand-worked cases
# --------------------------------------------------------------------------------------------


def _pred(boxes: list, scores: list, labels: list) -> dict:
    return {"boxes": T(boxes, dtype=torch.float).reshape(-1, 4), "scores": T(scores, dtype=torch.float),
            "labels": T(labels, dtype=torch.long)}


def _gt(boxes: list, labels: list) -> dict:
    return {"boxes": T(boxes, dtype=torch.float).reshape(-1, 4), "labels": T(labels, dtype=torch.long)}


def test_map_of_a_perfect_box_is_100() -> None:
    out = detection_map([_pred([[2, 3, 12, 13]], [0.7], [4])], [_gt([[2, 3, 12, 13]], [4])])
    assert out == pytest.approx({"map": 100.0, "map_50": 100.0, "map_75": 100.0})
    wrong_class = detection_map([_pred([[2, 3, 12, 13]], [0.7], [5])], [_gt([[2, 3, 12, 13]], [4])])
    assert wrong_class["map"] == pytest.approx(0.0)  # class 4 missed; class 5 has no ground truth: left out


def test_a_box_at_iou_062_counts_at_050_not_at_075() -> None:
    # ground truth 10x10, prediction 10x6.2 inside it: IoU = 62 / 100
    out = detection_map([_pred([[7, 5, 17, 11.2]], [0.9], [1])], [_gt([[7, 5, 17, 15]], [1])])
    assert out["map_50"] == pytest.approx(100.0) and out["map_75"] == pytest.approx(0.0)
    # matched at t = 0.50, 0.55, 0.60 of the ten thresholds 0.50 ... 0.95
    assert out["map"] == pytest.approx(30.0)


def test_a_higher_scored_false_positive_lowers_ap_by_the_hand_count() -> None:
    gt = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [2, 2])]
    clean = detection_map([_pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.7], [2, 2])], gt)
    assert clean["map"] == pytest.approx(100.0)
    # ranks: TP (0.9), FP (0.8), TP (0.7) -> (recall, precision) = (.5, 1), (.5, .5), (1, 2/3).
    # Interpolated precision at the 101 recall points: 1 for r <= 0.5 (51 points), 2/3 above (50 points).
    out = detection_map([_pred([[0, 0, 10, 10], [40, 40, 50, 50], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [2, 2, 2])], gt)
    expected = 100 * (51 * 1.0 + 50 * 2 / 3) / 101
    assert out["map"] == pytest.approx(expected) and out["map_50"] == pytest.approx(expected)
    # the same false positive ranked last costs nothing: the precision envelope stays 1 up to recall 1
    last = detection_map([_pred([[0, 0, 10, 10], [40, 40, 50, 50], [20, 20, 30, 30]], [0.9, 0.6, 0.7], [2, 2, 2])], gt)
    assert last["map"] == pytest.approx(100.0)


def test_map_averages_classes_and_reads_dense_batches() -> None:
    # image 0: class 0 found; image 1: class 1 missed (the detection lies elsewhere) -> (100 + 0) / 2
    batch = DenseBatch(torch.zeros(2, 1, 40, 40), boxes=[T([[1.0, 1, 9, 9]]), T([[20.0, 20, 30, 30]])],
                       labels=[T([0]), T([1])])
    preds = [_pred([[1, 1, 9, 9]], [0.5], [0]), _pred([[0, 0, 5, 5]], [0.5], [1])]
    assert detection_map(preds, [batch])["map"] == pytest.approx(50.0)
    assert detection_map([_pred([], [], []), _pred([], [], [])], [batch]) == {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    with pytest.raises(ValueError, match="1 predictions for 2 ground-truth images"):
        detection_map(preds[:1], [batch])
    with pytest.raises(ValueError, match="no ground-truth box"):
        detection_map([_pred([[0, 0, 1, 1]], [0.5], [0])], [_gt([], [])])
    with pytest.raises(ValueError, match="scores must be a tensor"):
        detection_map([{"boxes": T([[0.0, 0, 1, 1]]), "scores": T([0.5, 0.2]), "labels": T([0])}], [_gt([[0, 0, 1, 1]], [0])])


# --------------------------------------------------------------------------------------------
# segmentation mIoU (torchmetrics), hand count
# --------------------------------------------------------------------------------------------


class _FixedSegmenter(nn.Module):
    """Returns given logits for each batch in turn (a stand-in segmenter)."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, x: torch.Tensor) -> dict:
        out = self.logits[self.calls % len(self.logits)]
        self.calls += 1
        return {"logits": out}


def _onehot_logits(pred: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(pred, k).permute(0, 3, 1, 2).float() * 5.0


def test_miou_and_pixel_accuracy_against_a_hand_count() -> None:
    # K = 3; one 2x4 image; the last target pixel is ignored (255)
    target = T([[[0, 0, 1, 1], [2, 2, 1, 255]]])
    pred = T([[[0, 1, 1, 1], [2, 0, 0, 2]]])
    # class 0: TP 1 (0,0); FP 2 ((1,1),(1,2)); FN 1 (0,1) -> 1/4
    # class 1: TP 2 ((0,2),(0,3)); FP 1 (0,1); FN 1 (1,2)  -> 2/4
    # class 2: TP 1 (1,0); FP 0 ((1,3) is ignored); FN 1 (1,1) -> 1/2
    # mIoU = (1/4 + 1/2 + 1/2) / 3; pixel accuracy = 4 correct of 7 counted
    batch = DenseBatch(torch.zeros(1, 1, 2, 4), target)
    out = evaluate_segmentation(_FixedSegmenter([_onehot_logits(pred, 3)]), [batch], 3)
    assert out["miou"] == pytest.approx(100 * (0.25 + 0.5 + 0.5) / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 4 / 7)


def test_miou_accumulates_over_batches_and_upsamples_logits() -> None:
    # image 1 (4x4): left half class 1, right half class 0; the model sees it at 2x2, predicting all class 1
    # image 2 (4x4): all class 2, predicted as class 2 at 2x2 (constant logits upsample exactly)
    t1 = torch.zeros(1, 4, 4, dtype=torch.long)
    t1[..., :2] = 1
    t2 = torch.full((1, 4, 4), 2)
    model = _FixedSegmenter([_onehot_logits(torch.ones(1, 2, 2, dtype=torch.long), 3),
                             _onehot_logits(torch.full((1, 2, 2), 2), 3)])
    out = evaluate_segmentation(model, [DenseBatch(torch.zeros(1, 1, 4, 4), t1), DenseBatch(torch.zeros(1, 1, 4, 4), t2)], 3)
    # class 0: TP 0, FN 8 -> 0; class 1: TP 8, FP 8 -> 1/2; class 2: 16/16 -> 1
    assert out["miou"] == pytest.approx(100 * (0 + 0.5 + 1) / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 24 / 32)
    with pytest.raises(ValueError, match=r"logits must be \(B, 4, h, w\)"):
        evaluate_segmentation(model, [DenseBatch(torch.zeros(1, 1, 4, 4), t1)], 4)


# --------------------------------------------------------------------------------------------
# fit with the evaluators, stand-in models on tiny scenes
# --------------------------------------------------------------------------------------------


class _GridDetector(nn.Module):
    """A stand-in one-stage detector: class scores on a stride-8 grid, each cell predicting a 16x16
    box at its centre; ``predict`` keeps the 5 best (cell, class) pairs per image."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 10, 8, stride=8))

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.body(x).flatten(2).transpose(1, 2)}  # (B, N, 10)

    def predict(self, x: torch.Tensor) -> list[dict]:
        logits = self(x)["logits"]
        gw = x.shape[-1] // 8
        out = []
        for scores in logits.sigmoid():
            top = scores.flatten().topk(5)
            cell, label = top.indices // 10, top.indices % 10
            cx, cy = (cell % gw).float() * 8 + 4, (cell // gw).float() * 8 + 4
            boxes = torch.stack([cx - 8, cy - 8, cx + 8, cy + 8], 1)
            out.append({"boxes": boxes, "scores": top.values, "labels": label})
        return out


class _CentreLoss(Method):
    """Stand-in task loss: BCE of the grid logits against the cells holding a box centre."""

    needs_teacher = False

    def forward(self, student_view: dict, teacher_view: dict, batch: DenseBatch) -> torch.Tensor:
        logits = student_view["logits"]
        target = torch.zeros_like(logits)
        gw = int(batch.inputs.shape[-1]) // 8
        for i, (boxes, labels) in enumerate(zip(batch.boxes, batch.labels)):
            c = ((boxes[:, :2] + boxes[:, 2:]) / 16).long()
            target[i, c[:, 1] * gw + c[:, 0], labels] = 1.0
        return F.binary_cross_entropy_with_logits(logits, target)


class _LogitMatch(Method):
    def forward(self, student_view: dict, teacher_view: dict, batch: DenseBatch) -> torch.Tensor:
        return F.mse_loss(student_view["logits"], teacher_view["logits"])


def test_fit_runs_with_the_detection_evaluator() -> None:
    torch.manual_seed(0)
    scenes = make_scenes("digits", "train", n_scenes=12, canvas=32, scale=(0.5, 1.0), seed=0)
    val = make_scenes("digits", "val", n_scenes=6, canvas=32, scale=(0.5, 1.0), seed=0)
    teacher = _GridDetector(8)
    d = Distiller(_GridDetector(), teacher, losses={"centre": _CentreLoss(), "match": _LogitMatch()})
    result = fit(d, scenes.loader(4, shuffle=True), val.loader(3), epochs=1, lr=0.01, progress=False,
                 evaluator=detection_evaluator)
    row = result.history[-1]
    for who in ("student", "teacher"):
        assert 0.0 <= row[f"val_{who}_acc"] <= 100.0 and row[f"val_{who}_acc"] == row[f"val_{who}_map"]
        assert f"val_{who}_map_50" in row and f"val_{who}_map_75" in row
    # the evaluator's numbers are evaluate_detection's
    direct = evaluate_detection(d.student, val.loader(2))
    assert direct["map"] == pytest.approx(row["val_student_map"])


class _TinySegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 11, 1))

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.body(x)}  # (B, 11, H/2, W/2)


class _PixelCE(Method):
    needs_teacher = False

    def forward(self, student_view: dict, teacher_view: dict, batch: DenseBatch) -> torch.Tensor:
        logits = F.interpolate(student_view["logits"], size=batch.targets.shape[-2:], mode="bilinear",
                               align_corners=False)
        return F.cross_entropy(logits, batch.targets, ignore_index=255)


def test_fit_runs_with_the_segmentation_evaluator() -> None:
    torch.manual_seed(0)
    scenes = make_scenes("digits", "train", n_scenes=8, canvas=32, scale=(0.5, 1.0), seed=1)
    d = Distiller(_TinySegmenter(), None, losses={"seg": _PixelCE()})
    result = fit(d, scenes.loader(4), scenes.loader(4), epochs=1, lr=0.05, progress=False,
                 evaluator=segmentation_evaluator(11))
    row = result.history[-1]
    assert row["val_student_acc"] == row["val_student_miou"] and 0 <= row["val_student_pixel_acc"] <= 100
    assert "val_teacher_acc" not in row
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        segmentation_evaluator(1)
