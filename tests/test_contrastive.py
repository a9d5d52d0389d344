"""CRD: the functional NCE loss, scores, Z and bank update against direct numpy computations;
negative sampling (other classes only, without replacement, reproducible); the method's
gradients, bank updates, state-dict round trip and errors; end to end through ``fit``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.data.loader import InMemoryLoader
from distill.methods import CRD, create_method, list_methods, method_info
from distill.models import create


def rand(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


# ---------------------------------------------------------------------------- numpy references


def np_crd_loss(logits: np.ndarray, m: int, z: float) -> float:
    """The paper's critic h = P / (P + K/M), P = exp(logit) / Z; loss -(1/B) sum [log h+ + sum log(1 - h-)]."""
    b, k1 = logits.shape
    k = k1 - 1
    total = 0.0
    for i in range(b):
        p = [math.exp(float(logits[i, j])) / z for j in range(k1)]
        h = [pj / (pj + k / m) for pj in p]
        total += math.log(h[0]) + sum(math.log(1.0 - h[j]) for j in range(1, k1))
    return -total / b


def np_reference_loss(logits: np.ndarray, m: int, z: float) -> float:
    """RepDistiller's ContrastLoss, written out (with its eps = 1e-7)."""
    x = np.exp(logits) / z
    k = x.shape[1] - 1
    pn = 1.0 / m
    log_d1 = np.log(x[:, 0] / (x[:, 0] + k * pn + 1e-7))
    log_d0 = np.log((k * pn) / (x[:, 1:] + k * pn + 1e-7))
    return float(-(log_d1.sum() + log_d0.sum()) / x.shape[0])


# ---------------------------------------------------------------------------- functional


def test_registry_entry():
    info = method_info("crd")
    assert info.family == "contrastive" and info.cls is CRD
    assert info.paper.arxiv == "1910.10699" and info.paper.year == 2020 and info.paper.venue == "ICLR"
    assert "Tian" in info.paper.authors
    d = info.defaults
    assert (d["feat_dim"], d["nce_k"], d["nce_t"], d["nce_m"]) == (128, 16384, 0.07, 0.5)
    assert d["negatives"] == "other_class" and d["student_tap"] == d["teacher_tap"] == "pool"
    assert "crd" in {i.name for i in list_methods("contrastive")}
    for name in ("crd_nce_loss", "crd_scores", "crd_log_z", "crd_memory_update", "crd_sample_indices",
                 "crd_init_memory", "crd_class_layout"):
        assert hasattr(distill.functional, name), name


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("z", [1.0, 37.5])
def test_nce_loss_equals_the_papers_formula(seed, z):
    logits = rand(seed, 3, 5) * 2.0  # B = 3, K = 4
    m = 20
    got = DF.crd_nce_loss(logits, m, math.log(z))
    assert float(got) == pytest.approx(np_crd_loss(logits.numpy(), m, z), rel=1e-10, abs=1e-12)
    # and RepDistiller's version differs only by its eps
    assert float(got) == pytest.approx(np_reference_loss(logits.numpy(), m, z), rel=1e-5)


def test_nce_loss_is_stable_for_large_scores():
    logits = torch.tensor([[14.0, -14.0, 14.0], [-14.0, 14.0, 0.0]], dtype=torch.float32) * 5
    loss = DF.crd_nce_loss(logits, 10)
    assert torch.isfinite(loss)


def test_nce_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, K \+ 1\)"):
        DF.crd_nce_loss(torch.zeros(4, 1), 10)


def test_scores_and_log_z_direct():
    anchor, memory = unit(rand(0, 2, 3)), rand(1, 6, 3)
    index = torch.tensor([[0, 3, 5], [4, 4, 1]])
    got = DF.crd_scores(anchor, memory, index, T=0.5)
    for b in range(2):
        for i in range(3):
            want = float(torch.dot(memory[index[b, i]], anchor[b])) / 0.5
            assert float(got[b, i]) == pytest.approx(want, rel=1e-12)
    z = float(DF.crd_log_z(got, 6))
    assert z == pytest.approx(math.log(6 * float(got.exp().mean())), rel=1e-12)


def test_memory_update_rule_exact():
    rows, new = rand(0, 4, 5), unit(rand(1, 4, 5))
    got = DF.crd_memory_update(rows, new, momentum=0.3).numpy()
    r, v = rows.numpy(), new.numpy()
    for i in range(4):
        mixed = 0.3 * r[i] + 0.7 * v[i]
        np.testing.assert_allclose(got[i], mixed / math.sqrt(float(np.dot(mixed, mixed))), rtol=1e-12)


def test_init_memory_is_uniform_in_the_references_range():
    mem = DF.crd_init_memory(2000, 12, torch.Generator().manual_seed(0))
    a = 1.0 / math.sqrt(12 / 3)
    assert mem.shape == (2000, 12) and float(mem.abs().max()) <= a
    assert float(mem.pow(2).sum(1).mean()) == pytest.approx(1.0, abs=0.05)  # E||row||^2 = 1


# ---------------------------------------------------------------------------- sampling


def labels_of(n: int, classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g) * 3 + 1  # non-contiguous label values


@pytest.mark.parametrize("k", [5, 40, 90])  # 90 exceeds some pools: those rows draw with replacement
def test_other_class_negatives_never_share_the_anchors_class(k):
    labels = labels_of(100, 4)
    g = torch.Generator().manual_seed(0)
    layout = DF.crd_class_layout(labels)
    for trial in range(10):
        index = torch.randperm(100, generator=g)[:16]
        idx = DF.crd_sample_indices(index, k, 100, generator=g, layout=layout)
        assert idx.shape == (16, k + 1) and torch.equal(idx[:, 0], index)
        neg = idx[:, 1:]
        assert (neg >= 0).all() and (neg < 100).all()
        assert not (labels[neg] == labels[index].unsqueeze(1)).any()
        for b in range(16):
            pool = int((labels != labels[index[b]]).sum())
            if k <= pool:  # without replacement, like np.random.choice(..., replace=False)
                assert len(set(neg[b].tolist())) == k


def test_other_class_negatives_cover_the_pool_uniformly():
    labels = torch.tensor([0] * 5 + [1] * 10 + [2] * 15)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(30)
    index = torch.full((200,), 3)  # an anchor of class 0: pool = 25 samples
    idx = DF.crd_sample_indices(index, 5, 30, labels=labels, generator=g)
    counts += torch.bincount(idx[:, 1:].reshape(-1), minlength=30)
    assert counts[:5].sum() == 0
    expected = 200 * 5 / 25
    assert ((counts[5:] - expected).abs() < 0.35 * expected).all()


def test_random_negatives_and_reproducibility():
    index = torch.arange(8)
    a = DF.crd_sample_indices(index, 50, 1000, generator=torch.Generator().manual_seed(3))
    b = DF.crd_sample_indices(index, 50, 1000, generator=torch.Generator().manual_seed(3))
    c = DF.crd_sample_indices(index, 50, 1000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 0], index) and (a >= 0).all() and (a < 1000).all()


def test_sampling_errors():
    with pytest.raises(IndexError, match="out of range"):
        DF.crd_sample_indices(torch.tensor([0, 10]), 3, 10)
    with pytest.raises(ValueError, match="two classes"):
        DF.crd_class_layout(torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="labels has 5 entries"):
        DF.crd_sample_indices(torch.tensor([0]), 3, 10, labels=torch.tensor([0, 1, 0, 1, 0]))


# ---------------------------------------------------------------------------- the method


N, DS, DT = 40, 6, 10


def views(seed: int = 0, b: int = 8, grad: bool = True):
    fs = rand(seed, b, DS, dtype=torch.float32).requires_grad_(grad)
    ft = rand(seed + 100, b, DT, dtype=torch.float32).requires_grad_(grad)
    return {"logits": torch.zeros(b, 3), "pool": fs}, {"logits": torch.zeros(b, 3), "pool": ft}


def make_crd(**kw) -> CRD:
    args = dict(num_samples=N, feat_dim=8, nce_k=12, labels=torch.arange(N) % 4)
    args.update(kw)
    return CRD(**args)


def batch_of(index) -> Batch:
    index = torch.as_tensor(index)
    return Batch(torch.zeros(len(index), 1), torch.zeros(len(index), dtype=torch.long), index)


def prepared(**kw) -> tuple[CRD, dict, dict, Batch]:
    m = make_crd(**kw)
    sv, tv = views()
    batch = batch_of(torch.arange(8) * 3)
    m.prepare(sv, tv, batch)
    return m, sv, tv, batch


def test_gradients_reach_student_and_both_embeddings_never_the_teacher_feature():
    m, sv, tv, batch = prepared()
    loss = m(sv, tv, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    assert sv["pool"].grad is not None and sv["pool"].grad.abs().sum() > 0
    assert tv["pool"].grad is None
    for embed in (m.embed_s, m.embed_t):
        for p in embed.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert m.memory_s.grad is None and not m.memory_s.requires_grad


def test_memory_bank_update_is_exact_and_happens_at_step_end():
    m, sv, tv, batch = prepared(nce_m=0.5)
    before_s, before_t = m.memory_s.clone(), m.memory_t.clone()
    m.train()
    m(sv, tv, batch)
    assert torch.equal(m.memory_s, before_s) and torch.equal(m.memory_t, before_t)  # not yet
    with torch.no_grad():
        v_s = unit(m.embed_s(sv["pool"]))
        v_t = unit(m.embed_t(tv["pool"]))
    m.on_step_end()
    idx = batch.index
    for mem, old, v in ((m.memory_s, before_s, v_s), (m.memory_t, before_t, v_t)):
        mixed = 0.5 * old[idx] + 0.5 * v
        torch.testing.assert_close(mem[idx], mixed / mixed.norm(dim=1, keepdim=True))
        others = torch.ones(N, dtype=torch.bool)
        others[idx] = False
        assert torch.equal(mem[others], old[others])
    # nothing queued any more; an eval-mode forward queues nothing
    after = m.memory_s.clone()
    m.on_step_end()
    m.eval()
    m(sv, tv, batch)
    m.on_step_end()
    assert torch.equal(m.memory_s, after)


def test_z_is_estimated_from_the_first_batch_then_fixed():
    m, sv, tv, batch = prepared()
    assert torch.isnan(m.log_z_s) and torch.isnan(m.log_z_t)
    torch.manual_seed(0)
    gen_state = m._sampler(m.memory_s.device).get_state()
    loss = m(sv, tv, batch)
    # recompute by hand from the same negatives
    g = torch.Generator().manual_seed(0)
    g.set_state(gen_state)
    idx = DF.crd_sample_indices(batch.index, 12, N, generator=g, layout=DF.crd_class_layout(torch.arange(N) % 4))
    v_s, v_t = unit(m.embed_s(sv["pool"])), unit(m.embed_t(tv["pool"]))
    ls, lt = DF.crd_scores(v_s, m.memory_t, idx, 0.07), DF.crd_scores(v_t, m.memory_s, idx, 0.07)
    zs, zt = DF.crd_log_z(ls, N), DF.crd_log_z(lt, N)
    torch.testing.assert_close(m.log_z_s, zs)
    torch.testing.assert_close(m.log_z_t, zt)
    torch.testing.assert_close(loss, DF.crd_nce_loss(ls, N, zs) + DF.crd_nce_loss(lt, N, zt))
    first = m.log_z_s.clone()
    sv2, tv2 = views(seed=5)
    m(sv2, tv2, batch_of(torch.arange(8)))
    assert torch.equal(m.log_z_s, first)
    m2, sv, tv, batch = prepared(estimate_z=False)
    m2(sv, tv, batch)
    assert torch.isnan(m2.log_z_s)


def test_negative_count_is_clamped_to_the_data_set():
    m = make_crd(nce_k=16384)
    assert m.num_negatives == N - 1


def test_prepare_is_idempotent():
    m, sv, tv, batch = prepared()
    embed, mem = m.embed_s, m.memory_s
    m.prepare(sv, tv, batch)
    assert m.embed_s is embed and m.memory_s is mem


def test_state_dict_round_trip_keeps_banks_z_and_sampler():
    m, sv, tv, batch = prepared(seed=7)
    m.train()
    for step in range(3):
        m(sv, tv, batch_of(torch.arange(8) + step))
        m.on_step_end()
    state = m.state_dict()
    assert {"memory_s", "memory_t", "log_z_s", "log_z_t", "_extra_state"} <= set(state)
    m2, _, _, _ = prepared(seed=123)
    m2.load_state_dict(state)
    assert torch.equal(m2.memory_s, m.memory_s) and torch.equal(m2.log_z_t, m.log_z_t)
    dev = m.memory_s.device
    a = DF.crd_sample_indices(batch.index, 12, N, generator=m._sampler(dev), layout=m._class_layout(dev))
    b = DF.crd_sample_indices(batch.index, 12, N, generator=m2._sampler(dev), layout=m2._class_layout(dev))
    assert torch.equal(a, b)


def test_same_seed_same_run():
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        m, sv, tv, batch = prepared(seed=3)
        losses.append(float(m(sv, tv, batch).detach()))
    assert losses[0] == losses[1]


def test_errors_are_clear():
    sv, tv = views()
    with pytest.raises(ValueError, match="num_samples"):
        CRD(labels=None, negatives="random").prepare(sv, tv, batch_of(torch.arange(8)))
    with pytest.raises(ValueError, match="labels"):
        CRD(num_samples=N).prepare(sv, tv, batch_of(torch.arange(8)))
    with pytest.raises(ValueError, match="negatives"):
        CRD(num_samples=N, negatives="hard")
    with pytest.raises(ValueError, match="labels for num_samples"):
        CRD(num_samples=N, labels=torch.arange(5))
    m, sv, tv, _ = prepared()
    with pytest.raises(ValueError, match=r"return_index=True"):
        m(sv, tv, Batch(torch.zeros(8, 1), torch.zeros(8, dtype=torch.long)))
    with pytest.raises(IndexError, match="num_samples"):
        m.prepare(sv, tv, batch_of(torch.arange(8) + N))
    with pytest.raises(RuntimeError, match="prepare"):
        make_crd()(sv, tv, batch_of(torch.arange(8)))


def test_missing_index_through_the_distiller():
    student, teacher = create("cnn", widths=(4, 8, 8)), create("cnn")
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 4
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "crd": (0.8, make_crd(num_samples=8, labels=y))})
    d.prepare((x, y))
    with pytest.raises(ValueError, match="InMemoryLoader"):
        d((x, y))


# ---------------------------------------------------------------------------- end to end

PAIRS = {
    "cnn->cnn": (lambda: create("cnn", widths=(4, 8, 8)), lambda: create("cnn")),
    "cnn_digits_teacher->mlp_digits_student": (lambda: create("mlp_digits_student"),
                                               lambda: create("cnn_digits_teacher")),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_fit_two_epochs_through_the_distiller(pair):
    torch.manual_seed(0)
    make_s, make_t = PAIRS[pair]
    student, teacher = make_s(), make_t()
    g = torch.Generator().manual_seed(0)
    n = 96
    y = torch.arange(n) % 10
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() / 10  # digits-like
    loader = InMemoryLoader(x, y, batch_size=32, seed=0, return_index=True)
    crd = CRD(num_samples=n, feat_dim=16, nce_k=32, labels=loader.targets)
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "crd": (0.8, crd)})
    d.prepare(next(iter(loader)))
    assert all(any(p is q for q in d.trainable_parameters()) for p in crd.parameters())
    bank = crd.memory_t.clone()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    res = distill.fit(d, loader, epochs=2, lr=0.05, schedule="constant", progress=False, eval_teacher=False)
    assert len(res.history) == 2
    assert all(math.isfinite(row["train_crd"]) and row["train_crd"] > 0 for row in res.history)
    assert math.isfinite(res.history[1]["crd_log_z_s"])
    assert not torch.equal(crd.memory_t, bank)
    torch.testing.assert_close(crd.memory_t.norm(dim=1), torch.ones(n))  # every row written at least once
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    def run(epochs, run_dir=None, resume=False):
        torch.manual_seed(0)
        student, teacher = create("cnn", widths=(4, 8, 8)), create("cnn")
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(48, 1, 8, 8, generator=g), torch.arange(48) % 10
        loader = InMemoryLoader(x, y, batch_size=16, seed=0, return_index=True)
        crd = CRD(num_samples=48, feat_dim=8, nce_k=16, labels=y, seed=5)
        d = distill.Distiller(student, teacher, losses={"ce": 1.0, "crd": (0.8, crd)})
        distill.fit(d, loader, epochs=epochs, lr=0.05, schedule="constant", progress=False, eval_teacher=False,
                    run_dir=run_dir, resume=resume)
        return crd, student

    crd_a, student_a = run(2)
    run(1, run_dir=tmp_path)
    crd_b, student_b = run(2, run_dir=tmp_path, resume=True)
    torch.testing.assert_close(crd_b.memory_s, crd_a.memory_s)
    torch.testing.assert_close(crd_b.log_z_t, crd_a.log_z_t)
    for (k, va), vb in zip(student_a.state_dict().items(), student_b.state_dict().values()):
        torch.testing.assert_close(vb, va, msg=k)


def test_create_method_builds_crd():
    m = create_method("crd", num_samples=50, negatives="random", nce_k=8)
    assert isinstance(m, CRD) and m.num_negatives == 8


def test_warns_when_step_end_is_never_called():
    m, sv, tv, batch = prepared()
    with pytest.warns(UserWarning, match="step_end"):
        for _ in range(64):
            m(sv, tv, batch)
    m.on_step_end()
    assert not m._pending


def test_fit_and_recipes_size_crd_from_the_training_loader(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """fit tells CRD the training-set size and labels (bind_data); a recipe needs neither."""
    import distill
    from distill.data import get_dataset
    from distill.data.loader import InMemoryLoader
    from distill.recipes import parse_recipe
    from distill.runner import run_recipe

    train = get_dataset("digits")
    x, y = train.inputs[:96], train.targets[:96]
    crd = distill.create_method("crd", nce_k=32)
    d = distill.Distiller(distill.models.create("cnn_digits_student"), distill.models.create("cnn_digits_teacher"),
                          losses={"ce": 1.0, "crd": crd})
    distill.fit(d, InMemoryLoader(x, y, 32, return_index=True), epochs=1, progress=False)
    assert crd.num_samples == 96 and crd.memory_s.shape[0] == 96

    recipe = parse_recipe({
        "name": "crd_tiny", "seeds": [0], "data": {"name": "digits", "val_split": "val", "train_subset": 64},
        "student": {"name": "cnn_digits_student"},
        "teacher": {"model": {"name": "cnn_digits_teacher"}, "train": {"epochs": 1}},
        "losses": {"ce": 1.0, "crd": {"nce_k": 16, "weight": 0.8}}, "train": {"epochs": 1},
    })
    dirs = run_recipe(recipe, out_dir=tmp_path, progress=False)
    assert (dirs[0] / "summary.json").is_file()
