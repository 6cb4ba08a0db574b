"""Planning for this device: the (dtype, tree) choice with plain decoding as its floor, the
acceptance to plan with, and the Replanner that corrects a mis-measured plan while decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sequoia.draft_costs import DraftCosts
from sequoia.drafts import DraftSpec, LMProposer
from sequoia.engine import Engine
from sequoia.optimizer import PLAIN, DraftLimits, choose_plan, choose_tree, evaluate, samples_for
from sequoia.planning import DevicePlan, Replanner, default_acceptance
from sequoia.profile import LatencyGrid, Profile
from sequoia.profile_cache import CachedProfile
from sequoia.sampling import SamplingConfig
from sequoia.solver import expected_tokens
from sequoia.tree import Tree

P = [0.6, 0.15, 0.05]


def _profile(medians, tokens=(1, 2, 4, 8, 16, 32), dtype="float32") -> Profile:
    return Profile(LatencyGrid("m", (256,), tuple(tokens), samples_for(medians)), {"dtype": dtype}, {})


def test_a_device_where_two_tokens_cost_twice_one_decodes_plainly_and_says_why():
    plan = choose_plan({"float32": _profile([30.0 * n for n in (1, 2, 4, 8, 16, 32)])}, P)
    assert plan.tree == PLAIN and plan.plain and plan.speedup == pytest.approx(1.0)
    assert plan.reason.startswith("plain decoding: verifying 2 tokens costs 2.00x one token here in float32")
    assert "\n" not in plan.reason and "p1 = 0.60" in plan.reason


def test_a_small_gain_is_not_worth_a_tree():
    # 2 tokens cost 1.57x one: the best tree (one draft token, 1.6 tokens/step) gains 1.02x, under 1.05x
    flat = _profile([30.0, 47.0, 120.0, 240.0, 480.0, 960.0])
    best = choose_plan({"float32": flat}, P, margin=1.0)
    assert best.tree.size > 1 and 1.0 < best.speedup < 1.05
    plan = choose_plan({"float32": flat}, P)
    assert plan.plain and "would reach only" in plan.reason and f"{best.speedup:.2f}x" in plan.reason


def test_the_dtype_with_the_lower_predicted_time_per_token_wins():
    steep_fast = _profile([30.0, 45.0, 80.0, 150.0, 290.0, 570.0], dtype="float32")  # best plain decoding
    flat_slow = _profile([40.0, 41.0, 42.0, 44.0, 48.0, 60.0], dtype="bfloat16")  # best for trees
    plan = choose_plan({"float32": steep_fast, "bfloat16": flat_slow}, P)
    assert (plan.dtype, plan.plain_dtype, plan.plain_ms) == ("bfloat16", "float32", 30.0)
    assert plan.tree.size > 4 and plan.predicted_ms_per_token == plan.choices["bfloat16"].best.ms_per_token
    assert plan.predicted_ms_per_token < plan.choices["float32"].best.ms_per_token
    assert plan.speedup == pytest.approx(30.0 / plan.predicted_ms_per_token)
    # with a draft that costs 25 ms per level in bfloat16, nothing pays: plain float32
    slow_draft = {"bfloat16": DraftLimits(None, {1: 25.0, 16: 25.0}), "float32": DraftLimits(None, {1: 25.0})}
    plain = choose_plan({"float32": steep_fast, "bfloat16": flat_slow}, P, drafts=slow_draft)
    assert (plain.dtype, plain.tree) == ("float32", PLAIN) and "a draft level 25.0 ms" in plain.reason
    assert "would reach only" in plain.reason


def _sample_path(tree: Tree, p, rng) -> list[int]:
    path, node = [0], 0
    while tree.children[node]:
        u, mass, taken = rng.random(), 0.0, None
        for rank, child in enumerate(tree.children[node]):
            mass += p[rank] if rank < len(p) else 0.0
            if u < mass:
                taken = child
                break
        if taken is None:
            break
        path.append(taken)
        node = taken
    return path


def _decode(replanner: Replanner, true_target, draft_ms, steps: int, seed: int = 0) -> Tree:
    """Feed ``steps`` simulated steps (acceptance P, true latencies) to the replanner."""
    rng, tree = np.random.default_rng(seed), replanner.tree
    for _ in range(steps):
        draft = sum(draft_ms(float(w)) for w in np.bincount(tree.depths)[:-1])
        target = true_target(float(tree.size))
        new = replanner.observe(tree, _sample_path(tree, P, rng), {"step": (draft + target) / 1e3, "draft": draft / 1e3})
        tree = new or tree
    return tree


@pytest.mark.parametrize("slope, right_size", [(1.0, 1), (0.35, 2), (None, None)])
def test_replanning_a_mis_measured_profile_converges_to_the_right_tree(slope, right_size):
    """The profile said verifying 32 tokens costs about what 1 does; on the real device each
    extra token costs ``slope`` times one more. The replanner notices it decodes slower than
    plain decoding, measures plain steps, and re-plans to the tree that is best on the truth."""
    profiled = lambda n: 30.0 + 0.2 * n
    true = profiled if slope is None else (lambda n: 30.0 * (1 + slope * (n - 1)))
    draft_ms = lambda w: 1.0
    first = choose_tree(P, profiled, draft_ms, 32, 8).best.tree
    replanner = Replanner(first, P, profiled, draft_ms, max_size=32, max_depth=8)
    final = _decode(replanner, true, draft_ms, 200)
    right = choose_tree(P, true, draft_ms, 32, 8).best
    if right_size is None:  # the profile was right: nothing to correct
        assert final == first and replanner.events == []
        return
    assert first.size > 16 and final.size < first.size
    if right_size == 1:
        assert final == PLAIN
    else:  # on the true latencies the tree it settled on is as good as the best one
        settled = evaluate(final, expected_tokens(final, P), true, draft_ms).ms_per_token
        assert final.size == right_size and settled == pytest.approx(right.ms_per_token, rel=0.02)
    assert any("plain decoding measured" in e for e in replanner.events)


def test_the_replanner_learns_acceptance_from_accepted_ranks():
    tree = Tree.from_children_counts([2, 1, 1])  # root: 2 children; node 1: 1 child
    replanner = Replanner(tree, [0.5, 0.1], lambda n: 10.0, lambda w: 0.0, 8, 4, prior_nodes=0.0)
    replanner.observe(tree, (0, 1, 3), {"step": 0.01})  # rank 0 at the root, then rank 0 at node 1
    replanner.observe(tree, (0, 2), {"step": 0.01})  # rank 1 at the root; node 2's child rejected
    # root: tried twice at rank 0 (accepted once), twice at rank 1 (accepted once);
    # depth 1: node 1's only child accepted, node 2's rejected
    np.testing.assert_allclose(replanner.acceptance(), [(1 + 1) / 4, 1 / 2])


def test_engine_swaps_its_tree_between_steps_and_stays_lossless(tiny_target, tiny_draft):
    """A replanner that asks for a new tree every few steps: the output is still the target's
    greedy output token for token."""
    prompt = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    reference = tiny_target.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), do_sample=False,
                                     max_new_tokens=40, pad_token_id=0)[0, len(prompt):].tolist()
    trees = [Tree.from_children_counts([3, 1, 1, 1]), Tree((-1,)), Tree.from_children_counts([1, 1, 1, 1])]

    class Cycling:
        def __init__(self):
            self.calls, self.events = 0, []

        def observe(self, tree, accepted_nodes, seconds):
            assert {"step", "draft", "target"} <= set(seconds)
            self.calls += 1
            return trees[self.calls % 3] if self.calls % 2 == 0 else None

    engine = Engine(tiny_target, LMProposer(tiny_draft), trees[0], SamplingConfig(), replanner=Cycling())
    tokens = [t for step in engine.generate(prompt, 40) for t in step.tokens]
    assert tokens == reference and engine.replanner.calls >= 5


def test_default_acceptance_comes_from_the_card_for_the_sampling_setting():
    chimera = DraftSpec.resolve("smollm2-135m-chimera", "smollm2-135m")
    sampled, source = default_acceptance(chimera, SamplingConfig(1.0))
    assert sampled.shape[0] == 4 and "T=1" in source  # by depth, as measured at T=1
    greedy, source = default_acceptance(chimera, SamplingConfig())
    levels = chimera.card["evaluation"]["levels"]
    assert greedy.shape == (4, 4) and greedy[0, 0] == levels[0]["top1"] and "top-1/top-4" in source
    np.testing.assert_allclose(greedy.sum(1), [lv["top4"] for lv in levels])
    vector, source = default_acceptance(DraftSpec.resolve("ngram", "smollm2-135m"), SamplingConfig())
    assert vector.ndim == 1 and source == "a default for ngram drafts"


def test_a_burst_of_other_work_does_not_make_it_leave_a_good_plan():
    """The first window runs 5x slower (another process had the CPU), then the burst ends while
    plain decoding is measured: the tree, measured again right after, is still the better plan."""
    profiled = lambda n: 30.0 + 0.2 * n
    draft_ms = lambda w: 1.0
    first = choose_tree(P, profiled, draft_ms, 32, 8).best.tree
    replanner = Replanner(first, P, profiled, draft_ms, max_size=32, max_depth=8)
    rng, tree = np.random.default_rng(0), first
    for step in range(120):
        burst = 5.0 if step < 9 else 1.0
        draft = sum(draft_ms(float(w)) for w in np.bincount(tree.depths)[:-1])
        target = profiled(float(tree.size)) * burst
        seconds = {"step": (draft + target) / 1e3, "draft": draft / 1e3}
        tree = replanner.observe(tree, _sample_path(tree, P, rng), seconds) or tree
    assert any("plain decoding measured" in e for e in replanner.events)  # it did look
    best = choose_tree(P, profiled, draft_ms, 32, 8).best.ms_per_token
    kept = evaluate(tree, expected_tokens(tree, P), profiled, draft_ms).ms_per_token
    assert tree.size > 16 and kept == pytest.approx(best, rel=0.02)  # still a tree as good as the plan


def test_a_per_step_gain_reaches_the_plan_and_its_replanner():
    flat = _profile([30.0, 30.5, 31.0, 32.0, 34.0, 40.0])
    static = choose_plan({"float32": flat}, P)
    gain = ((2, 1.0), (32, 1.6))  # per-step trees pay more the larger they are
    shaped = choose_plan({"float32": flat}, P, drafts={"float32": DraftLimits(per_step_gain=gain)})
    assert shaped.tree.size > static.tree.size and shaped.predicted_ms_per_token < static.predicted_ms_per_token
    device_plan = DevicePlan(shaped, {"float32": CachedProfile(flat, Path("p.json"), False)},
                             {"float32": DraftCosts()}, np.asarray(P), "test", 256, 8, gain)
    replanner = device_plan.replanner()
    assert replanner is not None and replanner.gain is not None
    assert replanner.gain(np.array([32]))[0] == pytest.approx(1.6)


def test_after_falling_to_plain_decoding_during_a_burst_it_tries_the_tree_again():
    """For the first 40 steps multi-token forwards run 3x slower (another process had the CPU
    while the tree ran, not while plain decoding was measured): the plan falls to plain decoding.
    The burst passes; every ``retry`` steps the tree is measured again, and the plan returns."""
    profiled = lambda n: 30.0 + 0.2 * n
    draft_ms = lambda w: 1.0
    first = choose_tree(P, profiled, draft_ms, 32, 8).best.tree
    replanner = Replanner(first, P, profiled, draft_ms, max_size=32, max_depth=8, retry=32)
    rng, tree, sizes = np.random.default_rng(0), first, []
    for step in range(200):
        burst = 3.0 if step < 40 and tree.size > 1 else 1.0
        draft = sum(draft_ms(float(w)) for w in np.bincount(tree.depths)[:-1])
        seconds = {"step": (draft + profiled(float(tree.size)) * burst) / 1e3, "draft": draft / 1e3}
        tree = replanner.observe(tree, _sample_path(tree, P, rng), seconds) or tree
        sizes.append(tree.size)
    assert 1 in sizes[:60]  # it did fall to plain decoding during the burst
    assert any("measured again" in e for e in replanner.events)
    best = choose_tree(P, profiled, draft_ms, 32, 8).best.ms_per_token
    assert tree.size > 16 and evaluate(tree, expected_tokens(tree, P), profiled, draft_ms).ms_per_token == pytest.approx(best, rel=0.02)
