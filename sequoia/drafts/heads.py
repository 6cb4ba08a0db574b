"""Growing a tree with a trained draft: one batched head forward per tree level.

A trained draft (:mod:`sequoia.drafts.trained`) has one head per tree level. The children of
every node at depth ``l`` come from head ``l + 1``, conditioned on the node's path: the node's
own token is the head's token input and its parent's head output is the head's state input
(for the root: the target's hidden state of the token before it). All nodes of a level that
have children go through their head in one forward, best candidates first: the top-c of the
head's reduced-vocabulary logits when greedy, draws from ``q`` (zero outside the reduced
vocabulary) otherwise. With a :class:`~sequoia.drafts.context_mix.ContextMix` (from the
draft's card) each node's distribution is first mixed with the n-gram statistics of its own
text (context plus path), and the candidates come from the mixture.

Depth limit: a draft has no head for levels past its last, so a tree deeper than ``heads``
raises :class:`~sequoia.errors.ConfigError` instead of guessing with a head trained for
another distance (build the tree with ``--max-depth`` at most ``max_depth``).

Subclasses implement :meth:`HeadsProposer._begin` (per-proposal set-up from the context) and
:meth:`HeadsProposer._level` (one level's logits).
"""

from __future__ import annotations

import torch

from sequoia.drafts.base import Draft, DraftContext, Proposer
from sequoia.drafts.context_mix import ContextMix
from sequoia.drafts.lm import best_candidates, choose_candidates, draw_candidates
from sequoia.drafts.ngram import NgramIndex, Suffix
from sequoia.drafts.trained import TrainedDraft
from sequoia.errors import ConfigError
from sequoia.sampling import SamplingConfig, logits_to_probs
from sequoia.tree import Tree


class HeadsProposer(Proposer):
    """Base of the trained-draft proposers; reads the target's hidden states."""

    needs_hidden_states = True

    def __init__(self, model: TrainedDraft, mix: ContextMix | None = None) -> None:
        self.model = model
        self.vocab = model.vocab
        self.max_depth = model.config.heads
        self.mix = mix
        self.reset()

    def reset(self) -> None:
        """Forget the prompt (subclasses with per-prompt state extend this)."""
        self.index = None if self.mix is None else NgramIndex(self.mix.max_ngram)

    @torch.inference_mode()
    def warmup(self) -> None:
        """One small proposal (first-call costs), whatever prompt came before; forgets it after."""
        self.reset()
        tokens = torch.arange(4, dtype=torch.long) % self.model.config.vocab_size
        hidden = torch.zeros(3, self.model.config.hidden_size)
        ctx = DraftContext(tokens, SamplingConfig(), torch.Generator(), hidden_states=hidden)
        self.propose(ctx, Tree.from_children_counts([2] + [1] * (min(2, self.max_depth) - 1)))
        self.reset()

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, tree: Tree) -> Draft:
        if tree.depth > self.max_depth:
            raise ConfigError(
                f"this trained draft predicts {self.max_depth} tree levels but the tree has depth "
                f"{tree.depth}; build the tree with --max-depth {self.max_depth} or less"
            )
        device = self.model.out.weight.device
        tokens = torch.empty(tree.size, dtype=torch.long, device=device)  # [n]
        tokens[0] = ctx.tokens[-1]
        probs = None if ctx.sampling.greedy else torch.zeros(tree.size, self.vocab.vocab_size, device=device)
        self._begin(ctx, tree, tokens)  # also for a bare root: a draft may keep the hidden states
        ids = self.vocab.ids.to(device)
        suffixes = self._root_suffixes(ctx, tree)
        for level, expansion in enumerate(tree.expansions):
            parents = expansion.parents.to(device)  # [p]
            logits = self._level(level, parents)  # [p, r]
            width = expansion.keep.shape[1]
            if suffixes is None:
                candidates, q = choose_candidates(logits, width, ctx)  # [p, width] rows of r
                columns = ids
            else:
                q, columns = self._mixed(logits, [suffixes[p] for p in expansion.parents.tolist()], ctx, ids)
                candidates = best_candidates(q, width) if ctx.sampling.greedy else draw_candidates(q, width, ctx)
            below = tree.levels[level + 1]
            tokens[below[0] : below[-1] + 1] = columns[expansion.children(candidates)]
            if probs is not None:
                probs[parents] = self.vocab.to_full_probs(q, columns)
            if suffixes is not None:
                for node, token in zip(below, tokens[below[0] : below[-1] + 1].tolist()):
                    suffixes[node] = (suffixes[tree.parents[node]] + (token,))[-self.mix.max_ngram :]
        return Draft(tokens, probs)

    def _root_suffixes(self, ctx: DraftContext, tree: Tree) -> list[Suffix] | None:
        """Without a mix None; else the root's suffix (the context's tail), the rest to fill."""
        if self.mix is None:
            return None
        self.index.sync(ctx.tokens)
        return [tuple(self.index.text[-self.mix.max_ngram :])] + [()] * (tree.size - 1)

    def _mixed(
        self, logits: torch.Tensor, suffixes: list[Suffix], ctx: DraftContext, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture ``q'`` of each row (greedy: of the plain softmax) and its columns' ids."""
        q = logits.softmax(-1, dtype=torch.float32) if ctx.sampling.greedy else logits_to_probs(logits, ctx.sampling)
        parts = [self.mix.lookup(self.index, suffix) for suffix in suffixes]
        return self.mix.mix(q, parts, self.vocab.rows, ids)

    def observe(self, step) -> None:
        """Nothing to trim: tree nodes never enter any state kept across steps."""

    # ------------------------------------------------------------------ per kind
    def _begin(self, ctx: DraftContext, tree: Tree, tokens: torch.Tensor) -> None:
        """Set up one proposal; ``tokens`` ([n], filled level by level) stays shared."""
        raise NotImplementedError

    def _level(self, level: int, nodes: torch.Tensor) -> torch.Tensor:  # [p] node ids -> [p, r]
        """Head ``level + 1``'s logits at ``nodes`` (all at depth ``level``; tokens filled)."""
        raise NotImplementedError


def last_hidden(ctx: DraftContext, width: int, like: torch.Tensor) -> torch.Tensor:  # -> [hidden]
    """The target's hidden state of the token before the root (zeros for a one-token prompt)."""
    h = ctx.hidden_states
    if h is None or len(h) == 0:
        return torch.zeros(width, dtype=like.dtype, device=like.device)
    assert h.ndim == 2 and h.shape[1] == width
    return h[-1].to(like)
