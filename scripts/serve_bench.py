"""Time `sequoia serve` against `sequoia generate` on the same prompts (greedy, chat template).

Starts `sequoia serve` on a free local port; then, prompt by prompt (interleaved, so a drift in
machine load hits both alike), streams the prompt through the chat endpoint (tokens/s over the
whole request, time to first token with the model already loaded) and runs one cold
`sequoia generate` process (its own tokens/s line, and the time from process start to its first
byte of text, model load included); the idle server takes no CPU meanwhile. Both decode
greedily, so their texts must be equal.

    python scripts/serve_bench.py --target smollm2-135m --limit 3 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sequoia.prompts import load_prompts

SEQUOIA = [str(Path(sys.executable).with_name("sequoia"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--draft", default=None, help="default: the target's default draft")
    parser.add_argument("--prompts", default="builtin")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of both (default: all)")
    args = parser.parse_args()
    prompts = [p.text for p in load_prompts(args.prompts, limit=args.limit)]
    model = ["--target", args.target] + (["--draft", args.draft] if args.draft else [])
    model += ["--threads", str(args.threads)] if args.threads else []

    served, generated = run(model, args.target, prompts, args.max_tokens)
    print("tok/s: serve e2e = completion tokens / request time (prefill and HTTP included); serve decode ="
          " the server's decode time per token (metrics, prefill excluded) = what generate reports")
    print(f"{'prompt':>6} {'serve e2e':>9} {'serve decode':>12} {'generate':>8} {'serve TTFT':>10} "
          f"{'cold gen TTFT':>13} same")
    for i, (s, g) in enumerate(zip(served, generated)):
        same = s["text"].strip() == g["text"].strip()
        print(f"{i:>6} {s['tps']:>9.1f} {s['decode_tps']:>12.1f} {g['tps']:>8.1f} {s['ttft']:>9.3f}s "
              f"{g['ttft']:>12.2f}s {same}")
        if not same:
            print(f"  serve:    {s['text']!r}\n  generate: {g['text']!r}")
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print(f"{'mean':>6} {mean(served, 'tps'):>9.1f} {mean(served, 'decode_tps'):>12.1f} "
          f"{mean(generated, 'tps'):>8.1f} {mean(served, 'ttft'):>9.3f}s {mean(generated, 'ttft'):>12.2f}s")


def run(model: list[str], name: str, prompts: list[str], max_tokens: int) -> tuple[list[dict], list[dict]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen(SEQUOIA + ["serve", *model, "--port", str(port)], stdout=subprocess.DEVNULL)
    try:
        while not _up(url):
            if server.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.2)
        print(f"server up in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        _stream(url, name, "Hello", 8)  # warm-up, not counted
        served, generated = [], []
        for prompt in prompts:
            served.append(_stream(url, name, prompt, max_tokens))
            generated.append(generate_run(model, prompt, max_tokens))
        return served, generated
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


def _stream(url: str, name: str, prompt: str, max_tokens: int) -> dict:
    decode_before = _metric(url, "sequoia_time_per_token_seconds_sum")
    body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, text, tokens = time.perf_counter(), None, "", 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                text += piece
    total = time.perf_counter() - start
    per_token = _metric(url, "sequoia_time_per_token_seconds_sum") - decode_before
    return {"text": text, "tps": tokens / total, "decode_tps": 1 / per_token, "ttft": (first or start) - start}


def _metric(url: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(found.group(1))


def generate_run(model: list[str], prompt: str, max_tokens: int) -> dict:
    command = SEQUOIA + ["generate", *model, "--chat", "--prompt", prompt, "--max-new-tokens", str(max_tokens)]
    start = time.perf_counter()
    process = subprocess.Popen(command, bufsize=0, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=os.environ | {"COLUMNS": "300"})
    first_byte = process.stdout.read(1)
    ttft = time.perf_counter() - start
    rest, stderr = process.communicate()
    found = re.search(r"([\d.]+) tokens/s", stderr.decode())
    return {"text": (first_byte + rest).decode(), "tps": float(found.group(1)) if found else 0.0, "ttft": ttft}


if __name__ == "__main__":
    main()
