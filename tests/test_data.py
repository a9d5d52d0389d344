"""Data sources (IDX, MNIST, digits), the registry, the in-memory loader and augmentation."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.batch import Batch
from distill.data import (
    Augment,
    Compose,
    IDXFormatError,
    IndexedTensorDataset,
    InMemoryLoader,
    RandomCropPad,
    RandomHorizontalFlip,
    get_dataset,
    list_datasets,
    load_digits_split,
    load_mnist,
    read_idx,
)

MNIST_DIR = Path("/work/shared/data/mnist")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` in the IDX format: 0000, type byte, ndim byte, big-endian dims, big-endian data."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, IDX_CODES[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# ------------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trips(tmp_path, gz, dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((5, 3, 4)) * 50).astype(dtype)
    got = read_idx(write_idx(tmp_path / "a.idx", array, gz))
    assert tuple(got.shape) == (5, 3, 4)
    np.testing.assert_array_equal(got.numpy(), array)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    labels = np.arange(7, dtype=np.uint8)
    got = read_idx(write_idx(tmp_path / "labels-without-gz-suffix", labels, gz=True))
    assert got.tolist() == list(range(7))


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = idx_bytes(np.zeros((4, 2, 2), np.uint8))
    cases = {
        "truncated": good[:-3],
        "trailing": good + b"\x00",
        "magic": b"\x01\x02" + good[2:],
        "typecode": good[:2] + b"\x07" + good[3:],
        "header": good[:9],
        "empty": b"",
    }
    messages = {
        "truncated": "truncated",
        "trailing": "trailing bytes",
        "magic": "not an IDX file",
        "typecode": "unknown IDX type code 0x07",
        "header": "truncated header",
        "empty": "not an IDX file",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(IDXFormatError, match=messages[name]) as info:
            read_idx(path)
        assert str(path) in str(info.value)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(IDXFormatError, match="damaged gzip"):
        read_idx(broken_gz)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "does-not-exist")


def make_fake_mnist(
    root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, dotted: bool = False
) -> None:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    sep = "." if dotted else "-"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        suffix = ".gz" if gz else ""
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(root / f"{prefix}-images{sep}idx3-ubyte{suffix}", images, gz)
        write_idx(root / f"{prefix}-labels{sep}idx1-ubyte{suffix}", rng.integers(0, 10, n, dtype=np.uint8), gz)


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, False), (False, True)])
def test_load_mnist_on_fake_directory(tmp_path, gz, dotted):
    make_fake_mnist(tmp_path, gz=gz, dotted=dotted)
    x, y = load_mnist(tmp_path, "train")
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (12,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert load_mnist(tmp_path, "test")[0].shape == (5, 1, 28, 28)
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist(tmp_path, "val")


def test_load_mnist_mismatched_counts(tmp_path):
    make_fake_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(IDXFormatError, match="12 images but .* 3 labels"):
        load_mnist(tmp_path, "train")


def test_missing_directory_and_files_name_path_and_remedy(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(missing)
    assert str(missing) in str(info.value) and "train-images-idx3-ubyte.gz" in str(info.value)

    tmp_path.joinpath("partial").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no t10k-images-idx3-ubyte\[\.gz\] in .*partial"):
        load_mnist(tmp_path / "partial", "test")

    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        get_dataset("fashion_mnist", root=missing)

    monkeypatch.setenv("DISTILL_MNIST", str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        get_dataset("mnist")


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"real MNIST not at {MNIST_DIR}")
def test_real_mnist():
    x, y = load_mnist(MNIST_DIR, "train")
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert int(y.min()) == 0 and int(y.max()) == 9
    xt, yt = load_mnist(MNIST_DIR, "test")
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert set(yt.tolist()) == set(range(10))

    test = get_dataset("mnist", root=MNIST_DIR, split="test")
    # Normalised with the *train* statistics (the well-known 0.1307 / 0.3081).
    assert test.mean[0] == pytest.approx(0.1307, abs=1e-3) and test.std[0] == pytest.approx(0.3081, abs=1e-3)
    assert test.num_classes == 10 and len(test) == 10000 and test.input_shape == (1, 28, 28)
    torch.testing.assert_close(test.denormalize(test.inputs), xt)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install -y dataset-fashion-mnist")
def test_real_fashion_mnist():
    data = get_dataset("fashion_mnist", split="test")
    assert data.inputs.shape == (10000, 1, 28, 28)
    assert set(data.targets.tolist()) == set(range(10))
    assert data.mean[0] == pytest.approx(0.2860, abs=1e-3)


# --------------------------------------------------------------------------------------- digits


def test_digits_split_sizes_stratification_and_determinism():
    s = load_digits_split(0.25, seed=0)
    assert s.train_inputs.shape == (1347, 1, 8, 8) and s.val_inputs.shape == (450, 1, 8, 8)
    assert s.train_targets.dtype == torch.int64
    assert 0.0 <= s.train_inputs.min() and s.train_inputs.max() <= 1.0
    all_counts = torch.bincount(torch.cat([s.train_targets, s.val_targets]), minlength=10)
    val_counts = torch.bincount(s.val_targets, minlength=10)
    # Every class keeps a quarter of its samples in validation, up to rounding.
    assert ((val_counts - 0.25 * all_counts).abs() <= 1).all()

    again = load_digits_split(0.25, seed=0)
    assert torch.equal(again.train_inputs, s.train_inputs) and torch.equal(again.val_targets, s.val_targets)
    other = load_digits_split(0.25, seed=1)
    assert not torch.equal(other.val_inputs, s.val_inputs)

    # Train and val are disjoint and together hold every image once.
    rows = torch.cat([s.train_inputs, s.val_inputs]).flatten(1)
    from sklearn.datasets import load_digits

    full = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, full.tolist()))

    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\); got 1.5"):
        load_digits_split(1.5)


def test_get_dataset_digits_normalisation_and_errors():
    train = get_dataset("digits")
    val = get_dataset("digits", split="val")
    assert train.name == "digits" and train.num_classes == 10 and train.input_shape == (1, 8, 8)
    assert abs(train.inputs.mean().item()) < 1e-5 and train.inputs.std().item() == pytest.approx(1.0, abs=1e-3)
    assert val.mean == train.mean and val.std == train.std  # val reuses the train statistics
    assert torch.equal(get_dataset("digits", split="test").inputs, val.inputs)  # "test" means "val"
    raw = get_dataset("digits", normalize=False)
    torch.testing.assert_close(train.denormalize(train.inputs), raw.inputs)
    assert len(get_dataset("digits", val_fraction=0.5, seed=3)) == 898

    assert list_datasets() == ["cifar10", "cifar100", "digits", "digits_scenes", "fashion_mnist", "fashion_scenes",
                               "lidar_scenes", "mnist", "mnist_scenes", "synthetic"]
    with pytest.raises(KeyError, match="unknown data set 'mnsit'.*did you mean mnist"):
        get_dataset("mnsit")
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]; got split='val'"):
        get_dataset("mnist", root=MNIST_DIR, split="val")
    with pytest.raises(TypeError, match="unexpected options"):
        get_dataset("digits", val_frac=0.2)


# --------------------------------------------------------------------------------------- loader


def test_indexed_tensor_dataset():
    ds = IndexedTensorDataset(torch.arange(10.0).view(10, 1), torch.arange(10) % 3)
    x, y, i = ds[7]
    assert len(ds) == 10 and x.item() == 7.0 and y.item() == 1 and i == 7
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)))
    assert torch.equal(batch[0].view(-1), batch[2].float())
    with pytest.raises(ValueError, match="10 samples but targets have 9"):
        IndexedTensorDataset(torch.zeros(10, 1), torch.zeros(9))


def epoch_indices(loader: InMemoryLoader, epoch: int) -> torch.Tensor:
    loader.set_epoch(epoch)
    return torch.cat([b.index for b in loader])


def test_loader_covers_every_sample_once_and_is_reproducible():
    n = 103
    x, y = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % 10
    loader = InMemoryLoader(x, y, batch_size=10, seed=5, return_index=True)
    assert len(loader) == 11
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    seen = torch.cat([b.index for b in batches])
    assert torch.equal(torch.sort(seen).values, torch.arange(n))  # every sample exactly once
    for b in batches:  # index points at the sample the batch holds
        assert torch.equal(b.inputs.view(-1), x[b.index].view(-1)) and torch.equal(b.targets, y[b.index])

    fresh = InMemoryLoader(x, y, batch_size=10, seed=5, return_index=True)
    assert torch.equal(epoch_indices(fresh, 0), seen)  # default epoch is 0
    assert torch.equal(epoch_indices(fresh, 3), epoch_indices(loader, 3))  # resumed run, same order
    assert not torch.equal(epoch_indices(loader, 1), epoch_indices(loader, 2))
    other_seed = InMemoryLoader(x, y, batch_size=10, seed=6, return_index=True)
    assert not torch.equal(epoch_indices(other_seed, 1), epoch_indices(loader, 1))

    ordered = InMemoryLoader(x, y, batch_size=10, shuffle=False, drop_last=True, return_index=True)
    assert len(ordered) == 10
    assert torch.equal(epoch_indices(ordered, 4), torch.arange(100))
    assert next(iter(InMemoryLoader(x, None, batch_size=4))).targets is None
    assert next(iter(InMemoryLoader(x, y, batch_size=4))).index is None


def test_loader_rejects_bad_arguments():
    x, y = torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="batch_size must be a positive int; got 0"):
        InMemoryLoader(x, y, batch_size=0)
    with pytest.raises(ValueError, match="5 samples but targets have 4"):
        InMemoryLoader(x, y[:4], batch_size=2)
    with pytest.raises(ValueError, match="set_epoch expects an int >= 0; got -1"):
        InMemoryLoader(x, y, batch_size=2).set_epoch(-1)
    with pytest.raises(ValueError, match="augment needs images"):
        InMemoryLoader(torch.zeros(5, 3), y, batch_size=2, augment=RandomHorizontalFlip())


def test_loader_augmentation_is_a_function_of_seed_epoch_and_sample():
    x = torch.randn(37, 2, 6, 6)
    aug = Compose([RandomCropPad(2), RandomHorizontalFlip()])

    def run(epoch: int, seed: int = 0, batch_size: int = 8, **kw) -> list:
        loader = InMemoryLoader(x, None, batch_size=batch_size, augment=aug, seed=seed, return_index=True, **kw)
        loader.set_epoch(epoch)
        return list(loader)

    def views(batches: list) -> torch.Tensor:  # each sample's view, in data-set order
        out = torch.empty_like(x)
        for b in batches:
            out[b.index] = b.inputs
        return out

    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(run(2), run(2)))
    assert not torch.equal(views(run(2)), views(run(3)))
    # a sample's view depends on (augment_seed, epoch, index) only: not on its batch or the order seed
    assert torch.equal(views(run(2)), views(run(2, batch_size=5)))
    assert torch.equal(views(run(2)), views(run(2, seed=9, augment_seed=0)))
    assert not torch.equal(views(run(2)), views(run(2, seed=9)))  # augment_seed defaults to seed

    # augment_params replays the exact parameters of any subset of samples
    loader = InMemoryLoader(x, None, batch_size=8, augment=aug, seed=0, return_index=True)
    loader.set_epoch(2)
    for batch in loader:
        assert torch.equal(aug.apply(x[batch.index], loader.augment_params(batch.index)), batch.inputs)
        i = batch.index[-1:]
        assert torch.equal(aug.apply(x[i], loader.augment_params(i, epoch=2)), batch.inputs[-1:])


def test_loader_plain_callable_augment_gets_a_per_batch_generator():
    x = torch.randn(10, 1, 4, 4)
    seen = []

    def noisy(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seen.append(generator)
        return batch + torch.randn(batch.shape, generator=generator)

    loader = InMemoryLoader(x, None, batch_size=5, augment=noisy, shuffle=False)
    first = [b.inputs for b in loader]
    assert len(seen) == 2 and all(torch.equal(a, b.inputs) for a, b in zip(first, loader))
    expected = x[:5] + torch.randn((5, 1, 4, 4), generator=loader.augment_generator(0))
    assert torch.equal(first[0], expected)
    with pytest.raises(TypeError, match="augment_params needs an Augment"):
        loader.augment_params(torch.arange(2))


def test_sample_keys_are_per_sample_and_match_the_scalar_mixer():
    from distill.data.augment import SampleKeys, _chain, _splitmix64

    keys = SampleKeys.of(3, 1, torch.tensor([0, 5, 7]))
    # sample i's key is splitmix64 chained over (seed, epoch, 1, i), written with Python ints
    assert keys.keys.tolist() == [_chain(3, 1, 1, i) for i in (0, 5, 7)]
    assert keys.bits(4).tolist() == [_splitmix64(k ^ _splitmix64(4)) for k in keys.keys.tolist()]
    sub = SampleKeys.of(3, 1, [7])
    assert keys.uniform(2)[2] == sub.uniform(2)[0] and keys.integers(5, 1)[2] == sub.integers(5, 1)[0]
    u = SampleKeys.of(0, 0, torch.arange(4000)).uniform()
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.02
    n = SampleKeys.of(0, 0, torch.arange(4000)).integers(5)
    assert set(n.tolist()) == set(range(5)) and n.dtype == torch.int64
    assert not torch.equal(keys.child(0).uniform(), keys.child(1).uniform())
    with pytest.raises(ValueError, match="1-d integer index"):
        SampleKeys.of(0, 0, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="indices >= 0; got -1"):
        SampleKeys.of(0, 0, [-1])


def test_augment_specs_and_per_sample_flag():
    aug = Compose([RandomCropPad(2, fill=-1.0), RandomHorizontalFlip(0.25)])
    assert aug.spec() == {"type": "Compose", "transforms": [
        {"type": "RandomCropPad", "padding": 2, "fill": -1.0}, {"type": "RandomHorizontalFlip", "p": 0.25}]}
    assert aug.per_sample

    class BatchOnly(RandomHorizontalFlip):  # written before per-sample draws existed
        params_for = Augment.params_for

    legacy = Compose([BatchOnly()])
    assert not legacy.per_sample
    x = torch.randn(6, 1, 3, 3)
    loader = InMemoryLoader(x, None, batch_size=3, augment=legacy, return_index=True)
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(loader, loader))  # still reproducible


# ---------------------------------------------------------------------------------- augmentation


def naive_crop(x: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    _, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    out = torch.empty_like(x)
    for i, (r, c) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, r : r + h, c : c + w]
    return out


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 5), c=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7),
    padding=st.integers(0, 4), seed=st.integers(0, 2**31 - 1),
)
def test_crop_matches_naive_loop(b, c, h, w, padding, seed):
    x = torch.randn(b, c, h, w)
    crop = RandomCropPad(padding)
    offsets = crop.sample_params(b, torch.Generator().manual_seed(seed))
    assert offsets.shape == (b, 2) and offsets.min() >= 0 and offsets.max() <= 2 * padding
    assert torch.equal(crop.apply(x, offsets), naive_crop(x, offsets, padding))


def test_crop_identity_offsets_and_all_offsets_reachable():
    x = torch.randn(4, 2, 5, 5)
    crop = RandomCropPad(2)
    assert torch.equal(crop.apply(x, torch.full((4, 2), 2)), x)
    shifted = crop.apply(x, torch.tensor([[0, 0]] * 4))  # content moves down-right by 2
    assert torch.equal(shifted[..., 2:, 2:], x[..., :-2, :-2]) and (shifted[..., :2, :] == 0).all()
    offsets = crop.sample_params(2000, torch.Generator().manual_seed(0))
    assert set(offsets.flatten().tolist()) == set(range(5))
    black = RandomCropPad(1, fill=-3.0).apply(x, torch.zeros(4, 2, dtype=torch.long))
    assert (black[..., 0, :] == -3.0).all()


def test_flip_matches_naive_loop():
    x = torch.randn(16, 3, 4, 5)
    flip = RandomHorizontalFlip(0.5)
    mask = flip.sample_params(16, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and 0 < mask.sum() < 16
    expected = torch.stack([xi.flip(-1) if m else xi for xi, m in zip(x, mask.tolist())])
    assert torch.equal(flip.apply(x, mask), expected)
    assert not RandomHorizontalFlip(0.0).sample_params(50, torch.Generator()).any()
    assert RandomHorizontalFlip(1.0).sample_params(50, torch.Generator()).all()


def test_augment_determinism_and_replay():
    x = torch.randn(10, 1, 8, 8)
    aug = Compose([RandomCropPad(1), RandomHorizontalFlip()])
    a = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(8)))
    params = aug.sample_params(10, torch.Generator().manual_seed(7))
    assert torch.equal(aug.apply(x, params), a)
    # Per-sample parameters slice like tensors: replaying a subset gives that subset's views.
    sub = torch.tensor([1, 4, 9])
    assert torch.equal(aug.apply(x[sub], tuple(p[sub] for p in params)), a[sub])


def test_augment_errors():
    with pytest.raises(ValueError, match="padding must be an int >= 0; got -1"):
        RandomCropPad(-1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]; got 1.5"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(TypeError, match="Compose item 0 is a str"):
        Compose(["flip"])
    with pytest.raises(ValueError, match=r"expects images of shape \(B, C, H, W\); got \(3, 8, 8\)"):
        RandomCropPad(1)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="parameters are for a batch of 2 samples but x has 3"):
        RandomHorizontalFlip().apply(torch.zeros(3, 1, 4, 4), torch.zeros(2, dtype=torch.bool))


def test_default_mnist_root_env(monkeypatch, tmp_path):
    make_fake_mnist(tmp_path / "m", n_train=6, n_test=2)
    monkeypatch.setenv("DISTILL_MNIST", str(tmp_path / "m"))
    data = get_dataset("mnist", split="test")
    assert data.inputs.shape == (2, 1, 28, 28) and data.name == "mnist"
