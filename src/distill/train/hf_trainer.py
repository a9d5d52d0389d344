"""A ``transformers.Trainer`` that distills: :func:`DistillTrainer`.

For users of the Hugging Face training loop (and of TRL, whose ``GKDTrainer`` is the model): the
Trainer keeps everything it does (gradient accumulation, bf16, ``save_steps`` checkpoints and
``resume_from_checkpoint``, logging, evaluation, ``save_model``), and its ``compute_loss`` runs a
:class:`~distill.Distiller` (student = the Trainer's model; teacher and losses as given) on the
Trainer's batch dict and returns the Distiller's total loss.

``transformers`` is imported only when a trainer is built (:func:`distill_trainer_class`), so
``import distill`` never imports it::

    from distill.train.hf_trainer import DistillTrainer

    trainer = DistillTrainer(student, TrainingArguments("out", gradient_accumulation_steps=4, bf16=True),
                             teacher=teacher, losses={"gkd": {"beta": 0.5}}, train_dataset=ds,
                             data_collator=collate)
    trainer.train()
    trainer.save_model("student")          # the student's save_pretrained (config + safetensors)

What it does beyond the Trainer:

* The teacher (a frozen model, eval mode, no gradient: :class:`~distill.teachers.FrozenTeacher`) is
  not part of the Trainer's model: it follows the model's device at each step (unless it was given a
  device of its own), is never trained, saved or checkpointed.
* Gradient accumulation: the Trainer sums the micro-batches' returned losses' gradients. When every
  loss is a mean over tokens (``reduction="token"``, the token methods' default) and the Trainer
  counted the accumulated batch's labelled tokens (``num_items_in_batch``, as it does for Hugging Face
  causal LMs), each micro-batch's mean is weighted by its share of those tokens, so accumulating
  ``k`` micro-batches gives the gradient of the token mean over the whole accumulated batch (what one
  batch ``k`` times larger gives). Otherwise (another reduction, a ``batch_transform``, which may
  rebuild labels, as on-policy sampling does, a model for which the Trainer does not count tokens)
  each micro-batch's loss is divided by the number of micro-batches, the Trainer's usual convention.
* ``batch_transform``: applied to each training batch (a :class:`~distill.batch.TokenBatch`) before
  the Distiller sees it, e.g. :class:`distill.strategies.gkd.OnPolicy` for on-policy GKD (with
  probability λ the completions are sampled from the student). When it has ``set_epoch`` it is told
  the Trainer's optimizer step (``state.global_step``) before that step's first micro-batch, so its
  draws depend on the step, and a resumed run samples what the uninterrupted one did.
* Batch columns: ``index`` (``idx``, ``indices``: what a cached teacher reads) is kept even when
  ``remove_unused_columns=True``, and never passed to the model; with ``remove_unused_columns=False``
  only the keys the model's forward names (and ``labels``, ``index``) are kept.
* bf16/fp16: the Distiller (student, teacher and losses) runs under the Trainer's accelerator
  autocast; the token losses compute in float32 inside it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from distill.batch import Batch, TokenBatch, as_batch
from distill.distiller import Distiller
from distill.integrations import require

__all__ = ["DistillTrainer", "distill_trainer_class"]

INDEX_KEYS = ("index", "idx", "indices")
IGNORE = -100

_CLASS: type | None = None


def DistillTrainer(model: nn.Module, args: Any = None, *, teacher: Any, losses: Mapping[str, Any] | None = None,
                   batch_transform: Callable[[Batch], Batch] | None = None, **trainer_kwargs: Any) -> Any:
    """A ``transformers.Trainer`` (an instance of :func:`distill_trainer_class`) whose loss is a Distiller's.

    Args:
        model: the student (any ``nn.Module`` the Trainer accepts; usually a ``PreTrainedModel``).
        args: ``transformers.TrainingArguments`` (default: the Trainer's).
        teacher: the teacher model or teacher source (:class:`~distill.Distiller`'s ``teacher``).
        losses: the Distiller's losses (default ``{"ce": 1.0, "kd": 1.0}``, the Distiller's; for
            language models give token losses, e.g. ``{"token_kl": 1.0}`` or ``{"gkd": {"beta": 0.5}}``).
            Methods with trainable parts (adapters) are refused: the Trainer's optimizer only sees
            the model.
        batch_transform: applied to each training batch before the loss (see the module docstring).
        **trainer_kwargs: passed to ``transformers.Trainer`` (``train_dataset``, ``eval_dataset``,
            ``data_collator``, ``processing_class``, ``callbacks``, ``optimizers``...), except
            ``model_init`` and ``compute_loss_func``, which the distillation loss replaces.

    Raises:
        MissingExtraError: transformers is not installed (``pip install 'distill[llm]'``).
    """
    return distill_trainer_class()(model, args, teacher=teacher, losses=losses, batch_transform=batch_transform,
                                   **trainer_kwargs)


def distill_trainer_class() -> type:
    """The ``transformers.Trainer`` subclass behind :func:`DistillTrainer`, built on first use (subclass
    it to change more of the Trainer)."""
    global _CLASS
    if _CLASS is None:
        transformers = require("transformers", "llm", "DistillTrainer")
        _CLASS = _build(transformers.Trainer)
    return _CLASS


def _token_mean_losses(distiller: Distiller) -> bool | None:
    """``causal`` when every loss is a per-token mean with one token convention, else ``None``."""
    conventions = {getattr(m, "causal", None) for m in distiller.methods.values()}
    if len(conventions) != 1 or not all(getattr(m, "reduction", None) == "token" for m in distiller.methods.values()):
        return None
    (causal,) = conventions
    return causal if isinstance(causal, bool) else None


def _build(base: type) -> type:
    class _DistillTrainer(base):  # type: ignore[misc, valid-type]
        """``transformers.Trainer`` with a :class:`~distill.Distiller`'s loss (see :func:`DistillTrainer`)."""

        # compute_loss scales each micro-batch's loss for gradient accumulation itself
        loss_is_scaled_for_ga = True

        def __init__(self, model: nn.Module, args: Any = None, *, teacher: Any,
                     losses: Mapping[str, Any] | None = None,
                     batch_transform: Callable[[Batch], Batch] | None = None, **kwargs: Any) -> None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"DistillTrainer: model (the student) must be an nn.Module, got "
                                f"{type(model).__name__}")
            for key in ("model_init", "compute_loss_func"):
                if kwargs.get(key) is not None:
                    raise ValueError(f"DistillTrainer: {key} is not supported (the distillation loss is the loss; "
                                     "pass the student as model)")
            if teacher is None:
                raise ValueError("DistillTrainer needs a teacher (a model or a teacher source)")
            if batch_transform is not None and not callable(batch_transform):
                raise TypeError(f"batch_transform must be a callable TokenBatch -> TokenBatch or None, "
                                f"got {batch_transform!r}")
            distiller = Distiller(model, teacher, losses)
            trainable = [n for n, p in distiller.methods.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(f"DistillTrainer: the losses have trainable parts {trainable[:5]}, which the Trainer's "
                                 "optimizer (built from the model alone) would never update; use distill.fit, or "
                                 "losses without adapters")
            super().__init__(model=model, args=args, **kwargs)
            self.distiller = distiller
            self.batch_transform = batch_transform
            self._transform_step: int | None = None
            self._forward_keys: tuple[set[str] | None] | None = None

        # ------------------------------------------------------------------ columns
        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            # the sample index travels with the batch (a cached teacher reads it); it never reaches the model
            self._signature_columns += [k for k in INDEX_KEYS if k not in self._signature_columns]

        def _model_keys(self, model: nn.Module) -> set[str] | None:
            """The keys the model's forward names (``None``: any key, for a forward of ``**kwargs`` only)."""
            params = inspect.signature(model.forward).parameters
            named = {k for k, p in params.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD,
                                                                   inspect.Parameter.VAR_POSITIONAL)}
            return named or None

        def _batch(self, inputs: Mapping[str, Any]) -> TokenBatch:
            if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
                raise ValueError("DistillTrainer expects Hugging Face batches (a dict with input_ids, attention_mask, "
                                 f"labels), got {type(inputs).__name__}"
                                 + (f" with keys {sorted(inputs)}" if isinstance(inputs, Mapping) else ""))
            if not self.args.remove_unused_columns:  # every column is here: keep what the model takes
                if self._forward_keys is None:
                    self._forward_keys = (self._model_keys(self.distiller.student),)
                (keys,) = self._forward_keys
                if keys is not None:
                    inputs = {k: v for k, v in inputs.items() if k in keys or k == "labels" or k in INDEX_KEYS}
            batch = as_batch(dict(inputs))
            if not isinstance(batch, TokenBatch):  # pragma: no cover - as_batch gives one for input_ids
                raise TypeError(f"expected a TokenBatch, got {type(batch).__name__}")
            return batch

        # ------------------------------------------------------------------ devices, wrappers
        def _follow_device(self, device: torch.device) -> None:
            teacher = self.distiller.teacher
            if teacher is None or getattr(teacher, "device", None) is not None:
                return  # no teacher, or one given a device of its own (FrozenTeacher(device=...))
            tensor = next(iter(teacher.parameters()), None)
            tensor = next(iter(teacher.buffers()), None) if tensor is None else tensor
            if tensor is not None and tensor.device != device:
                teacher.to(device)

        @contextlib.contextmanager
        def _student_is(self, model: nn.Module) -> Iterator[None]:
            """Run the Distiller through ``model`` when the Trainer wrapped the student (DDP...), so
            the wrapper's hooks (gradient synchronisation) run."""
            student = self.distiller.student
            if model is student:
                yield
                return
            if any(getattr(m, "student_output", "logits") == "hidden" for m in self.distiller.methods.values()):
                raise ValueError("DistillTrainer: fused token losses (chunk_size set) run the student's body directly, "
                                 f"which would bypass the Trainer's wrapper {type(model).__name__}; leave chunk_size "
                                 "unset under DDP/DeepSpeed")
            self.distiller.student = model
            try:
                yield
            finally:
                self.distiller.student = student

        # ------------------------------------------------------------------ the loss
        def _accumulation_scale(self, batch: TokenBatch, num_items_in_batch: Any) -> Any:
            steps = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
            causal = _token_mean_losses(self.distiller)
            counted_like_us = causal is not None and causal == bool(getattr(self, "_loss_shifts_labels", causal))
            # a transform may rebuild some micro-batches' labels (on-policy): the Trainer's count is then not
            # theirs, and weighing some batches by tokens and others by 1/k would not sum to one batch
            if num_items_in_batch is None or self.batch_transform is not None or not counted_like_us \
                    or batch.targets is None:
                return 1.0 / steps
            labels = batch.targets[:, 1:] if causal else batch.targets
            scale = (labels != IGNORE).sum() / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                scale = scale * self.accelerator.num_processes  # DDP averages the ranks' gradients
            return scale

        def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            """The Distiller's total loss on the batch ``inputs`` (scaled for gradient accumulation in
            training); with ``return_outputs``, also ``{"loss", "logits"}`` (the student's logits)."""
            batch = self._batch(inputs)
            self._follow_device(batch.inputs.device)
            if self.batch_transform is not None and model.training:
                step = int(self.state.global_step)
                if step != self._transform_step and hasattr(self.batch_transform, "set_epoch"):
                    self.batch_transform.set_epoch(step)
                self._transform_step = step
                batch = self.batch_transform(batch)
            self.distiller.methods.train(model.training)
            with self._student_is(model), self.accelerator.autocast():
                out = self.distiller(batch)
            loss = out.total
            if model.training:
                loss = loss * self._accumulation_scale(batch, num_items_in_batch)
            if not return_outputs:
                return loss
            outputs = {"loss": loss}
            if "logits" in out.student:
                outputs["logits"] = out.student["logits"]
            return loss, outputs

    _DistillTrainer.__name__ = _DistillTrainer.__qualname__ = "DistillTrainer"
    _DistillTrainer.__module__ = __name__
    return _DistillTrainer
