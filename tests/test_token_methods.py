"""The registered token-level methods (distill.methods.tokens) against objectives written out here.

Each method runs with non-default T / β / α / reduction / ce, and is compared with a loop over the
(shifted) labelled tokens using the plain-Python divergences of ``test_tokens.ref_list``. The fused
mode (``chunk_size``) runs through the Distiller on a tiny random Llama and must equal the logits
mode, values and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from _optional import missing
from test_tokens import ref_list, softmax_list

from distill.batch import TokenBatch
from distill.functional.tokens import topk_logprobs
from distill.methods import Paper, create_method, list_methods, method_info
from distill.methods.tokens import TokenKD

NAMES = {  # name -> (divergence, arXiv id, non-default kwargs)
    "token_kl": ("forward_kl", "1606.07947", {"T": 1.7}),
    "token_rkl": ("reverse_kl", "2306.08543", {"T": 0.8}),
    "gkd": ("jsd", "2306.13649", {"T": 1.3, "beta": 0.2}),
    "distillm": ("skew_kl", "2402.03898", {"T": 2.1, "alpha": 0.3}),
    "skew_rkl": ("skew_reverse_kl", "2402.03898", {"T": 1.6, "alpha": 0.35}),
    "token_tvd": ("tvd", "2307.15190", {"T": 2.5}),
}


def views(seed=0, B=3, L=6, V=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, L, V, generator=g, dtype=dtype) * 2).requires_grad_(True)
    t = (torch.randn(B, L, V, generator=g, dtype=dtype) * 2).requires_grad_(True)  # a leak would show up here
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5] = -100  # padding
    batch = TokenBatch(torch.randint(0, V, (B, L), generator=g), labels)
    return {"logits": s}, {"logits": t}, batch


def ref_ce(logits_row, label):
    z = [math.exp(v) for v in logits_row]
    return -math.log(z[label] / sum(z))


def ref_objective(s, t, labels, divergence, *, T=1.0, beta=0.5, alpha=0.1, reduction="token", causal=True, ce=0.0):
    """Σ over the labelled tokens, written as loops: position i is compared where the label it
    predicts (labels[i + 1] for a causal LM, labels[i] otherwise) is a token."""
    B, L, _ = s.shape
    per_seq = []
    for b in range(B):
        terms = []
        for i in range(L):
            j = i + 1 if causal else i
            if j >= L or labels[b, j] == -100:
                continue
            d = ref_list(s[b, i].tolist(), t[b, i].tolist(), divergence, T, beta, alpha)
            terms.append(d + ce * ref_ce(s[b, i].tolist(), int(labels[b, j])))
        per_seq.append(terms)
    if reduction == "sum":
        return sum(sum(x) for x in per_seq)
    if reduction == "token":
        return sum(sum(x) for x in per_seq) / sum(len(x) for x in per_seq)
    return sum(sum(x) / len(x) for x in per_seq if x) / sum(1 for x in per_seq if x)


# ---------------------------------------------------------------- registry


def test_registered_with_paper_family_and_defaults():
    assert set(NAMES) <= {i.name for i in list_methods("tokens")}
    for name, (_, arxiv, _) in NAMES.items():
        info = method_info(name)
        assert info.family == "tokens" and isinstance(info.paper, Paper) and info.paper.arxiv == arxiv, name
        assert info.summary and info.defaults["T"] == 1.0 and info.defaults["chunk_size"] is None, name
        assert info.defaults["reduction"] == "token" and info.defaults["causal"] is True, name
        assert info.cls.reads_teacher_logits and info.cls.needs_targets
    assert method_info("gkd").defaults["beta"] == 0.5  # TRL's GKDConfig default (the paper prescribes none)
    assert method_info("distillm").defaults["alpha"] == 0.1  # DistiLLM's α
    assert method_info("skew_rkl").defaults["alpha"] == 0.1
    assert create_method("gkd").divergence == "jsd" and create_method("token_tvd").divergence == "tvd"


# ---------------------------------------------------------------- against the written-out objective


@pytest.mark.parametrize("name", NAMES)
def test_each_method_against_its_objective(name):
    divergence, _, kwargs = NAMES[name]
    s, t, batch = views(seed=1)
    m = create_method(name, **kwargs)
    got = m(s, t, batch)
    want = ref_objective(s["logits"], t["logits"], batch.targets, divergence, **kwargs)
    assert got.item() == pytest.approx(want, rel=1e-9)
    got.backward()
    assert t["logits"].grad is None and s["logits"].grad is not None


@pytest.mark.parametrize("reduction", ["sequence", "sum"])
def test_reduction_and_cross_entropy_term(reduction):
    s, t, batch = views(seed=2)
    m = create_method("gkd", beta=0.7, T=1.9, reduction=reduction, ce=0.45)
    want = ref_objective(s["logits"], t["logits"], batch.targets, "jsd", T=1.9, beta=0.7, reduction=reduction, ce=0.45)
    assert m(s, t, batch).item() == pytest.approx(want, rel=1e-9)


def test_encoder_alignment_without_shift():
    s, t, batch = views(seed=3)
    m = create_method("token_rkl", T=1.2, causal=False)
    want = ref_objective(s["logits"], t["logits"], batch.targets, "reverse_kl", T=1.2, causal=False)
    assert m(s, t, batch).item() == pytest.approx(want, rel=1e-9)


def test_token_kd_takes_any_divergence():
    s, t, batch = views(seed=4)
    m = TokenKD("skew_reverse_kl", T=1.4, alpha=0.4)
    want = ref_objective(s["logits"], t["logits"], batch.targets, "skew_reverse_kl", T=1.4, alpha=0.4)
    assert m(s, t, batch).item() == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="unknown divergence"):
        TokenKD("kl")


def test_causal_shift_first_label_and_last_row_never_count():
    s, t, batch = views(seed=5)
    m = create_method("token_kl", T=1.5)
    base = m(s, t, batch).item()
    labels = batch.targets.clone()
    labels[:, 0] = torch.where(labels[:, 0] == -100, 1, -100)
    assert m(s, t, TokenBatch(batch.inputs, labels)).item() == pytest.approx(base, rel=1e-12)
    s2 = {"logits": s["logits"].detach().clone()}
    s2["logits"][:, -1] += 5.0 * torch.randn_like(s2["logits"][:, -1])
    assert m(s2, t, batch).item() == pytest.approx(base, rel=1e-12)


def test_a_batch_of_prompts_only_gives_zero_and_a_warning():
    s, t, batch = views(seed=6)
    labels = torch.full_like(batch.targets, -100)
    with pytest.warns(RuntimeWarning, match="no token with a label"):
        loss = create_method("gkd")(s, t, TokenBatch(batch.inputs, labels))
    assert loss.item() == 0.0
    loss.backward()
    assert (s["logits"].grad == 0).all()


# ---------------------------------------------------------------- a cached top-k teacher


def test_topk_teacher_view_is_the_collapsed_divergence():
    s, t, batch = views(seed=7)
    top = topk_logprobs(t["logits"], 3)
    tv = {"topk_values": top.values, "topk_indices": top.indices, "topk_tail": top.tail}
    got = create_method("distillm", alpha=0.3)(s, tv, batch)
    S, P, labels = s["logits"], t["logits"], batch.targets
    terms = []
    for b in range(S.shape[0]):
        for i in range(S.shape[1] - 1):
            if labels[b, i + 1] == -100:
                continue
            p, q = softmax_list(P[b, i].tolist(), 1.0), softmax_list(S[b, i].tolist(), 1.0)
            idx = top.indices[b, i].tolist()
            pb = [p[k] for k in idx] + [sum(p[k] for k in range(len(p)) if k not in idx)]
            qb = [q[k] for k in idx] + [sum(q[k] for k in range(len(q)) if k not in idx)]
            terms.append(sum(x * math.log(x / (0.3 * x + 0.7 * y)) for x, y in zip(pb, qb)))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-9)


def test_topk_teacher_needs_the_temperature_it_was_made_at():
    s, t, batch = views(seed=8)
    top = topk_logprobs(t["logits"], 7, temperature=2.0)  # k = V: the full divergence
    tv = {"topk_values": top.values, "topk_indices": top.indices, "topk_tail": top.tail}
    with pytest.raises(ValueError, match="made at temperature 1"):
        create_method("token_kl", T=2.0)(s, tv, batch)
    tv["topk_temperature"] = torch.tensor(2.0)
    got = create_method("token_kl", T=2.0)(s, tv, batch)
    want = ref_objective(s["logits"], t["logits"], batch.targets, "forward_kl", T=2.0)
    assert got.item() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- errors


def test_errors_name_what_is_wrong():
    s, t, batch = views(seed=9)
    m = create_method("token_kl")
    with pytest.raises(ValueError, match="no targets"):
        m(s, t, TokenBatch(batch.inputs, None))
    with pytest.raises(ValueError, match=r"labels have shape \(3, 5\)"):
        m(s, t, TokenBatch(batch.inputs, batch.targets[:, :5]))
    bad = batch.targets.clone()
    bad[1, 1] = 9
    with pytest.raises(ValueError, match=r"labels contain 9.*\[0, 7\)"):
        m(s, t, TokenBatch(batch.inputs, bad))
    with pytest.raises(ValueError, match="7 vocabulary entries but the teacher's 8"):
        m(s, {"logits": torch.zeros(3, 6, 8, dtype=torch.float64)}, batch)
    with pytest.raises(KeyError, match="topk_values"):
        m(s, {"pool": torch.zeros(3)}, batch)
    with pytest.raises(KeyError, match="'hidden'"):
        create_method("token_kl", chunk_size=4)(s, t, batch)
    with pytest.raises(ValueError, match="alpha"):
        create_method("distillm", alpha=1.0)
    with pytest.raises(ValueError, match="beta"):
        create_method("gkd", beta=-0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        create_method("gkd", chunk_size=0)
    with pytest.raises(ValueError, match="unknown reduction"):
        create_method("gkd", reduction="mean")


# ---------------------------------------------------------------- fused mode on a Hugging Face model

NO_HF = missing("transformers", " (install distill[llm])")


def _llama(seed):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _hf_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.skipif(NO_HF is not None, reason=str(NO_HF))
@pytest.mark.parametrize("name,kwargs", [("gkd", {"beta": 0.3, "T": 1.5, "ce": 0.6}),
                                         ("skew_rkl", {"alpha": 0.25, "T": 2.0, "reduction": "sequence"})])
def test_fused_mode_through_the_distiller_equals_the_logits_mode(name, kwargs):
    import distill

    student, teacher = _llama(0), _llama(1)
    batch = _hf_batch()
    grads, values = [], []
    for chunk in (None, 5):
        d = distill.Distiller(student, teacher, losses={name: create_method(name, chunk_size=chunk, **kwargs)})
        d.prepare(batch)
        out = d(batch)
        if chunk is not None:
            assert "logits" not in out.student and out.student["hidden"].shape == (2, 9, 32)
        out.total.backward()
        values.append(out.total.item())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        student.zero_grad()
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and "lm_head.weight" in grads[1]
    for n in grads[0]:
        assert torch.allclose(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6), n
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.skipif(NO_HF is not None, reason=str(NO_HF))
def test_fused_mode_with_a_topk_teacher_and_its_errors():
    from distill.batch import as_batch

    student = _llama(2)
    batch = as_batch(_hf_batch())
    body_hidden = student.get_decoder()(**batch.model_inputs()).last_hidden_state
    logits = student.lm_head(body_hidden)
    t = torch.randn(2, 9, 97, generator=torch.Generator().manual_seed(3))
    top = topk_logprobs(t, 10)
    tv = {"topk_values": top.values.half(), "topk_indices": top.indices, "topk_tail": top.tail.half()}
    fused = create_method("token_rkl", chunk_size=4)
    with pytest.raises(RuntimeError, match="bind_models"):
        fused({"hidden": body_hidden}, tv, batch)
    fused.bind_models(student, None, batch)
    got = fused({"hidden": body_hidden}, tv, batch)
    want = create_method("token_rkl")({"logits": logits}, tv, batch)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="97 vocabulary entries but the teacher's logits 96"):
        fused({"hidden": body_hidden}, {"logits": t[..., :96]}, batch)


@pytest.mark.skipif(NO_HF is not None, reason=str(NO_HF))
def test_an_encoder_decoder_student_needs_causal_false():
    import transformers

    cfg = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    student = transformers.T5ForConditionalGeneration(cfg)
    with pytest.raises(ValueError, match="causal=False"):
        create_method("token_kl").bind_models(student, None, None)
    create_method("token_kl", causal=False).bind_models(student, None, None)
