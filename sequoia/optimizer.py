"""Hardware-aware choice of the tree: the (size, depth) that minimises time per token.

One decode step with a tree of ``n`` nodes and depth ``d`` costs the draft's ``d`` level
forwards (level ``l`` feeds that level's ``w_l`` nodes) plus one target forward over ``n``
tokens, and yields ``E(n, d)`` tokens on average (the solver's optimum, bonus token included)::

    time per token = (sum_{l < d} t_draft(w_l) + t_target(n)) / E(n, d)

Both latencies come from measured profiles (:class:`sequoia.profile.Profile`); ``E`` from one
:func:`sequoia.solver.solve` pass over every size and depth. Every (size, depth) entry is first
ranked with the level widths approximated by ``(n - 1) / d``; the best ``screen`` entries are
then rebuilt as trees and ranked again with their true level widths.

Example::

    >>> choice = choose(profile, [0.6, 0.15, 0.05], prefix_len=256)
    >>> choice.best.size, choice.best.depth, round(choice.speedup, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sequoia.errors import ConfigError
from sequoia.profile import Profile
from sequoia.solver import solve
from sequoia.tree import Tree

LatencyFn = Callable[[float], float]  # tokens in one forward -> ms


@dataclass(frozen=True)
class Candidate:
    """One tree and its predicted cost: ``step_ms`` per decode step, ``ms_per_token``."""

    tree: Tree
    expected_tokens: float
    draft_ms: float
    target_ms: float

    @property
    def size(self) -> int:
        return self.tree.size

    @property
    def depth(self) -> int:
        return self.tree.depth

    @property
    def step_ms(self) -> float:
        return self.draft_ms + self.target_ms

    @property
    def ms_per_token(self) -> float:
        return self.step_ms / self.expected_tokens


@dataclass(frozen=True)
class Choice:
    """The fastest predicted tree, the runners-up (best first), and the autoregressive cost."""

    ranked: tuple[Candidate, ...]
    autoregressive_ms: float  # one target forward of one token = ms per token without a draft

    @property
    def best(self) -> Candidate:
        return self.ranked[0]

    @property
    def speedup(self) -> float:
        """Predicted speed-up of the best tree over plain autoregressive decoding."""
        return self.autoregressive_ms / self.best.ms_per_token


def level_widths(tree: Tree) -> np.ndarray:  # [depth + 1]
    """Nodes per depth level: ``level_widths(Tree((-1, 0, 0, 1))) == [1, 2, 1]``."""
    return np.bincount(tree.depths, minlength=tree.depth + 1)


def draft_cost(tree: Tree, draft_ms: LatencyFn, step_ms: float = 0.0) -> float:
    """Predicted draft ms of one step with ``tree``: once per expanded level, plus its cost per
    step (:func:`draft_step_ms`) when it runs at all."""
    widths = level_widths(tree)[:-1]  # the deepest level is verified, never expanded
    return max(float(sum(draft_ms(float(w)) for w in widths)) + (step_ms if len(widths) else 0.0), 0.0)


def evaluate(tree: Tree, expected: float, target_ms: LatencyFn, draft_ms: LatencyFn, step_ms: float = 0.0) -> Candidate:
    """Predicted cost of one step with ``tree``: its :func:`draft_cost` and one target forward."""
    return Candidate(tree, expected, draft_cost(tree, draft_ms, step_ms), float(target_ms(float(tree.size))))


def choose_tree(
    acceptance: Sequence[float] | np.ndarray,  # [k], or [L, k] by tree depth
    target_ms: LatencyFn,
    draft_ms: LatencyFn,
    max_size: int,
    max_depth: int,
    screen: int = 24,
    top: int = 5,
    gain: Callable[[np.ndarray], np.ndarray] | None = None,
    step_ms: float = 0.0,
) -> Choice:
    """Minimise predicted time per token over every tree of ``<= max_size`` nodes and depth
    ``<= max_depth``; pure, latencies given as functions of the tokens in one forward, plus the
    draft's cost per step (``step_ms``, :func:`draft_step_ms`).

    ``gain`` (by tree size, e.g. :meth:`DraftLimits.gain`) scales the expected tokens per step of
    the solver's trees for a draft that reshapes each step's tree within their size and depth."""
    if screen < 1 or top < 1:
        raise ConfigError("screen and top must be at least 1")
    table = solve(acceptance, max_size, max_depth)
    sizes = table.sizes[1:]  # [max_size, max_depth + 1] actual node count of each optimum
    depths = np.broadcast_to(np.arange(max_depth + 1), sizes.shape)
    values = table.values[1:] * (1.0 if gain is None else gain(sizes))
    counts = np.arange(1, max_size + 1, dtype=np.float64)  # [max_size] tokens in one forward
    target_curve = np.array([target_ms(n) for n in counts])  # [max_size] ms
    draft_curve = np.array([draft_ms(n) for n in counts])  # [max_size] ms
    target = target_curve[sizes - 1]
    width = np.maximum((sizes - 1) / np.maximum(depths, 1), 1.0)  # mean nodes per level
    draft = np.maximum(depths * np.interp(width, counts, draft_curve) + np.where(depths > 0, step_ms, 0.0), 0.0)
    approx = (draft + target) / values  # [max_size, max_depth + 1] ms per token
    order = np.argsort(approx, axis=None, kind="stable")
    seen: dict[tuple[int, ...], Candidate] = {}
    for flat in order:
        m, d = np.unravel_index(flat, approx.shape)
        tree = table.tree(int(m) + 1, int(d))
        if tree.parents not in seen:
            seen[tree.parents] = evaluate(tree, float(values[m, d]), target_ms, draft_ms, step_ms)
        if len(seen) >= screen:
            break
    ranked = sorted(seen.values(), key=lambda c: c.ms_per_token)[:top]
    return Choice(tuple(ranked), float(target_ms(1.0)))


STEP_KEY = 0  # in a draft's costs by level width: its cost per step beyond its levels (draft_step_ms)


@dataclass(frozen=True)
class DraftLimits:
    """What the tree optimizer must know about a draft before it picks a tree."""

    max_depth: int | None = None  # deepest tree the draft can fill; None: any
    level_ms: dict[int, float] = field(default_factory=dict)  # ms per tree level by width, per step at 0; {}: unknown
    # (tree size, measured tokens per step of the draft's per-step trees / of static trees of that
    # size): a draft that shapes its tree each step within the plan's size and depth; (): static
    per_step_gain: tuple[tuple[int, float], ...] = ()

    @property
    def step_ms(self) -> float:
        return draft_step_ms(self.level_ms)

    def cap(self, depth: int) -> int:
        """``depth``, lowered to the deepest tree the draft can fill."""
        return depth if self.max_depth is None else min(depth, self.max_depth)

    def gain(self, sizes: np.ndarray) -> np.ndarray:
        """Expected tokens per step relative to a static tree, by tree size: the measured gains
        interpolated in log size from 1 at one node (nothing to reshape), the largest measured
        size's gain beyond it."""
        sizes = np.asarray(sizes, dtype=np.float64)
        if not self.per_step_gain:
            return np.ones_like(sizes)
        known, gains = (np.array(v, dtype=np.float64) for v in zip((1, 1.0), *sorted(self.per_step_gain)))
        return np.interp(np.log2(np.maximum(sizes, 1)), np.log2(known), gains)


def choose(
    profile: Profile,
    acceptance: Sequence[float] | np.ndarray,  # [k], or [L, k] by tree depth
    prefix_len: int = 256,
    draft_profile: Profile | None = None,
    max_size: int | None = None,
    max_depth: int = 16,
    top: int = 5,
    draft: DraftLimits | None = None,
) -> Choice:
    """:func:`choose_tree` with latencies read from profiles at ``prefix_len``.

    ``draft`` caps ``max_depth`` at the deepest tree the draft can fill. The draft's per-level
    cost comes from ``draft_profile`` (its ``draft`` section, or its target grid when it
    profiles the draft model itself), else from ``draft.level_ms`` (ms per level by width, as a
    trained draft's card records), else from ``profile``'s ``draft`` section; with none of
    them, drafting is taken as free (a model-free proposer such as n-gram).
    """
    draft = draft or DraftLimits()
    largest = int(max(profile.target.tokens))
    max_size = largest if max_size is None else int(max_size)
    if max_size > largest:
        raise ConfigError(
            f"--max-size {max_size} exceeds the largest profiled token count ({largest}); "
            "profile more tokens or lower the budget"
        )
    return choose_tree(
        acceptance,
        lambda n: profile.latency(n, prefix_len),
        draft_latency_fn(profile, draft_profile, prefix_len, draft.level_ms),
        max_size,
        draft.cap(max_depth),
        top=top,
        gain=draft.gain,
        step_ms=0.0 if draft_profile is not None else draft.step_ms,
    )


def draft_step_ms(level_ms: Mapping[int, float] | None) -> float:
    """A trained draft's cost per step beyond its levels' (``level_ms[0]``; 0 where unmeasured):
    taking in the tokens the last step accepted, net of what its first level saves by starting
    from the target's own hidden state (so it can be negative; a step's draft cost is not)."""
    return float((level_ms or {}).get(STEP_KEY, 0.0))


def draft_latency_fn(
    profile: Profile, draft_profile: Profile | None, prefix_len: int, level_ms: Mapping[int, float] | None = None
) -> LatencyFn:
    """Per-level draft cost (ms for a level of ``w`` tokens) from whichever source has it (the
    order of :func:`choose`).

    Widths past the largest measured one scale that cost proportionally (a level twice as
    wide costs at most twice as much), so wide flat trees are never treated as free.
    """
    if draft_profile is not None:
        source = draft_profile
        if source.draft is not None:
            widest, measure = float(source.draft.tokens[-1]), lambda w: source.draft_latency(w, prefix_len)
        else:
            widest, measure = float(source.target.tokens[-1]), lambda w: source.latency(w, prefix_len)
    elif level_ms and set(level_ms) - {STEP_KEY}:
        widths = np.array(sorted(set(level_ms) - {STEP_KEY}), dtype=float)
        costs = np.array([level_ms[int(w)] for w in widths])
        widest, measure = float(widths[-1]), lambda w: float(np.interp(w, widths, costs))
    elif profile.draft is not None:
        widest, measure = float(profile.draft.tokens[-1]), lambda w: profile.draft_latency(w, prefix_len)
    else:
        return lambda w: 0.0
    return lambda w: measure(min(w, widest)) * max(w / widest, 1.0)


# ---------------------------------------------------------------------------- dtype and tree
PLAIN_MARGIN = 1.05  # a tree must beat plain decoding by this factor, else decode plainly
PLAIN = Tree((-1,))  # one node: plain decoding through the engine


@dataclass(frozen=True)
class Plan:
    """The (dtype, tree) pair with the least predicted time per token on one device, against
    plain decoding in the fastest dtype; ``reason`` says why, when the plan is plain decoding."""

    dtype: str
    tree: Tree
    predicted_ms_per_token: float
    plain_dtype: str  # the dtype whose one-token forward is fastest
    plain_ms: float  # its ms per token: the baseline every plan is measured against
    choices: dict[str, Choice]  # the best trees of every dtype
    reason: str | None = None  # why plain decoding, when it is

    @property
    def plain(self) -> bool:
        return self.tree.size == 1

    @property
    def speedup(self) -> float:
        """Predicted speed-up over plain decoding in the fastest dtype."""
        return self.plain_ms / self.predicted_ms_per_token

    @property
    def choice(self) -> Choice:
        return self.choices[self.dtype]


def choose_plan(
    profiles: Mapping[str, Profile],  # dtype -> the target's profile in that dtype, on this device
    acceptance: Sequence[float] | np.ndarray,  # [k], or [L, k] by tree depth
    prefix_len: int = 256,
    drafts: Mapping[str, DraftLimits] | None = None,  # dtype -> the draft's depth cap and cost
    max_depth: int = 16,
    max_size: int | None = None,
    margin: float = PLAIN_MARGIN,
) -> Plan:
    """Pick the dtype and tree with the least predicted time per token (:func:`choose` per
    dtype), or plain decoding in the fastest dtype when no tree beats it by ``margin``.

    Example: verifying 2 tokens costs twice one token, so nothing pays for a second token::

        >>> profile = Profile(LatencyGrid("m", (256,), (1, 2, 4), samples_for([10, 20, 40])), {}, {})
        >>> plan = choose_plan({"float32": profile}, [0.6, 0.2])
        >>> plan.tree.size, plan.reason.split(":")[0]
        (1, 'plain decoding')
    """
    if not profiles:
        raise ConfigError("the plan needs a profile of at least one dtype")
    drafts = drafts or {}
    choices = {
        dtype: choose(profile, acceptance, prefix_len, None,
                      None if max_size is None else min(max_size, int(max(profile.target.tokens))),
                      max_depth, draft=drafts.get(dtype))
        for dtype, profile in profiles.items()
    }
    plain_dtype = min(profiles, key=lambda d: choices[d].autoregressive_ms)
    plain_ms = choices[plain_dtype].autoregressive_ms
    trees = [(c.ms_per_token, d, c) for d, ch in choices.items() for c in ch.ranked if c.size > 1]
    if trees:
        _, best_dtype, best = min(trees, key=lambda t: t[0])
        if best.ms_per_token * margin <= plain_ms:
            return Plan(best_dtype, best.tree, best.ms_per_token, plain_dtype, plain_ms, choices)
    else:  # every runner-up is one node: no tree to report
        best_dtype, best = plain_dtype, choices[plain_dtype].best
    reason = plain_reason(profiles[best_dtype], best, plain_ms, prefix_len, acceptance, margin)
    return Plan(plain_dtype, PLAIN, plain_ms, plain_dtype, plain_ms, choices, reason)


def plain_reason(
    profile: Profile, best: Candidate, plain_ms: float, prefix_len: int,
    acceptance: Sequence[float] | np.ndarray, margin: float = PLAIN_MARGIN,
) -> str:
    """One line: why no tree pays on this device (what a second token costs, what the draft
    accepts, and what the best tree would have gained)."""
    one = profile.latency(1, prefix_len)
    two = profile.latency(min(2, max(profile.target.tokens)), prefix_len)
    p1 = float(np.atleast_2d(np.asarray(acceptance, dtype=float))[0, 0])
    gain = plain_ms / best.ms_per_token
    draft = f" and a draft level {best.draft_ms / max(best.depth, 1):.1f} ms" if best.draft_ms > 0 else ""
    dtype = f" in {profile.dtype}" if profile.dtype else ""
    outcome = ("no tree beats one token per step" if best.size == 1 else
               f"the best tree ({best.size} nodes, {best.expected_tokens:.2f} tokens/step) would reach only "
               f"{gain:.2f}x plain decoding (< {margin:.2f}x)")
    return (f"plain decoding: verifying 2 tokens costs {two / one:.2f}x one token here{dtype}{draft}; "
            f"with the draft's acceptance (p1 = {p1:.2f}) {outcome}")


def samples_for(medians: Sequence[float], repeats: int = 3) -> np.ndarray:  # [1, tokens, repeats]
    """One prefix row of latency samples all equal to ``medians`` (synthetic profiles)."""
    return np.repeat(np.asarray(medians, dtype=float)[None, :, None], repeats, axis=2)
