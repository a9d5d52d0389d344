r"""Noisy self-knowledge distillation for sequence-to-sequence models.

Liu, Shen & Lapata, "Noisy Self-Knowledge Distillation for Text Summarization", NAACL 2021, arXiv
2009.07032. The teacher has the student's own architecture (a trained copy, or the model itself);
its signal is made noisy — dropout left on in its forward pass (:class:`NoisyTeacher`) — and the
student's input is perturbed — word drop, word replacement, sentence drop
(:class:`NoisyInput`, :func:`distill.data.token_noise.noise_tokens`) — while the teacher reads the
clean input. The student minimises

.. math::

    L = ce \cdot L_{NLL}(y) + kd \cdot T^2 \sum_t KL(p_t^{teacher} \,\|\, q_t^{student})

(:class:`NoisySelfKD`), the word-level KD of the paper with its interpolation weights named for what
they weight.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from distill.batch import Batch, View
from distill.data.token_noise import noise_tokens
from distill.methods.base import Paper, register
from distill.methods.cmlm import SoftTargetTokenKD
from distill.teachers import TeacherSource, freeze
from distill.taps import Taps, logits_of, run_tapped

__all__ = ["NoisyInput", "NoisySelfKD", "NoisyTeacher", "dropout_on"]

PAPER = Paper(
    title="Noisy Self-Knowledge Distillation for Text Summarization",
    authors="Y. Liu, S. Shen, M. Lapata",
    year=2021,
    arxiv="2009.07032",
    venue="NAACL",
)

_STAT_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class dropout_on:  # noqa: N801 - a context manager used like a function
    """Within the block, ``model`` is in training mode (dropout active) except its normalisation layers
    with running statistics, which stay in eval mode (their buffers never move); modes are restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, _STAT_NORMS):
                m.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


class NoisyTeacher(TeacherSource):
    """A same-architecture teacher whose predictions are noisy: dropout kept on, optionally a noisy input.

    Args:
        model: the teacher network (HF seq2seq or any model taking the batch).
        copy_model: ``True`` (default): a frozen deep copy of ``model`` is the teacher (a trained model
            distilled into a fresh student, the paper's set-up). ``False``: ``model`` itself — pass the
            student to use its current weights (self-distillation on the fly); it is run under
            ``no_grad`` and never frozen nor registered as this source's submodule.
        dropout: run the teacher with dropout active (the paper's teacher noise).
        input_noise: keyword arguments of :func:`~distill.data.token_noise.noise_tokens` applied to the
            teacher's ``input_ids`` too (``None``: the teacher reads the clean input).
        seed: seed of the teacher-input noise generator.

    View: ``{"logits": ...}`` as the model gives them (``(B, L, V)`` for a decoder).
    """

    kind = "noisy"
    supports_taps = True

    def __init__(self, model: nn.Module, *, copy_model: bool = True, dropout: bool = True,
                 input_noise: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        if copy_model:
            self.model: nn.Module | None = freeze(copy.deepcopy(model))
            self._live: tuple[nn.Module, ...] = ()
        else:
            self.model = None
            self._live = (model,)
        self.dropout = bool(dropout)
        self.input_noise = dict(input_noise) if input_noise else None
        if self.input_noise:
            noise_tokens(torch.zeros(1, 2, dtype=torch.long), **{**self.input_noise, "generator": None})  # validate now
        self.generator = torch.Generator().manual_seed(seed)
        self._taps: Taps | None = None

    @property
    def network(self) -> nn.Module:
        return self.model if self.model is not None else self._live[0]

    def train(self, mode: bool = True) -> NoisyTeacher:
        self.training = mode
        if self.model is not None:
            self.model.eval()
        return self

    def require_taps(self, paths: list[str] | tuple[str, ...]) -> None:
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
        if paths:
            self._taps = Taps(self.network, paths, model_name="teacher")

    def forward(self, batch: Batch) -> View:
        net = self.network
        if self.input_noise and hasattr(batch, "model_kwargs"):
            ids, mask = noise_tokens(batch.inputs, batch.model_kwargs.get("attention_mask"),
                                     generator=self.generator, **self.input_noise)
            batch = replace(batch, inputs=ids, model_kwargs={**batch.model_kwargs, "attention_mask": mask})
        modes = [(m, m.training) for m in net.modules()]
        try:
            if self.dropout:
                with dropout_on(net):
                    with torch.no_grad():
                        output, store = run_tapped(net, batch, self._taps)
            else:
                net.eval()
                with torch.no_grad():
                    output, store = run_tapped(net, batch, self._taps)
        finally:
            for m, mode in modes:
                m.training = mode
        return {"logits": logits_of(output), **store}


class NoisyInput(nn.Module):
    """Wrap a model so that, in training mode, its ``input_ids`` (and ``attention_mask``) are noised first.

    Args:
        model: the student.
        drop, replace, sentence_drop, vocab_size, keep, sentence_end, pad_id: as
            :func:`~distill.data.token_noise.noise_tokens` (the paper's word drop, word replacement
            and sentence drop). ``keep`` defaults to the model config's pad/bos/eos/decoder-start ids.
        seed: seed of the noise generator (a run is reproducible).

    In eval mode the wrapper is the model itself. Only ``input_ids`` (the source) are noised; the
    decoder's inputs and the labels are left alone. ``.model`` is the wrapped student (generate and
    save with it).
    """

    def __init__(self, model: nn.Module, *, drop: float = 0.1, replace: float = 0.1, sentence_drop: float = 0.0,
                 vocab_size: int | None = None, keep: tuple[int, ...] | None = None,
                 sentence_end: tuple[int, ...] = (), pad_id: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        config = getattr(model, "config", None)
        if vocab_size is None:
            vocab_size = getattr(config, "vocab_size", None)
        if keep is None:
            keep = tuple(int(i) for i in (getattr(config, n, None) for n in
                                          ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"))
                         if i is not None)
        if pad_id is None:
            pad_id = int(getattr(config, "pad_token_id", None) or 0)
        self.noise = dict(drop=drop, replace=replace, sentence_drop=sentence_drop, vocab_size=vocab_size,
                          keep=tuple(keep), sentence_end=tuple(sentence_end), pad_id=pad_id)
        noise_tokens(torch.zeros(1, 2, dtype=torch.long), **self.noise)  # validate the rates now
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        if self.training and input_ids is not None:
            input_ids, attention_mask = noise_tokens(input_ids, attention_mask, generator=self.generator, **self.noise)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.model(input_ids=input_ids, **kwargs)


@register("noisy_self_kd", "seq2seq", PAPER)
class NoisySelfKD(SoftTargetTokenKD):
    """Noisy self-KD: ``ce · CE(s, y) + kd · T² · KL(softmax(t/T) ‖ softmax(s/T))`` per labelled token.

    Liu, Shen & Lapata, "Noisy Self-Knowledge Distillation for Text Summarization", NAACL 2021, arXiv
    2009.07032. Pair it with :class:`NoisyTeacher` (dropout on in the teacher) and a
    :class:`NoisyInput` student (word drop / replacement / sentence drop on the source); the loss
    itself is word-level KD interpolated with the NLL, the noise lives in the teacher source and the
    student wrapper. The paper writes the soft cross-entropy; the KL differs by the teacher's entropy.

    Shapes: student logits ``(B, L, V)``, teacher logits ``(B, L, V)``, labels ``(B, L)``.

    Defaults: ``ce = kd = 0.5`` and ``T = 1`` (the teacher's smoothed labels used as they are) are our
    reading, and the noise rates of :class:`NoisyInput` (0.1 each) our choice: only the paper's
    abstract and introduction could be read through our search tool.
    """

    student_tempered = True  # Hinton's convention: both at T, times T²

    def __init__(self, *, kd: float = 0.5, ce: float = 0.5, T: float = 1.0, causal: bool = False,
                 reduction: str = "token", weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(kd=kd, ce=ce, T=T, causal=causal, reduction=reduction, weight=weight,
                         warmup_epochs=warmup_epochs)

