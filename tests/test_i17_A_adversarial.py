"""Issue 17 (A): adversarial KD — conditional adversarial KD (Xu et al. 2017), KDGAN (Wang et al. 2018) and
adversarial imitation for event detection (Liu et al. 2019). Formulas against numbers worked out with plain
Python loops; the strategies on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill.functional as DF
from distill.data.adversarial_tagging import TaggingLoader, TaggingSet, build_tagging_sets, tag_words
from distill.models.adversarial_tagger import TokenTagger
from distill.strategies.adversarial_imitation import adversarial_imitation, token_f1
from distill.strategies.adversarial_kdgan import tau_at
from distill.strategies.registry import strategy_info

torch.set_num_threads(1)


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _ce(row: list[float], y: int) -> float:
    m = max(row)
    return -(row[y] - m - math.log(sum(math.exp(v - m) for v in row)))


REAL = [0.5, -1.0, 2.0]
FAKE = [1.5, 0.25, -0.5]
RCLS = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [0.0, 3.0, 1.0]]
FCLS = [[0.2, 0.1, 0.0], [2.0, -1.0, 0.0], [1.0, 1.0, 1.0]]
Y = [0, 2, 1]


def test_cakd_discriminator_loss_on_hand_numbers() -> None:
    aux = 0.7
    want = -sum(math.log(_sig(d)) for d in REAL) / 3 - sum(math.log(1 - _sig(d)) for d in FAKE) / 3
    want += aux * (sum(_ce(r, y) for r, y in zip(RCLS, Y)) / 3 + sum(_ce(r, y) for r, y in zip(FCLS, Y)) / 3)
    got = DF.cakd_discriminator_loss(torch.tensor(REAL), torch.tensor(FAKE)[:, None], torch.tensor(RCLS),
                                     torch.tensor(FCLS), torch.tensor(Y), aux_weight=aux)
    assert float(got) == pytest.approx(want, rel=1e-6)
    no_aux = DF.cakd_discriminator_loss(torch.tensor(REAL), torch.tensor(FAKE))
    assert float(no_aux) == pytest.approx(-sum(math.log(_sig(d)) for d in REAL) / 3
                                          - sum(math.log(1 - _sig(d)) for d in FAKE) / 3, rel=1e-6)


def test_cakd_student_loss_on_hand_numbers() -> None:
    s = [[1.0, -2.0, 0.5], [0.0, 0.0, 1.0], [3.0, 1.0, -1.0]]
    t = [[2.0, -1.0, 0.5], [1.0, -1.0, 0.0], [3.0, 0.0, 1.0]]
    adv, l1, aux = 0.3, 2.5, 0.4
    l1_mean = sum(abs(a - b) for ra, rb in zip(s, t) for a, b in zip(ra, rb)) / 3  # ||.||_1 per row, mean of 3
    want = adv * (-sum(math.log(_sig(d)) for d in FAKE) / 3) + l1 * l1_mean \
        + aux * sum(_ce(r, y) for r, y in zip(FCLS, Y)) / 3
    got = DF.cakd_student_loss(torch.tensor(FAKE), torch.tensor(s), torch.tensor(t), torch.tensor(FCLS),
                               torch.tensor(Y), adv_weight=adv, l1_weight=l1, aux_weight=aux)
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_concrete_sample_on_hand_numbers() -> None:
    logits = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]]
    u = [[0.2, 0.9, 0.5], [0.99, 0.1, 0.6]]
    tau = 0.5
    q, labels = DF.concrete_sample(torch.tensor(logits), tau, torch.tensor(u))
    for i in range(2):
        lse = math.log(sum(math.exp(v) for v in logits[i]))
        z = [(logits[i][k] - lse - math.log(-math.log(u[i][k]))) / tau for k in range(3)]
        m = max(z)
        want = [math.exp(v - m) / sum(math.exp(w - m) for w in z) for v in z]
        assert q[i].tolist() == pytest.approx(want, rel=1e-5)
        assert int(labels[i]) == int(np.argmax(z))


def test_gumbel_max_draws_follow_the_distribution() -> None:
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(p).expand(20000, 3).contiguous() + 5.0  # a constant shift changes nothing
    _, labels = DF.concrete_sample(logits, 0.3)
    freq = torch.bincount(labels, minlength=3).float() / 20000
    assert freq.tolist() == pytest.approx(p.tolist(), abs=0.015)


def test_kdgan_discriminator_loss_on_hand_numbers() -> None:
    alpha = 0.3
    tch = [0.0, -2.0, 1.0]
    want = (-sum(math.log(_sig(d)) for d in REAL) - alpha * sum(math.log(1 - _sig(d)) for d in FAKE)
            - (1 - alpha) * sum(math.log(1 - _sig(d)) for d in tch)) / 3
    got = DF.kdgan_discriminator_loss(torch.tensor(REAL), torch.tensor(FAKE), torch.tensor(tch), alpha)
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_kdgan_policy_loss_value_and_gradient() -> None:
    q = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], requires_grad=True)
    labels = torch.tensor([0, 1])
    d = torch.tensor([0.5, -1.0], requires_grad=True)
    rewards = [math.log(1 - _sig(0.5)), math.log(1 - _sig(-1.0))]
    loss = DF.kdgan_policy_loss(q, labels, d)
    want = (math.log(0.7) * rewards[0] + math.log(0.3) * rewards[1]) / 2
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    grad = torch.zeros(2, 3)
    grad[0, 0], grad[1, 1] = rewards[0] / 0.7 / 2, rewards[1] / 0.3 / 2
    torch.testing.assert_close(q.grad, grad)
    assert d.grad is None  # the reward is a constant for the player
    # descending raises the probability of a label the discriminator takes for real (reward < 0)
    assert float(q.grad[0, 0]) < 0


def test_kdgan_distill_loss_forms() -> None:
    a = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert float(DF.kdgan_distill_loss(a, b, "l2")) == pytest.approx((1 + 4 + 1 + 4) / 2 / 2)
    T = 2.0
    kl = 0.0
    for ra, rb in zip(a.tolist(), b.tolist()):
        pa = np.exp(np.array(ra) / T) / np.exp(np.array(ra) / T).sum()
        pb = np.exp(np.array(rb) / T) / np.exp(np.array(rb) / T).sum()
        kl += float((pb * np.log(pb / pa)).sum())
    assert float(DF.kdgan_distill_loss(a, b, "kl", T)) == pytest.approx(kl / 2 * T * T, rel=1e-5)
    with pytest.raises(ValueError, match="form must be 'l2' or 'kl'"):
        DF.kdgan_distill_loss(a, b, "l1")


def test_tau_decays_exponentially() -> None:
    assert tau_at(0, 5, 1.0, 0.01) == pytest.approx(1.0)
    assert tau_at(4, 5, 1.0, 0.01) == pytest.approx(0.01)
    assert tau_at(2, 5, 1.0, 0.01) == pytest.approx(0.1)  # the geometric midpoint


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=1, max_size=8))
def test_bce_of_real_is_bce_of_negated_fake(values: list[float]) -> None:
    d = torch.tensor(values, dtype=torch.float64)
    torch.testing.assert_close(DF.adversarial_bce(d, True), DF.adversarial_bce(-d, False))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=6, max_size=6), st.floats(0.05, 5.0), st.floats(-10, 10))
def test_concrete_sample_is_a_distribution_invariant_to_a_shift(values: list[float], tau: float, c: float) -> None:
    logits = torch.tensor(values, dtype=torch.float64).view(2, 3)
    u = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q, labels = DF.concrete_sample(logits, tau, u)
    q2, labels2 = DF.concrete_sample(logits + c, tau, u)
    torch.testing.assert_close(q.sum(1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(q, q2)
    assert torch.equal(labels, labels2)


def test_tagging_rule_and_token_f1() -> None:
    tags, notes = tag_words("return the value of the return call it now".split())
    assert tags == [1, 0, 0, 0, 0, 0, 1, 0, 0]  # "return the" and "call it"; "the return call" is no trigger
    assert notes == [0, 1, 0, 0, 0, 0, 0, 1, 0]
    pred = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]])
    gold = torch.tensor([[1, 0, 0, -100], [1, 1, 0, -100]])
    s = token_f1(pred, gold)  # tp 2, predicted 3 (the padded 1 ignored), gold 3
    assert s["precision"] == pytest.approx(200 / 3) and s["recall"] == pytest.approx(200 / 3)
    assert s["f1"] == pytest.approx(200 / 3) and s["acc"] == pytest.approx(100 * 4 / 6)


# ------------------------------------------------------------------ the strategies on tiny inputs


def _digits(n: int = 64) -> tuple:
    from distill.data import InMemoryLoader, get_dataset

    tr, va = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    return (InMemoryLoader(tr.inputs[:n], tr.targets[:n], 32, seed=0),
            InMemoryLoader(va.inputs[:64], va.targets[:64], 64, shuffle=False))


@pytest.mark.parametrize("name", ["adversarial_kd", "kdgan"])
def test_logit_strategies_train_and_leave_the_teacher_alone(name: str) -> None:
    from distill.models import create

    train, val = _digits()
    torch.manual_seed(0)
    teacher = create("cnn_digits_teacher", num_classes=10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = create("mlp_digits_student", num_classes=10)
    s0 = [p.detach().clone() for p in student.parameters()]
    r = strategy_info(name).fn(student, train, val, teacher=teacher, epochs=1, progress=False, lr=0.01)
    assert len(r.history) == 1 and 0.0 <= r.last_acc <= 100.0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(s0, student.parameters()))
    assert r.discriminator is not None
    if name == "kdgan":  # its own copy of the teacher learns
        trained = r.teacher.state_dict()
        assert any(not torch.equal(before[k], trained[k]) for k in before if before[k].is_floating_point())


def test_bad_arguments_fail_before_training() -> None:
    from distill.models import create

    train, val = _digits(32)
    t = create("cnn_digits_teacher", num_classes=10)
    with pytest.raises(ValueError, match="alpha must be a number"):
        strategy_info("kdgan").fn(create("mlp_digits_student"), train, val, teacher=t, alpha=1.5, progress=False)
    with pytest.raises(TypeError, match="unexpected arguments"):
        strategy_info("adversarial_kd").fn(create("mlp_digits_student"), train, val, teacher=t, nope=1, progress=False)


def test_adversarial_imitation_on_a_tiny_tagging_set() -> None:
    texts = ["Return the value and call it again. The return value is set once.",
             "Open the file, read it and close the handle. Use a list to sort them."] * 6
    train, val = build_tagging_sets(texts[:10], texts[10:], length=8, vocab_size=40)
    assert isinstance(train, TaggingSet) and int((train.tags == 1).sum()) > 0
    v = len(train.vocab)
    torch.manual_seed(0)
    student, teacher = TokenTagger(v, hidden=8, embed_dim=8), TokenTagger(v, hidden=8, embed_dim=8, annotation_vocab=2)
    enc0 = [p.detach().clone() for p in student.lstm.parameters()]
    r = adversarial_imitation(student, TaggingLoader(train, 4), TaggingLoader(val, 8, shuffle=False), teacher=teacher,
                              epochs=2, teacher_epochs=2, lr=0.01, progress=False)
    assert len(r.history) == 2 and 0.0 <= r.last_score <= 100.0
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)  # the shared, frozen classifier C
    assert any(not torch.equal(a, b) for a, b in zip(enc0, student.lstm.parameters()))
    with pytest.raises(ValueError, match="must read the gold annotations"):
        adversarial_imitation(TokenTagger(v), TaggingLoader(train, 4), None, teacher=TokenTagger(v), progress=False)


# ------------------------------------------------------------------ one step of each strategy, by hand


def _one_batch(n: int = 8):
    from distill.data import InMemoryLoader

    g = torch.Generator().manual_seed(3)
    return InMemoryLoader(torch.randn(n, 1, 4, 4, generator=g), torch.arange(n) % 3, n, seed=0)


def _lin(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))


def _log_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.log(1 / (1 + torch.exp(-v)))


def _xent(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logp = logits - torch.log(torch.exp(logits).sum(-1, keepdim=True))
    return -logp.gather(-1, y[:, None])[:, 0].mean()


def test_adversarial_kd_student_step_is_the_hand_objective() -> None:
    loader = _one_batch()
    teacher, student = _lin(0), _lin(1)
    s0 = [p.detach().clone() for p in student.parameters()]
    lr, adv, l1, aux, ce = 0.1, 0.6, 1.7, 0.3, 0.25
    r = strategy_info("adversarial_kd").fn(student, loader, None, teacher=teacher, epochs=1, adv_weight=adv,
                                           l1_weight=l1, aux_weight=aux, ce_weight=ce, optimizer="sgd", lr=lr,
                                           momentum=0.0, weight_decay=0.0, progress=False)
    disc = r.discriminator  # after its step: the student's step reads this discriminator
    b = next(iter(loader))
    x, y = b.inputs, b.targets
    w = [p.detach().clone().requires_grad_(True) for p in s0]
    s = x.flatten(1) @ w[0].T + w[1]
    t = teacher(x).detach()
    fake, cls = disc(s, y)
    want = adv * -_log_sigmoid(fake).mean() + l1 * (s - t).abs().sum(1).mean() + aux * _xent(cls, y) + ce * _xent(s, y)
    grads = torch.autograd.grad(want, w)
    for p0, g, p1 in zip(s0, grads, student.parameters()):
        torch.testing.assert_close(p1.detach(), p0 - lr * g, rtol=1e-5, atol=1e-6)


def test_kdgan_student_and_teacher_steps_are_the_hand_objectives(monkeypatch) -> None:
    loader = _one_batch()
    teacher, student = _lin(0), _lin(1)
    t0_, s0 = [p.detach().clone() for p in teacher.parameters()], [p.detach().clone() for p in student.parameters()]
    u = torch.rand(8, 3, generator=torch.Generator().manual_seed(5))
    real = DF.concrete_sample
    monkeypatch.setattr(DF, "concrete_sample", lambda logits, tau: real(logits, tau, u))
    alpha, beta, gamma, lr, tau = 0.3, 0.7, 0.2, 0.05, 0.4
    r = strategy_info("kdgan").fn(student, loader, None, teacher=teacher, epochs=1, pretrain_epochs=0, alpha=alpha,
                                  distill_weight=beta, teacher_distill_weight=gamma, tau_start=2.0, tau_end=tau,
                                  optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0, progress=False)
    b = next(iter(loader))
    x = b.inputs
    disc = r.discriminator
    for params0, other, weight, share, trained, mix in ((s0, r.teacher, beta, alpha, student, None),
                                                        (t0_, None, gamma, 1 - alpha, r.teacher, None)):
        w = [p.detach().clone().requires_grad_(True) for p in params0]
        z = x.flatten(1) @ w[0].T + w[1]
        # the teacher steps first: it learns from the student as it was (s0); the student from the trained teacher
        ref = (other(x) if other is not None else x.flatten(1) @ s0[0].T + s0[1]).detach()
        g = -torch.log(-torch.log(u))
        logp = z - torch.log(torch.exp(z).sum(1, keepdim=True))
        q = torch.exp((logp + g) / tau) / torch.exp((logp + g) / tau).sum(1, keepdim=True)
        lab = q.argmax(1)
        reward = torch.log(1 - torch.sigmoid(disc(x).gather(1, lab[:, None])[:, 0])).detach()
        want = share * (torch.log(q.gather(1, lab[:, None])[:, 0]) * reward).mean() \
            + weight * 0.5 * (z - ref).pow(2).sum(1).mean()
        grads = torch.autograd.grad(want, w)
        step = lr if trained is student else 1e-3  # the teacher's Adam: a first step moves each weight by ~lr
        for p0, gr, p1 in zip(params0, grads, trained.parameters()):
            if trained is student:
                torch.testing.assert_close(p1.detach(), p0 - step * gr, rtol=1e-5, atol=1e-6)
            else:  # Adam's first step is -lr * g / (|g| + eps): the sign of the hand gradient
                moved = (p1.detach() - p0)[gr.abs() > 1e-6]
                assert torch.equal(torch.sign(moved), -torch.sign(gr[gr.abs() > 1e-6]))


def test_adversarial_imitation_student_step_is_the_hand_objective(monkeypatch) -> None:
    sgd = torch.optim.SGD
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr, betas=None: sgd(params, lr=lr))
    texts = ["Return the value and call it again. The return value is set once. Open the file and read it."]
    train, _ = build_tagging_sets(texts, texts, length=12, vocab_size=30)
    loader = TaggingLoader(train, len(train), shuffle=False)
    v = len(train.vocab)
    torch.manual_seed(0)
    student, teacher = TokenTagger(v, hidden=4, embed_dim=4), TokenTagger(v, hidden=4, embed_dim=4, annotation_vocab=2)
    s0 = {k: p.detach().clone() for k, p in student.named_parameters()}
    lr, adv, ce = 0.2, 0.4, 1.3
    r = adversarial_imitation(student, loader, None, teacher=teacher, epochs=1, teacher_epochs=0, adv_weight=adv,
                              ce_weight=ce, lr=lr, progress=False)
    ref = TokenTagger(v, hidden=4, embed_dim=4)
    ref.load_state_dict(s0)
    ref.classifier.load_state_dict(teacher.classifier.state_dict())
    b = next(iter(loader))
    keep = b["tags"] != -100
    h = ref.encode(b["ids"])
    logits = teacher.classifier(h)[keep]
    want = ce * _xent(logits, b["tags"][keep]) + adv * -_log_sigmoid(r.discriminator(h[keep], b["ids"][keep])).mean()
    enc = [p for n, p in ref.named_parameters() if not n.startswith("classifier")]
    grads = torch.autograd.grad(want, enc)
    names = [n for n, _ in ref.named_parameters() if not n.startswith("classifier")]
    after = dict(student.named_parameters())
    for n, g in zip(names, grads):
        torch.testing.assert_close(after[n].detach(), s0[n] - lr * g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(after["classifier.weight"], teacher.classifier.weight)  # C frozen
