"""BINGO (Xu et al., ICLR 2022, arXiv 2107.01691): bags, the loss against plain loops, the loader, the
queue, and a few steps of the strategy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill.functional as DF
from distill.data.loader import InMemoryLoader
from distill.models.small import cnn_student_mnist
from distill.models.vit import ViT
from distill.strategies.bingo import BagBatch, BagLoader, BingoLoss, bingo, teacher_bags
from distill.strategies.registry import strategy_info

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ bags


def test_knn_bags_on_hand_made_embeddings() -> None:
    # unit vectors at angles 0, 10, 25, 90, 100, 180 degrees (cosine similarity = cos of the angle gap);
    # row 1 is scaled by 7: cosine ignores the norm
    angles = torch.tensor([0.0, 10.0, 25.0, 90.0, 100.0, 180.0]) * math.pi / 180
    f = torch.stack([angles.cos(), angles.sin()], 1)
    f[1] *= 7.0
    bags = DF.knn_bags(f, 2, chunk_size=4)  # a chunk smaller than N: the self mask must follow the offset
    expected = torch.tensor([
        [1, 2],  # 0: gaps 10, 25, 90, 100, 180
        [0, 2],  # 10: gaps 10 (to 0), 15 (to 25)
        [1, 0],  # 25: gaps 15, 25
        [4, 2],  # 90: gaps 10 (100), 65 (25)
        [3, 2],  # 100: gaps 10 (90), 75 (25)
        [4, 3],  # 180: gaps 80 (100), 90 (90)
    ])
    assert torch.equal(bags, expected)


def test_knn_bags_excludes_self_only() -> None:
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 are duplicates
    bags = DF.knn_bags(f, 1)
    assert bags.squeeze(1).tolist() == [1, 0, 0]  # each duplicate finds the other; ties go to the lower index
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N - 1\]"):
        DF.knn_bags(f, 3)


# ------------------------------------------------------------------------------------------------ the loss


def _nll(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> float:
    """-log exp(q.k/t) / (exp(q.k/t) + sum_j exp(q.n_j/t)) for one query, written with math."""
    q, k = q / q.norm(), k / k.norm()
    pos = math.exp(float(q @ k) / tau)
    neg = sum(math.exp(float(q @ (n / n.norm())) / tau) for n in queue)
    return -math.log(pos / (pos + neg))


def test_bag_contrastive_loss_is_the_weighted_loop() -> None:
    g = torch.Generator().manual_seed(0)
    q, keys, queue = torch.randn(3, 4, generator=g), torch.randn(3, 2, 4, generator=g), torch.randn(5, 4, generator=g)
    w = torch.tensor([[0.7, 0.3], [0.2, 0.8], [1.0, 0.0]])
    tau = 0.3
    expected = sum(float(w[b, p]) * _nll(q[b], keys[b, p], queue, tau) for b in range(3) for p in range(2)) / 3
    assert float(DF.bag_contrastive_loss(q, keys, queue, w, tau)) == pytest.approx(expected, rel=1e-5)
    wp = torch.tensor([0.25, 0.75])  # one weight per positive, shared by the batch
    expected = sum(float(wp[p]) * _nll(q[b], keys[b, p], queue, tau) for b in range(3) for p in range(2)) / 3
    assert float(DF.bag_contrastive_loss(q, keys, queue, wp, tau)) == pytest.approx(expected, rel=1e-5)


def test_bingo_loss_is_the_six_terms() -> None:
    g = torch.Generator().manual_seed(1)
    qa, qm, qx, ka, km = (torch.randn(4, 3, generator=g) for _ in range(5))
    queue = torch.randn(6, 3, generator=g)
    lam = torch.tensor([0.9, 0.6, 0.5, 0.1])
    tau, ls, lc = 0.4, 0.7, 0.2
    expected = sum(
        ls * _nll(qa[b], ka[b], queue, tau) + lc * _nll(qa[b], km[b], queue, tau)
        + lc * _nll(qm[b], ka[b], queue, tau) + ls * _nll(qm[b], km[b], queue, tau)
        + lam[b] * _nll(qx[b], ka[b], queue, tau) + (1 - lam[b]) * _nll(qx[b], km[b], queue, tau)
        for b in range(4)) / 4 / 3
    got = DF.bingo_loss(qa, qm, ka, km, queue, s_mix=qx, mix_lam=lam, tau=tau, lam_self=ls, lam_cross=lc)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    no_mix = sum(ls * _nll(qa[b], ka[b], queue, tau) + lc * _nll(qa[b], km[b], queue, tau)
                 + lc * _nll(qm[b], ka[b], queue, tau) + ls * _nll(qm[b], km[b], queue, tau) for b in range(4)) / 4 / 2
    got = DF.bingo_loss(qa, qm, ka, km, queue, tau=tau, lam_self=ls, lam_cross=lc)
    assert float(got) == pytest.approx(no_mix, rel=1e-5)
    with pytest.raises(ValueError, match="mix_lam"):
        DF.bingo_loss(qa, qm, ka, km, queue, s_mix=qx)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0), tau=st.floats(0.05, 2.0))
def test_bingo_loss_properties(seed: int, scale: float, tau: float) -> None:
    g = torch.Generator().manual_seed(seed)
    qa, qm, ka, km = (torch.randn(3, 5, generator=g) for _ in range(4))
    queue = torch.randn(4, 5, generator=g)
    loss = DF.bingo_loss(qa, qm, ka, km, queue, tau=tau)
    assert float(loss) >= 0.0  # each term is -log of a probability
    # the embeddings are normalised: scaling any of them changes nothing
    scaled = DF.bingo_loss(qa * scale, qm, ka, km * scale, queue / scale, tau=tau)
    assert float(scaled) == pytest.approx(float(loss), rel=1e-4, abs=1e-5)
    # aligning the queries with their own keys (and the queue away from them) lowers the loss
    aligned = DF.bingo_loss(ka, km, ka, km, -torch.cat([ka, km]), tau=tau, lam_self=1.0, lam_cross=0.0)
    assert float(aligned) <= float(DF.bingo_loss(qa, qm, ka, km, -torch.cat([ka, km]), tau=tau, lam_self=1.0,
                                                 lam_cross=0.0)) + 1e-6


def test_cutmix_pair_box_and_share() -> None:
    x, y = torch.zeros(2, 1, 10, 10), torch.ones(2, 1, 10, 10)
    for seed in range(5):
        mixed, share = DF.cutmix_pair(x, y, 0.64, torch.Generator().manual_seed(seed))
        pasted = mixed[0, 0].sum().item()  # pixels that came from y
        assert share == pytest.approx(1 - pasted / 100)
        assert torch.equal(mixed[0], mixed[1])  # one box per batch
        assert pasted <= 36  # sides 10 * sqrt(1 - 0.64) = 6 before clipping
    assert DF.cutmix_pair(x, y, 1.0)[1] == 1.0


# ------------------------------------------------------------------------------------------------ the loader


def test_bag_loader_draws_members_from_the_anchors_bags() -> None:
    n = 12
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    bags = torch.stack([(torch.arange(n) + 1) % n, (torch.arange(n) + 2) % n], 1)
    loader = BagLoader(images, bags, 5, seed=3)
    batches = list(loader)
    assert len(batches) == 2 == len(loader)  # the incomplete batch is dropped
    seen = torch.cat([b.anchor_index for b in batches])
    assert len(set(seen.tolist())) == 10
    for b in batches:
        assert isinstance(b, BagBatch) and b.inputs.shape == (15, 1, 4, 4) and b.teacher_inputs.shape == (10, 1, 4, 4)
        for a, m in zip(b.anchor_index.tolist(), b.member_index.tolist()):
            assert m in bags[a].tolist()
        # without augmentation every view is the image itself: value = its index
        assert torch.equal(b.inputs[:5, 0, 0, 0], b.anchor_index.float())
        assert torch.equal(b.teacher_inputs[5:, 0, 0, 0], b.member_index.float())
        share = float(b.cut_lam[0])
        from_member = (b.inputs[10:] == b.inputs[5:10]).float().mean().item()
        # the mixed view holds the anchor except inside the box (where the pixels are the member's)
        assert 1 - share <= from_member + 1e-6
    again = list(BagLoader(images, bags, 5, seed=3))
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(batches, again))  # a pure function of the seed
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader)).anchor_index, batches[0].anchor_index)


# ------------------------------------------------------------------------------------------------ the method


def test_bingo_loss_method_queue_and_schedule() -> None:
    torch.manual_seed(0)
    loss = BingoLoss("s", "t", tau=0.3, lam_self=0.6, lam_cross=0.4, own_key_epochs=2, queue_size=5, hidden=8)
    b = 3
    s = torch.randn(3 * b, 4, requires_grad=True)
    t = torch.randn(2 * b, 6, requires_grad=True)
    batch = BagBatch(torch.zeros(3 * b, 1), teacher_inputs=torch.zeros(2 * b, 1), cut_lam=torch.full((b,), 0.7))
    loss.prepare({"s": s}, {"t": t}, batch)
    assert loss.queue.shape == (5, 6)
    queue0 = loss.queue.clone()
    loss.on_epoch_start(0)
    assert loss.current_weights() == (1.0, 0.0)
    loss.on_epoch_start(2)
    assert loss.current_weights() == (0.6, 0.4)
    out = loss({"s": s}, {"t": t}, batch)
    z = loss.projector(s).detach()
    expected = DF.bingo_loss(z[:b], z[b:2 * b], t[:b].detach(), t[b:].detach(), queue0, s_mix=z[2 * b:],
                             mix_lam=torch.full((b,), 0.7), tau=0.3, lam_self=0.6, lam_cross=0.4)
    assert float(out.detach()) == pytest.approx(float(expected), rel=1e-6)
    out.backward()
    assert s.grad is not None and t.grad is None  # the gradient reaches only the student
    # the anchors' keys were enqueued (normalised) at the pointer, the rest is untouched
    assert torch.allclose(loss.queue[:b], torch.nn.functional.normalize(t[:b].detach(), dim=1))
    assert torch.equal(loss.queue[b:], queue0[b:]) and int(loss.queue_ptr) == b
    loss({"s": s}, {"t": t}, batch)  # wraps around: rows 3, 4, 0
    assert int(loss.queue_ptr) == 1
    with torch.no_grad():  # a dry run (prepare, evaluation) enqueues nothing
        loss({"s": s}, {"t": t}, batch)
    assert int(loss.queue_ptr) == 1


# ------------------------------------------------------------------------------------------------ the strategy


def test_bingo_strategy_registered_with_its_paper() -> None:
    info = strategy_info("bingo")
    assert info.family == "self-supervised" and info.paper.arxiv == "2107.01691" and info.paper.year == 2022


def test_bingo_strategy_trains_the_student_only() -> None:
    torch.manual_seed(0)
    n = 40
    x = torch.randn(n, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    teacher = cnn_student_mnist(num_classes=2)  # a BatchNorm teacher: its buffers must not move
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = ViT(2, 1, img_size=8, patch_size=4, dim=16, depth=1, heads=2)
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    res = bingo(student, InMemoryLoader(x, y, 8), InMemoryLoader(x, y, 20, shuffle=False), teacher=teacher,
                epochs=2, batch_size=8, k=3, queue_size=16, hidden=8, teacher_feature="pool", own_key_epochs=1,
                augment=None, progress=False, probe={"epochs": 5})
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(s_before["blocks.0.attn.qkv.weight"], student.state_dict()["blocks.0.attn.qkv.weight"])
    assert torch.equal(s_before["head.weight"], student.state_dict()["head.weight"])  # not part of BINGO
    assert res.bags.shape == (n, 3) and torch.equal(res.bags, teacher_bags(teacher, x, 3, feature="pool"))
    assert len(res.history) == 2 and all(math.isfinite(r["train_bingo"]) for r in res.history)
    assert res.probe is not None and res.last_acc == res.probe["top1"] and res.probe["num_train"] == n


def test_bingo_strategy_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(8, 1, 8, 8)
    student = ViT(2, 1, img_size=8, patch_size=4, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="needs the training set's labels"):
        bingo(student, InMemoryLoader(x, None, 4), InMemoryLoader(x, None, 4), teacher=cnn_student_mnist(2),
              epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"bags must be \(N, k\)"):
        bingo(student, InMemoryLoader(x, None, 4), teacher=cnn_student_mnist(2), epochs=1, k=2,
              bags=torch.zeros(8, 3, dtype=torch.long), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torchrun"):
        bingo(student, InMemoryLoader(x, None, 4), teacher=cnn_student_mnist(2), epochs=1, progress=False)


# ------------------------------------------------------------------------------------------------ the SSL teacher


def test_nt_xent_is_the_loop() -> None:
    from distill.functional import nt_xent_loss

    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    tau, total = 0.35, 0.0
    for i in range(6):
        j = (i + 3) % 6
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(6) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    assert float(nt_xent_loss(z1, z2, tau)) == pytest.approx(total / 6, rel=1e-5)


def test_simclr_augment_and_pretraining() -> None:
    from distill.strategies.ssl_teacher import SimCLRAugment, pretrain_simclr

    x = torch.randn(6, 1, 8, 8)
    aug = SimCLRAugment()
    a, b = aug(x, torch.Generator().manual_seed(0)), aug(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    full = SimCLRAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, jitter_p=0.0)
    assert torch.allclose(full(x, torch.Generator().manual_seed(1)), x, atol=1e-5)  # the identity view
    flipped = SimCLRAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0, jitter_p=0.0)(x)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    torch.manual_seed(0)
    model = ViT(2, 1, img_size=8, patch_size=4, dim=16, depth=1, heads=2)
    before = model.blocks[0].attn.qkv.weight.clone()
    res = pretrain_simclr(model, InMemoryLoader(torch.randn(16, 1, 8, 8), None, 8), epochs=1, batch_size=8,
                          hidden=8, out_dim=4, progress=False)
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight) and math.isfinite(res.history[0]["train_nt_xent"])
