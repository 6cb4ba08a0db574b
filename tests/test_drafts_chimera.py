"""The Chimera draft: the unroll's key mask, incremental context cache, and the proposer
checks shared with the MLP speculator (unroll oracle, losslessness, sampling)."""

from __future__ import annotations

import pytest
import torch
from trained_draft_helpers import (
    check_greedy_lossless,
    check_stochastic,
    check_tree_matches_unroll,
    context,
    random_draft,
)

from sequoia.drafts.base import DraftContext
from sequoia.drafts.chimera import ChimeraDraft, attend, unrolled_attend
from sequoia.tree import Tree


@pytest.fixture(scope="module")
def draft(tiny_target) -> ChimeraDraft:
    return random_draft("chimera", tiny_target)


def unroll_mask(length: int, level: int) -> torch.Tensor:  # [T, (level + 1) T] bool
    """Keys of level ``level`` at position ``i`` (root ``i - level``): the real positions
    ``<= i - level``, then, for each deeper level ``t``, the node at ``i - level + t``."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return torch.cat([j <= i - level] + [j == i - level + t for t in range(1, level + 1)], dim=1)


def test_unroll_mask_level_2():
    # position i at level 2 (root i - 2): real keys <= i - 2, then the depth-1 node (i - 1)
    # and the depth-2 node (i itself), each from its own level's block
    assert unroll_mask(4, 2).int().tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],
        [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
    ]


@pytest.mark.parametrize("level", [0, 1, 3])
def test_unrolled_attention_is_attention_under_the_unroll_mask(level):
    gen = torch.Generator().manual_seed(level)
    q, *kv = (torch.randn(2, 6, 3, 8, generator=gen) for _ in range(1 + 2 * (level + 1)))
    keys, values = kv[: level + 1], kv[level + 1 :]
    expected = attend(q, torch.cat(keys, 1), torch.cat(values, 1), unroll_mask(6, level))
    assert torch.allclose(unrolled_attend(q, keys, values), expected, atol=1e-5)


def test_a_fresh_layer_starts_as_the_identity(draft):
    fresh, width = ChimeraDraft(draft.config, draft.vocab), draft.config.hidden_size
    x = torch.randn(2, 5, width)
    attended = torch.randn(2, 5, fresh.encoder.heads, width // fresh.encoder.heads)
    assert torch.equal(fresh.encoder.finish(x, attended), x)
    assert torch.equal(fresh.heads[0](x), x)


def test_the_folded_input_layer_is_the_two_it_replaces(draft):
    prev2, prev1, tokens = torch.tensor([-1, 4, 9]), torch.tensor([3, 7, 11]), torch.tensor([5, 6, 2])
    state = torch.randn(3, draft.config.hidden_size)
    proposer = draft.proposer()
    with torch.no_grad():
        expected = draft.encoder_input(prev2, prev1, tokens, state)
        assert torch.allclose(proposer._encoder_input(prev2, prev1, tokens, state), expected, atol=1e-4)


def test_the_context_cache_grows_incrementally(draft, tiny_target):
    """Proposing step after step, the cache fed only the hidden states new since the last
    proposal (as the engine gives them), equals a fresh proposer seeing the whole context."""
    tokens = torch.tensor([5, 9, 2, 33, 17, 4, 60, 8, 21, 13])
    tree = Tree.from_children_counts([2, 2, 1])
    running, previous = draft.proposer(), None
    for end in (3, 4, 7, 10):
        full = context(tiny_target, tokens[:end])
        new_rows = full.hidden_states if previous is None else full.hidden_states[previous - 1 :]
        step = DraftContext(full.tokens, full.sampling, full.generator, hidden_states=new_rows)
        assert running.propose(step, tree).tokens.tolist() == draft.proposer().propose(full, tree).tokens.tolist()
        previous = end


def test_tree_children_follow_the_unroll(draft, tiny_target):
    check_tree_matches_unroll(draft, tiny_target)


@pytest.mark.parametrize("prompt", [[1, 5, 9, 3, 7], [42]], ids=["five", "one"])
def test_greedy_decoding_is_lossless(draft, tiny_target, prompt):
    check_greedy_lossless(draft, tiny_target, prompt)


@pytest.mark.parametrize("verifier", ["sequoia", "specinfer"])
def test_stochastic_drafts_and_decoding(draft, tiny_target, verifier):
    check_stochastic(draft, tiny_target, verifier)
