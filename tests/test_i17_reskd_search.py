"""ResKD's res-student search (this library's rule: cheapest first, the first held-out gain >= min_gain
kept, stop on no gain / the budget / the family / max_stages), its cost measures, and the strategy's
wiring on digits.

The search runs against a scripted ``trial`` (no training), with the expected order, choices and
stop worked out by hand in the comments.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distill
from distill.data.loader import InMemoryLoader
from distill.strategies.chain import AdaptiveResidualStudent, ResidualStudent, evaluate_adaptive, reskd
from distill.strategies.registry import strategy_info
from distill.strategies.reskd_search import (
    ResKDSearchResult,
    SearchStep,
    count_macs,
    model_cost,
    reskd_search,
    search_res_students,
)


class Script:
    """A ``trial`` that returns scripted held-out accuracies and records the calls."""

    def __init__(self, accs: dict[tuple[int, int], float]) -> None:
        self.accs, self.calls = accs, []

    def __call__(self, stage: int, i: int) -> float:
        self.calls.append((stage, i))
        return self.accs[(stage, i)]


# ---------------------------------------------------------------------------------------- the search


def test_search_order_accept_and_stop_on_gain_by_hand() -> None:
    # costs: index 1 and 3 tie at 10 (family order breaks it) -> cheapest first: 1, 3, 2, 0
    # stage 1 (last part: the student, 40; all <= 40; budget 200): 1 gains 0.5 < 1 (dropped),
    #   3 gains exactly 1.0 >= 1 (kept): acc 81, total 50, last part 10
    # stage 2 (only costs <= 10: 1, 3): gains 0.2 and 0.9 < 1 -> stop "min_gain"
    trial = Script({(1, 1): 80.5, (1, 3): 81.0, (2, 1): 81.2, (2, 3): 81.9})
    accepted = []
    out = search_res_students(80.0, 40, [30, 10, 20, 10], trial, teacher_cost=200, min_gain=1.0,
                              accept=lambda k, i: accepted.append((k, i)))
    assert trial.calls == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert out.chosen == [3] and accepted == [(1, 3)]
    assert out.accs == [80.0, 81.0] and out.costs == [40.0, 50.0]
    assert out.stop_reason == "min_gain"
    assert out.steps[0] == SearchStep(1, 1, 10.0, 80.5, 0.5, False)
    assert out.steps[1] == SearchStep(1, 3, 10.0, 81.0, 1.0, True)
    assert [s.accepted for s in out.steps] == [False, True, False, False]
    assert out.steps[3].gain == pytest.approx(0.9)


def test_search_stops_on_the_budget_by_hand() -> None:
    # base 50, teacher 100, max_cost 0.7 -> the chain may cost 70; min_gain 0: every trial that does not
    # lose accuracy is kept. stage 1: 0 (10) first, kept: total 60, last 10; stage 2: only 0 is <= 10,
    # 60 + 10 = 70 <= 70 (the budget's edge is allowed), kept; stage 3: 80 > 70 -> "budget", no trial
    trial = Script({(1, 0): 90.0, (2, 0): 91.0})
    out = search_res_students(89.0, 50, [10, 20], trial, teacher_cost=100, min_gain=0.0, max_cost=0.7)
    assert trial.calls == [(1, 0), (2, 0)]
    assert out.chosen == [0, 0] and out.costs == [50.0, 60.0, 70.0] and out.accs == [89.0, 90.0, 91.0]
    assert out.stop_reason == "budget"


def test_search_budget_skips_a_candidate_and_tries_the_next() -> None:
    # base 50, teacher 100, max_cost 0.65 -> 65: candidate 1 (20) would cost 70, skipped; 0 (10) fits
    trial = Script({(1, 0): 70.0})
    out = search_res_students(60.0, 50, [10, 20], trial, teacher_cost=100, min_gain=0.5, max_cost=0.65,
                              monotone=False, max_stages=1)
    assert trial.calls == [(1, 0)] and out.chosen == [0] and out.stop_reason == "max_stages"


def test_search_monotone_family_and_max_stages() -> None:
    # every candidate costlier than the student: monotone stops at once ("family"), no trial
    trial = Script({})
    out = search_res_students(50.0, 5, [10, 20], trial, teacher_cost=1000)
    assert trial.calls == [] and out.chosen == [] and out.stop_reason == "family" and out.accs == [50.0]
    # without monotone the cheaper (10) is tried first and kept, twice, until max_stages = 2
    # (index 1 is the 10; default min_gain 0.5: gains 2 and 1 both kept)
    trial = Script({(1, 1): 52.0, (2, 1): 53.0})
    out = search_res_students(50.0, 5, [20, 10], trial, teacher_cost=1000, monotone=False, max_stages=2)
    assert trial.calls == [(1, 1), (2, 1)] and out.chosen == [1, 1] and out.stop_reason == "max_stages"
    assert out.costs == [5.0, 15.0, 25.0] and out.accs == [50.0, 52.0, 53.0]


def test_search_monotone_allows_an_equal_cost_part() -> None:
    # the res-student may cost as much as the part before it: 40 <= 40
    trial = Script({(1, 0): 71.0})
    out = search_res_students(70.0, 40, [40], trial, teacher_cost=1000, min_gain=1.0, max_stages=1)
    assert out.chosen == [0] and trial.calls == [(1, 0)]


@pytest.mark.parametrize("kwargs, match", [
    ({"costs": []}, "costs"),
    ({"costs": [1, -2]}, r"costs\[1\]"),
    ({"costs": [1, True]}, r"costs\[1\]"),
    ({"base_cost": 0}, "base_cost"),
    ({"teacher_cost": float("nan")}, "teacher_cost"),
    ({"min_gain": float("inf")}, "min_gain"),
    ({"max_cost": 0}, "max_cost"),
    ({"max_stages": 0}, "max_stages"),
    ({"max_stages": 1.5}, "max_stages"),
])
def test_search_checks_arguments_before_any_trial(kwargs: dict, match: str) -> None:
    trial = Script({})
    args = {"base_acc": 1.0, "base_cost": 1, "costs": [1], "teacher_cost": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        search_res_students(args.pop("base_acc"), args.pop("base_cost"), args.pop("costs"), trial, **args)
    assert trial.calls == []


# ---------------------------------------------------------------------------------------- cost


def test_count_macs_by_hand() -> None:
    # conv 1->3, 3x3, pad 1 on 5x5: 3*5*5 outputs x 1*9 = 675; linear 75 -> 4: 4*75 = 300
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(75, 4))
    model.train()
    assert count_macs(model, torch.randn(3, 1, 5, 5)) == 975
    assert model.training  # put back in its mode
    # grouped conv 4->4, 3x3, groups 2 on 4x4: 4*2*2 outputs x (4/2)*9 = 288; params 4*2*9 + 4 = 76
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    assert count_macs(grouped, torch.randn(2, 4, 4, 4)) == 288
    assert model_cost(grouped) == 76 and model_cost(grouped, "macs", torch.randn(1, 4, 4, 4)) == 288
    with pytest.raises(ValueError, match="example"):
        model_cost(grouped, "macs")
    with pytest.raises(ValueError, match="cost must be one of"):
        model_cost(grouped, "flops")
    with pytest.raises(ValueError, match="B >= 1"):
        count_macs(grouped, torch.randn(0, 4, 4, 4))


# ---------------------------------------------------------------------------------------- the strategy


FAST = {"optimizer": "adam", "lr": 0.01, "schedule": "constant", "progress": False}
STUDENT = {"name": "cnn", "widths": [4, 8, 8], "num_classes": 10}
FAMILY = [{"name": "cnn", "widths": [w, w, w], "num_classes": 10} for w in (4, 2)]


@pytest.fixture(scope="module")
def setup() -> tuple:
    data = distill.data.get_dataset("digits")
    train = InMemoryLoader(data.inputs[:300], data.targets[:300], 50, seed=0)
    held = InMemoryLoader(data.inputs[300:450], data.targets[300:450], 75, shuffle=False)
    val = InMemoryLoader(data.inputs[-150:], data.targets[-150:], 75, shuffle=False)
    torch.manual_seed(0)
    teacher = distill.models.create("cnn_digits_teacher")
    distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), train, epochs=2, **FAST)
    return train, held, val, teacher


def _top1(model: nn.Module, loader) -> float:  # type: ignore[no-untyped-def]
    n = c = 0
    with torch.no_grad():
        for b in loader:
            c += int((model.eval()(b.inputs).argmax(1) == b.targets).sum())
            n += len(b.targets)
    return 100.0 * c / n


def test_reskd_search_wiring_on_digits(setup: tuple) -> None:
    train, held, val, teacher = setup
    # min_gain -100: every trial is kept, so the cheapest (w=2, index 1) joins at each stage until max_stages
    r = reskd_search(STUDENT, train, val, teacher=teacher, family=FAMILY, held_out=held, epochs=1, min_gain=-100.0,
                     max_stages=2, **FAST)
    assert isinstance(r, ResKDSearchResult) and strategy_info("reskd_search").family == "chain"
    assert r.chosen == [1, 1] and r.stop_reason == "max_stages"
    assert [(s.stage, s.candidate) for s in r.steps] == [(1, 1), (2, 1)]
    params = [sum(p.numel() for p in distill.models.create("cnn", widths=w, num_classes=10).parameters())
              for w in ([4, 8, 8], [2, 2, 2])]
    assert r.part_cost == [params[0], params[1], params[1]]
    assert r.stage_cost == [params[0], params[0] + params[1], params[0] + 2 * params[1]]
    assert r.teacher_cost == sum(p.numel() for p in teacher.parameters()) and r.cost_measure == "params"
    final = r.models[-1]
    assert isinstance(final, ResidualStudent) and len(final.parts) == 3 and len(r.stages) == 3
    # the held-out accuracies the search compared are those of the chain after each stage
    assert r.stage_held_out_acc[-1] == pytest.approx(_top1(final, held))
    assert r.stage_held_out_acc[0] == pytest.approx(_top1(ResidualStudent(list(final.parts[:1])), held))
    assert r.stage_held_out_acc[1] == pytest.approx(_top1(ResidualStudent(list(final.parts[:2])), held))
    assert r.stage_val_acc == [s.last_acc for s in r.stages]
    assert r.last_acc == pytest.approx(_top1(final, val))
    # sample-adaptive inference over the same parts, its mean cost from the parts' usage
    assert isinstance(r.adaptive, AdaptiveResidualStudent) and list(r.adaptive.parts) == list(final.parts)
    stats = evaluate_adaptive(r.adaptive, val)
    assert r.adaptive_acc == pytest.approx(stats["acc"]) and r.part_usage == pytest.approx(stats["part_usage"])
    assert r.adaptive_cost == pytest.approx(params[0] + params[1] * (r.part_usage[0] + r.part_usage[1]))
    # threshold 0: every sample stops after the student, so the adaptive cost is the student's alone
    r0 = reskd_search(STUDENT, train, val, teacher=teacher, family=FAMILY, held_out=held, epochs=1, min_gain=-100.0,
                      max_stages=1, threshold=0.0, **FAST)
    assert r0.part_usage == [0.0] and r0.avg_res_students == 0.0 and len(r0.models[-1].parts) == 2
    assert r0.adaptive_cost == params[0] and r0.stage_cost[-1] == params[0] + params[1]


def test_reskd_search_keeps_none_when_no_candidate_gains(setup: tuple) -> None:
    train, held, val, teacher = setup
    # min_gain 100 points: nothing can gain that; both candidates (<= the student's cost) are tried, cheapest
    # first, and the delivered chain is the student alone
    r = reskd_search(STUDENT, train, val, teacher=teacher, family=FAMILY, held_out=held, epochs=1, min_gain=100.0,
                     cost="macs", **FAST)
    assert [s.candidate for s in r.steps] == [1, 0] and not any(s.accepted for s in r.steps)
    assert r.chosen == [] and r.stop_reason == "min_gain" and len(r.models[-1].parts) == 1
    # stage 0 is reskd's stage 0: the same seed gives the same student, whatever the family
    torch.manual_seed(3)
    same = reskd_search(STUDENT, train, val, teacher=teacher, family=FAMILY, held_out=held, epochs=1,
                        min_gain=100.0, seed=3, **FAST)
    torch.manual_seed(3)
    ref = reskd(STUDENT, train, val, teacher=teacher, res_students=[FAMILY[1]], epochs=1, seed=3, **FAST)
    for a, b in zip(same.models[-1].parts[0].state_dict().values(), ref.models[-1].parts[0].state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b)
    assert r.cost_measure == "macs" and r.part_cost[0] == count_macs(r.models[-1].parts[0], next(iter(val)).inputs)
    assert r.steps[0].cost < r.steps[1].cost
    assert r.avg_res_students == 0.0 and r.adaptive_cost == r.part_cost[0]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"family": [nn.Linear(64, 10)]}, TypeError, "afresh"),
    ({"family": []}, TypeError, "family"),
    ({"cost": "flops"}, ValueError, "cost must be one of"),
    ({"min_gain": "1"}, ValueError, "min_gain"),
    ({"max_cost": -1}, ValueError, "max_cost"),
    ({"max_stages": 0}, ValueError, "max_stages"),
    ({"monotone": 1}, ValueError, "monotone"),
    ({"resume": True, "run_dir": "x"}, ValueError, "resume"),
    ({"held_out": None, "val": None}, ValueError, "held_out"),
])
def test_reskd_search_checks_arguments_before_training(kwargs: dict, error: type, match: str) -> None:
    data = distill.data.get_dataset("digits")
    loader = InMemoryLoader(data.inputs[:20], data.targets[:20], 10, seed=0)
    val = kwargs.pop("val", loader)
    teacher = distill.models.create("cnn_digits_teacher")
    args = {"teacher": teacher, "family": FAMILY, "held_out": loader, "epochs": 1, **FAST, **kwargs}
    calls = []
    args["on_epoch_end"] = calls.append
    with pytest.raises(error, match=match):
        reskd_search(STUDENT, loader, val, **args)
    assert calls == []


def test_reskd_search_objectives_by_hand(monkeypatch: pytest.MonkeyPatch, setup: tuple) -> None:
    """Stage 0: (1 - λ) CE + λ T² KL(p_t^T ‖ p_s^T); a trial: 1/(2B) Σ_b ‖Σ_j z_j - t‖² + ce_weight · CE on the sum,
    with non-default T = 2.5, λ = 0.3, ce_weight = 0.6, written out with torch ops."""
    import distill.strategies.chain as chain_mod

    train, held, val, teacher = setup
    seen: list = []
    real = chain_mod.fit
    monkeypatch.setattr(chain_mod, "fit", lambda d, *a, **k: (seen.append(d), real(d, *a, **k))[1])
    r = reskd_search(STUDENT, train, val, teacher=teacher, family=FAMILY, held_out=held, epochs=1, min_gain=-100.0,
                     max_stages=1, T=2.5, kd_weight=0.3, ce_weight=0.6, **FAST)
    assert len(seen) == 2 and r.chosen == [1]
    b = next(iter(val))
    x, y = b.inputs, b.targets
    with torch.no_grad():
        t = teacher.eval()(x).double()
        s0 = seen[0].student(x).double()
        ce0 = -torch.log_softmax(s0, 1).gather(1, y[:, None]).mean()
        pt, ls = torch.softmax(t / 2.5, 1), torch.log_softmax(s0 / 2.5, 1)
        kl = (pt * (torch.log(pt) - ls)).sum() / len(y) * 2.5 ** 2
        torch.testing.assert_close(seen[0](b).total.double(), 0.7 * ce0 + 0.3 * kl, rtol=1e-4, atol=1e-5)
        s1 = seen[1].student(x).double()
        assert seen[1].student.frozen == 1 and len(seen[1].student.parts) == 2
        ce1 = -torch.log_softmax(s1, 1).gather(1, y[:, None]).mean()
        want = ((s1 - t) ** 2).sum() / (2 * len(y)) + 0.6 * ce1
        torch.testing.assert_close(seen[1](b).total.double(), want, rtol=1e-4, atol=1e-5)
