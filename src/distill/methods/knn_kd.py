r"""Nearest neighbour knowledge distillation: a kNN datastore's retrieval distribution as the teacher.

Yang, Sun & Wan, "Nearest Neighbor Knowledge Distillation for Neural Machine Translation", NAACL
2022, arXiv 2205.00479. A trained model's hidden states at every target position of the training
set are stored with the gold token they precede (:class:`KNNDatastore`, the kNN-MT datastore of
Khandelwal et al., ICLR 2021, arXiv 2010.00710); the kNN search for every training token is done
once, before training (:meth:`KNNDatastore.precompute`); the retrieval distribution

.. math::

    p_{kNN}(y_t) \propto \sum_{j \in N_t} 1[v_j = y_t]\, \exp(-d_j / T)

(:func:`distill.functional.knn.knn_distribution`) is the teacher of a student trained with the
cross-entropy on the gold tokens plus the KL to it (:class:`KNNKD`). The datastore is saved with
safetensors (tensors only, nothing executes on load) and reused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.batch import Batch, View, as_batch, run_model
from distill.functional.knn import knn_distribution, knn_search
from distill.functional.seq2seq_kd import aligned_targets
from distill.functional.tokens import token_mask
from distill.integrations import require
from distill.methods.base import Paper, register
from distill.methods.cmlm import SoftTargetTokenKD
from distill.teachers import TeacherSource

__all__ = ["KNNDatastore", "KNNKD", "KNNTeacher", "lm_head_inputs"]

PAPER = Paper(
    title="Nearest Neighbor Knowledge Distillation for Neural Machine Translation",
    authors="Z. Yang, R. Sun, X. Wan",
    year=2022,
    arxiv="2205.00479",
    venue="NAACL",
)


def lm_head_inputs(model: nn.Module, batch: Batch) -> Tensor:
    """The hidden states ``(B, L, H)`` that enter ``model``'s output head (``get_output_embeddings()``):
    the decoder's final representation kNN-MT keys on. One forward under ``no_grad``."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no output head (get_output_embeddings()): the kNN datastore keys "
                        "on the hidden states entering it; use a Hugging Face *ForCausalLM / *ForConditionalGeneration")
    seen: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            run_model(model, batch)
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(model).__name__}'s output head was not called in its forward")
    return seen[-1]


class KNNDatastore:
    """Keys (hidden states), values (gold tokens) and where each entry came from; exact search.

    Attributes:
        keys: ``(M, H)`` float32. values: ``(M,)`` long, the token that the logit row of the key
        predicts. sample: ``(M,)`` long, the data set index of its sequence. position: ``(M,)`` long,
        its logit row in that sequence. neighbours / distances: ``(M, k)`` each entry's precomputed
        nearest entries (itself excluded) and squared distances, or ``None``.
        causal: the alignment it was built with (row ``t`` predicts ``labels[t + 1]`` if True).
    """

    def __init__(self, keys: Tensor, values: Tensor, sample: Tensor, position: Tensor, *, causal: bool,
                 neighbours: Tensor | None = None, distances: Tensor | None = None) -> None:
        M = keys.shape[0]
        if keys.dim() != 2 or any(t.shape != (M,) for t in (values, sample, position)):
            raise ValueError(f"a datastore needs keys (M, H) and values, sample, position (M,), got {tuple(keys.shape)}, "
                             f"{tuple(values.shape)}, {tuple(sample.shape)}, {tuple(position.shape)}")
        if M == 0:
            raise ValueError("the datastore is empty: the loader gave no labelled token")
        self.keys, self.values = keys.float(), values.long()
        self.sample, self.position = sample.long(), position.long()
        self.causal = bool(causal)
        self.neighbours, self.distances = neighbours, distances
        self._lookup: Tensor | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @classmethod
    def build(cls, model: nn.Module, loader: Iterable[Any], *, causal: bool) -> KNNDatastore:
        """Run a trained ``model`` (eval mode, no gradients) over ``loader`` once and store every labelled
        token. Each batch needs labels ``(B, L)`` and ``index`` ``(B,)`` (the sequences' data set
        positions, which the teacher looks entries up by)."""
        was = model.training
        model.eval()
        keys, values, samples, positions = [], [], [], []
        try:
            for raw in loader:
                batch = as_batch(raw)
                if batch.targets is None or batch.index is None:
                    raise ValueError("building a kNN datastore needs batches with labels and index (the data set "
                                     "position of each sequence)")
                hidden = lm_head_inputs(model, batch)
                labels = batch.targets
                if tuple(hidden.shape[:2]) != tuple(labels.shape):
                    raise ValueError(f"the model's hidden states {tuple(hidden.shape)} do not line up with the labels "
                                     f"{tuple(labels.shape)}")
                mask = token_mask(labels, causal)
                b, t = mask.nonzero(as_tuple=True)
                keys.append(hidden[b, t].float().cpu())
                values.append(aligned_targets(labels, causal)[b, t].cpu())
                samples.append(batch.index.long().to(b.device)[b].cpu())
                positions.append(t.cpu())
        finally:
            model.train(was)
        if not keys:
            raise ValueError("the loader is empty: nothing to build a datastore from")
        return cls(torch.cat(keys), torch.cat(values), torch.cat(samples), torch.cat(positions), causal=causal)

    def precompute(self, k: int, *, chunk_size: int = 4096) -> KNNDatastore:
        """Search the ``k`` nearest neighbours of every entry (itself excluded) once; kept and saved."""
        self.distances, self.neighbours = knn_search(self.keys, self.keys, k,
                                                     exclude=torch.arange(len(self)), chunk_size=chunk_size)
        return self

    def entries(self, sample: Tensor, position: Tensor) -> Tensor:
        """The entry of each ``(sample, position)`` pair ``(N,)``, -1 where there is none."""
        if self._lookup is None:
            table = torch.full((int(self.sample.max()) + 1, int(self.position.max()) + 1), -1, dtype=torch.long)
            table[self.sample, self.position] = torch.arange(len(self))
            self._lookup = table
        table = self._lookup
        s, p = sample.long().cpu(), position.long().cpu()
        inside = (s >= 0) & (s < table.shape[0]) & (p >= 0) & (p < table.shape[1])
        out = torch.full_like(s, -1)
        out[inside] = table[s[inside], p[inside]]
        return out

    def save(self, path: str | Path) -> Path:
        """Write the datastore to one safetensors file (refuses to replace an existing one)."""
        st = require("safetensors.torch", "llm", "saving a kNN datastore")
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists: a datastore is never silently replaced; remove it or pick another")
        tensors = {"keys": self.keys.contiguous(), "values": self.values.contiguous(),
                   "sample": self.sample.contiguous(), "position": self.position.contiguous()}
        if self.neighbours is not None and self.distances is not None:
            tensors.update(neighbours=self.neighbours.contiguous(), distances=self.distances.contiguous())
        st.save_file(tensors, str(path), metadata={"causal": str(self.causal), "format": "distill.knn_datastore.v1"})
        return path

    @classmethod
    def load(cls, path: str | Path) -> KNNDatastore:
        """Read a datastore written by :meth:`save` (tensors only: nothing in the file executes)."""
        safetensors = require("safetensors", "llm", "loading a kNN datastore")
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "distill.knn_datastore.v1":
                raise ValueError(f"{path} is not a kNN datastore written by KNNDatastore.save (format "
                                 f"{meta.get('format')!r})")
            t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
        return cls(t["keys"], t["values"], t["sample"], t["position"], causal=meta.get("causal") == "True",
                   neighbours=t.get("neighbours"), distances=t.get("distances"))


class KNNTeacher(TeacherSource):
    """The kNN retrieval distribution of each training token as the teacher's view.

    Args:
        datastore: a :class:`KNNDatastore` built over the training set by a trained model.
        vocab_size: ``V``, the student's vocabulary size.
        k: neighbours per token (the precomputed ones are used when the datastore has at least ``k``).
        T: the retrieval temperature, ``softmax(−d / T)`` over the neighbours.

    View: ``{"logits": (B, L, V)}`` holding ``log p_kNN`` (``-inf`` for tokens no neighbour carries)
    at each labelled row, aligned as the datastore was built (``causal``), 0 elsewhere. The batch
    needs ``index`` ``(B,)``: the training token's own entry is found by (sequence, row), its key is
    the query, and the entry itself is excluded from its neighbours (the paper's datastore and
    training set coincide; retrieving the query itself would only echo the gold token, which the
    cross-entropy term already gives — our reading, not a detail we could check in the paper).
    """

    kind = "knn"
    static = True

    def __init__(self, datastore: KNNDatastore, vocab_size: int, *, k: int = 64, T: float = 100.0) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not (math.isfinite(T) and T > 0):
            raise ValueError(f"temperature T must be a finite number > 0, got {T!r}")
        if k >= len(datastore):
            raise ValueError(f"k={k} but the datastore has {len(datastore)} entries (one is the query itself)")
        if int(datastore.values.max()) >= vocab_size:
            raise ValueError(f"the datastore holds token {int(datastore.values.max())}, outside vocab_size={vocab_size}")
        self.datastore, self.vocab_size, self.k, self.T = datastore, int(vocab_size), k, float(T)

    def forward(self, batch: Batch) -> View:
        if batch.targets is None or batch.index is None:
            raise ValueError("the kNN teacher needs batches with labels (B, L) and index (B,), the data set position "
                             "of each sequence that the datastore was built with")
        ds, labels = self.datastore, batch.targets
        mask = token_mask(labels, ds.causal)
        b, t = mask.nonzero(as_tuple=True)
        entry = ds.entries(batch.index.to(b.device)[b], t)
        if bool((entry < 0).any()):
            i = int((entry < 0).nonzero()[0, 0])
            raise KeyError(f"sequence {int(batch.index[b[i]])}, row {int(t[i])} has no datastore entry: build the "
                           "datastore over this training set (same order, same alignment)")
        if ds.neighbours is not None and ds.neighbours.shape[1] >= self.k:
            idx, dist = ds.neighbours[entry, :self.k], ds.distances[entry, :self.k]
        else:
            dist, idx = knn_search(ds.keys[entry], ds.keys, self.k, exclude=entry)
        probs = knn_distribution(dist, ds.values[idx], self.vocab_size, self.T)
        B, L = labels.shape
        out = torch.zeros(B, L, self.vocab_size, device=labels.device)
        out[b, t] = probs.log().to(labels.device)
        return {"logits": out}


@register("knn_kd", "seq2seq", PAPER)
class KNNKD(SoftTargetTokenKD):
    """kNN-KD: ``ce · CE(s, y) + kd · KL(p_kNN ‖ softmax(s))`` per labelled token.

    Yang, Sun & Wan, "Nearest Neighbor Knowledge Distillation for Neural Machine Translation",
    NAACL 2022, arXiv 2205.00479. The teacher is :class:`KNNTeacher` (its view holds ``log p_kNN``;
    the retrieval temperature lives there, so no temperature or ``T²`` here). The paper writes the
    KD term as the cross-entropy ``−Σ p_kNN log q``; the KL differs by ``p_kNN``'s entropy (same
    gradient, 0 at agreement).

    Shapes: student logits ``(B, L, V)``, the teacher's ``(B, L, V)``, labels ``(B, L)``.
    ``causal`` as the datastore was built (``False`` for seq2seq decoders).

    Defaults ``ce = kd = 0.5`` (an even interpolation) and the teacher's ``k = 64``, ``T = 100`` are
    as recalled from the paper / kNN-MT and not confirmed: only the paper's abstract and
    introduction could be read through our search tool.
    """

    def __init__(self, *, kd: float = 0.5, ce: float = 0.5, causal: bool = False, reduction: str = "token",
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        # T = 1: the retrieval temperature is the teacher's (KNNTeacher), its view already log p_kNN
        super().__init__(kd=kd, ce=ce, T=1.0, causal=causal, reduction=reduction, weight=weight,
                         warmup_epochs=warmup_epochs)
