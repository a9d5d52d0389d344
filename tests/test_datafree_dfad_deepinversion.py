"""Issue 13: ``dfad`` and ``deepinversion_kd`` checked against written-out steps and their contracts.

* ``dfad`` (Fang et al. 2019, arXiv 1912.11006): one outer iteration equals two SGD steps of the
  student on the L1 of the logits and two Adam steps of the generator on its negative, worked out
  here with plain tensors; the teacher is in eval mode in every forward, its mode, ``requires_grad``
  and BN buffers are restored/untouched, no hook is left.
* ``deepinversion_kd`` / ``adi_kd`` (Yin et al., CVPR 2020, arXiv 1912.08795): bad KD settings are
  rejected before the (minutes-long) synthesis: the old code ran the whole synthesis first (the
  regression these tests guard); the student is trained on every synthetic image each epoch; no
  hook is left on the teacher and it stays in eval mode.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from distill.data.synthetic import SyntheticSet
from distill.strategies.data_free_deepinversion import fit_adi_kd, fit_deepinversion_kd
from distill.strategies.data_free_dfad import dfad


class CountingTeacher(nn.Module):
    """A tiny BN teacher ``(B, 1, 8, 8) -> (B, 3)`` that counts its forwards and records its mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.calls = 0
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.modes.append(self.training)
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _student() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def _hooks(m: nn.Module) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


# ----------------------------------------------------------------------------- deepinversion_kd / adi_kd

BAD_KD = [
    ({"batch_size": 0}, ValueError),
    ({"T": 0.0}, ValueError),
    ({"lr": 0.0}, ValueError),
    ({"lr": -0.1}, ValueError),
    ({"momentum": -0.5}, ValueError),
    ({"weight_decay": -1e-4}, ValueError),
    ({"optimizer": "sgdd"}, ValueError),
    ({"schedule": "cosinus"}, ValueError),
    ({"milestones": [99]}, ValueError),
    ({"lrr": 0.01}, TypeError),
]


@pytest.mark.parametrize("bad, err", BAD_KD)
def test_deepinversion_kd_rejects_bad_kd_settings_before_synthesis(bad: dict, err: type) -> None:
    torch.manual_seed(0)
    t = CountingTeacher().eval()
    with pytest.raises(err):
        fit_deepinversion_kd(_student(), None, None, teacher=t, num_classes=3, image_shape=(1, 8, 8), epochs=2,
                             ipc=2, synth={"iterations": 2}, progress=False, **bad)
    assert t.calls == 0  # the old code synthesised first, then failed in distill.fit


@pytest.mark.parametrize("bad, err", BAD_KD[:4] + BAD_KD[-1:])
def test_adi_kd_rejects_bad_kd_settings_before_synthesis(bad: dict, err: type) -> None:
    torch.manual_seed(0)
    t = CountingTeacher().eval()
    with pytest.raises(err):
        fit_adi_kd(_student(), None, None, teacher=t, num_classes=3, image_shape=(1, 8, 8), rounds=1,
                   ipc_per_round=2, epochs_per_round=2, synth={"iterations": 2}, progress=False, **bad)
    assert t.calls == 0


def test_deepinversion_kd_trains_on_every_synthetic_image_each_epoch() -> None:
    torch.manual_seed(0)
    t = CountingTeacher().eval()
    n = 13  # not a multiple of the batch: the last, short batch must be used too
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    syn = SyntheticSet(images, torch.arange(n) % 3, {"method": "test"})
    student = _student()
    seen: list[torch.Tensor] = []
    student.register_forward_pre_hook(lambda m, inp: seen.append(inp[0][:, 0, 0, 0].clone()) if m.training else None)
    fit_deepinversion_kd(student, None, None, teacher=t, num_classes=3, image_shape=(1, 8, 8), epochs=2,
                         synthetic=syn, batch_size=4, progress=False, lr=0.01)
    ids = torch.cat(seen).long()
    assert ids.numel() == 2 * n
    for epoch in range(2):
        assert sorted(ids[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert not any(t.modes)  # teacher in eval mode for every KD forward


def test_deepinversion_kd_teacher_eval_no_hooks_bn_untouched() -> None:
    torch.manual_seed(0)
    t = CountingTeacher()
    t.bn.running_mean.uniform_(-1, 1)
    t.bn.running_var.uniform_(0.5, 2)
    t.train()  # the caller's mode: restored after the synthesis
    before = copy.deepcopy(t.bn.state_dict())
    fit_deepinversion_kd(_student(), None, None, teacher=t, num_classes=3, image_shape=(1, 8, 8), epochs=1, ipc=2,
                         synth={"iterations": 3}, batch_size=6, progress=False, lr=0.01)
    assert t.calls > 0 and not any(t.modes)
    assert _hooks(t) == 0
    for k, v in before.items():
        assert torch.equal(v, t.bn.state_dict()[k]), k


# ----------------------------------------------------------------------------- dfad


class TinyGenerator(nn.Module):
    """``z (B, 3) -> (B, 1, 8, 8)``, deterministic (no BN, no dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(z.reshape(z.shape[0], -1))).view(-1, 1, 8, 8)


def test_dfad_one_iteration_equals_written_out_steps() -> None:
    torch.manual_seed(0)
    teacher = CountingTeacher().eval()
    student, gen = _student(), TinyGenerator()
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    g0 = {k: v.clone() for k, v in gen.state_dict().items()}
    lr_s, mom, wd, lr_g, B, seed = 0.07, 0.5, 0.03, 0.02, 5, 3
    dfad(student, None, None, teacher=teacher, generator=gen, image_shape=(1, 8, 8), iterations=1,
         student_steps=2, generator_steps=2, batch_size=B, latent_dim=3, lr_student=lr_s, lr_generator=lr_g,
         momentum=mom, weight_decay=wd, seed=seed, progress=False)

    # written out: the same noise stream, two SGD(momentum, weight decay) steps, one Adam step
    noise = torch.Generator().manual_seed(seed)
    W, b = s0["1.weight"].clone(), s0["1.bias"].clone()
    GW, Gb = g0["fc.weight"].clone(), g0["fc.bias"].clone()

    def gen_fwd(z, gw, gb):
        return torch.tanh(z @ gw.T + gb).view(-1, 1, 8, 8)

    buf = None
    for _ in range(2):
        z = torch.randn(B, 3, generator=noise)
        x = gen_fwd(z, GW, Gb)
        with torch.no_grad():
            t = teacher(x)
        Wv, bv = W.clone().requires_grad_(), b.clone().requires_grad_()
        s = x.reshape(B, -1) @ Wv.T + bv
        loss = (s - t).abs().sum() / (B * 3)
        gW, gb = torch.autograd.grad(loss, [Wv, bv])
        d = [gW + wd * W, gb + wd * b]
        buf = d if buf is None else [mom * o + n for o, n in zip(buf, d)]
        W, b = W - lr_s * buf[0], b - lr_s * buf[1]
    # two Adam steps (betas 0.9, 0.999, eps 1e-8) on -L1; two steps, because Adam's first step
    # lr * g / (|g| + eps) cannot tell -L1 from another decreasing function of L1 (-log(L1 + 1))
    params, m, v = [GW, Gb], [torch.zeros_like(GW), torch.zeros_like(Gb)], [torch.zeros_like(GW), torch.zeros_like(Gb)]
    for step in (1, 2):
        z = torch.randn(B, 3, generator=noise)
        pv = [q.clone().requires_grad_() for q in params]
        x = gen_fwd(z, *pv)
        s = x.reshape(B, -1) @ W.T + b
        loss_g = -(s - teacher(x)).abs().sum() / (B * 3)
        grads = torch.autograd.grad(loss_g, pv)
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            m_hat, v_hat = m[i] / (1 - 0.9 ** step), v[i] / (1 - 0.999 ** step)
            params[i] = params[i] - lr_g * m_hat / (v_hat.sqrt() + 1e-8)
    GW, Gb = params

    assert torch.allclose(student[1].weight, W, atol=1e-6)
    assert torch.allclose(student[1].bias, b, atol=1e-6)
    assert torch.allclose(gen.fc.weight, GW, atol=1e-6)
    assert torch.allclose(gen.fc.bias, Gb, atol=1e-6)
    assert not math.isclose(float((gen.fc.weight.detach() - g0["fc.weight"]).abs().max()), 0.0)


def test_dfad_teacher_eval_restored_untouched_no_hooks() -> None:
    torch.manual_seed(0)
    teacher = CountingTeacher()
    teacher.bn.running_mean.uniform_(-1, 1)
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    dfad(_student(), None, None, teacher=teacher, generator=TinyGenerator(), image_shape=(1, 8, 8), iterations=3,
         batch_size=4, latent_dim=3, progress=False)
    assert teacher.calls > 0 and not any(teacher.modes)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert _hooks(teacher) == 0
    for k, v in before.items():
        assert torch.equal(v, teacher.state_dict()[k]), k
