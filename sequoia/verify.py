"""Tree verification: which draft tokens the target keeps, and the one token it adds.

p = target, q = draft. Terms used throughout:

* **accepted** -- a draft token the target keeps. Accepted tokens always form a path from the
  root (the root itself, the last token already accepted, is always kept). At a node, the
  children are tried in rank order and at most one is accepted; verification then moves to it.
* **residual** -- after the target rejects a candidate ``x`` drawn from ``q``, the distribution
  it still has to produce is ``norm(max(p - q, 0))`` (vLLM's "recovered" distribution). If all
  children of the last accepted node are rejected, the next token is drawn from the residual.
* **bonus** -- when the last accepted node has no children left to try, the next token is
  drawn from ``p`` at that node at no extra cost: it came with the same target forward pass.

So every step emits the accepted draft tokens plus exactly one next token (bonus or residual),
and its output has exactly the target's distribution:

* greedy: follow the child whose token is the target's argmax; the next token is the argmax
  at the last accepted node;
* Sequoia (:func:`verify_sequoia`): the children were sampled from ``q`` *without*
  replacement. Accept child ``x`` with probability ``min(1, p(x) / q(x))``; on rejection set
  ``p <- norm(max(p - q, 0))`` and ``q(x) <- 0``, ``q <- norm(q)``; try the next child;
* SpecInfer (:func:`verify_specinfer`): the children were sampled *with* replacement; the
  same test, but ``q`` stays as it is after a rejection;
* a deterministic draft (``draft_probs is None``, e.g. n-gram lookup) has ``q = onehot(x)``
  for each child: ``x`` is accepted with probability ``p(x)`` and the residual is ``p``
  without ``x``, renormalised -- in both stochastic verifiers.

A candidate the current ``q`` gives probability 0 (a draw past the end of the draft's
support, or a duplicate of a rejected token) cannot have been proposed and is skipped.

Example (a root with two children whose draft tokens are 3 and 5)::

    >>> tree = Tree((-1, 0, 0))
    >>> logits = torch.zeros(3, 8); logits[0, 5] = logits[2, 1] = 9.0  # argmax 5 at the root
    >>> verify_greedy(tree, torch.tensor([7, 3, 5]), logits)         # child 2 (token 5), then 1
    Acceptance(nodes=(0, 2), next_token=1)
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from sequoia.sampling import residual, residual_point_mass, sample
from sequoia.tree import Tree


class NodeRows(Protocol):
    """Anything indexable by node id giving a ``[vocab]`` row: a tensor or ``NodeProbs``."""

    def __getitem__(self, node: int) -> torch.Tensor: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Acceptance:
    """The outcome of verifying one tree."""

    nodes: tuple[int, ...]  # accepted path of node ids, root first
    next_token: int  # the bonus or residual token the target adds after the path

    @property
    def num_accepted(self) -> int:
        """Accepted draft tokens (the root is not counted)."""
        return len(self.nodes) - 1


def verify_greedy(
    tree: Tree,
    draft_tokens: torch.Tensor,  # [n] int64
    target_logits: torch.Tensor,  # [n, vocab]
) -> Acceptance:
    """Follow the child equal to the target's argmax; only path nodes are reduced."""
    _check(tree, draft_tokens, target_logits)
    tokens = draft_tokens.tolist()
    path = [0]
    while True:
        best = int(target_logits[path[-1]].max(dim=-1).indices)  # = argmax, first on ties
        child = next((c for c in tree.children[path[-1]] if tokens[c] == best), None)
        if child is None:
            return Acceptance(tuple(path), best)
        path.append(child)


def verify_sequoia(
    tree: Tree,
    draft_tokens: torch.Tensor,  # [n] int64
    draft_probs: torch.Tensor | None,  # [n, vocab] q each node's children were drawn from
    target_probs: NodeRows,  # [n, vocab] p, read only on the accepted path
    generator: torch.Generator,
) -> Acceptance:
    """Sequoia's verification of children sampled without replacement (see module docs)."""
    return _verify_stochastic(tree, draft_tokens, draft_probs, target_probs, generator, True)


def verify_specinfer(
    tree: Tree,
    draft_tokens: torch.Tensor,  # [n] int64
    draft_probs: torch.Tensor | None,  # [n, vocab] q each node's children were drawn from
    target_probs: NodeRows,  # [n, vocab] p, read only on the accepted path
    generator: torch.Generator,
) -> Acceptance:
    """SpecInfer-style verification of children sampled with replacement (see module docs)."""
    return _verify_stochastic(tree, draft_tokens, draft_probs, target_probs, generator, False)


def _verify_stochastic(
    tree: Tree,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: NodeRows,
    generator: torch.Generator,
    without_replacement: bool,
) -> Acceptance:
    _check(tree, draft_tokens, target_probs)
    assert draft_probs is None or (draft_probs.ndim == 2 and draft_probs.shape[0] == tree.size)
    tokens = draft_tokens.tolist()
    path = [0]
    while True:
        node = path[-1]
        p = target_probs[node]
        kids = tree.children[node]
        if kids:
            q = None if draft_probs is None else draft_probs[node]
            rank, rest = try_children(p, q, [tokens[c] for c in kids], generator, without_replacement)
            if rank is not None:
                path.append(kids[rank])
                continue
            p = rest
        return Acceptance(tuple(path), int(sample(p, generator)))


def try_children(
    target_probs: torch.Tensor,  # [vocab] p at the node
    draft_probs: torch.Tensor | None,  # [vocab] q at the node; None = point mass per candidate
    candidates: Sequence[int],  # the children's tokens, rank order
    generator: torch.Generator,
    without_replacement: bool = True,
) -> tuple[int | None, torch.Tensor | None]:  # (accepted rank, None) or (None, residual)
    """Test one node's candidates in rank order: the accepted rank, or ``None`` and the
    residual left after every rejection (the distribution of the next token)."""
    tests = candidate_tests(target_probs, draft_probs, candidates, without_replacement)
    rank = 0
    try:
        while True:
            accept = next(tests)
            if float(torch.rand((), generator=generator, device=target_probs.device)) < accept:
                return rank, None
            rank += 1
    except StopIteration as done:
        return None, done.value


def candidate_tests(
    target_probs: torch.Tensor,  # [vocab] p at the node
    draft_probs: torch.Tensor | None,  # [vocab] q at the node; None = point mass per candidate
    candidates: Sequence[int],  # the children's tokens, rank order
    without_replacement: bool = True,
) -> Generator[float, None, torch.Tensor]:
    """The randomness-free core of verification, one candidate at a time.

    Yields, for each candidate in rank order, the probability of accepting it given that
    every earlier one was rejected; resuming the generator means "rejected" (so the residual
    is only computed when needed). Returns the residual after the last rejection.

        >>> tests = candidate_tests(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2]), [1, 0])
        >>> next(tests), next(tests)   # 0.3 / 0.6; then p <- [1, 0, 0], q <- [0.5, 0, 0.5]
        (0.5, 1.0)
    """
    assert target_probs.ndim == 1
    p, q = target_probs, draft_probs
    if q is not None and without_replacement:
        q = q.clone()
    for token in candidates:
        q_token = 1.0 if q is None else float(q[token])
        if q_token <= 0.0:
            yield 0.0  # the draft could not have proposed it
            continue
        yield min(1.0, float(p[token]) / q_token)
        if q is None:
            p = residual_point_mass(p, token)
            continue
        p = residual(p, q)
        if without_replacement:
            q[token] = 0.0
            total = q.sum()
            q = q / total if total > 0 else q  # all of q's support tried: the rest are skipped
    return p


def _check(tree: Tree, draft_tokens: torch.Tensor, target: NodeRows) -> None:
    assert draft_tokens.ndim == 1 and draft_tokens.dtype == torch.long
    assert draft_tokens.shape[0] == tree.size == len(target)
