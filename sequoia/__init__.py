"""Sequoia: hardware-aware speculative decoding with optimal token trees.

The pipeline is profile -> acceptance -> solve -> export -> decode -> bench; each stage is a
module here (``profiler``, ``acceptance``, ``solver``, ``tree``, ``engine``, ``bench``).
"""

from sequoia.errors import SequoiaError
from sequoia.tree import Tree

__version__ = "0.1.0"

__all__ = ["SequoiaError", "Tree", "__version__"]
