"""How closely capping the instruction set at AVX2 emulates an AVX2-only CPU: memory-bound and
compute-bound float32 products, run natively and under the AVX2 caps in alternating child
processes (the caps must be set before torch is imported).

    python scripts/isa_fidelity.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def child(threads: int, repeats: int) -> dict[str, float]:
    """GB/s and GFLOP/s of a few products in this process (its ISA settings)."""
    import time

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    head = torch.randn(49152, 576)  # the output layer: 113 MB, streams from memory
    big = torch.randn(2, 1536, 576)  # in cache: compute-bound
    x1, x16, x256 = torch.randn(1, 576), torch.randn(16, 576), torch.randn(256, 576)
    packed = torch.ops.mkldnn._reorder_linear_weight(big[0], 16)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 4]  # lower quartile: other processes only add time

    with torch.inference_mode():
        out = {
            "sum_GBps": head.numel() * 4 / best(head.sum) / 1e9,
            "matvec_GBps": head.numel() * 4 / best(lambda: F.linear(x1, head)) / 1e9,
            "gemm16_head_GFLOPs": 2 * 16 * head.numel() / best(lambda: F.linear(x16, head)) / 1e9,
            "gemm256_mkl_GFLOPs": 2 * 256 * big[0].numel() / best(lambda: F.linear(x256, big[0])) / 1e9,
            "gemm256_onednn_GFLOPs": 2 * 256 * big[0].numel()
            / best(lambda: torch.ops.mkldnn._linear_pointwise(x256, packed, None, "none", [], "")) / 1e9,
        }
    out["aten"] = torch.backends.cpu.get_cpu_capability()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.threads, args.repeats)))
        return
    runs: dict[str, list[dict]] = {"native": [], "avx2": []}
    for _ in range(args.rounds):
        for name in runs:
            env = {k: v for k, v in os.environ.items() if k not in AVX2_ENV}
            env.update(AVX2_ENV if name == "avx2" else {})
            cmd = [sys.executable, __file__, "--child", f"--threads={args.threads}", f"--repeats={args.repeats}"]
            runs[name].append(json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout))
    keys = [k for k in runs["native"][0] if k != "aten"]
    print(f"| measure (median of {args.rounds} processes, {args.threads} threads) | native ({runs['native'][0]['aten']}) "
          f"| AVX2 caps ({runs['avx2'][0]['aten']}) | ratio |")
    print("|---|---:|---:|---:|")
    for key in keys:
        native = statistics.median(r[key] for r in runs["native"])
        avx2 = statistics.median(r[key] for r in runs["avx2"])
        print(f"| {key} | {native:.1f} | {avx2:.1f} | {avx2 / native:.2f} |")


if __name__ == "__main__":
    main()
