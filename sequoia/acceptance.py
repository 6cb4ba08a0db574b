"""The positional acceptance vector of a (target, draft) pair: measure, save, read.

``vector[i]`` (0-based here, ``p[i+1]`` in the paper) is the probability that the draft's
``i``-th candidate at a node -- top-``i`` in greedy mode, the ``i``-th sample without
replacement in stochastic mode -- is the one the target accepts, all earlier candidates having
been rejected. The entries sum to at most 1; the rest is the chance that no candidate passes.

Measurement runs the decode engine itself with a one-level tree of ``width`` children (a
star), so the candidates are drawn and verified by exactly the rules decoding uses, for any
proposer; each step is one sample, taken along the target's own continuation (greedy, or
sampled: verification is lossless, so the path has the target's distribution).

By depth: a draft with one head per tree level is less accurate deeper down, so for such a
draft the vector is measured per depth with a *spine* tree -- ``width`` candidates under the
root, and under the first candidate of each level ``width`` more -- counting depth ``k`` at
the steps whose accepted path reached the depth-``(k - 1)`` spine node.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from sequoia.drafts.base import Proposer
from sequoia.engine import Engine
from sequoia.errors import AcceptanceError, ConfigError, FileFormatError
from sequoia.sampling import SamplingConfig
from sequoia.solver import acceptance_by_depth, validate_acceptance
from sequoia.tree import Tree
from sequoia.files import read_json, write_json_atomic

ACCEPTANCE_FORMAT = "sequoia-acceptance/1"
MODES = ("greedy", "stochastic")
MIN_DEPTH_SAMPLES = 30  # a deeper row measured on fewer positions is too noisy to solve with


@dataclass(frozen=True)
class AcceptanceResult:
    """A ``sequoia-acceptance/1`` document: the vector, its standard errors and provenance."""

    target: str
    draft: str
    mode: str  # "greedy" | "stochastic"
    temperature: float
    top_p: float
    vector: tuple[float, ...]  # [width] P(candidate i accepted)
    stderr: tuple[float, ...]  # [width] binomial standard error of each entry
    samples: int  # positions (tree nodes whose candidates were verified)
    prompts: str  # prompt source
    meta: dict[str, Any] = field(default_factory=dict)
    by_depth: tuple[tuple[float, ...], ...] = ()  # [L, width] one row per depth (row 0 = vector); () if not measured
    depth_samples: tuple[int, ...] = ()  # positions measured at each depth

    @property
    def width(self) -> int:
        return len(self.vector)

    @property
    def for_solver(self) -> np.ndarray:  # [L, width] rows by depth where measured, else [width]
        """What :func:`sequoia.solver.solve` takes: the rows by depth, else the vector."""
        return np.asarray(self.by_depth or self.vector, dtype=np.float64)

    @classmethod
    def from_counts(cls, counts: np.ndarray, samples: int, **fields: Any) -> AcceptanceResult:
        """Build from ``counts[i]`` = positions where candidate ``i`` was accepted."""
        counts = np.asarray(counts, dtype=np.float64)
        rate = counts / max(samples, 1)
        stderr = np.sqrt(rate * (1 - rate) / max(samples, 1))
        return cls(vector=tuple(rate.tolist()), stderr=tuple(stderr.tolist()), samples=samples, **fields)

    @classmethod
    def from_depth_counts(cls, counts: np.ndarray, samples: np.ndarray, **fields: Any) -> AcceptanceResult:
        """Build from :func:`measure_counts_by_depth`'s counts: the vector is depth 1's; the rows
        by depth (:func:`rates_by_depth`) are kept when more than one depth was measured."""
        deeper = len(samples) > 1
        rows = rates_by_depth(counts, samples).tolist() if deeper else []
        return cls.from_counts(
            counts[0], int(samples[0]), by_depth=tuple(map(tuple, rows)),
            depth_samples=tuple(samples.tolist()) if deeper else (), **fields,
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["width"] = self.width
        return {"format": ACCEPTANCE_FORMAT, **doc}

    @classmethod
    def from_json(cls, data: Any, where: str = "acceptance file") -> AcceptanceResult:
        if not isinstance(data, dict) or data.get("format") != ACCEPTANCE_FORMAT:
            raise FileFormatError(f"{where} is not a {ACCEPTANCE_FORMAT} document (missing or wrong 'format')")
        try:
            vector = tuple(float(x) for x in validate_acceptance(data["vector"]))
            stderr = tuple(float(x) for x in data.get("stderr") or [math.nan] * len(vector))
            by_depth = _rows(data.get("by_depth") or [], len(vector))
            return cls(
                target=str(data["target"]),
                draft=str(data.get("draft", "unknown")),
                mode=str(data.get("mode", "greedy")),
                temperature=float(data.get("temperature", 0.0)),
                top_p=float(data.get("top_p", 1.0)),
                vector=vector,
                stderr=stderr,
                samples=int(data.get("samples", 0)),
                prompts=str(data.get("prompts", "unknown")),
                meta=dict(data.get("meta") or {}),
                by_depth=by_depth,
                depth_samples=tuple(int(n) for n in data.get("depth_samples") or []),
            )
        except KeyError as exc:
            raise FileFormatError(f"{where} has no {exc.args[0]!r} field") from None
        except (TypeError, ValueError) as exc:
            raise FileFormatError(f"{where} has a malformed field: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> AcceptanceResult:
        return cls.from_json(read_json(path), str(path))


def _rows(data: Any, width: int) -> tuple[tuple[float, ...], ...]:
    """A file's ``by_depth`` rows, checked: each a valid vector of the file's width."""
    if not data:
        return ()
    if not all(isinstance(row, list) for row in data):
        raise AcceptanceError("'by_depth' must be a list of rows, one per depth")
    rows = acceptance_by_depth(data)
    if rows.shape[1] != width:
        raise AcceptanceError(f"'by_depth' rows have {rows.shape[1]} entries, the vector {width}")
    return tuple(tuple(float(x) for x in row) for row in rows)


def measure_counts(
    target: PreTrainedModel,
    proposer: Proposer,
    prompts: Sequence[torch.Tensor],  # each [L] int64
    width: int,
    sampling: SamplingConfig,
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, int]:  # ([width] accepted per rank, samples)
    """Decode every prompt with a star tree of ``width`` candidates; count accepted ranks.

    ``progress(done, total)`` is called after each prompt.
    """
    counts, samples = measure_counts_by_depth(
        target, proposer, prompts, width, sampling, 1, max_new_tokens, eos_token_ids, seed, progress
    )
    return counts[0], int(samples[0])


def rates_by_depth(
    counts: np.ndarray, samples: np.ndarray, min_samples: int = MIN_DEPTH_SAMPLES
) -> np.ndarray:  # [depths kept, width]
    """Acceptance rates per depth from :func:`measure_counts_by_depth`'s counts, keeping the
    first depth and each next one measured on at least ``min_samples`` positions (the solver
    uses the last row for every depth below).

    >>> rates_by_depth(np.array([[50, 10], [20, 5], [3, 1]]), np.array([100, 50, 20])).tolist()
    [[0.5, 0.1], [0.4, 0.1]]
    """
    assert counts.ndim == 2 and samples.shape == counts.shape[:1]
    kept = 1
    while kept < len(samples) and samples[kept] >= min_samples:
        kept += 1
    return counts[:kept] / np.maximum(samples[:kept], 1)[:, None]


def spine_tree(width: int, depth: int) -> Tree:
    """``width`` candidates under the root and under the first candidate of each level.

    >>> spine_tree(2, 2).parents
    (-1, 0, 0, 1, 1)
    """
    if width < 1 or depth < 1:
        raise ConfigError(f"the acceptance width and depth must be at least 1, got {width} and {depth}")
    return Tree.from_children_counts([width] + ([width] + [0] * (width - 1)) * (depth - 1))


def measure_counts_by_depth(
    target: PreTrainedModel,
    proposer: Proposer,
    prompts: Sequence[torch.Tensor],  # each [L] int64
    width: int,
    sampling: SamplingConfig,
    depth: int,
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # ([depth, width] accepted per rank, [depth] samples)
    """Decode every prompt with :func:`spine_tree`; at each depth ``k``, count the steps whose
    path reached the depth-``(k - 1)`` spine node (samples) and the rank accepted below it."""
    tree = spine_tree(width, depth)
    spine = [level[0] for level in tree.levels]  # [depth + 1] node ids, the root first
    engine = Engine(target, proposer, tree, sampling, eos_token_ids=eos_token_ids, seed=seed)
    counts, samples = np.zeros((depth, width), dtype=np.int64), np.zeros(depth, dtype=np.int64)
    for i, ids in enumerate(prompts):
        for step in engine.generate(ids, max_new_tokens):
            path = step.accepted_nodes
            for k in range(1, step.tree.depth + 1):  # a tree cut at a length limit tests less
                if len(path) < k or path[k - 1] != spine[k - 1]:
                    break
                samples[k - 1] += 1
                if len(path) > k:
                    counts[k - 1, int(step.tree.ranks[path[k]])] += 1
        if progress is not None:
            progress(i + 1, len(prompts))
    return counts, samples
