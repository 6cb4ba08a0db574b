"""Early-exit draft: the target's first layers, sharing its weights, as a lossless draft."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sequoia.drafts import DraftSpec, LMProposer
from sequoia.drafts.early_exit import early_exit_model, parse_spec
from sequoia.engine import Engine
from sequoia.errors import ConfigError
from sequoia.models import tiny_llama
from sequoia.tree import Tree


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=3, num_layers=4)


@torch.no_grad()
def test_logits_are_the_targets_layer_k_read_out(target):
    draft = early_exit_model(target, 2)
    x = torch.tensor([[5, 9, 2, 7, 1]])
    hidden = target(x, output_hidden_states=True).hidden_states[2]  # after layer 2, pre-norm
    expected = target.lm_head(target.model.norm(hidden))
    torch.testing.assert_close(draft(x).logits, expected)
    shared = {id(p) for p in target.parameters()}
    assert all(id(p) in shared for p in draft.parameters())  # no weight is copied


@torch.no_grad()
def test_greedy_engine_and_hf_assisted_match_target_generate(target):
    draft = early_exit_model(target, 1)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    expected = target.generate(prompt[None], max_new_tokens=20, do_sample=False)[0, 5:].tolist()
    tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    engine = Engine(target, LMProposer(draft), tree)
    got = [t for step in engine.generate(prompt, 20) for t in step.tokens]
    assert got == expected
    assisted = target.generate(prompt[None], max_new_tokens=20, do_sample=False, assistant_model=draft)
    assert assisted[0, 5:].tolist() == expected


def test_specs_and_bad_input(target):
    assert parse_spec("early-exit:3") == 3 and parse_spec("ngram") is None
    proposer = DraftSpec.resolve("early-exit:2", "tiny").proposer(SimpleNamespace(model=target, tokenizer=None))
    assert isinstance(proposer, LMProposer) and len(proposer.model.model.layers) == 2
    with pytest.raises(ConfigError, match="early-exit:N"):
        parse_spec("early-exit:x")
    with pytest.raises(ConfigError, match="1..3"):
        early_exit_model(target, 4)
    with pytest.raises(ConfigError, match="Llama-style"):
        early_exit_model(torch.nn.Linear(2, 2), 1)
