"""On-policy GKD (Agarwal et al., ICLR 2024, arXiv 2306.13649): the data step (on_policy_batch,
sample_completions, OnPolicy), fit's batch_transform, and the registered strategy ``gkd``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _lm import scaled_llama
from _objectives import same_objective
from _optional import missing
from torch import nn

import distill.strategies.gkd as gkd_mod
from distill.batch import TokenBatch, as_batch
from distill.strategies.gkd import (
    OnPolicy,
    on_policy_batch,
    prompt_lengths,
    sample_completions,
)
from distill.strategies.registry import strategy_info

NO_HF = missing("transformers", " (the llm extra)")
V = 97


class Successor(nn.Module):
    """A causal 'LM' whose next token is predictable: the logits at each position peak (margin 50) at
    ``(token + 1) % V``, plus a trainable bias (zero at first). It records the training mode of each call
    and every ``input_ids`` it sees; its dropout would scramble the logits in training mode."""

    def __init__(self, vocab: int = V, margin: float = 50.0) -> None:
        super().__init__()
        self.vocab, self.margin = vocab, margin
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.drop = nn.Dropout(0.9)
        self.modes: list[bool] = []
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.modes.append(self.training)
        self.seen.append(input_ids.clone())
        logits = self.margin * F.one_hot((input_ids + 1) % self.vocab, self.vocab).float() + self.bias
        return {"logits": self.drop(logits)}


class Fixed(nn.Module):
    """Every position's logits are the fixed vector ``z``."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.z = nn.Parameter(z.clone())

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.z.expand(*input_ids.shape, -1)}


def hand_batch() -> TokenBatch:
    """Three rows: a right-padded one, a left-padded one (the prompt holds padding), a 1-token prompt."""
    ids = torch.tensor([[3, 4, 5, 9, 9, 0, 0],
                        [0, 0, 7, 8, 9, 9, 9],
                        [10, 11, 12, 13, 14, 15, 16]])
    labels = torch.tensor([[-100, -100, -100, 9, 9, -100, -100],
                           [-100, -100, -100, -100, 9, 9, 9],
                           [-100, 11, 12, 13, 14, 15, 16]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1, 1]])
    return as_batch({"input_ids": ids, "labels": labels, "attention_mask": mask, "index": torch.tensor([7, 8, 9])})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ the data step


def test_prompt_lengths_are_the_positions_of_the_first_labels():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 1, -100, 2], [-100, -100, -100, -100]])
    assert prompt_lengths(labels).tolist() == [2, 1, 4]


def test_lam_zero_returns_the_batch_unchanged_and_never_runs_the_student():
    student = Successor()
    batch = hand_batch()
    for seed in range(20):
        out = on_policy_batch(student, batch, lam=0.0, temperature=1.0, max_new_tokens=3, generator=gen(seed),
                              pad_token_id=0)
        assert out is batch
    assert student.modes == []


def test_lam_one_keeps_the_prompts_and_takes_the_completions_from_the_student():
    """Worked by hand: greedy Successor continues each prompt's last attended token by +1; token 8 ends a
    completion (kept, labelled); the new batch is right-padded with 0; labels -100 exactly on prompt/padding."""
    student = Successor()
    out = on_policy_batch(student, hand_batch(), lam=1.0, temperature=0.0, max_new_tokens=4, generator=gen(),
                          pad_token_id=0, eos_token_id=8)
    assert out.inputs.tolist() == [[3, 4, 5, 6, 7, 8],
                                   [7, 8, 9, 10, 11, 12],
                                   [10, 11, 12, 13, 14, 0]]
    assert out.targets.tolist() == [[-100, -100, -100, 6, 7, 8],
                                    [-100, -100, 9, 10, 11, 12],
                                    [-100, 11, 12, 13, 14, -100]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert out.index.tolist() == [7, 8, 9]
    assert set(out.model_kwargs) == {"attention_mask"}
    # without an end token every completion has max_new_tokens tokens
    out = on_policy_batch(student, hand_batch(), lam=1.0, temperature=0.0, max_new_tokens=2, generator=gen(),
                          pad_token_id=0)
    assert out.inputs.tolist() == [[3, 4, 5, 6, 7], [7, 8, 9, 10, 0], [10, 11, 12, 0, 0]]
    assert out.targets.tolist() == [[-100, -100, -100, 6, 7], [-100, -100, 9, 10, -100], [-100, 11, 12, -100, -100]]


def test_sampling_runs_in_eval_mode_and_restores_each_modules_mode():
    student = Successor()
    student.train()
    on_policy_batch(student, hand_batch(), lam=1.0, temperature=0.0, max_new_tokens=3, generator=gen(),
                    pad_token_id=0)
    assert student.modes and not any(student.modes)  # dropout off while sampling (else tokens would be random)
    assert student.training and student.drop.training
    student.drop.eval()  # a user's frozen submodule stays as it was
    on_policy_batch(student, hand_batch(), lam=1.0, temperature=0.0, max_new_tokens=3, generator=gen(),
                    pad_token_id=0)
    assert student.training and not student.drop.training


def test_sampling_follows_softmax_of_logits_over_temperature():
    """Token frequencies of 6000 one-token samples at τ = 0.4 against softmax(z / τ) computed here
    (4 binomial standard deviations); at τ = 1 the law would be visibly different."""
    z = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.2])
    tau, n = 0.4, 6000
    prompts = [torch.tensor([1])] * n
    comps = sample_completions(Fixed(z), prompts, temperature=tau, max_new_tokens=1, generator=gen(3),
                               pad_token_id=0)
    freq = torch.bincount(torch.cat(comps), minlength=5).double() / n
    e = [math.exp(v / tau) for v in z.tolist()]
    want = torch.tensor([v / sum(e) for v in e], dtype=torch.float64)
    sd = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 4 * sd).all(), (freq, want)
    e1 = [math.exp(v) for v in z.tolist()]
    assert (torch.tensor([v / sum(e1) for v in e1], dtype=torch.float64) - want).abs().max() > 10 * sd.max()


def test_lam_is_the_fraction_of_batches_sampled_from_the_student():
    student = Successor()
    transform = OnPolicy(student, lam=0.3, temperature=0.0, max_new_tokens=1, pad_token_id=0, seed=4)
    for epoch in range(4):
        transform.set_epoch(epoch)
        for _ in range(100):
            transform(hand_batch())
    assert transform.batches == 400
    frac = transform.on_policy / 400
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 400), frac


@pytest.mark.parametrize("bad, match", [
    ({"lam": 1.5}, "lam"), ({"temperature": -1.0}, "temperature"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"pad_token_id": -1}, "pad_token_id"), ({"eos_token_id": "x"}, "eos_token_id"),
])
def test_bad_arguments_are_named(bad, match):
    kwargs = {"lam": 1.0, "temperature": 1.0, "max_new_tokens": 2, "generator": gen(), "pad_token_id": 0} | bad
    with pytest.raises(ValueError, match=match):
        on_policy_batch(Successor(), hand_batch(), **kwargs)


def test_batches_it_cannot_rebuild_are_refused():
    b = hand_batch()
    no_prompt = TokenBatch(b.inputs, b.targets.clone(), model_kwargs=dict(b.model_kwargs))
    no_prompt.targets[1, 0] = 5
    with pytest.raises(ValueError, match="row 1 .* no prompt"):
        on_policy_batch(Successor(), no_prompt, lam=1.0, temperature=0.0, max_new_tokens=2, generator=gen(),
                        pad_token_id=0)
    seq2seq = TokenBatch(b.inputs, b.targets, model_kwargs={**b.model_kwargs, "decoder_input_ids": b.inputs})
    with pytest.raises(ValueError, match="decoder_input_ids"):
        on_policy_batch(Successor(), seq2seq, lam=1.0, temperature=0.0, max_new_tokens=2, generator=gen(),
                        pad_token_id=0)
    with pytest.raises(ValueError, match="labels"):
        on_policy_batch(Successor(), TokenBatch(b.inputs), lam=1.0, temperature=0.0, max_new_tokens=2,
                        generator=gen(), pad_token_id=0)


class PrefixSum(nn.Module):
    """Next token = (sum of the tokens so far) % V; names a cache in its forward but never returns one."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        return {"logits": 50.0 * F.one_hot(input_ids.cumsum(1) % V, V).float()}


def test_a_model_that_returns_no_cache_is_rerun_on_the_whole_prefix():
    """3 + 4 = 7, then 3 + 4 + 7 = 14, then 28 (by hand): it would be 7, 7 + 7 = 14 → 14, ... if the new
    token alone were fed without a cache."""
    comps = sample_completions(PrefixSum(), [torch.tensor([3, 4]), torch.tensor([1, 1, 1])], temperature=0.0,
                               max_new_tokens=3, generator=gen(), pad_token_id=0)
    assert [c.tolist() for c in comps] == [[7, 14, 28], [3, 6, 12]]


# ------------------------------------------------------------------------------------ Hugging Face models


def tiny_llama(seed: int, head_scale: float = 1.0):
    return scaled_llama(seed, V, head_scale)


class NoCache(nn.Module):
    """The same model, called without its key/value cache (the other decoding path)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


@pytest.mark.skipif(NO_HF is not None, reason=NO_HF or "")
def test_greedy_completions_of_a_llama_equal_transformers_generate():
    """Prompts of different lengths (left-padded together) give, with and without the KV cache, what
    transformers' own generate gives for each prompt alone."""
    model = tiny_llama(0, head_scale=20.0)
    prompts = [torch.tensor([5, 6]), torch.tensor([9, 3, 4, 17, 2]), torch.tensor([40, 41, 42])]
    ours = sample_completions(model, prompts, temperature=0.0, max_new_tokens=6, generator=gen(), pad_token_id=0)
    plain = sample_completions(NoCache(model), prompts, temperature=0.0, max_new_tokens=6, generator=gen(),
                               pad_token_id=0)
    for p, a, b in zip(prompts, ours, plain):
        want = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                              max_new_tokens=6, pad_token_id=0)[0, len(p):]
        assert a.tolist() == want.tolist() == b.tolist()


@pytest.mark.skipif(NO_HF is not None, reason=NO_HF or "")
def test_a_head_bias_forcing_one_token_gives_that_token_even_when_sampling():
    model = tiny_llama(0)
    head = nn.Linear(32, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[42] = 1e4
    model.lm_head = head
    out = on_policy_batch(model, hand_batch(), lam=1.0, temperature=1.0, max_new_tokens=3, generator=gen(1),
                          pad_token_id=0)
    assert out.inputs.tolist() == [[3, 4, 5, 42, 42, 42], [7, 8, 42, 42, 42, 0], [10, 42, 42, 42, 0, 0]]
    # and 42 as the end token stops every completion after it
    out = on_policy_batch(model, hand_batch(), lam=1.0, temperature=1.0, max_new_tokens=3, generator=gen(1),
                          pad_token_id=0, eos_token_id=[3, 42])
    assert out.inputs.tolist() == [[3, 4, 5, 42], [7, 8, 42, 0], [10, 42, 0, 0]]
    assert out.targets.tolist() == [[-100, -100, -100, 42], [-100, -100, 42, -100], [-100, 42, -100, -100]]


@pytest.mark.skipif(NO_HF is not None, reason=NO_HF or "")
def test_sampling_is_reproducible_with_a_seed():
    model = tiny_llama(0)

    def draw(seed):
        return on_policy_batch(model, hand_batch(), lam=1.0, temperature=1.0, max_new_tokens=4, generator=gen(seed),
                               pad_token_id=0)

    a, b, c = draw(5), draw(5), draw(6)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    # OnPolicy: batch i of epoch e is a function of (seed, e, i), not of what ran before
    t1, t2 = OnPolicy(model, lam=1.0, max_new_tokens=4, pad_token_id=0, seed=3), \
        OnPolicy(model, lam=1.0, max_new_tokens=4, pad_token_id=0, seed=3)
    t1.set_epoch(2)
    first = [t1(hand_batch()).inputs for _ in range(2)]
    t2.set_epoch(0)
    t2(hand_batch())
    t2.set_epoch(2)
    assert all(torch.equal(x, t2(hand_batch()).inputs) for x in first)
    t2.set_epoch(3)  # another epoch, another stream
    assert not torch.equal(first[0], t2(hand_batch()).inputs)


# ------------------------------------------------------------------------------------ fit and the strategy


def loader():
    b = hand_batch()
    rows = {"input_ids": b.inputs, "labels": b.targets, "attention_mask": b.attention_mask, "index": b.index}
    return [rows, {k: v.flip(0) for k, v in rows.items()}]


def test_fit_applies_the_transform_and_the_teacher_sees_the_new_sequences():
    """fit(batch_transform=OnPolicy(λ=1, greedy)): the teacher's inputs in training are the prompts followed
    by the student's completions, worked out by hand as above."""
    student = Successor()
    student.drop.p = 0.0
    teacher = Successor()
    gkd_mod.gkd(student, loader(), teacher=teacher, epochs=1, lam=1.0, temperature=0.0, max_new_tokens=4,
                pad_token_id=0, eos_token_id=8, progress=False, lr=1e-3, momentum=0.0, weight_decay=0.0)
    first = torch.tensor([[3, 4, 5, 6, 7, 8], [7, 8, 9, 10, 11, 12], [10, 11, 12, 13, 14, 0]])
    trained = [x for x in teacher.seen if x.shape[1] == 6]  # prepare() saw the raw 7-token batch first
    assert len(teacher.seen) == 3 and teacher.seen[0].shape[1] == 7
    assert torch.equal(trained[0], first) and torch.equal(trained[1], first.flip(0))


def test_gkd_is_registered_with_its_paper():
    info = strategy_info("gkd")
    assert info.paper.arxiv == "2306.13649" and info.paper.year == 2024 and info.fn is gkd_mod.gkd


def _beta_jsd(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Agarwal et al. Eq. (GKD's generalized JSD), P the teacher, Q the student, M = βP + (1 - β)Q:
    β KL(P‖M) + (1 - β) KL(Q‖M) per next-token distribution, mean over positions t with labels[t + 1] ≠ -100."""
    lp = torch.log_softmax(t.double(), -1)
    lq = torch.log_softmax(s.double(), -1)
    lm = torch.log(beta * lp.exp() + (1 - beta) * lq.exp())
    per = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)  # (B, L)
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    return per[valid].mean()


@pytest.mark.skipif(NO_HF is not None, reason=NO_HF or "")
def test_gkd_minimises_beta_jsd_on_the_students_samples(monkeypatch):
    """The one-batch objective check of the registered strategy (tests/test_objectives_strategies.py):
    β = 0.3 (not the default 0.5), λ = 1, τ = 0.7; on the transformed batch the Distiller's loss equals
    the generalized JSD written out here, in value and gradient."""
    seen = []
    real = gkd_mod.fit

    def spy(distiller, train_loader, *args, **kwargs):
        transform = kwargs["batch_transform"]
        assert isinstance(transform, OnPolicy) and transform.lam == 1.0 and transform.temperature == 0.7
        transform.set_epoch(0)
        batch = transform(as_batch(train_loader[0]))
        assert batch.inputs.shape[1] <= 3 + 3  # longest prompt 3 + max_new_tokens 3: sampled, not the raw 7
        total = distiller(batch).total
        s = distiller.student(**batch.model_inputs()).logits
        with torch.no_grad():
            t = distiller.teacher_module()(**batch.model_inputs()).logits
        same_objective(total, _beta_jsd(s, t, batch.targets, 0.3), distiller.student.parameters(), rel=1e-4)
        seen.append(distiller)
        return real(distiller, train_loader, *args, **kwargs)

    monkeypatch.setattr(gkd_mod, "fit", spy)
    student, teacher = tiny_llama(0), tiny_llama(1, head_scale=5.0)
    gkd_mod.gkd(student, loader(), teacher=teacher, epochs=1, lam=1.0, beta=0.3, temperature=0.7, max_new_tokens=3,
                pad_token_id=0, progress=False, optimizer="adamw", lr=1e-3, weight_decay=0.0)
    assert len(seen) == 1


def test_strategy_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="teacher"):
        gkd_mod.gkd(Successor(), loader(), teacher=None, epochs=1, pad_token_id=0)
    with pytest.raises(ValueError, match="batch_transform"):
        gkd_mod.gkd(Successor(), loader(), teacher=Successor(), epochs=1, pad_token_id=0, batch_transform=len)
    with pytest.raises(ValueError, match="beta"):
        gkd_mod.gkd(Successor(), loader(), teacher=Successor(), epochs=1, pad_token_id=0, beta=0.2,
                    losses={"token_kl": 1.0})


def test_fit_refuses_a_batch_transform_that_is_not_callable():
    from distill import Distiller, fit

    with pytest.raises(TypeError, match="batch_transform"):
        fit(Distiller(Successor(), Successor(), {"token_kl": 1.0}), loader(), epochs=1, batch_transform=3,
            progress=False)



@pytest.mark.skipif(NO_HF is not None, reason=NO_HF or "")
def test_a_resumed_gkd_run_samples_and_trains_as_the_uninterrupted_one(tmp_path):
    """fit tells the transform each epoch (set_epoch), so epoch 1 of a run resumed after epoch 0 draws the
    same completions as in the run that never stopped, and the students end equal."""
    kw = {"teacher": tiny_llama(1, head_scale=5.0), "lam": 1.0, "temperature": 1.0, "max_new_tokens": 3,
          "pad_token_id": 0, "progress": False, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0,
          "schedule": "constant"}
    whole = tiny_llama(0)
    gkd_mod.gkd(whole, loader(), epochs=2, run_dir=tmp_path / "whole", **kw)
    part = tiny_llama(0)
    gkd_mod.gkd(part, loader(), epochs=1, run_dir=tmp_path / "part", **kw)
    resumed = tiny_llama(7)  # other weights: all of them come from the checkpoint
    gkd_mod.gkd(resumed, loader(), epochs=2, run_dir=tmp_path / "part", resume=True, **kw)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(whole.lm_head.weight, part.lm_head.weight)
