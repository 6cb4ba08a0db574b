"""Choosing :mod:`sequoia.kernels`' kernel per layer shape and row count by measuring them on
this device, caching the choice per device, and applying it to a model (:func:`use_fast_kernels`).

A kernel's speed depends on the CPU, the instruction set torch and its libraries are allowed to
use, the thread count and how threads wait, so the cache key (:func:`device_key`) holds all of
them, plus torch's version, the dtype, the layer shapes and the candidate kernels; the file is
``<cache_dir>/kernels/<hash>.json`` (format ``sequoia-kernels/1``). Timing copies the
profiler's discipline -- warm up, interleave, repeat -- and is built to give the idle machine's
answer on a shared, busy one (:func:`_time_group`).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sequoia.device import KERNELS_VERSION, cpu_model
from sequoia.errors import FileFormatError
from sequoia.extension import module_name
from sequoia.files import cache_dir, read_json, write_json_atomic
from sequoia.kernels import (
    ATTR,
    ISA_ENV,
    KERNELS,
    ROW_BUCKETS,
    THREAD_ENV,
    FastLinear,
    Plan,
    eligible,
    worth_it,
    DTYPES,
    candidates,
    default_kernel,
    linear_groups,
    shape_name,
)
from sequoia.prepack import prepack_linears

MARGIN = 0.05  # another kernel replaces `plain` only when at least this much faster
STREAM_BYTES = 48 << 20  # calibrate on enough layers of one shape to stream from memory (past L3), as a forward does
QUANTILE = 0.25  # of per-call times: an idle machine's cost, measured on a busy one
PRUNE = 2.0  # a kernel this much slower than the best in the first rounds is not timed again
PASSES = 2  # independent passes over all shapes; the faster wins, so a burst of load spoils neither
METHOD = KERNELS_VERSION  # cached choices made with older kernels or calibration are not reused
FORMAT = "sequoia-kernels/1"



def device_key(dtype: torch.dtype, shapes: Sequence[str]) -> dict[str, Any]:
    """Everything a kernel choice depends on: CPU model, the ISA torch dispatches to, the
    environment settings that cap the ISA (how an AVX2 machine is emulated), threads and how
    they wait, torch, dtype, the layer shapes and the candidate kernels (the compiled one by
    the hash of its source)."""
    return {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_env": {name: os.environ.get(name) for name in ISA_ENV},
        "thread_env": {name: os.environ.get(name) for name in THREAD_ENV},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": sorted(shapes),
        "kernels": list(candidates(dtype)),
        "compiled": module_name() if "rows" in candidates(dtype) else None,  # its source and flags
        "buckets": list(ROW_BUCKETS),
        "method": METHOD,
    }


def key_hash(key: dict[str, Any]) -> str:
    """16 hex digits naming the cache file of ``key``."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Calibration:
    """Which kernel won, per layer shape and row bucket, on one device; and the evidence."""

    key: dict[str, Any]  # device_key(...)
    plans: dict[str, Plan]  # shape -> kernel per ROW_BUCKETS entry
    timings: dict[str, dict[str, list[float]]]  # shape -> kernel -> ms per bucket (the layers timed, _time_group)
    seconds: float  # how long measuring took
    date: str
    source: str = "measured"  # "measured" | "cached" | "forced"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": self.key, "plans": {s: list(p) for s, p in self.plans.items()},
                "timings": self.timings, "seconds": round(self.seconds, 2), "date": self.date}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Calibration:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise FileFormatError(f"{where} is not a {FORMAT} file")
        try:
            plans = {s: tuple(p) for s, p in data["plans"].items()}
            if any(len(p) != len(ROW_BUCKETS) or not set(p) <= set(KERNELS) for p in plans.values()):
                raise ValueError("bad plan")
            return cls(data["key"], plans, data["timings"], float(data["seconds"]), data["date"], "cached")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FileFormatError(f"{where} is malformed ({exc})") from exc


def cache_path(key: dict[str, Any]) -> Path:
    """Where the calibration for ``key`` is cached."""

    return cache_dir() / "kernels" / f"{key_hash(key)}.json"


def calibrate(
    model: nn.Module,
    repeats: int = 6,
    kernels: Sequence[str] | None = None,
    use_cache: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Calibration:
    """The fastest kernel per ``dtype`` CPU linear shape of ``model`` and row bucket, read from
    the cache when this device was calibrated before, else measured (and cached).

    For each shape, enough of the model's own layers of that shape to stream
    :data:`STREAM_BYTES` from memory (as a forward pass does) run back to back on random rows;
    kernels take turns call by call (:func:`_time_group`); all shapes are timed in
    :data:`PASSES` passes of ``repeats / PASSES`` rounds each and a kernel's time is its best
    pass, so a burst of load from other processes during one pass spoils nothing. The dtype's
    :func:`~sequoia.kernels.default_kernel` keeps a bucket unless another kernel is
    :data:`MARGIN` faster.
    """
    groups = linear_groups(model, dtype)
    key = device_key(dtype, list(groups))
    path = cache_path(key)
    if use_cache and path.is_file():
        try:
            cached = Calibration.from_json(read_json(path), str(path))
            if cached.key == key and set(cached.plans) == set(groups):
                return cached
        except FileFormatError:
            pass  # measure again and overwrite
    kernels = tuple(kernels or candidates(dtype))
    start = time.perf_counter()
    passes = [{shape: _time_group(layers, kernels, -(-repeats // PASSES)) for shape, layers in groups.items()}
              for _ in range(PASSES)]
    timings = {shape: {k: [min(p[shape][k][b] for p in passes) for b in range(len(ROW_BUCKETS))] for k in kernels}
               for shape in groups}
    plans = {shape: _choose(t, default_kernel(dtype)) for shape, t in timings.items()}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = Calibration(key, plans, timings, time.perf_counter() - start, date)
    if use_cache:
        try:
            write_json_atomic(path, result.to_json())
        except OSError:
            pass  # an unwritable cache costs a re-measure next time, nothing else
    return result


def _time_group(layers: list[nn.Linear], kernels: Sequence[str], repeats: int) -> dict[str, list[float]]:
    """ms per kernel and bucket of running the timed ``layers`` (enough to stream) back to back.

    Every layer call is timed on its own, and consecutive calls take turns between kernels
    (call ``i`` of round ``r`` runs kernel ``(i + r) mod K`` on layer ``i``), so load from other
    processes falls on every kernel alike and each call reads a weight no recent call touched.
    ``repeats * K`` rounds give each kernel ``repeats`` calls per layer. A kernel
    :data:`PRUNE` times slower than the best over the first ``K`` rounds is not timed again.
    The group's time is the :data:`QUANTILE` of its calls times the number of layers: other
    processes only add time, so a low quantile of many short samples estimates the idle cost.
    """
    per_layer = layers[0].weight.numel() * layers[0].weight.element_size()
    used = layers[: max(1, min(len(layers), -(-STREAM_BYTES // per_layer)))]
    fast = {k: [FastLinear(layer, (k,) * len(ROW_BUCKETS)) for layer in used] for k in kernels}
    dtype = used[0].weight.dtype
    inputs = [torch.randn(1, rows, used[0].in_features, dtype=dtype) for rows in ROW_BUCKETS]  # [1, rows, in] each
    samples: dict[str, list[list[float]]] = {k: [[] for _ in ROW_BUCKETS] for k in kernels}
    alive = [list(kernels) for _ in ROW_BUCKETS]
    clock, turns = time.perf_counter, len(kernels)
    with torch.inference_mode():
        for layer in (layer for ks in fast.values() for layer in ks):  # warm-up: pack, first-call setup
            layer(inputs[1])
        for round_ in range(repeats * turns):
            for b, x in enumerate(inputs):
                if round_ == turns:
                    typical = {k: _quantile(samples[k][b], 0.5) for k in kernels}
                    alive[b] = [k for k in kernels if typical[k] <= PRUNE * min(typical.values())]
                for i in range(len(used)):
                    k = alive[b][(i + round_) % len(alive[b])]
                    start = clock()
                    fast[k][i](x)
                    samples[k][b].append(clock() - start)
    return {k: [round(1000.0 * len(used) * _quantile(s, QUANTILE), 4) for s in samples[k]] for k in kernels}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _choose(timings: dict[str, list[float]], default: str) -> Plan:
    plan = []
    for b in range(len(ROW_BUCKETS)):
        best = min(timings, key=lambda k: timings[k][b])
        if default in timings and timings[default][b] <= timings[best][b] * (1 + MARGIN):
            best = default
        plan.append(best)
    return tuple(plan)


# ---------------------------------------------------------------------------- applying
def apply_kernels(model: nn.Module, calibration: Calibration | None = None, force: str | None = None) -> int:
    """Swap, in place, the CPU ``nn.Linear`` layers of ``model`` (float32 and bfloat16) whose
    calibrated plan differs from plain ``F.linear`` for a :class:`FastLinear`; returns how many
    were swapped. Models with under :data:`MIN_BYTES` of such weights, or not wholly on the
    CPU, are left alone unless a ``calibration`` or ``force`` is given.

    ``calibration`` (of the model's dtype) defaults to :func:`calibrate`, cached per device and
    dtype; ``force`` names one kernel for every shape and bucket instead (tests, A/B runs).
    Shared modules (a tied or reused layer) are swapped once. The choice is recorded on the
    model (:func:`describe`).
    """
    swapped = 0
    for dtype in DTYPES:
        groups = linear_groups(model, dtype)
        if not groups or (force is None and calibration is None and not worth_it(model, groups)):
            continue
        if force is not None:
            assert force in candidates(dtype), f"kernel {force!r} is not available here for {dtype}"
            plans = {shape: (force,) * len(ROW_BUCKETS) for shape in groups}
            chosen = Calibration(device_key(dtype, list(groups)), plans, {}, 0.0, "", "forced")
        else:
            chosen = calibration or calibrate(model, dtype=dtype)
        swapped += _swap(model, dtype, chosen)
    return swapped


def _swap(model: nn.Module, dtype: torch.dtype, calibration: Calibration) -> int:
    swapped: dict[int, FastLinear] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not eligible(child, dtype):
                continue
            plan = calibration.plans.get(shape_name(child))
            if plan is None or (set(plan) == {"plain"} and default_kernel(dtype) == "plain"):
                continue
            if id(child) not in swapped:
                swapped[id(child)] = FastLinear(child, plan)
            setattr(parent, name, swapped[id(child)])
    setattr(model, ATTR, {"source": calibration.source, "file": key_hash(calibration.key),
                          "seconds": round(calibration.seconds, 2), "date": calibration.date})
    return len(swapped)


def use_fast_kernels(model: nn.Module) -> int:
    """What ``load_model(..., prepack=True)`` applies: float32 and bfloat16 CPU linears on their
    calibrated kernels (:func:`apply_kernels`), and bfloat16 ones of models too small to
    calibrate packed for oneDNN (:mod:`sequoia.prepack`). Returns how many layers changed."""
    return apply_kernels(model) + prepack_linears(model)


def fast_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with :func:`use_fast_kernels` applied (the original stays plain,
    e.g. for a ``generate`` baseline); ``model`` itself where nothing would change."""
    if not any(eligible(m) for m in model.modules()):  # no CPU float32/bfloat16 linear: never copied (a GPU model)
        return model
    faster = copy.deepcopy(model)
    return faster if use_fast_kernels(faster) else model
