"""LM draft: level-by-level growth equals sequential decoding of every node's path, and its
cache after ``observe`` equals prefilling the accepted tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from sequoia.drafts import DraftSpec, LMProposer, NgramProposer, NoDraft
from sequoia.drafts.base import DraftContext
from sequoia.drafts.lm import check_same_vocabulary
from sequoia.drafts.base import StepResult
from sequoia.errors import ModelError
from sequoia.forward import cache_kwargs
from sequoia.models import tiny_llama
from sequoia.sampling import SamplingConfig, logits_to_probs
from sequoia.tree import Tree

RAGGED = Tree.from_choices([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]])


@torch.no_grad()
def _path_logits(model, context: list[int], tokens: list[int], tree: Tree, node: int) -> torch.Tensor:
    seq = torch.tensor(context + [tokens[i] for i in tree.path_to(node)[1:]])
    return model(input_ids=seq[None]).logits[0, -1]


def _ctx(tokens: list[int], sampling=SamplingConfig(), with_replacement=False, seed=0) -> DraftContext:
    return DraftContext(torch.tensor(tokens), sampling, torch.Generator().manual_seed(seed), with_replacement)


def _accept(tree: Tree, nodes: tuple[int, ...], tokens: torch.Tensor) -> StepResult:
    return StepResult((), nodes, tree, tokens, None, None)


def test_greedy_children_are_the_top_tokens_after_each_path(tiny_draft):
    proposer = LMProposer(tiny_draft)
    context = [3, 1, 4, 1, 5]
    tokens = proposer.propose(_ctx(context), RAGGED).tokens.tolist()
    assert tokens[0] == context[-1]
    for node, kids in enumerate(RAGGED.children):
        if kids:
            top = _path_logits(tiny_draft, context, tokens, RAGGED, node).topk(len(kids)).indices
            assert [tokens[k] for k in kids] == top.tolist()


@pytest.mark.parametrize("with_replacement", [False, True])
def test_stochastic_children_and_q_after_each_path(tiny_draft, with_replacement):
    proposer = LMProposer(tiny_draft)
    context, sampling = [7, 2, 9], SamplingConfig(1.5, top_p=0.95)
    draft = proposer.propose(_ctx(context, sampling, with_replacement), RAGGED)
    tokens = draft.tokens.tolist()
    for node, kids in enumerate(RAGGED.children):
        if not kids:
            continue
        q = logits_to_probs(_path_logits(tiny_draft, context, tokens, RAGGED, node), sampling)
        torch.testing.assert_close(draft.probs[node], q, atol=1e-5, rtol=1e-4)
        assert all(q[tokens[k]] > 0 for k in kids)
        if not with_replacement:
            assert len({tokens[k] for k in kids}) == len(kids)


@torch.no_grad()
def test_observe_keeps_the_accepted_path_and_the_next_proposal_continues(tiny_draft):
    proposer = LMProposer(tiny_draft)
    context = [3, 1, 4, 1, 5]
    draft = proposer.propose(_ctx(context), RAGGED)
    accepted = (0, 1, 4, 7)  # down to a leaf at depth 3: the draft never fed node 7
    proposer.observe(_accept(RAGGED, accepted, draft.tokens))
    kept = context + draft.tokens[list(accepted[1:])].tolist()  # node 7's token is pending
    reference = DynamicCache()
    tiny_draft(input_ids=torch.tensor([kept[:-1]]), **cache_kwargs(tiny_draft, reference))
    assert proposer._cache.get_seq_length() == len(kept) - 1
    for got, want in zip(proposer._cache.layers, reference.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
    # the next proposal feeds node 7's token and a new root, and is again exact
    context = kept + [2]
    tokens = proposer.propose(_ctx(context), RAGGED).tokens.tolist()
    for node in (0, 1, 4):
        kids = RAGGED.children[node]
        top = _path_logits(tiny_draft, context, tokens, RAGGED, node).topk(len(kids)).indices
        assert [tokens[k] for k in kids] == top.tolist()


def test_vocabulary_mismatch_is_a_model_error(tiny_target):
    with pytest.raises(ModelError, match="vocabulary"):
        check_same_vocabulary(tiny_target, tiny_llama(vocab_size=32))


def test_make_proposer_builtins(tiny_target):
    assert isinstance(DraftSpec.resolve("none", "tiny").proposer(tiny_target), NoDraft)
    assert isinstance(DraftSpec.resolve("ngram", "tiny").proposer(tiny_target), NgramProposer)
