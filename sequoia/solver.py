"""The optimal speculation tree: expected tokens of any tree, the Sequoia dynamic program, and
the baseline shapes it is compared against.

Acceptance model. ``p`` is the positional acceptance vector, 0-based here: ``p[r]`` is the
probability that the candidate of rank ``r`` at a node (its ``r``-th child, counting from 0)
is the one the target accepts. ``sum(p) <= 1``; ranks past ``len(p)`` have probability 0. A
node's *reach probability* is the product of ``p[rank]`` along its root path (the root: 1), and
the expected tokens per step of a tree is the sum of its reach probabilities.

The dynamic program (exact for any ``p``, sorted or not). With ``F[d][m]`` the best value of a
subtree of exactly ``m`` nodes and depth ``<= d``, a node's children hold ranks ``0..c-1``
(contiguous: a draft cannot offer its second candidate without its first), and the child of
rank ``r`` with ``t`` nodes adds ``p[r] * F[d-1][t]``. ``H_r[s]``, the best total over ranks
``0..r-1`` whose subtrees hold ``s`` nodes, is a max-plus convolution
``H_{r+1}[s] = max_t H_r[s - t] + p[r] * F[d-1][t]``, and ``F[d][m] = 1 + max_c H_c[m - 1]``.
One vectorised convolution per (depth, rank) fills the whole table.

Acceptance by depth. ``p`` may also be a matrix, row ``i`` the vector of candidates at depth
``i + 1`` (deeper: the last row): a draft with one head per level is less accurate deeper down,
and one vector would overrate deep trees. Within one pass with depth limit ``D`` the table's
depth ``d`` is the absolute depth ``D - d``, so each limit gets its own pass (``D`` times the
work: fine for the few levels such a draft has).

Example::

    >>> table = solve([0.6, 0.2], max_size=4, max_depth=2)
    >>> round(float(table.values[4, 2]), 4)      # root + ranks 0,1 + the rank-0 child's first child
    2.16
    >>> table.tree(4, 2).parents
    (-1, 0, 0, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import prod

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from sequoia.errors import AcceptanceError, ConfigError
from sequoia.tree import Tree

SUM_TOLERANCE = 1e-6  # measured vectors in float32 may sum to 1 + a few ulps
MAX_BASELINE_NODES = 1 << 20  # refuse absurd baseline shapes (kary 16 x 32) before building
MAX_TABLE_CELLS = 1 << 26  # solve's largest array (512 MB): budget 8192, or 2M (depth, rank, size)
SHAPES = ("chain", "kary", "chains")  # baseline families; "sequoia" is the DP itself


def validate_acceptance(p: Sequence[float] | np.ndarray) -> np.ndarray:  # -> [k] float64
    """Check an acceptance vector and return it as a float64 array.

    >>> validate_acceptance([0.6, 0.2]).tolist()
    [0.6, 0.2]
    """
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError):
        raise AcceptanceError("the acceptance vector must be a list of numbers") from None
    if arr.ndim != 1:
        raise AcceptanceError(f"the acceptance vector must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise AcceptanceError("the acceptance vector is empty: give at least one probability")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        i = int(bad[0])
        raise AcceptanceError(
            f"acceptance entry #{i + 1} is {arr[i]}: every entry must be a probability in [0, 1]"
        )
    if arr.sum() > 1 + SUM_TOLERANCE:
        raise AcceptanceError(
            f"the acceptance vector sums to {arr.sum():.6g} > 1: entry #i is the probability that "
            "the i-th candidate is the accepted one, so the entries must sum to at most 1"
        )
    return arr


def acceptance_by_depth(p: Sequence[float] | Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:  # -> [L, k]
    """An acceptance vector (one row, every depth) or matrix (row ``i``: depth ``i + 1``),
    checked, as a float64 matrix.

    >>> acceptance_by_depth([0.6, 0.2]).tolist()
    [[0.6, 0.2]]
    """
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError):
        raise AcceptanceError("the acceptance vector must be a list of numbers (or of lists, one per depth)") from None
    if arr.ndim == 1:
        return validate_acceptance(arr)[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise AcceptanceError(f"acceptance by depth must be a matrix (one row per depth), got shape {arr.shape}")
    for depth, row in enumerate(arr, start=1):
        try:
            validate_acceptance(row)
        except AcceptanceError as exc:
            raise AcceptanceError(f"depth {depth}: {exc}") from None
    return arr


def reach_probabilities(
    tree: Tree, p: Sequence[float] | Sequence[Sequence[float]] | np.ndarray
) -> np.ndarray:  # -> [n]
    """Probability that each node is reached (accepted along with its whole root path);
    ``p``: a vector or one row per depth (see the module docstring).

    >>> reach_probabilities(Tree((-1, 0, 0, 1)), [0.5, 0.25]).tolist()
    [1.0, 0.5, 0.25, 0.25]
    >>> reach_probabilities(Tree((-1, 0, 0, 1)), [[0.5, 0.25], [0.2, 0.0]]).tolist()
    [1.0, 0.5, 0.25, 0.1]
    """
    rows = acceptance_by_depth(p)  # [L, k]
    table = np.zeros((rows.shape[0], max(int(tree.ranks.max()) + 1, rows.shape[1])))
    table[:, : rows.shape[1]] = rows
    depth_row = np.minimum(np.maximum(tree.depths, 1), rows.shape[0]) - 1  # [n] the root's is unused
    edge = table[depth_row, tree.ranks]  # [n] probability of each node's incoming edge
    parents = np.asarray(tree.parents)
    reach = np.ones(tree.size)  # [n]
    for level in tree.levels[1:]:  # BFS: a level's parents are all filled in already
        lo, hi = level[0], level[-1] + 1
        reach[lo:hi] = reach[parents[lo:hi]] * edge[lo:hi]
    return reach


def expected_tokens(tree: Tree, p: Sequence[float] | Sequence[Sequence[float]] | np.ndarray) -> float:
    """Expected tokens per step (the bonus/root token included) of any tree.

    >>> expected_tokens(Tree((-1, 0, 0, 1)), [0.5, 0.25])
    2.0
    """
    return float(reach_probabilities(tree, p).sum())


@dataclass(frozen=True, eq=False)
class SolveTable:
    """Every optimum of one :func:`solve` pass.

    ``values[m, d]``: the best expected tokens of a tree of at most ``m`` nodes and depth at
    most ``d`` (``-inf`` for ``m = 0``); ``sizes[m, d]``: the node count of the smallest tree
    reaching it. Both are non-decreasing in ``m`` and ``d``.
    """

    acceptance: np.ndarray  # [k] float64, or [L, k] by depth
    values: np.ndarray  # [max_size + 1, max_depth + 1] float64
    sizes: np.ndarray  # [max_size + 1, max_depth + 1] int64
    # Back-pointers of the exact-size tables, for reconstruction: one pass serves every depth
    # limit, or (acceptance by depth) one pass per limit. Depths past max_size - 1 add nothing,
    # so only depths 0..min(max_depth, max_size - 1) are stored.
    children: np.ndarray = field(repr=False)  # [passes, stored depths, max_size + 1] best child count
    split: np.ndarray = field(repr=False)  # [passes, stored depths, ranks, max_size] rank r's subtree size

    @property
    def max_size(self) -> int:
        return self.values.shape[0] - 1

    @property
    def max_depth(self) -> int:
        return self.values.shape[1] - 1

    def tree(self, size: int | None = None, depth: int | None = None) -> Tree:
        """The optimal tree for a size budget and depth limit (default: the whole table)."""
        size = self.max_size if size is None else int(size)
        depth = self.max_depth if depth is None else int(depth)
        if not (1 <= size <= self.max_size and 0 <= depth <= self.max_depth):
            raise ConfigError(
                f"(size {size}, depth {depth}) is outside the solved table "
                f"(sizes 1..{self.max_size}, depths 0..{self.max_depth})"
            )
        stored = self.children.shape[1]
        passed = 0 if self.children.shape[0] == 1 else min(depth, stored - 1)
        children, split = self.children[passed], self.split[passed]
        specs = [(int(self.sizes[size, depth]), min(depth, stored - 1))]
        parents = [-1]
        for node, (m, d) in enumerate(specs):  # grows while iterating: BFS order for free
            child_sizes, s = [], m - 1
            for r in reversed(range(children[d, m])):
                child_sizes.append(int(split[d, r, s]))
                s -= child_sizes[-1]
            specs.extend((t, d - 1) for t in reversed(child_sizes))
            parents.extend([node] * len(child_sizes))
        meta = {
            "acceptance": self.acceptance.tolist(),
            "budget": size,
            "max_depth": depth,
            "expected_tokens": float(self.values[size, depth]),
        }
        return Tree(tuple(parents), meta)

    def best(self) -> Tree:
        """The optimal tree within the full budget and depth limit."""
        return self.tree()


def solve(
    p: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    max_size: int,
    max_depth: int,
    progress: Callable[[int, int], None] | None = None,
) -> SolveTable:
    """Solve for the optimal tree of every size ``<= max_size`` and depth ``<= max_depth``.

    ``p``: one acceptance vector, or one row per depth (see the module docstring).
    ``progress(done, total)`` is called after each depth. Time grows as
    ``depth * len(p) * max_size**2`` (vectorised): 512 nodes, depth 32 and 16 ranks take
    about 0.25 s on a 2-core CPU; by depth, ``depth**2 / 2`` instead of ``depth``.

    >>> t = solve([0.5, 0.3], max_size=3, max_depth=5)
    >>> float(t.values[3, 5]), t.tree(3, 5).parents, float(t.values[3, 1])
    (1.8, (-1, 0, 0), 1.8)
    >>> solve([[0.5, 0.3], [0.9, 0.0]], max_size=3, max_depth=2).tree(3, 2).parents  # deep is better
    (-1, 0, 1)
    """
    rows = acceptance_by_depth(p)  # [L, k]
    if int(max_size) < 1:
        raise ConfigError(f"the size budget must be at least 1 (the root), got {max_size}")
    if int(max_depth) < 0:
        raise ConfigError(f"the depth limit must be at least 0, got {max_depth}")
    n, depth_limit = int(max_size), int(max_depth)
    stored = min(depth_limit, n - 1) + 1  # deeper than n - 1 edges is impossible
    by_depth = bool((rows != rows[:1]).any())
    passes, ranks = (stored if by_depth else 1), min(rows.shape[1], n - 1)
    if max(n * n, passes * stored * ranks * n) > MAX_TABLE_CELLS:
        raise ConfigError(
            f"a table for size {n}, depth {depth_limit} and {rows.shape[1]} ranks is too large to "
            "solve here; lower the budget, the depth limit or the acceptance vector's length"
        )
    children = np.zeros((passes, stored, n + 1), dtype=np.int32)
    split = np.zeros((passes, stored, ranks, n), dtype=np.int32)
    if by_depth:  # the pass for limit D: table depth d is absolute depth D - d
        exact = np.full((n + 1, stored), -np.inf)
        for limit in range(stored):
            row = [rows[min(limit - d, len(rows) - 1), :ranks] for d in range(limit + 1)]
            exact[:, limit] = _fill(row, n, children[limit], split[limit])[:, limit]
            if progress is not None:
                progress(limit, stored - 1)
    else:
        exact = _fill([rows[0, :ranks]] * stored, n, children[0], split[0], progress)
    exact = exact[:, np.minimum(np.arange(depth_limit + 1), stored - 1)]
    values = np.maximum.accumulate(exact, axis=0)
    record = np.zeros_like(exact, dtype=bool)
    record[1:] = exact[1:] > values[:-1]  # first size reaching each new best
    sizes = np.maximum.accumulate(np.where(record, np.arange(n + 1)[:, None], 0), axis=0)
    return SolveTable(rows[0] if len(rows) == 1 else rows, values, sizes, children, split)


def _fill(
    p_at: Sequence[np.ndarray],  # [depths] the children's vector of a subtree at table depth d
    n: int,
    children: np.ndarray,  # [>= depths, n + 1] out: best child count
    split: np.ndarray,  # [>= depths, ranks, n] out: rank r's subtree size
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:  # [n + 1, depths] exact[m, d]: best with exactly m nodes and depth <= d
    """The exact-size table of the module docstring's recursion, depth by depth."""
    depths = len(p_at)
    exact = np.full((n + 1, depths), -np.inf)
    exact[1, :] = 1.0
    buf = np.empty((n, n))
    rows = np.arange(n)
    for d in range(1, depths):
        below = exact[:n, d - 1]  # [n] best subtree of t nodes, depth <= d - 1 (t = 0: -inf)
        feasible = np.isfinite(below)
        finite = np.where(feasible, below, 0.0)  # [n] so that p[r] = 0 never meets -inf
        h = np.full(n, -np.inf)  # [n] H_0: no children, 0 nodes
        h[0] = 0.0
        best = h.copy()  # [n] max over child counts so far
        for r, p_r in enumerate(p_at[d]):
            weighted = np.where(feasible, p_r * finite, -np.inf)  # [n]
            h, split[d, r] = _maxplus(h, weighted, buf, rows)
            better = h > best  # strict: ties keep fewer children
            best[better] = h[better]
            children[d, 1:][better] = r + 1
        exact[1:, d] = 1.0 + best
        if progress is not None:
            progress(d, depths - 1)
    return exact


def _maxplus(
    h: np.ndarray, q: np.ndarray, buf: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``out[s] = max_t h[s - t] + q[t]`` and its argmax ``t`` (all [n]), in one n x n pass.

    >>> h, q = np.array([0.0, 1.0, -np.inf]), np.array([-np.inf, 2.0, 2.5])
    >>> _maxplus(h, q, np.empty((3, 3)), np.arange(3))  # row 0 is infeasible: any argmax
    (array([-inf,   2.,   3.]), array([2, 1, 1]))
    """
    n = h.size
    padded = np.concatenate([np.full(n - 1, -np.inf), h])  # [2n - 1]
    window = sliding_window_view(padded, n)  # [n, n] window[s, u] = h[s - (n - 1 - u)]
    np.add(window, q[::-1], out=buf)  # buf[s, u] = h[s - t] + q[t] with t = n - 1 - u
    u = buf.argmax(axis=1)
    return buf[rows, u], n - 1 - u


# ---------------------------------------------------------------------- baseline shapes
def topk_per_level(widths: Sequence[int], meta: dict | None = None) -> Tree:
    """A fixed-shape tree (EAGLE / vLLM style): every node at depth ``i`` keeps its top
    ``widths[i]`` candidates, so depth = ``len(widths)``.

    >>> topk_per_level([2, 1]).parents
    (-1, 0, 0, 1, 2)
    """
    widths = [int(w) for w in widths]
    if any(w < 1 for w in widths):
        raise ConfigError(f"every level width must be at least 1, got {widths}")
    counts = [1]  # nodes per level
    for w in widths:
        counts.append(counts[-1] * w)
        if sum(counts) > MAX_BASELINE_NODES:
            raise ConfigError(f"a tree with level widths {widths} exceeds {MAX_BASELINE_NODES} nodes")
    per_node = np.repeat(widths, counts[:-1]).tolist()
    return Tree.from_children_counts(per_node, meta)


def shape_widths(shape: str, width: int, depth: int) -> list[int]:
    """Level widths of a named baseline: ``chain`` (width ignored), ``kary`` (full
    ``width``-ary tree), ``chains`` (``width`` independent chains, SpecInfer style).

    >>> shape_widths("chains", 3, 2)
    [3, 1]
    """
    if shape not in SHAPES:
        raise ConfigError(f"unknown tree shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if depth < 0 or (shape != "chain" and width < 1):
        raise ConfigError(f"a {shape} tree needs width >= 1 and depth >= 0, got {width} and {depth}")
    if shape == "chain":
        return [1] * depth
    if shape == "kary":
        return [width] * depth
    return [width] + [1] * (depth - 1) if depth else []


def chain(depth: int) -> Tree:
    """A single sequence of ``depth`` draft tokens (``depth + 1`` nodes)."""
    return topk_per_level(shape_widths("chain", 1, depth))


def kary(k: int, depth: int) -> Tree:
    """The full ``k``-ary tree of the given depth."""
    return topk_per_level(shape_widths("kary", k, depth))


def chains(k: int, depth: int) -> Tree:
    """``k`` independent chains of ``depth`` tokens hanging from the root (SpecInfer)."""
    return topk_per_level(shape_widths("chains", k, depth))


def _candidates(shape: str, rows: np.ndarray, max_size: int, max_depth: int) -> list[list[int]]:
    """Every member of a baseline family within the budget (widths beyond the vector's length
    only add zero-probability nodes, so they are never better)."""
    widths = [1] if shape == "chain" else range(2, max(2, rows.shape[1]) + 1)
    found = [[]]  # the root alone belongs to every family
    for k in widths:
        for depth in range(1, max_depth + 1):
            levels = shape_widths(shape, k, depth)
            if _level_size(levels) > max_size:
                break
            found.append(levels)
    return found


def _level_size(levels: Sequence[int]) -> int:
    """Node count of :func:`topk_per_level` ``(levels)``."""
    return 1 + sum(prod(levels[: i + 1]) for i in range(len(levels)))


def _family_value(levels: Sequence[int], rows: np.ndarray) -> float:
    """Expected tokens of :func:`topk_per_level` without building it: level ``L`` holds the
    reach mass ``prod_{i<L} sum(p_i[:widths[i]])`` (``p_i``: the row of depth ``i + 1``)."""
    cumulative = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(rows, axis=1)], axis=1)  # [L, k + 1]
    last, k = len(rows) - 1, rows.shape[1]
    mass = np.cumprod([cumulative[min(i, last), min(w, k)] for i, w in enumerate(levels)])
    return 1.0 + float(mass.sum())


def best_baseline(
    shape: str, p: Sequence[float] | Sequence[Sequence[float]] | np.ndarray, max_size: int, max_depth: int
) -> Tree:
    """The best tree of one baseline family within a size budget and depth limit (``p``: a
    vector or one row per depth).

    >>> best_baseline("chains", [0.5, 0.3], max_size=5, max_depth=4).parents
    (-1, 0, 0, 1, 2)
    """
    rows = acceptance_by_depth(p)
    if max_size < 1 or max_depth < 0:
        raise ConfigError(f"need a size budget >= 1 and depth >= 0, got {max_size} and {max_depth}")
    levels = max(_candidates(shape, rows, max_size, max_depth), key=lambda w: _family_value(w, rows))
    tree = topk_per_level(levels)
    p = rows[0] if len(rows) == 1 else rows
    meta = {"acceptance": p.tolist(), "budget": max_size, "max_depth": max_depth, "shape": shape,
            "expected_tokens": expected_tokens(tree, p)}
    return Tree(tree.parents, meta)


def scaling_table(
    p: Sequence[float] | Sequence[Sequence[float]] | np.ndarray, max_size: int, max_depth: int, table: SolveTable | None = None
) -> dict[str, np.ndarray]:
    """Best expected tokens for sizes ``1..max_size`` (each ``[max_size]``): the optimal tree
    (``"sequoia"``) against the best chain, k-ary and k-chains tree within each budget.

    >>> scaling_table([0.5, 0.3], 3, 2)["chain"].tolist()
    [1.0, 1.5, 1.75]
    """
    rows = acceptance_by_depth(p)
    table = solve(rows, max_size, max_depth) if table is None else table
    out = {"sequoia": table.values[1:, max_depth]}
    for shape in SHAPES:
        best = np.full(max_size + 1, -np.inf)  # [max_size + 1] indexed by size
        for levels in _candidates(shape, rows, max_size, max_depth):
            size = _level_size(levels)
            best[size] = max(best[size], _family_value(levels, rows))
        out[shape] = np.maximum.accumulate(best)[1:]
    return out
