"""Fast float32 linear kernels for few-token forwards on CPU, chosen per device by measurement.

Verifying a token tree multiplies a handful of rows (1-64 tokens) by every weight matrix. Which
kernel does that fastest depends on the CPU, not on the model: on an AMD EPYC (Zen 4, and
AVX2-only Zen 3) MKL's float32 GEMM, which ``F.linear`` calls, costs 2-5x more for 2-16 rows
than for one (SmolLM2's 49,152 x 576 output layer: ~12 ms for 1 row, 30-70 ms for 2-16), while
oneDNN from a weight packed once stays near the 1-row cost; on an Intel Xeon MKL is fine.
So nothing here is assumed: :func:`calibrate` times the candidate kernels on the model's own
layers for each row count, and :class:`FastLinear` runs, for each call, the kernel that won for
its row count. The choice is cached per device (:func:`device_key`: CPU model, the ISA torch
dispatches to, the environment settings that cap it, threads, torch, dtype, shapes) under
:func:`sequoia.models.cache_dir`, so only the first load on a device pays for it.

Candidate kernels (``y = x W^T + b``; weights unchanged, float32 stays float32):

* ``plain``  -- ``F.linear`` (MKL or ATen's BLAS), what the model runs without this module;
* ``onednn`` -- oneDNN's inner product (brgemm) from a weight reordered once into its blocked
  layout, as :mod:`sequoia.prepack` does for bfloat16: the fast one from ~8 rows on;
* ``mkl``    -- MKL's GEMM from a weight packed once for one row: on the EPYC the output layer's
  matrix-vector product runs near memory bandwidth (~5 ms instead of ~12);
* ``wxt``    -- ``(W x^T)^T``: the same BLAS with the operands swapped, which MKL treats as a
  few matrix-vector products: the fast one for 2-4 rows on the EPYC.

Kernels may sum in another order, so logits can differ from ``plain`` in the last bits
(float32 rounding); greedy output can then differ only where two logits tie to that precision.
Each packed copy costs the memory of its weight again.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sequoia.errors import FileFormatError
from sequoia.files import read_json, write_json_atomic
from sequoia.prepack import can_prepack, prepack_linears

FORMAT = "sequoia-kernels/1"
KERNELS = ("plain", "onednn", "mkl", "wxt")
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # a call with r rows uses the first bucket >= r (else the last)
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
           "MKL_DEBUG_CPU_TYPE")
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # how threads wait
MARGIN = 0.05  # another kernel replaces `plain` only when at least this much faster
STREAM_BYTES = 48 << 20  # calibrate on enough layers of one shape to stream from memory (past L3), as a forward does
QUANTILE = 0.25 # of per-call times: an idle machine's cost, measured on a busy one
PRUNE = 2.0  # a kernel this much slower than the best in the first rounds is not timed again
PASSES = 2  # independent passes over all shapes; the faster wins, so a burst of load spoils neither
METHOD = 4  # bump when calibration changes, so caches measured the old way are not reused
PACK_BATCH_HINT = 16
MIN_BYTES = 16 << 20  # smaller models stay plain: Python, not products, dominates their forward
ATTR = "sequoia_kernels"  # the model attribute that records which calibration was applied

Plan = tuple[str, ...]  # kernel per ROW_BUCKETS entry


# ---------------------------------------------------------------------------- the kernels
def _plain(x: torch.Tensor, layer: FastLinear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _onednn(x: torch.Tensor, layer: FastLinear) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.detach()
    return torch.ops.mkldnn._linear_pointwise(x, layer.packed, bias, "none", [], "")


def _mkl(x: torch.Tensor, layer: FastLinear) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.detach()
    return torch.ops.mkl._mkl_linear(x, layer.mkl_packed, layer.weight.detach(), bias, 1)


def _wxt(x: torch.Tensor, layer: FastLinear) -> torch.Tensor:
    rows = x.reshape(-1, layer.in_features)  # [r, in]
    y = torch.mm(layer.weight, rows.t()).t()  # [r, out], transposed view
    if layer.bias is not None:
        y = y + layer.bias
    return y.contiguous().reshape(*x.shape[:-1], layer.out_features)


RUN: dict[str, Callable[[torch.Tensor, FastLinear], torch.Tensor]] = {
    "plain": _plain, "onednn": _onednn, "mkl": _mkl, "wxt": _wxt,
}


def bucket(rows: int) -> int:
    """Index in :data:`ROW_BUCKETS` of the smallest bucket holding ``rows`` rows (the last for
    more). Example: ``bucket(1) == 0``, ``bucket(3) == 2``, ``bucket(500) == 6``."""
    return min(max(rows - 1, 0).bit_length(), len(ROW_BUCKETS) - 1)


class FastLinear(nn.Module):
    """``y = x W^T + b`` through the kernel :attr:`plan` names for the call's row count, under
    ``no_grad``/``inference_mode`` (``F.linear`` where gradients are recorded). Keeps the
    original ``weight`` (a tied embedding reads it) and the packed copies the plan needs."""

    def __init__(self, linear: nn.Linear, plan: Sequence[str]) -> None:
        super().__init__()
        assert len(plan) == len(ROW_BUCKETS) and set(plan) <= set(KERNELS), plan
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.plan: Plan = tuple(plan)
        self._runs = tuple(RUN[k] for k in self.plan)
        packed = _pack(linear.weight) if "onednn" in self.plan else None
        self.register_buffer("packed", packed, persistent=False)
        mkl_packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), 1) if "mkl" in self.plan else None
        self.register_buffer("mkl_packed", mkl_packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # the packed kernels have no autograd: plain where grads are recorded
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        return self._runs[bucket(rows)](x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, plan={self.plan}"


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)


def onednn_available() -> bool:
    """Whether this torch has oneDNN's packed-weight linear ops on the CPU."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


def mkl_available() -> bool:
    """Whether this torch has MKL's packed-weight linear ops on the CPU."""
    return torch.backends.mkl.is_available() and all(
        hasattr(torch.ops.mkl, name) for name in ("_mkl_reorder_linear_weight", "_mkl_linear")
    )


def candidates() -> tuple[str, ...]:
    """The kernels this torch build can run."""
    missing = {"onednn"} if not onednn_available() else set()
    missing |= {"mkl"} if not mkl_available() else set()
    return tuple(k for k in KERNELS if k not in missing)


# ---------------------------------------------------------------------------- calibration
def _eligible(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"


def _worth_it(model: nn.Module, groups: dict[str, list[nn.Linear]]) -> bool:
    # a model split over devices (offload) keeps CPU copies that hooks move: leave it alone
    if not all(p.device.type == "cpu" for p in model.parameters()):
        return False
    return sum(m.weight.numel() * 4 for layers in groups.values() for m in layers) >= MIN_BYTES


def shape_name(linear: nn.Module) -> str:
    """``"out x in"`` (plus ``"+b"`` with a bias): the key plans are stored under."""
    return f"{linear.out_features}x{linear.in_features}{'+b' if linear.bias is not None else ''}"


def _groups(model: nn.Module) -> dict[str, list[nn.Linear]]:
    groups: dict[str, list[nn.Linear]] = {}
    seen: set[int] = set()
    for module in model.modules():
        if _eligible(module) and id(module) not in seen:
            seen.add(id(module))
            groups.setdefault(shape_name(module), []).append(module)
    return groups


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_key(dtype: torch.dtype, shapes: Sequence[str]) -> dict[str, Any]:
    """Everything a kernel choice depends on: CPU model, the ISA torch dispatches to, the
    environment settings that cap the ISA (how an AVX2 machine is emulated), threads and how
    they wait, torch, dtype, the layer shapes and the candidate kernels."""
    return {
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_env": {name: os.environ.get(name) for name in ISA_ENV},
        "thread_env": {name: os.environ.get(name) for name in THREAD_ENV},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": sorted(shapes),
        "kernels": list(candidates()),
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
    from sequoia.models import cache_dir  # models imports this module

    return cache_dir() / "kernels" / f"{key_hash(key)}.json"


def calibrate(
    model: nn.Module, repeats: int = 6, kernels: Sequence[str] | None = None, use_cache: bool = True
) -> Calibration:
    """The fastest kernel per float32 CPU linear shape of ``model`` and row bucket, read from
    the cache when this device was calibrated before, else measured (and cached).

    For each shape, enough of the model's own layers of that shape to stream
    :data:`STREAM_BYTES` from memory (as a forward pass does) run back to back on random rows;
    kernels take turns call by call (:func:`_time_group`); all shapes are timed in
    :data:`PASSES` passes of ``repeats / PASSES`` rounds each and a kernel's time is its best
    pass, so a burst of load from other processes during one pass spoils nothing. ``plain``
    keeps a bucket unless another kernel is :data:`MARGIN` faster.
    """
    groups = _groups(model)
    key = device_key(torch.float32, list(groups))
    path = cache_path(key)
    if use_cache and path.is_file():
        try:
            cached = Calibration.from_json(read_json(path), str(path))
            if cached.key == key and set(cached.plans) == set(groups):
                return cached
        except FileFormatError:
            pass  # measure again and overwrite
    kernels = tuple(kernels or candidates())
    start = time.perf_counter()
    passes = [{shape: _time_group(layers, kernels, -(-repeats // PASSES)) for shape, layers in groups.items()}
              for _ in range(PASSES)]
    timings = {shape: {k: [min(p[shape][k][b] for p in passes) for b in range(len(ROW_BUCKETS))] for k in kernels}
               for shape in groups}
    plans = {shape: _choose(t) for shape, t in timings.items()}
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
    inputs = [torch.randn(1, rows, used[0].in_features) for rows in ROW_BUCKETS]  # [1, rows, in] each
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


def _choose(timings: dict[str, list[float]]) -> Plan:
    plan = []
    for b in range(len(ROW_BUCKETS)):
        best = min(timings, key=lambda k: timings[k][b])
        if "plain" in timings and timings["plain"][b] <= timings[best][b] * (1 + MARGIN):
            best = "plain"
        plan.append(best)
    return tuple(plan)


# ---------------------------------------------------------------------------- applying
def apply_kernels(model: nn.Module, calibration: Calibration | None = None, force: str | None = None) -> int:
    """Swap, in place, every float32 CPU ``nn.Linear`` of ``model`` whose calibrated plan is
    not all ``plain`` for a :class:`FastLinear`; returns how many were swapped. Models with
    under :data:`MIN_BYTES` of such weights, or not wholly on the CPU, are left alone unless a
    ``calibration`` or ``force`` is given.

    ``calibration`` defaults to :func:`calibrate` (cached per device); ``force`` names one
    kernel for every shape and bucket instead (tests, A/B runs). Shared modules (a tied or
    reused layer) are swapped once. The choice is recorded on the model (:func:`describe`).
    """
    groups = _groups(model)
    if not groups or (force is None and calibration is None and not _worth_it(model, groups)):
        return 0
    if force is not None:
        assert force in candidates(), f"kernel {force!r} is not available here"
        plans = {shape: (force,) * len(ROW_BUCKETS) for shape in groups}
        calibration = Calibration(device_key(torch.float32, list(groups)), plans, {}, 0.0, "", "forced")
    elif calibration is None:
        calibration = calibrate(model)
    swapped: dict[int, FastLinear] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _eligible(child):
                continue
            plan = calibration.plans.get(shape_name(child))
            if plan is None or set(plan) == {"plain"}:
                continue
            if id(child) not in swapped:
                swapped[id(child)] = FastLinear(child, plan)
            setattr(parent, name, swapped[id(child)])
    setattr(model, ATTR, {"source": calibration.source, "file": key_hash(calibration.key),
                          "seconds": round(calibration.seconds, 2), "date": calibration.date})
    return len(swapped)


def use_fast_kernels(model: nn.Module) -> int:
    """What ``load_model(..., prepack=True)`` applies: bfloat16 CPU linears packed for oneDNN
    (:mod:`sequoia.prepack`) and float32 CPU linears on their calibrated kernels
    (:func:`apply_kernels`). Returns how many linear layers changed."""
    return prepack_linears(model) + apply_kernels(model)


def fast_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with :func:`use_fast_kernels` applied (the original stays plain,
    e.g. for a ``generate`` baseline); ``model`` itself where nothing would change."""
    packable = can_prepack() and any(
        type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
        for m in model.modules()
    )
    groups = _groups(model)
    calibration = calibrate(model) if groups and _worth_it(model, groups) else None
    if not packable and (calibration is None or all(set(p) == {"plain"} for p in calibration.plans.values())):
        return model
    faster = copy.deepcopy(model)
    prepack_linears(faster)
    if calibration is not None:
        apply_kernels(faster, calibration)
    return faster


def describe(model: nn.Module) -> dict[str, Any]:
    """Which kernels the model's linear layers run, for a profile's device description:
    ``{"fast_linears": n, "plans": {shape: {rows: kernel}}, "calibration": {...}}``, plus the
    ISA torch dispatches to and the environment settings that cap it."""
    plans: dict[str, dict[str, str]] = {}
    count = 0
    for module in model.modules():
        if isinstance(module, FastLinear):
            count += 1
            plans[shape_name(module)] = {str(r): k for r, k in zip(ROW_BUCKETS, module.plan)}
    return {
        "fast_linears": count,
        "plans": plans,
        "calibration": getattr(model, ATTR, None),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_env": {name: value for name in ISA_ENV + THREAD_ENV if (value := os.environ.get(name))},
    }
