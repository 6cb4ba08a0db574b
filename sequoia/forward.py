"""One forward pass over a token tree, and the KV-cache bookkeeping that follows it.

The cache holds the ``prefix_len`` tokens before the root; the tree's ``n`` tokens (root first)
are fed in one pass. Tree token ``i`` attends to the whole prefix and to its own ancestors
(and itself), and sits at position ``prefix_len + depth(i)``. Afterwards the cache holds all
``prefix_len + n`` entries; :func:`keep_path` keeps only the accepted root-to-leaf path.

Both the profiler and the decoder call :func:`tree_forward`, so what is profiled is exactly
what decoding pays.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache, PreTrainedModel

from sequoia.tree import Tree


def tree_attention_mask(
    tree_mask: torch.Tensor,  # [m, k] bool, True = may attend; k = n for a whole tree
    prefix_len: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [1, 1, m, prefix_len + k] additive float mask
    """Additive 4D mask: 0 where attention is allowed, the dtype's minimum where masked.

    ``tree_mask`` is the ancestor mask of the fed nodes (rows) over every tree node in the
    cache after this pass (columns); it is square when the whole tree is fed at once.
    """
    assert tree_mask.ndim == 2 and tree_mask.dtype == torch.bool
    m, k = tree_mask.shape
    allowed = torch.ones(m, prefix_len + k, dtype=torch.bool, device=tree_mask.device)
    allowed[:, prefix_len:] = tree_mask
    mask = torch.zeros(allowed.shape, dtype=dtype, device=tree_mask.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def model_dtype_device(model: PreTrainedModel) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's input embeddings (where token ids go in)."""
    weight = model.get_input_embeddings().weight
    return weight.dtype, weight.device


def cache_kwargs(model: PreTrainedModel, cache: DynamicCache) -> dict:
    """The keyword under which ``model.forward`` takes a cache (``cache`` in newer
    transformers, ``past_key_values`` before)."""
    return {"cache": cache} if _takes_cache_keyword(type(model)) else {"past_key_values": cache}


@functools.cache
def _takes_cache_keyword(model_type: type) -> bool:
    # inspect.signature costs ~0.1 ms, as much as a tiny model's forward: once per class
    return "cache" in inspect.signature(model_type.forward).parameters


def tree_forward(
    model: PreTrainedModel,
    tokens: torch.Tensor,  # [n] int64, node i's token, BFS order
    tree: Tree,
    cache: DynamicCache,
    prefix_len: int,
    output_hidden_states: bool = False,
    start: int = 0,
):
    """Run ``model`` on the tree's tokens over a cache of ``prefix_len`` tokens.

    Returns the model output (``logits``: ``[1, n, vocab]``). The cache grows by ``n``.
    A draft growing the tree level by level feeds nodes ``start .. start + len(tokens) - 1``
    (then ``tokens`` holds only theirs) over a cache that already holds nodes ``0 .. start - 1``
    after the prefix.
    """
    end = start + tokens.shape[0]
    assert tokens.ndim == 1 and 0 <= start < end <= tree.size
    assert start > 0 or end == tree.size, "a whole-tree pass takes every node's token"
    dtype, device = model_dtype_device(model)
    mask = tree_attention_mask(tree.ancestor_mask[start:end, :end].to(device), prefix_len, dtype)
    positions = tree.position_ids(prefix_len)[start:end].to(device)[None]
    return model(
        input_ids=tokens.to(device)[None],
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **cache_kwargs(model, cache),
        output_hidden_states=output_hidden_states,
    )


def keep_path(cache: DynamicCache, prefix_len: int, node_ids: torch.Tensor | list[int]) -> None:
    """Keep the prefix plus the cache slots of ``node_ids`` (tree indices), drop the rest.

    ``node_ids`` is the accepted path in order (root first). For a path ``0, 1, ..., k-1`` this
    is a plain crop; otherwise the kept slots are gathered into place, then cropped.
    """
    ids = torch.as_tensor(node_ids, dtype=torch.long)
    assert ids.ndim == 1
    keep = len(ids)
    contiguous = bool(torch.equal(ids, torch.arange(keep)))
    for layer in cache.layers:
        total = layer.keys.shape[-2]
        if not contiguous:
            src = (ids + prefix_len).to(layer.keys.device)
            dst = slice(prefix_len, prefix_len + keep)
            layer.keys[..., dst, :] = layer.keys.index_select(-2, src)
            layer.values[..., dst, :] = layer.values.index_select(-2, src)
        drop = total - prefix_len - keep
        if drop > 0:
            layer.crop(-drop)
