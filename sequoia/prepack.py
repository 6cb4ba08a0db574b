"""Linear layers whose weights are packed once for oneDNN: bfloat16 decoding on CPU.

On CPU a bfloat16 ``F.linear`` runs oneDNN's kernel, and reorders ("packs") the weight into
the kernel's blocked layout *on every call*. For the few-token forwards of decoding that reorder
costs about as much as the product: a 576 x 1536 projection of 12 tokens takes ~95 us through
``F.linear`` and ~55 us from a weight packed once (2-core Xeon with AMX, torch 2.13), and a
12-token verification pass of SmolLM2-135M drops from ~65 to ~54 ms. The kernel is the same, so
the logits are too: packing changes speed, never outputs.

:func:`prepack_linears` swaps every bfloat16 ``nn.Linear`` on the CPU for a
:class:`PackedLinear`; anything else (float32, CUDA, a torch without oneDNN) is left as it is.
A packed module is for inference only: it keeps the original ``weight`` (code that reads
weights, such as a tied output layer, still works), but training or reloading that weight
would not reach the packed copy, so pack last.
"""

from __future__ import annotations


import torch
from torch import nn

PACK_BATCH_HINT = 16  # rows oneDNN tunes the layout for; any row count runs


class PackedLinear(nn.Module):
    """``y = x W^T + b`` from a weight packed once for oneDNN (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the original, for readers of weights
        self.bias = linear.bias
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_BATCH_HINT), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def can_prepack() -> bool:
    """Whether this torch runs packed bfloat16 linears on the CPU (oneDNN with bfloat16)."""
    ops = torch.ops.mkldnn
    needed = ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported")
    return bool(
        torch.backends.mkldnn.is_available()
        and all(hasattr(ops, name) for name in needed)
        and ops._is_mkldnn_bf16_supported()
    )


def prepack_linears(model: nn.Module) -> int:
    """Replace, in place, every bfloat16 CPU ``nn.Linear`` of ``model`` by a
    :class:`PackedLinear`; returns how many were packed (0 where :func:`can_prepack` is false).
    Modules shared between parents (an early-exit draft's layers) are packed once."""
    if not can_prepack():
        return 0
    packed: dict[int, PackedLinear] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if packable(child):
                if id(child) not in packed:
                    packed[id(child)] = PackedLinear(child)
                setattr(parent, name, packed[id(child)])
    return len(packed)


def packed(linear: nn.Linear) -> nn.Module:
    """``linear`` as :func:`prepack_linears` would leave it: packed where that applies."""
    return PackedLinear(linear) if can_prepack() and packable(linear) else linear



def packable(module: nn.Module) -> bool:
    """A bfloat16 ``nn.Linear`` on the CPU: what packing applies to."""
    return type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"
