"""Drafts trained on the target's own hidden states: the shared model base.

A trained draft predicts ``heads`` tree levels from the target's last-layer hidden states and
token embeddings; it scores a *reduced vocabulary* (the ``r`` most frequent target outputs)
and maps its candidates back to full-vocabulary ids, so a level costs an ``r``-row output
layer instead of the target's whole vocabulary. The model never proposes a token outside the
reduced vocabulary: in stochastic mode its ``q`` is zero there, which verification handles like
any other draft distribution (the output stays exactly the target's); only a context mix
(:mod:`sequoia.drafts.context_mix`, recorded in the card) can add such tokens.

"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from sequoia.errors import FileFormatError

NO_TOKEN = -1  # a token id before the start of the sequence: embeds as zeros


@dataclass(frozen=True)
class ReducedVocab:
    """The full-vocabulary ids a draft can propose, in output-row order."""

    ids: torch.Tensor  # [r] int64, distinct full-vocabulary ids
    vocab_size: int  # the target's full vocabulary

    def __post_init__(self) -> None:
        assert self.ids.ndim == 1 and self.ids.dtype == torch.long
        if len(self.ids) == 0 or len(torch.unique(self.ids)) != len(self.ids):
            raise FileFormatError("the reduced vocabulary must list distinct token ids")
        if int(self.ids.min()) < 0 or int(self.ids.max()) >= self.vocab_size:
            raise FileFormatError(f"the reduced vocabulary holds ids outside 0..{self.vocab_size - 1}")

    @property
    def size(self) -> int:
        return len(self.ids)

    @cached_property
    def index(self) -> torch.Tensor:  # [vocab] int64: row of each full id, -1 if absent
        table = torch.full((self.vocab_size,), -1, dtype=torch.long)
        table[self.ids] = torch.arange(self.size)
        return table

    @cached_property
    def rows(self) -> dict[int, int]:  # full id -> row, for lookups from Python
        return {int(t): row for row, t in enumerate(self.ids.tolist())}

    def to_full_probs(self, q: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:  # [m, c] -> [m, vocab]
        """Scatter probabilities over distinct full ids ``columns`` (default: the reduced
        vocabulary's) into the full vocabulary, zeros elsewhere; float32."""
        columns = self.ids if columns is None else columns
        assert q.ndim == 2 and q.shape[1] == len(columns)
        full = torch.zeros(q.shape[0], self.vocab_size, dtype=torch.float32, device=q.device)
        return full.index_copy_(1, columns.to(q.device), q.float())

    @classmethod
    def most_frequent(cls, tokens: np.ndarray, size: int, vocab_size: int, always: tuple[int, ...] = ()) -> ReducedVocab:
        """The ``size`` most frequent ids of ``tokens`` (ties: lower id first), ``always`` included.

        >>> ReducedVocab.most_frequent(np.array([5, 5, 2, 7, 7, 7]), 2, 10).ids.tolist()
        [7, 5]
        >>> ReducedVocab.most_frequent(np.array([5, 5, 2, 7, 7, 7]), 2, 10, always=(9,)).ids.tolist()
        [9, 7]
        """
        size = min(size, vocab_size)
        counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
        order = np.lexsort((np.arange(vocab_size), -counts))  # by count desc, then id
        forced = [t for t in dict.fromkeys(always) if 0 <= t < vocab_size]
        rest = [int(t) for t in order if int(t) not in set(forced)]
        return cls(torch.tensor((forced + rest)[:size], dtype=torch.long), vocab_size)


@dataclass(frozen=True)
class DraftConfig:
    """What every trained draft has; kinds subclass it with their own fields."""

    hidden_size: int  # the target's width
    vocab_size: int  # the target's full vocabulary
    heads: int  # tree levels the draft predicts = its maximum tree depth (unless recurrent)
    recurrent: bool = False  # levels past ``heads`` reuse the last head (kinds that support it)

    @property
    def max_depth(self) -> int | None:
        """The deepest tree the draft fills; None: any depth (a recurrent draft)."""
        return None if self.recurrent else self.heads

    @classmethod
    def from_json(cls, data: Any, where: str) -> DraftConfig:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not names >= {"hidden_size", "vocab_size", "heads"}:
            raise FileFormatError(f"{where} has no valid 'config' (hidden_size, vocab_size, heads)")
        try:
            config = cls(**{k: bool(v) if k == "recurrent" else int(v) for k, v in data.items() if k in names})
        except (TypeError, ValueError) as exc:
            raise FileFormatError(f"{where} has a malformed 'config': {exc}") from None
        if min(config.hidden_size, config.vocab_size, config.heads) < 1:
            raise FileFormatError(f"{where}: hidden_size, vocab_size and heads must be positive")
        return config


class TrainedDraft(nn.Module):
    """Base of the trained draft models: reduced vocabulary, output layer, shared embedding.

    A subclass implements :meth:`unroll` (every level at once, teacher-forced, for training and
    evaluation) and :meth:`proposer` (the same computation grown level by level over a tree).
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[DraftConfig]] = DraftConfig
    supports_recurrent: ClassVar[bool] = False  # can reuse its last head for deeper levels

    def __init__(self, config: DraftConfig, vocab: ReducedVocab) -> None:
        super().__init__()
        assert vocab.vocab_size == config.vocab_size
        if config.recurrent and not self.supports_recurrent:
            raise FileFormatError(f"a {self.kind} draft cannot be recurrent (only chimera reuses its last head)")
        self.config, self.vocab = config, vocab
        self.out = nn.Linear(config.hidden_size, vocab.size, bias=False)
        self._embedding: torch.Tensor | None = None  # [vocab, hidden] the target's, never saved

    # ------------------------------------------------------------------ the target's parts
    def attach_target(self, embedding: torch.Tensor) -> None:
        """Share the target's input embedding matrix ([vocab, hidden]); it is not copied."""
        assert embedding.shape == (self.config.vocab_size, self.config.hidden_size)
        self._embedding = embedding.detach()

    @torch.no_grad()
    def init_output_from(self, lm_head: torch.Tensor) -> None:
        """Start the output layer from the target's rows for the reduced vocabulary."""
        assert lm_head.shape == (self.config.vocab_size, self.config.hidden_size)
        self.out.weight.copy_(lm_head[self.vocab.ids.to(lm_head.device)].to(self.out.weight))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # [...] int64 -> [..., hidden]
        """The target's embeddings of ``tokens`` in the draft's dtype; :data:`NO_TOKEN` -> zeros."""
        assert self._embedding is not None, "call attach_target() first"
        present = tokens >= 0
        rows = self._embedding[tokens.clamp(min=0).to(self._embedding.device)].to(self.out.weight)
        return rows * present.to(rows)[..., None]

    # ------------------------------------------------------------------ per kind
    def unroll_states(self, tokens: torch.Tensor, hidden: torch.Tensor, levels: int | None = None) -> list[torch.Tensor]:
        """Teacher-forced output-layer inputs of every level: ``[B, T] tokens, [B, T, hidden]
        -> levels x [B, T, hidden]`` (``levels`` past ``heads`` only for a recurrent draft;
        default ``heads``).

        Entry ``k`` (0-based) at position ``i`` scores token ``i + 1`` for a tree rooted at
        position ``i - k`` whose path follows the sequence; the target's hidden states are
        used up to position ``i - k - 1``, exactly what a proposal at that root has. Training
        applies :attr:`out` only where a loss is taken.
        """
        raise NotImplementedError

    def unroll(self, tokens: torch.Tensor, hidden: torch.Tensor, levels: int | None = None) -> list[torch.Tensor]:
        """:meth:`unroll_states` through the output layer: ``levels x [B, T, r]`` logits."""
        return [self.out(state) for state in self.unroll_states(tokens, hidden, levels)]

    def proposer(self, mix=None, shaper=None):
        """The :class:`~sequoia.drafts.base.Proposer` that grows trees with this model, its
        candidates mixed with the context's n-grams by ``mix`` (a ``ContextMix``) if given,
        its tree shaped per step by ``shaper`` (a :class:`~sequoia.dynamic.TreeShaper`) if given."""
        raise NotImplementedError


def shift_right(x: torch.Tensor, steps: int = 1) -> torch.Tensor:  # [B, T, ...] -> [B, T, ...]
    """``out[:, i] = x[:, i - steps]``, zeros where ``i < steps`` (the sequence axis is 1)."""
    assert x.ndim >= 2 and steps >= 0
    if steps == 0:
        return x
    pad = torch.zeros_like(x[:, :steps])
    return torch.cat([pad, x[:, : x.shape[1] - steps]], dim=1)[:, : x.shape[1]]
