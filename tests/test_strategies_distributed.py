"""Every strategy under torchrun (2 gloo processes on this CPU).

Two launches' worth of checks in ONE torchrun launch (a launch costs seconds of imports):

* **Equivalence.** Strategies with loops of their own (the DML / OKDDip / OKDHP cohort loop,
  co-training's rounds, mean teacher's two-stream batches, data distillation's mixed batches,
  MUNGE transfer sets, chains of fits) run on students without BatchNorm or dropout, whose
  single-process training is a function of the global batch alone: the two ranks must end with the
  same weights, equal to a single-process run of the same call in this test process.
* **Every registered strategy from a recipe** (the recipes of tests/test_strategy_recipes.py):
  both ranks finish, rank 0 alone writes the run's files, and each epoch is logged once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.data import InMemoryLoader, get_dataset
from distill.models import create
from distill.strategies.registry import list_strategies, strategy_info

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_distributed import DATA_ENV, _launch

# a registered strategy not run here must say why
NOT_RUN = {"codistillation": "one model per process by design: tests/test_distributed.py runs it under torchrun",
           "kd_mvs": "multi-view stereo, a single-process loop of its own (tests/test_vit_mvs.py)",
           # issue 15 (V4): label-free pre-training loops of their own and a linear probe, single process
           **{name: "a pre-training loop of its own, single process (tests/test_vit_mim.py)" for name in ("fd", "sdae", "dmjd")},
           # issue 15 (V5): its bag loader and negative queue are not sharded: it refuses torchrun
           "bingo": "one process: refuses torchrun (tests/test_vit_bingo.py)",
           # issue 13 (S2b): single-process loops of their own (no fit, no DDP): tests/test_synth_s2b.py
           **{name: "a data-free loop of its own, single process" for name in ("dfad", "rdskd", "fedftg", "deepinversion_kd", "adi_kd", "fast_dfkd",
                                                                            "dearkd_data_free")},
           "gkd": "a causal LM on token batches, not a digits recipe (tests/test_gkd.py)",
           # issue 12's language strategies: Python only (tests/test_strategy_recipes.py's PYTHON_ONLY says why)
           **{name: "Python only, not a digits recipe" for name in (
               "multilingual_kd", "bam", "mtdnn_kd", "dark_knowledge", "embedding_encoding", "seq_kd", "search_kd")},
           # issue 16: GAN, diffusion, light-field and graph loops of their own, single process (PYTHON_ONLY there)
           **{name: "a generative or graph loop of its own, single process, Python only" for name in (
               "darkgan", "guided_diffusion_distill", "progressive_distill", "r2l", "self_distilled_stylegan",
               "stylegan2_distillation", "stylekd", "graph_free_kd")},
           # issue 17 (A): adversarial loops of their own (alternating player updates, no fit, no DDP)
           **{name: "an adversarial loop of its own, single process (tests/test_i17_A_adversarial.py)" for name in (
               "adversarial_kd", "kdgan", "adversarial_imitation")},
           # issue 17 (F): explanations fitted in closed form / by scikit-learn on tabular data, no training loop
           **{name: "a closed-form or scikit-learn fit on tabular data, no fit loop, Python only "
                    "(tests/test_i17_F_explain.py)" for name in ("global_additive_explanation", "yasenn")},
           # issue 17 (E): BENN resamples the whole training set between members and scores boosting's weights on
           # it in one process; QuPeD simulates its federated clients in one process (tests/test_i17_E_*.py)
           "benn": "members trained one after another on resampled data, boosting weights on the whole set: one process",
           "quped": "simulated federated clients, a loop of its own (no fit, no DDP), single process",
           # issue 17 (D): DDSL's joint ADMM + dean loop is its own (three gradients and a virtual step per batch)
           "dissparse": "an ADMM-with-meta-gradient loop of its own (no fit, no DDP), single process "
                        "(tests/test_i17_D_dissparse.py)",
           # issue 17 (C): loops of their own (transfer_x_common.train_in_memory: no fit, no DDP)
           **{name: "a single-process loop of its own (tests/test_i17_C_transfer.py)" for name in (
               "cross_lingual_distill", "msdn", "kddaug")},
           # issue 17 (G): three-stage / two-generation SGD loops of their own over tensors in memory (no fit, no DDP)
           **{name: "a single-process loop of its own (tests/test_i17_G_fewshot.py, tests/test_i17_G_longtail.py)"
              for name in ("skd_fewshot", "ssd_longtail")},
           # issue 17 (H): MetaDistil's pilot/teacher/student rounds and D3Former's phases are loops of their own
           # (no fit, no DDP); function_matching goes through fit and runs here under torchrun
           "metadistil": "a meta-gradient loop of its own, single process (tests/test_i17_H_metadistil.py)",
           "d3former": "class-incremental phases in a loop of its own, single process (tests/test_i17_H_incremental.py)"}
RUN_KW = {"lr": 0.1, "momentum": 0.9, "schedule": "constant", "progress": False, "device": "cpu", "seed": 0}


def _digits() -> tuple[torch.Tensor, ...]:
    if os.environ.get(DATA_ENV):
        xt, yt, xv, yv = torch.load(os.environ[DATA_ENV])
    else:
        tr, va = get_dataset("digits", split="train"), get_dataset("digits", split="val")
        xt, yt, xv, yv = tr.inputs, tr.targets, va.inputs, va.targets
    return xt[:99].clone(), yt[:99].clone(), xv[:64].clone(), yv[:64].clone()


def _mlp() -> nn.Module:
    return create("mlp_digits_student")


def _loaders(n: int = 99, batch: int = 32) -> tuple[InMemoryLoader, InMemoryLoader]:
    x, y, xv, yv = _digits()
    return InMemoryLoader(x[:n], y[:n], batch, seed=1, return_index=True), \
        InMemoryLoader(xv, yv, 64, shuffle=False)


def _params(*models: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in models for p in m.parameters()]


# --------------------------------------------------------------------------------------------
# The equivalence cases: each returns the trained models' parameters and the logged history
# --------------------------------------------------------------------------------------------


def _dml():
    from distill.strategies.online import fit_dml

    train, val = _loaders()
    r = fit_dml(_mlp, train, val, epochs=2, num_models=2, **RUN_KW)
    return _params(*r.models.values()), r.history


def _okddip():
    from distill.strategies.online import fit_okddip

    train, val = _loaders()
    r = fit_okddip(_mlp, train, val, epochs=2, num_models=3, rampup_epochs=1, **RUN_KW)
    return _params(*r.models.values()), r.history


def _rocket():
    from distill.strategies.online import RocketNet, fit_rocket

    torch.manual_seed(0)
    net = RocketNet(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10),
                    nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10)))
    train, val = _loaders()
    r = fit_rocket(net, train, val, epochs=2, **RUN_KW)
    return _params(net), r.history


def _okdhp():
    from distill.strategies.online import MultiBranchNet, fit_okdhp

    x, _, _, _ = _digits()
    maps = torch.cat([F.avg_pool2d(x, 3, stride=1, padding=1), x.pow(2)], dim=1)  # two target maps per image
    torch.manual_seed(0)
    net = MultiBranchNet(nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()),
                         [nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 1)) for _ in range(2)],
                         # the FAU's branch weights (B, M=2, C=2), without the default unit's BatchNorm
                         fau=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
                                           nn.Unflatten(1, (2, 2)), nn.Softmax(dim=1)))
    r = fit_okdhp(net, InMemoryLoader(x, maps, 32, seed=1), InMemoryLoader(x[:32], maps[:32], 32, shuffle=False),
                  epochs=2, optimizer="adam", lr=1e-2, rampup_epochs=1, progress=False, device="cpu", seed=0)
    return _params(net), r.history


def _co_training():
    from distill.strategies.transfer import fit_co_training

    x, y, xv, yv = _digits()
    r = fit_co_training(_mlp, InMemoryLoader(x[:40], y[:40], 16, seed=1), InMemoryLoader(xv, yv, 64, shuffle=False),
                        unlabeled=x[40:], epochs=1, rounds=2, pool_size=20, **RUN_KW)
    return _params(*r.models), r.history


def _mean_teacher():
    fit_mean_teacher = strategy_info("mean_teacher").fn
    x, y, xv, yv = _digits()
    torch.manual_seed(0)
    student = _mlp()
    r = fit_mean_teacher(student, InMemoryLoader(x[:40], y[:40], 16, seed=1), InMemoryLoader(xv, yv, 64, shuffle=False),
                         unlabeled_loader=InMemoryLoader(x[40:], None, 16, seed=2), epochs=2, input_noise=0.1,
                         consistency=1.0, **RUN_KW)
    return _params(student), r.history


def _data_distillation():
    from distill.strategies.transfer import fit_data_distillation

    x, y, xv, yv = _digits()
    torch.manual_seed(0)
    student, teacher = _mlp(), _mlp()
    r = fit_data_distillation(student, InMemoryLoader(x[:40], y[:40], 16, seed=1),
                              InMemoryLoader(xv, yv, 64, shuffle=False), unlabeled=x[40:], teacher=teacher, epochs=1,
                              teacher_epochs=1, **RUN_KW)
    return _params(student, teacher), r.history


def _model_compression():
    from distill.strategies.transfer import fit_model_compression

    torch.manual_seed(0)
    student, teacher = _mlp(), _mlp()
    train, val = _loaders()
    r = fit_model_compression(student, train, val, teacher=teacher, epochs=1, multiplier=2, **RUN_KW)
    return _params(student), r.history


def _takd():
    fit_takd = strategy_info("takd").fn
    torch.manual_seed(0)
    teacher = _mlp()
    train, val = _loaders()
    r = fit_takd(_mlp, train, val, teacher=teacher, assistants=["mlp_digits_student"], epochs=1, **RUN_KW)
    return _params(*r.models), r.history


def _born_again():
    fit_born_again = strategy_info("born_again").fn
    train, val = _loaders()
    r = fit_born_again(_mlp, train, val, generations=2, epochs=1, **RUN_KW)
    return _params(*r.models), r.history


def _knowledge_condensation():
    """KCD's condensed sets (not a registered strategy, ``fit_condensed``): the ranks keep one KCD
    record, so every rank condenses to the set one process would."""
    from distill import Distiller
    from distill.methods.condensation import KCD
    from distill.strategies.condense import fit_condensed

    x, y, xv, yv = _digits()
    torch.manual_seed(0)
    student, teacher = _mlp(), _mlp()
    d = Distiller(student, teacher, {"ce": 0.1, "kcd": KCD(T=4.0, weight=0.9)})
    r = fit_condensed(d, (x, y), InMemoryLoader(xv, yv, 64, shuffle=False), epochs=3, condense_every=1,
                      keep_ratio=0.6, batch_size=32, **RUN_KW)
    return [*_params(student), r.keep_index.float()], r.history


EQUIVALENT = {"dml": _dml, "okddip": _okddip, "rocket_launching": _rocket, "okdhp": _okdhp,
              "co_training": _co_training, "mean_teacher": _mean_teacher, "data_distillation": _data_distillation,
              "model_compression": _model_compression, "takd": _takd, "born_again": _born_again,
              "knowledge_condensation": _knowledge_condensation}


def _recipes() -> dict[str, dict]:
    """The recipe of every strategy that tests/test_strategy_recipes.py runs in one process."""
    spec = importlib.util.spec_from_file_location("strategy_recipes", HERE / "test_strategy_recipes.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return {name: module._recipe(name) for name in module.RUNNABLE if name not in NOT_RUN}


# --------------------------------------------------------------------------------------------
# The torchrun worker
# --------------------------------------------------------------------------------------------


def _worker(out: Path) -> None:
    from distill.recipes import parse_recipe
    from distill.runner import run_recipe

    rank = int(os.environ["RANK"])
    saved: dict = {"equivalent": {}, "recipes": {}}
    for name, case in EQUIVALENT.items():
        torch.manual_seed(0)  # a strategy that calls the factory itself draws from the global stream
        params, history = case()
        saved["equivalent"][name] = {"params": params, "history": history}
    for name, recipe in _recipes().items():
        dirs = run_recipe(parse_recipe(recipe), out_dir=out / "recipes", progress=False)
        saved["recipes"][name] = [str(d) for d in dirs]
    torch.save(saved, out / f"strategies_rank{rank}.pt")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun_strategies")
    _launch("strategies", out, script=__file__)
    return out, [torch.load(out / f"strategies_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_strategy_under_torchrun_matches_one_process(launched, name):
    _, ranks = launched
    torch.manual_seed(0)
    one_params, one_history = EQUIVALENT[name]()
    for rank in ranks:
        got = rank["equivalent"][name]
        assert len(got["params"]) == len(one_params)
        for a, b in zip(got["params"], one_params):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        losses = [row["train_loss"] for row in got["history"] if "train_loss" in row]
        expected = [row["train_loss"] for row in one_history if "train_loss" in row]
        assert losses == pytest.approx(expected, rel=1e-4, abs=1e-6)
    for a, b in zip(ranks[0]["equivalent"][name]["params"], ranks[1]["equivalent"][name]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the ranks hold one model


def test_every_strategy_runs_from_a_recipe_under_torchrun(launched):
    out, ranks = launched
    names = set(_recipes())
    assert names | set(NOT_RUN) == {i.name for i in list_strategies()}
    for name in sorted(names):
        dirs = ranks[0]["recipes"][name]
        assert dirs == ranks[1]["recipes"][name]
        summary = json.loads((Path(dirs[0]) / "summary.json").read_text())
        assert summary["strategy"] == name
        metrics = Path(dirs[0]) / "metrics.jsonl"
        if metrics.is_file():  # a run's epochs are logged once, not once per rank
            epochs = [json.loads(line).get("epoch", json.loads(line).get("round")) for line in
                      metrics.read_text().splitlines()]
            assert len(epochs) == len(set(epochs)), f"{name}: {epochs}"
    assert (out / "recipes").is_dir()


if __name__ == "__main__":  # a torchrun worker
    torch.set_num_threads(1)
    _worker(Path(sys.argv[2]))


# --------------------------------------------------------------------------------------------
# The pieces, in one process
# --------------------------------------------------------------------------------------------


def test_batch_parts_make_up_the_batch():
    from distill.batch import Batch
    from distill.strategies.mean_teacher import TwoViewBatch

    b = TwoViewBatch(torch.arange(10.0).view(5, 2), torch.arange(5), teacher_inputs=-torch.arange(10.0).view(5, 2))
    parts = [b.part(r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [3, 2]  # tensor_split: the first ranks take the extra sample
    torch.testing.assert_close(torch.cat([p.inputs for p in parts]), b.inputs)
    torch.testing.assert_close(torch.cat([p.teacher_inputs for p in parts]), b.teacher_inputs)
    assert torch.cat([p.targets for p in parts]).tolist() == list(range(5))
    assert parts[1].index is None
    with pytest.raises(ValueError, match="a batch of 1 samples cannot be split over 2 processes"):
        Batch(torch.zeros(1, 2)).part(0, 2)


def test_global_batch_loaders_yield_their_part():
    from distill.strategies.mean_teacher import MeanTeacherLoader

    x, y, _, _ = _digits()
    loader = MeanTeacherLoader(InMemoryLoader(x[:20], y[:20], 8, seed=1), InMemoryLoader(x[20:60], None, 8, seed=2),
                               input_noise=0.1, seed=3)
    whole = list(loader)
    halves = []
    for rank in range(2):
        loader.set_shard(rank, 2)
        halves.append(list(loader))
    loader.set_shard(0, 1)
    assert len(halves[0]) == len(halves[1]) == len(whole) == len(loader)
    for full, a, b in zip(whole, *halves):
        torch.testing.assert_close(torch.cat([a.inputs, b.inputs]), full.inputs)
        torch.testing.assert_close(torch.cat([a.teacher_inputs, b.teacher_inputs]), full.teacher_inputs)
        assert torch.cat([a.targets, b.targets]).tolist() == full.targets.tolist()
    with pytest.raises(ValueError, match="split must be one of \\('batch',\\)"):
        loader.set_shard(0, 2, "samples")
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        loader.set_shard(2, 2)


def test_wrappers_shard_the_loader_they_wrap():
    from distill.strategies.self_distill import LastBatchLoader, RotationLoader

    x, y, _, _ = _digits()
    inner = InMemoryLoader(x[:40], y[:40], 8, seed=1, return_index=True)
    rotations = RotationLoader(inner)
    rotations.set_shard(1, 2)
    assert (inner.rank, inner.world_size) == (1, 2)
    assert all(len(b) == 4 * 4 for b in rotations)  # each rank rotates its 4 of the 8 samples
    rotations.set_shard(0, 1)
    with pytest.raises(ValueError, match="LastBatchLoader cannot be sharded.*list"):
        LastBatchLoader([(x[:4], y[:4])]).set_shard(0, 2)


def test_average_gradients_alone_is_a_no_op():
    from distill.train import distributed as D

    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert D.average_gradients([p]) is False
    assert D.average_gradients([p], torch.tensor(True)) is True
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
