"""The hardware-aware optimizer: exact against brute force, sensible at the extremes."""

from __future__ import annotations

import numpy as np
import pytest

from sequoia.errors import ConfigError
from sequoia.optimizer import DraftLimits, choose, choose_tree, draft_latency_fn, evaluate, level_widths
from sequoia.profile import LatencyGrid, Profile
from sequoia.solver import chain, solve
from sequoia.tree import Tree

P = [0.55, 0.15, 0.06, 0.03]
LATENCY_MODELS = {
    "flat-then-steep": (lambda n: 30.0 + max(0.0, n - 16) * 2.0, lambda w: 2.0 + 0.1 * w),
    "linear": (lambda n: 20.0 + 1.5 * n, lambda w: 1.0 + 0.05 * w),
    "free-draft": (lambda n: 40.0 + 0.2 * n, lambda w: 0.0),
    "slow-draft": (lambda n: 30.0 + 0.5 * n, lambda w: 12.0 + 0.5 * w),
}


def test_level_widths_and_evaluate_literal():
    tree = Tree((-1, 0, 0, 1))
    assert level_widths(tree).tolist() == [1, 2, 1]
    cand = evaluate(tree, 2.0, target_ms=lambda n: 10.0 * n, draft_ms=lambda w: w)
    # draft runs on levels 0 (1 node) and 1 (2 nodes): 1 + 2 ms; target 4 nodes: 40 ms
    assert (cand.draft_ms, cand.target_ms, cand.step_ms, cand.ms_per_token) == (3.0, 40.0, 43.0, 21.5)


@pytest.mark.parametrize("name", list(LATENCY_MODELS))
def test_best_equals_brute_force_over_every_table_entry(name):
    target_ms, draft_ms = LATENCY_MODELS[name]
    max_size, max_depth = 40, 8
    table = solve(P, max_size, max_depth)
    brute = min(
        evaluate(table.tree(m, d), float(table.values[m, d]), target_ms, draft_ms).ms_per_token
        for m in range(1, max_size + 1)
        for d in range(max_depth + 1)
    )
    choice = choose_tree(P, target_ms, draft_ms, max_size, max_depth)
    assert choice.best.ms_per_token == pytest.approx(brute, rel=1e-12)
    times = [c.ms_per_token for c in choice.ranked]
    assert times == sorted(times) and len(choice.ranked) == 5
    assert choice.speedup == pytest.approx(target_ms(1.0) / brute)


def test_extremes():
    # Verifying many tokens is free and drafting is free: use the whole budget.
    big = choose_tree(P, lambda n: 50.0, lambda w: 0.0, 64, 10)
    assert big.best.size == 64
    # Every extra verified token is expensive: speculation does not pay, the root alone wins.
    none = choose_tree(P, lambda n: 10.0 * n, lambda w: 0.0, 64, 10)
    assert none.best.tree == Tree((-1,)) and none.speedup == pytest.approx(1.0)
    # A perfect first candidate and free verification: the deepest chain.
    chain_choice = choose_tree([1.0], lambda n: 30.0, lambda w: 0.0, 20, 6)
    assert chain_choice.best.tree == chain(6)


def _grid(model: str, tokens, ms) -> LatencyGrid:
    samples = np.asarray(ms, dtype=float)[None, :, None].repeat(3, axis=2)
    return LatencyGrid(model, (256,), tuple(tokens), samples)


def test_choose_reads_profiles_and_checks_budget():
    target = _grid("tiny", [1, 8, 32, 64], [30.0, 32.0, 40.0, 70.0])
    draft = _grid("tiny-draft", [1, 8, 16], [2.0, 2.5, 3.0])
    profile = Profile(target, {"name": "test"}, {}, draft)
    choice = choose(profile, P, prefix_len=256, max_depth=8)
    expected = choose_tree(
        P, lambda n: profile.latency(n, 256), lambda w: profile.draft_latency(min(w, 16), 256) * max(w / 16, 1),
        64, 8,
    )
    assert choice.best.tree == expected.best.tree
    assert choice.autoregressive_ms == pytest.approx(30.0)
    with pytest.raises(ConfigError, match="largest profiled"):
        choose(profile, P, max_size=128)


def test_card_costs_price_the_draft_and_a_profile_wins_over_them():
    target = _grid("tiny", [1, 8, 32, 64], [30.0, 32.0, 40.0, 70.0])
    profile = Profile(target, {"name": "test"}, {})
    level_ms = {1: 1.0, 4: 1.3, 16: 2.0}
    cost = draft_latency_fn(profile, None, 256, level_ms)
    assert cost(1) == pytest.approx(1.0) and cost(10) == pytest.approx(1.65)  # interpolated
    assert cost(32) == pytest.approx(4.0)  # past the widest: proportional
    assert draft_latency_fn(profile, None, 256)(8) == 0.0  # nothing known: free
    draft_profile = Profile(_grid("tiny-draft", [1, 8, 16], [2.0, 2.5, 3.0]), {"name": "test"}, {})
    assert draft_latency_fn(profile, draft_profile, 256, level_ms)(8) == pytest.approx(2.5)
    priced = choose(profile, P, prefix_len=256, max_depth=8, draft=DraftLimits(None, {1: 20.0, 16: 25.0}))
    free = choose(profile, P, prefix_len=256, max_depth=8)
    assert priced.best.depth < free.best.depth
    assert priced.best.draft_ms == pytest.approx(sum(20 + 5 * (w - 1) / 15 for w in level_widths(priced.best.tree)[:-1]))
    assert free.best.draft_ms == 0.0


def test_a_drafts_cost_per_step_is_paid_once_per_drafted_step():
    target = _grid("tiny", [1, 8, 32, 64], [30.0, 32.0, 40.0, 70.0])
    profile = Profile(target, {"name": "test"}, {})
    costs = {0: 4.0, 1: 1.0, 16: 2.0}  # width 0: the cost per step, not a level
    limits = DraftLimits(None, costs)
    assert limits.step_ms == 4.0 and DraftLimits().step_ms == 0.0
    assert draft_latency_fn(profile, None, 256, costs)(1) == pytest.approx(1.0)
    assert draft_latency_fn(profile, None, 256, {0: 4.0})(8) == 0.0  # no level measured: levels free
    flat, deep, root = Tree((-1, 0, 0)), Tree((-1, 0, 1, 2)), Tree((-1,))
    target_ms, level_ms = (lambda n: 30.0), draft_latency_fn(profile, None, 256, costs)
    assert evaluate(flat, 1.5, target_ms, level_ms, 4.0).draft_ms == pytest.approx(4.0 + 1.0)  # one level: the root
    assert evaluate(deep, 1.5, target_ms, level_ms, 4.0).draft_ms == pytest.approx(4.0 + 3.0)  # once, not per level
    assert evaluate(root, 1.0, target_ms, level_ms, 4.0).draft_ms == 0.0  # no draft runs
    assert evaluate(flat, 1.5, target_ms, level_ms, -5.0).draft_ms == 0.0  # never negative
    priced = choose(profile, P, prefix_len=256, max_depth=8, draft=limits)
    assert priced.best.draft_ms == pytest.approx(
        4.0 + sum(draft_latency_fn(profile, None, 256, costs)(w) for w in level_widths(priced.best.tree)[:-1]))


def test_a_per_step_gain_scales_expected_tokens_by_tree_size():
    limits = DraftLimits(per_step_gain=((16, 1.05), (32, 1.10), (64, 1.02)))
    gains = limits.gain(np.array([1, 2, 16, 32, 45, 64, 128]))
    assert gains[0] == 1.0 and gains[-1] == pytest.approx(1.02)  # one node: nothing to reshape; the last held
    assert gains[1] == pytest.approx(1.0 + 0.05 / 4)  # from 1 at one node to 1.05 at 16, in log size
    assert gains[2:4].tolist() == pytest.approx([1.05, 1.10])
    assert gains[4] == pytest.approx(1.10 + (1.02 - 1.10) * np.log2(45 / 32))  # log-size interpolation
    assert DraftLimits().gain(np.array([8, 64])).tolist() == [1.0, 1.0]


def test_per_step_gain_moves_the_choice_to_the_sizes_where_it_pays():
    target_ms, draft_ms = LATENCY_MODELS["linear"]
    static = choose_tree(P, target_ms, draft_ms, 40, 6)
    favoured = DraftLimits(per_step_gain=((4, 1.0), (32, 1.5)))
    shaped = choose_tree(P, target_ms, draft_ms, 40, 6, gain=favoured.gain)
    assert shaped.best.size > static.best.size
    expected = float(solve(P, 40, 6).values[shaped.best.size, shaped.best.depth]) * favoured.gain(np.array([shaped.best.size]))[0]
    assert shaped.best.expected_tokens == pytest.approx(expected)
    assert shaped.best.ms_per_token < static.best.ms_per_token
