"""Fast linear kernels for few-token forwards on CPU, chosen per device by measurement.

Verifying a token tree multiplies a handful of rows (1-64 tokens) by every weight matrix. Which
kernel does that fastest depends on the CPU, not on the model: on an AMD EPYC (Zen 4, and
AVX2-only Zen 3) MKL's float32 GEMM, which ``F.linear`` calls, costs 2-5x more for 2-16 rows
than for one (SmolLM2's 49,152 x 576 output layer: ~12 ms for 1 row, 30-70 ms for 2-16), while
oneDNN from a weight packed once stays near the 1-row cost; on an Intel Xeon MKL is fine. Where
oneDNN has no bfloat16 arithmetic (AVX2), a bfloat16 ``F.linear`` costs about one 1-row product
per row. So nothing here is assumed: :func:`~sequoia.kernel_tuning.calibrate` times the
candidate kernels on the model's own layers for each row count, and :class:`FastLinear` runs,
for each call, the kernel that won for its row count. The choice is cached per device
(``device_key``: CPU model, the ISA torch dispatches to, the environment settings that cap it,
threads, torch, dtype, shapes) under :func:`sequoia.files.cache_dir`, so only the first load on
a device pays for it (:mod:`sequoia.kernel_tuning`, which also applies the choice to a model).

Candidate kernels (``y = x W^T + b``; weights unchanged, each dtype stays itself):

* ``plain``  -- ``F.linear`` (MKL, ATen's BLAS or oneDNN), what the model runs without this module;
* ``onednn`` -- oneDNN's inner product (brgemm) from a weight reordered once into its blocked
  layout (float32; bfloat16 where oneDNN has bfloat16 arithmetic, as :mod:`sequoia.prepack`
  does): the fast one from ~8 rows on;
* ``mkl``    -- float32: MKL's GEMM from a weight packed once for one row: on the EPYC the
  output layer's matrix-vector product runs near memory bandwidth (~5 ms instead of ~12);
* ``wxt``    -- float32: ``(W x^T)^T``: the same BLAS with the operands swapped, which MKL
  treats as a few matrix-vector products: the fast one for 1-4 rows on the EPYC, where it
  streams the weight at memory bandwidth. An odd row count gets one row repeated: BLAS runs a
  single column as a matrix-vector product (gemv), which on the EPYC streams at half the speed
  of two.
* ``rows``   -- bfloat16: Sequoia's compiled AVX2 kernel (:mod:`sequoia.extension`), which reads
  each weight once for all rows and prefetches the next block: on the EPYC, 1-4 rows cost about
  what one row costs through ``F.linear`` with AVX2 only, and less than oneDNN's with AVX-512.

Kernels may sum in another order, so logits can differ from ``plain`` in the last bits (the
dtype's rounding); greedy output can then differ only where two logits tie to that precision.
Each packed copy costs the memory of its weight again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sequoia.extension import bf16_rows, build_info
from sequoia.prepack import can_prepack


KERNELS = ("plain", "onednn", "mkl", "wxt", "rows")
DTYPES = (torch.float32, torch.bfloat16)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # a call with r rows uses the first bucket >= r (else the last)
PACK_BATCH_HINT = 16
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
           "MKL_DEBUG_CPU_TYPE")  # caps on the instruction set (how an AVX2-only CPU is emulated)
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # how threads wait
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
    count = rows.shape[0]
    if count % 2:  # BLAS runs one column as a matrix-vector product, at half the speed of two on the EPYC
        rows = torch.cat((rows, rows[:1]))
    y = torch.mm(layer.weight, rows.t()).t()[:count]  # [r, out], transposed view
    if layer.bias is not None:
        y = y + layer.bias
    return y.contiguous().reshape(*x.shape[:-1], layer.out_features)


def _rows(x: torch.Tensor, layer: FastLinear) -> torch.Tensor:
    return layer.compiled.linear(x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())


RUN: dict[str, Callable[[torch.Tensor, FastLinear], torch.Tensor]] = {
    "plain": _plain, "onednn": _onednn, "mkl": _mkl, "wxt": _wxt, "rows": _rows,
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
        self.compiled = bf16_rows() if "rows" in self.plan else None

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


def candidates(dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    """The kernels this machine and torch build can run for ``dtype`` weights."""
    if dtype == torch.bfloat16:
        usable = {"plain", "onednn" if can_prepack() else "", "rows" if bf16_rows() is not None else ""}
    else:
        usable = {"plain", "wxt", "onednn" if onednn_available() else "", "mkl" if mkl_available() else ""}
    return tuple(k for k in KERNELS if k in usable)


def default_kernel(dtype: torch.dtype) -> str:
    """What a ``dtype`` layer runs unless calibration finds better: packed oneDNN for bfloat16
    where oneDNN has bfloat16 arithmetic (what :func:`sequoia.prepack.prepack_linears` applies),
    else ``F.linear``."""
    return "onednn" if dtype == torch.bfloat16 and can_prepack() else "plain"


# ---------------------------------------------------------------------------- which layers
def eligible(module: nn.Module, dtype: torch.dtype | None = None) -> bool:
    """A CPU ``nn.Linear`` of a dtype with kernels here (of ``dtype``, when given)."""
    return (type(module) is nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype in (DTYPES if dtype is None else (dtype,)))


def worth_it(model: nn.Module, groups: dict[str, list[nn.Linear]]) -> bool:
    # a model split over devices (offload) keeps CPU copies that hooks move: leave it alone
    if not all(p.device.type == "cpu" for p in model.parameters()):
        return False
    return sum(m.weight.numel() * m.weight.element_size() for layers in groups.values() for m in layers) >= MIN_BYTES


def shape_name(linear: nn.Module) -> str:
    """``"out x in"`` (plus ``"+b"`` with a bias): the key plans are stored under."""
    return f"{linear.out_features}x{linear.in_features}{'+b' if linear.bias is not None else ''}"


def linear_groups(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, list[nn.Linear]]:
    """The model's ``dtype`` CPU ``nn.Linear`` layers by :func:`shape_name`, each layer once."""
    groups: dict[str, list[nn.Linear]] = {}
    seen: set[int] = set()
    for module in model.modules():
        if eligible(module, dtype) and id(module) not in seen:
            seen.add(id(module))
            groups.setdefault(shape_name(module), []).append(module)
    return groups


def describe(model: nn.Module) -> dict[str, Any]:
    """Which kernels the model's linear layers run, for a profile's device description:
    ``{"fast_linears": n, "plans": {shape: {rows: kernel}}, "calibration": {...}}``, plus the
    ISA torch dispatches to and the environment settings that cap it or set how threads wait;
    with the compiled kernel in use, what loading it cost and what compiling it costs (a cold start)."""
    plans: dict[str, dict[str, str]] = {}
    count = 0
    for module in model.modules():
        if isinstance(module, FastLinear):
            count += 1
            plans[shape_name(module)] = {str(r): k for r, k in zip(ROW_BUCKETS, module.plan)}
    compiled = any("rows" in p.values() for p in plans.values())
    return {
        "fast_linears": count,
        "plans": plans,
        "calibration": getattr(model, ATTR, None),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {name: value for name in ISA_ENV + THREAD_ENV if (value := os.environ.get(name))},
        **({"compiled": build_info()} if compiled else {}),
    }
