"""Loading targets and drafts.

For now: the seeded tiny random Llama factory used by the unit tests (no network, seconds).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(
    seed: int = 0,
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    eos_token_id: int | None = None,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """A randomly initialised, seeded, 2-layer Llama in eval mode, for tests.

    Two calls with the same arguments give identical weights; a different ``seed`` gives a
    different model (useful as a deliberately imperfect draft).
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
        # Random init gives near-uniform logits; sharpen them so greedy/sampling tests are
        # not dominated by ties and near-ties.
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
