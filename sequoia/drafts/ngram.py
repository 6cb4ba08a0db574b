"""Prompt lookup (n-gram) draft: no model; candidates are what followed the same n-gram earlier.

Every accepted token is indexed under each of the ``0..max_ngram`` tokens before it. A node's
children are the tokens that followed its suffix (the context plus the node's own path) in the
text so far: the longest matching suffix first, then shorter ones; within one suffix length the
most frequent first, then the most recent. The empty suffix (token counts) fills what longer
ones leave, and unseen token ids pad a node when the text has too few distinct tokens. The
draft is deterministic, so ``probs`` is ``None``: verification treats each candidate as a
point mass.

Example -- in ``1 2 3 1 2 4 1 2`` the suffix ``1 2`` was followed by 3, then 4 (equal counts,
4 more recent); the third child comes from the counts, where 2 is the most recent of the two
3-times tokens::

    >>> from sequoia.sampling import SamplingConfig
    >>> ctx = DraftContext(torch.tensor([1, 2, 3, 1, 2, 4, 1, 2]), SamplingConfig(), torch.Generator())
    >>> NgramProposer(max_ngram=2).propose(ctx, Tree((-1, 0, 0, 0))).tokens.tolist()
    [2, 4, 3, 2]
"""

from __future__ import annotations

import torch

from sequoia.drafts.base import Draft, DraftContext, Proposer
from sequoia.errors import ConfigError
from sequoia.tree import Tree

Suffix = tuple[int, ...]


class NgramIndex:
    """Which tokens followed each suffix of ``0..max_ngram`` tokens in a growing text.

    Each appended token is indexed under each of the ``0..max_ngram`` tokens before it, with
    how often and where it last followed them; rankings are memoised until a suffix changes.
    """

    def __init__(self, max_ngram: int) -> None:
        if max_ngram < 1:
            raise ConfigError(f"the n-gram length must be at least 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self.text: list[int] = []
        self._followers: dict[Suffix, dict[int, list[int]]] = {}  # suffix -> token -> [count, last]
        self._ranked: dict[Suffix, list[int]] = {}  # suffix -> followers best first (memo)
        self._shares: dict[Suffix, dict[int, dict[int, float]]] = {}  # suffix -> top -> shares (memo)

    def sync(self, tokens: torch.Tensor) -> None:
        """Index the tokens of ``tokens`` (the whole text so far) not indexed yet."""
        self.extend(tokens[len(self.text) :].tolist())

    def extend(self, new_tokens: list[int]) -> None:
        for token in new_tokens:
            i = len(self.text)
            for n in range(min(self.max_ngram, i) + 1):
                suffix = tuple(self.text[i - n : i])
                record = self._followers.setdefault(suffix, {}).setdefault(token, [0, i])
                record[0] += 1
                record[1] = i
                self._ranked.pop(suffix, None)
                self._shares.pop(suffix, None)
            self.text.append(token)

    def counts(self, suffix: Suffix) -> dict[int, list[int]]:
        """``token -> [count, last position]`` of the tokens that followed ``suffix`` ({}: none)."""
        return self._followers.get(suffix, {})

    def ranking(self, suffix: Suffix) -> list[int]:
        """The tokens that followed ``suffix``, most frequent first, then most recent."""
        if suffix not in self._ranked:
            order = sorted(self.counts(suffix).items(), key=lambda kv: (-kv[1][0], -kv[1][1]))
            self._ranked[suffix] = [token for token, _ in order]
        return self._ranked[suffix]

    def shares(self, suffix: Suffix, top: int) -> dict[int, float]:
        """The ``top`` first of :meth:`ranking` with their share of those ``top``'s counts
        (the followers' empirical distribution, truncated; {} when none followed). Shared: read only."""
        memo = self._shares.setdefault(suffix, {})
        if top not in memo:
            best = self.ranking(suffix)[:top]
            counts = self.counts(suffix)
            total = sum(counts[t][0] for t in best)
            memo[top] = {t: counts[t][0] / total for t in best}
        return memo[top]


class NgramProposer(Proposer):
    """Prompt-lookup decoding generalised to trees (see the module docstring)."""

    needs_hidden_states = False

    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram
        self.reset()

    def reset(self) -> None:
        self.index = NgramIndex(self.max_ngram)

    def propose(self, ctx: DraftContext, tree: Tree) -> Draft:
        self.index.sync(ctx.tokens)
        text = self.index.text
        tokens = [text[-1]]
        suffixes = [tuple(text[-self.max_ngram :])]
        for node, kids in enumerate(tree.children):  # BFS: a node's suffix exists before its kids
            for token in self._candidates(suffixes[node], len(kids)):
                tokens.append(token)
                suffixes.append((suffixes[node] + (token,))[-self.max_ngram :])
        return Draft(torch.tensor(tokens, dtype=torch.long))

    def _candidates(self, suffix: Suffix, count: int) -> list[int]:
        """``count`` distinct tokens: longest suffix matches first, then the token counts."""
        chosen: dict[int, None] = {}  # insertion-ordered set
        for n in range(len(suffix), -1, -1):
            for token in self.index.ranking(suffix[len(suffix) - n :]):
                if len(chosen) == count:
                    return list(chosen)
                chosen.setdefault(token)
        pad = 0
        while len(chosen) < count:
            chosen.setdefault(pad)
            pad += 1
        return list(chosen)
