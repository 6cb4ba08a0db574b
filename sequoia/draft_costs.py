"""A draft's cost per tree level on this device, in the dtype the engine runs it.

The optimizer prices every level a draft expands, and a trained draft's cost per step beyond
its levels (key ``0``: taking in the accepted tokens, with its weights out of cache after the
target's forward). Those costs are measured here, never carried from another machine: a trained
draft through its proposer's level timing (:func:`sequoia.drafts.training.evaluate.level_costs`;
in bfloat16 where the device computes it, whatever the target's dtype), an early-exit or LM
draft with the profiler's per-level grid in the target's dtype; n-gram and no draft are free. A
trained draft's card costs are used as they are only when the card records this device's
fingerprint (``evaluation.cost_fingerprint``) and a cost per step; an older card, or one
measured elsewhere, is timed again. Measured costs are cached next to the device's profiles as
``sequoia-draft-cost/1`` records::

    costs = device_draft_costs(DraftSpec.resolve(None, "smollm2-135m"), "smollm2-135m", ["bfloat16"])
    costs["bfloat16"].level_ms   # {0: 0.9, 1: 1.9, 2: 2.1, ...} ms by level width; per step at 0
    costs["bfloat16"].source     # "card", "cache", "measured" or "free"
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sequoia.device import same_device
from sequoia.errors import ConfigError
from sequoia.files import read_json, write_json_atomic
from sequoia.optimizer import STEP_KEY
from sequoia.profile_cache import Progress, Targets, draft_cost_path, here, model_name, quick_prefixes

DRAFT_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16)
DRAFT_COST_FORMAT = "sequoia-draft-cost/1"


@dataclass(frozen=True)
class DraftCosts:
    """A draft's cost per tree level on this device: ms by level width, and where it came from
    (``free``, ``card``, ``cache``, ``measured``)."""

    level_ms: dict[int, float] = field(default_factory=dict)
    source: str = "free"
    dtype: str | None = None


def card_costs(card: dict[str, Any] | None) -> tuple[dict[int, float], dict[str, Any] | None, str | None]:
    """A trained draft's recorded costs: ms by width, the fingerprint they were measured on
    (None for cards written before fingerprints) and their dtype."""
    evaluation = (card or {}).get("evaluation") or {}
    costs = evaluation.get("cost_ms_per_level") or {}
    try:
        level_ms = {int(w): float(ms) for w, ms in costs.items()}
    except (AttributeError, TypeError, ValueError):
        level_ms = {}
    return level_ms, evaluation.get("cost_fingerprint"), evaluation.get("cost_dtype")


def read_draft_costs(path: Path, fp: dict[str, Any]) -> DraftCosts | None:
    """The cached costs at ``path`` if measured on this device (a trained draft's only if they
    include its cost per step, which older measurements lack)."""
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
        if doc.get("format") != DRAFT_COST_FORMAT or not same_device(doc.get("fingerprint"), fp):
            return None
        level_ms = {int(w): float(ms) for w, ms in doc["level_ms"].items()}
        if doc.get("kind") == "trained" and STEP_KEY not in level_ms:
            return None
        return DraftCosts(level_ms, "cache", doc.get("dtype"))
    except (ConfigError, AttributeError, KeyError, TypeError, ValueError):
        return None


def save_draft_costs(path: Path, costs: dict[int, float], fp: dict[str, Any], draft: str, kind: str,
                     target: str, dtype: str, method: str) -> None:
    write_json_atomic(path, {
        "format": DRAFT_COST_FORMAT,
        "draft": draft,
        "kind": kind,
        "target": target,
        "dtype": dtype,
        "fingerprint": fp,
        "level_ms": {str(w): round(ms, 3) for w, ms in sorted(costs.items())},
        "method": method,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })



def measure_draft_costs(spec, loaded, dtype: str, progress: Progress | None = None) -> tuple[dict[int, float], str]:
    """Measure ``spec``'s (a :class:`~sequoia.drafts.DraftSpec`) ms per tree level for the
    target ``loaded``; returns the costs and how they were measured."""
    if spec.kind == "trained":
        from sequoia.drafts.registry import load_trained_proposer
        from sequoia.drafts.training.evaluate import level_costs

        if progress:
            progress(0, 1, f"timing {spec} per tree level")
        costs = level_costs(load_trained_proposer(spec.directory, loaded.model), DRAFT_WIDTHS, repeats=10)
        return costs, "proposer level timing (level_costs)"
    from sequoia import profiler

    model = spec.causal_lm(loaded, dtype=dtype, device=str(loaded.device.type))
    prefix = quick_prefixes(profiler.model_context(model))[:1]
    grid = profiler.measure_grid(model, str(spec), prefix, DRAFT_WIDTHS, repeats=3, warmup=1, progress=progress)
    return {w: float(ms) for w, ms in zip(grid.tokens, grid.median[0])}, "profiler per-level grid"


def draft_identity(spec) -> str:
    """What names a draft's costs: its spec, and for a trained draft its directory and weights'
    date (a retrained draft is timed again)."""
    if spec.kind != "trained":
        return model_name(spec.name) if spec.kind == "lm" else spec.name
    weights = spec.directory / "draft.safetensors"
    stamp = weights.stat().st_mtime_ns if weights.is_file() else 0
    digest = hashlib.sha256(f"{spec.directory.resolve()}|{stamp}".encode()).hexdigest()[:8]
    return f"{spec.directory.name}-{digest}"


def device_draft_costs(
    spec,
    target: str,
    dtypes: Sequence[str],
    device: str = "cpu",
    targets: Targets | None = None,
    progress: Progress | None = None,
) -> dict[str, DraftCosts]:
    """The cost per tree level of the draft ``spec`` (a :class:`~sequoia.drafts.DraftSpec`) on
    this device, for the engine running the target in each of ``dtypes``: free for ``none`` and
    ``ngram``; a trained draft's card costs when the card records this device's fingerprint,
    else the cached or newly measured ones (a trained draft runs in one dtype whatever the
    target's; an early-exit or LM draft runs in the target's)."""
    if spec.kind in ("none", "ngram"):
        return {dtype: DraftCosts() for dtype in dtypes}
    targets = targets or Targets(target, device, tokenizer=False)
    fp, name = here(device), model_name(target)
    if spec.kind == "trained":
        from sequoia.drafts.registry import trained_draft_dtype

        run_dtype = trained_draft_dtype(device)
        level_ms, card_fp, card_dtype = card_costs(spec.card)
        if STEP_KEY in level_ms and card_fp is not None and same_device(card_fp, fp) and card_dtype == run_dtype:
            costs = DraftCosts(level_ms, "card", run_dtype)
        else:
            costs = _cached_or_measured(spec, fp, name, run_dtype, lambda: targets.any(dtypes[0]), progress)
        return {dtype: costs for dtype in dtypes}
    return {dtype: _cached_or_measured(spec, fp, name, dtype, lambda d=dtype: targets.get(d), progress)
            for dtype in dtypes}


def _cached_or_measured(spec, fp, name: str, dtype: str, load: Callable[[], Any], progress) -> DraftCosts:
    path = draft_cost_path(fp, name, draft_identity(spec), dtype)
    cached = read_draft_costs(path, fp)
    if cached is not None:
        return cached
    costs, method = measure_draft_costs(spec, load(), dtype, progress)
    save_draft_costs(path, costs, fp, str(spec), spec.kind, name, dtype, method)
    return DraftCosts(costs, "measured", dtype)
