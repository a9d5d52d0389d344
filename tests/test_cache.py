"""Teacher-output cache: round trips, top-k reconstruction, replayable augmentation, fingerprints,
corruption, cached == live training, recipes and the CLI.

Everything runs on tiny tensors or the embedded digits data (no download)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.cache import (
    CachedTeacher,
    CacheError,
    CacheMismatchError,
    build_cache,
    data_fingerprint,
    open_cache,
    replay_views,
    teacher_fingerprint,
)
from distill.data import (
    Compose,
    InMemoryLoader,
    RandomCropPad,
    RandomHorizontalFlip,
    get_dataset,
)
from distill.data.augment import Mixup, SampleKeys
from distill.models import create
from distill.cache import list_teacher_sources
from distill.teachers import FrozenTeacher


class Lookup(nn.Module):
    """A 'teacher' whose logits for an image are row ``x[0, 2, 2]`` of a fixed table: the centre
    pixel encodes the sample, and survives crops of padding 1 on 5x5 images."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.stage = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stage(x[:, :, 1:4, 1:4])
        return self.table[x[:, 0, 2, 2].long()]


def lookup_data(n: int = 20, k: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Lookup]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 5, 5, generator=g)
    x[:, 0, 2, 2] = torch.arange(n, dtype=torch.float32)
    return x, torch.arange(n) % k, Lookup(3 * torch.randn(n, k, generator=g))


def digits(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    train = get_dataset("digits")
    return train.inputs[:n].contiguous(), train.targets[:n].contiguous()


AUG = Compose([RandomCropPad(1), RandomHorizontalFlip()])


# ------------------------------------------------------------------------------- round trips


def test_dense_round_trip_fp32_exact_fp16_rounded(tmp_path: Path) -> None:
    x, y, teacher = lookup_data()
    idx = torch.tensor([3, 0, 19, 7, 7])
    c32 = build_cache(teacher, x, tmp_path / "fp32", targets=y, batch_size=6)
    assert torch.equal(c32.view(0, idx)["logits"], teacher.table[idx])
    c16 = build_cache(teacher, x, tmp_path / "fp16", targets=y, dtype="fp16", taps=["stage"])
    got = c16.view(0, idx, taps=["stage"])
    assert torch.equal(got["logits"], teacher.table[idx].half().float())
    assert torch.equal(got["stage"], x[idx][:, :, 1:4, 1:4].half().float())
    assert c16.read(0, idx, ["logits"])["logits"].dtype == torch.float16
    assert c32.views == "plain" and c32.epochs is None and c32.num_classes == 7 and c32.num_samples == 20


def test_topk_round_trip_keeps_topk_probs_and_spreads_the_tail_mass(tmp_path: Path) -> None:
    x, _, teacher = lookup_data()
    T, k = 2.0, 3
    cache = build_cache(teacher, x, tmp_path / "c", topk=k, temperature=T)
    idx = torch.arange(20)
    logits = cache.view(0, idx)["logits"]
    for i in range(20):  # worked out per sample in float64, with explicit loops
        z = teacher.table[i].double().tolist()
        top = sorted(range(7), key=lambda j: -z[j])[:k]
        denom = sum(math.exp(v / T) for v in z)
        p_true = [math.exp(v / T) / denom for v in z]
        tail_mass = sum(p_true[j] for j in range(7) if j not in top)
        p = F.softmax(logits[i].double() / T, dim=0).tolist()
        for j in range(7):
            expected = p_true[j] if j in top else tail_mass / (7 - k)
            assert p[j] == pytest.approx(expected, rel=1e-5), (i, j)
        for j in top:  # the top-k logits themselves are stored as they are
            assert float(logits[i, j]) == float(teacher.table[i, j])


def test_topk_equal_to_num_classes_reproduces_live_kd_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = create("cnn_digits_teacher").eval()
    x, y = digits(64)
    cache = build_cache(teacher, x, tmp_path / "c", topk=10, batch_size=64)  # one chunk: the live batch
    batch = Batch(x, y, torch.arange(64))
    cached = CachedTeacher(cache, teacher=teacher)
    assert torch.equal(cached(batch)["logits"], FrozenTeacher(teacher)(batch)["logits"])
    student = torch.randn(64, 10)
    for T in (1.0, 4.0):  # exact at any temperature
        live = DF.kd_loss(student, teacher(x), T)
        assert torch.equal(DF.kd_loss(student, cached(batch)["logits"], T), live)
    assert "fill" not in cache.manifest["arrays"]


# ------------------------------------------------------------------------------- augmentation


def test_replayed_augmentation_equals_live_augmentation_bit_for_bit() -> None:
    x = torch.randn(45, 3, 8, 8)
    loader = InMemoryLoader(x, None, batch_size=8, augment=AUG, seed=11, augment_seed=4, return_index=True)
    for epoch in (0, 3):
        loader.set_epoch(epoch)
        for batch in loader:
            assert torch.equal(replay_views(x, batch.index, epoch, AUG, 4), batch.inputs)
            one = batch.index[2:3]  # one sample alone: its view does not depend on its batch
            assert torch.equal(replay_views(x, one, epoch, AUG, 4), batch.inputs[2:3])
    params = AUG.params_for(SampleKeys.of(4, 3, torch.arange(45)))
    assert params[0].shape == (45, 2) and params[1].dtype == torch.bool


def test_augmented_cache_holds_one_view_per_epoch(tmp_path: Path) -> None:
    x, _, teacher = lookup_data()
    cache = build_cache(teacher, x, tmp_path / "c", augment=AUG, epochs=3, augment_seed=5, taps=["stage"])
    assert cache.views == "augmented" and cache.epochs == 3 and cache.augment_seed == 5
    idx = torch.tensor([1, 2, 3])
    for epoch in range(3):  # the tapped centre crop follows the view of that epoch
        views = replay_views(x, idx, epoch, AUG, 5)
        assert torch.equal(cache.view(epoch, idx, taps=["stage"])["stage"], views[:, :, 1:4, 1:4])
    assert not torch.equal(cache.view(0, idx, taps=["stage"])["stage"], cache.view(1, idx, taps=["stage"])["stage"])
    with pytest.raises(CacheError, match="epochs 0..2, but epoch 3"):
        cache.view(3, idx)


# ------------------------------------------------------------------------------- mismatches


def test_fingerprint_mismatches_name_what_differs(tmp_path: Path) -> None:
    x, y = digits(64)
    torch.manual_seed(0)
    teacher = create("cnn_digits_teacher")
    cache = build_cache(teacher, x, tmp_path / "c", targets=y, augment=AUG, epochs=1, augment_seed=2)
    assert teacher_fingerprint(teacher) == teacher_fingerprint(FrozenTeacher(teacher))
    assert data_fingerprint(x) == cache.manifest["data"]["fingerprint"]
    assert data_fingerprint(y) == cache.manifest["data"]["targets"]
    cache.check(teacher=teacher, inputs=x, targets=y, augment=AUG, augment_seed=2)  # all equal: no error

    other = create("cnn_digits_teacher")
    with pytest.raises(CacheMismatchError, match="teacher: the cache was built from CNN"):
        cache.check(teacher=other)
    with pytest.raises(CacheMismatchError, match="teacher"):
        CachedTeacher(cache, teacher=other)
    with pytest.raises(CacheMismatchError, match="teacher"):
        cache.check(teacher=FrozenTeacher(copy.deepcopy(teacher), dtype=torch.bfloat16))  # same weights, in bf16
    x2 = x.clone()
    x2[5, 0, 3, 3] += 1e-3
    with pytest.raises(CacheMismatchError, match="data: the cache was built from 64 samples"):
        cache.check(inputs=x2, targets=y)
    with pytest.raises(CacheMismatchError, match="data: the labels differ"):
        cache.check(inputs=x, targets=(y + 1) % 10)
    with pytest.raises(CacheMismatchError, match="augmentation: the loader draws augment seed 3 instead of 2"):
        cache.check(augment=AUG, augment_seed=3)
    with pytest.raises(CacheMismatchError, match="augmentation: the loader draws transforms"):
        cache.check(augment=Compose([RandomCropPad(2), RandomHorizontalFlip()]), augment_seed=2)
    with pytest.raises(CacheMismatchError, match="the data given is not augmented"):
        cache.check(augment=None)
    with pytest.raises(CacheMismatchError) as info:  # every difference in one message
        cache.check(teacher=other, inputs=x2, targets=y, augment=AUG, augment_seed=0)
    assert all(w in str(info.value) for w in ("teacher:", "data:", "augmentation:"))

    loader = InMemoryLoader(x2, y, batch_size=16, augment=AUG, return_index=True)
    with pytest.raises(CacheMismatchError, match="data"):
        CachedTeacher(cache).prepare_loader(loader)


def test_reads_check_the_inputs_they_serve(tmp_path: Path) -> None:
    x, y = digits(64)
    teacher = create("cnn_digits_teacher")
    cached = CachedTeacher(build_cache(teacher, x, tmp_path / "c", augment=AUG, epochs=2), teacher=teacher)
    loader = InMemoryLoader(x, y, batch_size=16, augment=AUG, seed=7, return_index=True)
    cached.prepare_loader(loader)  # takes the cache's augmentation seed
    assert loader.augment_seed == 0 and loader.seed == 7
    for epoch in range(2):
        loader.set_epoch(epoch)
        cached.on_epoch_start(epoch)
        for batch in loader:
            cached(batch)  # every row matches its view
    loader.set_epoch(0)  # the teacher still reads epoch 1
    with pytest.raises(CacheMismatchError, match="for epoch 1.*distiller.set_epoch"):
        cached(next(iter(loader)))
    val = get_dataset("digits", split="val")
    with pytest.raises(CacheMismatchError, match="are not the views"):  # evaluation batches with indices
        cached(Batch(val.inputs[:8], None, torch.arange(8)))
    live = cached(Batch(val.inputs[:8]))  # without indices: the live teacher
    assert torch.equal(live["logits"], teacher(val.inputs[:8]))
    with pytest.raises(ValueError, match="reads rows by sample index"):
        CachedTeacher(cached.cache)(Batch(val.inputs[:8]))
    with pytest.raises(IndexError, match=r"\[64\] are outside the cache's 64 samples"):
        cached.cache.read(0, torch.tensor([64]))
    with pytest.raises(CacheError, match="epoch 2 was asked for"):
        cached.on_epoch_start(2)


def test_missing_taps_are_named(tmp_path: Path) -> None:
    x, y = digits(32)
    teacher = create("cnn_digits_teacher")
    student = create("cnn_digits_student")
    plain = CachedTeacher(build_cache(teacher, x, tmp_path / "c"))
    fitnet = distill.methods.create_method("fitnet", student_tap="stage2", teacher_tap="stage2")
    with pytest.raises(ValueError, match=r"holds taps none, but methods need \['stage2'\]"):
        distill.Distiller(student, plain, losses={"ce": 1.0, "fitnet": fitnet})
    with_taps = CachedTeacher(build_cache(teacher, x, tmp_path / "t", taps=["stage2"]), teacher=teacher)
    d = distill.Distiller(student, with_taps, losses={"ce": 1.0, "fitnet": fitnet})
    out = d.prepare(Batch(x, y, torch.arange(32)))(Batch(x, y, torch.arange(32)))
    assert torch.isfinite(out.total)


def test_build_rejects_bad_arguments(tmp_path: Path) -> None:
    x, _, teacher = lookup_data()
    with pytest.raises(ValueError, match="topk=8 exceeds the teacher's 7 classes"):
        build_cache(teacher, x, tmp_path / "a", topk=8)
    with pytest.raises(ValueError, match="dtype must be 'fp16' or 'fp32'; got 'bf16'"):
        build_cache(teacher, x, tmp_path / "a", dtype="bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epochs=3 counts augmented views, but augment is None"):
        build_cache(teacher, x, tmp_path / "a", epochs=3)

    class BatchOnly(RandomHorizontalFlip):
        params_for = distill.data.Augment.params_for

    with pytest.raises(ValueError, match="cannot be replayed per sample"):
        build_cache(teacher, x, tmp_path / "a", augment=BatchOnly())
    build_cache(teacher, x, tmp_path / "b")
    with pytest.raises(FileExistsError, match="already exists"):
        build_cache(teacher, x, tmp_path / "b")
    build_cache(teacher, x, tmp_path / "b", topk=2, overwrite=True)
    assert open_cache(tmp_path / "b").topk == 2


# ------------------------------------------------------------------------------- corruption


def test_truncated_corrupted_and_unfinished_caches_are_detected(tmp_path: Path) -> None:
    x, _, teacher = lookup_data()
    path = tmp_path / "c"
    build_cache(teacher, x, path, augment=AUG, epochs=2)
    data = path / "data.bin"
    good = data.read_bytes()

    data.write_bytes(good[:-1])
    with pytest.raises(CacheError, match="is truncated: data.bin has"):
        open_cache(path)
    with pytest.raises(CacheError, match="truncated"):
        open_cache(path, verify="lazy")  # the size is checked whatever the policy
    data.write_bytes(good + b"\0")
    with pytest.raises(CacheError, match="longer than its manifest"):
        open_cache(path)

    bad = bytearray(good)
    bad[len(good) - 100] ^= 0xFF  # one byte of the last epoch's block
    data.write_bytes(bytes(bad))
    with pytest.raises(CacheError, match="corrupted: the checksum of epoch 1"):
        open_cache(path)
    lazy = CachedTeacher(path, verify="lazy")  # opens; epoch 0 is fine, epoch 1 fails before any read
    lazy.on_epoch_start(0)
    lazy.cache.view(0, torch.arange(3))
    with pytest.raises(CacheError, match="corrupted"):
        lazy.on_epoch_start(1)
    with pytest.raises(CacheError, match="corrupted"):
        lazy.cache.view(1, torch.arange(3))

    data.write_bytes(good)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        open_cache(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(CacheError, match="format 'other/9'"):
        open_cache(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CacheError, match="unfinished"):
        open_cache(path)
    with pytest.raises(FileNotFoundError, match="no teacher cache at"):
        open_cache(tmp_path / "nowhere")


# ------------------------------------------------------------------------------- training


@pytest.mark.parametrize("aug", [AUG, Compose([*AUG.transforms, Mixup(1.0)])], ids=["crop_flip", "mixup"])
def test_cached_teacher_training_equals_live_teacher_training(tmp_path: Path, aug: Compose) -> None:
    x, y = digits(128)
    val = get_dataset("digits", split="val")
    torch.manual_seed(1)
    teacher = create("cnn_digits_teacher").eval()
    torch.manual_seed(2)
    init = create("cnn_digits_student").state_dict()
    cache = build_cache(teacher, x, tmp_path / "c", targets=y, augment=aug, epochs=3, augment_seed=0)

    def run(source: Any) -> tuple[nn.Module, Any]:
        student = create("cnn_digits_student")
        student.load_state_dict(init)
        loader = InMemoryLoader(x, y, batch_size=32, augment=aug, seed=0, return_index=True)
        val_loader = InMemoryLoader(val.inputs, val.targets, batch_size=256, shuffle=False)
        if isinstance(source, CachedTeacher):
            source.prepare_loader(loader)
        d = distill.Distiller(student, source, losses={"ce": 1.0, "kd": distill.methods.KD(T=4.0)})
        result = distill.fit(d, loader, val_loader, epochs=3, lr=0.05, schedule="cosine", progress=False,
                             device="cpu", seed=0)
        return student, result

    live_student, live = run(FrozenTeacher(teacher))
    cached_student, cached = run(CachedTeacher(cache, teacher=teacher))
    for (name, a), b in zip(live_student.state_dict().items(), cached_student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert cached.last_acc == pytest.approx(live.last_acc, abs=0.5)  # one of 450 images at most
    for a, b in zip(live.history, cached.history):
        assert b["train_kd"] == pytest.approx(a["train_kd"], rel=1e-4)
        assert b["val_teacher_acc"] == a["val_teacher_acc"]  # evaluation uses the live teacher


# ------------------------------------------------------------------------------- recipes and CLI


def tiny_recipe(tmp_path: Path, **teacher: Any) -> dict[str, Any]:
    train = {"epochs": 2, "optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "device": "cpu"}
    return {
        "name": "cache_kd", "seeds": [0],
        "data": {"name": "digits", "val_split": "val", "train_subset": 64, "batch_size": 32,
                 "augment": {"crop_padding": 1}},
        "student": {"name": "cnn_digits_student"},
        "teacher": {"model": {"name": "cnn_digits_teacher"}, "train": {**train, "epochs": 1}, **teacher},
        "losses": {"ce": 1.0, "kd": {"T": 4.0}},
        "train": train,
        "output_dir": str(tmp_path / "runs"),
    }


def test_recipe_cache_key_validates() -> None:
    from distill.recipes import RecipeError, parse_recipe

    r = parse_recipe(tiny_recipe(Path("x"), cache="some/path"))
    assert r.teacher is not None and r.teacher.cache is not None
    assert r.teacher.cache.path == "some/path" and r.teacher.cache.dtype == "fp32" and r.teacher.cache.topk is None
    with pytest.raises(RecipeError, match=r"teacher.cache.topk: Input should be greater than 0 \(got 0\)"):
        parse_recipe(tiny_recipe(Path("x"), cache={"path": "p", "topk": 0}))
    with pytest.raises(RecipeError, match="teacher.cache.views"):
        parse_recipe(tiny_recipe(Path("x"), cache={"path": "p", "views": "some"}))
    with pytest.raises(RecipeError, match="teacher.cache.colour: unknown key"):
        parse_recipe(tiny_recipe(Path("x"), cache={"path": "p", "colour": 1}))


def test_cli_cache_build_and_info_then_a_run_that_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from distill import cache as cache_module
    from distill.cli import main
    from distill.recipes import load_recipe
    from distill.runner import run_recipe

    monkeypatch.chdir(tmp_path)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    assert main(["cache", "build", str(recipe_file), "--out", "kd_cache", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "64 samples x 10 classes; dense logits; fp32" in out and "augmented views of 2 epoch(s)" in out
    assert (tmp_path / "runs" / "cache_kd" / "teacher" / "model.safetensors").is_file()  # the in-run teacher, trained once
    assert main(["cache", "info", "kd_cache"]) == 0
    assert "checksums: ok" in capsys.readouterr().out
    assert main(["cache", "build", str(recipe_file), "--out", "kd_cache"]) == 2
    assert "already exists" in " ".join(capsys.readouterr().err.split())

    def no_build(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(cache_module, "build_cache", no_build)
    data = tiny_recipe(tmp_path, cache="kd_cache")
    recipe_file.write_text(yaml.safe_dump(data))
    dirs = run_recipe(load_recipe(recipe_file), progress=False)
    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert summary["teacher_acc"] is not None and 0 <= summary["last_acc"] <= 100

    longer = {**data, "train": {**data["train"], "epochs": 3}}
    recipe_file.write_text(yaml.safe_dump(longer))
    with pytest.raises(ValueError, match="covers 2 epoch.*trains 3"):
        run_recipe(load_recipe(recipe_file), progress=False, overwrite=True)
    # the same teacher (its checkpoint), other augmentation
    checkpoint = {"name": "cnn_digits_teacher", "checkpoint": str(tmp_path / "runs" / "cache_kd" / "teacher" / "model.safetensors")}
    other_aug = {**data, "data": {**data["data"], "augment": {"crop_padding": 1, "flip": True}},
                 "teacher": {"model": checkpoint, "cache": "kd_cache"}}
    recipe_file.write_text(yaml.safe_dump(other_aug))
    with pytest.raises(CacheMismatchError, match="augmentation: the loader draws transforms"):
        run_recipe(load_recipe(recipe_file), progress=False, overwrite=True)
    # an in-run teacher trained again (its settings changed with the data) is another teacher
    recipe_file.write_text(yaml.safe_dump({**other_aug, "teacher": data["teacher"]}))
    with pytest.raises(CacheMismatchError, match="teacher: the cache was built from CNN"):
        run_recipe(load_recipe(recipe_file), progress=False, overwrite=True)


def test_cli_cache_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distill.cli import main

    recipe = tiny_recipe(tmp_path)
    del recipe["teacher"]
    recipe["kind"] = "train"
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["cache", "build", str(tmp_path / "t.yaml")]) == 2
    assert "has no teacher" in " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert main(["cache", "info", str(tmp_path / "none")]) == 2
    assert "no teacher cache at" in " ".join(capsys.readouterr().err.split())


def test_cached_is_a_listed_teacher_source() -> None:
    sources = {s["name"]: s for s in list_teacher_sources()}
    assert sources["cached"]["cls"] is CachedTeacher
    assert [p.arxiv for p in sources["cached"]["papers"]] == ["2112.01528", "2207.10666"]
