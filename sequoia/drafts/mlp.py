"""The IBM combined token + embedding speculator (MLP speculator, arXiv 2404.19124).

Head ``k`` turns a state and the embedding of the token at the previous position into the
next state, which the shared output layer turns into logits::

    state_k = GELU(LayerNorm_k(a * W_state_k @ state_{k-1} + b * W_token_k @ embed(token)))
    logits_k = W_out @ state_k

``state_0`` is the target's last hidden state (normalised, as the paper's ``scale_input``),
and ``a = 0.5 ** (0.5 / heads)``, ``b = sqrt(1 - a**2)`` keep the state's share of the sum
steady over the heads. So head 1 sees the target's state before the root and the root token;
head 2 sees head 1's state and the token a node was drafted as; and so on: an n-gram drafter
conditioned on the path. Departures from the paper, for a small CPU-served draft: token
embeddings are the target's own (frozen, shared, not stored) behind a per-head projection,
and one output layer over the reduced vocabulary serves every head (as the paper's
``tie_weights`` option), started from the target's output rows.

Training (:mod:`sequoia.drafts.training.train`) follows the paper's two stages: first the target's
*input* behaviour (next-token cross-entropy over prompts and continuations), then its
*output* behaviour (KL to the target's distribution on its own continuations).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sequoia.drafts.context_mix import ContextMix
from sequoia.drafts.heads import HeadsProposer, last_hidden
from sequoia.drafts.trained import DraftConfig, ReducedVocab, TrainedDraft, shift_right


class MLPSpeculator(TrainedDraft):
    """Per-head state and token projections, LayerNorm + GELU, one shared output layer."""

    kind = "mlp"

    def __init__(self, config: DraftConfig, vocab: ReducedVocab) -> None:
        super().__init__(config, vocab)
        d, k = config.hidden_size, config.heads
        self.input_norm = nn.LayerNorm(d, elementwise_affine=False)
        self.state_proj = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(k))
        self.token_proj = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(k))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(k))
        self.state_weight = 0.5 ** (0.5 / k)
        self.token_weight = math.sqrt(1 - self.state_weight**2)

    def step(
        self,
        level: int,
        state: torch.Tensor,  # [..., hidden] the previous head's state (level 0: the target's)
        tokens: torch.Tensor,  # [...] int64, the token at the previous position
    ) -> torch.Tensor:  # [..., hidden] the new state; its logits are ``self.out(state)``
        assert state.shape[:-1] == tokens.shape and 0 <= level < self.config.heads
        state = state.to(self.out.weight)
        if level == 0:
            state = self.input_norm(state) / math.sqrt(2)
        mixed = self.state_weight * self.state_proj[level](state)
        mixed = mixed + self.token_weight * self.token_proj[level](self.embed(tokens))
        return F.gelu(self.norms[level](mixed))

    def unroll_states(self, tokens: torch.Tensor, hidden: torch.Tensor, levels: int | None = None) -> list[torch.Tensor]:
        assert tokens.ndim == 2 and hidden.shape[:2] == tokens.shape
        assert levels in (None, self.config.heads), "the MLP speculator has one head per level"
        states = [hidden]
        for level in range(self.config.heads):
            states.append(self.step(level, shift_right(states[-1]), tokens))
        return states[1:]

    def proposer(self, mix: ContextMix | None = None, shaper=None) -> MLPProposer:
        return MLPProposer(self, mix, shaper)


class MLPProposer(HeadsProposer):
    """Grows a tree with an :class:`MLPSpeculator`; stateless across steps."""

    model: MLPSpeculator

    def _begin(self, ctx, capacity: int, tokens: torch.Tensor, parents: torch.Tensor) -> None:
        weight = self.model.out.weight
        self._tokens, self._parents = tokens, parents
        self._states = torch.zeros(capacity, self.model.config.hidden_size, dtype=weight.dtype, device=weight.device)
        self._root_state = last_hidden(ctx, self.model.config.hidden_size, weight)

    def _level(self, level: int, nodes: torch.Tensor, last: int) -> torch.Tensor:
        if level == 0:
            state = self._root_state.expand(len(nodes), -1)
        else:
            state = self._states[self._parents[nodes]]
        self._states[nodes] = self.model.step(level, state, self._tokens[nodes])
        return self.model.out(self._states[nodes])
