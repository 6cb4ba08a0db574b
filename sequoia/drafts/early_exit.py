"""Early exit (SPEED-style): the target's first layers, final norm and LM head as the draft.

It needs no training and no extra memory (every weight is shared with the target), and since
it is a complete causal LM it serves :class:`~sequoia.drafts.lm.LMProposer` and Hugging Face
assisted generation alike. Its agreement with the target grows with the layers kept, and so
does its cost per tree level -- the optimizer weighs the two from a profile.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from sequoia.errors import ConfigError

PREFIX = "early-exit:"


def early_exit_model(target: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A causal LM made of ``target``'s first ``num_layers`` decoder layers (weights shared).

    Works for the Llama family layout (``model.embed_tokens``, ``model.layers``,
    ``model.norm``, ``lm_head``), which Mistral, Qwen2 and SmolLM share.
    """
    body = getattr(target, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(body, "norm"):
        raise ConfigError(f"early exit needs a Llama-style decoder; {type(target).__name__} is not one")
    if not 1 <= num_layers < len(layers):
        raise ConfigError(f"early exit keeps 1..{len(layers) - 1} of the target's {len(layers)} layers, not {num_layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    with torch.device("meta"):
        draft = type(target)(config)
    for name, module in body.named_children():  # embeddings, norm, rotary embedding...
        setattr(draft.model, name, nn.ModuleList(layers[:num_layers]) if name == "layers" else module)
    draft.lm_head = target.lm_head
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft.eval()


def parse_spec(spec: str) -> int | None:
    """``"early-exit:8"`` -> 8; any other spec -> None."""
    if not spec.startswith(PREFIX):
        return None
    try:
        return int(spec[len(PREFIX):])
    except ValueError:
        raise ConfigError(f"write the early-exit draft as early-exit:N (N layers), not {spec!r}") from None
