"""The core pieces dense tasks share: DenseBatch and fit's pluggable evaluator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distill
from distill.batch import DenseBatch


def _dense(n: int = 5) -> DenseBatch:
    return DenseBatch(torch.arange(n * 4, dtype=torch.float32).view(n, 1, 2, 2),
                      targets=torch.zeros(n, 2, 2, dtype=torch.long),
                      boxes=[torch.full((i, 4), float(i)) for i in range(n)],
                      labels=[torch.full((i,), i, dtype=torch.long) for i in range(n)],
                      extras={"depth": torch.arange(n, dtype=torch.float32).view(n, 1), "K": torch.eye(3)})


def test_dense_batch_splits_every_per_sample_field_together() -> None:
    b = _dense(5)
    first, second = b.part(0, 2), b.part(1, 2)  # tensor_split: 3 + 2
    assert len(first) == 3 and len(second) == 2
    assert [len(t) for t in second.boxes] == [3, 4] and [int(t[0]) for t in second.labels] == [3, 4]
    assert second.inputs[:, 0, 0, 0].tolist() == [12.0, 16.0] and second.targets.shape == (2, 2, 2)
    assert second.extras["depth"].view(-1).tolist() == [3.0, 4.0]
    assert torch.equal(second.extras["K"], torch.eye(3))  # not per-sample: kept whole
    moved = b.to("cpu")
    assert isinstance(moved, DenseBatch) and [len(t) for t in moved.boxes] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"boxes must hold one tensor per sample \(5\), got 4"):
        DenseBatch(torch.zeros(5, 1, 2, 2), boxes=[torch.zeros(0, 4)] * 4)
    with pytest.raises(ValueError, match="cannot be split over 6"):
        b.part(0, 6)


def test_fit_uses_the_evaluator_and_its_student_acc_picks_the_best(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = [(torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,))) for _ in range(2)]
    scores = iter([40.0, 70.0, 55.0])
    calls = []

    def evaluator(distiller, loader, device, *, with_teacher: bool) -> dict[str, float]:
        calls.append((distiller.student is model, loader is data, with_teacher))
        return {"student_acc": next(scores), "map_50": 1.5}

    result = distill.fit(distill.Distiller(model, None, losses={"ce": 1.0}), data, data, epochs=3, lr=0.1,
                         progress=False, evaluator=evaluator, run_dir=tmp_path / "run")
    assert calls == [(True, True, False)] * 3
    assert [row["val_student_acc"] for row in result.history] == [40.0, 70.0, 55.0]
    assert result.history[0]["val_map_50"] == 1.5
    assert (result.best_acc, result.best_epoch, result.last_acc) == (70.0, 1, 55.0)
    with pytest.raises(TypeError, match="evaluator must be a callable"):
        distill.fit(distill.Distiller(model, None, losses={"ce": 1.0}), data, data, epochs=1, progress=False,
                    evaluator="map")


def test_the_distiller_reads_a_segmenters_classes_from_axis_one() -> None:
    from distill.models import create

    seg = create("seg_student", num_classes=7)
    d = distill.Distiller(seg, None, losses={"seg_ce": 1.0})
    b = DenseBatch(torch.randn(2, 1, 32, 40), targets=torch.zeros(2, 32, 40, dtype=torch.long))
    d.prepare(b)
    assert d.num_classes == 7  # not the map's width (40 / 4)
