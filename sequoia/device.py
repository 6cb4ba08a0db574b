"""The device fingerprint: what about a machine changes the kernels a forward pass runs.

A latency profile, a draft's cost per tree level and a bench result are only true of the
device they were measured on, so each records :func:`fingerprint`. Two fingerprints describe
*the same device* when the fields of :func:`match_fields` agree:

* always: the device type, torch ``major.minor`` and torch's intra-op threads;
* on CPU: the vendor, model name, family/model numbers, the instruction sets that select
  kernels (:data:`KERNEL_FLAGS` found in ``/proc/cpuinfo``), the ATen capability torch
  dispatches to (``torch.backends.cpu.get_cpu_capability()``) and the environment settings
  that cap it (:data:`ISA_ENV`, which is how an AVX2 machine is emulated on a newer one);
* on CUDA: the GPU's name and compute capability.

The date, the load, the core count, memory and the torch patch level are recorded but need not
match. Matching needs no torch (only taking a fingerprint does). :func:`fingerprint_key` hashes the matching fields (the profile cache's key), and
:func:`mismatches` says in words which fields differ::

    here = fingerprint("cpu")
    mismatches(profile.fingerprint, here)   # [] on this device
    # ['cpu_model: Intel(R) Xeon(R) Platinum 8581C CPU (profile) vs AMD EPYC (here)', ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

FINGERPRINT_VERSION = 1
KERNELS_VERSION = 6  # of sequoia.kernels and their calibration: measurements made with older ones are stale
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
COMMON_FIELDS = ("type", "torch_minor", "threads")
CPU_FIELDS = ("cpu_vendor", "cpu_model", "cpu_family_model", "isa_flags", "aten_capability", "isa_env")
CUDA_FIELDS = ("gpu_name", "gpu_capability")
UNRECORDED = "not recorded"


def fingerprint(device: Any = "cpu") -> dict[str, Any]:
    """This process's fingerprint for ``device`` (``cpu``, ``cuda[:i]`` or a torch device); call
    it after the thread count is set (``--threads``), since the threads are part of it."""
    import torch

    device = torch.device(device)
    cpu = cpu_info()
    fp: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "type": device.type,
        "cpu_vendor": cpu["vendor"],
        "cpu_model": cpu["model"],
        "cpu_family_model": cpu["family_model"],
        "isa_flags": cpu["flags"],
        "aten_capability": aten_capability(),
        "isa_env": {name: os.environ.get(name) or None for name in ISA_ENV},
        "cores": _cores(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_minor": torch_minor(torch.__version__),
        "torch_build": torch_build(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        fp.update({
            "gpu_name": props.name,
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        })
    fp["effective_isa"] = effective_isa(fp)
    fp["dtypes"] = runnable_dtypes(device)
    return fp


def runnable_dtypes(device: Any = "cpu") -> list[str]:
    """The dtypes worth profiling on ``device``, among those it computes: float32 and bfloat16
    on CPU; float16 too on a GPU (not a match field: it follows from the others)."""
    import torch

    device = torch.device(device)
    wanted = ["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else [])
    runs = []
    for name in wanted:
        if device.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
            continue
        try:
            a = torch.ones(4, 4, dtype=getattr(torch, name), device=device)  # [4, 4]
            torch.nn.functional.linear(a, a).sum().item()
            runs.append(name)
        except RuntimeError:
            pass
    return runs


def match_fields(fp: dict[str, Any]) -> tuple[str, ...]:
    """The fields that must agree for two fingerprints to be the same device."""
    return COMMON_FIELDS + (CUDA_FIELDS if fp.get("type") == "cuda" else CPU_FIELDS)


def fingerprint_key(fp: dict[str, Any]) -> str:
    """12 hex digits hashing :func:`match_fields` (the same on every run of one device)."""
    fields = {name: fp.get(name) for name in match_fields(fp)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def mismatches(recorded: dict[str, Any] | None, here: dict[str, Any]) -> list[str]:
    """``field: value (recorded) vs value (here)`` for every matching field that differs; a
    fingerprint that lacks a field (one recorded before fingerprints were) differs in it."""
    recorded = recorded or {}
    out, missing = [], []
    for name in match_fields(here):
        if name not in recorded:
            missing.append(name)
        elif recorded[name] != here.get(name):
            out.append(f"{name}: {_show(recorded[name])} (recorded) vs {_show(here.get(name))} (here)")
    if missing:
        out.append(f"{', '.join(missing)} {UNRECORDED}")
    return out


def same_device(recorded: dict[str, Any] | None, here: dict[str, Any]) -> bool:
    return not mismatches(recorded, here)


def legacy_fingerprint(device: dict[str, Any]) -> dict[str, Any]:
    """What a profile's ``device`` section written before fingerprints says (model, threads,
    torch), so a refusal can name the fields that differ; the rest is unrecorded."""
    fp = {"type": device.get("type"), "threads": device.get("threads")}
    if device.get("cpu_model"):
        fp["cpu_model"] = device["cpu_model"]
    if device.get("torch"):
        fp["torch_minor"] = torch_minor(str(device["torch"]))
    if device.get("type") == "cuda" and device.get("name"):
        fp["gpu_name"] = device["name"]
    return fp


def describe(fp: dict[str, Any]) -> str:
    """One line: ``AMD EPYC (AuthenticAMD 25/17), AVX512 +avx512_bf16, 2 of 2 cores, torch 2.13.0+cpu``."""
    if fp.get("type") == "cuda":
        where = f"{fp.get('gpu_name')} (sm {fp.get('gpu_capability')}, {fp.get('gpu_memory_gb')} GiB)"
    else:
        where = f"{fp.get('cpu_model')} ({fp.get('cpu_vendor')} {fp.get('cpu_family_model')})"
    return (f"{where}, {fp.get('effective_isa')}, {fp.get('threads')} threads on {fp.get('cores')} cores, "
            f"torch {fp.get('torch')} ({fp.get('torch_build')})")


# ---------------------------------------------------------------------------- without torch
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def current(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """:func:`fingerprint` of ``device`` with ``threads`` torch threads (None: torch's default),
    remembered under the cache: a CPU whose inputs (``/proc/cpuinfo``, the ISA and thread
    environment, the torch installation) were seen before is answered without importing torch,
    so a cached profile is found in a fraction of a second."""
    memo, fresh = None, "torch" not in sys.modules  # a process that set its own threads is not memoised
    if device == "cpu" and fresh:
        inputs = {"cpu": cpu_info(), "env": {k: os.environ.get(k) for k in ISA_ENV + THREAD_ENV},
                  "threads": threads, "cores": _cores(), "torch": _torch_install()}
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
        from sequoia.files import cache_dir

        memo = cache_dir() / "profiles" / "fingerprints" / f"{digest}.json"
        if memo.is_file():
            try:
                return json.loads(memo.read_text())
            except (OSError, ValueError):
                pass
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fp = fingerprint(device)
    if memo is not None:
        try:
            from sequoia.files import write_json_atomic

            write_json_atomic(memo, fp)
        except OSError:
            pass
    return fp


def _torch_install() -> str:
    """Which torch is installed (version and place), read without importing it."""
    try:
        from importlib import metadata

        dist = metadata.distribution("torch")
        return f"{dist.version}@{dist.locate_file('')}"
    except Exception:  # noqa: BLE001 -- no metadata: never served from the memo by mistake
        return f"unknown-{os.getpid()}"


def _cores() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---------------------------------------------------------------------------- the parts
def cpu_info(path: str | os.PathLike = "/proc/cpuinfo") -> dict[str, Any]:
    """Vendor, model name, ``family/model`` numbers and the :data:`KERNEL_FLAGS` present."""
    fields: dict[str, str] = {}
    try:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "vendor": fields.get("vendor_id") or fields.get("CPU implementer") or platform.machine(),
        "model": fields.get("model name") or platform.processor() or "unknown CPU",
        "family_model": f"{fields.get('cpu family', fields.get('CPU architecture', '?'))}/"
                        f"{fields.get('model', fields.get('CPU part', '?'))}",
        "flags": [f for f in KERNEL_FLAGS if f in flags],
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform says."""
    return cpu_info()["model"]


def aten_capability() -> str:
    """The vectorised kernels ATen dispatches to (``AVX512``, ``AVX2``, ``DEFAULT``...)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def effective_isa(fp: dict[str, Any]) -> str:
    """A short summary: ATen's capability, the bf16/AMX hardware, and any cap set in the
    environment, e.g. ``AVX2 (capped: ONEDNN_MAX_CPU_ISA=AVX2)`` or ``AVX512 +avx512_bf16``."""
    flags = [f for f in fp.get("isa_flags", []) if f in ("avx512_bf16", "amx_bf16", "avx512_fp16")]
    caps = [f"{k}={v}" for k, v in (fp.get("isa_env") or {}).items() if v]
    text = " ".join([str(fp.get("aten_capability"))] + [f"+{f}" for f in flags])
    return text + (f" (capped: {', '.join(caps)})" if caps else "")


def torch_minor(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13``."""
    return ".".join(version.split("+")[0].split(".")[:2])


def torch_build() -> str:
    """``cpu, mkldnn, mkl`` or ``cuda 12.4, cudnn ...``: which backends this torch has."""
    import torch

    parts = [f"cuda {torch.version.cuda}" if torch.version.cuda else "cpu"]
    if torch.backends.mkldnn.is_available():
        parts.append("mkldnn")
    if torch.backends.mkl.is_available():
        parts.append("mkl")
    return ", ".join(parts)


def _show(value: Any) -> str:
    if isinstance(value, dict):
        set_ = {k: v for k, v in value.items() if v}
        return ",".join(f"{k}={v}" for k, v in set_.items()) or "none set"
    if isinstance(value, list):
        return "+".join(value) or "none"
    return str(value)
