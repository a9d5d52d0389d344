"""Net2Net (Chen, Goodfellow, Shlens, ICLR 2016, arXiv 1511.05641): Net2WiderNet and Net2DeeperNet are
function-preserving on the zoo's models, the replicated weights are the paper's, and the strategy grows a
teacher into a student."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.data import get_dataset
from distill.models import create
from distill.models.net2net import deepen, replication_map, resize, widen
from distill.strategies.net2net import fit_net2net, grow, widths_to_match

torch.set_num_threads(1)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
    return model


CASES = [
    ("cnn_digits_student", {}, [("stem.0", 9), ("stage1.body.0", 13), ("stage2.body.1", 11), ("stage3.body.1", 20)],
     (1, 8, 8)),
    ("mlp", {"input_size": 8, "hidden": (7, 5)}, [("hidden1.linear", 12), ("hidden2.linear", 9)], (1, 8, 8)),
    ("lenet5_half", {"image_size": 28}, [("conv1.0", 5), ("conv2.0", 11), ("conv3.0", 70), ("fc1.0", 50)], (1, 28, 28)),
    ("lenet5_half", {"image_size": 28, "batch_norm": True}, [("conv1.0", 5), ("conv3.0", 64)], (1, 28, 28)),
]


@pytest.mark.parametrize("name, kw, ops, shape", CASES, ids=[f"{c[0]}{'_bn' if c[1].get('batch_norm') else ''}"
                                                           for c in CASES])
def test_widen_preserves_the_function(name, kw, ops, shape):
    torch.manual_seed(0)
    model = _randomise_bn(create(name, num_classes=10, **kw)).eval()
    x = torch.rand(6, *shape)
    before = model(x)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    for layer, width in ops:
        widen(model, layer, width, generator=g)
        assert model.get_submodule(layer).weight.shape[0] == width
    assert sum(p.numel() for p in model.parameters()) > n_params
    assert not model.training  # the new BatchNorms took the model's (evaluation) mode
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)
    # the noise option breaks the exact copy
    noisy = widen(model, ops[0][0], ops[0][1] + 3, noise=0.5, generator=g)
    assert (noisy(x) - before).abs().max() > 1e-4


def test_widen_by_hand_one_unit_to_three():
    # 2 -> 1 -> 2 MLP; widening the single hidden unit to 3 copies it (g = [0, 0, 0]) and divides its
    # outgoing weights by 3
    model = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, -1.0]]))
        model[0].bias.copy_(torch.tensor([0.5]))
        model[2].weight.copy_(torch.tensor([[3.0], [6.0]]))
        model[2].bias.copy_(torch.tensor([1.0, -1.0]))
    widen(model, "0", 3)
    assert torch.equal(model[0].weight, torch.tensor([[2.0, -1.0]] * 3))
    assert torch.equal(model[0].bias, torch.tensor([0.5] * 3))
    assert torch.allclose(model[2].weight, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]))
    assert torch.equal(model[2].bias, torch.tensor([1.0, -1.0]))
    # x = (1, 1): hidden relu(2 - 1 + 0.5) = 1.5; outputs 3 * 1.5 + 1 = 5.5, 6 * 1.5 - 1 = 8
    assert torch.allclose(model(torch.ones(1, 2)), torch.tensor([[5.5, 8.0]]))


def test_widen_weights_follow_the_mapping_written_as_a_loop():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5)).eval()
    _randomise_bn(model)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    g = replication_map(3, 7, torch.Generator().manual_seed(5))
    widen(model, "0", 7, generator=torch.Generator().manual_seed(5))
    assert g[:3].tolist() == [0, 1, 2] and all(0 <= int(j) < 3 for j in g[3:])
    counts = [sum(1 for j in g.tolist() if j == i) for i in range(3)]
    new = model.state_dict()
    for j, src in enumerate(g.tolist()):
        assert torch.equal(new["0.weight"][j], old["0.weight"][src])
        assert torch.equal(new["0.bias"][j], old["0.bias"][src])
        for key in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):
            assert new[key][j] == old[key][src]
        for pos in range(16):  # the flattened map: channel j's 16 positions, channel-major
            for out in range(5):
                want = old["4.weight"][out, src * 16 + pos] / counts[src]
                assert torch.isclose(new["4.weight"][out, j * 16 + pos], want, atol=1e-7)
    x = torch.rand(3, 2, 4, 4)
    assert model(x).shape == (3, 5)


@pytest.mark.parametrize("name, kw, after, shape", [
    ("cnn_digits_student", {}, ["stem.2", "stage2.act"], (1, 8, 8)),
    ("mlp", {"input_size": 8, "hidden": (7,)}, ["hidden1.act"], (1, 8, 8)),
    ("lenet5_half", {"image_size": 28, "batch_norm": True}, ["conv2", "fc1"], (1, 28, 28)),
])
def test_deepen_preserves_the_function(name, kw, after, shape):
    torch.manual_seed(1)
    model = _randomise_bn(create(name, num_classes=10, **kw)).eval()
    x = torch.rand(32, *shape)
    before = model(x)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    for a in after:
        deepen(model, a, x)
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == n_layers + len(after)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_deepen_batchnorm_undoes_its_statistics():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(50, 3)
    h = torch.relu(model[0](x)).detach()
    deepen(model, "1", x, batch_norm=True)
    bn = model[1][2]
    mean, var = h.mean(0), h.var(0, unbiased=True)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    torch.testing.assert_close(bn.weight.detach(), torch.sqrt(var + bn.eps))
    torch.testing.assert_close(bn.bias.detach(), mean)
    assert torch.equal(model[1][1].weight, torch.eye(4))


def test_deepen_and_widen_refuse_what_they_cannot_preserve():
    model = create("cnn_digits_student", num_classes=10).eval()
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="ReLU before it"):
        deepen(model, "stage1.pre", x)  # pre-ReLU: negative values
    with pytest.raises(ValueError, match="classifier"):
        widen(model, "fc", 20)
    with pytest.raises(ValueError, match="grows a layer"):
        widen(model, "stem.0", 2)
    with pytest.raises(ValueError, match="not a submodule"):
        widen(model, "nope", 9)
    with pytest.raises(ValueError, match="odd positive"):
        deepen(model, "stem.2", x, kernel_size=2)


def test_resize_builds_a_narrower_twin():
    model = create("mlp", num_classes=10, input_size=8, hidden=(16, 8))
    resize(model, "hidden1.linear", 5)
    assert model.hidden1.linear.out_features == 5 and model.hidden2.linear.in_features == 5
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_widths_to_match_and_grow():
    small = create("cnn", num_classes=10, widths=(8, 8, 16), stem_width=4)
    big = create("cnn", num_classes=10, widths=(12, 16, 16), stem_width=4)
    assert widths_to_match(small, big) == {"stage1.body.0": 12, "stage2.body.1": 16}
    with pytest.raises(ValueError, match="cannot shrink"):
        widths_to_match(big, small)
    with pytest.raises(ValueError, match="not weight layers"):
        grow(small, {"stage9": 3}, example=None)


def test_net2net_strategy_grows_and_trains():
    tr = get_dataset("digits", split="train")
    loader = tr.loader(32, shuffle=True, seed=0)
    short = type(loader)(tr.inputs[:64], tr.targets[:64], 32, shuffle=True, seed=0)
    teacher = create("cnn", num_classes=10, widths=(4, 4, 8), stem_width=4)
    student = lambda: create("cnn", num_classes=10, widths=(8, 8, 12), stem_width=4)  # noqa: E731
    res = fit_net2net(student, short, None, teacher=teacher, epochs=1, deepen=["stage2.act"], progress=False, lr=0.01)
    assert res.function_gap is not None and res.function_gap < 1e-5
    assert res.widths == {"stage1.body.0": 8, "stage2.body.1": 8, "stage3.body.1": 12}
    assert res.student.stage3.body[1].out_channels == 12
    assert len(res.history) == 1
    base = fit_net2net(student, short, None, teacher=teacher, epochs=1, init="random", progress=False, lr=0.01)
    assert base.function_gap is None
    with pytest.raises(ValueError, match="init must be"):
        fit_net2net(student, short, None, teacher=teacher, epochs=1, init="zeros", progress=False)


def test_net2net_student_minimises_the_label_cross_entropy(monkeypatch):
    """One batch: the grown student's objective is the plain CE on the labels (the paper adds no KD term)."""
    import torch.nn.functional as F

    import distill.strategies.net2net as mod
    from distill.batch import Batch
    from distill.data import InMemoryLoader

    seen = []
    real = mod.fit
    monkeypatch.setattr(mod, "fit", lambda d, *a, **k: (seen.append(d), real(d, *a, **k))[1])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(10, (8,), generator=g)
    teacher = create("cnn", num_classes=10, widths=(4, 4, 8), stem_width=4)
    fit_net2net(lambda: create("cnn", num_classes=10, widths=(6, 4, 8), stem_width=4), InMemoryLoader(x, y, 8), None,
                teacher=teacher, epochs=1, progress=False, lr=0.01)
    d = seen[-1]
    assert set(d.methods) == {"ce"} and d.methods["ce"].weight == 1.0 and d.teacher is None
    d.train()
    got = d(Batch(x, y)).total
    want = F.cross_entropy(d.student(x), y)
    torch.testing.assert_close(got, want)


def test_widen_with_a_named_consumer_when_registration_order_is_not_the_data_flow():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 2)  # registered first, runs last
            self.body = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    model = Odd()
    x = torch.randn(5, 4)
    before = model(x)
    with pytest.raises(ValueError, match="followed by no"):
        widen(model, "body", 6)
    widen(model, "body", 6, consumer="head", generator=torch.Generator().manual_seed(0))
    assert model.head.in_features == 6
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)
