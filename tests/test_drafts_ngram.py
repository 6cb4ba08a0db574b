"""Prompt-lookup draft: literal cases with hand-computed candidates (tie-breaks commented)."""

from __future__ import annotations

import pytest
import torch

from sequoia.drafts import NgramProposer
from sequoia.drafts.base import DraftContext
from sequoia.errors import ConfigError
from sequoia.sampling import SamplingConfig
from sequoia.tree import Tree

STAR3 = Tree((-1, 0, 0, 0))


def _propose(proposer: NgramProposer, context: list[int], tree: Tree) -> list[int]:
    ctx = DraftContext(torch.tensor(context), SamplingConfig(), torch.Generator())
    draft = proposer.propose(ctx, tree)
    assert draft.probs is None  # deterministic: a point mass per candidate
    return draft.tokens.tolist()


def test_docstring_example():
    # 1 2 was followed by 3 then 4 (one each; 4 more recent); then the counts: 2 and 1 three
    # times each, 2 more recent, 4 and 3 already taken
    assert _propose(NgramProposer(max_ngram=2), [1, 2, 3, 1, 2, 4, 1, 2], STAR3) == [2, 4, 3, 2]


def test_longest_suffix_beats_frequency():
    # after "7 8": 9 once; after "8" alone: 5 three times. The 2-gram match ranks first.
    context = [8, 5, 8, 5, 8, 5, 7, 8, 9, 7, 8]
    assert _propose(NgramProposer(max_ngram=2), context, Tree((-1, 0, 0))) == [8, 9, 5]


def test_children_follow_their_own_path():
    # a chain continues the periodic text: each level's suffix includes the drafted tokens
    assert _propose(NgramProposer(), [1, 2, 3, 1, 2, 3, 1], Tree((-1, 0, 1, 2))) == [1, 2, 3, 1]


def test_pads_with_unseen_ids_when_the_text_has_too_few_tokens():
    assert _propose(NgramProposer(), [5, 5, 5], STAR3) == [5, 5, 0, 1]


def test_incremental_index_equals_a_fresh_one():
    text = torch.randint(0, 6, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    growing = NgramProposer()
    for end in (10, 11, 25, 60):
        assert _propose(growing, text[:end], tree) == _propose(NgramProposer(), text[:end], tree)


def test_reset_forgets_the_previous_prompt():
    proposer = NgramProposer()
    _propose(proposer, [3, 4, 3, 4, 3], STAR3)
    proposer.reset()
    assert _propose(proposer, [9], STAR3) == [9, 9, 0, 1]


def test_single_node_tree_is_just_the_root():
    assert _propose(NgramProposer(), [4, 2], Tree((-1,))) == [2]


def test_bad_ngram_length():
    with pytest.raises(ConfigError, match="n-gram"):
        NgramProposer(max_ngram=0)
