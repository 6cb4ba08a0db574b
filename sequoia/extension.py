"""Sequoia's compiled kernel (``csrc/bf16_rows.cpp``): built on first use, cached across processes.

Where the CPU has no bfloat16 arithmetic that oneDNN uses (AVX2 machines: AMD Zen 2/3, Intel
before Cooper Lake), a bfloat16 ``F.linear`` of 2-16 rows costs nearly as many times the
1-row product as it has rows. The compiled kernel reads each weight once for all rows instead
(:mod:`sequoia.kernels` offers it as the ``rows`` kernel; the calibration decides per device
whether it wins). It is compiled with torch's C++ extension builder on first use -- about
half a minute on two cores -- into torch's extension directory (``$TORCH_EXTENSIONS_DIR``,
else ``~/.cache/torch_extensions``) under a name that hashes the source, the flags and torch,
so later processes load it in well under a second. :func:`build_info` says what it cost.

Anything that stops it -- a CPU without AVX2 and FMA, no C++ compiler or ninja, a failed build
(remembered in the build directory, so later processes don't retry it), ``SEQUOIA_NO_EXTENSIONS=1``
-- makes :func:`bf16_rows` return ``None`` (the reason is in :func:`build_info`): the kernel is then
simply not a candidate.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from sequoia.device import cpu_info

SOURCE = Path(__file__).parent / "csrc" / "bf16_rows.cpp"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")  # OpenMP resolves to torch's own runtime when loaded
NEEDS = ("avx2", "fma")
DISABLE_ENV = "SEQUOIA_NO_EXTENSIONS"
_INFO: dict[str, Any] = {}


def module_name() -> str:
    """The extension's name: changes with its source, flags and torch's version."""
    import torch

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + torch.__version__.encode())
    return f"sequoia_bf16_rows_{digest.hexdigest()[:12]}"


@functools.cache
def bf16_rows() -> ModuleType | None:
    """The compiled kernel module (``linear(x, weight, bias=None)``), or ``None`` where it cannot
    be built or run here; compiled once per machine and torch, loaded from the cache after."""
    _INFO.clear()
    reason = _unavailable()
    if reason:
        _INFO.update(available=False, reason=reason)
        return None
    from torch.utils import cpp_extension

    name = module_name()
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    record, failed = build_dir / "sequoia-build.json", build_dir / "sequoia-build-failed.txt"
    if failed.is_file():  # this source failed to build here before: don't pay for trying again
        _INFO.update(available=False, reason=f"build failed earlier ({failed}): {failed.read_text()[:200]}")
        return None
    cold = not record.is_file()
    if cold:  # a pause of half a minute deserves a word; once per machine and torch
        print("sequoia: compiling its bfloat16 kernel for this machine (once, ~30 s)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(name, [str(SOURCE)], extra_cflags=list(FLAGS), extra_ldflags=["-fopenmp"],
                                    build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # noqa: BLE001 -- a failed build only removes a candidate kernel
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        reason = next((line for line in lines if "error:" in line), lines[-1])[:300]  # the compiler's first error
        failed.write_text(reason)
        _INFO.update(available=False, reason=f"build failed: {reason}")
        return None
    seconds = time.perf_counter() - start
    if cold:
        record.write_text(json.dumps({"build_seconds": round(seconds, 1)}))
    built = json.loads(record.read_text()) if record.is_file() else {}
    _INFO.update(available=True, name=name, load_seconds=round(seconds, 2),
                 cold_build_seconds=built.get("build_seconds"), built_now=cold)
    return module


def build_info() -> dict[str, Any]:
    """What :func:`bf16_rows` found: ``available``, and either the reason it is not or the
    module's name, this process's load time and what compiling it cost (a cold start)."""
    return dict(_INFO)


def disabled() -> bool:
    """Whether ``SEQUOIA_NO_EXTENSIONS`` turns the compiled kernel off."""
    return os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")


def _unavailable() -> str | None:
    if disabled():
        return f"{DISABLE_ENV} is set"
    missing = [flag for flag in NEEDS if flag not in cpu_info()["flags"]]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler (c++ or g++) on PATH"
    if not shutil.which("ninja"):
        bin_dir = Path(sys.executable).parent  # the `ninja` package installs next to Python
        if not (bin_dir / "ninja").is_file():
            return "ninja is not installed (pip install ninja)"
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return None
