"""The solver: expected tokens, the exact DP against exhaustive enumeration and a greedy oracle,
baseline shapes, input validation."""

from __future__ import annotations

import doctest
import heapq
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sequoia import solver
from sequoia.errors import AcceptanceError, ConfigError
from sequoia.solver import (
    best_baseline,
    chain,
    chains,
    expected_tokens,
    kary,
    reach_probabilities,
    scaling_table,
    shape_widths,
    solve,
    topk_per_level,
    validate_acceptance,
)
from sequoia.tree import Tree

BRUTE_MAX_NODES = 9


def test_docstring_examples_hold() -> None:
    assert doctest.testmod(solver).failed == 0


# ---------------------------------------------------------------------- expected tokens
def test_expected_tokens_literal_trees() -> None:
    p = [0.5, 0.25]
    # chain of 3: 1 + .5 + .25
    assert expected_tokens(chain(2), p) == pytest.approx(1.75)
    # 2x2 tree: 1 + (.5 + .25) + (.5 + .25)(.5 + .25)
    assert expected_tokens(kary(2, 2), p) == pytest.approx(1 + 0.75 + 0.5625)
    # ranks past len(p) have probability 0, and so does everything below them
    three = Tree.from_choices([[0], [1], [2], [2, 0]])
    assert reach_probabilities(three, p).tolist() == [1.0, 0.5, 0.25, 0.0, 0.0]


def test_expected_tokens_of_a_single_root_is_one() -> None:
    assert expected_tokens(Tree((-1,)), [0.9]) == 1.0


# ---------------------------------------------------------------------- exhaustive oracle
@cache
def _all_trees() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ordered tree of <= BRUTE_MAX_NODES nodes, as (sizes, depths, path rank table).

    The rank table is [trees, nodes, depth] of indices into an extended p: ranks on the
    root->node path, padded with ONE (factor 1); missing nodes hold ZERO (factor 0).
    """
    trees: list[Tree] = []

    def grow(counts: list[int], total: int) -> None:  # children counts in BFS order
        if len(counts) == total:
            trees.append(Tree.from_children_counts(counts))
            return
        for c in range(BRUTE_MAX_NODES - total + 1):
            grow(counts + [c], total + c)

    grow([], 1)
    one, zero = BRUTE_MAX_NODES, BRUTE_MAX_NODES + 1
    table = np.full((len(trees), BRUTE_MAX_NODES, BRUTE_MAX_NODES - 1), one)
    for i, tree in enumerate(trees):
        table[i, tree.size:, 0] = zero
        for node, path in enumerate(tree.paths):
            table[i, node, : len(path)] = path
    sizes = np.array([t.size for t in trees])
    depths = np.array([t.depth for t in trees])
    return sizes, depths, table


def _brute_values(p: np.ndarray) -> np.ndarray:  # [BRUTE + 1, BRUTE] best over all trees
    """``p``: a vector, or one row per depth (deeper: the last row)."""
    sizes, depths, table = _all_trees()
    rows, positions = np.atleast_2d(p), table.shape[2]
    factors = np.zeros((positions, BRUTE_MAX_NODES + 2))  # [path position = depth - 1, index]
    for j in range(positions):
        row = rows[min(j, len(rows) - 1)]
        factors[j, : row.size] = row
    factors[:, BRUTE_MAX_NODES] = 1.0
    values = np.prod(factors[np.arange(positions), table], axis=2).sum(axis=1)  # [trees]
    best = np.full((BRUTE_MAX_NODES + 1, BRUTE_MAX_NODES), -np.inf)
    for m in range(1, BRUTE_MAX_NODES + 1):
        for d in range(BRUTE_MAX_NODES):
            best[m, d] = values[(sizes <= m) & (depths <= d)].max()
    return best


def test_enumeration_counts_every_ordered_tree() -> None:
    sizes, _, _ = _all_trees()
    catalan = [1, 1, 2, 5, 14, 42, 132, 429, 1430]  # ordered trees of n nodes: Catalan(n - 1)
    assert np.bincount(sizes)[1:].tolist() == catalan


acceptance_vectors = st.integers(1, 5).flatmap(
    lambda k: st.lists(st.floats(0, 1), min_size=k + 1, max_size=k + 1).map(
        lambda w: np.array(w[:-1]) / max(sum(w), 1e-9)  # unsorted, zeros allowed, sum <= 1
    )
)


@settings(max_examples=100, deadline=None)
@given(acceptance_vectors)
def test_dp_equals_exhaustive_enumeration(p: np.ndarray) -> None:
    table = solve(p, BRUTE_MAX_NODES, BRUTE_MAX_NODES - 1)
    brute = _brute_values(p)
    np.testing.assert_allclose(table.values[1:], brute[1:], rtol=1e-9)
    assert np.all(np.isneginf(table.values[0]))
    for m in range(1, BRUTE_MAX_NODES + 1):
        for d in range(BRUTE_MAX_NODES):
            tree = table.tree(m, d)
            assert tree.size == table.sizes[m, d] <= m and tree.depth <= d
            assert expected_tokens(tree, p) == pytest.approx(table.values[m, d], rel=1e-9)
            assert tree.meta["expected_tokens"] == table.values[m, d]


def _stacked(vectors: list[np.ndarray]) -> np.ndarray:  # [depths, width], zero-padded
    width = max(v.size for v in vectors)
    return np.array([np.pad(v, (0, width - v.size)) for v in vectors])


by_depth_matrices = st.integers(2, 4).flatmap(
    lambda depths: st.lists(acceptance_vectors, min_size=depths, max_size=depths).map(_stacked)
)


@settings(max_examples=60, deadline=None)
@given(by_depth_matrices)
def test_dp_by_depth_equals_exhaustive_enumeration(p: np.ndarray) -> None:
    table = solve(p, BRUTE_MAX_NODES, BRUTE_MAX_NODES - 1)
    np.testing.assert_allclose(table.values[1:], _brute_values(p)[1:], rtol=1e-9)
    for m in range(1, BRUTE_MAX_NODES + 1):
        for d in range(BRUTE_MAX_NODES):
            tree = table.tree(m, d)
            assert tree.size == table.sizes[m, d] <= m and tree.depth <= d
            assert expected_tokens(tree, p) == pytest.approx(table.values[m, d], rel=1e-9)


def test_equal_rows_by_depth_are_one_vector() -> None:
    p = [0.5, 0.2, 0.1]
    one, rows = solve(p, 12, 4), solve([p, p, p], 12, 4)
    assert np.array_equal(one.values, rows.values) and rows.tree(12, 4).parents == one.tree(12, 4).parents


def test_dp_respects_unsorted_vectors_and_rank_contiguity() -> None:
    # The second candidate is the likely one, but it cannot be offered without the first.
    table = solve([0.1, 0.8], max_size=3, max_depth=2)
    assert table.tree(2, 2).parents == (-1, 0)  # rank 0 only: 1.1
    assert table.tree(3, 2).parents == (-1, 0, 0)  # ranks 0 and 1: 1.9
    assert table.values[3, 2] == pytest.approx(1.9)


def _greedy_optimum(p: np.ndarray, size: int, depth: int) -> float:
    """For decreasing p the optimal tree is the `size` most reachable nodes (that set is closed
    under parent and elder sibling): best-first search over the full tree."""
    frontier = [(-1.0, 0, 0, 0.0)]  # (-reach, depth, rank, parent's reach)
    total = 0.0
    for _ in range(size):
        if not frontier:  # the whole depth-limited tree is smaller than `size`
            break
        neg, d, rank, above = heapq.heappop(frontier)
        total -= neg
        if d < depth:  # first child
            heapq.heappush(frontier, (neg * p[0], d + 1, 0, -neg))
        if d > 0 and rank + 1 < p.size:  # next sibling
            heapq.heappush(frontier, (-above * p[rank + 1], d, rank + 1, above))
    return total


@pytest.mark.parametrize("seed", range(4))
def test_dp_matches_greedy_oracle_on_sorted_vectors(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.sort(rng.dirichlet(np.ones(7)))[::-1][:6] + 1e-3  # strictly positive, decreasing
    p /= p.sum() * 1.01
    table = solve(p, 80, 6)
    for size in (1, 2, 5, 17, 40, 80):
        for depth in (1, 3, 6):
            assert table.values[size, depth] == pytest.approx(_greedy_optimum(p, size, depth), rel=1e-9)


def test_table_is_monotone_and_trees_are_bfs_ranked() -> None:
    p = [0.55, 0.2, 0.1, 0.05]
    table = solve(p, 64, 8)
    assert np.all(np.diff(table.values[1:], axis=0) >= 0)
    assert np.all(np.diff(table.values[1:], axis=1) >= 0)
    tree = table.best()
    assert tree.size <= 64 and tree.depth <= 8
    assert tree.meta == {"acceptance": p, "budget": 64, "max_depth": 8,
                         "expected_tokens": table.values[64, 8]}


def test_depth_limit_beyond_the_size_costs_nothing() -> None:
    table = solve([0.9], max_size=5, max_depth=50)
    assert table.values.shape == (6, 51)
    assert table.tree(5, 50).parents == (-1, 0, 1, 2, 3)
    assert table.values[5, 50] == pytest.approx(1 + 0.9 + 0.81 + 0.729 + 0.6561)


def test_progress_reports_each_depth() -> None:
    seen: list[tuple[int, int]] = []
    solve([0.5, 0.2], 10, 3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_large_table_is_consistent() -> None:
    """512 nodes, depth 32, 16 ranks (its speed is measured by `sequoia tree scaling`, not here)."""
    p = np.sort(np.random.default_rng(0).dirichlet(np.ones(17)))[::-1][:16]
    table = solve(p, 512, 32)
    tree = table.best()
    assert expected_tokens(tree, p) == pytest.approx(table.values[512, 32], rel=1e-9)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("p", "words"),
    [
        ([0.5, -0.1], "entry #2 is -0.1"),
        ([0.5, float("nan")], "entry #2 is nan"),
        ([float("inf")], "entry #1 is inf"),
        ([0.7, 0.4], "sums to 1.1 > 1"),
        ([], "empty"),
        ([[0.1, 0.2], [0.7, 0.4]], "depth 2: the acceptance vector sums to 1.1 > 1"),
        ([[[0.1]]], "one row per depth"),
        (["a"], "list of numbers"),
    ],
)
def test_bad_acceptance_vectors_raise_one_clear_line(p: list, words: str) -> None:
    with pytest.raises(AcceptanceError, match=words) as info:
        solve(p, 4, 2)
    assert "\n" not in str(info.value)


def test_sum_tolerance_accepts_float32_rounding() -> None:
    assert validate_acceptance(np.float32([0.7, 0.3000001])).sum() > 1


@pytest.mark.parametrize(("size", "depth", "words"), [(0, 2, "size budget"), (4, -1, "depth limit")])
def test_bad_budget_raises_config_error(size: int, depth: int, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        solve([0.5], size, depth)


def test_tree_outside_the_table_raises() -> None:
    with pytest.raises(ConfigError, match="outside the solved table"):
        solve([0.5], 4, 2).tree(5, 2)


# ---------------------------------------------------------------------- baselines
def test_baseline_shapes_literal() -> None:
    assert chain(3).parents == (-1, 0, 1, 2)
    assert kary(2, 2).parents == (-1, 0, 0, 1, 1, 2, 2)
    assert chains(3, 2).parents == (-1, 0, 0, 0, 1, 2, 3)
    assert topk_per_level([3, 2, 1]).size == 1 + 3 + 6 + 6
    assert topk_per_level([]).parents == (-1,)
    assert chains(2, 0).parents == kary(5, 0).parents == (-1,)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: shape_widths("star", 2, 2), "unknown tree shape 'star'"),
        (lambda: kary(0, 2), "width >= 1"),
        (lambda: topk_per_level([2, 0]), "at least 1"),
        (lambda: kary(16, 32), "exceeds"),
    ],
)
def test_bad_baselines_raise(call, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        call()


@settings(max_examples=25, deadline=None)
@given(acceptance_vectors | by_depth_matrices, st.sampled_from(solver.SHAPES), st.integers(1, 40), st.integers(0, 6))
def test_best_baseline_and_scaling_agree_with_expected_tokens(p, shape, size, depth) -> None:
    tree = best_baseline(shape, p, size, depth)
    assert tree.size <= size and tree.depth <= depth
    curve = scaling_table(p, size, depth)
    assert expected_tokens(tree, p) == pytest.approx(curve[shape][-1], rel=1e-12)
    assert tree.meta["expected_tokens"] == pytest.approx(curve[shape][-1], rel=1e-12)
    assert np.all(curve["sequoia"] >= curve[shape] - 1e-12)


def test_scaling_table_literal() -> None:
    curve = scaling_table([0.5, 0.3], max_size=7, max_depth=2)
    assert curve["chain"].tolist() == pytest.approx([1, 1.5, 1.75, 1.75, 1.75, 1.75, 1.75])
    assert curve["kary"].tolist() == pytest.approx([1, 1, 1.8, 1.8, 1.8, 1.8, 2.44])
    # 2 chains of depth 2 (5 nodes): 1 + .8 + .8 * .5
    assert curve["chains"].tolist() == pytest.approx([1, 1, 1.8, 1.8, 2.2, 2.2, 2.2])
