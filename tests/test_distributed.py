"""Multi-process training: ``distill.fit`` under torchrun (DDP, 2 gloo processes on this CPU) trains
the same student as one process with the same global batch, and codistillation workers exchange
their weights.

The multi-process checks launch ``torchrun`` on this file (its ``__main__`` block runs one worker
scenario per process and saves what it saw); each launch runs once per module, and the tests read
its outputs. Everything else runs in the test process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from distill import Distiller, fit
from distill.batch import Batch
from distill.data import InMemoryLoader, RandomCropPad, get_dataset
from distill.methods.condensation import KCD
from distill.methods.contrastive import CRD
from distill.models import create
from distill.train import distributed as D

LAUNCH_TIMEOUT_S = 150


# --------------------------------------------------------------------------------------------
# Shared set-ups (used by the workers and by the single-process reference runs)
# --------------------------------------------------------------------------------------------


DATA_ENV = "DISTILL_TEST_DIGITS"  # a file the launcher writes: workers skip loading scikit-learn (seconds)


def _digits(n_train: int, n_val: int) -> tuple[torch.Tensor, ...]:
    if os.environ.get(DATA_ENV):
        xt, yt, xv, yv = torch.load(os.environ[DATA_ENV])
    else:
        tr, va = get_dataset("digits", split="train"), get_dataset("digits", split="val")
        xt, yt, xv, yv = tr.inputs, tr.targets, va.inputs, va.targets
    return xt[:n_train].clone(), yt[:n_train].clone(), xv[:n_val].clone(), yv[:n_val].clone()


def _equivalence_setup() -> tuple[Distiller, InMemoryLoader, InMemoryLoader]:
    """CE + KD (through KCD, which also keeps a per-sample record) on digits: an MLP student without
    BatchNorm or dropout, a CNN teacher (its BatchNorm is frozen in eval mode: per-sample).
    99 samples in global batches of 32: the last batch (3 samples) splits 2/1 over two ranks."""
    x, y, xv, yv = _digits(99, 64)
    torch.manual_seed(0)
    student = create("mlp", input_size=8, hidden=(32,), num_classes=10)
    torch.manual_seed(100)
    teacher = create("cnn", widths=(8, 16), num_classes=10)
    d = Distiller(student, teacher, losses={"ce": 1.0, "kcd": KCD(T=4.0, weight=0.5)})
    return d, InMemoryLoader(x, y, 32, seed=1, return_index=True), InMemoryLoader(xv, yv, 64, shuffle=False)


FIT_KW = {"epochs": 2, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "constant", "progress": False,
          "seed": 0, "device": "cpu"}


def _snapshot(d: Distiller, history: list) -> dict:
    kcd = d.methods["kcd"]
    return {"student": {k: v.detach().clone() for k, v in d.student.state_dict().items()},
            "kcd_value": kcd.value.clone(), "kcd_count": kcd.count.clone(), "history": history}


# --------------------------------------------------------------------------------------------
# Worker scenarios (run by torchrun through this file's __main__ block)
# --------------------------------------------------------------------------------------------


def _worker_fit(out: Path) -> None:
    rank = int(os.environ["RANK"])
    saved: dict = {}
    d, train, val = _equivalence_setup()
    result = fit(d, train, val, run_dir=out / "run", **FIT_KW)
    saved["ddp"] = _snapshot(d, result.history)
    saved["train_after"] = (train.rank, train.world_size)  # fit restores the loader's shard

    # resume under DDP: rank 0 reads the checkpoint and broadcasts it
    d1, train, val = _equivalence_setup()
    fit(d1, train, val, run_dir=out / "resume", **{**FIT_KW, "epochs": 1})
    d2, train, val = _equivalence_setup()
    fit(d2, train, val, run_dir=out / "resume", resume=True, **FIT_KW)
    saved["resumed"] = _snapshot(d2, [])

    # CRD: trainable embeddings (DDP finds them) and memory banks kept equal on every rank
    x, y, _, _ = _digits(96, 0)
    torch.manual_seed(0)
    student = create("mlp", input_size=8, hidden=(32,), num_classes=10)
    torch.manual_seed(100)
    teacher = create("cnn", widths=(8, 16), num_classes=10)
    crd = CRD(feat_dim=8, nce_k=16, weight=0.5)
    d = Distiller(student, teacher, losses={"ce": 1.0, "crd": crd})
    fit(d, InMemoryLoader(x, y, 32, seed=2, return_index=True), **{**FIT_KW, "epochs": 1})
    saved["crd"] = {"memory_s": crd.memory_s.clone(), "memory_t": crd.memory_t.clone(),
                    "embed_s": crd.embed_s.weight.detach().clone()}

    # refusals, on every rank, before any training
    errors = {}
    for name, call in (
        ("sync_bn", lambda: fit(_equivalence_setup()[0], _equivalence_setup()[1], sync_bn=True, **FIT_KW)),
        ("list_loader", lambda: fit(_equivalence_setup()[0], [(x[:8], y[:8])], **FIT_KW)),
    ):
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    saved["errors"] = errors

    # rank 0 writes first, the others read what it wrote
    with D.main_process_first() as main:
        if main:
            (out / "written_by_rank0.txt").write_text("ready")
        saved["read"] = (out / "written_by_rank0.txt").read_text()
    torch.save(saved, out / f"fit_rank{rank}.pt")


def _worker_codistill(out: Path) -> None:
    from distill.strategies.codistill import PeerTeacher, fit_codistillation

    rank = int(os.environ["RANK"])
    saved: dict = {}
    x, y, xv, yv = _digits(256, 128)
    # 256 samples / 2 workers / batches of 32: 4 steps an epoch, 12 in all; exchanges at 0, 4, 8, 12
    res = fit_codistillation(lambda: create("cnn_digits_student"), InMemoryLoader(x, y, 32, seed=3),
                             InMemoryLoader(xv, yv, 128, shuffle=False), epochs=3, exchange_every=4, lr=0.1,
                             schedule="constant", run_dir=out / "codistill", progress=False, device="cpu")
    saved["history"] = res.history
    saved["workers"] = res.workers
    saved["model"] = {k: v.clone() for k, v in res.model.state_dict().items()}
    saved["peer"] = {k: v.clone() for k, v in res.peers.peers[0].state_dict().items()}
    saved["peer_frozen"] = all(not p.requires_grad for p in res.peers.parameters()) and not res.peers.peers[0].training
    saved["exchange"] = (res.peers.steps, res.peers.last_exchange_step, res.peers.exchanges)

    # staleness: between exchanges the copy keeps the other worker's weights as of the last exchange
    torch.manual_seed(rank)
    lin = nn.Linear(4, 3)
    src = PeerTeacher(lin, exchange_every=3)
    snaps = {}
    for step in range(1, 8):
        with torch.no_grad():
            lin.weight.add_(0.5 * (rank + 1))  # an "optimizer step"
        src.on_step_end(lin)
        snaps[step] = {k: v.clone() for k, v in lin.state_dict().items()}
    saved["stale"] = {"peer": {k: v.clone() for k, v in src.peers[0].state_dict().items()}, "snaps": snaps,
                      "last_exchange_step": src.last_exchange_step,
                      "view": {k: tuple(v.shape) for k, v in src(Batch(torch.randn(5, 4))).items()}}
    torch.save(saved, out / f"codistill_rank{rank}.pt")


def _worker_all(out: Path) -> None:
    _worker_fit(out)
    _worker_codistill(out)


_WORKERS = {"fit": _worker_fit, "codistill": _worker_codistill, "all": _worker_all}


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, out: Path, nproc: int = 2, script: str = __file__, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run ``scenario`` in ``nproc`` processes with torchrun (gloo, one thread each): ``script``'s
    ``__main__`` block with arguments ``scenario`` and ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "digits.pt"
    torch.save(_digits(256, 128), data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", script, scenario, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", DATA_ENV: str(data)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


def _saves(out: Path, scenario: str, nproc: int = 2) -> list[dict]:
    return [torch.load(out / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch for every multi-process check (a launch costs seconds of imports)."""
    out = tmp_path_factory.mktemp("torchrun")
    _launch("all", out)
    return out


@pytest.fixture(scope="module")
def fit_runs(launched):
    return launched, _saves(launched, "fit")


@pytest.fixture(scope="module")
def single_run():
    d, train, val = _equivalence_setup()
    result = fit(d, train, val, **FIT_KW)
    return _snapshot(d, result.history)


@pytest.fixture(scope="module")
def codistill_runs(launched):
    return launched, _saves(launched, "codistill")


# --------------------------------------------------------------------------------------------
# DDP fit
# --------------------------------------------------------------------------------------------


def test_ddp_fit_matches_single_process_with_the_same_global_batch(fit_runs, single_run):
    _, ranks = fit_runs
    for rank in ranks:
        got = rank["ddp"]
        assert set(got["student"]) == set(single_run["student"])
        for k, v in single_run["student"].items():
            # the same updates up to the order of floating-point sums (gradient halves, then all-reduce)
            assert torch.allclose(got["student"][k], v, rtol=1e-4, atol=1e-5), k
        # the per-sample records (one row per training sample) equal the single-process ones on every rank
        assert torch.equal(got["kcd_count"], single_run["kcd_count"])
        assert torch.allclose(got["kcd_value"], single_run["kcd_value"], atol=1e-5)
        assert int(got["kcd_count"].sum()) == 2 * 99  # every sample recorded once an epoch, none twice
        # logged training losses are the global batch's, evaluation is rank 0's on every rank
        for mine, ref in zip(got["history"], single_run["history"]):
            assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
            assert mine["train_kcd"] == pytest.approx(ref["train_kcd"], rel=1e-4)
            assert mine["val_student_acc"] == pytest.approx(ref["val_student_acc"])
        assert rank["train_after"] == (0, 1)
    assert ranks[0]["ddp"]["history"] == ranks[1]["ddp"]["history"]


def test_ddp_writes_metrics_and_checkpoints_once(fit_runs):
    out, ranks = fit_runs
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # one writer: two writers would double the lines
    assert rows == json.loads(json.dumps(ranks[0]["ddp"]["history"]))
    last = torch.load(out / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert last["epoch"] == 1
    for k, v in ranks[0]["ddp"]["student"].items():
        assert torch.equal(last["distiller"]["student"][k], v), k
    assert (out / "run" / "checkpoints" / "best.pt").is_file()
    assert sorted(p.name for p in (out / "run").iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_ddp_resume_continues_the_run(fit_runs):
    _, ranks = fit_runs
    for rank in ranks:
        for k, v in rank["ddp"]["student"].items():
            assert torch.allclose(rank["resumed"]["student"][k], v, atol=1e-6), k
        assert torch.equal(rank["resumed"]["kcd_count"], rank["ddp"]["kcd_count"])


def test_ddp_memory_banks_stay_equal_on_every_rank(fit_runs):
    _, (r0, r1) = fit_runs
    for key in ("memory_s", "memory_t", "embed_s"):
        assert torch.equal(r0["crd"][key], r1["crd"][key]), key
    assert r0["crd"]["memory_s"].shape == (96, 8)


def test_ddp_refusals_before_training(fit_runs):
    _, ranks = fit_runs
    for rank in ranks:
        assert rank["read"] == "ready"  # main_process_first: rank 0's file was there for rank 1
        assert "GPU" in rank["errors"]["sync_bn"]
        assert "shard" in rank["errors"]["list_loader"] and "list" in rank["errors"]["list_loader"]


# --------------------------------------------------------------------------------------------
# Codistillation
# --------------------------------------------------------------------------------------------


def test_codistillation_peers_hold_the_other_workers_weights(codistill_runs):
    _, ranks = codistill_runs
    for rank, saved in enumerate(ranks):
        other = ranks[1 - rank]
        assert saved["exchange"] == (12, 12, 4)  # at the start and after steps 4, 8 and 12
        for k, v in other["model"].items():  # the last exchange came after the last step
            assert torch.equal(saved["peer"][k], v), k
        assert saved["peer_frozen"]
        # between exchanges: the other worker's weights as of the last exchange (step 6), not its current ones
        stale = saved["stale"]
        assert stale["last_exchange_step"] == 6
        for k, v in other["stale"]["snaps"][6].items():
            assert torch.equal(stale["peer"][k], v), k
        assert not torch.equal(stale["peer"]["weight"], other["stale"]["snaps"][7]["weight"])
        assert stale["view"] == {"peer_logits": (1, 5, 3), "logits": (5, 3)}
    assert not torch.equal(ranks[0]["model"]["fc.weight"], ranks[1]["model"]["fc.weight"])  # two models


def test_codistillation_loss_falls_and_burn_in(codistill_runs):
    out, ranks = codistill_runs
    for rank, saved in enumerate(ranks):
        losses = [row["train_loss"] for row in saved["history"]]
        assert losses[-1] < losses[0], losses
        kd = [row["train_codistillation"] for row in saved["history"]]
        assert kd[0] == 0.0 and kd[1] > 0.0  # the burn-in (one exchange interval: epoch 0's 4 steps)
        assert "val_teacher_acc" in saved["history"][-1]  # the peers' ensemble, evaluated
        rows = (out / "codistill" / f"worker{rank}" / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 3
        assert [w["rank"] for w in saved["workers"]] == [0, 1]


# --------------------------------------------------------------------------------------------
# In-process: sharding, helpers, refusals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch, world", [(21, 8, 2), (21, 8, 3), (20, 8, 2), (17, 8, 2), (9, 4, 4)])
def test_batch_shards_make_up_the_single_process_batch(n, batch, world):
    x, y = torch.randn(n, 1, 8, 8), torch.arange(n) % 10
    single = InMemoryLoader(x, y, batch, seed=5, return_index=True, augment=RandomCropPad(2))
    single.set_epoch(2)
    shards = []
    for r in range(world):
        loader = InMemoryLoader(x, y, batch, seed=5, return_index=True, augment=RandomCropPad(2))
        loader.set_shard(r, world)
        loader.set_epoch(2)
        shards.append(list(loader))
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    full = list(single)
    tail = n % batch
    expected = full[:-1] if 0 < tail < world else full  # a last batch smaller than the world is dropped
    assert len(shards[0]) == len(expected)
    for k, ref in enumerate(expected):
        parts = [s[k] for s in shards]
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
        assert torch.equal(torch.cat([p.index for p in parts]), ref.index)
        assert torch.equal(torch.cat([p.inputs for p in parts]), ref.inputs)  # the same augmented views
        assert torch.equal(torch.cat([p.targets for p in parts]), ref.targets)


@pytest.mark.parametrize("n, batch, world, drop_last", [(21, 4, 2, False), (21, 4, 3, True), (3, 2, 4, False)])
def test_sample_shards_are_disjoint_and_cover_the_epoch(n, batch, world, drop_last):
    x, y = torch.randn(n, 3), torch.arange(n)
    loaders = []
    for r in range(world):
        loader = InMemoryLoader(x, y, batch, seed=7, return_index=True, drop_last=drop_last)
        loader.set_shard(r, world, split="samples")
        loaders.append(loader)
    seen = [torch.cat([b.index for b in loader]) for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1
    every = torch.cat(seen)
    if drop_last:
        assert len(set(every.tolist())) == len(every) == world * ((n // world) // batch) * batch
    else:
        assert set(every.tolist()) == set(range(n))  # padded by repeating a few samples
        assert len({len(s) for s in seen}) == 1


def test_set_shard_errors_and_repr():
    loader = InMemoryLoader(torch.randn(10, 2), None, 4)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        loader.set_shard(2, 2)
    with pytest.raises(TypeError, match="world_size must be an int"):
        loader.set_shard(0, 2.0)
    with pytest.raises(ValueError, match="split must be one of"):
        loader.set_shard(0, 2, split="rows")
    loader.set_shard(1, 2)
    assert "shard=1/2 (batch)" in repr(loader)
    loader.set_shard(0, 1)
    assert "shard" not in repr(loader) and len(loader) == 3


def test_shard_loader_helper_and_sampler_epochs():
    info = D.DistInfo(rank=1, world_size=2)
    loader = InMemoryLoader(torch.randn(8, 2), torch.zeros(8, dtype=torch.long), 4)
    with D.shard_loader(loader, info) as sharded:
        assert (sharded.rank, sharded.world_size) == (1, 2) and len(next(iter(sharded))) == 2
    assert (loader.rank, loader.world_size) == (0, 1)
    with pytest.raises(ValueError, match="every rank would train on all the data"), \
            D.shard_loader([torch.zeros(2)], info):
        pass
    ds = TensorDataset(torch.randn(8, 2))
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    dl = DataLoader(ds, batch_size=2, sampler=sampler)
    with D.shard_loader(dl, info):
        pass
    with pytest.raises(ValueError, match="rank 1 of 2, but this process is rank 0 of 2"), \
            D.shard_loader(dl, D.DistInfo(rank=0, world_size=2)):
        pass
    D.set_loader_epoch(dl, 3)
    assert sampler.epoch == 3
    with D.shard_loader(loader, D.DistInfo()):  # a single process: nothing to shard
        assert loader.world_size == 1


def test_dist_info_reads_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = D.dist_info()
    assert info == D.DistInfo(3, 4, 1) and info.enabled and not info.is_main
    assert D.resolve_device("cuda", info) == torch.device("cuda", 1)
    assert D.resolve_device("cuda:0", info) == torch.device("cuda", 0)
    assert D.resolve_device("cpu", info) == torch.device("cpu")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init_distributed("cpu") == D.DistInfo(3, 1, 1)  # a single process initialises nothing


def test_single_process_refusals(monkeypatch):
    from distill.strategies.codistill import PeerTeacher, fit_codistillation

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d, train, _ = _equivalence_setup()
    with pytest.raises(ValueError, match="ddp=True needs a multi-process launch"):
        fit(d, train, ddp=True, **FIT_KW)
    with pytest.raises(ValueError, match="ddp must be"):
        fit(d, train, ddp="yes", **FIT_KW)
    with pytest.raises(ValueError, match="at least 2 processes"):
        fit_codistillation(lambda: nn.Linear(2, 2), train, epochs=1)
    with pytest.raises(RuntimeError, match="process group"):
        PeerTeacher(nn.Linear(2, 2))
    for kwargs, needle in (({"teacher": nn.Linear(2, 2)}, "teacher=None"), ({"weight": -1.0}, "psi"),
                           ({"T": 0}, "T must"), ({"exchange_every": 0}, "exchange_every"),
                           ({"burn_in_steps": -1}, "burn_in_steps"), ({"data": "half"}, "data must"),
                           ({"ddp": True}, "ddp"), ({"epochs": 0}, "epochs")):
        with pytest.raises(ValueError, match=needle):
            fit_codistillation(lambda: nn.Linear(2, 2), train, **{"epochs": 1, **kwargs})


def test_sync_bn_is_refused_on_cpu():
    d = Distiller(create("cnn", widths=(4, 8), num_classes=10), None, losses={"ce": 1.0})
    with pytest.raises(ValueError, match="SyncBatchNorm runs on CUDA"):
        D.convert_sync_batchnorm(d, torch.device("cpu"))


def test_distill_run_under_torchrun_writes_one_set_of_files(tmp_path):
    """``torchrun -m distill run RECIPE``: every rank runs the recipe; rank 0 alone writes the teacher,
    the summaries, the report and prints the table."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "# tiny\nname: ddp_kd\nseeds: [0]\n"
        "data: {name: digits, val_split: val, train_subset: 64, batch_size: 16}\n"
        "student: {name: cnn_digits_student}\n"
        "teacher: {model: {name: cnn_digits_teacher}, train: {epochs: 1, lr: 0.05}}\n"
        "losses: {ce: 1.0, kd: {T: 4.0}}\ntrain: {epochs: 1, lr: 0.05}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "distill", "run", str(recipe),
           "--out", str(tmp_path / "runs"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("run folder:") == 1  # one rank prints
    run = tmp_path / "runs" / "ddp_kd"
    assert (run / "teacher" / "model.safetensors").is_file() and (run / "report.md").is_file()
    summary = json.loads((run / "seed0" / "summary.json").read_text())
    assert summary["last_acc"] is not None
    assert not list(run.rglob("*.tmp"))  # no half-written checkpoint left by a second writer


def test_codistillation_is_registered():
    from distill.strategies.registry import strategy_info

    info = strategy_info("codistillation")
    assert info.family == "online" and info.paper.arxiv == "1804.03235"


if __name__ == "__main__":  # a torchrun worker: python -m torch.distributed.run ... test_distributed.py SCENARIO OUT
    torch.set_num_threads(1)
    _WORKERS[sys.argv[1]](Path(sys.argv[2]))


def test_shutdown_destroys_the_group_and_is_a_no_op_without_one():
    """The command line tears the group down when a command ends (not at interpreter exit, where
    gloo aborted a rank now and then on a loaded machine); without a group nothing happens."""
    import torch.distributed as dist

    D.shutdown_distributed(wait=True)  # no group: nothing to do, nothing raised
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    assert dist.is_initialized()
    D.shutdown_distributed(wait=True)
    assert not dist.is_initialized()
