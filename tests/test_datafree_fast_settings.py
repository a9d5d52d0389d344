"""Issue 13 diagnosis of ``fast_dfkd`` (Fang et al., AAAI 2022, arXiv 2112.06253): the outer loop
checked against numbers worked out here, the teacher run in eval mode with its hooks removed, the
student trained on the whole pool, and the student optimiser's settings validated before any work.

The expected values are computed independently of the strategy (numpy softmax and the gradient of
``T^2 KL`` written out; the cosine schedule by hand).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from distill.data.loader import InMemoryLoader
from distill.strategies.data_free_fast import fit_fast_dfkd

torch.set_num_threads(1)

K, SHAPE = 3, (1, 6, 6)


class TinyBN(nn.Module):
    """conv(1->3) -> BN -> ReLU -> spatial mean -> linear(3 -> K): a BN teacher small enough for tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def teacher() -> TinyBN:
    torch.manual_seed(0)
    t = TinyBN()
    with torch.no_grad():
        t.bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.3]))
        t.bn.running_var.copy_(torch.tensor([0.8, 1.5, 0.6]))
        t.fc.weight.mul_(4.0)  # logits of a few units, so T matters
    return t


def generator(latent: int = 8) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(latent, 36), nn.Unflatten(1, SHAPE))


def linear_student() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, K))


def val_loader() -> InMemoryLoader:
    g = torch.Generator().manual_seed(0)
    return InMemoryLoader(torch.randn(9, *SHAPE, generator=g), torch.arange(K).repeat(3), 9, shuffle=False)


def run(student: nn.Module, t: nn.Module, **kw):
    val = kw.pop("val", None)
    args = {"num_classes": K, "image_shape": SHAPE, "latent_dim": 8, "generator": generator(),
            "synthesis_batch_size": 5, "batch_size": 4, "seed": 7, "progress": False}
    args.update(kw)
    return fit_fast_dfkd(student, None, val, teacher=t, **args)


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_two_kd_steps_are_sgd_with_momentum_on_T2_kl_of_pool_batches():
    """epochs=1, no warm-up, two KD steps on the batches ``pool[idx_k]`` drawn from seed + 1. Per step,
    with L = T^2/B sum_b KL(p_t^T || p_s^T): dL/ds_b = T (softmax(s_b/T) - softmax(t_b/T)) / B;
    torch's SGD: g = dL/dw + wd w, buf = g (first step) or m buf + g, w <- w - lr buf."""
    t, s = teacher(), linear_student()
    w = [s[1].weight.detach().double().numpy().copy(), s[1].bias.detach().double().numpy().copy()]
    T, lr, m, wd, B = 3.0, 0.05, 0.5, 0.01, 4
    res = run(s, t, epochs=1, warmup=0, kd_steps=2, T=T, lr=lr, momentum=m, weight_decay=wd, min_lr=0.0)
    pool = res.synthetic.images
    assert pool.shape == (5, *SHAPE)
    rng = torch.Generator().manual_seed(7 + 1)
    buf = None
    for _ in range(2):
        idx = torch.randint(0, 5, (B,), generator=rng)
        x = pool[idx].reshape(B, -1).double().numpy()
        with torch.no_grad():
            tl = t.eval()(pool[idx]).double().numpy()
        g_logits = T * (np_softmax((x @ w[0].T + w[1]) / T) - np_softmax(tl / T)) / B
        g = [g_logits.T @ x + wd * w[0], g_logits.sum(0) + wd * w[1]]
        buf = g if buf is None else [m * b + gi for b, gi in zip(buf, g)]
        w = [wi - lr * b for wi, b in zip(w, buf)]
    np.testing.assert_allclose(s[1].weight.detach().double().numpy(), w[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s[1].bias.detach().double().numpy(), w[1], rtol=1e-4, atol=1e-6)


def test_cosine_schedule_by_hand_and_warmup_rows():
    """warm-up 1 of 3 epochs: lr stays 0.1 in the warm-up row, then cosine over T_max = 2 epochs to min_lr."""
    res = run(linear_student(), teacher(), epochs=3, warmup=1, kd_steps=1, lr=0.1, min_lr=0.001)
    lrs = [r["lr"] for r in res.history]
    mid = 0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi / 2)) / 2
    assert lrs == pytest.approx([0.1, mid, 0.001])
    assert [r["warmup"] for r in res.history] == [True, False, False]
    assert "train_kd" not in res.history[0] and "train_kd" in res.history[1]
    assert [r["pool"] for r in res.history] == [5, 10, 15]


def test_teacher_eval_everywhere_hooks_removed():
    t = teacher().train()  # handed over in training mode: every forward must still run in eval mode
    modes: list[bool] = []
    handle = t.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    before = {k: v.clone() for k, v in t.state_dict().items()}
    run(linear_student(), t, epochs=2, warmup=0, kd_steps=2, lr=0.01, val=val_loader())
    handle.remove()
    assert modes and not any(modes), "the teacher ran in training mode (its BN statistics would move)"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in t.modules()), "a hook was left"
    for k, v in before.items():
        assert torch.equal(t.state_dict()[k], v), f"teacher entry {k} changed"


def test_student_learns_from_the_whole_pool_not_only_the_last_batch():
    """3 syntheses of 5 images, 40 KD steps after the last one: its batches hold images of every synthesis."""
    s = linear_student()
    seen: list[torch.Tensor] = []
    s.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()) if m.training else None)
    res = run(s, teacher(), epochs=3, warmup=0, kd_steps=40, lr=0.01)
    pool = res.synthetic.images
    last_epoch = torch.cat(seen[-40:])
    for k in range(3):
        part = pool[5 * k:5 * (k + 1)]
        hit = (last_epoch[:, None] == part[None]).flatten(2).all(2).any()
        assert hit, f"no KD batch of the last epoch came from synthesis {k}"


@pytest.mark.parametrize("bad,match", [
    ({"lr": 0.0}, "lr must be > 0"), ({"lr": -0.2}, "lr must be > 0"),
    ({"lr": float("nan")}, "lr must be a finite number"), ({"momentum": float("inf")}, "momentum must be a finite"),
    ({"min_lr": -1e-4}, "min_lr must be in"), ({"lr": 0.01, "min_lr": 0.02}, "min_lr must be in"),
    ({"momentum": 1.0}, "momentum must be in"), ({"momentum": -0.1}, "momentum must be in"),
    ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
])
def test_bad_optimiser_settings_are_refused_before_any_work(bad, match):
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, z):
            raise AssertionError("synthesis ran before the settings were checked")

    with pytest.raises(ValueError, match="fast_dfkd: " + match):
        run(linear_student(), teacher(), epochs=2, warmup=0, kd_steps=1, generator=Boom(), **bad)
