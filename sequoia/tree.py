"""The speculation tree: data, derived views, validation and conversions.

A tree is stored as one truth, ``parents`` in BFS order: node 0 is the root (the last accepted
token, whose logits give the first draft level), ``parents[0] == -1`` and every other node's
parent comes before it. The children of a node appear in *rank order*: the first child is the
draft's first candidate (top-1 greedy, or the first sample without replacement). Everything
else -- depths, sibling ranks, children lists, the attention mask, position offsets, Medusa
``choices``, vLLM paths, Sequoia growmaps -- is derived from ``parents``.

Example::

    >>> t = Tree.from_choices([[0], [1], [0, 0]])
    >>> t.parents, t.depths.tolist(), t.ranks.tolist()
    ((-1, 0, 0, 1), [0, 1, 1, 2], [0, 0, 1, 0])
    >>> Tree.from_choices([[0], [0, 0], [0, 1]]).to_vllm_tree()
    '[(0,), (0, 0), (0, 1)]'
"""

from __future__ import annotations

import ast
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from sequoia.errors import ConfigError, FileFormatError, TreeError
from sequoia.files import read_json, write_atomic, write_json_atomic

TREE_FORMAT = "sequoia-tree/1"
ROOT_PARENT = -1
EXPORT_FORMATS = ("json", "growmap", "medusa", "vllm")


class Expansion(NamedTuple):
    """One level of a draft's work: the level's nodes that have children, each proposing its
    ``w`` best candidates, of which the first ``num_children`` become its children."""

    parents: torch.Tensor  # [p] int64 node ids, ascending
    keep: torch.Tensor  # [p, w] bool: candidate c of row r becomes a child
    kept: torch.Tensor | None  # flat indices of the kept candidates; None when all are kept

    def children(self, candidates: torch.Tensor) -> torch.Tensor:  # [p, w] -> [children]
        """The kept candidates, row by row: the next level's nodes in order (no ``nonzero``
        when every candidate is kept, the common case; a boolean mask would sync for it)."""
        flat = candidates.flatten()
        return flat if self.kept is None else flat[self.kept.to(flat.device)]


@dataclass(frozen=True)
class Tree:
    """A token tree: ``parents[i]`` is the parent of node ``i`` (BFS order, ``-1`` for the root).

    ``meta`` carries free-form provenance (acceptance vector, budget, expected tokens...).
    """

    parents: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
        _validate_parents(self.parents)

    # ------------------------------------------------------------------ derived views
    @property
    def size(self) -> int:
        """Number of nodes, root included = tokens the target verifies in one pass."""
        return len(self.parents)

    def __len__(self) -> int:
        return self.size

    @cached_property
    def depths(self) -> np.ndarray:  # [n] int64, root = 0
        depths = np.zeros(self.size, dtype=np.int64)
        for i in range(1, self.size):
            depths[i] = depths[self.parents[i]] + 1
        return depths

    @property
    def depth(self) -> int:
        """Number of edges on the longest root-to-leaf path."""
        return int(self.depths[-1])

    @cached_property
    def ranks(self) -> np.ndarray:  # [n] int64, 0-based sibling rank, root = 0
        ranks = np.zeros(self.size, dtype=np.int64)
        for i in range(2, self.size):
            if self.parents[i] == self.parents[i - 1]:
                ranks[i] = ranks[i - 1] + 1
        return ranks

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """``children[i]`` = node ids of ``i``'s children in rank order."""
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for i in range(1, self.size):
            kids[self.parents[i]].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def num_children(self) -> np.ndarray:  # [n] int64
        return np.array([len(c) for c in self.children], dtype=np.int64)

    @cached_property
    def levels(self) -> tuple[tuple[int, ...], ...]:
        """Node ids grouped by depth; contiguous because nodes are in BFS order."""
        bounds = np.searchsorted(self.depths, np.arange(self.depth + 2))
        return tuple(tuple(range(bounds[d], bounds[d + 1])) for d in range(self.depth + 1))

    @cached_property
    def expansions(self) -> tuple[Expansion, ...]:
        """How a draft fills the tree level by level: one :class:`Expansion` per depth
        ``l < depth``, whose children are depth ``l + 1``'s nodes in order."""
        plans = []
        for nodes in self.levels[:-1]:
            counts = torch.as_tensor(self.num_children[list(nodes)])
            has = counts > 0
            keep = torch.arange(int(counts.max()))[None, :] < counts[has][:, None]
            kept = None if bool(keep.all()) else keep.flatten().nonzero().squeeze(1)
            plans.append(Expansion(torch.as_tensor(nodes)[has], keep, kept))
        return tuple(plans)

    @cached_property
    def ancestor_mask(self) -> torch.Tensor:  # [n, n] bool
        """``mask[i, j]`` is True iff ``j`` is ``i`` or an ancestor of ``i`` (tree attention)."""
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        for i in range(self.size):
            if i:
                mask[i] = mask[self.parents[i]]
            mask[i, i] = True
        return mask

    @property
    def position_offsets(self) -> torch.Tensor:  # [n] int64
        """Position of each node relative to the root's position (= its depth)."""
        return torch.from_numpy(self.depths.copy())

    def position_ids(self, root_position: int) -> torch.Tensor:  # [n] int64
        """Absolute position ids when the root sits at ``root_position``."""
        return self.position_offsets + root_position

    @cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """Sibling-rank path from the root to each node (root: ``()``)."""
        out: list[tuple[int, ...]] = [()]
        for i in range(1, self.size):
            out.append(out[self.parents[i]] + (int(self.ranks[i]),))
        return tuple(out)

    def path_to(self, node: int) -> list[int]:
        """Node ids from the root to ``node``, both included."""
        path = [node]
        while self.parents[path[-1]] != ROOT_PARENT:
            path.append(self.parents[path[-1]])
        return path[::-1]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_children_counts(cls, counts: Sequence[int], meta: dict | None = None) -> Tree:
        """Build from the number of children of each node, nodes taken in BFS order.

        ``counts`` may stop early; missing nodes are leaves. ``[2, 1]`` is a root with two
        children whose first child has one child.
        """
        parents = [ROOT_PARENT]
        for node, count in enumerate(counts):
            if node >= len(parents):
                raise TreeError(f"children counts name node {node}, but only {len(parents)} exist")
            if count < 0:
                raise TreeError(f"node {node} has a negative number of children ({count})")
            parents.extend([node] * int(count))
        return cls(tuple(parents), meta or {})

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], meta: dict | None = None) -> Tree:
        """Build from rank paths (Medusa/EAGLE ``choices``; the root's empty path optional).

        Every prefix of a path must be present and ranks under a node contiguous from 0.
        """
        if not all(_is_int_list(p) for p in paths):
            raise TreeError("tree paths must be lists of whole-number ranks")
        keyed = {tuple(int(r) for r in p) for p in paths} | {()}
        for path in keyed:
            if any(r < 0 for r in path):
                raise TreeError(f"path {list(path)} has a negative rank")
            if path and path[:-1] not in keyed:
                raise TreeError(f"path {list(path)} has no parent path {list(path[:-1])}")
            if path and path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in keyed:
                raise TreeError(f"path {list(path)}: ranks under a node must be contiguous from 0")
        # BFS order = by length, then by the parent's BFS index, then rank; sorting by
        # (length, path) gives exactly that because parents are ordered the same way.
        order = sorted(keyed, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(order)}
        parents = [ROOT_PARENT] + [index[p[:-1]] for p in order[1:]]
        return cls(tuple(parents), meta or {})

    from_choices = from_paths

    # ------------------------------------------------------------------ exports
    def to_choices(self) -> list[list[int]]:
        """Medusa/EAGLE ``choices``: the rank path of every non-root node, BFS order."""
        return [list(p) for p in self.paths[1:]]

    def to_vllm_tree(self) -> str:
        """vLLM ``speculative_token_tree``: a string of rank-path tuples.

        vLLM's tree proposer assumes one child count per level, so this raises
        :class:`TreeError` for trees whose nodes at one depth branch differently.
        """
        for depth, level in enumerate(self.levels[:-1]):
            counts = set(self.num_children[list(level)].tolist())
            if len(counts) > 1:
                raise TreeError(
                    f"vLLM's speculative_token_tree needs one child count per level, but level "
                    f"{depth} has nodes with {sorted(counts)} children; export as medusa instead"
                )
        return "[" + ", ".join(repr(tuple(p)) for p in self.paths[1:]) + "]"

    @classmethod
    def from_vllm_tree(cls, text: str) -> Tree:
        """Parse a vLLM ``speculative_token_tree`` string."""
        try:
            paths = ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise TreeError(f"not a vLLM tree string: {text[:60]!r}") from exc
        if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in paths):
            raise TreeError("a vLLM tree must be a list of tuples of ranks")
        return cls.from_paths(paths)

    def to_growmap(self) -> dict[str, Any]:
        """The original Sequoia repository's growmap dict (``torch.save`` it as ``.pt``)."""
        # The original expands every node, leaves included (with 0 branches), level by level.
        roots = [list(level) for level in self.levels]
        branches = [self.num_children[list(level)].tolist() for level in self.levels]
        return {
            "roots": roots,
            "branches": branches,
            "Successors": [list(c) for c in self.children],
            "mask": self.ancestor_mask.long(),
            "depth": torch.from_numpy(self.depths.copy()),
            "size": self.size,
        }

    @classmethod
    def from_growmap(cls, growmap: dict[str, Any], meta: dict | None = None) -> Tree:
        """Import a growmap dict; checks it describes one consistent BFS tree."""
        if not isinstance(growmap, dict) or "Successors" not in growmap:
            raise TreeError("not a Sequoia growmap: no 'Successors' entry")
        succ = growmap["Successors"]
        if not isinstance(succ, (list, tuple)) or not all(_is_int_list(k) for k in succ):
            raise TreeError("growmap 'Successors' must be a list of lists of node ids")
        size = growmap.get("size", len(succ))
        if not _is_int(size) or int(size) != len(succ):
            raise TreeError(f"growmap has size {size} but {len(succ)} successor lists")
        parents = [ROOT_PARENT] * len(succ)
        seen = {0}
        for node, kids in enumerate(succ):
            kids = [int(k) for k in kids]
            if kids != sorted(kids):
                raise TreeError(f"growmap node {node} lists its children out of order: {kids}")
            for kid in kids:
                if not 0 <= kid < len(succ):
                    raise TreeError(f"growmap node {node} has child {kid} outside 0..{len(succ) - 1}")
                if kid in seen:
                    raise TreeError(f"growmap node {kid} has two parents or closes a cycle")
                seen.add(kid)
                parents[kid] = node
        if len(seen) != len(succ):
            raise TreeError(f"growmap nodes {sorted(set(range(len(succ))) - seen)[:5]} are unreachable")
        tree = cls(tuple(parents), meta or {})
        for key, derived in (("depth", tree.depths), ("mask", tree.ancestor_mask)):
            if key in growmap and not np.array_equal(np.asarray(growmap[key]), np.asarray(derived)):
                raise TreeError(f"growmap '{key}' disagrees with its 'Successors'")
        return tree

    def to_json(self) -> dict[str, Any]:
        return {"format": TREE_FORMAT, "parents": list(self.parents), "meta": self.meta}

    @classmethod
    def from_json(cls, data: Any) -> Tree:
        if not isinstance(data, dict) or data.get("format") != TREE_FORMAT:
            raise FileFormatError(f"not a {TREE_FORMAT} document (missing or wrong 'format')")
        parents, meta = data.get("parents"), data.get("meta", {})
        if not _is_int_list(parents):
            raise TreeError("'parents' must be a list of integers")
        if not isinstance(meta, dict):
            raise FileFormatError("'meta' must be a JSON object")
        return cls(tuple(parents), dict(meta))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``sequoia-tree/1`` JSON atomically (no partial file on failure)."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tree:
        """Read a tree from ``sequoia-tree/1`` JSON or a growmap ``.pt`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileFormatError(f"tree file not found: {path}")
        if path.suffix == ".pt":
            return cls.from_growmap(load_growmap(path))
        return cls.from_json(read_json(path))


def _validate_parents(parents: tuple[int, ...]) -> None:
    if not parents:
        raise TreeError("a tree needs at least the root node")
    if parents[0] != ROOT_PARENT:
        raise TreeError(f"node 0 must be the root (parent -1), got parent {parents[0]}")
    arr = np.asarray(parents[1:], dtype=np.int64)
    idx = np.arange(1, len(parents))
    bad = np.flatnonzero((arr < 0) | (arr >= idx))
    if bad.size:
        i = int(idx[bad[0]])
        raise TreeError(
            f"node {i} has parent {parents[i]}: parents must precede their children "
            "(one root, BFS order, no cycles)"
        )
    if arr.size > 1 and np.any(np.diff(arr) < 0):
        i = int(np.flatnonzero(np.diff(arr) < 0)[0]) + 2
        raise TreeError(f"nodes are not in BFS order at node {i} (parents must be non-decreasing)")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_int_list(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and all(_is_int(v) for v in values)


def export(tree: Tree, fmt: str, path: str | os.PathLike) -> None:
    """Write ``tree`` as one of :data:`EXPORT_FORMATS`, atomically.

    ``json``: ``sequoia-tree/1``; ``growmap``: the original repository's ``.pt`` dict;
    ``medusa``: a JSON list of rank paths (Medusa/EAGLE ``choices``); ``vllm``: a JSON object
    ``{"speculative_token_tree": "[(0,), ...]"}`` to merge into vLLM's speculative config.
    """
    if fmt == "growmap":
        growmap = tree.to_growmap()
        write_atomic(path, lambda tmp: torch.save(growmap, tmp))
    elif fmt == "json":
        write_json_atomic(path, tree.to_json())
    elif fmt == "medusa":
        write_json_atomic(path, tree.to_choices())
    elif fmt == "vllm":
        write_json_atomic(path, {"speculative_token_tree": tree.to_vllm_tree()})
    else:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def load_growmap(path: str | os.PathLike) -> dict[str, Any]:
    """Read a growmap ``.pt`` file (tensors, lists and ints only; no code is unpickled)."""
    if not Path(path).is_file():
        raise FileFormatError(f"growmap file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise FileFormatError(f"{path} is not a readable growmap .pt file: {exc}") from exc
