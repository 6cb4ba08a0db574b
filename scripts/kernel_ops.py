"""Where a few-token forward spends its time, per op, with and without sequoia.kernels.

Times one tree forward (:func:`sequoia.forward.tree_forward`, complete 4-ary tree, as the
profiler does) of the target over a cached prefix, per token count, for two variants of the
same weights in one process: ``plain`` (as Hugging Face loads it) and ``fast`` (what
``load_model`` runs: the kernels :mod:`sequoia.kernels` calibrated for this device and dtype),
or ``force-<kernel>`` (one kernel everywhere). Rounds interleave variants and token counts (alternating order), so
load from other processes spreads over every cell; medians are reported.

Per-op times come from forward hooks (pre/post ``perf_counter``) on each linear (q/k/v/o,
gate/up/down, lm_head), each attention and MLP block (attention = block minus its projections:
rope, cache update, SDPA; act = MLP minus projections: SiLU * up), the norms and the
embedding. ``total`` is a separate forward without hooks; ``framework`` = total - the ops'
sum (Python, HF glue, masks; negative when hooks cost more than the glue).

    python scripts/kernel_ops.py --isa avx2 --dtype float32 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import sys

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: cap oneDNN, MKL and ATen at AVX2 (set before torch is imported)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefix", type=int, default=128)
    parser.add_argument("--tokens", default="1,2,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", default="plain,fast")
    parser.add_argument("--json", help="also write the medians here")
    return parser.parse_args()


ARGS = _args()
if ARGS.isa == "avx2":
    os.environ.update(AVX2_ENV)
if "torch" in sys.modules:
    raise SystemExit("torch was imported before the ISA settings")

import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from sequoia import kernel_tuning, kernels  # noqa: E402
from sequoia.forward import keep_path, tree_forward  # noqa: E402
from sequoia.models import load_model  # noqa: E402
from sequoia.profiler import prefill, representative_tree  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
ROWS = (*LINEARS, "attention", "act", "norms", "embed", "framework", "total")


def category(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in LINEARS:
        return leaf
    if leaf == "self_attn":
        return "attn_block"
    if leaf == "mlp":
        return "mlp_block"
    if leaf.endswith("norm"):
        return "norms"
    if leaf == "embed_tokens":
        return "embed"
    return None


class OpTimer:
    """Forward hooks that sum wall time per op category over one forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.totals: dict[str, float] = {}
        self.handles = []
        for name, module in model.named_modules():
            cat = category(name)
            if cat is not None:
                self.handles.append(module.register_forward_pre_hook(self._pre))
                self.handles.append(module.register_forward_hook(self._post(cat)))
        self.enabled = False

    def _pre(self, module, args):
        if self.enabled:
            module._t0 = time.perf_counter()

    def _post(self, cat: str):
        def hook(module, args, output):
            if self.enabled:
                self.totals[cat] = self.totals.get(cat, 0.0) + time.perf_counter() - module._t0
        return hook

    def ops(self) -> dict[str, float]:
        """ms per row of :data:`ROWS` (but framework/total) for the last forward."""
        t = {k: 1000.0 * v for k, v in self.totals.items()}
        out = {k: t.get(k, 0.0) for k in LINEARS}
        out["attention"] = t.get("attn_block", 0.0) - sum(t.get(k, 0.0) for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
        out["act"] = t.get("mlp_block", 0.0) - sum(t.get(k, 0.0) for k in ("gate_proj", "up_proj", "down_proj"))
        out["norms"], out["embed"] = t.get("norms", 0.0), t.get("embed", 0.0)
        return out


def main() -> None:
    tokens = [int(t) for t in ARGS.tokens.split(",")]
    loaded = load_model(ARGS.model, dtype=ARGS.dtype, threads=ARGS.threads, tokenizer=False, prepack=False)
    models = {}
    for variant in ARGS.variants.split(","):
        if variant == "plain":
            models[variant] = loaded.model
        else:
            fast = copy.deepcopy(loaded.model)
            if variant == "fast":
                kernel_tuning.use_fast_kernels(fast)
            else:
                kernel_tuning.apply_kernels(fast, force=variant.removeprefix("force-"))
            models[variant] = fast
    print(f"# {kernel_tuning.cpu_model()}, ATen {torch.backends.cpu.get_cpu_capability()}, isa={ARGS.isa}, "
          f"{ARGS.dtype}, {ARGS.threads} threads, prefix {ARGS.prefix}, repeats {ARGS.repeats}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    for variant, model in models.items():
        print(f"# {variant}: {json.dumps(kernels.describe(model))}")
    timers = {v: OpTimer(m) for v, m in models.items()}
    caches = {v: prefill(m, ARGS.prefix, torch.Generator().manual_seed(0)) for v, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    ids = {n: torch.randint(0, loaded.model.config.vocab_size, (n,), generator=gen) for n in tokens}
    trees = {n: representative_tree(n) for n in tokens}
    samples = {(v, n): {row: [] for row in ROWS} for v in models for n in tokens}
    with torch.inference_mode():
        for round_ in range(ARGS.repeats + 2):
            for i, n in enumerate(tokens):
                order = list(models) if (round_ + i) % 2 == 0 else list(reversed(models))
                for v in order:
                    for hooked in (False, True):
                        timers[v].enabled, timers[v].totals = hooked, {}
                        start = time.perf_counter()
                        tree_forward(models[v], ids[n], trees[n], caches[v], ARGS.prefix)
                        ms = 1000.0 * (time.perf_counter() - start)
                        keep_path(caches[v], ARGS.prefix, [])
                        if round_ < 2:
                            continue
                        if hooked:
                            for row, value in timers[v].ops().items():
                                samples[(v, n)][row].append(value)
                        else:
                            samples[(v, n)]["total"].append(ms)
    medians = {}
    for (v, n), rows in samples.items():
        med = {row: statistics.median(values) for row, values in rows.items() if values}
        med["framework"] = med["total"] - sum(med[row] for row in ROWS if row not in ("framework", "total"))
        medians[f"{v}/{n}"] = med
    print(f"# load after {os.getloadavg()[0]:.1f}")
    for v in models:
        print(f"\n{v} ({ARGS.dtype}, {ARGS.isa}), ms median of {ARGS.repeats}")
        print("| op | " + " | ".join(str(n) for n in tokens) + " |")
        print("|---|" + "---:|" * len(tokens))
        for row in ROWS:
            print(f"| {row} | " + " | ".join(f"{medians[f'{v}/{n}'][row]:.2f}" for n in tokens) + " |")
        one = medians[f"{v}/{tokens[0]}"]["total"]
        print("| ratio to 1 | " + " | ".join(f"{medians[f'{v}/{n}']['total'] / one:.2f}" for n in tokens) + " |")
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"args": vars(ARGS), "medians": medians}, f, indent=1)


if __name__ == "__main__":
    main()
