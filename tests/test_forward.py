"""The tree oracle: one tree forward equals sequential decoding of every root-to-node path."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from sequoia.forward import cache_kwargs, keep_path, tree_attention_mask, tree_forward
from sequoia.models import tiny_llama
from sequoia.tree import Tree

TREES = {
    "single": Tree((-1,)),
    "chain": Tree((-1, 0, 1, 2)),
    "2x2": Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]]),
    "ragged": Tree.from_choices([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]),
}


def _prefill(model, prefix):
    cache = DynamicCache()
    model(input_ids=prefix[None], use_cache=True, **cache_kwargs(model, cache))
    return cache


def test_mask_literal_chain_over_a_prefix():
    chain = tree_attention_mask(TREES["chain"].ancestor_mask, prefix_len=2, dtype=torch.float32)
    allowed = (chain[0, 0] == 0).int()
    assert allowed.tolist() == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert chain.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(TREES))
@torch.no_grad()
def test_tree_logits_equal_sequential_paths(impl, name):
    tree = TREES[name]
    model = tiny_llama(attn_implementation=impl)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 64, (9,), generator=gen)
    tokens = torch.randint(0, 64, (tree.size,), generator=gen)
    cache = _prefill(model, prefix)
    logits = tree_forward(model, tokens, tree, cache, prefix_len=9).logits[0]
    assert cache.get_seq_length() == 9 + tree.size
    for node in range(tree.size):
        seq = torch.cat([prefix, tokens[tree.path_to(node)]])
        expected = model(input_ids=seq[None]).logits[0, -1]
        torch.testing.assert_close(logits[node], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("leaf", [0, 3, 4, 6])
@torch.no_grad()
def test_keep_path_equals_cache_of_sequential_decoding(leaf):
    tree = TREES["ragged"]
    model = tiny_llama()
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 64, (5,), generator=gen)
    tokens = torch.randint(0, 64, (tree.size,), generator=gen)
    cache = _prefill(model, prefix)
    tree_forward(model, tokens, tree, cache, prefix_len=5)
    path = tree.path_to(leaf)
    keep_path(cache, 5, path)

    reference = _prefill(model, torch.cat([prefix, tokens[path]]))
    assert cache.get_seq_length() == reference.get_seq_length() == 5 + len(path)
    for got, want in zip(cache.layers, reference.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
