"""The MLP speculator proposer: candidates follow the teacher-forced unroll along each path,
BFS/rank order, greedy losslessness and sampling through the engine, the depth limit."""

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

from sequoia.drafts.mlp import MLPProposer, MLPSpeculator
from sequoia.errors import ConfigError
from sequoia.tree import Tree


@pytest.fixture(scope="module")
def draft(tiny_target) -> MLPSpeculator:
    return random_draft("mlp", tiny_target)


def test_state_weights_keep_the_mix_at_unit_scale(draft):
    assert draft.state_weight == pytest.approx(0.5 ** (0.5 / 3))
    assert draft.state_weight**2 + draft.token_weight**2 == pytest.approx(1.0)
    assert isinstance(draft.proposer(), MLPProposer) and draft.proposer().needs_hidden_states


@torch.no_grad()
def test_head_k_reads_head_k_minus_1_state_and_the_path_token(draft):
    tokens = torch.tensor([[3, 7, 11, 2]])
    hidden = torch.randn(1, 4, draft.config.hidden_size)
    logits = draft.unroll(tokens, hidden)
    nothing = torch.zeros(1, draft.config.hidden_size)  # no state before position 0
    state = draft.step(0, nothing, tokens[:, 0])
    first = draft.out(state)
    assert torch.allclose(first, logits[0][:, 0], atol=1e-5)
    assert torch.allclose(draft.out(draft.step(1, state, tokens[:, 1])), logits[1][:, 1], atol=1e-5)  # root 0, path 7
    assert torch.allclose(draft.out(draft.step(1, nothing, tokens[:, 0])), logits[1][:, 0], atol=1e-5)


def test_tree_children_follow_the_unroll(draft, tiny_target):
    check_tree_matches_unroll(draft, tiny_target)


@pytest.mark.parametrize("prompt", [[1, 5, 9, 3, 7], [42]], ids=["five", "one"])
def test_greedy_decoding_is_lossless(draft, tiny_target, prompt):
    check_greedy_lossless(draft, tiny_target, prompt)


@pytest.mark.parametrize("verifier", ["sequoia", "specinfer"])
def test_stochastic_drafts_and_decoding(draft, tiny_target, verifier):
    check_stochastic(draft, tiny_target, verifier)


def test_a_tree_deeper_than_the_heads_is_refused(draft, tiny_target):
    ctx = context(tiny_target, torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match="--max-depth 3"):
        draft.proposer().propose(ctx, Tree((-1, 0, 1, 2, 3)))
    assert len(draft.proposer().propose(ctx, Tree((-1,))).tokens) == 1  # a bare root is fine
    random_draft("mlp", tiny_target, heads=1).proposer().warmup()  # warm-up stays within one head
