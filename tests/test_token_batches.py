"""Hugging Face token batches through the core: TokenBatch, run_model, taps on module paths and
output fields, the Distiller's student/teacher views, token cross-entropy, the fused (hidden) view."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill import Distiller
from distill.batch import TokenBatch, as_batch, run_model
from distill.methods.base import Method
from distill.taps import TapError, Taps, lm_body_and_head, run_tapped
from distill.teachers import FrozenTeacher
from tests._optional import missing

pytestmark = pytest.mark.skipif(missing("transformers"), reason="transformers is not installed")

VOCAB = 37


def tiny_llama(seed: int = 0, layers: int = 2, **kw):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(config).eval()


def hf_batch(b: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, -2:] = 0  # right padding of the first sequence
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100  # a two-token prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(b)}


def test_as_batch_reads_a_hugging_face_batch():
    raw = hf_batch()
    batch = as_batch(raw)
    assert isinstance(batch, TokenBatch)
    assert batch.inputs is raw["input_ids"] and batch.targets is not None and torch.equal(batch.targets, raw["labels"])
    assert torch.equal(batch.index, raw["index"]) and set(batch.model_kwargs) == {"attention_mask"}
    assert set(batch.model_inputs()) == {"input_ids", "attention_mask"}
    half = batch.part(1, 2)  # rank 1 of 2: the last row, with its mask
    assert torch.equal(half.inputs, raw["input_ids"][2:]) and torch.equal(half.attention_mask, raw["attention_mask"][2:])
    moved = batch.to("cpu")
    assert isinstance(moved, TokenBatch) and set(moved.model_kwargs) == {"attention_mask"}


def test_as_batch_refuses_bad_token_batches():
    raw = hf_batch()
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        as_batch({**raw, "input_ids": raw["input_ids"].float()})
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 6\)"):
        as_batch({**raw, "attention_mask": raw["attention_mask"][:, :6]})


def test_run_model_passes_the_attention_mask():
    model = tiny_llama()
    raw = hf_batch()
    out = run_model(model, as_batch(raw))
    ref = model(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"])
    assert torch.equal(out.logits, ref.logits)
    # the mask matters: without it the padded row's logits differ
    plain = model(input_ids=raw["input_ids"])
    assert not torch.allclose(plain.logits[0, 1:], out.logits[0, 1:])


def test_taps_on_module_paths_and_output_fields():
    model = tiny_llama()
    batch = as_batch(hf_batch())
    taps = Taps(model, ["model.layers.0", "model.layers.1.self_attn", "hidden_states.1", "hidden_states.-1"],
                model_name="student")
    out, store = run_tapped(model, batch, taps)
    ref = model(**batch.model_inputs(), output_hidden_states=True)
    assert torch.equal(store["hidden_states.1"], ref.hidden_states[1])
    assert torch.equal(store["hidden_states.-1"], ref.hidden_states[-1])
    # the first layer's output is the second entry of hidden_states (the first is the embeddings)
    assert torch.equal(store["model.layers.0"], ref.hidden_states[1])
    assert store["model.layers.1.self_attn"].shape == (3, 7, 16)
    with pytest.raises(TapError, match=r"index must be in \[-3, 2\], got 5"):
        run_tapped(model, batch, Taps(model, ["hidden_states.5"]))
    with pytest.raises(TapError, match="'hidden_states.x'"):
        Taps(model, ["hidden_states.x"])


def test_attention_taps_explain_sdpa():
    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    batch = as_batch(hf_batch())
    with pytest.raises(TapError, match="attn_implementation='eager'"):  # sdpa returns no weights: say what to do
        run_tapped(model, batch, Taps(model, ["attentions.0"]))
    eager = tiny_llama(attn_implementation="eager")
    _, store = run_tapped(eager, batch, Taps(eager, ["attentions.1"]))
    probs = store["attentions.1"]
    assert probs.shape == (3, 2, 7, 7) and torch.allclose(probs.sum(-1), torch.ones(3, 2, 7), atol=1e-5)


def _token_ce_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[y])
            count += 1
    return total / count


def test_distiller_ce_on_tokens_shifts_and_masks():
    student = tiny_llama(seed=3)
    d = Distiller(student, None, losses={"ce": 1.0})
    raw = hf_batch()
    out = d(raw)
    assert out.student["logits"].shape == (3, 7, VOCAB)
    expected = _token_ce_by_hand(out.student["logits"].detach(), raw["labels"])
    assert math.isclose(float(out.total.detach()), expected, rel_tol=1e-5)
    # HF's own loss is the same quantity (it shifts the same way)
    hf = student(**{k: v for k, v in raw.items() if k != "index"}).loss
    assert math.isclose(float(out.total.detach()), float(hf.detach()), rel_tol=1e-5)


def test_frozen_teacher_view_of_a_language_model():
    teacher = tiny_llama(seed=5, layers=3)
    source = FrozenTeacher(teacher)
    source.require_taps(["hidden_states.2", "model.layers.1.mlp"])
    batch = as_batch(hf_batch())
    view = source(batch)
    ref = teacher(**batch.model_inputs(), output_hidden_states=True)
    assert torch.equal(view["logits"], ref.logits) and torch.equal(view["hidden_states.2"], ref.hidden_states[2])
    assert view["model.layers.1.mlp"].shape == (3, 7, 16) and not view["logits"].requires_grad


class _HiddenProbe(Method):
    """Records the view it gets; a fused-style method (student_output = 'hidden')."""

    name = "hidden_probe"
    needs_teacher = False

    def __init__(self) -> None:
        super().__init__()
        self.student_output = "hidden"
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, student_view, teacher_view, batch):
        self.seen = dict(student_view)
        return student_view["hidden"].pow(2).mean()


def test_fused_methods_get_the_last_hidden_state_and_no_logits():
    student = tiny_llama(seed=7)
    probe = _HiddenProbe()
    d = Distiller(student, None, losses={"probe": probe})
    raw = hf_batch()
    d(raw)
    body, head = lm_body_and_head(student)
    assert body is student.model and head is student.lm_head
    ref = student(**{k: raw[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    assert set(probe.seen) == {"hidden"} and torch.allclose(probe.seen["hidden"], ref.hidden_states[-1])
    assert torch.allclose(head(probe.seen["hidden"]), ref.logits, atol=1e-6)
    with pytest.raises(ValueError, match=r"no logits exist for the losses \['ce'\]"):
        Distiller(student, None, losses={"probe": _HiddenProbe(), "ce": 1.0})


def test_lm_body_and_head_refuses_models_it_cannot_split():
    with pytest.raises(TypeError, match="no linear output head"):
        lm_body_and_head(nn.Sequential(nn.Linear(2, 2)))
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        lm_body_and_head(capped)


def test_vocabulary_mismatch_is_named_before_training():
    import transformers

    from distill.methods.base import create_method  # noqa: F401  (registry loaded)

    class _Logits(Method):
        name = "logit_probe"
        reads_teacher_logits = True

        def forward(self, s, t, b):
            return s["logits"].sum() * 0

    student = tiny_llama()
    config = transformers.LlamaConfig(vocab_size=VOCAB + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    teacher = transformers.LlamaForCausalLM(config)
    d = Distiller(student, teacher, losses={"probe": _Logits()})
    with pytest.raises(ValueError, match=r"37 vocabulary entries but the teacher's have 40"):
        d.prepare(hf_batch())


def test_evaluate_language_model_metrics_by_hand():
    from distill.train.evaluate import evaluate

    student, teacher = tiny_llama(seed=11), tiny_llama(seed=12, layers=1)
    d = Distiller(student, teacher, losses={"ce": 1.0})
    batches = [hf_batch(seed=20), hf_batch(b=2, length=5, seed=21)]
    got = evaluate(d, iter(batches))  # a one-shot iterator: the first batch must not be lost
    n = correct = agree = 0
    nll = kl = 0.0
    for raw in batches:
        kw = {k: raw[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            s, t = student(**kw).logits.double(), teacher(**kw).logits.double()
        for b in range(raw["labels"].shape[0]):
            for pos in range(raw["labels"].shape[1] - 1):
                y = int(raw["labels"][b, pos + 1])
                if y == -100:
                    continue
                ls, lt = torch.log_softmax(s[b, pos], 0), torch.log_softmax(t[b, pos], 0)
                n += 1
                correct += int(int(ls.argmax()) == y)
                agree += int(int(ls.argmax()) == int(lt.argmax()))
                nll -= float(ls[y])
                kl += float((lt.exp() * (lt - ls)).sum())
    assert got["tokens"] == n == (3 + 5 + 5) + (1 + 3)  # labels from position 2 on, less the padding
    assert math.isclose(got["student_acc"], 100 * correct / n) and math.isclose(got["agreement"], 100 * agree / n)
    assert math.isclose(got["student_ppl"], math.exp(nll / n), rel_tol=1e-5)
    assert math.isclose(got["kl_to_teacher"], kl / n, rel_tol=1e-4, abs_tol=1e-7)


def test_fit_trains_a_language_model_on_token_batches(tmp_path):
    import distill

    student, teacher = tiny_llama(seed=13), tiny_llama(seed=14, layers=1)
    train = [hf_batch(seed=30)] * 3  # one batch, memorised
    d = distill.Distiller(student, teacher, losses={"ce": 1.0})
    result = distill.fit(d, train, train[:1], epochs=4, optimizer="adamw", lr=3e-2, weight_decay=0.0,
                         progress=False, run_dir=tmp_path / "run")
    first, last = result.history[0], result.history[-1]
    assert last["val_student_ppl"] < first["val_student_ppl"] and last["train_loss"] < first["train_loss"]
    assert "val_kl_to_teacher" in last and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_evaluating_with_a_cached_teacher_uses_its_live_model(tmp_path):
    from distill.data.text import TokenLoader
    from distill.methods.tokens import TokenKD
    from distill.token_cache import CachedTokenTeacher, build_token_cache
    from distill.train.evaluate import evaluate

    teacher = tiny_llama(seed=40, layers=1)
    train, val = hf_batch(b=4, seed=41), hf_batch(b=3, seed=42)
    loader = TokenLoader(train["input_ids"], train["labels"], train["attention_mask"], 2, shuffle=False)
    build_token_cache(teacher, loader, tmp_path / "cache", k=5, progress=False)
    val_loader = TokenLoader(val["input_ids"], val["labels"], val["attention_mask"], 3, shuffle=False)
    student = tiny_llama(seed=43)
    with_live = Distiller(student, CachedTokenTeacher(tmp_path / "cache", teacher=teacher), losses={"kd": TokenKD()})
    got = evaluate(with_live, val_loader)  # the validation rows are not in the cache: the live teacher judges
    ref = evaluate(Distiller(student, teacher, losses={"ce": 1.0}), val_loader)
    assert got == ref and "kl_to_teacher" in got
    cache_only = Distiller(student, CachedTokenTeacher(tmp_path / "cache"), losses={"kd": TokenKD()})
    plain = evaluate(cache_only, val_loader)
    assert "kl_to_teacher" not in plain and plain["student_acc"] == ref["student_acc"]
