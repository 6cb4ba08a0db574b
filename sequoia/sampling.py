"""Logits processing and sampling: temperature, top-k, top-p, sampling with and without
replacement, and residual distributions.

Processing follows Hugging Face ``generate``: logits are divided by the temperature, then the
top-k filter, then the top-p filter are applied (``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``), and the result is soft-maxed. Top-p keeps the
smallest set of most likely tokens whose probability sums to at least ``top_p`` (always at
least one token). Temperature 0 means greedy: the distribution is a point mass on the argmax.
Unlike ``generate``, top-k is off unless asked for (``generate`` defaults to ``top_k=50``).

Every random draw takes an explicit ``torch.Generator``. Sampling uses the exponential race:
token ``i`` arrives at time ``E_i / p_i`` with ``E_i ~ Exp(1)``; the first arrival is a sample
of ``p`` and the first ``k`` arrivals, in order, are ``k`` samples without replacement.

    >>> probs = logits_to_probs(torch.tensor([2.0, 1.0, 0.0, -9.0]), SamplingConfig(1.0, top_p=0.7))
    >>> [round(x, 3) for x in probs.tolist()]          # 0.665 < 0.7, so the second token stays
    [0.731, 0.269, 0.0, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sequoia.errors import ConfigError

TOP_P_CANDIDATES = 256  # top-p looks at this many tokens first; it sorts the rest only if needed


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen from logits; ``temperature == 0`` is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top-k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(
    logits: torch.Tensor,  # [..., vocab]
    config: SamplingConfig,
) -> torch.Tensor:  # [..., vocab] float32, filtered tokens at -inf
    """Temperature, then top-k, then top-p, as Hugging Face's logits warpers do (sampling only)."""
    assert logits.ndim >= 1 and logits.is_floating_point()
    assert not config.greedy, "greedy decoding takes the argmax of the raw logits"
    scores = logits.float()
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k and config.top_k < scores.shape[-1]:
        kth = scores.topk(config.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        scores = scores.masked_fill(~_top_p_keep(scores.softmax(-1), config.top_p), float("-inf"))
    return scores


def _top_p_keep(
    probs: torch.Tensor,  # [..., vocab]
    top_p: float,
) -> torch.Tensor:  # [..., vocab] bool
    """Keep a token iff the probability of the tokens ranked above it is below ``top_p``.

    This is ``TopPLogitsWarper`` (drop a token iff the ascending cumulative probability up to
    it is ``<= 1 - top_p``) read from the top. Rows whose top :data:`TOP_P_CANDIDATES` tokens
    already hold ``top_p`` of the mass need no full sort: every token below them is dropped.
    """
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    values, index = probs.topk(k, dim=-1)  # [..., k] descending
    keep = _keep_ranked(probs, values, index, top_p)
    flat = values.sum(-1) < top_p  # [...] rows the top k do not settle
    if bool(flat.any()):
        rows = probs[flat]  # [r, vocab]
        keep[flat] = _keep_ranked(rows, *rows.sort(dim=-1, descending=True), top_p)
    return keep


def _keep_ranked(
    probs: torch.Tensor,  # [..., vocab]
    values: torch.Tensor,  # [..., k] the k largest probabilities, descending
    index: torch.Tensor,  # [..., k] their token ids
    top_p: float,
) -> torch.Tensor:  # [..., vocab] bool
    above = values.cumsum(-1) - values  # mass ranked strictly above each token
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, index, above < top_p)


def logits_to_probs(
    logits: torch.Tensor,  # [..., vocab]
    config: SamplingConfig,
) -> torch.Tensor:  # [..., vocab] float32
    """The distribution tokens are drawn from: processed softmax, or a point mass when greedy."""
    assert logits.ndim >= 1 and logits.is_floating_point()
    if config.greedy:
        top = logits.max(dim=-1, keepdim=True).indices
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, top, 1.0)
    return process_logits(logits, config).softmax(-1)


def _arrival_keys(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``p_i / E_i`` with ``E_i ~ Exp(1)``: larger key = earlier arrival; ``p_i = 0`` never wins
    against a positive key. ``-log U`` is several times faster than ``Tensor.exponential_``."""
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device)
    return probs / uniform.log_().neg_()


def sample_without_replacement(
    probs: torch.Tensor,  # [..., vocab], rows sum to 1
    k: int,
    generator: torch.Generator,
) -> torch.Tensor:  # [..., k] int64, distinct per row, in order of draw
    """``k`` draws without replacement (Plackett-Luce order) by the exponential race.

    If a row has fewer than ``k`` tokens of positive probability, the surplus draws are
    zero-probability tokens (after all positive ones); verification skips them.
    """
    assert probs.ndim >= 1 and probs.is_floating_point() and 1 <= k <= probs.shape[-1]
    return _arrival_keys(probs, generator).topk(k, dim=-1).indices


def sample_with_replacement(
    probs: torch.Tensor,  # [rows, vocab] or [vocab]
    k: int,
    generator: torch.Generator,
) -> torch.Tensor:  # [rows, k] or [k] int64, i.i.d. draws
    assert probs.ndim in (1, 2) and probs.is_floating_point() and k >= 1
    return torch.multinomial(probs, k, replacement=True, generator=generator)


def sample(
    probs: torch.Tensor,  # [..., vocab]
    generator: torch.Generator,
) -> torch.Tensor:  # [...] int64
    """One draw from each row."""
    assert probs.ndim >= 1 and probs.is_floating_point()
    return _arrival_keys(probs, generator).max(dim=-1).indices


def residual(
    target_probs: torch.Tensor,  # [vocab] p
    draft_probs: torch.Tensor,  # [vocab] q
) -> torch.Tensor:  # [vocab] norm(max(p - q, 0))
    """What the target still has to produce after rejecting a draw from ``q``.

    When ``p <= q`` everywhere (so ``p == q`` up to rounding) a rejection can only come from
    rounding, and ``p`` itself is returned.
    """
    assert target_probs.ndim == 1 and target_probs.shape == draft_probs.shape
    rest = (target_probs - draft_probs).clamp_(min=0.0)
    total = rest.sum()
    return rest / total if total > 0 else target_probs


def residual_point_mass(
    target_probs: torch.Tensor,  # [vocab] p
    token: int,
) -> torch.Tensor:  # [vocab] norm(max(p - onehot(token), 0)) = p without token, renormalised
    """:func:`residual` for a deterministic draft, whose ``q`` is a point mass on ``token``."""
    assert target_probs.ndim == 1
    rest = target_probs.clone()
    rest[token] = 0.0
    total = rest.sum()
    return rest / total if total > 0 else target_probs


class NodeProbs:
    """Target distributions per tree node, processed on first read.

    Indexes like a ``[num_nodes, vocab]`` tensor of probabilities, but verification reads only
    the nodes on the accepted path, so only those rows pay for softmax and top-p.
    """

    def __init__(self, logits: torch.Tensor, config: SamplingConfig) -> None:  # [n, vocab]
        assert logits.ndim == 2 and not config.greedy
        self.logits = logits
        self.config = config
        self._rows: dict[int, torch.Tensor] = {}

    def __getitem__(self, node: int) -> torch.Tensor:  # [vocab] float32
        if node not in self._rows:
            self._rows[node] = logits_to_probs(self.logits[node], self.config)
        return self._rows[node]

    def __len__(self) -> int:
        return self.logits.shape[0]
