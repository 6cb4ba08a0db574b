"""The proposer interface every draft implements: fill a tree's nodes with candidate tokens.

The engine calls, per prompt: ``reset()``, then per step ``propose(ctx, tree)`` and, once the
target has verified the tree, ``observe(step)``. A proposer owns whatever state it keeps
(a draft model's KV cache, an n-gram index) and trims it in ``observe`` to the accepted path.

Rules a proposal must follow (verification relies on them):

* ``tokens[0]`` is the root, i.e. ``ctx.tokens[-1]``; children fill the tree in BFS order,
  each node's children in rank order;
* the tree is the engine's, or one the proposer chose (``Draft.tree``) of at most its size and
  depth; its shape may depend on the draft alone, never on the target (stochastic mode: see
  :mod:`sequoia.dynamic` for what else it must not read);
* greedy (``ctx.sampling.greedy``): any deterministic choice, best first (an LM's top-c);
* stochastic with ``probs``: the children of node ``i`` are draws from ``probs[i]``, without
  replacement unless ``ctx.with_replacement``; ``probs`` is ``None`` for a deterministic
  (point-mass) draft, which verification handles as ``q = onehot(token)`` per child.

Method-specific inputs travel in :class:`DraftContext`, so the engine never dispatches on the
proposer's type: a proposer that reads the target's hidden states (MLP speculator, Chimera,
early exit) sets ``needs_hidden_states`` and finds them in ``ctx.hidden_states``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from sequoia.sampling import SamplingConfig
from sequoia.tree import Tree


@dataclass(frozen=True)
class StepResult:
    """What one step did."""

    tokens: tuple[int, ...]  # emitted: accepted draft tokens then the target's, cut after EOS
    accepted_nodes: tuple[int, ...]  # the verified path of node ids, root first
    tree: Tree  # the tree drafted (the engine's tree, cut near the length limits)
    draft_tokens: torch.Tensor  # [n] int64
    hidden_states: torch.Tensor | None  # [len(accepted_nodes), hidden] target's, if requested
    stop: str | None  # why generation ended with this step (STOP_*), None if it goes on

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes) - 1


@dataclass(frozen=True)
class DraftContext:
    """What a proposer may read for one step."""

    tokens: torch.Tensor  # [L] int64: every accepted token, prompt included; tokens[-1] = root
    sampling: SamplingConfig  # greedy, or how the draft's q is processed (temperature, top-p)
    generator: torch.Generator  # the only source of randomness
    with_replacement: bool = False  # stochastic children i.i.d. (SpecInfer) or w/o replacement
    # The target's last-layer hidden states for the tokens it processed since the previous
    # proposal, i.e. tokens[-m - 1 : -1] (the root is not processed yet); None unless the
    # proposer sets needs_hidden_states.
    hidden_states: torch.Tensor | None = None  # [m, hidden]


@dataclass(frozen=True)
class Draft:
    """A filled tree: one token per node, and the distributions the children came from."""

    tokens: torch.Tensor  # [n] int64, BFS order, tokens[0] = root
    # q at each node (its children's distribution); rows of childless nodes are unused.
    probs: torch.Tensor | None = None  # [n, vocab] float32; None = deterministic draft
    # The tree the draft chose this step (per-step trees, sequoia.dynamic): at most the
    # engine's tree's size and depth; None = the engine's tree.
    tree: Tree | None = None

    def __post_init__(self) -> None:
        assert self.tokens.ndim == 1 and self.tokens.dtype == torch.long
        assert self.probs is None or (self.probs.ndim == 2 and self.probs.shape[0] == len(self.tokens))
        assert self.tree is None or self.tree.size == len(self.tokens)


@runtime_checkable
class Proposer(Protocol):
    """A draft. Constructors take explicit parameters and do no model work."""

    needs_hidden_states: bool  # ask the target forward for hidden states (DraftContext)

    def reset(self) -> None:
        """Forget everything about the previous prompt (caches, indices)."""

    def warmup(self) -> None:
        """Do one-off work (first forward, kernel selection) before timing starts."""

    def propose(self, ctx: DraftContext, tree: Tree) -> Draft:
        """Fill ``tree`` with candidate tokens continuing ``ctx.tokens``."""
        ...

    def observe(self, step: StepResult) -> None:
        """Learn the step's outcome: keep only ``step.accepted_nodes`` in any cache."""


class NoDraft(Proposer):
    """No speculation: only the root, so the engine decodes one token per target forward."""

    needs_hidden_states = False

    def propose(self, ctx: DraftContext, tree: Tree) -> Draft:
        assert tree.size == 1, "--draft none proposes nothing: use the single-node tree"
        return Draft(ctx.tokens[-1:].clone())

