"""Greedy identity of the calibrated kernels (sequoia.kernels) on the real model.

For each built-in prompt: greedy ``generate`` on the model as Hugging Face loads it, greedy
``generate`` with the kernels ``load_model`` applies, and tree decoding (engine, n-gram draft,
a 16-node tree) with those kernels. Tree decoding must equal ``generate`` with the same kernels;
where the kernels' ``generate`` differs from the plain one, prints the first divergence and the
plain model's top-2 logit gap there (a divergence is acceptable only at a tie to the dtype's
precision).

    python scripts/kernel_identity.py --prompts 8 --max-new-tokens 64 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy

import torch

from sequoia.drafts import NgramProposer
from sequoia.engine import Engine
from sequoia.kernels import describe
from sequoia.kernel_tuning import apply_kernels, use_fast_kernels
from sequoia.models import eos_token_ids, load_model
from sequoia.prompts import load_prompts, render_prompt
from sequoia.solver import solve


def greedy(model, ids: torch.Tensor, max_new: int, pad: int) -> list[int]:
    out = model.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                         max_new_tokens=max_new, pad_token_id=pad)
    return out[0, len(ids):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--force", help="one kernel for every layer and row count instead of the calibrated plan")
    args = parser.parse_args()
    loaded = load_model(args.model, dtype=args.dtype, threads=args.threads, prepack=False)
    plain, tok = loaded.model, loaded.tokenizer
    fast = copy.deepcopy(plain)
    if args.force:
        apply_kernels(fast, force=args.force)
    else:
        use_fast_kernels(fast)
    print("kernels:", describe(fast)["plans"])
    tree = solve([0.45, 0.15, 0.08, 0.05], 16, 4).tree(16, 4)
    engine = Engine(fast, NgramProposer(), tree, eos_token_ids=eos_token_ids(plain, tok))
    for prompt in load_prompts("builtin", args.prompts):
        ids = torch.tensor(render_prompt(tok, prompt.text, chat=True))
        ours = greedy(fast, ids, args.max_new_tokens, tok.pad_token_id)
        tree_out = [t for s in engine.generate(ids, args.max_new_tokens) for t in s.tokens]
        theirs = greedy(plain, ids, args.max_new_tokens, tok.pad_token_id)
        print(f"{prompt.text[:40]!r:44} tree vs generate (same kernels): {divergence(fast, ids, tree_out, ours)}; "
              f"generate (kernels) vs plain generate: {divergence(plain, ids, ours, theirs)}")


def divergence(model, ids: torch.Tensor, ours: list[int], theirs: list[int]) -> str:
    """Where two greedy continuations first differ, with ``model``'s top-2 logits on ``theirs``
    path there (gap and the top logit, to judge a tie at the dtype's precision)."""
    where = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if where is None:
        return f"identical ({len(ours)} tokens)"
    with torch.no_grad():
        logits = model(torch.cat([ids, torch.tensor(theirs[:where], dtype=torch.long)])[None]).logits[0, -1].float()
    top = logits.topk(2)
    return f"token {where}, top-2 {top.indices.tolist()} gap {float(top.values[0] - top.values[1]):.3g} (top {float(top.values[0]):.3g})"

if __name__ == "__main__":
    main()
