"""Greedy losslessness of the decode engine on tiny models, stop conditions, stats, timing.

The reference is the target's own ``generate(do_sample=False)``: the engine must match it token
for token for every tree shape and every draft, through EOS, ``max_new_tokens`` and the
context length.
"""

from __future__ import annotations

import pytest
import torch

from sequoia.drafts import LMProposer, NgramProposer, NoDraft
from sequoia.drafts.base import Draft, DraftContext, Proposer
from sequoia.engine import STOP_CONTEXT, STOP_EOS, STOP_LENGTH, DecodeStats, Engine, StepTimer
from sequoia.drafts.base import StepResult
from sequoia.errors import ConfigError
from sequoia.models import tiny_llama
from sequoia.solver import solve
from sequoia.tree import Tree

OPTIMAL_64 = solve([0.55, 0.2, 0.1, 0.05, 0.03], max_size=64, max_depth=8).tree(64, 8)
TREES = {
    "single": Tree((-1,)),
    "chain": Tree((-1, 0, 1, 2, 3)),
    "3-ary": Tree.from_children_counts([3, 3, 3, 3]),
    "optimal-64": OPTIMAL_64,
}
PROMPTS = [[1, 5, 9, 3, 7], [42], list(range(10, 40, 3))]


def _hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def _engine_tokens(engine: Engine, prompt: list[int], max_new_tokens: int) -> list[int]:
    steps = list(engine.generate(torch.tensor(prompt), max_new_tokens))
    assert engine.stop is not None and steps[-1].stop == engine.stop
    return [t for s in steps for t in s.tokens]


def _proposer(name: str, target, draft):
    makers = {"none": NoDraft, "self": lambda: LMProposer(target), "other": lambda: LMProposer(draft)}
    return makers.get(name, NgramProposer)()


def test_optimal_tree_is_big_and_deep():
    assert OPTIMAL_64.size == 64 and OPTIMAL_64.depth >= 5 and OPTIMAL_64.num_children.max() >= 3


SHAPES_AND_DRAFTS = [("single", "none")] + [
    (tree, draft) for tree in TREES if tree != "single" for draft in ("self", "other", "ngram")
]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["five", "one", "ten"])
@pytest.mark.parametrize("tree_name, draft_name", SHAPES_AND_DRAFTS)
def test_greedy_matches_generate(tiny_target, tiny_draft, tree_name, draft_name, prompt):
    tree = TREES[tree_name]
    proposer = _proposer(draft_name, tiny_target, tiny_draft)
    engine = Engine(tiny_target, proposer, tree)
    assert _engine_tokens(engine, prompt, 24) == _hf_greedy(tiny_target, prompt, 24)
    assert engine.stop == STOP_LENGTH
    if draft_name == "self" and tree.size > 1:  # the target as its own draft accepts every level
        assert engine.stats.tokens_per_step > min(tree.depth + 1, 24) * 0.7


@pytest.mark.parametrize("tree_name", ["chain", "optimal-64"])
def test_greedy_stops_after_eos_like_generate(tiny_target, tiny_draft, tree_name):
    prompt = PROMPTS[0]
    free = _hf_greedy(tiny_target, prompt, 30)
    eos = free[11]  # a token the target emits mid-way: generation must end right after it
    expected = _hf_greedy(tiny_target, prompt, 30, eos=eos)
    assert expected[-1] == eos and len(expected) <= 12
    engine = Engine(tiny_target, LMProposer(tiny_target), TREES[tree_name], eos_token_ids=[eos])
    assert _engine_tokens(engine, prompt, 30) == expected
    assert engine.stop == STOP_EOS


def test_greedy_stops_at_the_context_length(tiny_draft):
    target = tiny_llama(seed=0, max_positions=40)
    prompt = list(range(1, 31))  # 30 tokens: room for 10 more
    engine = Engine(target, LMProposer(tiny_draft), OPTIMAL_64)
    tokens = _engine_tokens(engine, prompt, 100)
    assert engine.stop == STOP_CONTEXT and len(tokens) == 10
    assert tokens == _hf_greedy(target, prompt, 10)
    assert max(len(t) for t in engine._trees.values()) < OPTIMAL_64.size  # cut near the end


def test_engine_is_reusable_across_prompts(tiny_target, tiny_draft):
    engine = Engine(tiny_target, LMProposer(tiny_draft), TREES["3-ary"])
    for prompt in PROMPTS + PROMPTS[:1]:
        assert _engine_tokens(engine, prompt, 12) == _hf_greedy(tiny_target, prompt, 12)


@pytest.mark.parametrize(
    "prompt, max_new, message",
    [([], 5, "empty"), (list(range(256)), 5, "context"), ([1, 2], 0, "at least 1")],
)
def test_bad_generation_requests(tiny_target, prompt, max_new, message):
    engine = Engine(tiny_target, NoDraft(), TREES["single"])
    with pytest.raises(ConfigError, match=message):
        engine.start(torch.tensor(prompt, dtype=torch.long), max_new)


def test_unknown_verifier_is_a_config_error(tiny_target):
    with pytest.raises(ConfigError, match="verifier"):
        Engine(tiny_target, NoDraft(), TREES["single"], verifier="magic")


def test_stats_and_timer(tiny_target):
    timer = StepTimer()
    engine = Engine(tiny_target, LMProposer(tiny_target), TREES["chain"], timer=timer)
    _engine_tokens(engine, PROMPTS[0], 20)
    stats = engine.stats
    assert stats.steps == 4 and stats.emitted == 20 and stats.accept_hist == [0, 0, 0, 0, 4]
    assert stats.tokens_per_step == 5.0 and stats.acceptance_by_depth() == [1.0] * 4
    parts = timer.breakdown()
    assert set(parts) == {"draft", "target", "verify", "cache", "other", "step"}
    assert timer.steps == 4 and sum(v for k, v in parts.items() if k != "step") == pytest.approx(parts["step"])


def test_stats_count_tries_and_the_bonus():
    tree = Tree.from_choices([[0], [1], [0, 0]])
    stats = DecodeStats()

    def observe(nodes):
        stats.observe_step(_step(tree, nodes))

    observe((0,))  # both root children rejected: depth 1 tried, nothing accepted
    observe((0, 1, 3))  # down to the leaf: depths 1 and 2 tried and accepted
    observe((0, 2))  # node 2 is a leaf: depth 1 accepted, depth 2 not tried
    assert stats.accept_hist == [1, 1, 1] and stats.depth_tried == [3, 1] and stats.depth_accepted == [2, 1]
    assert stats.tokens_per_step == 2.0 and stats.acceptance_by_depth() == [2 / 3, 1.0]


def _step(tree, nodes):
    return StepResult(tuple(range(len(nodes))), nodes, tree, torch.zeros(tree.size, dtype=torch.long), None, None)


class _Recorder(Proposer):
    """An n-gram draft that asks for the target's hidden states and records what it gets."""

    needs_hidden_states = True

    def __init__(self):
        self.inner, self.seen = NgramProposer(), []

    def reset(self):
        self.inner.reset()
        self.seen.clear()

    def propose(self, ctx: DraftContext, tree: Tree) -> Draft:
        self.seen.append((ctx.tokens.clone(), ctx.hidden_states))
        return self.inner.propose(ctx, tree)


@torch.no_grad()
def test_hidden_states_of_the_processed_tokens_reach_the_proposer(tiny_target):
    recorder = _Recorder()
    engine = Engine(tiny_target, recorder, TREES["3-ary"])
    steps = _engine_tokens(engine, PROMPTS[2], 15)
    full = torch.tensor(PROMPTS[2] + steps)
    reference = tiny_target(input_ids=full[None], output_hidden_states=True).hidden_states[-1][0]
    assert recorder.seen[0][1].shape[0] == len(PROMPTS[2]) - 1  # the prefill: all but the root
    for tokens, hidden in recorder.seen:
        length = len(tokens)
        torch.testing.assert_close(hidden, reference[length - 1 - len(hidden) : length - 1], atol=1e-5, rtol=1e-5)
