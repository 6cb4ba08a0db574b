"""Forward latency vs the number of verified tokens, per prefix length: measure, save, read.

For each prefix length the KV cache is filled once with that many (random) tokens; then for
each token count ``n`` one :func:`sequoia.forward.tree_forward` pass over a representative tree
of ``n`` nodes is timed -- tree attention mask, tree position ids, logits for every node,
exactly what the decoder pays -- and the cache is cut back to the prefix afterwards.

Timing discipline (gpt-fast): ``warmup`` untimed rounds, then ``repeats`` timed rounds, under
``torch.inference_mode()``, with the device synchronised before every ``time.perf_counter()``.
Each round visits every (prefix, token count) cell once (one
cache per prefix), so load that comes and goes spreads over the whole grid instead of bending
one curve. Each cell keeps its raw samples, median and spread.

The same measurement over a draft model, with ``n`` = the width of one tree level, gives the
draft's cost per level (the optional ``draft`` section). The file format, and reading it
back, live in :mod:`sequoia.profile`.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from sequoia.device import cpu_model
from sequoia.device import fingerprint
from sequoia.errors import ConfigError
from sequoia import kernels
from sequoia.forward import cache_kwargs, keep_path, model_dtype_device, tree_forward
from sequoia.models import dtype_name
from sequoia.prepack import PackedLinear
from sequoia.profile import DEFAULT_PREFIXES, DEFAULT_TOKENS, DEFAULT_WIDTHS, LatencyGrid, Profile  # noqa: F401
from sequoia.tree import Tree

TREE_BRANCHING = 4  # representative tree: complete 4-ary, BFS order

Progress = Callable[[int, int, str], None]  # (passes done, passes in total, what runs now)


# ---------------------------------------------------------------------------- measuring
def representative_tree(n: int, branching: int = TREE_BRANCHING) -> Tree:
    """A complete ``branching``-ary tree of ``n`` nodes in BFS order (``n=1``: the root).

    Example: ``representative_tree(6).parents == (-1, 0, 0, 0, 0, 1)``.
    """
    return Tree((-1, *((i - 1) // branching for i in range(1, n))))


def check_plan(prefix_lengths: Sequence[int], tokens: Sequence[int], context: int) -> None:
    """Raise :class:`ConfigError` unless every (prefix, tokens) cell fits the model's context."""
    if not prefix_lengths or min(prefix_lengths) < 1:
        raise ConfigError("need one or more positive prefix lengths")
    if max(prefix_lengths) >= context:
        raise ConfigError(f"prefix {max(prefix_lengths)} leaves no room in the model's context of {context} positions")
    if not tokens or min(tokens) < 1:
        raise ConfigError("need one or more positive token counts")
    if max(prefix_lengths) + max(tokens) > context:
        raise ConfigError(
            f"prefix {max(prefix_lengths)} + {max(tokens)} tokens exceeds the model's context of "
            f"{context} positions; lower --prefix or --tokens"
        )


def fit_tokens(tokens: Sequence[int], prefix_lengths: Sequence[int], context: int) -> tuple[int, ...]:
    """The token counts that fit after the longest prefix (caps the default list)."""
    return tuple(n for n in tokens if max(prefix_lengths) + n <= context)


def model_context(model: PreTrainedModel) -> int:
    """Positions the model supports (``max_position_embeddings``)."""
    return int(model.config.max_position_embeddings)


def measure_grid(
    model: PreTrainedModel,
    name: str,
    prefix_lengths: Sequence[int] = DEFAULT_PREFIXES,
    tokens: Sequence[int] = DEFAULT_TOKENS,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    progress: Progress | None = None,
) -> LatencyGrid:
    """Time :func:`tree_forward` for every (prefix, token count) cell; see the module doc."""
    prefix_lengths, tokens = sorted(set(prefix_lengths)), sorted(set(tokens))
    check_plan(prefix_lengths, tokens, model_context(model))
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    total = len(prefix_lengths) * len(tokens) * (warmup + repeats)
    done = 0
    samples = np.zeros((len(prefix_lengths), len(tokens), repeats))  # [prefix, tokens, repeat]
    generator = torch.Generator().manual_seed(seed)
    caches = [prefill(model, prefix_len, generator) for prefix_len in prefix_lengths]
    cells = [
        (p, t, _tree_pass(model, caches[p], prefix_len, n, generator))
        for p, prefix_len in enumerate(prefix_lengths)
        for t, n in enumerate(tokens)
    ]
    for round_ in range(warmup + repeats):
        for p, t, run in cells:
            ms = time_pass(run, model, caches[p], prefix_lengths[p])
            if round_ >= warmup:
                samples[p, t, round_ - warmup] = ms
            done += 1
            if progress:
                progress(done, total, f"{name}: prefix {prefix_lengths[p]}, {tokens[t]} tokens")
    return LatencyGrid(name, tuple(prefix_lengths), tuple(tokens), samples)


def prefill(model: PreTrainedModel, prefix_len: int, generator: torch.Generator) -> DynamicCache:
    """A cache holding ``prefix_len`` random tokens."""
    _, device = model_dtype_device(model)
    ids = torch.randint(0, model.config.vocab_size, (1, prefix_len), generator=generator)  # [1, prefix]
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids.to(device), use_cache=True, **cache_kwargs(model, cache))
    return cache


def time_pass(run: Callable[[], Any], model: PreTrainedModel, cache: DynamicCache, prefix_len: int) -> float:
    """Milliseconds of one ``run()``, device synchronised; then the cache is cut back to the prefix."""
    _, device = model_dtype_device(model)
    with torch.inference_mode():
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        elapsed = time.perf_counter() - start
        keep_path(cache, prefix_len, [])
    return 1000.0 * elapsed


def _tree_pass(
    model: PreTrainedModel, cache: DynamicCache, prefix_len: int, n: int, generator: torch.Generator
) -> Callable[[], Any]:
    tree = representative_tree(n)
    ids = torch.randint(0, model.config.vocab_size, (n,), generator=generator)  # [n]
    return lambda: tree_forward(model, ids, tree, cache, prefix_len)


def _causal_pass(
    model: PreTrainedModel, cache: DynamicCache, n: int, generator: torch.Generator
) -> Callable[[], Any]:
    _, device = model_dtype_device(model)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=generator).to(device)  # [1, n]
    return lambda: model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class MaskCheck:
    """Tree-mask vs plain causal forward latency at one prefix length (ms per token count)."""

    prefix_len: int
    tokens: tuple[int, ...]
    tree: LatencyGrid  # one prefix row
    causal: LatencyGrid  # one prefix row

    def ratios(self) -> np.ndarray:  # [num_tokens] tree median / causal median
        return self.tree.median[0] / self.causal.median[0]


def compare_masks(
    model: PreTrainedModel,
    prefix_len: int,
    tokens: Sequence[int],
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    progress: Progress | None = None,
) -> MaskCheck:
    """Time :func:`tree_forward` (tree mask + tree position ids) against a plain causal forward
    of the same token count, interleaved pass by pass (which goes first alternates between
    rounds), to show the mask costs nothing extra."""
    tokens = sorted(set(tokens))
    check_plan([prefix_len], tokens, model_context(model))
    generator = torch.Generator().manual_seed(seed)
    cache = prefill(model, prefix_len, generator)
    runs = {
        "tree": [_tree_pass(model, cache, prefix_len, n, generator) for n in tokens],
        "causal": [_causal_pass(model, cache, n, generator) for n in tokens],
    }
    samples = {kind: np.zeros((1, len(tokens), repeats)) for kind in runs}  # [1, tokens, repeat]
    total, done = 2 * len(tokens) * (warmup + repeats), 0
    for round_ in range(warmup + repeats):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for t in range(len(tokens)):
            for kind in order:
                ms = time_pass(runs[kind][t], model, cache, prefix_len)
                if round_ >= warmup:
                    samples[kind][0, t, round_ - warmup] = ms
                done += 1
                if progress:
                    progress(done, total, f"{kind} mask: {tokens[t]} tokens")
    grids = {kind: LatencyGrid(kind, (prefix_len,), tuple(tokens), s) for kind, s in samples.items()}
    return MaskCheck(prefix_len, tuple(tokens), grids["tree"], grids["causal"])


# ---------------------------------------------------------------------------- the document
def describe_device(model: PreTrainedModel) -> dict[str, Any]:
    """Where and how the model runs: device name, CPU model, threads, versions, dtype, how
    many linear layers run from packed weights (:mod:`sequoia.prepack`), and the device's
    fingerprint (:func:`sequoia.device.fingerprint`: what must match to reuse the profile)."""
    dtype, device = model_dtype_device(model)
    cpu = cpu_model()
    return {
        "fingerprint": fingerprint(device),
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "type": device.type,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "dtype": dtype_name(dtype),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "prepacked_linears": sum(isinstance(m, PackedLinear) for m in model.modules()),
        "kernels": kernels.describe(model),
        "platform": platform.platform(),
    }


def build_profile(
    target: LatencyGrid,
    model: PreTrainedModel,
    repeats: int,
    warmup: int,
    load_average: tuple[float, float],
    draft: LatencyGrid | None = None,
    notes: str = "",
) -> Profile:
    """Wrap measured grids with the device description and how they were taken."""
    meta = {
        "repeats": repeats,
        "warmup": warmup,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tree": f"complete {TREE_BRANCHING}-ary, BFS order; tree mask + tree position ids",
        "order": "each round visits every (prefix, tokens) cell once",
        "load_average": {"before": load_average[0], "after": load_average[1]},
        "notes": notes,
    }
    return Profile(target, describe_device(model), meta, draft)


def load_average() -> float:
    """The 1-minute load average (0 where the OS has none): how busy the machine was."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else 0.0

