"""DistillTrainer: a transformers.Trainer whose loss is a Distiller's, on tiny random Llamas (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from _lm import scaled_llama
from _optional import missing

NO_HF = missing("transformers", " (the llm extra)")
pytestmark = pytest.mark.skipif(NO_HF is not None, reason=NO_HF or "")

V, L = 97, 8
PROMPTS = (2, 5, 3, 7)  # labelled next-token positions per row: 6, 3, 5, 1 (no two pairs of rows sum alike)


def tiny_llama(seed: int, head_scale: float = 1.0):
    return scaled_llama(seed, V, head_scale)


def rows(extra: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (len(PROMPTS), L), generator=g)
    out = []
    for i, p in enumerate(PROMPTS):
        labels = ids[i].clone()
        labels[:p] = -100
        row = {"input_ids": ids[i], "attention_mask": torch.ones(L, dtype=torch.long), "labels": labels,
               "index": torch.tensor(i)}
        if extra:
            row["length"] = torch.tensor(L)  # a column that is no model input
        out.append(row)
    return out


def stack(rs):
    return {k: torch.stack([r[k] for r in rs]) for k in rs[0]}


def targs(path, **kw):
    import transformers

    base = {"use_cpu": True, "report_to": [], "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
            "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "learning_rate": 1e-2,
            "weight_decay": 0.0, "lr_scheduler_type": "constant", "seed": 0}
    return transformers.TrainingArguments(str(path), **(base | kw))


def trainer(student, teacher, args, **kw):
    import transformers

    from distill.train.hf_trainer import DistillTrainer

    return DistillTrainer(student, args, teacher=teacher, losses=kw.pop("losses", {"token_kl": {"T": 2.0}}),
                          train_dataset=kw.pop("train_dataset", rows()), data_collator=transformers.default_data_collator,
                          **kw)


def kl_t2(student, teacher, batch, T=2.0) -> torch.Tensor:
    """T² KL(softmax(t/T) ‖ softmax(s/T)) per next-token distribution, mean over positions t whose label
    t + 1 is a token: written out here, independently of distill.functional."""
    model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = student(**model_inputs).logits.double() / T
    with torch.no_grad():
        t = teacher(**model_inputs).logits.double() / T
    lt, ls = t.log_softmax(-1), s.log_softmax(-1)
    per = (lt.exp() * (lt - ls)).sum(-1) * T * T
    valid = torch.zeros_like(batch["labels"], dtype=torch.bool)
    valid[:, :-1] = batch["labels"][:, 1:] != -100
    return per[valid].mean()


# ------------------------------------------------------------------------------------ the loss


def test_the_trainers_loss_is_the_distillers_it_decreases_and_the_teacher_stays_frozen(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1, head_scale=10.0)
    frozen = copy.deepcopy(teacher.state_dict())
    with torch.no_grad():
        want = float(kl_t2(student, teacher, stack(rows())))
    t = trainer(student, teacher, targs(tmp_path, max_steps=12))
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(want, rel=1e-4)
    assert losses[-1] < 0.5 * losses[0], losses
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert t.distiller.teacher_module() is teacher and t.model is student


def test_evaluate_reports_the_distillers_loss_and_predict_the_students_logits(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1, head_scale=10.0)
    t = trainer(student, teacher, targs(tmp_path))
    with torch.no_grad():
        want = float(kl_t2(student, teacher, stack(rows())))
        logits = student(input_ids=stack(rows())["input_ids"]).logits
    assert t.evaluate(eval_dataset=rows())["eval_loss"] == pytest.approx(want, rel=1e-4)
    out = t.predict(rows())  # the sequential eval sampler keeps the rows' order
    torch.testing.assert_close(torch.as_tensor(out.predictions), logits, rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_of_two_micro_batches_equals_one_batch_of_four(tmp_path):
    """One SGD update from 2 × 2 rows accumulated equals the update from the 4 rows at once: each micro-batch's
    token mean is weighted by its share of the accumulated batch's labelled tokens (the rows hold 6, 3, 5 and
    1 of them, so an unweighted mean of the two micro-batches would differ)."""
    teacher = tiny_llama(1, head_scale=10.0)
    start = tiny_llama(0)
    one, two = copy.deepcopy(start), copy.deepcopy(start)
    trainer(one, teacher, targs(tmp_path / "a", max_steps=1, optim="sgd", learning_rate=1.0)).train()
    trainer(two, teacher, targs(tmp_path / "b", max_steps=1, optim="sgd", learning_rate=1.0,
                                per_device_train_batch_size=2, gradient_accumulation_steps=2)).train()
    moved = 0.0
    for (name, p0), p1, p2 in zip(start.named_parameters(), one.parameters(), two.parameters()):
        torch.testing.assert_close(p2 - p0, p1 - p0, rtol=1e-4, atol=1e-7, msg=name)
        moved = max(moved, float((p1 - p0).detach().abs().max()))
    assert moved > 1e-3  # the update is not trivially zero


def test_with_a_batch_transform_each_micro_batch_counts_one_over_k(tmp_path):
    """A transform may rebuild labels (on-policy), so the Trainer's token count is not the batches': the update
    is lr · ∇ (mean_A + mean_B) / 2 over the two micro-batches the transform saw, computed here."""
    teacher, start = tiny_llama(1, head_scale=10.0), tiny_llama(0)
    trained, spy = copy.deepcopy(start), Spy()
    trainer(trained, teacher, targs(tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, per_device_train_batch_size=2,
                                    gradient_accumulation_steps=2), batch_transform=spy).train()
    assert len(spy.batches) == 2
    ref = copy.deepcopy(start)
    loss = sum(kl_t2(ref, teacher, {"input_ids": b.inputs, "labels": b.targets, **b.model_kwargs})
               for b in spy.batches) / 2
    loss.backward()
    for (name, p0), p1 in zip(ref.named_parameters(), trained.parameters()):
        torch.testing.assert_close(p1 - p0.detach(), -p0.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_bf16_runs_student_and_teacher_under_cpu_autocast(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1, head_scale=10.0)
    dtypes: dict[str, set] = {"student": set(), "teacher": set()}
    student.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: dtypes["student"].add(o.dtype))
    teacher.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: dtypes["teacher"].add(o.dtype))
    before = copy.deepcopy(student.state_dict())
    t = trainer(student, teacher, targs(tmp_path, max_steps=2, bf16=True))
    t.train()
    assert dtypes == {"student": {torch.bfloat16}, "teacher": {torch.bfloat16}}
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert student.lm_head.weight.dtype == torch.float32  # mixed precision: the weights stay float32
    assert not torch.equal(before["lm_head.weight"], student.lm_head.weight)


# ------------------------------------------------------------------------------------ saving and resuming


def test_save_model_writes_the_student_alone_and_it_reloads(tmp_path):
    import transformers
    from safetensors.torch import load_file

    student, teacher = tiny_llama(0), tiny_llama(1, head_scale=10.0)
    t = trainer(student, teacher, targs(tmp_path / "run", max_steps=2))
    t.train()
    t.save_model(str(tmp_path / "student"))
    keys = load_file(str(tmp_path / "student" / "model.safetensors")).keys()
    assert not any(k.startswith(("teacher", "distiller", "student.", "methods")) for k in keys)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    assert type(loaded) is type(student)
    for k, v in student.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


@pytest.mark.parametrize("on_policy", [False, True])
def test_a_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, on_policy):
    """save_steps=2 of 4 steps; a fresh student resumed from checkpoint-2 ends where the run that never stopped
    did. With on-policy sampling (λ = 1, τ = 1) too: the transform is told each step, so it samples alike."""
    from distill.strategies.gkd import OnPolicy

    teacher = tiny_llama(1, head_scale=10.0)

    def run(student, out, resume=None):
        extra = {"batch_transform": OnPolicy(student, lam=1.0, temperature=1.0, max_new_tokens=3, pad_token_id=0,
                                             seed=2)} if on_policy else {}
        t = trainer(student, teacher, targs(out, max_steps=4, save_strategy="steps", save_steps=2,
                                            per_device_train_batch_size=2), **extra)
        t.train(resume_from_checkpoint=resume)
        return t

    whole = tiny_llama(0)
    run(whole, tmp_path / "whole")
    resumed = tiny_llama(5)
    run(resumed, tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------ batches


class Spy:
    """A batch transform that records what it is given and changes nothing."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append(batch)
        return batch


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_the_index_column_reaches_the_batch_and_never_the_model(tmp_path, remove_unused_columns):
    spy = Spy()
    t = trainer(tiny_llama(0), tiny_llama(1), targs(tmp_path, max_steps=1, remove_unused_columns=remove_unused_columns),
                train_dataset=rows(extra=True), batch_transform=spy)
    t.train()
    (batch,) = spy.batches
    assert sorted(batch.index.tolist()) == [0, 1, 2, 3]
    assert set(batch.model_kwargs) == {"attention_mask"}  # 'length' and 'index' are not model inputs


def test_on_policy_batches_reach_the_teacher(tmp_path):
    """batch_transform=OnPolicy(λ = 1, greedy): the teacher's first training batch holds each prompt followed by
    the student's greedy continuation, which transformers' generate gives independently."""
    from distill.strategies.gkd import OnPolicy

    student, teacher = tiny_llama(0, head_scale=20.0), tiny_llama(1)
    student.eval()
    want = set()
    for r in rows():
        prompt = r["input_ids"][: PROMPTS[len(want)]][None]
        seq = student.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=3,
                               pad_token_id=0)[0]
        want.add(tuple(seq.tolist()))
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["input_ids"], kw["attention_mask"])),
                                      with_kwargs=True)
    t = trainer(student, teacher, targs(tmp_path, max_steps=1),
                batch_transform=OnPolicy(student, lam=1.0, temperature=0.0, max_new_tokens=3, pad_token_id=0))
    t.train()
    ids, mask = seen[0]
    assert {tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)} == want


def test_a_wrapped_model_runs_through_its_wrapper(tmp_path):
    """Under DDP the Trainer hands compute_loss the wrapper, whose forward must run (gradient hooks); the
    Distiller's student is the bare model again afterwards."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, **kw):
            self.calls += 1
            return self.module(**kw)

    student, teacher = tiny_llama(0), tiny_llama(1, head_scale=10.0)
    t = trainer(student, teacher, targs(tmp_path))
    wrapper = Wrapper(student).train()
    loss = t.compute_loss(wrapper, stack(rows()))
    assert wrapper.calls == 1 and t.distiller.student is student
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(kl_t2(student, teacher, stack(rows()))), rel=1e-4)


# ------------------------------------------------------------------------------------ set-up


def test_what_the_trainer_cannot_do_is_refused_before_training(tmp_path):
    import transformers

    from distill.train.hf_trainer import DistillTrainer, distill_trainer_class

    args = targs(tmp_path)
    with pytest.raises(ValueError, match="teacher"):
        DistillTrainer(tiny_llama(0), args, teacher=None)
    with pytest.raises(ValueError, match="model_init"):
        DistillTrainer(tiny_llama(0), args, teacher=tiny_llama(1), model_init=lambda: tiny_llama(0))
    with pytest.raises(TypeError, match="batch_transform"):
        DistillTrainer(tiny_llama(0), args, teacher=tiny_llama(1), batch_transform=3)
    assert issubclass(distill_trainer_class(), transformers.Trainer)
