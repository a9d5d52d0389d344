"""DearKD (Chen et al. CVPR 2022, arXiv 2204.12997): the early feature term, DeiT's hard response term,
the stage switch and the data-free strategy, checked against numbers worked out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import distill
from distill import functional as DF
from distill.methods.dearkd import DearKD
from distill.models import create
from distill.models.vit import ViT

torch.set_num_threads(1)


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_feature_and_response_losses_against_numpy():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    t = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    expect = np.mean([((a.double().numpy() - b.double().numpy()) ** 2).mean() for a, b in zip(s, t)])
    assert float(DF.dearkd_feature_loss(s, t)) == pytest.approx(expect, rel=1e-6)

    zc, zd, zt = (torch.randn(4, 3, generator=g) for _ in range(3))
    y = torch.tensor([0, 2, 1, 1])
    hard = zt.numpy().argmax(1)
    lc, ld = _log_softmax(zc.double().numpy()), _log_softmax(zd.double().numpy())
    ce_cls = -np.mean([lc[i, y[i]] for i in range(4)])
    ce_dist = -np.mean([ld[i, hard[i]] for i in range(4)])
    assert float(DF.dearkd_response_loss(zc, zd, y, zt)) == pytest.approx(0.5 * ce_cls + 0.5 * ce_dist, rel=1e-6)
    with pytest.raises(ValueError, match="targets"):
        DF.dearkd_response_loss(zc, zd, y[:2], zt)


def test_stage_switch():
    assert [DF.dearkd_feature_active(e, 10, 2, 0.9) for e in range(4)] == [True, True, False, False]
    assert [DF.dearkd_feature_active(e, 10, None, 0.25) for e in range(4)] == [True, True, True, False]  # ceil(2.5)
    assert DF.dearkd_feature_active(None, None, 0, 0.5) and DF.dearkd_feature_active(7, None, None, 0.1)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4))
def test_feature_loss_zero_when_equal_non_negative(b, c):
    g = torch.Generator().manual_seed(b * 7 + c)
    x, y = torch.randn(b, c, 3, 3, generator=g), torch.randn(b, c, 3, 3, generator=g)
    assert float(DF.dearkd_feature_loss([x], [x])) == 0.0
    assert float(DF.dearkd_feature_loss([x], [y])) >= 0.0


def _models():
    torch.manual_seed(0)
    teacher = create("cnn_teacher_mnist")
    student = ViT(num_classes=10, in_channels=1, img_size=28, patch_size=4, dim=16, depth=2, heads=2, distilled=True)
    return student, teacher


def test_dearkd_method_by_hand_then_switches_off():
    student, teacher = _models()
    method = DearKD(pairs=(("blocks.0.attn", "stage1"), ("blocks.1", "stage2")), beta=0.3, early_epochs=1)
    d = distill.Distiller(student, teacher, losses={"dearkd": method})
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 4, 7])
    d.prepare((x, y))
    d.set_epoch(0, 3)
    out = d((x, y))
    keep = {}
    hooks = [student.blocks[0].attn.register_forward_hook(lambda m, a, o: keep.__setitem__("s0", o)),
             student.blocks[1].register_forward_hook(lambda m, a, o: keep.__setitem__("s1", o)),
             teacher.stage1.register_forward_hook(lambda m, a, o: keep.__setitem__("t1", o)),
             teacher.stage2.register_forward_hook(lambda m, a, o: keep.__setitem__("t2", o))]
    with torch.no_grad():
        feats = student.forward_features(x)
        zc, zd = student.head(feats[:, 0]).numpy(), student.head_dist(feats[:, 1]).numpy()
        zt = teacher.eval()(x).numpy()
    for h in hooks:
        h.remove()
    terms = []
    for key, tkey, conv in (("s0", "t1", method.align["blocks_0_attn"]), ("s1", "t2", method.align["blocks_1"])):
        tok = keep[key][:, 2:].detach().numpy()  # drop class and distillation tokens: (B, 49, 16)
        grid = tok.reshape(3, 7, 7, 16)  # row-major patch order
        proj = grid @ conv.weight.detach().numpy()[:, :, 0, 0].T + conv.bias.detach().numpy()  # (B, 7, 7, C)
        tm = keep[tkey].detach().numpy()  # (B, C, H, W)
        if tm.shape[-1] == 14:  # 2x2 average pooling to the student's 7x7 grid
            tm = tm.reshape(3, tm.shape[1], 7, 2, 7, 2).mean((3, 5))
        terms.append(((proj.transpose(0, 3, 1, 2) - tm) ** 2).mean())
    lc, ld = _log_softmax(zc.astype(np.float64)), _log_softmax(zd.astype(np.float64))
    hard = zt.argmax(1)
    resp = -0.5 * np.mean([lc[i, y[i]] for i in range(3)]) - 0.5 * np.mean([ld[i, hard[i]] for i in range(3)])
    assert float(out.parts["dearkd"]) == pytest.approx(resp + 0.3 * np.mean(terms), rel=1e-4)
    out.total.backward()
    assert method.align["blocks_0_attn"].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    method.align.zero_grad(set_to_none=True)
    d.set_epoch(1, 3)  # the second stage: response distillation only
    late = d((x, y))
    assert not method.feature_active
    assert float(late.parts["dearkd"]) == pytest.approx(resp, rel=1e-4)
    late.total.backward()
    assert method.align["blocks_0_attn"].weight.grad is None


def test_dearkd_errors_and_teacher_frozen():
    with pytest.raises(ValueError, match="early_fraction"):
        DearKD(early_fraction=1.5)
    with pytest.raises(ValueError, match="heads"):
        DearKD(heads=("head", "head_dist", "x"))
    student, teacher = _models()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = distill.Distiller(student, teacher, losses={"dearkd": DearKD(beta=2.0)})
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    d.prepare((x, y))
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        d((x, y)).total.backward()
        opt.step()
        opt.zero_grad()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="needs targets"):
        d((x, None))


def test_dearkd_data_free_never_reads_train_loader():
    from distill.strategies.dearkd import fit_dearkd_data_free

    class Forbidden:
        def __iter__(self):
            raise AssertionError("the data-free strategy read the training data")

    student, teacher = _models()
    teacher.eval()
    with pytest.raises(TypeError, match="unknown argument"):  # before any synthesis
        fit_dearkd_data_free(student, Forbidden(), None, teacher=teacher, num_classes=10, image_shape=(1, 28, 28),
                             epochs=1, dearkd={"bta": 1.0})
    res = fit_dearkd_data_free(student, Forbidden(), None, teacher=teacher, num_classes=10, image_shape=(1, 28, 28),
                               epochs=2, ipc=1, batch_size=5, dearkd={"early_epochs": 1, "beta": 0.5},
                               synth={"iterations": 2, "batch_size": 10}, progress=False, optimizer="adamw", lr=1e-3)
    assert res.synthetic is not None and len(res.synthetic.images) == 10
    assert len(res.history) == 2
