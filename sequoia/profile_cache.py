"""Profiles measured where they are used: this device's cached profile of a model in a dtype,
measured on the spot (a quick grid) the first time it is asked for.

The cache lives under ``cache_dir()/profiles/`` (:func:`sequoia.files.cache_dir`), one file
per key; the key joins the model, the dtype, the thread count and the device fingerprint's
hash (:func:`sequoia.device.fingerprint_key`), so another CPU, another instruction-set cap
(``ATEN_CPU_CAPABILITY=avx2`` ...), another thread count or another torch minor version is
another entry::

    smollm2-135m-bfloat16-2t-a945f6595a4e.json               the target's latency grid
    smollm2-135m-2t-a945f6595a4e.draft-smollm2-135m-chimera-bfloat16.json   a draft's cost per level

The quick grid (:func:`measure_quick`): prefixes 128 and 512 (those the context holds), token
counts 1, 2, 3, 4, 6, 8, 12, 16, ... grown only while the latency stays under
:data:`GROWTH_LIMIT` times one token's (a larger tree could never pay beyond that), 1 warm-up
and 7 timed rounds; a round that ran beside other work's burst is measured again
(:func:`clean_rounds`), since on a shared CPU such a round is many times slower, not a little. A draft's cost per tree level, measured the same way on first use, is
:mod:`sequoia.draft_costs`.

Nothing here imports transformers until something must be measured, so a cached answer is
quick.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sequoia import extension
from sequoia.device import KERNELS_VERSION, current, fingerprint_key, same_device
from sequoia.errors import ConfigError
from sequoia.files import cache_dir
from sequoia.profile import LatencyGrid, Profile

QUICK_PREFIXES = (128, 512)
QUICK_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
GROWTH_LIMIT = 3.0  # stop growing the token count once a pass costs this many one-token passes
QUICK_REPEATS = 7  # a busy shared machine moves single passes by 30% and more
QUICK_WARMUP = 1
PROBE_REPEATS = 3
CLEAN_RATIO = 1.5  # a round whose cells took over 1.5x their fastest (median) ran beside other work
MAX_ROUNDS = 21  # at most 3x the rounds asked for, then the least disturbed are kept
Progress = Callable[[int, int, str], None]


# ---------------------------------------------------------------------------- keys and paths
def model_name(spec: str) -> str:
    """The canonical name :func:`sequoia.models.load_model` gives ``spec`` (alias or hub id as
    given, a local file or directory as its absolute path), without loading anything."""
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") or path.is_dir():
        from sequoia.models import ALIASES

        return spec if spec in ALIASES else str(path.resolve())
    return spec


def slug(name: str) -> str:
    """A file-name-safe form of a model or draft name: ``smollm2-135m`` stays; a path becomes
    its last part plus a short hash of the whole (two folders named ``model`` stay apart)."""
    if "/" not in name and "\\" not in name:
        return name.replace(":", "-")
    stem = Path(name.rstrip("/")).name.replace(":", "-") or "model"
    return f"{stem}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def kernels_tag() -> str:
    """``k<kernels version>``, plus ``-noext`` with the compiled kernel switched off: profiles
    measured with other kernels than this process runs are not reused."""
    return f"k{KERNELS_VERSION}" + ("-noext" if extension.disabled() else "")


def profile_key(fp: dict[str, Any], model: str, dtype: str) -> str:
    """``<model>-<dtype>-<threads>t-<fingerprint hash>-<kernels tag>``: a profile measured
    with an older version of :mod:`sequoia.kernels` is measured again, not reused."""
    return f"{slug(model)}-{dtype}-{fp.get('threads')}t-{fingerprint_key(fp)}-{kernels_tag()}"


def profile_path(fp: dict[str, Any], model: str, dtype: str) -> Path:
    return cache_dir() / "profiles" / f"{profile_key(fp, model, dtype)}.json"


def draft_cost_path(fp: dict[str, Any], model: str, draft: str, dtype: str) -> Path:
    stem = f"{slug(model)}-{fp.get('threads')}t-{fingerprint_key(fp)}-{kernels_tag()}"
    return cache_dir() / "profiles" / f"{stem}.draft-{slug(draft)}-{dtype}.json"


# ---------------------------------------------------------------------------- target profiles
@dataclass(frozen=True)
class CachedProfile:
    """A profile of this device and where it came from."""

    profile: Profile
    path: Path
    measured: bool  # measured now (else read from the cache)
    seconds: float = 0.0  # measuring time


def read_cached(fp: dict[str, Any], model: str, dtype: str) -> CachedProfile | None:
    """The cached profile for this key, or None (also when the file no longer matches)."""
    path = profile_path(fp, model, dtype)
    if not path.is_file():
        return None
    try:
        profile = Profile.load(path)
    except ConfigError:  # a damaged cache entry is measured again
        return None
    if profile.model != model or profile.dtype != dtype or not same_device(profile.fingerprint, fp):
        return None
    return CachedProfile(profile, path, measured=False)


def measure_and_cache(loaded, dtype: str, progress: Progress | None = None) -> CachedProfile:
    """Measure the quick grid of ``loaded`` (a :class:`~sequoia.models.LoadedModel` in ``dtype``,
    loaded as the engine runs it) and save it under its key."""
    import time

    from sequoia import profiler

    start = time.perf_counter()
    load_before = profiler.load_average()
    grid = measure_quick(loaded.model, loaded.name, progress)
    loads = (load_before, profiler.load_average())
    profile = profiler.build_profile(grid, loaded.model, QUICK_REPEATS, QUICK_WARMUP, loads,
                                     notes="quick grid, measured on first use")
    seconds = time.perf_counter() - start
    profile.meta["seconds"] = round(seconds, 1)
    path = profile_path(profile.fingerprint, loaded.name, dtype)
    profile.save(path)
    return CachedProfile(profile, path, measured=True, seconds=seconds)


def quick_tokens(model, prefix_len: int, tokens: Sequence[int] = QUICK_TOKENS,
                 limit: float = GROWTH_LIMIT, progress: Progress | None = None) -> tuple[int, ...]:
    """The token counts of the quick grid: ``tokens`` in order, up to and including the first
    whose latency (fastest of a few passes at ``prefix_len``) passes ``limit`` times the first's.

    Example: latencies 30, 33, 36, 40, 48, 60, 95, 140 ms for 1, 2, 3, 4, 6, 8, 12, 16 tokens
    give ``(1, 2, 3, 4, 6, 8, 12)``: 95 ms is past 3 x 30 ms.
    """
    import torch

    from sequoia import profiler

    context = profiler.model_context(model)
    tokens = [n for n in tokens if prefix_len + n <= context]
    generator = torch.Generator().manual_seed(0)
    cache = profiler.prefill(model, prefix_len, generator)
    chosen, base = [], None
    for i, n in enumerate(tokens):
        run = profiler._tree_pass(model, cache, prefix_len, n, generator)
        times = [profiler.time_pass(run, model, cache, prefix_len) for _ in range(PROBE_REPEATS + 1)][1:]
        ms = min(times)  # other work only ever adds time: the fastest pass is the device's
        base = ms if base is None else base
        chosen.append(n)
        if progress:
            progress(i + 1, len(tokens), f"finding the token range: {n} tokens, {ms:.0f} ms")
        if ms > limit * base and len(chosen) >= 3:
            break
    return tuple(chosen)


def quick_prefixes(context: int, prefixes: Sequence[int] = QUICK_PREFIXES) -> tuple[int, ...]:
    """The quick prefixes that leave half the context for tokens (at least one: a quarter)."""
    fits = tuple(p for p in prefixes if p <= context // 2)
    return fits or (max(1, context // 4),)


def measure_quick(model, name: str, progress: Progress | None = None) -> LatencyGrid:
    """The quick grid (see the module doc) of ``model``, named ``name``, from clean rounds."""
    from sequoia import profiler

    prefixes = quick_prefixes(profiler.model_context(model))
    tokens = quick_tokens(model, prefixes[-1], progress=progress)
    return LatencyGrid(name, prefixes, tokens, clean_rounds(model, prefixes, tokens, progress=progress))


def clean_rounds(
    model, prefixes: Sequence[int], tokens: Sequence[int], repeats: int = QUICK_REPEATS,
    max_rounds: int = MAX_ROUNDS, clean: float = CLEAN_RATIO, progress: Progress | None = None,
) -> np.ndarray:  # [prefixes, tokens, repeats] ms
    """``repeats`` timed rounds over every (prefix, tokens) cell (after one warm-up round), each
    round visiting every cell once, as :func:`sequoia.profiler.measure_grid` does -- but a round
    that ran while other work had the CPU is measured again.

    On a shared CPU, a round that overlaps another process's burst is not a little slower but
    many times slower (torch's threads wait for each other at every operator): measured on the
    2-core EPYC, 35 ms passes took 1-3 s in 4 of 7 rounds. A round is *clean* when its median
    ratio to the fastest time seen in each cell is at most ``clean``; rounds are added until
    ``repeats`` are clean (or ``max_rounds`` ran: then the least disturbed ones are kept).
    """
    import torch

    from sequoia import profiler

    generator = torch.Generator().manual_seed(0)
    caches = [profiler.prefill(model, p, generator) for p in prefixes]
    cells = [(i, j, profiler._tree_pass(model, caches[i], p, n, generator))
             for i, p in enumerate(prefixes) for j, n in enumerate(tokens)]
    rounds: list[np.ndarray] = []
    for r in range(max_rounds + 1):
        times = np.zeros((len(prefixes), len(tokens)))
        for k, (i, j, run) in enumerate(cells):
            times[i, j] = profiler.time_pass(run, model, caches[i], prefixes[i])
            if progress:
                progress(k + 1, len(cells), f"{'warm-up' if r == 0 else f'round {r}'}: prefix {prefixes[i]}, "
                                            f"{tokens[j]} tokens")
        if r == 0:
            continue
        rounds.append(times)
        disturbance = round_disturbance(rounds)
        if int((disturbance <= clean).sum()) >= repeats:
            break
    keep = np.argsort(round_disturbance(rounds), kind="stable")[:repeats]
    return np.stack([rounds[k] for k in sorted(keep)], axis=-1)


def round_disturbance(rounds: Sequence[np.ndarray]) -> np.ndarray:  # [rounds]
    """Each round's median ratio to the fastest time of every cell over all rounds (1 = clean).

    Example: cells timed (10, 20) then (30, 60) then (11, 21) ms give ``[1.0, 3.0, 1.075]``.
    """
    stacked = np.stack(rounds)  # [rounds, prefixes, tokens]
    floor = stacked.min(axis=0)
    return np.median((stacked / floor).reshape(len(rounds), -1), axis=1)


# ---------------------------------------------------------------------------- this device
class Targets:
    """The target, loaded on demand once per dtype as the engine runs it (packed weights where
    they help): a profile found in the cache loads nothing."""

    def __init__(self, spec: str, device: str = "cpu", threads: int | None = None, tokenizer: bool = True) -> None:
        self.spec, self.device, self.threads, self.tokenizer = spec, device, threads, tokenizer
        self.models: dict[str, Any] = {}  # dtype -> LoadedModel
        set_threads(threads)

    def get(self, dtype: str):
        if dtype not in self.models:
            from sequoia.models import load_model

            self.models[dtype] = load_model(self.spec, dtype=dtype, device=self.device, threads=self.threads,
                                            tokenizer=self.tokenizer)
        return self.models[dtype]

    def any(self, preferred: str):
        """A loaded target (any dtype), else ``preferred`` loaded now."""
        return next(iter(self.models.values()), None) or self.get(preferred)


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (part of the fingerprint) before anything is measured."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"thread count must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def device_dtypes(device: str = "cpu", threads: int | None = None) -> tuple[str, ...]:
    """The dtypes worth profiling on ``device``: float32 and bfloat16 on CPU (where it
    computes), float16 as well on a GPU (:func:`sequoia.device.runnable_dtypes`)."""
    return tuple(here(device, threads).get("dtypes") or ("float32",))


def here(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """This process's fingerprint for ``device`` (``auto`` resolved; see
    :func:`sequoia.device.current`)."""
    return current(device, threads)


def check_profile(profile: Profile, where: str | Path, fp: dict[str, Any], foreign_ok: bool = False,
                  warn: Callable[[str], None] | None = None) -> None:
    """Refuse (:class:`ConfigError`, one line) a profile measured on another device, naming the
    fields that differ; with ``foreign_ok`` warn instead."""
    from sequoia.device import mismatches

    diffs = mismatches(profile.fingerprint, fp)
    if not diffs:
        return
    what = "; ".join(diffs)
    if not foreign_ok:
        raise ConfigError(f"{where} was measured on another device ({what}); omit --profile to measure "
                          "this one, or pass --foreign-profile to use it anyway")
    if warn:
        warn(f"{where} was measured on another device ({what}); its plan may be wrong here")


def device_profiles(
    target: str,
    dtypes: Sequence[str],
    device: str = "cpu",
    targets: Targets | None = None,
    explicit: Sequence[str | Path] = (),
    foreign_ok: bool = False,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, CachedProfile]:
    """This device's profile of ``target`` in each of ``dtypes``: read from the cache, else
    measured now and cached. ``explicit`` profile files replace the cache (each in its own
    dtype; refused when measured on another device unless ``foreign_ok``)."""
    targets = targets or Targets(target, device, tokenizer=False)
    fp, name = here(device), model_name(target)
    found: dict[str, CachedProfile] = {}
    for path in explicit:
        profile = Profile.load(path)
        if profile.model != name:
            raise ConfigError(f"{path} profiles {profile.model!r}, not the target {name!r}")
        check_profile(profile, path, fp, foreign_ok, warn)
        dtype = profile.dtype or "float32"
        if dtypes and dtype not in dtypes:
            raise ConfigError(f"{path} profiles {dtype}, not {' or '.join(dtypes)} (drop --dtype or the profile)")
        found[dtype] = CachedProfile(profile, Path(path), measured=False)
    if explicit:
        return found
    for dtype in dtypes:
        found[dtype] = read_cached(fp, name, dtype) or measure_and_cache(targets.get(dtype), dtype, progress)
    return found
