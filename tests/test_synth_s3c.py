"""MTT (Cazenavette et al., CVPR 2022, arXiv 2203.11932): the trajectory loss, the unrolled student,
the expert buffer and the synthesizer, checked against numbers computed independently (numpy,
plainly written loops, finite differences)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from distill.data.sources import get_dataset
from distill.functional import trajectory_matching_loss, unrolled_sgd
from distill.models.registry import create
from distill.synthesis import experts as experts_mod
from distill.synthesis.experts import ParamLayout, buffer_experts, load_experts
from distill.synthesis.mtt import _init_images, matching_loss, mtt, mtt_defaults
from distill.synthesis.registry import synthesizer_info

torch.set_num_threads(1)


# ---------------------------------------------------------------- the loss


def test_trajectory_loss_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    a, b, c = (rng.normal(size=57) for _ in range(3))
    expected = np.sum((a - c) ** 2) / np.sum((b - c) ** 2)
    got = trajectory_matching_loss(*(torch.from_numpy(v) for v in (a, b, c)))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # hand-made: start (0, 0), target (3, 4) (|.|^2 = 25), student at (3, 3) -> 1/25
    got = trajectory_matching_loss(torch.tensor([3.0, 3.0]), torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]))
    assert got.item() == pytest.approx(1 / 25)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0.01, 100.0), shift=st.floats(-10.0, 10.0), seed=st.integers(0, 1000))
def test_trajectory_loss_invariances(scale: float, shift: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(20, generator=g, dtype=torch.float64) for _ in range(3))
    base = trajectory_matching_loss(a, b, c)
    moved = trajectory_matching_loss(a * scale + shift, b * scale + shift, c * scale + shift)
    assert moved.item() == pytest.approx(base.item(), rel=1e-9)
    assert trajectory_matching_loss(b, b, c).item() == pytest.approx(1.0)  # a student that did not move
    assert trajectory_matching_loss(c, b, c).item() == 0.0


def test_trajectory_loss_refuses_bad_input() -> None:
    v = torch.ones(4)
    with pytest.raises(ValueError, match="identical"):
        trajectory_matching_loss(torch.zeros(4), v, v)
    with pytest.raises(ValueError, match="shapes"):
        trajectory_matching_loss(torch.zeros(4), v, torch.ones(5))


# ---------------------------------------------------------------- the unrolled student on a linear model


def _linear(d: int, k: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k)).double()


def _numpy_sgd(theta: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float, batches: list[np.ndarray],
               k: int) -> np.ndarray:
    """Softmax regression by hand: W (K, D) then b (K,) flattened; CE's gradient (p - onehot)/B."""
    d = x.shape[1]
    for idx in batches:
        w, b = theta[:k * d].reshape(k, d), theta[k * d:]
        xb, yb = x[idx], np.eye(k)[y[idx]]
        z = xb @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        gz = (p - yb) / len(idx)
        theta = theta - lr * np.concatenate([(gz.T @ xb).ravel(), gz.sum(0)])
    return theta


def _problem(n: int = 6, d: int = 5, k: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 1, d, generator=g, dtype=torch.float64)
    y = torch.randint(k, (n,), generator=g)
    y[:k] = torch.arange(k)
    start = torch.randn(k * d + k, generator=g, dtype=torch.float64) * 0.3
    target = torch.randn(k * d + k, generator=g, dtype=torch.float64) * 0.3
    return x, y, start, target


def test_unrolled_steps_equal_hand_computed_sgd() -> None:
    x, y, start, target = _problem()
    model = _linear(5, 3)
    layout = ParamLayout.of(model)
    lr, steps = 0.7, 4

    def step_loss(theta, n):
        return nn.functional.cross_entropy(functional_call(model, layout.unflatten(theta), (x,)), y)

    end = unrolled_sgd(step_loss, start, torch.tensor(lr, dtype=torch.float64), steps)
    expected = _numpy_sgd(start.numpy(), x.reshape(6, 5).numpy(), y.numpy(), lr, [np.arange(6)] * steps, 3)
    np.testing.assert_allclose(end.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    # the whole objective = the numpy normalised distance of that end point
    loss = matching_loss(model, layout, x, y, start, target, lr, syn_steps=steps)
    want = np.sum((expected - target.numpy()) ** 2) / np.sum((start.numpy() - target.numpy()) ** 2)
    assert loss.item() == pytest.approx(want, rel=1e-10)


def test_minibatches_follow_permutation_chunks() -> None:
    # batch_syn=2 of 6 images, 5 steps: a permutation in chunks of 2, taken last-first, a new one when spent
    x, y, start, target = _problem()
    model = _linear(5, 3)
    layout = ParamLayout.of(model)
    loss = matching_loss(model, layout, x, y, start, target, 0.5, syn_steps=5, batch_syn=2,
                         generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    batches: list[np.ndarray] = []
    while len(batches) < 5:
        perm = torch.randperm(6, generator=g).numpy()
        batches += [perm[4:6], perm[2:4], perm[0:2]]
    end = _numpy_sgd(start.numpy(), x.reshape(6, 5).numpy(), y.numpy(), 0.5, batches[:5], 3)
    want = np.sum((end - target.numpy()) ** 2) / np.sum((start.numpy() - target.numpy()) ** 2)
    assert loss.item() == pytest.approx(want, rel=1e-10)


def test_gradients_match_finite_differences() -> None:
    x, y, start, target = _problem()
    model = _linear(5, 3)
    layout = ParamLayout.of(model)
    xs = x.clone().requires_grad_(True)
    lr = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    matching_loss(model, layout, xs, y, start, target, lr, syn_steps=3).backward()

    def f(xv, lv):
        with torch.enable_grad():
            return matching_loss(model, layout, xv, y, start, target, lv, syn_steps=3).item()

    eps = 1e-6
    for i in [(0, 0, 0, 0), (2, 0, 0, 3), (5, 0, 0, 1)]:
        xp, xm = x.clone(), x.clone()
        xp[i] += eps
        xm[i] -= eps
        fd = (f(xp, 0.6) - f(xm, 0.6)) / (2 * eps)
        assert xs.grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    fd = (f(x, 0.6 + eps) - f(x, 0.6 - eps)) / (2 * eps)
    assert lr.grad.item() == pytest.approx(fd, rel=1e-5)
    assert abs(lr.grad.item()) > 1e-4 and xs.grad.abs().max().item() > 1e-4  # not a vacuous match


# ---------------------------------------------------------------- the expert buffer


@pytest.fixture(scope="module")
def digits():
    d = get_dataset("digits")
    return d.inputs[:300], d.targets[:300]


SMALL = {"width": 8, "depth": 2}


def test_buffer_round_trip_and_plain_sgd(tmp_path, digits) -> None:
    x, y = digits[0][:120], digits[1][:120]
    buf = buffer_experts(x, y, tmp_path / "b", num_classes=10, num_experts=2, epochs=2, lr=0.05, batch_size=50,
                         model_kwargs=SMALL, dsa=False, seed=4, progress=False)
    assert buf.num_experts == 2 and buf.epochs == 2
    traj = buf.trajectory(1)
    # epoch 0 is the initialisation of expert 1 (seed 4 + 1); epoch 1 is one epoch of plain SGD,
    # written here as a loop over the same shuffled batches
    torch.manual_seed(5)
    net = create("convnet3", num_classes=10, in_channels=1, image_size=8, **SMALL)
    layout = ParamLayout.of(net)
    assert traj.shape == (3, layout.size)
    torch.testing.assert_close(traj[0], layout.flatten(net))
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(120, generator=g)
    for s in range(0, 120, 50):
        idx = order[s:s + 50]
        net.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.05 * p.grad
    torch.testing.assert_close(traj[1], layout.flatten(net), rtol=1e-5, atol=1e-6)
    # read back from disk alone
    again = load_experts(tmp_path / "b")
    torch.testing.assert_close(again.points(1, [2, 0]), traj[[2, 0]])
    assert again.settings["lr"] == 0.05 and again.layout == layout


def test_buffer_reused_extended_and_mismatch_refused(tmp_path, digits, monkeypatch) -> None:
    x, y = digits
    args = dict(num_classes=10, epochs=1, batch_size=100, model_kwargs=SMALL, seed=0, progress=False)
    buffer_experts(x, y, tmp_path, num_experts=1, **args)
    first = (tmp_path / "expert_000.safetensors").read_bytes()
    calls: list[int] = []
    real_train = experts_mod._train_expert

    def counting(*a, **kw):
        calls.append(1)
        return real_train(*a, **kw)

    monkeypatch.setattr(experts_mod, "_train_expert", counting)
    buf = buffer_experts(x, y, tmp_path, num_experts=1, **args)
    assert calls == [] and buf.num_experts == 1  # reused, nothing trained
    buf = buffer_experts(x, y, tmp_path, num_experts=2, **args)
    assert calls == [1] and buf.num_experts == 2  # only the missing expert
    assert (tmp_path / "expert_000.safetensors").read_bytes() == first
    with pytest.raises(ValueError, match=r"lr: buffer has 0.01, asked 0.02"):
        buffer_experts(x, y, tmp_path, num_experts=2, lr=0.02, **args)
    with pytest.raises(ValueError, match="data: buffer has"):
        buffer_experts(x + 1, y, tmp_path, num_experts=2, **args)
    with pytest.raises(ValueError, match="epochs"):
        buffer_experts(x, y, tmp_path, num_experts=2, **{**args, "epochs": 3})
    with pytest.raises(FileNotFoundError, match="no expert buffer"):
        load_experts(tmp_path / "nothing")


# ---------------------------------------------------------------- the synthesizer


def test_registered_with_paper_and_defaults() -> None:
    info = synthesizer_info("mtt")
    assert info.family == "dataset" and info.paper.arxiv == "2203.11932" and info.paper.year == 2022
    assert mtt_defaults(10) == {"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 20, "lr_lr": 1e-4}
    assert mtt_defaults(1)["syn_steps"] == 50 and mtt_defaults(40)["max_start_epoch"] == 40


def test_refuses_bad_settings_before_training(digits) -> None:
    x, y = digits
    with pytest.raises(ValueError, match="exceeds the experts' 4 epochs"):
        mtt(x, y, ipc=2, num_classes=10, expert_train_epochs=4, max_start_epoch=3, expert_epochs=2, progress=False)
    with pytest.raises(ValueError, match="fewer than ipc=100"):
        mtt(x, y, ipc=100, num_classes=10, progress=False)


@pytest.fixture(scope="module")
def tiny_buffer(tmp_path_factory, digits):
    x, y = digits
    folder = tmp_path_factory.mktemp("mtt_buffer")
    buffer_experts(x, y, folder, num_classes=10, num_experts=2, epochs=4, batch_size=64,
                   model_kwargs={"width": 16, "depth": 2}, seed=0, progress=False)
    return folder


COMMON = dict(num_experts=2, expert_train_epochs=4, expert_batch_size=64, model_kwargs={"width": 16, "depth": 2},
              progress=False)


def test_start_epochs_reach_max_and_targets_are_m_later(digits, tiny_buffer, monkeypatch) -> None:
    x, y = digits
    seen: list[tuple[int, list[int]]] = []
    real_points = experts_mod.ExpertBuffer.points

    def spy(self, expert, epochs):
        seen.append((expert, list(epochs)))
        return real_points(self, expert, epochs)

    monkeypatch.setattr(experts_mod.ExpertBuffer, "points", spy)
    mtt(x, y, ipc=1, num_classes=10, iterations=24, syn_steps=1, expert_epochs=2, max_start_epoch=2, lr_lr=0.0,
        buffer_dir=tiny_buffer, dsa=False, expert_dsa=True, **COMMON)
    starts = {e[0] for _, e in seen}
    assert starts == {0, 1, 2}  # t <= T+ (the paper), T+ included
    assert all(e[1] == e[0] + 2 for _, e in seen)
    assert {k for k, _ in seen} == {0, 1}


def test_few_iterations_lower_the_matching_loss(digits, tiny_buffer) -> None:
    x, y = digits
    kw = dict(ipc=2, num_classes=10, syn_steps=6, expert_epochs=1, max_start_epoch=2, lr_img=100.0, lr_lr=1e-5,
              seed=1, buffer_dir=tiny_buffer, **COMMON)
    out = mtt(x, y, iterations=25, **kw)
    assert out.images.shape == (20, 1, 8, 8) and out.labels.tolist() == sum([[c, c] for c in range(10)], [])
    assert out.manifest["learned_lr"] != 0.01 and out.manifest["method"] == "mtt"
    init = _init_images(x, y, 2, 10, "real", torch.Generator().manual_seed(1))
    buf = load_experts(tiny_buffer)
    net = create("convnet3", num_classes=10, in_channels=1, image_size=8, width=16, depth=2)
    lab = torch.arange(10).repeat_interleave(2)

    def mean_loss(images, lr):
        vals = []
        for k in range(2):
            for t in range(3):
                s, e = buf.points(k, [t, t + 1])
                vals.append(matching_loss(net, buf.layout, images, lab, s, e, lr, syn_steps=6).item())
        return sum(vals) / len(vals)

    alpha = out.manifest["learned_lr"]
    # the images alone (same alpha): measured 0.39 -> 0.29 here; and the learned alpha alone (same images)
    before, after = mean_loss(init, alpha), mean_loss(out.images, alpha)
    assert after < 0.85 * before, (before, after)
    assert mean_loss(init, alpha) < 0.8 * mean_loss(init, 0.01)


def test_learned_labels_and_fixed_lr(digits, tiny_buffer) -> None:
    x, y = digits
    out = mtt(x, y, ipc=1, num_classes=10, iterations=3, syn_steps=2, expert_epochs=1, max_start_epoch=1,
              lr_lr=0.0, lr_init=0.02, learn_labels=True, lr_labels=5.0, buffer_dir=tiny_buffer, **COMMON)
    assert out.labels.shape == (10, 10) and out.labels.dtype == torch.float32
    torch.testing.assert_close(out.labels.sum(1), torch.ones(10))
    assert not torch.allclose(out.labels, torch.softmax(torch.eye(10), 1))  # they were learned
    assert out.manifest["learned_lr"] == pytest.approx(0.02)  # lr_lr = 0 keeps alpha
