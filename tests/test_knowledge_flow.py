"""Knowledge flow: the mixed layer output against a hand computation, the weights and the dependency
loss by hand, the KL to the previous step's prediction, frozen teachers that never get gradient,
teacher weights that decay under the penalty, a student that runs alone at the end, short runs
on digits with two student families, and argument errors before any training.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill import Distiller, fit
from distill import functional as DF
from distill.batch import Batch
from distill.data import get_dataset
from distill.data.loader import InMemoryLoader
from distill.models import create
from distill.strategies.knowledge_flow import (
    FlowDependency,
    FlowKL,
    KnowledgeFlowNet,
    KnowledgeFlowResult,
    fit_knowledge_flow,
)
from distill.strategies.registry import strategy_info

SETTINGS = settings(max_examples=30, deadline=None)


def linear_net(d_in: int, hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def small_net() -> KnowledgeFlowNet:
    """A linear student (tap "0": 2 units) and two teachers (tap "0": 3 and 4 units)."""
    student = linear_net(5, 2, 0)
    teachers = [linear_net(5, 3, 1), linear_net(5, 4, 2)]
    return KnowledgeFlowNet(student, teachers, ["0"], [["0"], ["0"]], torch.randn(4, 5))


# ---------------------------------------------------------------------------------------- the math


def test_the_mixed_layer_output_is_the_weighted_sum_worked_out_by_hand():
    net = small_net()
    with torch.no_grad():  # weights 1/6, 2/6, 3/6 for the student and the two teachers
        net.weight_logits[0].copy_(torch.tensor([0.0, math.log(2.0), math.log(3.0)]))
    x = torch.randn(3, 5)
    student, t1, t2 = net.student, net.teachers[0].model, net.teachers[1].model
    q1, q2 = net.transforms[0]
    out = net(x)
    with torch.no_grad():
        h, a, b = student[0](x), q1(t1[0](x)), q2(t2[0](x))
        mixed = [[h[r, c] / 6 + 2 * a[r, c] / 6 + 3 * b[r, c] / 6 for c in range(2)] for r in range(3)]
        expected = student[2](student[1](torch.tensor(mixed)))
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(student(x), student[2](student[1](student[0](x))))  # called directly: alone


@SETTINGS
@given(st.lists(st.lists(st.floats(-5, 5), min_size=3, max_size=3), min_size=1, max_size=4))
def test_dependency_loss_is_the_teachers_total_weight(rows):
    logits = [torch.tensor(r, dtype=torch.float64) for r in rows]
    expected = 0.0
    for r in rows:
        e = [math.exp(v) for v in r]
        expected += (e[1] + e[2]) / sum(e)
    got = DF.flow_dependency_loss(logits)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    assert 0.0 <= float(got) < len(rows)
    assert torch.allclose(DF.flow_weights(logits[0]).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_flow_mix_and_the_schedule_by_hand():
    own, t = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.allclose(DF.flow_mix(own, [t], torch.tensor([0.25, 0.75])), torch.tensor([2.5, -0.25]))
    with pytest.raises(ValueError, match="weights"):
        DF.flow_mix(own, [t], torch.tensor([1.0]))
    assert DF.flow_dependency_factor(0, 4) == 0.25 and DF.flow_dependency_factor(3, 4) == 1.0
    assert DF.flow_dependency_factor(1, 4, start=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    with pytest.raises(ValueError, match="start"):
        DF.flow_dependency_factor(0, 4, start=2.0)


def test_the_kl_term_compares_with_the_previous_steps_prediction():
    net = small_net()
    kl = FlowKL()
    d = Distiller(net, None, {"flow_kl": kl})
    batch = Batch(torch.randn(6, 5), torch.zeros(6, dtype=torch.long))
    d.prepare(batch)
    d.train()
    assert float(d(batch).total.detach()) == 0.0  # the first step: the copy starts from the current values
    with torch.no_grad():
        previous = net(batch.inputs)
        for p in [*net.student.parameters(), *net.weight_logits]:
            p.add_(0.3)  # a "step"
        current = net(batch.inputs)
    out = d(batch)
    expected = 0.0
    for p_row, q_row in zip(previous.tolist(), current.tolist()):
        lp = [v - math.log(sum(math.exp(u) for u in p_row)) for v in p_row]
        lq = [v - math.log(sum(math.exp(u) for u in q_row)) for v in q_row]
        expected += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq)) / len(previous)
    assert float(out.total.detach()) == pytest.approx(expected, rel=1e-5) and expected > 1e-4
    out.total.backward()
    old = kl._nets[1]
    assert net.weight_logits[0].grad is not None and net.student[0].weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in old.parameters())
    assert old.teachers is net.teachers  # the copy shares the frozen teachers


def test_teacher_weights_decay_towards_zero_under_the_penalty():
    net = small_net()
    dep = FlowDependency()
    d = Distiller(net, None, {"flow_dependency": dep})
    batch = Batch(torch.randn(4, 5))
    d.prepare(batch)
    opt = torch.optim.SGD(net.weight_logits.parameters(), lr=2.0)
    weights = []
    for _ in range(30):
        opt.zero_grad()
        d(batch).total.backward()
        opt.step()
        weights.append(dep.log_values()["teacher_weight"])
    assert weights[0] < 2 / 3 and all(b < a for a, b in itertools.pairwise(weights)) and weights[-1] < 0.05


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits():
    train, val = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    loader = InMemoryLoader(train.inputs[:320], train.targets[:320], 32, shuffle=True, seed=0, return_index=True)
    val_loader = InMemoryLoader(val.inputs[:200], val.targets[:200], 200, shuffle=False)
    torch.manual_seed(0)
    teachers = [create("cnn", widths=(8, 16, 16)), create("cnn", widths=(12, 12, 24))]
    for t in teachers:
        fit(Distiller(t, None, {"ce": 1.0}), loader, epochs=2, progress=False, lr=0.1, schedule="constant")
        t.zero_grad(set_to_none=True)  # so that any gradient seen later comes from knowledge flow
    return loader, val_loader, teachers


CASES = {
    "cnn": (lambda: create("cnn_digits_student"), {}),
    # an MLP taught by CNNs: their pooled features flow into its hidden layer through linear maps
    "mlp": (lambda: create("mlp_digits_student"), {"layers": ["hidden1"], "teacher_layers": ["pool"]}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_short_run_lowers_the_loss_and_delivers_the_student_alone(digits, name, tmp_path):
    train, val, teachers = digits
    model, kwargs = CASES[name]
    student = model()
    snapshots = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    calls = []
    hooks = [t.register_forward_hook(lambda *_: calls.append(1)) for t in teachers]
    torch.manual_seed(0)
    result = fit_knowledge_flow(student, train, val, teacher=teachers, epochs=4, progress=False, lr=0.05,
                                schedule="constant", dependency_weight=5.0, run_dir=tmp_path, **kwargs)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["val_independent_acc"] for row in logged] == [row["val_independent_acc"] for row in result.history]
    assert isinstance(result, KnowledgeFlowResult) and result.student is student
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses
    # the teachers never changed (weights, BatchNorm statistics) and never got gradient
    for t, snap in zip(teachers, snapshots):
        assert all(torch.equal(v, snap[k]) for k, v in t.state_dict().items())
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    # their weights shrank under the growing penalty
    shares = [row["flow_dependency_teacher_weight"] for row in result.history]
    assert shares[-1] < shares[0] and len(result.teacher_weights[0]) == 3
    # the delivered student runs alone: no hooks, no teacher call, and its accuracy is the top-level one
    assert not any(m._forward_hooks for m in student.modules())
    calls.clear()
    student.eval()
    with torch.no_grad():
        student(next(iter(val)).inputs)
    assert not calls
    assert result.last_acc == result.history[-1]["val_independent_acc"]
    assert result.flow_last_acc == result.history[-1]["val_student_acc"]
    for h in hooks:
        h.remove()


def test_bad_arguments_fail_before_any_training(digits):
    train, _, teachers = digits
    student = create("cnn_digits_student")
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(TypeError, match="teacher must be"):
        fit_knowledge_flow(student, train, teacher=[], epochs=1, progress=False)
    with pytest.raises(ValueError, match="not a submodule"):
        fit_knowledge_flow(student, train, teacher=teachers, epochs=1, layers=["stage9"], progress=False)
    with pytest.raises(ValueError, match="one list of 3 paths"):
        fit_knowledge_flow(student, train, teacher=teachers, epochs=1, teacher_layers=[["stage1"], ["stage2"]],
                           progress=False)
    with pytest.raises(ValueError, match="dependency_weight must be"):
        fit_knowledge_flow(student, train, teacher=teachers, epochs=1, dependency_weight=-1.0, progress=False)
    with pytest.raises(ValueError, match="start must be"):
        fit_knowledge_flow(student, train, teacher=teachers, epochs=1, dependency_start=1.5, progress=False)
    with pytest.raises(ValueError, match="epochs must be"):
        fit_knowledge_flow(student, train, teacher=teachers, epochs=0, progress=False)
    with pytest.raises(ValueError, match="':input'"):
        fit_knowledge_flow(student, train, teacher=teachers, epochs=1, layers=["fc:input"], teacher_layers=["fc:input"],
                           progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    with pytest.raises(TypeError, match="KnowledgeFlowNet"):
        Distiller(student, None, {"flow_kl": FlowKL()}).prepare(next(iter(train)))
    info = strategy_info("knowledge_flow")
    assert info.fn is fit_knowledge_flow and info.family == "chain" and info.paper.arxiv == "1904.05878"


def test_teachers_follow_the_example_to_its_device():
    """Teachers trained elsewhere (a GPU in a recipe) are moved to the example's device for the shape
    probes; the meta device stands for the other device here (found by benchmarks/cuda_check.py)."""
    student = linear_net(5, 2, 0).to("meta")
    teachers = [linear_net(5, 3, 1), linear_net(5, 4, 2)]
    net = KnowledgeFlowNet(student, teachers, ["0"], [["0"], ["0"]], torch.randn(4, 5, device="meta"))
    assert {p.device.type for p in net.parameters()} == {"meta"}
