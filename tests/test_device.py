"""The device fingerprint: which fields make two devices the same, the key, and the words a
refusal uses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sequoia import device
from sequoia.device import fingerprint, fingerprint_key, legacy_fingerprint, match_fields, mismatches, same_device
from sequoia.profile import Profile


def test_fingerprint_records_what_selects_kernels():
    fp = fingerprint("cpu")
    for name in ("cpu_vendor", "cpu_model", "cpu_family_model", "isa_flags", "aten_capability", "isa_env",
                 "cores", "threads", "torch", "torch_minor", "torch_build", "effective_isa", "dtypes"):
        assert name in fp, name
    assert fp["type"] == "cpu" and set(fp["isa_env"]) == set(device.ISA_ENV)
    assert fp["aten_capability"] in fp["effective_isa"] and "float32" in fp["dtypes"]
    assert same_device(fp, fingerprint("cpu")) and fingerprint_key(fp) == fingerprint_key(fingerprint("cpu"))


def test_what_must_match_and_what_need_not():
    fp = fingerprint("cpu")
    assert set(match_fields(fp)) == {"type", "torch_minor", "threads", "cpu_vendor", "cpu_model", "cpu_family_model",
                                     "isa_flags", "aten_capability", "isa_env"}
    # the date, load, cores, patch release and the derived summaries are not part of the match
    assert same_device({**fp, "cores": 64, "torch": fp["torch_minor"] + ".9", "dtypes": [], "date": "x"}, fp)
    for name, value in [("threads", fp["threads"] + 1), ("cpu_model", "Other CPU"), ("aten_capability", "AVX2"),
                        ("isa_flags", ["avx2"]), ("torch_minor", "1.0"),
                        ("isa_env", {**fp["isa_env"], "ONEDNN_MAX_CPU_ISA": "AVX2"})]:
        other = {**fp, name: value}
        assert not same_device(other, fp) and fingerprint_key(other) != fingerprint_key(fp)
        (line,) = mismatches(other, fp)
        assert line.startswith(f"{name}: ") and "(recorded) vs" in line and "(here)" in line
    gpu = {**fp, "type": "cuda", "gpu_name": "NVIDIA H100", "gpu_capability": "9.0"}
    assert set(match_fields(gpu)) == {"type", "torch_minor", "threads", "gpu_name", "gpu_capability"}
    assert mismatches({**gpu, "gpu_name": "NVIDIA A100"}, gpu) == ["gpu_name: NVIDIA A100 (recorded) vs NVIDIA H100 (here)"]


def test_an_isa_cap_in_the_environment_is_another_device(monkeypatch):
    native = fingerprint("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    capped = fingerprint("cpu")
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in capped["effective_isa"]
    assert fingerprint_key(capped) != fingerprint_key(native)
    (line,) = mismatches(native, capped)
    assert line == "isa_env: none set (recorded) vs ONEDNN_MAX_CPU_ISA=AVX2,MKL_ENABLE_INSTRUCTIONS=AVX2 (here)"


def test_a_profile_without_fingerprint_differs_in_what_it_did_not_record():
    profile = Profile.load("profiles/cpu-2core-smollm2-135m-bfloat16.json")
    assert profile.fingerprint == legacy_fingerprint(profile.device)
    lines = mismatches(profile.fingerprint, {**fingerprint("cpu"), "threads": 2})
    assert lines[-1].endswith("not recorded") and "isa_flags" in lines[-1]
    assert not same_device(profile.fingerprint, fingerprint("cpu"))


def test_cpu_info_reads_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Xeon X\n"
                    "flags\t\t: fpu avx2 avx512f amx_tile amx_bf16 sse\n\nvendor_id\t: ignored\n")
    assert device.cpu_info(info) == {"vendor": "GenuineIntel", "model": "Xeon X", "family_model": "6/143",
                                     "flags": ["avx2", "avx512f", "amx_tile", "amx_bf16"]}


def test_a_seen_cpu_is_answered_without_importing_torch(tmp_path):
    """The cached-profile path: a second process finds the fingerprint in the cache's memo."""
    env = {**os.environ, "SEQUOIA_CACHE": str(tmp_path)}
    code = ("import sys; from sequoia.device import current; fp = current('cpu'); "
            "print('torch' in sys.modules, fp['aten_capability'])")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    capability = fingerprint("cpu")["aten_capability"]
    assert runs == [f"True {capability}\n", f"False {capability}\n"]


@pytest.mark.parametrize("version, minor", [("2.13.0+cpu", "2.13"), ("2.4.1", "2.4"), ("2.6.0a0+git", "2.6")])
def test_torch_minor(version, minor):
    assert device.torch_minor(version) == minor
