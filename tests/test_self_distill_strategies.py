"""Self-distillation strategies end to end on the digits data: BYOT, MSD, DLB, Zipf's LS, Tf-FD.

Short runs on two model families lower the training loss; the DLB loader pairs batches as the
paper does; bad arguments fail before any training.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.data import get_dataset
from distill.data.loader import InMemoryLoader
from distill.models import create
from distill.strategies.registry import list_strategies, strategy_info
from distill.strategies.self_distill import (
    LastBatchLoader,
    RotationLoader,
    SelfDistillResult,
    evaluate_exits,
    fit_byot,
    fit_dlb,
    fit_msd,
    fit_sla,
    fit_tffd,
    fit_zipf_ls,
)


@pytest.fixture(scope="module")
def digits():
    train, val = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    x, y = train.inputs[:384], train.targets[:384]
    return x, y, InMemoryLoader(val.inputs[:200], val.targets[:200], 200, shuffle=False)


def loader(digits, batch_size: int = 32) -> InMemoryLoader:
    x, y, _ = digits
    return InMemoryLoader(x, y, batch_size, shuffle=True, seed=0, return_index=True)


def small_convnet() -> nn.Module:
    """A plain nn.Sequential (no named tap points): taps are its indices."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 10))


CASES = {
    "byot-cnn": (fit_byot, lambda: create("cnn_digits_student"), {}),
    "byot-mlp": (fit_byot, lambda: create("mlp_digits_student"), {"exits": ["hidden1.pre"]}),
    "msd-cnn": (fit_msd, lambda: create("cnn_digits_student"), {}),
    "msd-sequential": (fit_msd, small_convnet, {"exits": ["1"], "feature": "5", "lam": 0.01}),
    "dlb-cnn": (fit_dlb, lambda: create("cnn_digits_student"), {}),
    "dlb-mlp": (fit_dlb, lambda: create("mlp_digits_student"), {}),
    "zipf-cnn-dense": (fit_zipf_ls, lambda: create("cnn_digits_student"), {"feature": "stage3"}),
    "zipf-mlp-logits": (fit_zipf_ls, lambda: create("mlp_digits_student"), {"lam": 1.0}),
    "tffd-cnn": (fit_tffd, lambda: create("cnn_digits_student"), {"intra": 0.1, "inter": 0.1}),
    "tffd-sequential": (fit_tffd, small_convnet, {"taps": ["1", "3"]}),
    "sla-cnn": (fit_sla, lambda: create("cnn_digits_student"), {}),
    "sla-mlp-aggregated": (fit_sla, lambda: create("mlp_digits_student"), {"predict": "aggregated"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_short_run_on_digits_lowers_the_training_loss(digits, name):
    fn, model, kwargs = CASES[name]
    torch.manual_seed(0)
    result = fn(model(), loader(digits), digits[2], epochs=3, progress=False, lr=0.1, schedule="constant", **kwargs)
    assert isinstance(result, SelfDistillResult) and result.distiller is not None
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses
    assert result.last_acc is not None
    if fn in (fit_byot, fit_msd):
        exits = result.distiller.methods[fn.__name__[4:]].exits
        assert set(result.exit_acc) == {*exits, "deepest", "ensemble"}
        assert result.exit_acc["deepest"] == pytest.approx(result.last_acc)


def test_dlb_sees_half_of_each_batch_again(digits):
    result = fit_dlb(create("mlp_digits_student"), loader(digits, 16), epochs=1, progress=False)
    # 24 chunks of 16 -> 23 batches of 32; all but the first batch's 16 repeated samples are paired
    assert result.history[0]["dlb_paired"] == pytest.approx(22 * 16 / (23 * 32))


def test_last_batch_loader_pairs_consecutive_chunks():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    base = InMemoryLoader(x, y, 3, shuffle=False, return_index=True)
    paired = LastBatchLoader(base)
    batches = list(paired)
    assert len(paired) == len(batches) == 3
    assert [b.index.tolist() for b in batches] == [[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8], [6, 7, 8, 9]]
    assert torch.equal(batches[1].targets, y[3:9]) and paired.targets is base.targets
    paired.set_epoch(4)
    assert base.epoch == 4


def test_rotation_loader_expands_each_batch_to_its_four_rotations():
    x, y = torch.randn(5, 1, 4, 4), torch.arange(5)
    batches = list(RotationLoader(InMemoryLoader(x, y, 2, shuffle=False, return_index=True)))
    assert [b.index.tolist() for b in batches][1] == [2, 2, 2, 2, 3, 3, 3, 3]
    assert torch.equal(batches[0].inputs[5], torch.rot90(x[1], 1, (1, 2))) and torch.equal(batches[2].targets, y[4:].repeat(4))


def test_strategies_are_registered_with_their_papers():
    names = {s.name for s in list_strategies("self")}
    assert {"byot", "msd", "dlb", "zipf_ls", "tf_fd", "sla"} <= names
    assert strategy_info("byot").paper.arxiv == "1905.08094" and strategy_info("dlb").fn is fit_dlb


def test_bad_arguments_fail_before_any_training(digits):
    model = create("cnn_digits_student")
    before = [p.detach().clone() for p in model.parameters()]
    train = loader(digits)
    with pytest.raises(ValueError, match="teacher must be None"):
        fit_byot(model, train, epochs=1, teacher=create("cnn_digits_teacher"))
    with pytest.raises(ValueError, match="epochs must be"):
        fit_tffd(model, train, epochs=0)
    with pytest.raises(ValueError, match="non-empty list"):
        fit_msd(model, train, epochs=1, exits=[])
    with pytest.raises(ValueError, match="alpha must be"):
        fit_byot(model, train, epochs=1, alpha=2.0)
    with pytest.raises(ValueError, match="alpha must be"):
        fit_dlb(model, train, epochs=1, alpha=0)
    x, y, _ = digits
    with pytest.raises(ValueError, match="no index"):
        fit_dlb(model, DataLoader(TensorDataset(x, y), batch_size=32), epochs=1)
    with pytest.raises(ValueError, match="at least 2 batches"):
        fit_dlb(model, InMemoryLoader(x, y, 1000, return_index=True), epochs=1)
    with pytest.raises(TypeError, match="factory"):
        fit_zipf_ls("resnet", train, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_factory_student_and_exit_evaluation_errors(digits):
    result = fit_zipf_ls(lambda: create("mlp_digits_student"), loader(digits), epochs=1, progress=False)
    with pytest.raises(ValueError, match="exactly one BYOT/MSD loss"):
        evaluate_exits(result.distiller, digits[2])
