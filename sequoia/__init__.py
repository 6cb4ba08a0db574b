"""Sequoia: hardware-aware speculative decoding with optimal token trees.

The pipeline is profile -> acceptance -> solve -> export -> decode -> bench; each stage is a
module here (``profiler``, ``acceptance``, ``solver``, ``tree``, ``engine``, ``bench``).
"""

from sequoia.errors import SequoiaError

__version__ = "0.1.0"

__all__ = ["SequoiaError", "Tree", "__version__"]


def __getattr__(name: str):
    """``sequoia.Tree`` on first use: importing the package does not import torch, so a command
    that only reads a cached file starts quickly."""
    if name == "Tree":
        from sequoia.tree import Tree

        return Tree
    raise AttributeError(f"module 'sequoia' has no attribute {name!r}")
