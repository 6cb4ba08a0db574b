#!/usr/bin/env bash
# The main job end to end on the default model (SmolLM2-135M-Instruct, CPU):
# profile (shipped) -> acceptance -> optimize -> streamed generation -> short bench.
# Outputs go to results/demo/ (override with DEMO_OUT); the draft with DEMO_DRAFT (default: the
# target's packaged trained draft, smollm2-135m-chimera).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_OUT:-results/demo}
DRAFT=${DEMO_DRAFT:-smollm2-135m-chimera}
PROFILE=${DEMO_PROFILE:-profiles/cpu-2core-smollm2-135m-bfloat16.json}
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 device profile: $PROFILE (shipped; re-measure with: sequoia profile run --dtype bfloat16 --out ...)"
sequoia profile show "$PROFILE"

step "2/5 acceptance of draft '$DRAFT' for smollm2-135m (greedy, 6 built-in prompts, tree depths 1-4)"
sequoia acceptance --draft "$DRAFT" --dtype bfloat16 --limit 6 --max-new-tokens 48 --width 8 --depth 4 \
    --out "$OUT/acceptance-greedy.json"

step "3/5 the fastest tree for this device"
sequoia optimize --profile "$PROFILE" --acceptance "$OUT/acceptance-greedy.json" --max-depth 12 \
    --out "$OUT/tree.json"
sequoia tree show "$OUT/tree.json"

step "4/5 streamed generation with that tree (lossless: the target's own greedy output)"
sequoia generate --draft "$DRAFT" --tree "$OUT/tree.json" --dtype bfloat16 --chat --max-new-tokens 96 \
    --prompt "Give three tips for writing clear technical documentation."

step "5/5 short bench: plain generate, HF assisted/prompt lookup and tree decoding, side by side"
sequoia bench --profile "$PROFILE" --draft "$DRAFT" --limit 3 --max-new-tokens 48 --temperatures 0,1.0 \
    --out "$OUT/bench"

step "done: results in $OUT/ (full benchmark: sequoia bench --profile $PROFILE --out results/bench)"
