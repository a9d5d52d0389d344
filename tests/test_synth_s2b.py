"""Issue 13, part S2b: LeNet-5 pair, DFAD, RDSKD, FedFTG (Dirichlet clients, FedAvg, server fine-tuning).

Every number below is worked out by hand in the comments, not by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill.data.loader import InMemoryLoader
from distill.models import create
from distill.strategies.data_free_dfad import (
    _kd_kl,
    _log_form,
    dfad_discrepancy,
    dfad_generator_objective,
    rdskd,
    rdskd_generator_loss,
)
from distill.strategies.data_free_fedftg import fedftg
from distill.strategies.registry import list_strategies, strategy_info
from distill.synthesis.federated import (
    ConditionalGenerator,
    class_client_weights,
    class_counts,
    dirichlet_split,
    ensemble_soft_targets,
    fedavg,
    fedftg_diversity,
    fedftg_finetune,
    fedftg_generator_loss,
    sample_labels,
)
from distill.distiller import Distiller
from distill.train import evaluate

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class RaisingLoader:
    """A train loader that must never be read."""

    def __iter__(self):
        raise AssertionError("the data-free strategy iterated train_loader")

    def __len__(self):
        raise AssertionError("the data-free strategy asked train_loader's length")


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ----------------------------------------------------------------------------- LeNet-5


def test_lenet_widths_match_dafl():
    # parameters by hand: LeNet-5 conv1 1*6*25+6=156, conv2 6*16*25+16=2416, conv3 16*120*25+120=48120,
    # fc1 120*84+84=10164, fc2 84*10+10=850 -> 61706; half: 78 + 608 + 12060 + 2562 + 430 = 15738
    for name, n in (("lenet5", 61706), ("lenet5_half", 15738)):
        for size in (28, 32):
            m = create(name, image_size=size)
            assert sum(p.numel() for p in m.parameters()) == n
            assert m(torch.zeros(2, 1, size, size)).shape == (2, 10)
    bn = create("lenet5", batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 3
    with pytest.raises(ValueError, match="image_size"):
        create("lenet5", image_size=30)
    with pytest.raises(ValueError, match=r"\(B, C, 32, 32\)"):
        create("lenet5")(torch.zeros(1, 1, 28, 28))


# ----------------------------------------------------------------------------- DFAD


def test_dfad_discrepancy_by_hand():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    t = torch.tensor([[0.0, 4.0], [1.0, -1.0]])
    # |s - t| = [[1, 2], [1, 0]]: sum 4 over B*K = 4 entries -> 1.0
    assert dfad_discrepancy(s, t).item() == pytest.approx(1.0)
    assert dfad_generator_objective(s, t).item() == pytest.approx(-1.0)
    assert dfad_generator_objective(s, t, "log").item() == pytest.approx(-math.log(2.0))
    # the loop minimises -D + generator_loss: with the log form's extra term that is -log(1 + D) = -log 2
    assert (-1.0 + _log_form(student_logits=s, teacher_logits=t).item()) == pytest.approx(-math.log(2.0))
    # only entry (0, 1) differs, by 3: 3 / 4 entries
    assert dfad_discrepancy(torch.tensor([[0.0, 3.0], [1.0, 1.0]]),
                            torch.tensor([[0.0, 0.0], [1.0, 1.0]])).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="one shape"):
        dfad_discrepancy(s, t[:1])


# ----------------------------------------------------------------------------- RDSKD


def test_rdskd_generator_loss_by_hand():
    # K = 2, halves of one sample each: t1 = [0, 0] -> p1 = [1/2, 1/2]; t2 = [ln 3, 0] -> p2 = [3/4, 1/4]
    t1 = torch.tensor([[0.0, 0.0]])
    t2 = torch.tensor([[math.log(3.0), 0.0]])
    x1 = torch.zeros(1, 1, 2, 2)
    x2 = torch.ones(1, 1, 2, 2)  # ||x2 - x1||_F = sqrt(4) = 2
    loss, parts = rdskd_generator_loss(t1, t2, x1, x2, previous=(0.1, -0.2))
    oh = (math.log(2.0) + math.log(4.0 / 3.0)) / 2  # CE against each argmax (class 0 for both)
    ie = 0.625 * math.log(0.625) + 0.375 * math.log(0.375)  # pbar = [(1/2+3/4)/2, (1/2+1/4)/2]
    ds = (0.25 * math.sqrt(2.0)) / 2.0  # ||p2 - p1||_F = sqrt(2 * 0.25^2), over ||x2 - x1||_F = 2
    assert parts["oh"] == pytest.approx(oh)
    assert parts["ie"] == pytest.approx(ie)
    assert parts["ds"] == pytest.approx(ds)
    assert loss.item() == pytest.approx(math.exp(oh - 0.1) + math.exp(ie + 0.2) + ds, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 4.0))
def test_rdskd_invariants(seed, scale):
    g = torch.Generator().manual_seed(seed)
    t1, t2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    x1, x2 = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    loss, parts = rdskd_generator_loss(t1, t2, x1, x2)
    swapped, _ = rdskd_generator_loss(t2, t1, x2, x1)  # the halves' order does not matter
    assert swapped.item() == pytest.approx(loss.item(), rel=1e-5)
    _, scaled = rdskd_generator_loss(t1, t2, x1 * scale, x2 * scale)  # images `scale` times apart: ds / scale
    assert scaled["ds"] == pytest.approx(parts["ds"] / scale, rel=1e-5)
    assert parts["ie"] >= -math.log(4) - 1e-6  # minus an entropy over 4 classes


# ----------------------------------------------------------------------------- federated pieces


def test_dirichlet_split_properties():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (5000,), generator=g)
    splits = dirichlet_split(labels, 10, 0.05, seed=3)
    every = torch.cat(splits).sort().values
    assert torch.equal(every, torch.arange(5000))  # every sample exactly once
    assert [len(s) for s in splits] == [500] * 10
    counts = class_counts(labels, splits, 10)
    assert counts.sum().item() == 5000
    # an independent count of the same thing, by a plain loop
    for k, ix in enumerate(splits):
        for c in range(10):
            assert counts[k, c].item() == sum(1 for i in ix.tolist() if labels[i].item() == c)

    def top_share(b: float) -> float:
        cnt = class_counts(labels, dirichlet_split(labels, 10, b, seed=3), 10)
        return float((cnt.max(1).values / cnt.sum(1)).mean())

    # beta small: clients dominated by few classes (equal client sizes and class pools cap the share:
    # clients preferring one class share its 500 samples); beta large: close to the uniform 0.1
    small, mid, large = top_share(0.05), top_share(1.0), top_share(1000.0)
    assert small > 0.4 and small > mid > large and large < 0.2
    assert all(torch.equal(a, b) for a, b in zip(splits, dirichlet_split(labels, 10, 0.05, seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(splits, dirichlet_split(labels, 10, 0.05, seed=4)))
    with pytest.raises(ValueError, match="beta"):
        dirichlet_split(labels, 10, 0.0)


def test_fedavg_weighted_by_client_sizes():
    m1, m2 = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        m1.weight.copy_(torch.tensor([[1.0, 2.0]])); m1.bias.fill_(3.0)
        m2.weight.copy_(torch.tensor([[5.0, -2.0]])); m2.bias.fill_(-1.0)
    avg = fedavg([m1, m2], [1, 3])
    # (1 * [1, 2] + 3 * [5, -2]) / 4 = [4, -1];  (1 * 3 + 3 * -1) / 4 = 0
    assert torch.allclose(avg["weight"], torch.tensor([[4.0, -1.0]]))
    assert torch.allclose(avg["bias"], torch.tensor([0.0]))
    with pytest.raises(ValueError, match="one size per model"):
        fedavg([m1, m2], [1])


def test_fedftg_terms_by_hand():
    counts = torch.tensor([[2.0, 0.0], [6.0, 4.0]])  # 2 clients x 2 classes; class totals [8, 4]
    alpha = class_client_weights(counts)
    assert torch.allclose(alpha, torch.tensor([[2 / 8, 6 / 8], [0.0, 1.0]]))
    labels = sample_labels(torch.tensor([[30.0, 10.0]]), 8, torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 2  # 3:1 of 8
    # diversity: z = [0], [1]; x = [0, 0], [2, 0]: d_x = 1, d_z = 1 off the diagonal, 0 on it -> exp(-2/4)
    z = torch.tensor([[0.0], [1.0]])
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert fedftg_diversity(z, x).item() == pytest.approx(math.exp(-0.5))
    # ensemble: a = [.5, .5] of softmax([ln 3, 0]) = [.75, .25] and softmax([0, 0]) = [.5, .5]
    q = ensemble_soft_targets([torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)], torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(q, torch.tensor([[0.625, 0.375]]))
    # generator loss, two samples, one client, both labelled 0: s = [[1, 0], [0, 0]], t = [[0, 0], [ln 3, 0]],
    # a = [0.5, 1.0]; md = (0.5 * mean(1, 0) + 1.0 * mean(ln 3, 0)) / 2; fidelity = (0.5 * CE([0, 0], 0)
    # + 1.0 * CE([ln 3, 0], 0)) / 2 = (0.5 ln 2 + ln(4/3)) / 2; z all equal -> d_z = 0 -> L_div = exp(0) = 1
    t = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    loss, parts = fedftg_generator_loss(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), [t], torch.tensor([0, 0]),
                                        torch.tensor([[0.5], [1.0]]), torch.zeros(2, 3), torch.zeros(2, 1, 4, 4),
                                        cls=2.0, div=0.5)
    md = (0.5 * 0.5 + 1.0 * math.log(3.0) / 2) / 2
    fid = (0.5 * math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert parts["md"] == pytest.approx(md) and parts["cls"] == pytest.approx(fid)
    assert parts["div"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(-md + 2.0 * fid + 0.5 * 1.0)


def test_rdskd_student_kd_loss_by_hand():
    # T = 2: t / T = [ln 3, 0] -> q = [3/4, 1/4]; s = [0, 0] -> p = [1/2, 1/2];
    # T^2 KL(q || p) = 4 (3/4 ln(3/2) + 1/4 ln(1/2)), the same for both rows
    t = torch.tensor([[2 * math.log(3.0), 0.0]] * 2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert _kd_kl(torch.zeros(2, 2), t, 2.0).item() == pytest.approx(4 * kl)


# ----------------------------------------------------------------------------- strategies on tiny models


def _tiny_net(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * width, 4))


def _agreement(student: nn.Module, teacher: nn.Module, val: InMemoryLoader) -> float:
    return evaluate(Distiller(student, teacher, {"ce": 1.0}), val)["agreement"]


def test_rdskd_improves_agreement_without_training_data():
    teacher = _tiny_net(1, 16)
    g = torch.Generator().manual_seed(5)
    vx = torch.randn(256, 1, 8, 8, generator=g)
    val = InMemoryLoader(vx, teacher(vx).argmax(1).detach(), 128)
    student = _tiny_net(2)
    before_t, before_s = _state(teacher), _state(student)
    start = _agreement(student, teacher, val)
    res = rdskd(student, RaisingLoader(), val, teacher=teacher, image_shape=(1, 8, 8), generator_iterations=6,
                student_iterations=60, batch_size=32, latent_dim=8, lr_student=1e-2, eval_every=30,
                temperature=4.0, progress=False)
    assert [r["epoch"] for r in res.history] == [30, 60]
    assert res.history[-1]["agreement"] > start + 10
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())  # teacher unchanged
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())


def test_dfad_strategy_registered_and_never_reads_train_data():
    names = [i.name for i in list_strategies("data-free")]
    for name in ("dfad", "rdskd", "fedftg"):
        assert name in names
    assert strategy_info("dfad").paper.arxiv == "1912.11006"
    assert strategy_info("rdskd").paper.arxiv == "2011.03749"
    assert strategy_info("fedftg").paper.arxiv == "2203.09249"
    from distill.strategies.data_free_dfad import dfad

    teacher = _tiny_net(1, 16)
    g = torch.Generator().manual_seed(5)
    vx = torch.randn(256, 1, 8, 8, generator=g)
    val = InMemoryLoader(vx, teacher(vx).argmax(1).detach(), 128)
    student = _tiny_net(2)
    before_t = _state(teacher)
    start = _agreement(student, teacher, val)
    dfad(student, RaisingLoader(), val, teacher=teacher, image_shape=(1, 8, 8), iterations=25, batch_size=32,
         latent_dim=8, lr_student=0.05, eval_every=25, progress=False)
    assert _agreement(student, teacher, val) > start + 10
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes of 8x8 images: class c lights quadrant c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 8, 8, generator=g)
    for c in range(4):
        r, s = divmod(c, 2)
        x[y == c, :, 4 * r:4 * r + 4, 4 * s:4 * s + 4] += 1.5
    return x, y


def test_fedftg_server_finetune_uses_models_only():
    x, y = _blobs(400, 0)
    clients = []
    for seed, keep in ((3, (0, 1)), (4, (2, 3))):  # two one-sided clients
        m = _tiny_net(seed)
        mask = (y == keep[0]) | (y == keep[1])
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(60):
            loss = nn.functional.cross_entropy(m(x[mask]), y[mask])
            opt.zero_grad(); loss.backward(); opt.step()
        clients.append(m)
    counts = torch.tensor([[100.0, 100.0, 0.0, 0.0], [0.0, 0.0, 100.0, 100.0]])
    global_model = _tiny_net(9)
    torch.manual_seed(0)
    gen = ConditionalGenerator(create("dfad_generator", latent_dim=8 + 4, image_size=8, channels=1, width=16), 4)
    client_states = [_state(c) for c in clients]
    xt, yt = _blobs(300, 1)

    def acc() -> float:
        with torch.no_grad():
            return float((global_model(xt).argmax(1) == yt).float().mean())

    start = acc()
    # the signature takes models and counts: no client data can reach the server
    fedftg_finetune(global_model, clients, counts, gen, iterations=15, batch_size=32, latent_dim=8, lr_global=0.1,
                    seed=0)
    assert all(torch.equal(v, c.state_dict()[k]) for s, c in zip(client_states, clients) for k, v in s.items())
    assert acc() > start + 0.2


def test_fedftg_and_fedavg_run_without_iterating_the_loader():
    x, y = _blobs(600, 0)
    xt, yt = _blobs(200, 1)
    val = InMemoryLoader(xt, yt, 100)
    results = {}
    for ft in (False, True):
        results[ft] = fedftg(lambda: _tiny_net(7), RaisingLoader(), val, client_data=(x, y), num_clients=4,
                             beta=0.5, rounds=2, active_fraction=1.0, local_epochs=1, local_batch_size=32,
                             server_finetune=ft, finetune_iterations=2, latent_dim=8, seed=0, progress=False)
    for r in results.values():
        assert [h["epoch"] for h in r.history] == [1, 2]
        assert r.last_acc > 40.0  # 4 classes: chance is 25%
        assert r.client_counts.sum().item() == 600
    with pytest.raises(ValueError, match="teacher=None"):
        fedftg(_tiny_net(0), None, val, teacher=_tiny_net(1), client_data=(x, y))
