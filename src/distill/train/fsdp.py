"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``) under torchrun.

Under DDP every rank holds the whole student, its gradients and its optimizer state; with FSDP each
rank holds a ``1/world`` shard of each parameter (a ``DTensor`` sharded on dim 0), all-gathers one
transformer block's parameters just before that block runs and frees them after, and reduce-scatters
the gradients so that each rank steps only its shard. The design here:

* **What is sharded.** :func:`shard_model` applies ``fully_shard`` to each transformer block (one
  communication group per block: the children of the model's ``ModuleList`` of decoder layers,
  e.g. ``model.model.layers`` of a Hugging Face causal LM), then to the root, which takes the rest
  (embeddings, final norm, ``lm_head``). The same call shards a frozen teacher too large for one
  device: its parameters keep ``requires_grad=False`` and it runs under ``torch.no_grad`` like any
  frozen teacher, each block gathered for its forward only.
* **Gradients.** FSDP averages the ranks' gradients (reduce-scatter divided by the world size) as
  DDP does, so ``fit``'s per-rank loss scaling for uneven batches holds unchanged, and with the same
  global batch the sharded run trains the same weights as one process up to the order of
  floating-point sums.
* **Checkpoints.** :func:`full_state_dict` gathers the full (unsharded) state dict on rank 0, on the
  CPU, so a saved student is an ordinary ``state_dict`` that loads without FSDP;
  :func:`load_full_state_dict` puts one back into a sharded model. Both are collectives: every rank
  calls them.

Reference: Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", 2023,
arXiv:2304.11277 (FSDP1; ``fully_shard`` is its per-parameter-sharding successor, FSDP2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distill.train import distributed as D

__all__ = [
    "FSDPDistiller",
    "find_block_list",
    "full_optimizer_state_dict",
    "full_state_dict",
    "is_sharded",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "shard_model",
]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_block_list(model: nn.Module) -> str:
    """The dotted path of ``model``'s transformer blocks: the ``nn.ModuleList`` of same-class modules
    holding the most parameters (``"model.layers"`` for Llama, ``"transformer.h"`` for GPT-2,
    ``"model.decoder.layers"`` for OPT...). Raises ``ValueError`` when the model has none."""
    best: tuple[int, str] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        count = _param_count(module)
        if count > 0 and (best is None or count > best[0]):
            best = (count, path)
    if best is None:
        raise ValueError(
            f"layers='auto' found no nn.ModuleList of blocks with parameters in {type(model).__name__}; pass the "
            "blocks' module paths explicitly, e.g. shard_model(model, layers=['encoder.0', 'encoder.1'])"
        )
    return best[1]


def _block_paths(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    if isinstance(layers, str):
        if layers != "auto":
            raise ValueError(f"layers must be 'auto' or a list of module paths, got the string {layers!r}")
        root = find_block_list(model)
        return [f"{root}.{i}" if root else str(i) for i in range(len(model.get_submodule(root)))]
    paths = list(layers)
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"layers must be 'auto' or a non-empty list of module paths (strings), got {layers!r}")
    names = dict(model.named_modules())
    missing = [p for p in paths if p not in names]
    if missing:
        shown = ", ".join(n for n in list(names)[1:12])
        raise ValueError(f"layers: {missing} are not submodules of {type(model).__name__} (its modules: {shown}, ...)")
    nested = [(a, b) for a in paths for b in paths if a != b and b.startswith(a + ".")]
    if nested:
        raise ValueError(f"layers: {nested[0][1]!r} lies inside {nested[0][0]!r}; list blocks that do not nest")
    return paths


def shard_model(model: nn.Module, *, layers: str | Sequence[str] = "auto", reshard_after_forward: bool = True,
                mesh: Any = None, mp_policy: Any = None, broadcast_from_rank0: bool = True) -> nn.Module:
    """Shard ``model`` over the ranks with FSDP2: ``fully_shard`` on each block, then on the root.

    Args:
        model: the student (trained) or a frozen teacher (sharded for inference), on this rank's
            device (CPU with gloo, or ``cuda:LOCAL_RANK`` with nccl). The process group must be
            initialised (:func:`distill.train.distributed.init_distributed`, which ``fit`` calls).
        layers: ``"auto"``: the children of the model's ``ModuleList`` of blocks
            (:func:`find_block_list`, e.g. ``model.layers.0`` ... of a Llama); or explicit module paths.
        reshard_after_forward: free each block's gathered parameters after its forward (and gather
            again in the backward): least memory. ``False`` keeps them to the backward (less
            communication, ZeRO-2-like memory).
        mesh: a 1-D ``DeviceMesh`` (default: every rank of the default group).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 parameters and fp32
            gradient reduction); default none.
        broadcast_from_rank0: first give every rank rank 0's parameters and buffers, so the shards
            are cut from one model even when the ranks built theirs with different seeds (DDP does
            the same at start-up). Costs one broadcast of the full model.

    Returns ``model`` itself, sharded in place: its parameters are now ``DTensor`` shards, so build
    the optimizer after this call. Raises ``RuntimeError`` without a process group and
    ``ValueError`` for a model already sharded or a bad ``layers``.
    """
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model needs an initialised process group: launch with torchrun and call "
                           "distill.train.distributed.init_distributed() (fit does) before sharding")
    if not isinstance(model, nn.Module):
        raise TypeError(f"shard_model takes an nn.Module, got {type(model).__name__}")
    already = [p or "<root>" for p, m in model.named_modules() if is_sharded(m)]
    if already:
        raise ValueError(f"{type(model).__name__} is already sharded (fully_shard on {already[:4]}); shard it once")
    paths = _block_paths(model, layers)
    if broadcast_from_rank0:
        D.broadcast_state(model)
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for path in paths:
        fully_shard(model.get_submodule(path), **kwargs)
    fully_shard(model, **kwargs)
    return model


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded ``state_dict`` of a sharded ``model``, gathered on rank 0 on the CPU (an empty dict
    on the other ranks): an ordinary state dict that loads into the model without FSDP.
    A collective: every rank must call it. A model that is not sharded gives its own state dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not any(is_sharded(m) for m in model.modules()):
        return model.state_dict()
    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load an ordinary (full) state dict into a sharded ``model``: each rank keeps its shard.
    Every rank must call it with the same ``state``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if not any(is_sharded(m) for m in model.modules()):
        model.load_state_dict(state)
        return
    set_model_state_dict(model, state, options=_options(full_state_dict=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state for a sharded ``model`` with full tensors keyed by parameter name, on
    rank 0 on the CPU (empty on the others). A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what :func:`full_optimizer_state_dict` gave into ``optimizer`` (every rank, same ``state``)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options(full_state_dict=True))


class FSDPDistiller:
    """A :class:`~distill.Distiller` whose student is sharded with FSDP2; called like the Distiller.

    The student is sharded in place (:func:`shard_model`); the teacher source is left as it is
    (shard a teacher too large for one device yourself with :func:`shard_model` before building the
    Distiller). The methods must have no trainable parameters: FSDP would not reduce their
    gradients (use DDP for methods with adapters). Per-sample buffers (CRD's banks, KCD's records)
    are kept equal on every rank as under DDP (:class:`~distill.train.distributed.PerSampleSync`).
    A student fused with its ``lm_head`` (a method with ``student_output = "hidden"``) is refused:
    the fused loss reads the ``lm_head`` weight directly, which FSDP holds sharded.
    """

    def __init__(self, distiller: Any, num_samples: int | None = None, **shard_kwargs: Any) -> None:
        trainable = [n for n, m in distiller.methods.items() if any(p.requires_grad for p in m.parameters())]
        if trainable:
            raise ValueError(f"fsdp=True: losses {trainable} have trainable parameters, whose gradients FSDP "
                             "would not average over the ranks; train them with DDP (fsdp=False)")
        fused = [n for n, m in distiller.methods.items() if getattr(m, "student_output", "logits") == "hidden"]
        if fused:
            raise ValueError(f"fsdp=True: losses {fused} fuse the student's lm_head into the loss (chunk_size is "
                             "set), which reads the lm_head weight that FSDP holds sharded; set chunk_size=None")
        self.distiller = distiller
        self.sync = D.PerSampleSync(distiller.methods, num_samples)
        if self.sync:
            self.sync.broadcast()
        D.broadcast_state(distiller.methods, buffers_only=True)
        shard_model(distiller.student, **shard_kwargs)

    def __call__(self, batch: Any) -> Any:
        return self.distiller(batch)

    def step_end(self, index: Tensor | None) -> None:
        """After ``optimizer.step()``: the Distiller's step hooks, then the per-sample rows of every rank."""
        self.distiller.step_end()
        self.sync(index)
