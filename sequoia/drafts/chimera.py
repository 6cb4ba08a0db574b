"""Chimera's lightweight draft (arXiv 2402.15758), fed by the target's last hidden states.

Three parts, as in the paper:

* a **trigram encoder**: one linear map of the (target's, frozen) embeddings of the last three
  tokens -- short-range dependencies without attention;
* a **one-layer full-context encoder** over the target's readily available last hidden states:
  position ``i``'s input fuses its trigram with ``h[i-1]``, the target state that predicted
  token ``i``, and a causal attention + MLP layer mixes the whole context. The layer starts as
  the identity (zero output projections), which trains far better than copying a target layer;
* **residual decoding heads**, one per tree level: ``o = z + MLP(z)`` with ``z`` = encoder
  output + the target's last available hidden state, then one output layer over the reduced
  vocabulary (started from the target's rows). A **recurrent** draft (``recurrent: true`` in
  its config) reuses its last head for every level past ``heads``, so it fills trees of any
  depth: deeper levels differ from the last head's only by their input (the fed-back output
  and path), which is exactly EAGLE's recurrence, and training unrolls ``levels`` of them.

Deeper levels feed predictions forward the way EAGLE does: a tree node has no target state, so
its input fuses its trigram (path tokens) with its parent's head output ``o``, and it attends
to the real context plus its own tree ancestors. Training unrolls exactly that ("training-time
test"): level ``k`` runs on the model's own level-``k - 1`` outputs, never on target states
the draft would not have. There is no positional encoding: order enters through the causal
mask, the trigram and the target's states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sequoia.drafts.context_mix import ContextMix
from sequoia.drafts.heads import HeadsProposer, last_hidden
from sequoia.dynamic import TreeShaper
from sequoia.drafts.trained import NO_TOKEN, DraftConfig, ReducedVocab, TrainedDraft, shift_right
from sequoia.prepack import packed

FUSE_INIT_SCALE = 0.1  # the fused input starts small next to the target state it is added to


@dataclass(frozen=True)
class ChimeraConfig(DraftConfig):
    attention_heads: int = 0  # 0: hidden_size // 64 (at least 1)
    mlp_size: int = 0  # 0: hidden_size (a level must stay cheap: every row costs ~13 hidden^2)

    @property
    def num_attention_heads(self) -> int:
        return self.attention_heads or max(1, self.hidden_size // 64)


class RMSNorm(nn.RMSNorm):
    """RMSNorm in its weight's dtype (under autocast the input arrives in bfloat16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class EncoderLayer(nn.Module):
    """Pre-norm causal attention + gated MLP; the identity at initialisation."""

    def __init__(self, width: int, heads: int, mlp_size: int) -> None:
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by {heads} attention heads"
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(width), RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.attn_out = nn.Linear(width, width, bias=False)
        self.gate_up = nn.Linear(width, 2 * mlp_size, bias=False)
        self.down = nn.Linear(mlp_size, width, bias=False)
        nn.init.zeros_(self.attn_out.weight)
        nn.init.zeros_(self.down.weight)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [..., width] -> 3 x [..., H, dh]
        q, k, v = self.qkv(self.attn_norm(x)).chunk(3, dim=-1)
        return tuple(t.unflatten(-1, (self.heads, -1)) for t in (q, k, v))

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:  # [..., width], [..., H, dh]
        x = x + self.attn_out(attended.flatten(-2))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def attend(
    q: torch.Tensor,  # [..., M, H, dh]
    k: torch.Tensor,  # [..., N, H, dh]
    v: torch.Tensor,  # [..., N, H, dh]
    allowed: torch.Tensor,  # [M, N] bool; every row allows at least one key
) -> torch.Tensor:  # [..., M, H, dh]
    assert q.ndim == k.ndim == v.ndim >= 3 and allowed.ndim == 2 and allowed.dtype == torch.bool
    if q.ndim == 3:  # on CPU, unbatched inputs take PyTorch's unfused kernel, ~4x slower
        return attend(q[None], k[None], v[None], allowed)[0]
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), attn_mask=allowed)
    return out.transpose(-3, -2)


def unrolled_attend(
    q: torch.Tensor,  # [B, T, H, dh] the queries of level ``len(keys) - 1``
    keys: Sequence[torch.Tensor],  # level + 1 x [B, T, H, dh]: the real positions', then each deeper level's
    values: Sequence[torch.Tensor],  # level + 1 x [B, T, H, dh]
) -> torch.Tensor:  # [B, T, H, dh]
    """Attention in a training unroll: at level ``level``, position ``i`` (root ``r = i - level``)
    attends to the real positions ``<= r`` and, for each deeper level ``t = 1..level``, to that
    level's node at ``i - level + t`` (its tree ancestors and itself).

    Each level contributes one key per row (a shifted diagonal), so those scores are formed
    elementwise and only the context's are a product: (level + 1)x fewer scores than
    :func:`attend` with the equivalent mask, and no masked flash kernel (slow backward on CPU).
    """
    level, length = len(keys) - 1, q.shape[1]
    scale = q.shape[-1] ** -0.5
    pos = torch.arange(length, device=q.device)
    context = torch.einsum("bihd,bjhd->bhij", q, keys[0]).float() * scale  # [B, H, T, T]
    context = context.masked_fill(pos[None, :] > pos[:, None] - level, float("-inf"))
    lags = range(level - 1, -1, -1)  # level t's node sits at i - (level - t)
    q32 = q.float()
    node_scores = [(q32 * shift_right(k, lag).float()).sum(-1) for k, lag in zip(keys[1:], lags)]
    nodes = torch.stack(node_scores, -1) if level else context.new_empty(*q.shape[:-1], 0)  # [B, T, H, level]
    before_start = pos[:, None] < torch.tensor(list(lags), device=q.device, dtype=torch.long)  # [T, level]
    nodes = nodes.mul(scale).masked_fill(before_start[None, :, None, :], float("-inf"))
    weights = torch.cat([context, nodes.permute(0, 2, 1, 3)], -1).softmax(-1).to(q.dtype)  # [B, H, T, T + level]
    out = torch.einsum("bhij,bjhd->bihd", weights[..., :length], values[0])
    node_weights = weights[..., length:].permute(0, 2, 1, 3)  # [B, T, H, level]
    for t, (v, lag) in enumerate(zip(values[1:], lags)):
        out = out + node_weights[..., t, None] * shift_right(v, lag)
    return out


class ResidualHead(nn.Module):
    """``o = z + W_down SiLU(W_up RMSNorm(z))``; starts as the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.up, self.down = RMSNorm(width), nn.Linear(width, width), nn.Linear(width, width)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.down(F.silu(self.up(self.norm(z))))


class ChimeraDraft(TrainedDraft):
    """Trigram encoder + one-layer full-context encoder + residual decoding heads."""

    kind = "chimera"
    config_class = ChimeraConfig
    supports_recurrent = True

    def __init__(self, config: ChimeraConfig, vocab: ReducedVocab) -> None:
        super().__init__(config, vocab)
        d = config.hidden_size
        self.trigram = nn.Linear(3 * d, d, bias=False)
        self.fuse = nn.Linear(2 * d, d, bias=False)
        with torch.no_grad():
            self.fuse.weight.mul_(FUSE_INIT_SCALE)
        self.encoder = EncoderLayer(d, config.num_attention_heads, config.mlp_size or d)
        self.heads = nn.ModuleList(ResidualHead(d) for _ in range(config.heads))

    def encoder_input(
        self,
        prev2: torch.Tensor,  # [...] int64, two tokens back (NO_TOKEN before the start)
        prev1: torch.Tensor,  # [...] int64, the token before
        tokens: torch.Tensor,  # [...] int64
        state: torch.Tensor,  # [..., hidden] the target state that predicted `tokens`, or a stand-in
    ) -> torch.Tensor:  # [..., hidden]
        assert prev2.shape == prev1.shape == tokens.shape == state.shape[:-1]
        trigram = self.trigram(torch.cat([self.embed(prev2), self.embed(prev1), self.embed(tokens)], dim=-1))
        return self.fuse(torch.cat([trigram, state.to(trigram)], dim=-1))

    def head(self, level: int) -> ResidualHead:
        """The head of tree level ``level + 1``: a recurrent draft's last head serves every
        level past its ``heads``."""
        if level >= self.config.heads and not self.config.recurrent:
            raise IndexError(f"this draft has {self.config.heads} heads and is not recurrent")
        return self.heads[min(level, self.config.heads - 1)]

    def unroll_states(self, tokens: torch.Tensor, hidden: torch.Tensor, levels: int | None = None) -> list[torch.Tensor]:
        assert tokens.ndim == 2 and hidden.shape[:2] == tokens.shape
        prev1, prev2 = _shift_tokens(tokens, 1), _shift_tokens(tokens, 2)
        hidden = hidden.to(self.out.weight)
        state, keys, values, states = hidden, [], [], []
        for level in range(levels or self.config.heads):
            x = self.encoder_input(prev2, prev1, tokens, shift_right(state))
            q, k, v = self.encoder.project(x)
            keys.append(k)
            values.append(v)
            c = self.encoder.finish(x, unrolled_attend(q, keys, values))
            state = self.head(level)(c + shift_right(hidden, level + 1))
            states.append(state)
        return states

    def proposer(self, mix: ContextMix | None = None, shaper: TreeShaper | None = None) -> ChimeraProposer:
        return ChimeraProposer(self, mix, shaper)


@torch.no_grad()
def folded_input(model: ChimeraDraft) -> nn.Linear:
    """:meth:`ChimeraDraft.encoder_input` as one product over ``[e(t - 2), e(t - 1), e(t), state]``:
    the trigram map is linear and enters the fuse layer linearly, so ``W_fuse[:, :d] W_trigram``
    replaces both (formed in float32) -- at inference a level saves a product and a copy."""
    d, dtype = model.config.hidden_size, model.fuse.weight.dtype
    fuse, trigram = model.fuse.weight.float(), model.trigram.weight.float()
    layer = nn.Linear(4 * d, d, bias=False, device=fuse.device, dtype=dtype)
    layer.weight.copy_(torch.cat([fuse[:, :d] @ trigram, fuse[:, d:]], dim=1))
    return layer


def _shift_tokens(tokens: torch.Tensor, steps: int) -> torch.Tensor:  # [B, T] -> [B, T]
    pad = torch.full_like(tokens[:, :steps], NO_TOKEN)
    return torch.cat([pad, tokens[:, :-steps]], dim=1)


class ChimeraProposer(HeadsProposer):
    """Grows a tree with a :class:`ChimeraDraft`, keeping the encoder's keys/values of the
    accepted context (computed from real target states) across steps.

    Keys and values live in one preallocated buffer: the accepted context's rows first, then a
    proposal's tree nodes (node ``j >= 1`` at row ``cached + j - 1``), which the next accepted
    positions overwrite -- no copy of the context per level. The input layers are folded into
    one (:func:`folded_input`) when the proposer is made: train the model, then make a proposer."""

    model: ChimeraDraft

    def __init__(self, model: ChimeraDraft, mix: ContextMix | None = None, shaper: TreeShaper | None = None) -> None:
        super().__init__(model, mix, shaper)
        self._input = packed(folded_input(model))

    def _encoder_input(self, prev2, prev1, tokens, state) -> torch.Tensor:  # as ChimeraDraft.encoder_input
        embedded = self.model.embed(torch.stack([prev2, prev1, tokens], dim=-1)).flatten(-2)
        return self._input(torch.cat([embedded, state.to(embedded)], dim=-1))

    def reset(self) -> None:
        super().reset()
        self._keys: torch.Tensor | None = None  # [capacity, H, dh]
        self._values: torch.Tensor | None = None
        self._cached = 0  # accepted positions at the head of the key/value buffer
        self._root_out: torch.Tensor | None = None  # [hidden] encoder output at the root

    def _reserve(self, rows: int, like: torch.Tensor) -> None:  # like: [m, H, dh]
        """Grow the key/value buffer (doubling) to hold at least ``rows`` rows."""
        if self._keys is not None and len(self._keys) >= rows:
            return
        capacity = max(rows, 2 * (0 if self._keys is None else len(self._keys)), 256)
        keys, values = (like.new_zeros(capacity, *like.shape[1:]) for _ in range(2))
        if self._keys is not None:
            keys[: self._cached], values[: self._cached] = self._keys[: self._cached], self._values[: self._cached]
        self._keys, self._values = keys, values

    def _begin(self, ctx, capacity: int, tokens: torch.Tensor, parents: torch.Tensor) -> None:
        weight = self.model.out.weight
        self._feed(ctx.tokens.to(weight.device), ctx.hidden_states)
        n, cached = capacity, self._cached
        self._reserve(cached + n - 1, self._keys)
        self._h_last = last_hidden(ctx, self.model.config.hidden_size, weight)
        self._tokens, self._parents = tokens, parents
        # row i: the keys node i attends to -- the context, then its tree ancestors and itself
        # (filled from the parent's row when node i is expanded)
        self._allowed = torch.zeros(n, cached + n - 1, dtype=torch.bool, device=weight.device)
        self._allowed[:, :cached] = True
        self._states = torch.zeros(n, self.model.config.hidden_size, dtype=weight.dtype, device=weight.device)
        self._prev1 = torch.full((n,), NO_TOKEN, dtype=torch.long, device=weight.device)
        if len(ctx.tokens) > 1:
            self._prev1[0] = ctx.tokens[-2]

    def _feed(self, seq: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """Put the accepted positions not yet cached (the root last) through the encoder."""
        length, start = len(seq), self._cached
        if length == start:
            return
        assert length > start, "the context shrank without reset()"
        d, weight = self.model.config.hidden_size, self.model.out.weight
        states = torch.zeros(length - start, d, dtype=weight.dtype, device=weight.device)  # h[i - 1]
        take = 0 if hidden is None else min(len(hidden), length - start)
        if take:
            states[-take:] = hidden[-take:].to(weight)
        pos = torch.arange(start, length, device=seq.device)
        back = [torch.where(pos >= s, seq[(pos - s).clamp(min=0)], NO_TOKEN) for s in (2, 1)]
        x = self._encoder_input(back[0], back[1], seq[start:], states)
        q, k, v = self.model.encoder.project(x)
        self._reserve(length, k)
        self._keys[start:length], self._values[start:length] = k, v
        rows = torch.arange(length - start, device=seq.device)[:, None]
        allowed = torch.arange(length, device=seq.device)[None, :] <= rows + start
        out = self.model.encoder.finish(x, attend(q, self._keys[:length], self._values[:length], allowed))
        self._cached, self._root_out = length, out[-1]

    def _level(self, level: int, nodes: torch.Tensor, last: int) -> torch.Tensor:
        if level == 0:
            out = self._root_out.expand(len(nodes), -1)
        else:
            parents = self._parents[nodes]
            prev1 = self._tokens[parents]
            x = self._encoder_input(self._prev1[parents], prev1, self._tokens[nodes], self._states[parents])
            self._prev1[nodes] = prev1
            rows = self._cached - 1 + nodes
            self._allowed[nodes] = self._allowed[parents]
            self._allowed[nodes, rows] = True
            q, self._keys[rows], self._values[rows] = self.model.encoder.project(x)
            end = self._cached + last  # keys up to the level's last node, known without a sync
            attended = attend(q, self._keys[:end], self._values[:end], self._allowed[nodes, :end])
            out = self.model.encoder.finish(x, attended)
        states = self.model.head(level)(out + self._h_last)
        self._states[nodes] = states
        return self.model.out(states)
