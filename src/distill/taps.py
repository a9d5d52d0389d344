"""Taps: capture the output (or input) of submodules by dotted path, with forward hooks.

No model is rewritten, so any ``nn.Module`` works: ``"layer3"``, ``"blocks.11.mlp"``,
``"fc:input"`` (the input of ``fc``, e.g. a pooled feature).

Hugging Face models are tapped the same way by module path (``"model.layers.3"``,
``"model.layers.3.self_attn"``: a module returning a tuple is tapped at its first tensor), and
also by the fields of their output: ``"hidden_states.3"`` (the fourth entry of
``output.hidden_states``, i.e. after three layers; ``-1`` the last), ``"attentions.2"``,
``"encoder_hidden_states.1"``..., which ask the model for ``output_hidden_states`` /
``output_attentions`` only when tapped.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from distill.batch import Batch, run_model

# fields of a Hugging Face ModelOutput that a tap can name as "<field>.<layer>"
OUTPUT_FIELDS = {
    "hidden_states": "output_hidden_states", "encoder_hidden_states": "output_hidden_states",
    "decoder_hidden_states": "output_hidden_states", "attentions": "output_attentions",
    "encoder_attentions": "output_attentions", "decoder_attentions": "output_attentions",
    "cross_attentions": "output_attentions",
}


def output_tap(path: str) -> tuple[str, int] | None:
    """``"hidden_states.3"`` -> ``("hidden_states", 3)``; ``None`` for a module path."""
    head, _, rest = path.partition(".")
    if head not in OUTPUT_FIELDS:
        return None
    try:
        return head, int(rest)
    except ValueError:
        raise TapError(f"tap {path!r}: an output tap is '{head}.<layer index>' (e.g. '{head}.2' or '{head}.-1'), "
                       f"got {rest!r} after the field") from None


class TapError(KeyError):
    """A tap path that is not a submodule of the model."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


def _split(path: str) -> tuple[str, str]:
    module, _, where = path.partition(":")
    if where not in ("", "input", "output"):
        raise TapError(f"tap {path!r}: suffix must be ':input' or ':output', got ':{where}'")
    return module, where or "output"


def resolve(model: nn.Module, path: str, *, model_name: str = "model") -> nn.Module:
    """The submodule at ``path`` (``""`` is the model itself); a clear error listing near paths."""
    module_path, _ = _split(path)
    names = [n for n, _ in model.named_modules()]
    if module_path in names:
        return model.get_submodule(module_path)
    close = difflib.get_close_matches(module_path, names, n=5, cutoff=0.4)
    if not close:  # fall back to paths sharing the first component
        head = module_path.split(".")[0]
        close = [n for n in names if n.split(".")[0] == head][:5]
    hint = f" Nearest valid paths: {', '.join(map(repr, close))}." if close else ""
    raise TapError(
        f"tap {path!r} is not a submodule of the {model_name} ({type(model).__name__}).{hint} "
        f"Top-level modules: {', '.join(repr(n) for n, _ in model.named_children())}."
    )


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, Tensor):
                return v
    raise TypeError(f"tap captured a {type(value).__name__}, expected a tensor")


class Taps:
    """Hooks on one model that record the tensors at the given paths during each forward.

    Args:
        model: any ``nn.Module``.
        paths: dotted module paths, optionally with ``":input"``.
        model_name: ``"student"`` / ``"teacher"``, used in error messages.

    Use ``with taps.recording() as store: model(x)``; ``store`` maps each path to its tensor.
    Hooks stay registered until :meth:`remove`; outside ``recording()`` they cost one branch.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], *, model_name: str = "model") -> None:
        self.model = model
        self.model_name = model_name
        self.paths = list(dict.fromkeys(paths))
        self.output_paths = [p for p in self.paths if output_tap(p) is not None]
        self.module_paths = [p for p in self.paths if p not in self.output_paths]
        self._store: dict[str, Tensor] | None = None
        self._handles: list[Any] = []
        self._unfused: list[nn.Module] = []
        for path in self.module_paths:
            module = resolve(model, path, model_name=model_name)
            self._unfuse_parent(model, path)
            _, where = _split(path)
            if where == "input":
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(path)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(path)))

    def _unfuse_parent(self, model: nn.Module, path: str) -> None:
        """timm's attention modules (``fused_attn=True``, the default on recent torch) compute the attention
        probabilities inside ``F.scaled_dot_product_attention``, so their ``attn_drop`` is never called: a tap
        on a child of such a module turns its fused path off (same numbers, the explicit softmax), and
        :meth:`remove` turns it back on."""
        parent_path = _split(path)[0].rpartition(".")[0]
        if not parent_path:
            return
        parent = model.get_submodule(parent_path)
        if getattr(parent, "fused_attn", None) is True:
            parent.fused_attn = False
            self._unfused.append(parent)

    def _hook(self, path: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self._store is not None:
                self._store[path] = _first_tensor(output)

        return hook

    def _pre_hook(self, path: str):
        def hook(_module: nn.Module, inputs: Any) -> None:
            if self._store is not None:
                self._store[path] = _first_tensor(inputs)

        return hook

    def recording(self) -> _Recording:
        return _Recording(self)

    def output_flags(self) -> dict[str, bool]:
        """The keyword arguments that make a Hugging Face model return the tapped output fields."""
        return {OUTPUT_FIELDS[output_tap(p)[0]]: True for p in self.output_paths}  # type: ignore[index]

    def read_outputs(self, output: Any) -> dict[str, Tensor]:
        """The tensors of the output taps (``"hidden_states.3"``) in a model's ``output``."""
        found: dict[str, Tensor] = {}
        for path in self.output_paths:
            name, layer = output_tap(path)  # type: ignore[misc]
            values = getattr(output, name, None)
            if values is None and isinstance(output, dict):
                values = output.get(name)
            if values is None or len(values) == 0:  # transformers 5 returns () where older ones returned None
                hint = (" (attention weights need attn_implementation='eager' when the model is loaded: sdpa and "
                        "flash attention never return them)" if "attentions" in name else "")
                raise TapError(f"tap {path!r}: the {self.model_name}'s output ({type(output).__name__}) holds no "
                               f"{name!r}{hint}")
            if not -len(values) <= layer < len(values):
                raise TapError(f"tap {path!r}: the {self.model_name} returns {len(values)} {name}, so the index "
                               f"must be in [{-len(values)}, {len(values) - 1}], got {layer}")
            found[path] = values[layer]
        return found

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for parent in self._unfused:
            parent.fused_attn = True
        self._unfused.clear()


class _Recording:
    def __init__(self, taps: Taps) -> None:
        self.taps = taps

    def __enter__(self) -> dict[str, Tensor]:
        self.taps._store = {}
        return self.taps._store

    def __exit__(self, *exc: object) -> None:
        store = self.taps._store
        self.taps._store = None
        if exc[0] is None and store is not None:
            missing = [p for p in self.taps.module_paths if p not in store]
            if missing:
                raise TapError(f"taps {missing} were not reached by the forward pass (module never called)")


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``output.logits``, ``output["logits"]`` or ``output[0]``."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def run_tapped(model: nn.Module, batch: Batch, taps: Taps | None, **extra: Any) -> tuple[Any, dict[str, Tensor]]:
    """``model``'s output on ``batch`` (:func:`~distill.batch.run_model`) and its taps' tensors
    (module hooks and output fields); ``taps=None`` runs the model alone."""
    if taps is None:
        return run_model(model, batch, **extra), {}
    with taps.recording() as store:
        output = run_model(model, batch, **taps.output_flags(), **extra)
    if taps.output_paths:
        store.update(taps.read_outputs(output))
    return output, store


def record_in_eval(model: nn.Module, paths: Iterable[str], example: Tensor, *,
                   model_name: str = "model") -> dict[str, Tensor]:
    """The outputs of the modules at ``paths`` for one forward of ``model`` on ``example`` in eval mode and
    without gradients (to size adapters and masks before training); every module's own mode is restored
    after (a user may have frozen BatchNorm), and the hooks are removed."""
    taps = Taps(model, paths, model_name=model_name)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), taps.recording() as store:
            model(example)
    finally:
        taps.remove()
        for m, mode in modes.items():
            m.training = mode
    return store


def lm_body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """A causal language model split into its body (input ids -> the last hidden states, which
    enter the head) and its head (hidden -> vocabulary logits), for losses that apply the head
    chunk by chunk (:func:`distill.functional.tokens.fused_linear_token_loss`).

    Works for Hugging Face ``*ForCausalLM`` models (``get_output_embeddings()`` is the head,
    ``get_decoder()`` or the ``base_model_prefix`` attribute the body, whose output's
    ``last_hidden_state`` is already final-normalised). Models whose logits are more than
    ``head(hidden)`` (a final logit soft-cap, a scaled tied head) are refused rather than
    distilled against the wrong logits.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no linear output head (get_output_embeddings() returned "
                        f"{type(head).__name__}): fused token losses (chunk_size) need a Hugging Face causal LM; "
                        "leave chunk_size unset to use the model's logits")
    config = getattr(model, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale", "output_mult"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__}'s config sets {attribute}={getattr(config, attribute)!r}: its "
                             "logits are not head(hidden), so the fused token losses cannot rebuild them; leave "
                             "chunk_size unset")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model: fused token losses support causal "
                         "LMs; leave chunk_size unset to use the model's logits")
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else None
    if not isinstance(body, nn.Module) or body is model:
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(body, nn.Module) or body is model:
        raise TypeError(f"cannot find the body of {type(model).__name__} (get_decoder() or its base_model_prefix "
                        "attribute): fused token losses need a Hugging Face causal LM")
    return body, head


def last_hidden_state(output: Any) -> Tensor:
    """The last hidden states ``(B, L, H)`` in a body's output (``.last_hidden_state`` or its first tensor)."""
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    return _first_tensor(output)
