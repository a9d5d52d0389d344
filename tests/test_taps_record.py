"""distill.taps.record_in_eval: one eval-mode, no-grad forward with taps, every module's mode restored."""

from __future__ import annotations

import torch
from torch import nn

from distill.taps import record_in_eval


def test_record_in_eval_runs_in_eval_mode_and_restores_each_modules_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[1].running_mean.fill_(0.5)
    model.train()
    model[1].eval()  # a user-frozen BatchNorm must stay frozen, the others in training mode
    x = torch.randn(5, 3)
    store = record_in_eval(model, ["1", "3"], x, model_name="student")
    with torch.no_grad():
        expected = (model[0](x) - 0.5) / torch.sqrt(torch.ones(4) + model[1].eps) * model[1].weight + model[1].bias
    torch.testing.assert_close(store["1"], expected)  # the running statistics, not the batch's
    assert not store["1"].requires_grad and store["3"].shape == (5, 2)
    assert [m.training for m in model] == [True, False, True, True] and model.training
    assert not model[1]._forward_hooks and not model[3]._forward_hooks
