#!/usr/bin/env bash
# The main job end to end on the default model (SmolLM2-135M-Instruct, CPU):
# this device's profile (measured on the first run, cached per device) -> acceptance ->
# the (dtype, tree) plan for this device -> streamed generation -> short bench.
# Outputs go to results/demo/ (override with DEMO_OUT); the draft with DEMO_DRAFT (default: the
# target's packaged trained draft, smollm2-135m-chimera). DEMO_PROFILE=FILE plans with that
# profile instead (refused when it was measured on another device).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_OUT:-results/demo}
DRAFT=${DEMO_DRAFT:-smollm2-135m-chimera}
PROFILE_ARGS=()
if [[ -n "${DEMO_PROFILE:-}" ]]; then PROFILE_ARGS=(--profile "$DEMO_PROFILE"); fi
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
now() { date +%s.%N; }

step "1/5 this device's profile: float32 and bfloat16 (cached per device; measured on the first run)"
start=$(now)
if [[ -n "${DEMO_PROFILE:-}" ]]; then sequoia profile show "$DEMO_PROFILE"; else sequoia profile run; fi
awk -v a="$start" -v b="$(now)" 'BEGIN { printf "profile step took %.1f s\n", b - a }'

step "2/5 acceptance of draft '$DRAFT' for smollm2-135m (greedy, 6 built-in prompts, tree depths 1-4)"
sequoia acceptance --draft "$DRAFT" --limit 6 --max-new-tokens 48 --width 8 --depth 4 \
    --out "$OUT/acceptance-greedy.json"

step "3/5 the fastest dtype and tree for this device (plain decoding if no tree pays)"
sequoia optimize "${PROFILE_ARGS[@]}" --acceptance "$OUT/acceptance-greedy.json" --max-depth 12 \
    --out "$OUT/tree.json"
sequoia tree show "$OUT/tree.json"

step "4/5 streamed generation with that plan (lossless: the target's own greedy output in its dtype)"
sequoia generate --draft "$DRAFT" --tree "$OUT/tree.json" --max-new-tokens 96 \
    --prompt "Give three tips for writing clear technical documentation."

step "5/5 short bench: plain generate, HF prompt lookup and tree decoding in the plan's dtype, side by side"
sequoia bench "${PROFILE_ARGS[@]}" --draft "$DRAFT" --limit 3 --max-new-tokens 48 --temperatures 0,1.0 \
    --out "$OUT/bench"

step "done: results in $OUT/ (full benchmark: sequoia bench --out results/bench)"
