"""Gradient matching (DC), DSA and distribution matching (DM): their objectives against numbers
worked out by hand or with numpy, the siamese use of DSA, and each synthesizer lowering its
objective on a tiny data set (the 8x8 digits, a narrow ConvNet-3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.data import get_dataset
from distill.data.synthetic import SyntheticSet, load_synthetic
from distill.functional.matching import (
    gradient_layer_distance,
    gradient_match_distance,
    mean_embedding_discrepancy,
)
from distill.models import create
from distill.synthesis.dsa import DSA
from distill.synthesis.matching import distribution_matching, dsa, gradient_matching
from distill.synthesis.registry import list_synthesizers, synthesizer_info

torch.set_num_threads(1)
# a narrow ConvNet of depth 2 (8x8 -> 4 -> 2): at depth 3 the last block instance-normalises 2x2 maps,
# a landscape too rough for a few steps to show anything
MODEL = {"width": 8, "depth": 2}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = get_dataset("digits")
    keep = d.targets < 4  # 4 classes, ~45 images each: small and fast
    return d.inputs[keep][:160], d.targets[keep][:160]


# --------------------------------------------------------------------------------------------
# The gradient-matching distance
# --------------------------------------------------------------------------------------------


def test_layer_distance_by_hand() -> None:
    # rows (output nodes): [1, 0] vs [0, 1] -> cos 0 -> 1;  [1, 1] vs [1, 1] -> 0;  [3, 4] vs [4, 3] -> 1 - 24/25
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0], [4.0, 3.0]])
    assert gradient_layer_distance(a, b).item() == pytest.approx(1.0 + 0.0 + 0.04, abs=1e-6)
    # a convolution weight (out=3, in=1, kh=1, kw=2) flattens per output node: the same rows
    assert gradient_layer_distance(a.view(3, 1, 1, 2), b.view(3, 1, 1, 2)).item() == pytest.approx(1.04, abs=1e-6)
    # per node, not the whole flattened tensor: that would give 1 - (0+0+1+1+12+12)/(sqrt(28)*sqrt(28)) = 1/14
    assert gradient_layer_distance(a, b).item() != pytest.approx(1 / 14, abs=1e-3)
    # a bias (1-D) is not matched
    assert gradient_layer_distance(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 5.0])).item() == 0.0
    # opposite rows: 2 per node, summed over nodes
    assert gradient_layer_distance(a, -a).item() == pytest.approx(6.0, abs=1e-6)


def _loop_distance(grads_a: list[np.ndarray], grads_b: list[np.ndarray]) -> float:
    total = 0.0
    for ga, gb in zip(grads_a, grads_b):
        if ga.ndim < 2:
            continue
        for i in range(ga.shape[0]):
            u, v = ga[i].ravel(), gb[i].ravel()
            total += 1.0 - float(np.dot(u, v)) / (math.sqrt(float(np.dot(u, u))) * math.sqrt(float(np.dot(v, v))))
    return total


def test_match_distance_sums_layers_like_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 3, 3, 3), (5,), (4, 20), (4,)]
    a = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    b = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    want = _loop_distance([t.numpy() for t in a], [t.numpy() for t in b])
    assert gradient_match_distance(a, b).item() == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="one per parameter"):
        gradient_match_distance(a, b[:-1])
    with pytest.raises(ValueError, match="one shape"):
        gradient_layer_distance(a[0], a[2])


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 5), inner=st.integers(1, 6), seed=st.integers(0, 10_000),
       scale=st.floats(0.01, 100.0))
def test_layer_distance_invariants(out: int, inner: int, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out, inner, generator=g, dtype=torch.float64)
    b = torch.randn(out, inner, generator=g, dtype=torch.float64)
    d = gradient_layer_distance(a, b).item()
    assert -1e-9 <= d <= 2 * out + 1e-9
    assert gradient_layer_distance(a, a).item() == pytest.approx(0.0, abs=1e-9)
    # each output node's distance is blind to that node's gradient magnitude
    row_scale = torch.rand(out, 1, generator=g, dtype=torch.float64) * scale + 1e-3
    assert gradient_layer_distance(a * row_scale, b).item() == pytest.approx(d, rel=1e-7, abs=1e-9)
    assert gradient_layer_distance(a, b).item() == pytest.approx(gradient_layer_distance(b, a).item(), rel=1e-12)


# --------------------------------------------------------------------------------------------
# The DM loss
# --------------------------------------------------------------------------------------------


def test_mean_embedding_discrepancy_against_numpy() -> None:
    rng = np.random.default_rng(0)
    real, syn = rng.normal(size=(7, 5)), rng.normal(size=(3, 5)) + 0.5
    want = float(np.sum((real.mean(axis=0) - syn.mean(axis=0)) ** 2))
    got = mean_embedding_discrepancy(torch.from_numpy(real), torch.from_numpy(syn)).item()
    assert got == pytest.approx(want, rel=1e-12)
    # by hand: means (1, 1) and (0, 3) -> 1 + 4
    r, s = torch.tensor([[0.0, 0.0], [2.0, 2.0]]), torch.tensor([[0.0, 3.0]])
    assert mean_embedding_discrepancy(r, s).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        mean_embedding_discrepancy(torch.zeros(3, 4), torch.zeros(2, 5))


# --------------------------------------------------------------------------------------------
# Siamese augmentation: the same draw transforms the real and the synthetic batch
# --------------------------------------------------------------------------------------------


class SpyDSA:
    """Wraps DSA and records every draw and every application (which draw, which batch size)."""

    def __init__(self) -> None:
        self.inner = DSA()
        self.draws: list[tuple[object, bool]] = []  # (the draw, siamese); kept alive, compared by identity
        self.applied: list[tuple[object, int]] = []  # (the draw, batch size)

    def sample(self, shape, generator=None, *, siamese=True):  # noqa: ANN001, ANN201
        p = self.inner.sample(shape, generator, siamese=siamese)
        self.draws.append((p, siamese))
        return p

    def __call__(self, x, params):  # noqa: ANN001, ANN201
        self.applied.append((params, int(x.shape[0])))
        return self.inner(x, params)


@pytest.mark.parametrize("which", ["dsa", "distribution_matching"])
def test_one_draw_transforms_both_batches(which: str, digits) -> None:
    x, y = digits
    spy = SpyDSA()
    ipc, batch_real = 2, 6
    common = dict(ipc=ipc, num_classes=4, seed=0, progress=False, iterations=2, batch_real=batch_real,
                  model_kwargs=MODEL, augmentation=spy)
    if which == "dsa":
        dsa(x, y, outer_loop=2, inner_loop=1, **common)
    else:
        distribution_matching(x, y, **common)
    siamese = [d for d, s in spy.draws if s]
    assert len(siamese) == 2 * 4 * (2 if which == "dsa" else 1)  # iterations x classes (x outer steps)
    for d in siamese:
        sizes = sorted(n for p, n in spy.applied if p is d)
        assert sizes == sorted([batch_real, ipc]), "a siamese draw must transform one real and one synthetic batch"
    if which == "dsa":  # the inner-loop training batches get fresh per-image draws, once each
        plain = [d for d, s in spy.draws if not s]
        assert plain and all(sum(p is d for p, _ in spy.applied) == 1 for d in plain)


# --------------------------------------------------------------------------------------------
# Each synthesizer lowers its objective
# --------------------------------------------------------------------------------------------


def _nets(k: int, n: int = 4) -> list[torch.nn.Module]:
    nets = []
    for s in range(n):
        torch.manual_seed(1000 + s)
        nets.append(create("convnet3", num_classes=k, in_channels=1, image_size=8, **MODEL))
    return nets


def _dc_objective(syn: SyntheticSet, x: torch.Tensor, y: torch.Tensor, augment: DSA | None = None) -> float:
    """Mean over fixed networks of sum_c D(grad on S_c, grad on all real images of c), written out here."""
    total, k = 0.0, 4
    draws = torch.Generator().manual_seed(7)
    for net in _nets(k):
        params = list(net.parameters())
        for c in range(k):
            real, mine = x[y == c], syn.images[syn.labels == c]
            if augment is not None:
                p = augment.sample(real.shape, draws)
                real, mine = augment(real, p), augment(mine, p)
            gr = torch.autograd.grad(F.cross_entropy(net(real), torch.full((len(real),), c)), params)
            gs = torch.autograd.grad(F.cross_entropy(net(mine), torch.full((len(mine),), c)), params)
            total += _loop_distance([g.numpy() for g in gs], [g.numpy() for g in gr])
    return total / 4


def _dm_objective(syn: SyntheticSet, x: torch.Tensor, y: torch.Tensor) -> float:
    total = 0.0
    with torch.no_grad():
        for net in _nets(4):
            for c in range(4):
                er, es = net.embed(x[y == c]).numpy(), net.embed(syn.images[syn.labels == c]).numpy()
                total += float(np.sum((er.mean(0) - es.mean(0)) ** 2))
    return total / 4


def _check_set(s: SyntheticSet, method: str, ipc: int, tmp_path) -> None:  # noqa: ANN001
    assert isinstance(s, SyntheticSet) and s.manifest["method"] == method
    assert s.images.shape == (4 * ipc, 1, 8, 8)
    assert s.labels.tolist() == [c for c in range(4) for _ in range(ipc)]
    m = s.manifest
    assert m["family"] == "dataset" and m["ipc"] == ipc and m["num_classes"] == 4
    assert m["iterations_done"] >= 1 and len(m["objective"]["curve"]) == m["iterations_done"]
    assert "settings" in m and m["settings"]["seed"] == 0
    back = load_synthetic(s.save(tmp_path / method))
    assert torch.equal(back.images, s.images) and back.manifest["method"] == method


def test_gradient_matching_lowers_its_objective(digits, tmp_path) -> None:
    x, y = digits
    kw = dict(ipc=2, num_classes=4, seed=0, progress=False, model_kwargs=MODEL, batch_real=64, outer_loop=2,
              inner_loop=1, init="noise")
    start = gradient_matching(x, y, iterations=0, **kw)
    s = gradient_matching(x, y, iterations=12, **kw)
    assert _dc_objective(s, x, y) < 0.8 * _dc_objective(start, x, y)
    _check_set(s, "gradient_matching", 2, tmp_path)
    assert s.manifest["settings"]["outer_loop"] == 2 and s.manifest["settings"]["init"] == "noise"
    again = gradient_matching(x, y, iterations=2, **kw)
    assert torch.equal(again.images, gradient_matching(x, y, iterations=2, **kw).images)  # seeded


def test_dsa_lowers_its_objective(digits, tmp_path) -> None:
    x, y = digits
    kw = dict(ipc=2, num_classes=4, seed=0, progress=False, model_kwargs=MODEL, batch_real=64, outer_loop=2,
              inner_loop=1, init="noise", strategy="crop_scale_rotate")
    start = dsa(x, y, iterations=0, **kw)
    s = dsa(x, y, iterations=12, **kw)
    aug = DSA("crop_scale_rotate")
    assert _dc_objective(s, x, y, aug) < 0.8 * _dc_objective(start, x, y, aug)
    _check_set(s, "dsa", 2, tmp_path)
    assert s.manifest["settings"]["strategy"] == "crop_scale_rotate"


def test_distribution_matching_lowers_its_objective(digits, tmp_path) -> None:
    x, y = digits
    kw = dict(ipc=3, num_classes=4, seed=0, progress=False, model_kwargs=MODEL, batch_real=64, strategy=None,
              init="noise", lr_images=5.0)
    start = distribution_matching(x, y, iterations=0, **kw)
    s = distribution_matching(x, y, iterations=25, **kw)
    assert _dm_objective(s, x, y) < 0.5 * _dm_objective(start, x, y)
    _check_set(s, "distribution_matching", 3, tmp_path)


# --------------------------------------------------------------------------------------------
# Registry, defaults, errors
# --------------------------------------------------------------------------------------------


def test_registered_with_papers_and_defaults() -> None:
    names = {i.name for i in list_synthesizers("dataset")}
    assert {"gradient_matching", "dsa", "distribution_matching"} <= names
    assert synthesizer_info("gradient_matching").paper.arxiv == "2006.05929"
    assert synthesizer_info("dsa").paper.arxiv == "2102.08259"
    assert synthesizer_info("distribution_matching").paper.arxiv == "2110.04181"
    dc = synthesizer_info("gradient_matching").defaults
    assert (dc["iterations"], dc["lr_images"], dc["lr_net"], dc["batch_real"], dc["init"]) == (1000, 0.1, 0.01, 256,
                                                                                               "noise")
    dm = synthesizer_info("distribution_matching").defaults
    assert (dm["iterations"], dm["lr_images"], dm["init"]) == (20000, 1.0, "real")


def test_clear_errors(digits) -> None:
    x, y = digits
    kw = dict(num_classes=4, progress=False, model_kwargs=MODEL, iterations=1)
    with pytest.raises(ValueError, match="outer_loop"):
        gradient_matching(x, y, ipc=3, **kw)  # no default loops for ipc 3
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        gradient_matching(x, y, ipc=1, num_classes=3, progress=False, iterations=1)
    with pytest.raises(ValueError, match="fewer than ipc=100"):
        distribution_matching(x, y, ipc=100, **kw)
    with pytest.raises(ValueError, match="init"):
        distribution_matching(x, y, ipc=1, init="zeros", **kw)
    with pytest.raises(TypeError, match="DSA-like"):
        dsa(x, y, ipc=1, augmentation=object(), **kw)
