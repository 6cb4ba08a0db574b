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
another distance (build the tree with ``--max-depth`` at most ``max_depth``) -- unless the
draft is *recurrent* (its last head trained for every deeper level): then any depth.

Subclasses implement :meth:`HeadsProposer._begin` (per-proposal set-up from the context) and
:meth:`HeadsProposer._level` (one level's logits).
"""

from __future__ import annotations

import torch

from sequoia.drafts.base import Draft, DraftContext, Proposer
from sequoia.drafts.context_mix import ContextMix
from sequoia.drafts.lm import best_candidates, draw_candidates
from sequoia.drafts.ngram import NgramIndex, Suffix
from sequoia.drafts.trained import TrainedDraft
from sequoia.dynamic import TreeShaper, selected_tree, slot_features, top_slots
from sequoia.errors import ConfigError
from sequoia.sampling import SamplingConfig, logits_to_probs
from sequoia.tree import Tree


class HeadsProposer(Proposer):
    """Base of the trained-draft proposers; reads the target's hidden states.

    With a :class:`~sequoia.dynamic.TreeShaper` the proposer shapes its tree every step
    (:mod:`sequoia.dynamic`) within the engine's tree's size and depth, and returns it in the
    :class:`Draft`. ``features`` holds, after each proposal, each node's confidence feature
    (root: NaN) -- what a calibration is fitted on.
    """

    needs_hidden_states = True

    def __init__(self, model: TrainedDraft, mix: ContextMix | None = None, shaper: TreeShaper | None = None) -> None:
        self.model = model
        self.vocab = model.vocab
        self.max_depth = model.config.max_depth  # None: a recurrent draft fills any depth
        self.mix = mix
        self.shaper = shaper
        self.features: torch.Tensor | None = None  # [n] of the last proposal
        self.slot_values: torch.Tensor | None = None  # [slots] of the last shaped proposal, decreasing
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
        self.propose(ctx, Tree.from_children_counts([2] + [1] * (min(2, self.max_depth or 2) - 1)))
        self.reset()

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, tree: Tree) -> Draft:
        if self.max_depth is not None and tree.depth > self.max_depth:
            raise ConfigError(
                f"this trained draft predicts {self.max_depth} tree levels but the tree has depth "
                f"{tree.depth}; build the tree with --max-depth {self.max_depth} or less"
            )
        if self.shaper is not None and tree.size > 1:
            return self._propose_shaped(ctx, tree)
        device = self.model.out.weight.device
        tokens = torch.empty(tree.size, dtype=torch.long, device=device)  # [n]
        tokens[0] = ctx.tokens[-1]
        probs = None if ctx.sampling.greedy else torch.zeros(tree.size, self.vocab.vocab_size, device=device)
        self.features = torch.full((tree.size,), float("nan"))
        parents = torch.as_tensor(tree.parents, device=device)
        self._begin(ctx, tree.size, tokens, parents)  # also for a bare root: a draft may keep the hidden states
        suffixes = self._root_suffixes(ctx, tree.size)
        for level, expansion in enumerate(tree.expansions):
            below = tree.levels[level + 1]
            candidates, q, columns, features = self._children(ctx, level, expansion.parents, tree.levels[level][-1],
                                                              expansion.keep.shape[1], suffixes)
            tokens[below[0] : below[-1] + 1] = columns[expansion.children(candidates)]
            self.features[below[0] : below[-1] + 1] = expansion.children(features).cpu()
            if probs is not None:
                probs[expansion.parents.to(device)] = self.vocab.to_full_probs(q, columns)
            if suffixes is not None:
                for node, token in zip(below, tokens[below[0] : below[-1] + 1].tolist()):
                    suffixes[node] = (suffixes[tree.parents[node]] + (token,))[-self.mix.max_ngram :]
        return Draft(tokens, probs)

    def _propose_shaped(self, ctx: DraftContext, budget: Tree) -> Draft:
        """A per-step tree of at most ``budget.size`` nodes and ``budget.depth`` levels
        (:mod:`sequoia.dynamic`: grow the ``beam`` best slots per level, keep the best overall)."""
        shaper, device = self.shaper, self.model.out.weight.device
        size, depth = budget.size, budget.depth
        width, beam = min(shaper.width, size - 1), min(shaper.beam_for(size), size - 1)
        capacity = 1 + beam * (depth - 1)  # nodes that get expanded (the root, then <= beam per level)
        tokens = torch.empty(capacity, dtype=torch.long, device=device)  # [capacity] expanded nodes
        parents = torch.zeros(capacity, dtype=torch.long, device=device)
        tokens[0] = ctx.tokens[-1]
        self._begin(ctx, capacity, tokens, parents)
        suffixes = self._root_suffixes(ctx, capacity)
        node_values = torch.ones(capacity)  # [capacity] V of each expanded node
        q_rows: dict[int, torch.Tensor] = {}  # expanded node -> its q over the full vocabulary
        # every slot so far, level by level in (parent, rank) order: the tie order of dynamic.py
        slot_token, slot_value, slot_feature, slot_parent, slot_depth, slot_node = [], [], [], [], [], []
        expanding, first_slot, count = torch.zeros(1, dtype=torch.long), [0], 1
        parent_slot = {0: -1}  # expanded node -> its slot
        for level in range(depth):
            candidates, q, columns, features = self._children(ctx, level, expanding, int(expanding[-1]), width, suffixes)
            values = shaper.values(node_values[expanding], features.cpu(), level + 1, ctx.sampling.greedy)  # [p, w]
            if not ctx.sampling.greedy:
                full = self.vocab.to_full_probs(q, columns)
                q_rows.update(zip(expanding.tolist(), full))
            base = len(slot_token)
            slot_token += columns[candidates].flatten().tolist()
            slot_value.append(values.flatten())
            slot_feature.append(features.flatten().cpu())
            slot_parent += [parent_slot[int(v)] for v in expanding.tolist() for _ in range(width)]
            slot_depth += [level + 1] * values.numel()
            slot_node += [int(v) for v in expanding.tolist() for _ in range(width)]
            if level + 1 == depth:
                break
            grow = top_slots(values.flatten(), beam)  # ascending: (parent, rank) order
            new = torch.arange(count, count + len(grow))
            parents[new] = expanding[grow // width].to(device)
            tokens[new] = torch.tensor([slot_token[base + int(s)] for s in grow], device=device)
            node_values[new] = values.flatten()[grow]
            parent_slot.update(zip(new.tolist(), (base + grow).tolist()))
            if suffixes is not None:
                for node in new.tolist():
                    suffixes[node] = (suffixes[int(parents[node])] + (int(tokens[node]),))[-self.mix.max_ngram :]
            expanding, count = new, count + len(grow)
        all_values = torch.cat(slot_value)
        tree, slots = selected_tree(slot_parent, slot_depth, top_slots(all_values, size - 1))
        self.slot_values = torch.sort(all_values, descending=True).values
        self.features = torch.cat([torch.tensor([float("nan")]), torch.cat(slot_feature)[slots[1:]]])
        node_of_slot = {s: v for v, s in parent_slot.items()}
        out_tokens = torch.tensor([int(ctx.tokens[-1])] + [slot_token[s] for s in slots[1:]], dtype=torch.long, device=device)
        probs = None
        if not ctx.sampling.greedy:
            probs = torch.zeros(tree.size, self.vocab.vocab_size, device=device)
            for node, kids in enumerate(tree.children):
                if kids:
                    probs[node] = q_rows[node_of_slot[slots[node]]]
        return Draft(out_tokens, probs, tree)

    def _children(
        self, ctx: DraftContext, level: int, nodes: torch.Tensor, last: int, width: int, suffixes: list[Suffix] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``width`` candidates of each node of ``nodes`` ([p] ids at depth ``level``, the
        level's last node id ``last``): columns [p, width], q [p, c], the columns' full ids [c]
        and the slots' features [p, width] (:func:`~sequoia.dynamic.slot_features`)."""
        device = self.model.out.weight.device
        logits = self._level(level, nodes.to(device), last)  # [p, r]
        ids = self.vocab.ids.to(device)
        greedy = ctx.sampling.greedy
        if suffixes is None:
            q = logits.softmax(-1, dtype=torch.float32) if greedy else logits_to_probs(logits, ctx.sampling)
            candidates = best_candidates(logits, width) if greedy else draw_candidates(q, width, ctx)
            columns = ids
        else:
            q, columns = self._mixed(logits, [suffixes[p] for p in nodes.tolist()], ctx, ids)
            candidates = best_candidates(q, width) if greedy else draw_candidates(q, width, ctx)
        return candidates, q, columns, slot_features(q, candidates, greedy, ctx.with_replacement)

    def _root_suffixes(self, ctx: DraftContext, size: int) -> list[Suffix] | None:
        """Without a mix None; else the root's suffix (the context's tail), the rest to fill."""
        if self.mix is None:
            return None
        self.index.sync(ctx.tokens)
        return [tuple(self.index.text[-self.mix.max_ngram :])] + [()] * (size - 1)

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
    def _begin(self, ctx: DraftContext, capacity: int, tokens: torch.Tensor, parents: torch.Tensor) -> None:
        """Set up one proposal of at most ``capacity`` nodes; ``tokens`` and ``parents``
        ([capacity], node ids in BFS order) stay shared and are filled level by level, each
        level before its nodes are expanded."""
        raise NotImplementedError

    def _level(self, level: int, nodes: torch.Tensor, last: int) -> torch.Tensor:  # [p] node ids -> [p, r]
        """Head ``level + 1``'s logits at ``nodes`` (all at depth ``level``, ascending; tokens
        and parents filled); ``last`` is the highest node id at that depth."""
        raise NotImplementedError


def last_hidden(ctx: DraftContext, width: int, like: torch.Tensor) -> torch.Tensor:  # -> [hidden]
    """The target's hidden state of the token before the root (zeros for a one-token prompt)."""
    h = ctx.hidden_states
    if h is None or len(h) == 0:
        return torch.zeros(width, dtype=like.dtype, device=like.device)
    assert h.ndim == 2 and h.shape[1] == width
    return h[-1].to(like)
