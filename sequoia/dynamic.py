"""Per-step trees: the draft's calibrated confidence decides, every step, which nodes to grow.

The static tree (:mod:`sequoia.solver`) spends its budget by position: the i-th child of a
depth-d node gets the same expected acceptance every step. A draft knows more: when it is sure,
a deep chain pays; when it hesitates, width pays. Per-step trees (EAGLE-2's dynamic trees,
chosen with Sequoia's objective) use that, within the size ``n`` and depth ``D`` of the
engine's tree (the optimizer's choice, also the fall-back and the baseline).

**Slots and values.** Each node ``v`` the draft expands offers ``width`` candidate children
(*slots*), best first. Slot ``i`` of ``v`` has a *factor* ``a`` = the calibrated probability
that it is the child the target accepts, given that verification reached ``v``
(:class:`Calibration`: measured acceptance against a confidence *feature* and the depth), and
a *value* ``V(v, i) = V(v) * a`` with ``V(root) = 1`` -- the probability that the target
accepts the whole path to it. The expected tokens per step of a tree (DESIGN.md) is
``sum over its nodes of V``, so the best tree maximises the sum of its nodes' values.

**The DP reduces to a selection.** Sequoia's DP finds the best tree for a positional
acceptance vector. Here each candidate node carries its own value, and values are monotone:
``V(child) <= V(parent)`` (a product of factors <= 1) and ``V(v, i + 1) <= V(v, i)`` (enforced
by a running minimum over ranks). Then *the best n-node tree among the candidates is the root
plus the n - 1 highest values*: (1) that set is a tree -- a node's parent and earlier siblings
have values at least as high and come first in the tie order ``(-value, depth, parent, rank)``,
so they are taken before it; (2) no tree of n nodes has a larger sum, since its n - 1 non-root
values are at most the n - 1 largest. Selection is optimal and needs no table.

**Growing the candidates** (level by level, one batched draft forward per level, like a static
tree): the root offers ``width`` slots; at each level the ``beam`` highest-valued slots become
nodes and are expanded; at depth ``D`` it stops and the top ``n - 1`` of all slots form the tree.

**Lossless at every temperature.** Greedy: the tree is a function of the draft alone; any
such tree gives the target's greedy output (verification follows the argmax). Stochastic: the
children of ``v`` are draws without replacement from ``q_v`` and verification tests them in
order (:mod:`sequoia.verify`). That stays exact if *whether ``v`` gets an (i+1)-th child is
decided without looking at that child's token* (nor at the target): given the earlier draws,
the next one is then still a draw from the residual ``q``, and the usual induction over
candidates (accept ``x ~ q_i`` with ``min(1, p_i / q_i)``, else continue with the residual)
gives the target's law whatever the stopping rule. So in stochastic mode a slot's feature is
taken *before* its draw: ``f_i = sum over tokens not yet drawn at v of q_v(t)^2`` (the
expected draft probability of the next draw, unnormalised, so it falls with the rank).
Then ``V(v, i)`` depends only on ``v``'s path and ``v``'s earlier draws; with the tie order
above, every slot that outranks ``(v, i)`` -- and whose existence decides whether ``(v, i)`` is
expanded or kept -- has a value independent of ``x_{v,i}``, because all values that do depend
on it (its later siblings and all their descendants) rank below it. Inclusion of ``(v, i)`` is
therefore a function of slots drawn independently of ``x_{v,i}``: the stopping rule condition.
What breaks it: a feature of the drawn token itself (``q(x_{v,i})``), or anything read from the
target (``tests/test_dynamic.py`` shows the chi-square check catching the latter). Greedy
features may use the candidate's own probability (``q(x)``): nothing is random there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sequoia.errors import FileFormatError
from sequoia.files import read_json, write_json_atomic
from sequoia.tree import Tree

FORMAT = "sequoia-calibration/1"
MODES = ("greedy", "stochastic")
EDGES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
PRIOR_COUNT = 2.0  # pseudo-observations pulling a sparse bin toward the draft's own confidence


@dataclass(frozen=True)
class Calibration:
    """P(a slot is the accepted child | parent reached) by confidence bin and depth.

    ``table[d][b]`` is the rate at depth ``d + 1`` (depths past the table use its last row)
    for features in ``[edges[b], edges[b + 1])``; rates are non-decreasing in the feature.

        >>> c = Calibration("greedy", (0.0, 0.5, 1.0), ((0.1, 0.7),), ((10, 10),))
        >>> c.factor(torch.tensor([0.2, 0.9]), depth=3).tolist()
        [0.10000000149011612, 0.699999988079071]
    """

    mode: str  # greedy: feature = q(candidate); stochastic: residual sum q^2 before the draw
    edges: tuple[float, ...]  # [bins + 1]
    table: tuple[tuple[float, ...], ...]  # [depths][bins] acceptance rate
    counts: tuple[tuple[float, ...], ...]  # [depths][bins] samples behind each rate
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES or len(self.edges) < 2 or not self.table:
            raise FileFormatError(f"a calibration needs a mode in {MODES}, bin edges and a table")
        if any(len(row) != len(self.edges) - 1 for row in self.table):
            raise FileFormatError("every calibration row needs one rate per bin")

    @property
    def depths(self) -> int:
        return len(self.table)

    def factor(self, features: torch.Tensor, depth: int) -> torch.Tensor:  # [...] -> [...] float32
        """The calibrated acceptance of slots with ``features`` at tree depth ``depth`` (>= 1)."""
        assert features.is_floating_point() and depth >= 1
        edges = torch.tensor(self.edges[1:-1], dtype=torch.float32, device=features.device)
        rates = torch.tensor(self.table[min(depth, self.depths) - 1], dtype=torch.float32, device=features.device)
        return rates[torch.bucketize(features.float().contiguous(), edges, right=True)]

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        mode: str,
        features: np.ndarray,  # [m] the slots' features
        depths: np.ndarray,  # [m] int, 1-based
        labels: np.ndarray,  # [m] acceptance (0/1 greedy, a probability in stochastic mode)
        max_depth: int = 8,
        edges: tuple[float, ...] = EDGES,
        meta: dict[str, Any] | None = None,
        weights: np.ndarray | None = None,  # [m] each slot's weight (P(its parent is reached))
    ) -> Calibration:
        """Weighted bin rates per depth (deeper depths pooled into ``max_depth``), pulled
        toward the bin's midpoint (the draft taken at its word) with ``PRIOR_COUNT``
        pseudo-samples, and made monotone in the feature (weighted pool-adjacent-violators).
        Confident bins hold few slots (most slots are low-ranked candidates); a prior at the
        depth's mean pulled them far down (2026-12-06 in docs/experiments.md)."""
        weights = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=float)
        bins = np.clip(np.searchsorted(np.asarray(edges[1:-1]), features, side="right"), 0, len(edges) - 2)
        d = np.clip(depths, 1, max_depth) - 1
        table, counts = [], []
        for depth in range(max_depth):
            at = d == depth
            n = np.bincount(bins[at], weights=weights[at], minlength=len(edges) - 1)
            s = np.bincount(bins[at], weights=labels[at] * weights[at], minlength=len(edges) - 1)
            mids = (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2
            rates = (s + PRIOR_COUNT * mids) / (n + PRIOR_COUNT)
            table.append(tuple(float(r) for r in _isotonic(rates, n + PRIOR_COUNT)))
            counts.append(tuple(float(c) for c in n))
        return cls(mode, tuple(edges), tuple(table), tuple(counts), meta or {})

    @classmethod
    def identity(cls, mode: str) -> Calibration:
        """Uncalibrated: the feature's bin midpoint stands for the acceptance (a start)."""
        mids = tuple((a + b) / 2 for a, b in zip(EDGES[:-1], EDGES[1:]))
        return cls(mode, EDGES, (mids,), ((0.0,) * len(mids),), {"source": "identity"})

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "mode": self.mode, "edges": list(self.edges), "table": [list(r) for r in self.table],
                "counts": [list(r) for r in self.counts], "meta": self.meta}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Calibration:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise FileFormatError(f"{where} is not a {FORMAT} file")
        try:
            return cls(data["mode"], tuple(float(e) for e in data["edges"]),
                       tuple(tuple(float(x) for x in r) for r in data["table"]),
                       tuple(tuple(float(x) for x in r) for r in data["counts"]), dict(data.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{where} is a malformed calibration: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        return cls.from_json(read_json(path), str(path))


def _isotonic(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (v2, w2, l2), (v1, w1, l1) = blocks.pop(), blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, l1 + l2])
    return np.concatenate([np.full(int(n), v) for v, _, n in blocks])


def slot_features(
    q: torch.Tensor,  # [p, c] each expanded node's draft distribution over its candidate columns
    candidates: torch.Tensor,  # [p, w] column of each slot, best (greedy) or drawn (in order) first
    greedy: bool,
    with_replacement: bool = False,
) -> torch.Tensor:  # [p, w] float32
    """Each slot's confidence feature (see the module docstring): greedy ``q(candidate)``;
    stochastic, before the draw, the residual ``sum q^2`` over tokens not drawn yet."""
    assert q.ndim == 2 and candidates.ndim == 2 and q.shape[0] == candidates.shape[0]
    chosen = q.float().gather(1, candidates)  # [p, w]
    if greedy:
        return chosen
    total = q.float().square().sum(-1, keepdim=True)  # [p, 1]
    if with_replacement:
        return total.expand_as(chosen).clone()
    earlier = torch.cumsum(chosen.square(), dim=1) - chosen.square()  # drawn before each slot
    return (total - earlier).clamp(min=0.0)


@dataclass(frozen=True)
class TreeShaper:
    """How a proposer shapes its tree each step: a calibration per mode (greedy; stochastic,
    used at every temperature -- a miscalibrated one costs tokens, never exactness), the slots
    per expanded node and the nodes expanded per level (EAGLE-2's top-k and beam; None: by the
    tree size, :func:`beam_for`)."""

    greedy: Calibration
    stochastic: Calibration
    width: int = 8
    beam: int | None = None

    def values(self, parent_values: torch.Tensor, features: torch.Tensor, depth: int, greedy: bool) -> torch.Tensor:
        """``V(v, i) = V(v) * a(f_i, depth)``, made non-increasing along ``i``: [p], [p, w] -> [p, w]."""
        assert parent_values.ndim == 1 and features.ndim == 2
        calibration = self.greedy if greedy else self.stochastic
        factors = calibration.factor(features, depth).to(parent_values)
        return torch.cummin(parent_values[:, None] * factors, dim=1).values

    def beam_for(self, size: int) -> int:
        """Nodes expanded per level for a tree of ``size`` nodes: ``size // 4`` within 4..16."""
        return self.beam or max(4, min(16, size // 4))

    def to_json(self) -> dict[str, Any]:
        return {"greedy": self.greedy.to_json(), "stochastic": self.stochastic.to_json(), "width": self.width, "beam": self.beam}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TreeShaper:
        if not isinstance(data, dict) or not {"greedy", "stochastic"} <= set(data):
            raise FileFormatError(f"{where}: 'per_step_trees' needs a greedy and a stochastic calibration")
        beam = data.get("beam")
        return cls(Calibration.from_json(data["greedy"], where), Calibration.from_json(data["stochastic"], where),
                   int(data.get("width", 8)), None if beam is None else int(beam))


def top_slots(values: torch.Tensor, count: int) -> torch.Tensor:  # [m] in tie order -> [k] ascending
    """Indices of the ``count`` highest values; ties go to the earlier index (the slots are
    listed in the tie order: shallower first, then parent, then rank). Sorted ascending."""
    assert values.ndim == 1
    if count >= len(values):
        return torch.arange(len(values))
    order = torch.sort(-values.float().cpu(), stable=True).indices[:count]
    return torch.sort(order).values


def selected_tree(parents: list[int], depths: list[int], keep: torch.Tensor) -> tuple[Tree, list[int]]:
    """The tree of the root plus the slots ``keep`` (indices into ``parents``/``depths``, which
    list slots level by level in (parent, rank) order; ``parents[s]`` is the slot index of the
    parent, -1 for the root). Returns the tree and, per tree node, its slot (root: -1)."""
    chosen = sorted(keep.tolist(), key=lambda s: (depths[s], s))
    index = {-1: 0}
    tree_parents, slots = [-1], [-1]
    for s in chosen:
        assert parents[s] in index, "a kept slot's parent was not kept: values are not monotone"
        index[s] = len(tree_parents)
        tree_parents.append(index[parents[s]])
        slots.append(s)
    return Tree(tuple(tree_parents)), slots


def expected_tokens_curve(sorted_values: list[np.ndarray], max_size: int) -> np.ndarray:  # -> [max_size + 1]
    """Mean predicted tokens per step of the per-step tree of each size ``1..max_size`` (index
    = size; index 0 unused), from each step's slot values sorted in decreasing order:
    ``1 + sum of the top size - 1`` values."""
    curve = np.zeros(max_size + 1)
    for values in sorted_values:
        padded = np.zeros(max_size - 1)
        take = min(len(values), max_size - 1)
        padded[:take] = values[:take]
        curve[1:] += 1.0 + np.concatenate([[0.0], np.cumsum(padded)])
    return curve / max(len(sorted_values), 1)
