"""Packed bfloat16 linears: same outputs as ``nn.Linear``, only where they apply, shared once."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sequoia import prepack
from sequoia.drafts import NgramProposer
from sequoia.engine import Engine
from sequoia.models import tiny_llama
from sequoia.kernel_tuning import fast_copy
from sequoia.prepack import PackedLinear, can_prepack, prepack_linears
from sequoia.tree import Tree

needs_onednn = pytest.mark.skipif(not can_prepack(), reason="this torch has no oneDNN bfloat16 linear")


def _bf16_pair(seed: int = 0):
    plain = tiny_llama(seed=seed, vocab_size=96, hidden_size=64).to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    return plain, packed, prepack_linears(packed)


@needs_onednn
def test_packs_every_linear_and_keeps_weights_readable():
    plain, packed, count = _bf16_pair()
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    assert count == len(linears) == 2 * 7 + 1  # q k v o gate up down per layer + lm_head
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert isinstance(packed.lm_head, PackedLinear)
    assert torch.equal(packed.lm_head.weight, plain.lm_head.weight)
    assert prepack_linears(packed) == 0  # nothing left to pack


@needs_onednn
def test_packed_packs_one_bf16_linear_only():
    bf16, fp32 = nn.Linear(8, 4).to(torch.bfloat16), nn.Linear(8, 4)
    assert isinstance(prepack.packed(bf16), PackedLinear) and prepack.packed(fp32) is fp32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(prepack.packed(bf16)(x), bf16(x))


@needs_onednn
@pytest.mark.parametrize("length", [1, 5, 19])
def test_packed_logits_match_plain(length):
    plain, packed, _ = _bf16_pair()
    ids = torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.inference_mode():
        expected, got = plain(ids).logits, packed(ids).logits
    assert torch.equal(got, expected)  # the same oneDNN kernel: bit for bit


@needs_onednn
def test_packed_target_decodes_the_same_tokens():
    plain, packed, _ = _bf16_pair(seed=3)
    tree = Tree.from_children_counts([3, 2, 1])
    outputs = []
    for model in (plain, packed):
        engine = Engine(model, NgramProposer(), tree)
        outputs.append([t for s in engine.generate(torch.tensor([1, 5, 9, 3, 5, 9]), 24) for t in s.tokens])
    assert len(outputs[0]) == 24 and outputs[0] == outputs[1]


@needs_onednn
def test_shared_modules_are_packed_once():
    shared = nn.Linear(8, 8, bias=True).to(torch.bfloat16)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    assert prepack_linears(model) == 1
    assert model["a"][0] is model["b"][0]
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(model["a"](x), shared(x))


def test_leaves_float32_and_unsupported_builds_alone(monkeypatch):
    model = tiny_llama()
    assert prepack_linears(model) == 0 and isinstance(model.lm_head, nn.Linear)
    bf16 = tiny_llama().to(torch.bfloat16)
    monkeypatch.setattr(prepack, "can_prepack", lambda: False)
    assert prepack_linears(bf16) == 0 and isinstance(bf16.lm_head, nn.Linear)


@needs_onednn
def test_fast_copy_leaves_the_original_plain():
    plain = tiny_llama().to(torch.bfloat16)
    packed = fast_copy(plain)
    assert packed is not plain and isinstance(packed.lm_head, PackedLinear) and type(plain.lm_head) is nn.Linear
    fp32 = tiny_llama()
    assert fast_copy(fp32) is fp32
