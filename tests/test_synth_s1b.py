"""Issue 13, part S1b: ConvNet-3, synthetic sets on disk, the synthesizer registry, the evaluator,
the coreset baselines (random real, herding, k-center) and ``distill synth``.

Selections are checked against orders worked out by hand on tiny 2-D point sets (the working is
in the comments); the evaluator's mean/std against a plain loop.
"""

from __future__ import annotations

import functools

import json
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from distill.data.synthetic import MANIFEST_FILE, SYNTHETIC_FILE, SyntheticSet, load_synthetic
from distill.models import create
from distill.recipes import RecipeError, parse_synth_recipe
from distill.synthesis.coresets import herding, herding_select, k_center, k_center_select, random_real
from distill.synthesis.registry import list_synthesizers, register_synthesizer, synthesizer_info, teacher_fingerprint

torch.set_num_threads(1)

# five 2-D points used by the selection tests; mean = (8/5, 6/5) = (1.6, 1.2)
POINTS = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 3.0]])


# --------------------------------------------------------------------------------------- ConvNet-3


def test_convnet3_shapes_and_parameter_count_by_hand() -> None:
    net = create("convnet3")  # width 128, depth 3, 1 channel, 28x28, 10 classes
    # 28x28 -> first conv padded by 3 (DC's code) -> 32x32 -> pools 16, 8, 4: features 128*4*4 = 2048
    # conv1 1*128*9 + 128 = 1,280; conv2 = conv3 = 128*128*9 + 128 = 147,584; three GroupNorm(128) affine
    # 3 * 256 = 768; linear 2048*10 + 10 = 20,490; total 1,280 + 2*147,584 + 768 + 20,490 = 317,706
    assert sum(p.numel() for p in net.parameters()) == 317_706
    x = torch.randn(3, 1, 28, 28)
    assert net(x).shape == (3, 10)
    assert net.embed(x).shape == (3, 2048)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 128 and m.affine for m in norms)
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == 3
    # 8x8 digits: padding 1 everywhere, 8 -> 4 -> 2 -> 1
    small = create("convnet3", image_size=8, width=16, num_classes=7)
    assert small.embed(torch.randn(2, 1, 8, 8)).shape == (2, 16) and small(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    with pytest.raises(ValueError, match="norm must be one of"):
        create("convnet3", norm="instance")
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 28, 28\)"):
        net(torch.randn(1, 1, 32, 32))


# ------------------------------------------------------------------------------- synthetic sets


def _set(n_per_class: int = 2, k: int = 3, soft: bool = False) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_per_class * k, 1, 4, 4, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per_class)
    if soft:
        labels = torch.softmax(torch.randn(len(labels), k, generator=g), 1)
    manifest = {"method": "unit", "settings": {"lr": 0.5}, "normalization": {"mean": [0.25], "std": [2.0]}}
    return SyntheticSet(images, labels, manifest)


@pytest.mark.parametrize("soft", [False, True])
def test_save_load_round_trip_and_manifest_fields(tmp_path: Path, soft: bool) -> None:
    s = _set(soft=soft)
    s.save(tmp_path / "set")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [MANIFEST_FILE, SYNTHETIC_FILE]
    back = load_synthetic(tmp_path / "set")
    assert torch.equal(back.images, s.images) and torch.equal(back.labels, s.labels)
    assert back.labels.dtype == (torch.float32 if soft else torch.int64)
    m = json.loads((tmp_path / "set" / MANIFEST_FILE).read_text())
    assert m["method"] == "unit" and m["settings"] == {"lr": 0.5}
    assert m["format"] == "distill.synthetic/1" and m["count"] == 6 and m["image_shape"] == [1, 4, 4]
    assert m["num_classes"] == 3 and m["label_kind"] == ("soft" if soft else "hard")
    assert m["normalization"] == {"mean": [0.25], "std": [2.0]}
    assert m["created"].endswith("+00:00") and "distill_version" in m
    assert back.normalization == ((0.25,), (2.0,))
    batches = list(back.loader(4, shuffle=False))
    assert [len(b.targets) for b in batches] == [4, 2]


def test_save_refuses_a_folder_with_files_unless_overwrite(tmp_path: Path) -> None:
    s = _set()
    (tmp_path / "set").mkdir()
    s.save(tmp_path / "set")  # an empty existing folder is fine
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _set(n_per_class=3).save(tmp_path / "set")
    assert len(load_synthetic(tmp_path / "set")) == 6  # untouched
    _set(n_per_class=3).save(tmp_path / "set", overwrite=True)
    assert len(load_synthetic(tmp_path / "set")) == 9


def test_synthetic_set_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'method'"):
        SyntheticSet(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), {})
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        SyntheticSet(torch.zeros(2, 1, 2, 2), torch.zeros(3, dtype=torch.long), {"method": "x"})
    with pytest.raises(ValueError, match="JSON"):
        SyntheticSet(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), {"method": "x", "t": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="no synthetic set"):
        load_synthetic(tmp_path / "absent")
    s = _set()
    s.save(tmp_path / "set")
    (tmp_path / "set" / MANIFEST_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="expected 'distill.synthetic/1'"):
        load_synthetic(tmp_path / "set")


def test_get_dataset_synthetic_serves_the_set_and_its_source_test_split(tmp_path: Path) -> None:
    from distill.data import get_dataset

    digits = get_dataset("digits")
    s = random_real(digits.inputs, digits.targets, ipc=2, num_classes=10, seed=3, progress=False)
    s.manifest.update(source={"dataset": "digits", "root": None, "options": {}},
                      normalization={"mean": list(digits.mean), "std": list(digits.std)})
    s.save(tmp_path / "set")
    train = get_dataset("synthetic", root=tmp_path / "set")
    assert torch.equal(train.inputs, s.images) and torch.equal(train.targets, s.labels) and train.num_classes == 10
    raw = get_dataset("synthetic", root=tmp_path / "set", normalize=False)
    assert torch.allclose(raw.inputs, digits.denormalize(s.images), atol=1e-6)
    test = get_dataset("synthetic", root=tmp_path / "set", split="test")
    assert torch.equal(test.inputs, get_dataset("digits", split="test").inputs)
    with pytest.raises(ValueError, match="needs root"):
        get_dataset("synthetic")
    s.manifest["normalization"] = {"mean": [0.5], "std": [0.5]}  # stored in another space than digits' own
    s.save(tmp_path / "other")
    with pytest.raises(ValueError, match="different spaces"):
        get_dataset("synthetic", root=tmp_path / "other", split="test")
    assert "synthetic" in __import__("distill.data", fromlist=["list_datasets"]).list_datasets()


# ------------------------------------------------------------------------- selections by hand


def test_herding_order_worked_by_hand() -> None:
    # mu = (1.6, 1.2). Squared distances ||mu - (x + s)/k||^2 at each step (s: sum of picked points):
    # k=1: x0 4.0, x1 7.2, x2 3.2, x3 0.4, x4 5.2                       -> x3; s = (1, 1)
    # k=2: x0 1.70, x1 1.30, x2 1.30, x4 0.80 ((2,2) vs mu)             -> x4; s = (4, 4)
    # k=3: x0 0.0889 ((4/3,4/3)), x1 1.1556, x2 0.7111                  -> x0; s = (4, 4)
    # k=4: x1 0.20 ((2,1)), x2 0.45 ((1,1.5))                           -> x1; then x2
    assert herding_select(POINTS, 5).tolist() == [3, 4, 0, 1, 2]
    assert herding_select(POINTS, 2).tolist() == [3, 4]


def test_k_center_order_worked_by_hand() -> None:
    # from x0 = (0,0): distances x1 4, x2 2, x3 1.414, x4 4.243                 -> x4
    # nearest-centre distances: x1 min(4, 3.162), x2 min(2, 3.162), x3 1.414   -> x1 (3.162)
    # then x2 min(2, 4.472) = 2 > x3 min(1.414, 3.162)                          -> x2, then x3
    assert k_center_select(POINTS, 5, first=0).tolist() == [0, 4, 1, 2, 3]
    # from x3 = (1,1), the point nearest the mean: x0 1.414, x1 3.162, x2 1.414, x4 2.828 -> x1;
    # then x0 min(1.414, 4) , x2 min(1.414, 4.472), x4 min(2.828, 3.162) = 2.828        -> x4
    assert k_center_select(POINTS, 3, first=3).tolist() == [3, 1, 4]


def _two_class_points() -> tuple[torch.Tensor, torch.Tensor]:
    # class 0: POINTS at positions 0..4; class 1: POINTS shifted by (10, 10) at positions 5..9 (interleaved order
    # would work too; these indices make the expected ones readable)
    pts = torch.cat([POINTS, POINTS + 10.0])
    return pts.view(10, 1, 1, 2), torch.tensor([0] * 5 + [1] * 5)


def test_herding_and_k_center_synthesizers_select_per_class() -> None:
    images, labels = _two_class_points()
    h = herding(images, labels, ipc=3, num_classes=2, embedding="pixels", progress=False)
    assert h.manifest["indices"] == [3, 4, 0, 8, 9, 5]  # the hand order in each class (shift-invariant)
    assert h.labels.tolist() == [0, 0, 0, 1, 1, 1] and torch.equal(h.images, images[[3, 4, 0, 8, 9, 5]])
    k = k_center(images, labels, ipc=3, num_classes=2, embedding="pixels", first_center="mean", progress=False)
    assert k.manifest["indices"] == [3, 1, 4, 8, 6, 9]
    # a given embedding function: the negated second coordinate only. Class 0 values (0, 0, -2, -1, -3),
    # mean -1.2: k=1 |−1.2 − v|: x3 0.2 -> x3; k=2 (v − 1)/2: x0 0.7, x1 0.7, x2 0.3, x4 0.8 -> x2;
    # k=3 (v − 3)/3: x0 0.2, x1 0.2, x4 0.8 -> x0 (tie with x1: the lowest index)
    h2 = herding(images, labels, ipc=3, num_classes=2, embedding=lambda x: -x[:, 0, 0, 1:], progress=False)
    assert h2.manifest["indices"][:3] == [3, 2, 0]


def test_random_real_is_seeded_and_per_class() -> None:
    images, labels = _two_class_points()
    a = random_real(images, labels, ipc=2, num_classes=2, seed=1, progress=False)
    b = random_real(images, labels, ipc=2, num_classes=2, seed=1, progress=False)
    assert a.manifest["indices"] == b.manifest["indices"]
    assert all(i < 5 for i in a.manifest["indices"][:2]) and all(i >= 5 for i in a.manifest["indices"][2:])
    assert len(set(a.manifest["indices"])) == 4
    with pytest.raises(ValueError, match="class 0 has 5 samples, fewer than ipc=6"):
        random_real(images, labels, ipc=6, num_classes=2)


def test_herding_convnet3_embedding_runs_on_digits() -> None:
    from distill.data import get_dataset

    d = get_dataset("digits")
    s = herding(d.inputs[:100], d.targets[:100], ipc=2, num_classes=10, embed_epochs=1, progress=False)
    assert s.images.shape == (20, 1, 8, 8) and s.labels.bincount().tolist() == [2] * 10
    assert s.manifest["settings"]["embedding"] == "convnet3"
    with pytest.raises(ValueError, match="embedding must be 'convnet3', 'pixels' or a callable"):
        herding(d.inputs, d.targets, ipc=2, num_classes=10, embedding="resnet")


# ------------------------------------------------------------------------------------ registry


def test_registry_entries_and_checks() -> None:
    names = {i.name: i for i in list_synthesizers("dataset")}
    assert {"random_real", "herding", "k_center"} <= set(names)
    assert synthesizer_info("k_center").paper.arxiv == "1708.00489"
    assert synthesizer_info("herding").defaults == {"embedding": "convnet3", "embed_epochs": 1}
    with pytest.raises(KeyError, match="Did you mean 'herding'"):
        synthesizer_info("herdin")
    from distill.papers import Paper

    paper = Paper("t", "a", 2020)
    with pytest.raises(ValueError, match="family must be one of"):
        register_synthesizer("x_bad_family", "datafree", paper)
    with pytest.raises(ValueError, match="lacks"):
        register_synthesizer("x_bad_signature", "data-free", paper)(lambda images, labels: None)


def test_teacher_fingerprint_follows_weights_and_buffers() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    b = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    b.load_state_dict(a.state_dict())
    assert teacher_fingerprint(a) == teacher_fingerprint(b) and len(teacher_fingerprint(a)) == 64
    b[1].running_mean += 1e-3
    assert teacher_fingerprint(a) != teacher_fingerprint(b)


# ----------------------------------------------------------------------------------- evaluator


def test_evaluate_synthetic_accuracies_mean_std_and_seeds() -> None:
    from distill.data import get_dataset
    from distill.synthesis.evaluate import evaluate_synthetic

    d, t = get_dataset("digits"), get_dataset("digits", split="test")
    s = random_real(d.inputs, d.targets, ipc=3, num_classes=10, progress=False)
    kw = dict(model_kwargs={"width": 8}, epochs=8, lr=0.1, batch_size=16, progress=False)
    r = evaluate_synthetic(s, (t.inputs[:200], t.targets[:200]), evaluations=3, seed=5, dsa=True, **kw)
    assert len(r.accuracies) == 3 and r.settings["seeds"] == [5, 6, 7]
    assert len(set(r.accuracies)) > 1  # fresh models differ (else mean/std below prove nothing)
    mean = sum(r.accuracies) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in r.accuracies) / 3)  # over N, as DC's np.std
    assert r.mean == pytest.approx(mean) and r.std == pytest.approx(std)
    assert all(0 <= a <= 100 and (a * 2) == int(a * 2) for a in r.accuracies)  # k/200 as a percentage
    # evaluation i is the model of seed + i: the third evaluation alone, with seed 7, gives the same accuracy
    alone = evaluate_synthetic(s, (t.inputs[:200], t.targets[:200]), evaluations=1, seed=7, dsa=True, **kw)
    assert alone.accuracies == [r.accuracies[2]]
    first = evaluate_synthetic(s, (t.inputs[:200], t.targets[:200]), evaluations=1, seed=5, dsa=True, **kw)
    assert first.accuracies == [r.accuracies[0]]
    with pytest.raises(ValueError, match="evaluations must be an int >= 1"):
        evaluate_synthetic(s, (t.inputs, t.targets), evaluations=0)
    with pytest.raises(ValueError, match="test images must be"):
        evaluate_synthetic(s, (t.inputs[:, :, :4], t.targets))


def test_evaluator_drops_flip_for_digit_sets_only() -> None:
    """A mirrored digit is another glyph: the evaluator's DSA has no flip when the set comes from a digit set."""
    from dataclasses import replace

    from distill.data import get_dataset
    from distill.synthesis.dsa import strategy_for
    from distill.synthesis.evaluate import evaluate_synthetic

    assert strategy_for("mnist") == "color_crop_cutout_scale_rotate"
    assert strategy_for("digits", "flip_rotate") == "rotate"
    assert strategy_for("fashion_mnist") == "color_crop_cutout_flip_scale_rotate"
    assert strategy_for(None) == "color_crop_cutout_flip_scale_rotate"
    d, t = get_dataset("digits"), get_dataset("digits", split="test")
    s = random_real(d.inputs, d.targets, ipc=1, num_classes=10, progress=False)
    kw = dict(model_kwargs={"width": 4}, epochs=1, batch_size=16, progress=False, evaluations=1)
    test = (t.inputs[:20], t.targets[:20])
    digits = replace(s, manifest={**s.manifest, "source": {"dataset": "digits"}})
    clothes = replace(s, manifest={**s.manifest, "source": {"dataset": "fashion_mnist"}})
    assert evaluate_synthetic(digits, test, **kw).settings["dsa_strategy"] == "color_crop_cutout_scale_rotate"
    assert evaluate_synthetic(clothes, test, **kw).settings["dsa_strategy"] == "color_crop_cutout_flip_scale_rotate"
    assert evaluate_synthetic(digits, test, dsa_strategy="rotate", **kw).settings["dsa_strategy"] == "rotate"
    assert evaluate_synthetic(digits, test, dsa=False, **kw).settings["dsa_strategy"] is None


# ------------------------------------------------------------------------- recipes and command


def _recipe(tmp_path: Path, **over: object) -> dict:
    r = {"name": "digits_herding", "kind": "synth", "synthesizer": {"name": "herding", "args": {"embedding": "pixels"}},
         "ipc": 2, "seed": 1, "data": {"name": "digits"},
         "evaluate": {"evaluations": 2, "epochs": 2, "dsa": False, "model": {"name": "convnet3", "kwargs": {"width": 8}}},
         "output_dir": str(tmp_path / "synth")}
    r.update(over)
    return r


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and decompressed IDAT of a PNG, every chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    return size[0], size[1], zlib.decompress(idat)


def test_png_writer_without_matplotlib() -> None:
    import numpy as np

    from distill.synthesis.grid import class_grid, png_bytes

    images = torch.tensor([[[[0.0, 1.0]]], [[[0.5, 0.25]]]])  # two 1x2 images, pixels in [0, 1]
    pic = class_grid(images, torch.tensor([1, 0]), 2, pad=0)
    # row 0 = class 0 = the second image; grey = the value on all three channels
    assert pic.shape == (2, 2, 3) and pic[0, :, 0].tolist() == [128, 64] and pic[1, :, 0].tolist() == [0, 255]
    w, h, raw = _png_pixels(png_bytes(pic))
    assert (w, h) == (2, 2)
    rows = [raw[r * 7:(r + 1) * 7] for r in range(2)]  # filter byte + 2 pixels * 3 channels
    assert all(row[0] == 0 for row in rows)
    assert np.frombuffer(b"".join(row[1:] for row in rows), np.uint8).reshape(2, 2, 3).tolist() == pic.tolist()


def test_synth_recipe_end_to_end_through_the_command(tmp_path: Path) -> None:
    from distill.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path)))
    assert main(["synth", str(path), "--no-progress"]) == 0
    folder = tmp_path / "synth" / "digits_herding"
    assert sorted(p.name for p in folder.iterdir()) == ["grid.png", MANIFEST_FILE, "report.json", SYNTHETIC_FILE]
    report = json.loads((folder / "report.json").read_text())
    ev = report["evaluation"]
    assert report["synthesizer"] == "herding" and report["count"] == 20 and len(ev["accuracies"]) == 2
    assert ev["mean"] == pytest.approx(sum(ev["accuracies"]) / 2) and ev["settings"]["epochs"] == 2
    assert ev["settings"]["lr"] == 0.01  # no learned lr in a herding set: DC's
    s = load_synthetic(folder)
    assert s.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert s.manifest["source"]["dataset"] == "digits" and s.manifest["method"] == "herding"
    assert s.manifest["settings"]["embedding"] == "pixels" and s.manifest["recipe"]["ipc"] == 2
    assert (folder / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["synth", str(path), "--no-progress"]) == 2  # the folder holds a set: refused
    assert main(["synth", str(path), "--no-progress", "--overwrite"]) == 0


def test_synth_recipe_evaluates_with_the_sets_learned_lr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MTT learns the lr its set is trained with: without an ``evaluate.lr`` the evaluation uses it; 0.01 otherwise."""
    from dataclasses import replace

    from distill.cli import main
    from distill.synthesis import registry

    info = registry.synthesizer_info("herding")

    @functools.wraps(info.fn)  # its signature: the recipe checks the arguments against it
    def learning(*args: object, **kwargs: object) -> object:
        s = info.fn(*args, **kwargs)
        return replace(s, manifest={**s.manifest, "learned_lr": 0.037})

    monkeypatch.setitem(registry._SYNTHESIZERS, "herding", replace(info, fn=learning))
    lrs = {}
    for name, evaluate in (("learned", {}), ("fixed", {"lr": 0.02})):
        r = _recipe(tmp_path, name=name)
        r["evaluate"] = {**r["evaluate"], "evaluations": 1, "epochs": 1, **evaluate}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
        assert main(["synth", str(tmp_path / f"{name}.yaml"), "--no-progress"]) == 0
        lrs[name] = json.loads((tmp_path / "synth" / name / "report.json").read_text())["evaluation"]["settings"]["lr"]
    assert lrs == {"learned": 0.037, "fixed": 0.02}


def test_synth_recipe_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="unknown synthesizer 'herdin'. Did you mean 'herding'"):
        parse_synth_recipe(_recipe(tmp_path, synthesizer={"name": "herdin"}))
    with pytest.raises(RecipeError, match=r"synthesizer.args.bogus: unknown argument of synthesizer 'herding'"):
        parse_synth_recipe(_recipe(tmp_path, synthesizer={"name": "herding", "args": {"bogus": 1}}))
    with pytest.raises(RecipeError, match=r"synthesizer.args.embed_epochs: Input should be a valid integer"):
        parse_synth_recipe(_recipe(tmp_path, synthesizer={"name": "herding", "args": {"embed_epochs": "many"}}))
    with pytest.raises(RecipeError, match=r"synthesizer.args.ipc: set by the recipe"):
        parse_synth_recipe(_recipe(tmp_path, synthesizer={"name": "herding", "args": {"ipc": 3}}))
    with pytest.raises(RecipeError, match="condenses a real data set: give 'data'"):
        parse_synth_recipe(_recipe(tmp_path, data=None, evaluate=None))
    with pytest.raises(RecipeError, match="unknown key"):
        parse_synth_recipe(_recipe(tmp_path, ipcs=3))
    from distill.recipes import parse_recipe

    with pytest.raises(RecipeError, match="run it with 'distill synth'"):
        parse_recipe(_recipe(tmp_path))


def test_shipped_synth_recipes_validate() -> None:
    from distill.recipes import load_synth_recipe

    root = Path(__file__).resolve().parents[1] / "recipes" / "mnist"
    for name, synth in (("synth_random_real.yaml", "random_real"), ("synth_herding.yaml", "herding")):
        r = load_synth_recipe(root / name)
        assert r.synthesizer.name == synth and r.ipc == 10 and r.evaluate is not None and r.evaluate.evaluations == 5


def test_evaluation_training_follows_dcs_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.synthesis.evaluate import train_on_synthetic

    seen: list[tuple[float, float, float]] = []

    class SpySGD(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            g = self.param_groups[0]
            seen.append((g["lr"], g["momentum"], g["weight_decay"]))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", SpySGD)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    train_on_synthetic(net, x, y, epochs=5, lr=0.2, batch_size=2, lr_decay=0.1, generator=torch.Generator())
    # 2 steps per epoch; epochs 0-1 at 0.2, epochs 2-4 (from epochs // 2 = 2 on) at 0.02; momentum 0.9, wd 5e-4
    assert [round(s[0], 6) for s in seen] == [0.2] * 4 + [0.02] * 6
    assert {s[1:] for s in seen} == {(0.9, 5e-4)}
