"""Latency-injected models: the drafter's acceptance is as asked, the check is lossless and
shows the orchestrator overlapping forwards that wait (as GPU forwards do)."""

from __future__ import annotations

import random

import pytest
import torch

from sequoia.dsi.check import Delayed, NoisyDrafter, check
from sequoia.errors import ConfigError


def test_noisy_drafter_is_right_at_the_asked_rate_and_deterministic():
    rng = random.Random(0)
    prefixes = [[rng.randrange(64) for _ in range(rng.randrange(1, 20))] for _ in range(4000)]
    drafter = NoisyDrafter(model=None, acceptance=0.7, delay_ms=0.0)
    rate = sum(map(drafter.is_right, prefixes)) / len(prefixes)
    assert abs(rate - 0.7) < 4 * (0.7 * 0.3 / len(prefixes)) ** 0.5
    assert [drafter.is_right(p) for p in prefixes[:50]] == [drafter.is_right(p) for p in prefixes[:50]]
    assert not any(NoisyDrafter(None, 0.0, 0.0).is_right(p) for p in prefixes[:200])
    assert all(NoisyDrafter(None, 1.0, 0.0).is_right(p) for p in prefixes[:200])


def test_noisy_drafter_proposes_the_target_token_only_when_right(tiny_target):
    drafter = NoisyDrafter(tiny_target, acceptance=0.5, delay_ms=1.0)
    for prompt in ([1, 2, 3], [4, 5], [9], [7, 7, 7, 7], [30, 31]):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            target_token = int(tiny_target(input_ids=ids).logits[0, -1].argmax())
            draft_token = int(drafter(input_ids=ids).logits[0, -1].argmax())
        assert (draft_token == target_token) == drafter.is_right(prompt)
    assert len(drafter.durations) == 5 and min(drafter.durations) >= 1.0


def test_check_is_lossless(tiny_target):
    result = check(tiny_target, [[1, 2, 3]], 16, target_delay_ms=30.0, drafter_delay_ms=1.0,
                   acceptance=0.9, lookahead=2, sp_degree=3, samples=2000)
    assert result.lossless and 0.0 <= result.acceptance <= 1.0
    assert result.target_ms >= 30.0 and result.drafter_ms >= 1.0
    assert result.simulated.config.target_latency == result.target_ms
    assert result.to_json()["simulated"]["config"]["sp_degree"] == 3


@pytest.mark.slow  # a wall-clock comparison: kept out of the default suite
def test_dsi_overlaps_waiting_forwards(tiny_target):
    result = check(tiny_target, [[1, 2, 3]], 16, target_delay_ms=30.0, drafter_delay_ms=1.0,
                   acceptance=0.9, lookahead=2, sp_degree=3, samples=2000)
    assert result.lossless and result.dsi_ms < 0.8 * result.non_si_ms  # forwards that wait do overlap


@pytest.mark.parametrize("kwargs,message", [({"sp_degree": 0}, "SP degree"), ({"acceptance": 2.0}, "acceptance"),
                                            ({"prompts": []}, "prompt")])
def test_check_bad_input(tiny_target, kwargs, message):
    args = {"prompts": [[1, 2]], "max_new_tokens": 4, "target_delay_ms": 1.0, "drafter_delay_ms": 1.0,
            "acceptance": 0.5, "lookahead": 2, "sp_degree": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        check(tiny_target, **args)


def test_delayed_records_each_call(tiny_target):
    model = Delayed(tiny_target, delay_ms=2.0)
    model(input_ids=torch.tensor([[1, 2]]))
    assert len(model.durations) == 1 and model.durations[0] >= 2.0
