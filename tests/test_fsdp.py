"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on this CPU with gloo: 2 processes under torchrun,
each with its half of the global batch, train the same tiny random Llama as one process on the whole
batch; a frozen teacher sharded over the ranks gives the unsharded teacher's logits; ``fit(fsdp=True)``
trains, checkpoints ordinary (full) state dicts and resumes.

As in tests/test_distributed.py, one torchrun launch runs this file's ``__main__`` block (every
scenario, one process per rank) and saves what each rank saw; the tests compare it with
single-process runs made in the test process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed (FSDP2 needs it)", allow_module_level=True)

from distill import Distiller, fit  # noqa: E402
from distill.train import fsdp as F  # noqa: E402

LAUNCH_TIMEOUT_S = 180
VOCAB, SEQ, GLOBAL_BATCH = 97, 8, 4


def _llama(seed: int, layers: int = 2) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float()


def _tokens(n: int, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


def _plain_steps(model: torch.nn.Module, ids: torch.Tensor, rank: int, world: int, steps: int = 3) -> None:
    """SGD with momentum on the model's own CE loss; each rank its part of each global batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(steps):
        batch = ids[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        mine = torch.tensor_split(batch, world)[rank]
        out = model(input_ids=mine, labels=mine)
        opt.zero_grad()
        out.loss.backward()  # every sequence valid and equal halves: the mean of the ranks' means is the global mean
        opt.step()


class TokenLoader:
    """HF dict batches of a fixed token set in a seeded order; ``set_shard`` gives a rank its part of
    each global batch (what ``fit`` asks of a loader under torchrun)."""

    def __init__(self, ids: torch.Tensor, batch_size: int) -> None:
        self.ids, self.batch_size, self.rank, self.world_size, self.split, self.epoch = ids, batch_size, 0, 1, "batch", 0

    def set_shard(self, rank: int, world_size: int, split: str = "batch") -> None:
        self.rank, self.world_size, self.split = rank, world_size, split

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.ids), generator=torch.Generator().manual_seed(100 + self.epoch))
        for k in range(len(self)):
            rows = torch.tensor_split(order[k * self.batch_size:(k + 1) * self.batch_size], self.world_size)[self.rank]
            ids = self.ids[rows]
            labels = ids.clone()
            labels[:, :2] = -100  # a prompt without loss
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _fit_setup() -> tuple[Distiller, TokenLoader, TokenLoader]:
    """A 2-layer student, a frozen 3-layer teacher of another seed: CE plus token-level JSD (β = 0.3,
    T = 2) on the logits; 16 training sequences in global batches of 4, 6 validation sequences."""
    from distill.methods.tokens import TokenKD

    student, teacher = _llama(0), _llama(1, layers=3)
    d = Distiller(student, teacher, losses={"ce": 1.0, "kd": TokenKD("jsd", T=2.0, beta=0.3, weight=0.5)})
    return d, TokenLoader(_tokens(16, seed=7), batch_size=4), TokenLoader(_tokens(6, seed=8), batch_size=6)


FIT_KW = {"lr": 0.3, "momentum": 0.9, "weight_decay": 0.0, "schedule": "constant", "progress": False, "seed": 0,
          "device": "cpu", "eval_teacher": False}


# --------------------------------------------------------------------------------------------
# The worker (run by torchrun through this file's __main__ block)
# --------------------------------------------------------------------------------------------


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from distill.train import distributed as D

    D.init_distributed("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    saved: dict = {}

    # 1. a plain loop: shard_model on the student, its own CE loss, each rank half of each global batch
    model = F.shard_model(_llama(0))
    embed = model.model.embed_tokens.weight
    saved["sharded"] = {"dtensor": isinstance(embed, DTensor), "local_shape": tuple(embed.to_local().shape),
                        "blocks": [F.is_sharded(b) for b in model.model.layers], "root": F.is_sharded(model)}
    _plain_steps(model, _tokens(3 * GLOBAL_BATCH), rank, world)
    saved["plain"] = F.full_state_dict(model)

    # 2. a frozen teacher too large for one device: sharded for inference, run under no_grad
    teacher = _llama(1, layers=3).requires_grad_(False).eval()
    F.shard_model(teacher, layers=["model.layers.0", "model.layers.1", "model.layers.2"])
    ids = torch.tensor_split(_tokens(GLOBAL_BATCH, seed=9), world)[rank]
    with torch.no_grad():
        saved["teacher_logits"] = teacher(input_ids=ids).logits
    saved["teacher_frozen"] = all(not p.requires_grad for p in teacher.parameters())

    # 3. fit(fsdp=True): 2 epochs; then 1 epoch and a resume to 2
    d, loader, val = _fit_setup()
    result = fit(d, loader, val, epochs=2, run_dir=out / "run", fsdp=True, **FIT_KW)
    saved["fit"] = {"student": F.full_state_dict(d.student), "history": result.history}
    d, loader, _ = _fit_setup()
    fit(d, loader, epochs=1, run_dir=out / "resume", fsdp=True, **FIT_KW)
    d, loader, _ = _fit_setup()
    fit(d, loader, epochs=2, run_dir=out / "resume", resume=True, fsdp=True, **FIT_KW)
    saved["resumed"] = F.full_state_dict(d.student)
    torch.save(saved, out / f"fsdp_rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while another still communicates
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Launching and the single-process references
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return out, [torch.load(out / f"fsdp_rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_same_weights(got: dict, ref: dict, atol: float = 2e-5) -> None:
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert not isinstance(got[k], torch.distributed.tensor.DTensor), k  # an ordinary state dict
        assert torch.allclose(got[k], v, rtol=1e-4, atol=atol), (k, (got[k] - v).abs().max())


def test_fsdp_plain_loop_matches_one_process_on_the_full_batch(ranks):
    _, (r0, r1) = ranks
    assert r0["sharded"] == {"dtensor": True, "local_shape": (VOCAB // 2 + 1, 32), "blocks": [True, True], "root": True}
    assert r1["sharded"]["local_shape"] == (VOCAB // 2, 32)  # 97 rows cut 49 / 48
    assert r1["plain"] == {}  # gathered on rank 0 only
    ref = _llama(0)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    _plain_steps(ref, _tokens(3 * GLOBAL_BATCH), 0, 1)
    _assert_same_weights(r0["plain"], ref.state_dict())
    moved = [k for k, v in ref.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) == len(before)  # every parameter trained: the comparison covers them all


def test_fsdp_sharded_frozen_teacher_gives_the_full_teachers_logits(ranks):
    _, (r0, r1) = ranks
    teacher = _llama(1, layers=3).eval()
    with torch.no_grad():
        ref = teacher(input_ids=_tokens(GLOBAL_BATCH, seed=9)).logits
    got = torch.cat([r0["teacher_logits"], r1["teacher_logits"]])
    assert got.shape == (GLOBAL_BATCH, SEQ, VOCAB)
    assert torch.allclose(got, ref, atol=1e-5)
    assert r0["teacher_frozen"] and r1["teacher_frozen"]


def test_fit_fsdp_matches_single_process_fit_and_resumes(ranks):
    out, (r0, r1) = ranks
    d, loader, val = _fit_setup()
    ref = fit(d, loader, val, epochs=2, **FIT_KW)
    _assert_same_weights(r0["fit"]["student"], d.student.state_dict())
    assert len(r0["fit"]["history"]) == 2
    for mine, theirs in zip(r0["fit"]["history"], ref.history):
        for key in ("train_loss", "train_ce", "train_kd"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4), key
        vals = [k for k in theirs if k.startswith("val_")]
        assert vals and all(mine[k] == pytest.approx(theirs[k], rel=1e-4) for k in vals), vals  # every rank evaluated
    assert r0["fit"]["history"] == r1["fit"]["history"]
    # the checkpoint holds the full student, an ordinary state dict that loads without FSDP
    last = torch.load(out / "run" / "checkpoints" / "last.pt", weights_only=False)
    plain = _llama(0)
    plain.load_state_dict(last["distiller"]["student"])
    _assert_same_weights(plain.state_dict(), d.student.state_dict())
    # 1 epoch, then resumed to 2: the momentum buffers came back too (the same weights as 2 epochs in one go)
    _assert_same_weights(r0["resumed"], r0["fit"]["student"], atol=1e-6)


def test_shard_model_refusals():
    with pytest.raises(RuntimeError, match="initialised process group"):
        F.shard_model(_llama(0))
    assert F.find_block_list(_llama(0)) == "model.layers"
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        F.find_block_list(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="fsdp=True needs a multi-process launch"):
        fit(*_fit_setup()[:2], epochs=1, fsdp=True, **FIT_KW)
    from distill.methods.tokens import TokenKD

    fused = Distiller(_llama(0), _llama(1), losses={"kd": TokenKD("forward_kl", chunk_size=4)})
    with pytest.raises(ValueError, match="losses \\['kd'\\] fuse the student's lm_head"):
        F.FSDPDistiller(fused)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
