"""Logits processing matches Hugging Face's warpers; samplers have the right distributions."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sequoia.errors import ConfigError
from sequoia.sampling import (
    NodeProbs,
    SamplingConfig,
    logits_to_probs,
    process_logits,
    residual,
    residual_point_mass,
    sample,
    sample_with_replacement,
    sample_without_replacement,
)

ALPHA = 1e-3  # seeded, so deterministic; a real mismatch gives p-values far below this


def _hf(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Hugging Face's order: temperature, top-k, top-p."""
    scores = TemperatureLogitsWarper(config.temperature)(None, logits)
    if config.top_k:
        scores = TopKLogitsWarper(config.top_k)(None, scores)
    if config.top_p < 1:
        scores = TopPLogitsWarper(config.top_p)(None, scores)
    return scores


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(1.0),
        SamplingConfig(0.3, top_p=0.9),
        SamplingConfig(2.0, top_p=0.5),
        SamplingConfig(0.7, top_k=5),
        SamplingConfig(1.3, top_p=0.8, top_k=20),
        SamplingConfig(1.0, top_p=1e-6),  # keeps exactly the top token
    ],
    ids=str,
)
@pytest.mark.parametrize("spread", [0.5, 4.0])  # flat rows take the full-sort path of top-p
def test_process_logits_equals_hugging_face(config, spread):
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0)) * spread
    ours, theirs = process_logits(logits, config), _hf(logits, config)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1))
    assert (torch.isfinite(ours).sum(-1) >= 1).all()


def test_top_p_literal():
    # probs 0.5, 0.3, 0.15, 0.05: top-p 0.8 keeps the first two (0.5 < 0.8 above the second,
    # 0.8 is not < 0.8 above the third); top-p 0.81 also keeps the third
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = torch.isfinite(process_logits(logits, SamplingConfig(1.0, top_p=0.8)))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(process_logits(logits, SamplingConfig(1.0, top_p=0.81)))
    assert kept.tolist() == [True, True, True, False]


def test_greedy_is_a_point_mass_on_the_argmax():
    probs = logits_to_probs(torch.tensor([[0.1, 3.0, 3.0, -1.0]]), SamplingConfig(0.0))
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]  # first of tied maxima, like torch.argmax


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1.0, "top_p": 0.0}, "top-p"),
        ({"temperature": 1.0, "top_p": 1.5}, "top-p"),
        ({"temperature": 1.0, "top_k": -1}, "top-k"),
    ],
)
def test_config_rejects_out_of_range_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingConfig(**kwargs)


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    probs = probs.double() / probs.double().sum()
    return stats.chisquare(counts.double().numpy(), (probs * counts.sum()).numpy()).pvalue


def test_sample_matches_probs():
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    draws = sample(p.expand(20000, 5), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5)
    assert counts[4] == 0
    assert _chi2_pvalue(counts[:4], p[:4]) > ALPHA


@pytest.mark.parametrize("k", [2, 3])
def test_sample_without_replacement_is_plackett_luce(k):
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    draws = sample_without_replacement(p.expand(30000, 4), k, torch.Generator().manual_seed(1))
    assert all(len(set(row)) == k for row in draws.tolist()[:100])
    orders = list(itertools.permutations(range(4), k))
    exact = []
    for order in orders:  # P(a, b, ...) = p_a * p_b / (1 - p_a) * ...
        prob, left = 1.0, 1.0
        for token in order:
            prob, left = prob * p[token].item() / left, left - p[token].item()
        exact.append(prob)
    index = {o: i for i, o in enumerate(orders)}
    counts = torch.bincount(torch.tensor([index[tuple(r)] for r in draws.tolist()]), minlength=len(orders))
    assert _chi2_pvalue(counts, torch.tensor(exact)) > ALPHA


def test_sample_without_replacement_puts_zero_probability_last():
    p = torch.tensor([0.0, 0.7, 0.0, 0.3])
    draws = sample_without_replacement(p.expand(200, 4), 4, torch.Generator().manual_seed(2))
    assert {frozenset(r[:2]) for r in draws.tolist()} == {frozenset({1, 3})}


def test_sample_with_replacement_repeats():
    draws = sample_with_replacement(torch.tensor([0.9, 0.1]), 50, torch.Generator().manual_seed(3))
    assert draws.shape == (50,) and (draws == 0).sum() > 30


def test_residual_literal_and_point_mass():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(residual(p, q), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(residual_point_mass(p, 0), torch.tensor([0.0, 0.6, 0.4]))
    assert torch.equal(residual(p, p), p)  # p <= q everywhere: nothing left, keep p


def test_node_probs_computes_rows_on_demand():
    logits = torch.randn(5, 10)
    config = SamplingConfig(0.8, top_p=0.9)
    rows = NodeProbs(logits, config)
    torch.testing.assert_close(rows[3], logits_to_probs(logits[3], config))
    assert list(rows._rows) == [3] and len(rows) == 5


def test_top_p_rows_mixing_fast_and_full_sort_paths():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(4))
    logits[::2] *= 8.0  # peaked rows: the top 256 hold the nucleus; flat rows need the sort
    config = SamplingConfig(1.0, top_p=0.9)
    assert torch.equal(torch.isinf(process_logits(logits, config)), torch.isinf(_hf(logits, config)))
