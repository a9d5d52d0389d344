"""Grid-level ICKD (Liu et al., ICCV 2021, arXiv 2202.03680): ``ickd_grid_loss`` and the ``ickd_grid`` method.

Every value is checked against numpy loops written here (cells cut by explicit boundaries, never by
the code under test); grid (1, 1) against the image-level loss; invariants with hypothesis; the
method trains a ``seg_student`` a few steps on digit scenes with the teacher untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from distill import Distiller
from distill import functional as DF
from distill.batch import DenseBatch
from distill.methods import create_method, method_info

torch.set_num_threads(1)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _np_corr(cell: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (C, C): Gram of the flattened channels, each row divided by its L2 norm."""
    v = cell.reshape(cell.shape[0], -1)
    g = v @ v.T
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def _np_grid_loss(s: np.ndarray, t: np.ndarray, rows_s, cols_s, rows_t, cols_t, reduction: str = "mean") -> float:
    """Loop over batch and cells; ``rows_*``/``cols_*`` the cell boundaries, written out by hand."""
    b, c = t.shape[:2]
    total = 0.0
    for n in range(b):
        per_image = []
        for i in range(len(rows_t) - 1):
            for j in range(len(cols_t) - 1):
                gs = _np_corr(s[n, :, rows_s[i]:rows_s[i + 1], cols_s[j]:cols_s[j + 1]])
                gt = _np_corr(t[n, :, rows_t[i]:rows_t[i + 1], cols_t[j]:cols_t[j + 1]])
                per_image.append(((gt - gs) ** 2).sum() / (c * c))
        total += np.mean(per_image) if reduction == "mean" else np.sum(per_image)
    return total / b


# ------------------------------------------------------------------------------ the formula


def test_two_by_two_grid_matches_a_numpy_loop() -> None:
    r = np.random.default_rng(3)
    s, t = r.normal(size=(2, 3, 4, 6)), r.normal(size=(2, 3, 4, 6))
    rows, cols = [0, 2, 4], [0, 3, 6]
    want = _np_grid_loss(s, t, rows, cols, rows, cols)
    assert DF.ickd_grid_loss(_t(s), _t(t), (2, 2)).item() == pytest.approx(want, rel=1e-10)
    assert DF.ickd_grid_loss(_t(s), _t(t), (2, 2), partition="strict").item() == pytest.approx(want, rel=1e-10)
    want_sum = _np_grid_loss(s, t, rows, cols, rows, cols, "sum")
    assert DF.ickd_grid_loss(_t(s), _t(t), (2, 2), reduction="sum").item() == pytest.approx(want_sum, rel=1e-10)
    # the grid matters: the 2x2 value is not the image-level one
    assert abs(want - DF.ickd_loss(_t(s), _t(t)).item()) > 1e-3


def test_hand_computed_two_by_two_grid() -> None:
    """One image, c = 2, a 2x2 map cut into four one-pixel cells; worked out by hand.

    A one-pixel cell x = (x_0, x_1) has Gram x xᵀ, whose row m is x_m·x with norm |x_m|·|x|: the
    normalised row is sign(x_m)·x/|x| (zero when x_m = 0). Cells in row-major order:
    student (1, 0), (0, 1), (1, 1), (1, 1); teacher (1, 0), (1, 0), (1, 1), (1, -1).
    Cell 1 and cell 3: equal → 0.
    Cell 2: student rows (0, 0), (0, 1); teacher rows (1, 0), (0, 0): squared difference 1 + 1 = 2.
    Cell 4: student rows (1, 1)/√2, (1, 1)/√2; teacher rows (1, -1)/√2, (-1, 1)/√2: differences
            (0, 2/√2) and (2/√2, 0), squared 2 + 2 = 4.
    Over c² = 4: 0, 0.5, 0, 1; mean over the 4 cells 0.375, sum 1.5.
    """
    s = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]]]])  # (1, 2, 2, 2): channel, row, col
    t = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, -1.0]]]])
    assert DF.ickd_grid_loss(s, t, (2, 2)).item() == pytest.approx(0.375, abs=1e-6)
    assert DF.ickd_grid_loss(s, t, (2, 2), reduction="sum").item() == pytest.approx(1.5, abs=1e-6)


def test_non_divisible_sizes_use_the_even_partition() -> None:
    """H = 5, W = 7 in a 2 x 3 grid: rows (3, 2), columns (3, 2, 2); the student at another size (8 x 9:
    rows (4, 4), columns (3, 3, 3)) is cut into the same 2 x 3 grid of its own size."""
    r = np.random.default_rng(5)
    s, t = r.normal(size=(3, 4, 8, 9)), r.normal(size=(3, 4, 5, 7))
    want = _np_grid_loss(s, t, [0, 4, 8], [0, 3, 6, 9], [0, 3, 5], [0, 3, 5, 7])
    assert DF.ickd_grid_loss(_t(s), _t(t), (2, 3)).item() == pytest.approx(want, rel=1e-10)
    g = DF.ickd_grid_correlation(_t(t), (2, 3))
    assert g.shape == (3, 2, 3, 4, 4)
    assert np.allclose(g[1, 1, 0].numpy(), _np_corr(t[1, :, 3:5, 0:3]), atol=1e-12)
    assert np.allclose(g[2, 0, 2].numpy(), _np_corr(t[2, :, 0:3, 5:7]), atol=1e-12)


def test_cells_of_one_pixel_and_an_int_grid() -> None:
    r = np.random.default_rng(6)
    s, t = r.normal(size=(1, 3, 3, 3)), r.normal(size=(1, 3, 3, 3))
    edges = [0, 1, 2, 3]
    want = _np_grid_loss(s, t, edges, edges, edges, edges)
    assert DF.ickd_grid_loss(_t(s), _t(t), 3).item() == pytest.approx(want, rel=1e-10)


_seeds = st.integers(0, 10_000)


@settings(max_examples=20, deadline=None)
@given(_seeds, st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(1, 6))
def test_grid_one_by_one_is_the_image_level_loss(seed: int, b: int, c: int, h: int, w: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, c, h, w, generator=g, dtype=torch.float64), torch.randn(b, c, h + 1, w, generator=g,
                                                                                  dtype=torch.float64)
    assert DF.ickd_grid_loss(s, t, (1, 1)).item() == pytest.approx(DF.ickd_loss(s, t).item(), rel=1e-12, abs=1e-15)


@settings(max_examples=20, deadline=None)
@given(_seeds, st.integers(1, 4), st.integers(1, 4), st.floats(0.1, 30.0))
def test_invariants(seed: int, n: int, m: int, scale: float) -> None:
    """Zero at agreement, non-negative, unchanged when a cell's map is scaled by a positive number
    (row normalisation), and bounded by 4/c per cell (rows of unit norm)."""
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 3, 12, 12, generator=g, dtype=torch.float64), torch.randn(2, 3, 12, 12, generator=g,
                                                                                    dtype=torch.float64)
    base = DF.ickd_grid_loss(s, t, (n, m)).item()
    assert DF.ickd_grid_loss(t, t.clone(), (n, m)).item() == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= base <= 4 / 3 + 1e-9
    assert DF.ickd_grid_loss(scale * s, t, (n, m)).item() == pytest.approx(base, rel=1e-9)
    s2 = s.clone()  # scale cell (0, 0) alone (12 divides by n and m: it is [:12/n, :12/m])
    s2[:, :, : 12 // n, : 12 // m] *= scale
    assert DF.ickd_grid_loss(s2, t, (n, m)).item() == pytest.approx(base, rel=1e-9)
    s3 = s.clone()  # but scaling part of a cell (one pixel) changes it
    s3[:, :, :1, :1] *= 3.0
    assert DF.ickd_grid_loss(s3, t, (n, m)).item() != pytest.approx(base, rel=1e-6)


def test_gradient_reaches_the_student_only() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    t = torch.randn(2, 4, 6, 6, requires_grad=True)
    DF.ickd_grid_loss(s, t.detach(), (3, 2)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"grid": (0, 2)}, r"grid must be a pair \(n, m\) of positive ints, got \(0, 2\)"),
    ({"grid": (2, 2, 2)}, "grid must be a pair"),
    ({"grid": (2.0, 2)}, "grid must be a pair"),
    ({"grid": True}, "grid must be a pair"),
    ({"grid": (5, 2)}, r"grid \(5, 2\) needs student maps of at least 5 x 2 positions, got \(1, 2, 4, 6\)"),
    ({"grid": (3, 2), "partition": "strict"}, "partition='strict' needs student H divisible by the grid: 4 is not a multiple of 3"),
    ({"partition": "pad"}, "partition must be one of"),
    ({"reduction": "max"}, "reduction must be one of"),
])
def test_bad_settings_name_the_value(kwargs: dict, match: str) -> None:
    s = t = torch.zeros(1, 2, 4, 6)
    with pytest.raises(ValueError, match=match):
        DF.ickd_grid_loss(s, t, **kwargs)


def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"channel counts differ, \(1, 2, 4, 4\) vs \(1, 3, 4, 4\)"):
        DF.ickd_grid_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="batch sizes differ"):
        DF.ickd_grid_loss(torch.zeros(1, 2, 4, 4), torch.zeros(2, 2, 4, 4), (2, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        DF.ickd_grid_loss(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), (2, 2))
    with pytest.raises(ValueError, match=r"student maps of at least 4 x 4 positions, got \(1, 2, 3, 8\)"):
        DF.ickd_grid_loss(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 8, 8), (4, 4))
    with pytest.raises(ValueError, match=r"teacher maps of at least 4 x 4 positions, got \(1, 2, 8, 3\)"):
        DF.ickd_grid_loss(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 3), (4, 4))
    with pytest.raises(ValueError, match="3 cells along W, but the map has only 2"):
        DF.ickd_grid_correlation(torch.zeros(1, 2, 4, 2), (1, 3))
    with pytest.raises(ValueError, match="partition must be one of"):
        DF.ickd_grid_correlation(torch.zeros(1, 2, 4, 4), (2, 2), partition="pad")
    with pytest.raises(ValueError, match="grid must be a pair"):
        create_method("ickd_grid", grid=(4, -1))
    with pytest.raises(ValueError, match="partition must be one of"):
        create_method("ickd_grid", partition="overlap")


# ------------------------------------------------------------------------------ the method


def test_method_is_registered_for_segmentation_with_its_defaults() -> None:
    info = method_info("ickd_grid")
    assert info.family == "segmentation" and info.paper.arxiv == "2202.03680"
    assert info.defaults["grid"] == (4, 4) and info.defaults["student_tap"] == "feat"
    assert info.defaults["partition"] == "even" and info.defaults["reduction"] == "mean"


def test_method_matches_the_loop_with_non_default_settings() -> None:
    r = np.random.default_rng(8)
    s, t = r.normal(size=(2, 3, 5, 6)), r.normal(size=(2, 3, 5, 6))
    m = create_method("ickd_grid", student_tap="feat", teacher_tap="feat", grid=(2, 3), reduction="sum",
                      adapter="identity")
    sv, tv = {"logits": _t(s), "feat": _t(s)}, {"logits": _t(t), "feat": _t(t)}
    batch = DenseBatch(inputs=torch.zeros(2, 1, 20, 24))
    m.prepare(sv, tv, batch)
    want = _np_grid_loss(s, t, [0, 3, 5], [0, 2, 4, 6], [0, 3, 5], [0, 2, 4, 6], "sum")
    assert m(sv, tv, batch).item() == pytest.approx(want, rel=1e-10)
    strict = create_method("ickd_grid", grid=(2, 3), partition="strict", adapter="identity")
    strict.prepare(sv, tv, batch)
    with pytest.raises(ValueError, match="partition='strict' needs student H divisible"):  # H = 5, n = 2
        strict(sv, tv, batch)


def test_method_trains_a_segmentation_student_on_scenes() -> None:
    from distill.data.scenes import make_scenes
    from distill.models.segmentation import seg_student, seg_teacher

    scenes = make_scenes("digits", "train", n_scenes=8, canvas=32, objects=(1, 2), scale=(0.6, 0.9), seed=0)
    torch.manual_seed(0)
    teacher, student = seg_teacher(), seg_student()
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = next(iter(scenes.loader(4)))
    method = create_method("ickd_grid", grid=(2, 2), weight=160.0)  # 2.5·c, c = 64
    d = Distiller(student, teacher, losses={"seg_ce": 1.0, "ickd_grid": method})
    d.prepare(batch)
    assert method.adapter is not None and any(p is q for p in d.trainable_parameters()
                                              for q in method.adapter.parameters())
    opt = torch.optim.SGD(list(d.trainable_parameters()), lr=0.05)
    first = None
    for _ in range(4):
        out = d(batch)
        first = first if first is not None else float(out.parts["ickd_grid"])
        out.total.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        opt.step()
        opt.zero_grad()
        d.step_end()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    assert float(d(batch).parts["ickd_grid"]) < first
