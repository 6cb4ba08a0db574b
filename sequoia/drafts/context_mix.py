"""Mixing a trained draft with what its own context repeats (an interpolated n-gram).

Text repeats itself -- names, code identifiers, list formats, a small model's loops -- and a
one-layer draft over a reduced vocabulary copies it poorly. So a node's candidates come from a
mixture of the draft's distribution ``q`` and, for every suffix length ``n = 1..max_ngram``
of the node's text (context plus path) that occurred earlier in the context, the empirical
distribution ``P_n`` of the tokens that followed it::

    q'(t) = (q(t) + sum_n w_n P_n(t)) / (1 + sum_n w_n)      (n over the matched lengths)

``P_n`` keeps the ``FOLLOWERS`` most frequent followers. The weights ``w_n`` are fitted once,
by maximum likelihood of the target's greedy tokens on training sequences
(:func:`fit_weights`), and stored in the draft's card. ``q'`` is an ordinary draft
distribution: greedy proposals take its top tokens, stochastic ones draw from it and
verification receives it, so the output is exactly the target's either way. Followers outside
the reduced vocabulary become extra candidate columns, shared by the rows of one level.

:func:`batch_terms` finds the same n-gram parts for a training batch, so a draft can also be
trained *through* its mix (``draft train --mix-loss``, :class:`MixTerms`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sequoia.drafts.ngram import NgramIndex, Suffix
from sequoia.errors import FileFormatError

FOLLOWERS = 8  # followers per suffix in P_n
MAX_NGRAM = 8  # default longest suffix
CARD_KEY = "context_mix"


@dataclass(frozen=True)
class ContextMix:
    """The fitted weights ``w_n`` (``n = 1..max_ngram``; the draft's own weight is 1)."""

    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.weights or not all(math.isfinite(w) and w >= 0 for w in self.weights):
            raise FileFormatError(f"context-mix weights must be finite and non-negative, got {list(self.weights)}")

    @property
    def max_ngram(self) -> int:
        return len(self.weights)

    def lookup(self, index: NgramIndex, suffix: Suffix) -> tuple[dict[int, float], float]:
        """One node's n-gram part: ``token -> sum_n w_n P_n(token)`` and ``sum_n w_n`` over the
        suffix lengths that occurred (a length that did not occur ends the search: no longer
        one can have)."""
        masses: dict[int, float] = {}
        total = 0.0
        for n, followers in enumerate(components(index, suffix, self.max_ngram), start=1):
            w = self.weights[n - 1]
            total += w
            for token, p in followers.items():
                masses[token] = masses.get(token, 0.0) + w * p
        return masses, total

    def mix(
        self,
        q: torch.Tensor,  # [m, r] float32, the draft's distributions over the reduced vocabulary
        parts: Sequence[tuple[dict[int, float], float]],  # per row: lookup()
        rows_of: dict[int, int],  # full id -> reduced-vocabulary row
        ids: torch.Tensor,  # [r] the reduced vocabulary's full ids
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [m, r + e] q', [r + e] full ids of its columns
        """``q'`` of every row; followers outside the reduced vocabulary get extra columns.
        ``q`` is overwritten when it already is float32 with no extra column to add."""
        assert q.ndim == 2 and len(parts) == len(q)
        extra = sorted({t for masses, _ in parts for t in masses if t not in rows_of})
        extra_column = {t: len(ids) + j for j, t in enumerate(extra)}
        rows, cols, values = [], [], []
        for row, (masses, _) in enumerate(parts):
            for token, mass in masses.items():
                col = rows_of.get(token)
                rows.append(row)
                cols.append(extra_column[token] if col is None else col)
                values.append(mass)
        mixed = F.pad(q.float(), (0, len(extra))) if extra else q.float()
        if rows:
            where = torch.tensor([rows, cols], device=q.device)
            mixed.index_put_(tuple(where), torch.tensor(values, device=q.device), accumulate=True)
        totals = torch.tensor([1.0 + total for _, total in parts], device=q.device)
        ids = ids.to(q.device)
        columns = torch.cat([ids, torch.tensor(extra, dtype=torch.long, device=q.device)]) if extra else ids
        return mixed.div_(totals[:, None]), columns

    def to_json(self, **provenance: Any) -> dict[str, Any]:
        return {"weights": [round(w, 6) for w in self.weights], "followers": FOLLOWERS, **provenance}

    @classmethod
    def from_card(cls, card: dict[str, Any], where: str) -> ContextMix | None:
        """The card's mixture, or None when it has none."""
        entry = card.get(CARD_KEY)
        if entry is None:
            return None
        weights = entry.get("weights") if isinstance(entry, dict) else None
        if not isinstance(weights, list) or not all(isinstance(w, (int, float)) for w in weights):
            raise FileFormatError(f"{where}: '{CARD_KEY}' needs a 'weights' list of numbers")
        try:
            return cls(tuple(float(w) for w in weights))
        except FileFormatError as exc:
            raise FileFormatError(f"{where}: {exc}") from None


def components(index: NgramIndex, suffix: Suffix, max_ngram: int) -> list[dict[int, float]]:
    """``P_n`` (token -> probability) for ``n = 1, 2, ...`` while the last ``n`` tokens of
    ``suffix`` occurred in the indexed text with a follower."""
    found = []
    for n in range(1, min(len(suffix), max_ngram) + 1):
        shares = index.shares(suffix[len(suffix) - n :], FOLLOWERS)
        if not shares:
            break
        found.append(shares)
    return found


def node_suffixes(
    text: list[int], scored: list[list[bool]], max_ngram: int
) -> Iterator[tuple[int, int, NgramIndex, Suffix]]:
    """``(level, i, index, suffix)`` for every node of one sequence that ``scored[level][i]``
    marks (position ``i`` scores a node at that 0-based level, root ``i - level``), root by root
    and within a root level by level: what a proposal there would see, the n-gram index of the
    text up to the root and the last ``max_ngram`` tokens up to the node (teacher-forced)."""
    index = NgramIndex(max_ngram)
    for root in range(len(text)):
        for level, marks in enumerate(scored):
            i = root + level
            if i < len(text) and marks[i]:
                index.extend(text[len(index.text) : root + 1])
                yield level, i, index, tuple(text[max(0, i + 1 - max_ngram) : i + 1])


def fit_weights(
    q_target: torch.Tensor,  # [N] the draft's probability of the target's token
    p_target: torch.Tensor,  # [N, K] P_n(target token), zero where not matched
    matched: torch.Tensor,  # [N, K] bool, suffix length n occurred
    steps: int = 500,
) -> ContextMix:
    """Maximum-likelihood weights: ``argmax sum log q'(target)`` over ``w = exp(theta)``."""
    assert p_target.shape == matched.shape and q_target.shape == p_target.shape[:1]
    theta = torch.zeros(p_target.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.05)
    q_target, p_target, matched = q_target.double(), p_target.double(), matched.double()
    with torch.enable_grad():  # callers may run under no_grad
        for _ in range(steps):
            w = theta.double().exp()
            likelihood = (q_target + p_target @ w) / (1 + matched @ w)
            loss = -likelihood.clamp(min=1e-12).log().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return ContextMix(tuple(float(w) for w in theta.detach().exp()))


@dataclass(frozen=True)
class MixTerms:
    """The n-gram parts of a training batch's scored nodes, so a draft can be trained through
    its mix (the loss on ``q'`` rather than ``q``) with the weights learned alongside.

    Nodes are ``(level, row)`` with ``row`` indexing the batch's level-0 positions; a *key* is a
    node and a reduced-vocabulary column with n-gram mass; entry ``e`` adds
    ``w[n[e]] * p[e]`` to the mass of key ``key[e]``.
    """

    level: torch.Tensor  # [K] tree level (0-based) of each key's node
    row: torch.Tensor  # [K] its row among the batch's level-0 positions
    column: torch.Tensor  # [K]
    key: torch.Tensor  # [E]
    n: torch.Tensor  # [E] suffix length - 1
    p: torch.Tensor  # [E] P_n(column)
    matched: torch.Tensor  # [levels, rows, max_ngram] bool: suffix length n occurred

    def log_masses(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [max_ngram] w_n
        """``log sum_n w_n P_n`` of every key ([K]) and ``log(1 + sum_n w_n)`` of every node
        ([levels, rows]): what the weights decide, formed once per batch."""
        mass = torch.zeros(len(self.column), device=weights.device).index_add(0, self.key, weights[self.n] * self.p)
        return mass.log(), torch.log1p(self.matched.to(weights.dtype) @ weights)

    def cross_entropy_shift(
        self,
        log_q: torch.Tensor,  # [levels, c, r] the draft's log-distributions of rows start..start+c
        p: torch.Tensor,  # [c, r] the target's distribution over the reduced vocabulary
        start: int,
        log_mass: torch.Tensor,  # [K] and
        log_norm: torch.Tensor,  # [levels, rows]: log_masses()
    ) -> torch.Tensor:  # [levels, c]
        """What turns ``-sum_t p(t) log q(t)`` into ``-sum_t p(t) log q'(t)`` for those rows:
        ``log q' = log(q + mass) - log(1 + sum_n w_n)``, the first term changing at the keys only."""
        c = log_q.shape[1]
        sel = (self.row >= start) & (self.row < start + c)
        level, row, column = self.level[sel], self.row[sel] - start, self.column[sel]
        log_q_key = log_q[level, row, column]
        gain = torch.logaddexp(log_q_key, log_mass[sel]) - log_q_key
        shift = log_norm[:, start : start + c] * p.sum(-1)[None, :]
        return shift.index_put((level, row), -p[row, column] * gain, accumulate=True)


def batch_terms(
    tokens: torch.Tensor,  # [B, T] the batch's token ids
    nodes: torch.Tensor,  # [levels, B, T] bool: position i scores a node at that level (root i - level)
    rows: torch.Tensor,  # [B, T] bool: the positions indexed by the loss's rows (nodes lie within)
    rows_of: dict[int, int],  # full id -> reduced-vocabulary column
    max_ngram: int,
) -> MixTerms:
    """The :class:`MixTerms` of a batch, found as decoding would: the n-gram index of the text
    up to the root, the node's suffix along the text (teacher-forced). Followers outside the
    reduced vocabulary keep their weight in the normaliser only."""
    levels, count = nodes.shape[0], int(rows.sum())
    row_id = torch.full(rows.shape, -1, dtype=torch.long)
    row_id[rows.cpu()] = torch.arange(count)
    key_levels, key_rows, columns, keys, ns, ps = [], [], [], [], [], []
    matched = torch.zeros(levels, count, max_ngram, dtype=torch.bool)
    for text, scored, ids in zip(tokens.tolist(), nodes.cpu().transpose(0, 1).tolist(), row_id.tolist()):
        for level, i, index, suffix in node_suffixes(text, scored, max_ngram):
            found = components(index, suffix, max_ngram)
            matched[level, ids[i], : len(found)] = True
            key_of: dict[int, int] = {}
            for n, followers in enumerate(found):
                for token, prob in followers.items():
                    column = rows_of.get(token)
                    if column is None:
                        continue
                    if column not in key_of:
                        key_of[column] = len(columns)
                        key_levels.append(level)
                        key_rows.append(ids[i])
                        columns.append(column)
                    keys.append(key_of[column])
                    ns.append(n)
                    ps.append(prob)
    device = tokens.device
    longs = (torch.tensor(x, dtype=torch.long, device=device) for x in (key_levels, key_rows, columns, keys, ns))
    return MixTerms(*longs, torch.tensor(ps, dtype=torch.float32, device=device), matched.to(device))
