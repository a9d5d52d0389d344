"""Lopes et al.'s activation metadata, DeepInversion / ADI and Fast DFKD: each term against numbers
worked out independently (NumPy, by hand), the synthesizers on a tiny BN teacher, and the
data-free strategies (they never read ``train_loader`` and leave the teacher unchanged)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.data.loader import InMemoryLoader
from distill.data.synthetic import SyntheticSet
from distill.strategies.registry import strategy_info
from distill.synthesis.bn_stats import BatchNormStatistics
from distill.synthesis.deepinversion import (
    DIWeights,
    adaptive_deepinversion,
    competition_loss,
    deepinversion,
    deepinversion_objective,
    js_divergence,
)
from distill.synthesis.fast_dfkd import (
    FastMetaSynthesizer,
    MomentumBNStatistics,
    adversarial_kl,
)
from distill.synthesis.metadata import (
    LayerStats,
    laplacian_basis,
    load_metadata,
    lopes_metadata,
    record_metadata,
    sample_layer,
)
from distill.synthesis.registry import synthesizer_info

torch.set_num_threads(1)


# ---------------------------------------------------------------- tiny models

class TinyBN(nn.Module):
    """conv(1->3) -> BN -> ReLU -> conv(3->4) -> BN -> ReLU -> spatial mean -> linear(4 -> K)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def tiny_teacher(k: int = 3, seed: int = 0) -> TinyBN:
    torch.manual_seed(seed)
    t = TinyBN(k)
    with torch.no_grad():
        for bn in (t.bn1, t.bn2):
            bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.3)
            bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    return t.eval()


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"teacher entry {k} changed"
    assert all(p.grad is None for p in model.parameters()), "a gradient reached the teacher"


# ---------------------------------------------------------------- DeepInversion / ADI terms

def np_js(lp: np.ndarray, lq: np.ndarray, T: float) -> float:
    out = []
    for a, b in zip(lp / T, lq / T):
        p = np.exp(a - a.max()); p /= p.sum()
        q = np.exp(b - b.max()); q /= q.sum()
        m = (p + q) / 2
        out.append(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))
    return float(np.mean(out))


def test_js_divergence_against_numpy_and_by_hand():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3
    for T in (1.0, 2.5):
        assert js_divergence(a, b, T).item() == pytest.approx(np_js(a.numpy(), b.numpy(), T), rel=1e-5)
        assert competition_loss(a, b, T).item() == pytest.approx(1 - np_js(a.numpy(), b.numpy(), T), rel=1e-5)
    # by hand: two classes, p = (1, 0) and q = (0, 1) in the limit -> JS = ln 2
    hard = torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]])
    assert js_divergence(*hard).item() == pytest.approx(np.log(2), rel=1e-6)
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = 1/2 [1/2 ln(2/3) + 1/2 ln 2] + 1/2 ln(4/3)
    expected = 0.5 * (0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)) + 0.5 * np.log(1 / 0.75)
    assert js_divergence(torch.tensor([[0.0, 0.0]]), torch.tensor([[60.0, -60.0]])).item() == \
        pytest.approx(expected, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 4.0))
def test_js_properties(seed, T):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(3, 5, generator=g) * 4, torch.randn(3, 5, generator=g) * 4
    js = js_divergence(a, b, T).item()
    assert js == pytest.approx(js_divergence(b, a, T).item(), abs=1e-6)  # symmetric
    assert -1e-7 <= js <= np.log(2) + 1e-6  # bounded by ln 2 (nats)
    assert js_divergence(a, a, T).item() == pytest.approx(0.0, abs=1e-6)
    assert js_divergence(a, a + 7.0, T).item() == pytest.approx(0.0, abs=1e-6)  # softmax shift-invariance


def np_bn_term(h: np.ndarray, mean: np.ndarray, var: np.ndarray) -> float:
    mu = h.mean(axis=(0, 2, 3))
    v = ((h - mu[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    return float(np.linalg.norm(mu - mean) + np.linalg.norm(v - var))


def test_deepinversion_objective_against_numpy():
    t = tiny_teacher()
    torch.manual_seed(3)
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    x = torch.randn(4, 1, 6, 6, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2])
    w = DIWeights(ce=0.7, bn=3.0, first_bn_weight=5.0, tv=0.02, tv_p=2.0, l2=0.3, competition=0.4, T=2.0)
    with BatchNormStatistics(t, first_weight=w.first_bn_weight) as bn:
        total, parts = deepinversion_objective(t, x, y, bn, w, student=student)
    with torch.no_grad():
        h1 = t.conv1(x)
        h2 = t.conv2(torch.relu(t.bn1(h1)))
        logits, s_logits = t(x).numpy(), student(x).numpy()
    xn = x.detach().numpy()
    ce = -np.mean(np_log_softmax(logits)[np.arange(4), y.numpy()])
    r_bn = 5.0 * np_bn_term(h1.numpy(), t.bn1.running_mean.numpy(), t.bn1.running_var.numpy()) + \
        np_bn_term(h2.numpy(), t.bn2.running_mean.numpy(), t.bn2.running_var.numpy())
    tv = np.mean([np.sum(np.diff(im, axis=1) ** 2) + np.sum(np.diff(im, axis=2) ** 2) for im in xn])
    l2 = np.mean([np.sqrt(np.sum(im ** 2)) for im in xn])
    comp = 1 - np_js(logits, s_logits, 2.0)
    expected = 0.7 * ce + 3.0 * r_bn + 0.02 * tv + 0.3 * l2 + 0.4 * comp
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert parts["ce"] == pytest.approx(ce, rel=1e-5) and parts["competition"] == pytest.approx(comp, rel=1e-5)
    # without a student (plain DeepInversion) the competition term is absent
    with BatchNormStatistics(t, first_weight=5.0) as bn:
        plain, parts = deepinversion_objective(t, x, y, bn, w)
    assert plain.item() == pytest.approx(expected - 0.4 * comp, rel=1e-5) and "competition" not in parts


def test_deepinversion_synthesizers_reduce_objective_and_leave_teacher_alone():
    t = tiny_teacher()
    before = state(t)
    s = deepinversion(t, ipc=3, num_classes=3, image_shape=(1, 6, 6), iterations=25, lr=0.1, bn=2.0, tv=1e-3,
                      batch_size=5, seed=4, progress=False)
    assert isinstance(s, SyntheticSet) and s.images.shape == (9, 1, 6, 6)
    assert s.labels.tolist() == [0, 1, 2] * 3
    assert s.manifest["method"] == "deepinversion" and s.manifest["settings"]["bn"] == 2.0
    assert s.manifest["objective_final"] < 0.8 * s.manifest["objective_initial"]
    assert_same_state(t, before)
    assert not t.training
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    s_before = state(student)
    a = adaptive_deepinversion(t, ipc=2, num_classes=3, image_shape=(1, 6, 6), iterations=25, lr=0.1,
                               student=student, competition=0.5, T=3.0, seed=1, progress=False)
    assert a.manifest["method"] == "adaptive_deepinversion" and a.manifest["settings"]["competition"] == 0.5
    assert a.manifest["objective_final"] < a.manifest["objective_initial"]
    assert_same_state(t, before)
    assert_same_state(student, s_before)
    with pytest.raises(TypeError, match="student"):
        adaptive_deepinversion(t, ipc=1, num_classes=3, image_shape=(1, 6, 6), iterations=1, progress=False)
    with pytest.raises(ValueError, match="BatchNorm"):
        deepinversion(mlp(), ipc=1, num_classes=3, image_shape=(1, 2, 3), iterations=1, progress=False)
    assert synthesizer_info("deepinversion").paper.arxiv == "1912.08795"
    assert synthesizer_info("adaptive_deepinversion").family == "data-free"


# ---------------------------------------------------------------- Lopes et al.: metadata

def mlp_data(n_per_class: int = 12):
    g = torch.Generator().manual_seed(7)
    y = torch.arange(3).repeat(n_per_class)
    x = torch.randn(y.numel(), 6, generator=g) + y[:, None].float()
    return x, y


def np_forward(model: nn.Sequential, x: np.ndarray) -> list[np.ndarray]:
    """Outputs of the three Linear layers, in NumPy from the weights."""
    ws = [(m.weight.detach().numpy().astype(np.float64), m.bias.detach().numpy().astype(np.float64))
          for m in model if isinstance(m, nn.Linear)]
    a1 = x @ ws[0][0].T + ws[0][1]
    a2 = np.maximum(a1, 0) @ ws[1][0].T + ws[1][1]
    a3 = np.maximum(a2, 0) @ ws[2][0].T + ws[2][1]
    return [a1, a2, a3]


def np_laplacian(model: nn.Sequential) -> np.ndarray:
    ws = [m.weight.detach().numpy().astype(np.float64) for m in model if isinstance(m, nn.Linear)]
    sizes = [6, 5, 4, 3]
    n = sum(sizes)
    a = np.zeros((n, n))
    offset = 0
    for w, n_in in zip(ws, sizes):
        for j in range(w.shape[0]):  # output unit j of this layer
            for i in range(n_in):  # input unit i
                a[offset + i, offset + n_in + j] = a[offset + n_in + j, offset + i] = abs(w[j, i])
        offset += n_in
    return np.diag(a.sum(1)) - a


def test_record_metadata_against_numpy(tmp_path):
    model = mlp()
    x, y = mlp_data()
    meta = record_metadata(model, (x, y), num_classes=3, spectral_fraction=0.4, eps=1e-3, batch_size=7,
                           path=tmp_path / "meta.safetensors")
    assert list(meta.layers) == ["output", "1", "3"]  # the last Linear is the logits: recorded once
    acts = np_forward(model, x.numpy().astype(np.float64))
    for name, a in (("output", acts[2]), ("1", acts[0]), ("3", acts[1])):
        st_ = meta.layers[name]
        for c in range(3):
            ac = a[y.numpy() == c]
            assert np.allclose(st_.mean[c].numpy(), ac.mean(0), atol=1e-5)
            cov = np.cov(ac.T, bias=True)
            assert np.allclose(st_.std[c].numpy(), np.sqrt(np.diag(cov)), atol=1e-5)
            chol = st_.scale[c].numpy().astype(np.float64)
            assert np.allclose(np.tril(chol), chol)
            assert np.allclose(chol @ chol.T, cov + 1e-3 * np.eye(len(cov)), atol=1e-5)
    # spectral: the Laplacian of the |W| graph, its lowest ceil(0.4 * 18) = 8 eigenpairs
    lap = np_laplacian(model)
    vals = np.linalg.eigvalsh(lap)
    sp = meta.spectral
    assert sp.layers == ["1", "3", "5"] and sp.basis.shape == (18, 8)
    assert np.allclose(sp.eigenvalues.numpy(), vals[:8], atol=1e-4)
    u = sp.basis.numpy().astype(np.float64)
    assert np.allclose(lap @ u, u * sp.eigenvalues.numpy()[None, :], atol=1e-4)
    assert np.allclose(u.T @ u, np.eye(8), atol=1e-5)
    signal = np.concatenate([x.numpy(), *acts], axis=1)
    coef = signal @ u
    for c in range(3):
        assert np.allclose(sp.mean[c].numpy(), coef[y.numpy() == c].mean(0), atol=1e-4)
        assert np.allclose(sp.std[c].numpy(), coef[y.numpy() == c].std(0), atol=1e-4)
    # the safetensors file round-trips
    back = load_metadata(tmp_path / "meta.safetensors")
    assert back.num_classes == 3 and list(back.layers) == list(meta.layers)
    for n in meta.layers:
        assert torch.equal(back.layers[n].scale, meta.layers[n].scale)
    assert torch.equal(back.spectral.basis, sp.basis) and back.teacher == meta.teacher
    with pytest.raises(FileExistsError):
        meta.save(tmp_path / "meta.safetensors")
    with pytest.raises(ValueError, match="no training sample"):
        record_metadata(model, (x[y < 2], y[y < 2]), num_classes=3)


def test_laplacian_basis_by_hand():
    # one 1x1 layer of weight -2: two nodes joined by |w| = 2 -> L = [[2, -2], [-2, 2]], eigenvalues 0 and 4
    vals, vecs = laplacian_basis([torch.tensor([[-2.0]])], 2)
    assert vals.tolist() == pytest.approx([0.0, 4.0], abs=1e-6)
    assert abs(vecs[0, 1].item()) == pytest.approx(2 ** -0.5, rel=1e-6)
    assert vecs[0, 1].item() == pytest.approx(-vecs[1, 1].item(), rel=1e-6)


def test_sample_layer_is_the_class_gaussian():
    scale = torch.tensor([[[1.0, 0.0], [0.5, 2.0]], [[3.0, 0.0], [0.0, 0.1]]])
    stats = LayerStats(torch.tensor([[1.0, -1.0], [0.0, 5.0]]), torch.ones(2, 2), scale)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    cls = torch.tensor([0, 1, 0])
    h = sample_layer(stats, cls, g1)
    z = torch.randn(3, 2, generator=g2)
    hand = torch.stack([torch.tensor([1 + z[0, 0], -1 + 0.5 * z[0, 0] + 2 * z[0, 1]]),
                        torch.tensor([3 * z[1, 0], 5 + 0.1 * z[1, 1]]),
                        torch.tensor([1 + z[2, 0], -1 + 0.5 * z[2, 0] + 2 * z[2, 1]])])
    assert torch.allclose(h, hand, atol=1e-6)


@pytest.mark.parametrize("objective", ["top_layer", "all_layers", "spectral"])
def test_lopes_synthesizer_first_step_matches_numpy_and_decreases(tmp_path, objective):
    model = mlp()
    x, y = mlp_data()
    path = tmp_path / "meta.safetensors"
    record_metadata(model, (x, y), num_classes=3, path=path)
    meta = load_metadata(path)
    before = state(model)
    s = lopes_metadata(model, ipc=2, num_classes=3, image_shape=(1, 2, 3), metadata=path, objective=objective,
                       steps=40, lr=0.05, batch_size=2, init_std=0.5, seed=5, progress=False)
    assert s.images.shape == (6, 1, 2, 3) and s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.manifest["method"] == "lopes_metadata" and s.manifest["settings"]["objective"] == objective
    assert s.manifest["objective_final"] < s.manifest["objective_initial"]
    assert_same_state(model, before)
    # the first step's objective, replayed: same draws, loss in NumPy
    g = torch.Generator().manual_seed(5)
    losses = []
    for c in range(3):
        cls = torch.full((2,), c)
        if objective == "top_layer":
            targets = [sample_layer(meta.layers["output"], cls, g)]
        elif objective == "all_layers":
            targets = [sample_layer(meta.layers[n], cls, g) for n in ["output", "1", "3"]]
        else:
            targets = [sample_layer(LayerStats(meta.spectral.mean, meta.spectral.std), cls, g)]
        x0 = (torch.randn((2, 1, 2, 3), generator=g) * 0.5).reshape(2, 6).numpy().astype(np.float64)
        a1, a2, a3 = np_forward(model, x0)
        tn = [t.numpy().astype(np.float64) for t in targets]
        if objective == "top_layer":
            losses.append(np.mean((a3 - tn[0]) ** 2))
        elif objective == "all_layers":
            losses.append(sum(np.mean((a - h) ** 2) for a, h in zip([a3, a1, a2], tn)))
        else:
            sig = np.concatenate([x0, a1, a2, a3], axis=1)
            losses.append(np.mean((sig @ meta.spectral.basis.numpy() - tn[0]) ** 2))
    assert s.manifest["objective_initial"] == pytest.approx(float(np.mean(losses)), rel=1e-4)


def test_lopes_refuses_bad_input(tmp_path):
    model = mlp()
    x, y = mlp_data()
    meta = record_metadata(model, (x, y), num_classes=3, spectral=False)
    with pytest.raises(ValueError, match="metadata="):
        lopes_metadata(model, ipc=1, num_classes=3, image_shape=(1, 2, 3), progress=False)
    with pytest.raises(ValueError, match="spectral"):
        lopes_metadata(model, ipc=1, num_classes=3, image_shape=(1, 2, 3), metadata=meta, objective="spectral")
    with pytest.raises(ValueError, match="another teacher"):
        lopes_metadata(mlp(seed=1), ipc=1, num_classes=3, image_shape=(1, 2, 3), metadata=meta, progress=False)
    assert synthesizer_info("lopes_metadata").paper.arxiv == "1710.07535"


# ---------------------------------------------------------------- Fast DFKD terms

def test_adversarial_kl_by_hand():
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # sample 1 disagrees in argmax: masked out
    kl = []
    for a, b in zip(t.numpy(), s.numpy()):
        p = np.exp(a) / np.exp(a).sum()
        q = np.exp(b) / np.exp(b).sum()
        kl.append(np.sum(p * np.log(p / q)))
    expected = -(kl[0] + kl[2]) / 3
    assert adversarial_kl(t, s).item() == pytest.approx(expected, rel=1e-6)


def test_momentum_bn_statistics_against_numpy():
    t = tiny_teacher()
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(5, 1, 6, 6, generator=g), torch.randn(5, 1, 6, 6, generator=g)
    m = 0.7
    hooks = MomentumBNStatistics(t, momentum=m)
    with torch.no_grad():
        t(x1)
        first = hooks.loss().item()
        hooks.update()
        t(x2)
        second = hooks.loss().item()
        h1a, h1b = t.conv1(x1).numpy(), t.conv1(x2).numpy()
        h2a = t.conv2(torch.relu(t.bn1(t.conv1(x1)))).numpy()
        h2b = t.conv2(torch.relu(t.bn1(t.conv1(x2)))).numpy()
    hooks.remove()
    bns = [t.bn1, t.bn2]
    assert first == pytest.approx(sum(np_bn_term(h, b.running_mean.numpy(), b.running_var.numpy())
                                      for h, b in zip([h1a, h2a], bns)), rel=1e-5)
    expected = 0.0
    for ha, hb, b in zip([h1a, h2a], [h1b, h2b], bns):
        mu_a, mu_b = ha.mean((0, 2, 3)), hb.mean((0, 2, 3))
        var_a, var_b = ha.var((0, 2, 3)), hb.var((0, 2, 3))
        mu, var = (1 - m) * mu_b + m * mu_a, (1 - m) * var_b + m * var_a
        expected += np.linalg.norm(mu - b.running_mean.numpy()) + np.linalg.norm(var - b.running_var.numpy())
    assert second == pytest.approx(expected, rel=1e-5)


def test_fast_meta_loss_and_reptile_update():
    t = tiny_teacher()
    before = state(t)
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 36), nn.Unflatten(1, (1, 6, 6)))
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).eval()
    syn = FastMetaSynthesizer(t, gen, num_classes=3, latent_dim=4, batch_size=6, g_steps=3, lr_g=0.01, lr_z=0.02,
                              bn=2.0, oh=0.3, adv=0.8, bn_momentum=0.5, meta="reptile", meta_lr=1e-3, jitter=0)
    x = torch.randn(6, 1, 6, 6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        loss = syn.loss(x, y, student).item()
        logits, s_logits = t(x).numpy(), student(x).numpy()
        h1 = t.conv1(x).numpy()
        h2 = t.conv2(torch.relu(t.bn1(t.conv1(x)))).numpy()
    ce = -np.mean(np_log_softmax(logits)[np.arange(6), y.numpy()])
    r_bn = np_bn_term(h1, t.bn1.running_mean.numpy(), t.bn1.running_var.numpy()) + \
        np_bn_term(h2, t.bn2.running_mean.numpy(), t.bn2.running_var.numpy())
    adv = adversarial_kl(torch.tensor(logits), torch.tensor(s_logits)).item()
    assert loss == pytest.approx(2.0 * r_bn + 0.3 * ce + 0.8 * adv, rel=1e-5)
    # Reptile: the meta gradient is theta - theta', so Adam's first step moves theta towards theta'
    theta = [p.detach().clone() for p in gen.parameters()]
    step = syn.synthesize(student)
    assert step.images.shape == (6, 1, 6, 6) and step.loss_best <= step.loss_first
    fast = [p.detach() for p in syn.last_fast.parameters()]
    for p0, p1, pf in zip(theta, gen.parameters(), fast):
        diff = p0 - pf
        big = diff.abs() > 1e-5
        moved = p1.detach() - p0
        assert torch.allclose(moved[big], -1e-3 * torch.sign(diff[big]), atol=1e-6)
    syn.close()
    # first-order MAML: the meta gradient is the sum of the inner gradients; one task, one inner step:
    # that is dL/dtheta at theta itself, so Adam's first step is -meta_lr * sign(dL/dtheta)
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 36), nn.Unflatten(1, (1, 6, 6)))
    fo = FastMetaSynthesizer(t, gen, num_classes=3, latent_dim=4, batch_size=6, g_steps=1, bn=2.0, oh=0.3, adv=0.0,
                             meta="fomaml", meta_lr=1e-3, jitter=0, seed=3)
    theta = [p.detach().clone() for p in gen.parameters()]
    rng = torch.Generator().manual_seed(3)  # replay the task's draws: z, then the targets
    z = torch.randn(6, 4, generator=rng)
    y = torch.randint(0, 3, (6,), generator=rng).sort().values
    probe = copy.deepcopy(gen)
    probe_loss = fo.loss(probe(z), y, None)
    grads = torch.autograd.grad(probe_loss, list(probe.parameters()))
    fo.synthesize(None)
    for p0, p1, g_ in zip(theta, gen.parameters(), grads):
        big = g_.abs() > 1e-5
        assert torch.allclose((p1.detach() - p0)[big], -1e-3 * torch.sign(g_[big]), atol=1e-6)
    fo.close()
    assert_same_state(t, before)


# ---------------------------------------------------------------- strategies

class NeverRead:
    """A train_loader whose use fails the test."""

    def __iter__(self):
        raise AssertionError("a data-free strategy iterated train_loader")

    def __len__(self):
        raise AssertionError("a data-free strategy asked len(train_loader)")


@pytest.mark.parametrize("name,kwargs", [
    ("deepinversion_kd", {"epochs": 2, "ipc": 3, "batch_size": 4, "synth": {"iterations": 4, "lr": 0.1}, "lr": 0.01}),
    ("adi_kd", {"rounds": 2, "ipc_per_round": 2, "epochs_per_round": 1, "batch_size": 4,
                "synth": {"iterations": 3, "competition": 0.5}, "lr": 0.01}),
    ("fast_dfkd", {"epochs": 3, "warmup": 1, "kd_steps": 2, "batch_size": 4, "synthesis_batch_size": 6,
                   "latent_dim": 8, "lr": 0.01,
                   "generator": nn.Sequential(nn.Linear(8, 36), nn.Unflatten(1, (1, 6, 6)))}),
])
def test_strategies_never_read_train_loader_and_keep_teacher(name, kwargs, tmp_path):
    t = tiny_teacher()
    before = state(t)
    g = torch.Generator().manual_seed(0)
    val = InMemoryLoader(torch.randn(12, 1, 6, 6, generator=g), torch.arange(3).repeat(4), 6, shuffle=False)
    torch.manual_seed(1)
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    s0 = state(student)
    info = strategy_info(name)
    assert info.family == "data-free"
    res = info.fn(student, NeverRead(), val, teacher=t, num_classes=3, image_shape=(1, 6, 6), seed=0,
                  progress=False, run_dir=tmp_path / name, **kwargs)
    assert_same_state(t, before)
    assert res.last_acc is not None and res.history and res.synthetic is not None
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s0.items()), "the student did not train"
    assert res.synthesis_time_s > 0


def test_strategy_papers():
    assert strategy_info("fast_dfkd").paper.arxiv == "2112.06253"
    assert strategy_info("deepinversion_kd").paper.arxiv == "1912.08795"
    assert strategy_info("adi_kd").paper.arxiv == "1912.08795"


def test_fast_dfkd_refuses_bad_schedule():
    with pytest.raises(ValueError, match="warmup"):
        strategy_info("fast_dfkd").fn(nn.Linear(2, 2), NeverRead(), None, teacher=tiny_teacher(), num_classes=3,
                                      image_shape=(1, 6, 6), epochs=2, warmup=2, progress=False)
