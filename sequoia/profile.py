"""The ``sequoia-profile/1`` format: a model's forward latency per (prefix length, token count).

A profile is measured on one device (:mod:`sequoia.profiler`) and read back here, with no
model or framework needed, by the pure planning code (:mod:`sequoia.optimizer`)::

    profile = Profile.load("profiles/cpu-2core-smollm2-135m-float32.json")
    profile.latency(tokens=20, prefix_len=300)   # ms, interpolated
    profile.knee(prefix_len=512)                 # largest n within 1.25x of 1 token
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sequoia.device import legacy_fingerprint
from sequoia.errors import ConfigError, FileFormatError
from sequoia.files import read_json, write_json_atomic

PROFILE_FORMAT = "sequoia-profile/1"
DEFAULT_PREFIXES = (128, 512, 1024)  # what ``sequoia profile run --out`` measures by default
DEFAULT_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
DEFAULT_WIDTHS = (1, 2, 4, 8, 16, 32, 64)
KNEE_FACTOR = 1.25
STATS = ("median", "p25", "p75", "min", "max")


@dataclass(frozen=True)
class LatencyGrid:
    """Latency (ms) of one model for every (prefix length, token count) cell.

    ``stats[name]`` is a ``[len(prefix_lengths), len(tokens)]`` array for each name in
    :data:`STATS`; ``samples`` holds the raw timings, ``[prefix, tokens, repeat]``.
    """

    model: str
    prefix_lengths: tuple[int, ...]
    tokens: tuple[int, ...]
    samples: np.ndarray  # [num_prefixes, num_tokens, repeats] ms
    stats: dict[str, np.ndarray] = field(init=False)  # name -> [num_prefixes, num_tokens] ms

    def __post_init__(self) -> None:
        s = self.samples
        assert s.ndim == 3 and s.shape[:2] == (len(self.prefix_lengths), len(self.tokens))
        q = np.percentile(s, [50, 25, 75], axis=-1)
        stats = dict(zip(STATS, [q[0], q[1], q[2], s.min(-1), s.max(-1)]))
        object.__setattr__(self, "stats", stats)

    @property
    def median(self) -> np.ndarray:  # [num_prefixes, num_tokens] ms
        return self.stats["median"]

    def latency(self, tokens: float, prefix_len: float, stat: str = "median") -> float:
        """Interpolated latency (ms): piecewise linear in token count, then in prefix length.

        Token counts outside the measured range raise :class:`ConfigError`; prefix lengths
        outside it use the nearest measured prefix.
        """
        if not self.tokens[0] <= tokens <= self.tokens[-1]:
            raise ConfigError(
                f"{self.model} was profiled for {self.tokens[0]}..{self.tokens[-1]} tokens, not "
                f"{tokens}; re-profile with a wider --tokens range"
            )
        per_prefix = [np.interp(tokens, self.tokens, row) for row in self.stats[stat]]
        return float(np.interp(prefix_len, self.prefix_lengths, per_prefix))

    def knee(self, prefix_len: float, factor: float = KNEE_FACTOR) -> int:
        """The largest measured token count whose median latency is within ``factor`` times
        the smallest count's (1 token's): how big a tree comes almost for free."""
        base = self.latency(self.tokens[0], prefix_len)
        return max(n for n in self.tokens if self.latency(n, prefix_len) <= factor * base)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prefix_lengths": list(self.prefix_lengths),
            "tokens": list(self.tokens),
            "latency_ms": {
                **{name: _rounded(values) for name, values in self.stats.items()},
                "samples": _rounded(self.samples),
            },
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> LatencyGrid:
        try:
            prefixes = tuple(int(p) for p in data["prefix_lengths"])
            tokens = tuple(int(n) for n in data["tokens"])
            samples = np.asarray(data["latency_ms"]["samples"], dtype=np.float64)
            grid = cls(str(data["model"]), prefixes, tokens, samples)
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise FileFormatError(f"{where}: malformed latency grid ({type(exc).__name__}: {exc})") from exc
        if list(prefixes) != sorted(set(prefixes)) or list(tokens) != sorted(set(tokens)):
            raise FileFormatError(f"{where}: prefix_lengths and tokens must be strictly increasing")
        return grid


@dataclass(frozen=True)
class Profile:
    """A ``sequoia-profile/1`` document: the target's grid, optionally the draft's per-level
    grid, the device description and how the measurement was taken."""

    target: LatencyGrid
    device: dict[str, Any]
    meta: dict[str, Any]  # repeats, warmup, date, tree, load average, notes
    draft: LatencyGrid | None = None

    @property
    def model(self) -> str:
        return self.target.model

    @property
    def dtype(self) -> str | None:
        """The dtype the target ran in (``device.dtype``)."""
        return self.device.get("dtype")

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The device fingerprint (:mod:`sequoia.device`); for a profile written before
        fingerprints, what its device section says (the rest counts as unrecorded)."""
        recorded = self.device.get("fingerprint")
        return dict(recorded) if isinstance(recorded, dict) else legacy_fingerprint(self.device)

    def latency(self, tokens: float, prefix_len: float) -> float:
        """Target forward latency (ms) for verifying ``tokens`` tree tokens after ``prefix_len``."""
        return self.target.latency(tokens, prefix_len)

    def draft_latency(self, width: float, prefix_len: float | None = None) -> float:
        """Draft latency (ms) of one tree level of ``width`` tokens (default: at the draft's
        smallest measured prefix)."""
        if self.draft is None:
            raise ConfigError(f"profile of {self.model} has no draft section; profile with --draft MODEL")
        prefix = self.draft.prefix_lengths[0] if prefix_len is None else prefix_len
        return self.draft.latency(width, prefix)

    def knee(self, prefix_len: float, factor: float = KNEE_FACTOR) -> int:
        return self.target.knee(prefix_len, factor)

    def describe(self) -> str:
        """One line: model, device, dtype, threads, torch, repeats, date."""
        d, m = self.device, self.meta
        return (
            f"{self.model} | {d.get('name')} | {d.get('dtype')} | {d.get('threads')} threads | "
            f"torch {d.get('torch')} | {m.get('repeats')} repeats | {m.get('date')}"
        )

    def to_json(self) -> dict[str, Any]:
        doc = {"format": PROFILE_FORMAT, "device": self.device, **self.target.to_json(), **self.meta}
        doc["draft"] = self.draft.to_json() if self.draft else None
        return doc

    @classmethod
    def from_json(cls, data: Any, where: str = "profile") -> Profile:
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise FileFormatError(f"{where} is not a {PROFILE_FORMAT} document (missing or wrong 'format')")
        target = LatencyGrid.from_json(data, where)
        draft = LatencyGrid.from_json(data["draft"], f"{where} (draft)") if data.get("draft") else None
        grid_keys = {"format", "device", "draft", "model", "prefix_lengths", "tokens", "latency_ms"}
        meta = {k: v for k, v in data.items() if k not in grid_keys}
        return cls(target, dict(data.get("device") or {}), meta, draft)

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON atomically (no partial file on failure)."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        return cls.from_json(read_json(path), str(path))


def _rounded(values: np.ndarray) -> list:
    return np.round(values, 3).tolist()
