"""Replayable mixup (Zhang et al., ICLR 2018, arXiv 1710.09412): per-sample partners and λ from
(seed, epoch, index), mixed views built by the loader, the mixed label loss, the cache, recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distill
from distill.batch import Batch
from distill.cache import CachedTeacher, CacheMismatchError, build_cache, replay_views
from distill.data import Compose, InMemoryLoader, RandomCropPad, RandomHorizontalFlip
from distill.data.augment import (
    Mixup,
    MixupParams,
    SampleKeys,
    augmented_views,
    beta_draw,
    split_mixup,
)

CROP_FLIP = [RandomCropPad(2), RandomHorizontalFlip()]
AUG = Compose([*CROP_FLIP, Mixup(1.0)])


def data(n: int = 23, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, k, (n,), generator=g)


def by_sample(batches: list[Batch], n: int) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """Each sample's (view, partner label, λ), keyed by its index in the data set."""
    out = {}
    for b in batches:
        for row, i in enumerate(b.index.tolist()):
            assert i not in out or torch.equal(out[i][0], b.inputs[row])  # a padded repeat sees the same view
            out[i] = (b.inputs[row], b.mix_targets[row], float(b.mix_lam[row]))
    assert sorted(out) == list(range(n))
    return out


# ------------------------------------------------------------------------------- replay


def test_mixup_views_replay_bit_for_bit_alone_in_any_batch_and_under_shards() -> None:
    x, y = data()
    n = len(x)

    def epoch_views(epoch: int, **kw) -> tuple[InMemoryLoader, list[Batch]]:
        loader = InMemoryLoader(x, y, batch_size=kw.pop("batch_size", 8), augment=AUG, return_index=True, **kw)
        loader.set_epoch(epoch)
        return loader, list(loader)

    loader, batches = epoch_views(2)
    live = by_sample(batches, n)
    for b in batches:
        params = loader.augment_params(b.index)
        mix = params[-1]
        assert isinstance(mix, MixupParams) and mix.partner.dtype == torch.int64 and mix.lam.dtype == torch.float64
        assert torch.equal(b.mix_targets, y[mix.partner]) and torch.equal(b.mix_lam, mix.lam.float())
        assert torch.equal(loader.views(b.index).inputs, b.inputs)
        for row, i in enumerate(b.index.tolist()):  # one sample replayed alone
            one = torch.tensor([i])
            alone, alone_mix = augmented_views(x, one, 2, AUG, loader.augment_seed)
            assert torch.equal(alone[0], b.inputs[row])
            assert int(alone_mix.partner) == int(mix.partner[row]) and float(alone_mix.lam) == float(mix.lam[row])
            assert torch.equal(replay_views(x, one, 2, AUG, loader.augment_seed)[0], b.inputs[row])
    # another batch size and order seed (same augment seed) see the same views, labels and λ
    for kw in ({"batch_size": 5}, {"seed": 7, "augment_seed": 0}, {"shuffle": False}):
        other = by_sample(epoch_views(2, **kw)[1], n)
        for i in range(n):
            assert torch.equal(other[i][0], live[i][0]) and other[i][1:] == live[i][1:]
    # two shards, both schemes: every sample's view is the single-process one
    for split in ("batch", "samples"):
        sharded: list[Batch] = []
        for rank in range(2):
            shard = InMemoryLoader(x, y, batch_size=8, augment=AUG, return_index=True)
            shard.set_shard(rank, 2, split)
            shard.set_epoch(2)
            sharded += list(shard)
        for i, (view, partner_label, lam) in by_sample(sharded, n).items():
            assert torch.equal(view, live[i][0]) and (partner_label, lam) == live[i][1:]
    # epochs differ
    assert any(not torch.equal(by_sample(epoch_views(3)[1], n)[i][0], live[i][0]) for i in range(n))


def test_mixed_input_equals_lambda_xi_plus_one_minus_lambda_xj_by_hand() -> None:
    x, y = data(n=9)
    seed, epoch, p = 3, 1, 2

    def crop_flip_by_hand(i: int) -> torch.Tensor:  # sample i's own crop and flip, with explicit slicing
        keys = SampleKeys.of(seed, epoch, [i], num_samples=len(x))
        offsets, flip = AUG.params_for(keys)[:2]
        r, c = offsets[0].tolist()
        padded = F.pad(x[i], (p, p, p, p))
        view = padded[:, r:r + 6, c:c + 6]
        return view.flip(-1) if bool(flip[0]) else view

    loader = InMemoryLoader(x, y, batch_size=4, augment=AUG, augment_seed=seed, return_index=True)
    loader.set_epoch(epoch)
    seen = 0
    for b in loader:
        for row, i in enumerate(b.index.tolist()):
            mix = AUG.params_for(SampleKeys.of(seed, epoch, [i], num_samples=len(x)))[-1]
            j, lam = int(mix.partner[0]), float(mix.lam[0])
            lam32 = torch.tensor(lam, dtype=torch.float32)
            expected = lam32 * crop_flip_by_hand(i) + (1 - lam32) * crop_flip_by_hand(j)
            torch.testing.assert_close(b.inputs[row], expected, rtol=0, atol=1e-6)
            assert int(b.mix_targets[row]) == int(y[j]) and 0.0 <= lam <= 1.0
            seen += 1
    assert seen == len(x)


def test_bare_mixup_and_p_and_the_base_draws_do_not_change() -> None:
    x, _ = data(n=40)
    keys = SampleKeys.of(0, 0, torch.arange(40), num_samples=40)
    # adding Mixup last never changes the crop and flip draws of the transforms before it
    before = Compose(CROP_FLIP).params_for(keys)
    after = AUG.params_for(keys)
    assert all(torch.equal(a, b) for a, b in zip(before, after[:2]))
    base, mixup = split_mixup(AUG)
    assert isinstance(mixup, Mixup) and [type(t) for t in base.transforms] == [RandomCropPad, RandomHorizontalFlip]
    assert split_mixup(Compose(CROP_FLIP))[1] is None
    # a bare Mixup mixes the raw inputs
    views, mix = augmented_views(x, torch.arange(40), 0, Mixup(0.4), seed=0)
    w = mix.lam.float()[:, None, None, None]
    torch.testing.assert_close(views, w * x + (1 - w) * x[mix.partner], rtol=0, atol=0)
    # p: a sample not mixed has λ = 1 and keeps its view exactly
    half = Mixup(1.0, p=0.5).params_for(SampleKeys.of(0, 0, torch.arange(4000), num_samples=4000))
    unmixed = half.lam == 1.0
    assert 0.45 < float(unmixed.double().mean()) < 0.55
    views, mix = augmented_views(x, torch.arange(40), 0, Mixup(1.0, p=0.5), seed=0)
    assert torch.equal(views[mix.lam == 1.0], x[mix.lam == 1.0])
    assert len(mix[torch.tensor([0, 3])]) == 2 and torch.equal(mix[3:5].lam, mix.lam[3:5])


# ------------------------------------------------------------------------------- λ and partners


def test_lambda_is_beta_alpha_alpha_and_partners_cover_the_data_set() -> None:
    keys = SampleKeys.of(5, 0, torch.arange(20000), num_samples=20000)
    for alpha in (1.0, 0.2, 3.0):
        lam = beta_draw(keys, alpha, alpha)
        var = 1.0 / (4.0 * (2.0 * alpha + 1.0))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
        assert lam.min() >= 0.0 and lam.max() <= 1.0
        assert abs(float(lam.mean()) - 0.5) < 0.01 and abs(float(lam.var()) - var) < 0.05 * var
    lam = Mixup(1.0).params_for(keys).lam  # Beta(1, 1) is uniform: each tenth holds about a tenth
    counts = torch.histc(lam.float(), bins=10, min=0.0, max=1.0)
    assert (counts - 2000).abs().max() < 200
    # a skewed Beta(a, b) through the same sampler: mean a / (a + b)
    assert abs(float(beta_draw(keys, 2.0, 0.5).mean()) - 0.8) < 0.01
    # partners: uniform over the whole data set, not the batch
    small = Mixup().params_for(SampleKeys.of(0, 0, torch.arange(3), num_samples=1000))
    assert small.partner.max() >= 3  # from outside the three samples asked for
    partners = torch.cat([Mixup().params_for(SampleKeys.of(0, e, torch.arange(50), num_samples=50)).partner
                          for e in range(40)])
    assert set(partners.tolist()) == set(range(50)) and (torch.bincount(partners) - 40).abs().max() < 25


def test_mixup_errors() -> None:
    x, _ = data(n=4)
    with pytest.raises(TypeError, match="cannot augment a batch alone"):
        Mixup()(x)
    with pytest.raises(TypeError, match="cannot augment a batch alone"):
        AUG.apply(x, AUG.params_for(SampleKeys.of(0, 0, torch.arange(4), num_samples=4)))
    with pytest.raises(ValueError, match="Compose item 0 is or holds a Mixup: Mixup must be the last"):
        Compose([Mixup(), RandomHorizontalFlip()])
    with pytest.raises(ValueError, match="Compose item 0 is or holds a Mixup"):
        Compose([Compose([Mixup()])])
    with pytest.raises(ValueError, match="alpha must be a finite number > 0.*got 0"):
        Mixup(0)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]; got 2"):
        Mixup(1.0, p=2)
    with pytest.raises(ValueError, match="keys do not say its size"):
        Mixup().params_for(SampleKeys.of(0, 0, [1]))
    with pytest.raises(ValueError, match="sample index 4 is outside the data set of 4"):
        SampleKeys.of(0, 0, [4], num_samples=4)
    with pytest.raises(TypeError, match="Mixup needs floating-point inputs"):
        InMemoryLoader(torch.zeros(4, 1, 3, 3, dtype=torch.uint8), None, 2, augment=Mixup())
    assert Mixup(0.4, p=0.5).spec() == {"type": "Mixup", "alpha": 0.4, "p": 0.5}


# ------------------------------------------------------------------------------- the loss


def test_ce_and_label_smoothing_with_mixing_equal_the_hand_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    yj = torch.tensor([3, 1, 0, 0, 2, 2])
    lam = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.9, 0.3])
    batch = Batch(torch.zeros(6, 1), y, mix_targets=yj, mix_lam=lam)
    ce = distill.methods.create_method("ce")
    ls = distill.methods.create_method("label_smoothing", eps=0.2)

    def h(row: list[float], label: int, eps: float) -> float:  # CE against (1 - eps) one-hot + eps / K
        log_z = math.log(sum(math.exp(v) for v in row))
        return -sum(((1 - eps) * (k == label) + eps / 4) * (row[k] - log_z) for k in range(4))

    def hand(eps: float) -> float:
        total = 0.0
        for b, row in enumerate(logits.tolist()):
            total += float(lam[b]) * h(row, int(y[b]), eps) + (1 - float(lam[b])) * h(row, int(yj[b]), eps)
        return total / 6

    loss = ce({"logits": logits}, {}, batch)
    assert float(loss.detach()) == pytest.approx(hand(0.0), rel=1e-6)
    assert float(ls({"logits": logits}, {}, batch).detach()) == pytest.approx(hand(0.2), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # without the fields (or with λ = 1 everywhere) it is plain cross-entropy
    plain = Batch(torch.zeros(6, 1), y)
    assert float(ce({"logits": logits}, {}, plain).detach()) == pytest.approx(float(F.cross_entropy(logits.detach(), y)), rel=1e-6)
    ones = Batch(torch.zeros(6, 1), y, mix_targets=yj, mix_lam=torch.ones(6))
    assert float(ce({"logits": logits}, {}, ones).detach()) == pytest.approx(float(F.cross_entropy(logits.detach(), y)), rel=1e-6)
    moved = batch.to("cpu")
    assert torch.equal(moved.mix_targets, yj) and torch.equal(moved.mix_lam, lam)
    with pytest.raises(ValueError, match=r"lam of shape \(6,\)"):
        distill.functional.mixed_label_loss(logits, y, yj, lam[:3])


# ------------------------------------------------------------------------------- the cache


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_cache_stores_the_teacher_on_mixed_views_and_checks_alpha(tmp_path: Path) -> None:
    x, y = data()
    torch.manual_seed(0)
    teacher = Linear().eval()
    cache = build_cache(teacher, x, tmp_path / "c", targets=y, augment=AUG, epochs=2, augment_seed=4, batch_size=7)
    record = json.loads((tmp_path / "c" / "manifest.json").read_text())["augment"]
    assert record["spec"]["transforms"][-1] == {"type": "Mixup", "alpha": 1.0, "p": 1.0}
    cached = CachedTeacher(cache, teacher=teacher)
    loader = InMemoryLoader(x, y, batch_size=6, augment=AUG, seed=1, return_index=True)
    cached.prepare_loader(loader)
    for epoch in range(2):
        loader.set_epoch(epoch)
        cached.on_epoch_start(epoch)
        for b in loader:  # each read's input probe matches the mixed views
            with torch.no_grad():
                torch.testing.assert_close(cached(b)["logits"], teacher(b.inputs), rtol=1e-5, atol=1e-5)
    # the un-mixed view of the same sample is refused
    loader.set_epoch(0)
    cached.on_epoch_start(0)
    b = next(iter(loader))
    with pytest.raises(CacheMismatchError, match="not the views the teacher cache"):
        cached(Batch(replay_views(x, b.index, 0, Compose(CROP_FLIP), 4), b.targets, b.index))
    # another alpha (or p, or no mixup) is another augmentation
    for other in (Compose([*CROP_FLIP, Mixup(0.5)]), Compose([*CROP_FLIP, Mixup(1.0, p=0.5)]), Compose(CROP_FLIP)):
        with pytest.raises(CacheMismatchError, match="augmentation: the loader draws transforms"):
            cache.check(augment=other, augment_seed=4)
    cache.check(augment=Compose([RandomCropPad(2), RandomHorizontalFlip(), Mixup(1.0)]), augment_seed=4)


# ------------------------------------------------------------------------------- recipes


def test_recipe_with_mixup_alpha_runs_end_to_end_on_digits(tmp_path: Path) -> None:
    from distill.recipes import RecipeError, parse_recipe
    from distill.runner import build_data, run_recipe

    train = {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "schedule": "constant", "device": "cpu"}
    recipe = {
        "name": "mixup_kd", "seeds": [0],
        "data": {"name": "digits", "val_split": "val", "train_subset": 48, "batch_size": 16,
                 "augment": {"crop_padding": 1, "mixup_alpha": 0.4}},
        "student": {"name": "cnn_digits_student"},
        "teacher": {"model": {"name": "cnn_digits_teacher"}, "train": train,
                    "cache": {"path": str(tmp_path / "cache")}},
        "losses": {"ce": 1.0, "kd": {"T": 4.0}},
        "train": train,
        "output_dir": str(tmp_path / "runs"),
    }
    parsed = parse_recipe(recipe)
    loader = build_data(parsed.data)[0]
    assert isinstance(loader.augment.transforms[-1], Mixup) and loader.augment.transforms[-1].alpha == 0.4
    b = next(iter(loader))
    assert b.mix_targets is not None and b.mix_lam is not None and b.mix_lam.shape == (16,)
    dirs = run_recipe(parsed, progress=False)
    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert 0 <= summary["last_acc"] <= 100 and summary["teacher_acc"] is not None
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["augment"]["spec"]["transforms"][-1]["alpha"] == 0.4
    with pytest.raises(RecipeError, match="data.augment.mixup_alpha: Input should be greater than 0"):
        parse_recipe({**recipe, "data": {**recipe["data"], "augment": {"mixup_alpha": 0}}})
    plain = {**recipe, "teacher": {**recipe["teacher"], "cache": {"path": str(tmp_path / "plain"), "views": "plain"}}}
    with pytest.raises(RecipeError, match="views 'plain' stores the teacher's outputs on un-mixed inputs"):
        run_recipe(parse_recipe(plain), out_dir=tmp_path / "plain_runs", progress=False)


def test_batch_rebuilding_wrappers_keep_or_refuse_mixup():
    """Wrappers that rebuild batches keep the mixing fields (condensation, mean teacher) or refuse
    mixed batches (DLB's pairing, SLA's rotations), never silently drop the partner labels."""
    import torch

    from distill.batch import Batch
    from distill.strategies.self_distill import LastBatchLoader, RotationLoader

    mixed = Batch(torch.zeros(2, 1, 4, 4), torch.tensor([1, 2]), torch.tensor([0, 1]),
                  mix_targets=torch.tensor([2, 1]), mix_lam=torch.tensor([0.3, 0.7]))
    for wrapper in (LastBatchLoader([mixed, mixed]), RotationLoader([mixed])):
        with pytest.raises(ValueError, match="mixup"):
            list(wrapper)
