"""An independent causal LM as the draft: it grows the tree one level per forward pass.

Level ``l``'s nodes go through the draft in one forward over its own KV cache with the tree
mask (each node sees the prefix and its ancestors), and each node's logits give its children:
the top-c tokens when greedy, c draws from the processed distribution ``q`` otherwise. The
deepest level is never fed, so a depth-``d`` tree costs ``d`` forwards; tokens the draft has
not seen yet (the root, and an accepted leaf) are fed at the start of the next proposal.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from sequoia.drafts.base import Draft, DraftContext, Proposer, StepResult
from sequoia.errors import ModelError
from sequoia.forward import cache_kwargs, keep_path, model_dtype_device, tree_forward
from sequoia.sampling import logits_to_probs, sample_with_replacement, sample_without_replacement
from sequoia.tree import Tree


class LMProposer(Proposer):
    """A smaller causal LM with the target's vocabulary (see :func:`check_same_vocabulary`)."""

    needs_hidden_states = False

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.reset()

    def reset(self) -> None:
        self._cache = DynamicCache()
        self._cached = 0  # accepted tokens held by the cache (a prefix of ctx.tokens)
        self._fed = 0  # tree nodes the last proposal put in the cache after the prefix
        self._prefix_len = 0  # accepted tokens before the root during the last proposal

    @torch.inference_mode()
    def warmup(self) -> None:
        self.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=self.model.device))
        self.reset()

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, tree: Tree) -> Draft:
        device = model_dtype_device(self.model)[1]
        tokens = torch.empty(tree.size, dtype=torch.long, device=device)  # [n]
        tokens[0] = ctx.tokens[-1]
        probs = None if ctx.sampling.greedy else torch.zeros(tree.size, self.vocab_size, device=device)
        self._fed = 0
        if tree.depth == 0:
            return Draft(tokens, probs)
        logits = self._feed_pending(ctx.tokens[self._cached :].to(device))  # [1, vocab], the root's
        prefix_len = len(ctx.tokens) - 1
        for level, expansion in enumerate(tree.expansions):
            nodes = tree.levels[level]
            if level:
                span = tokens[nodes[0] : nodes[-1] + 1]
                out = tree_forward(self.model, span, tree, self._cache, prefix_len, start=nodes[0])
                logits = out.logits[0]  # [len(nodes), vocab]
            parents = expansion.parents.to(device)  # [p]
            candidates, q = choose_candidates(logits[parents - nodes[0]], expansion.keep.shape[1], ctx)  # [p, width], [p, vocab]
            below = tree.levels[level + 1]
            tokens[below[0] : below[-1] + 1] = expansion.children(candidates)
            if probs is not None:
                probs[parents] = q
        self._fed, self._prefix_len = tree.levels[tree.depth][0], prefix_len
        return Draft(tokens, probs)

    @torch.inference_mode()
    def observe(self, step: StepResult) -> None:
        """Keep the accepted path's cache slots (the nodes this draft fed)."""
        if not self._fed:
            return
        kept = [node for node in step.accepted_nodes if node < self._fed]
        keep_path(self._cache, self._prefix_len, kept)
        self._cached = self._prefix_len + len(kept)
        self._fed = 0

    def _feed_pending(self, pending: torch.Tensor) -> torch.Tensor:  # [m] -> [1, vocab]
        """Run the accepted tokens the cache lacks (ending with the root) causally."""
        positions = torch.arange(self._cached, self._cached + len(pending), device=pending.device)
        out = self.model(
            input_ids=pending[None],
            position_ids=positions[None],
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(self.model, self._cache),
        )
        self._cached += len(pending)
        return out.logits[0]


def choose_candidates(
    logits: torch.Tensor,  # [m, vocab] logits of the nodes that have children
    width: int,
    ctx: DraftContext,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # [m, width] candidates best first, [m, vocab] q
    """Each row's children: its top-``width`` tokens when greedy (in the logits' own dtype:
    converting to float32 is exact, so the order is the same), else ``width`` draws from the
    processed distribution ``q`` (float32, which sampling forms; with or without replacement,
    as ``ctx`` says)."""
    if ctx.sampling.greedy:
        return best_candidates(logits, width), None
    q = logits_to_probs(logits, ctx.sampling)
    return draw_candidates(q, width, ctx), q


def best_candidates(scores: torch.Tensor, width: int) -> torch.Tensor:  # [m, vocab] -> [m, width]
    """Each row's ``width`` highest-scoring columns, best first."""
    if width == 1:  # max is ~2.5x cheaper than topk (or argmax) on CPU, measured here
        return scores.max(dim=-1, keepdim=True).indices
    return scores.topk(width, dim=-1).indices


def draw_candidates(q: torch.Tensor, width: int, ctx: DraftContext) -> torch.Tensor:  # [m, vocab] -> [m, width]
    """``width`` draws from each row of ``q``, with or without replacement as ``ctx`` says."""
    draw = sample_with_replacement if ctx.with_replacement else sample_without_replacement
    return draw(q, width, ctx.generator)


def check_same_vocabulary(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    """Raise :class:`ModelError` unless both models score the same number of tokens."""
    sizes = [int(m.get_output_embeddings().weight.shape[0]) for m in (target, draft)]
    if sizes[0] != sizes[1]:
        raise ModelError(
            f"the draft scores {sizes[1]} tokens but the target {sizes[0]}; the draft must "
            "share the target's tokenizer and vocabulary"
        )
