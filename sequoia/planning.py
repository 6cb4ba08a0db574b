"""The tree a decode runs with: from what the user asked for (a tree file, the solver's tree for
a size and an acceptance file), else the best (dtype, tree) for this device from its measured
profiles; and the :class:`Replanner` that corrects a plan while it decodes."""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sequoia.acceptance import AcceptanceResult
from sequoia.drafts.spec import DraftSpec
from sequoia.errors import ConfigError
from sequoia.optimizer import (
    PLAIN,
    PLAIN_MARGIN,
    DraftLimits,
    LatencyFn,
    Plan,
    choose_plan,
    choose_tree,
    draft_cost,
    draft_latency_fn,
    draft_step_ms,
)
from sequoia.draft_costs import DraftCosts, device_draft_costs
from sequoia.profile_cache import CachedProfile, Progress, Targets, device_dtypes, device_profiles
from sequoia.sampling import SamplingConfig
from sequoia.solver import chain, solve
from sequoia.tree import Tree

DEFAULT_TREE_DEPTH = 4  # a chain, when neither a tree file nor a size and acceptance pick a tree


def plan_tree(
    draft: DraftSpec, tree_file: Path | None, budget: int | None, max_depth: int | None, acceptance: Path | None
) -> Tree:
    """``--tree``, else the solver's tree for ``--budget/--max-depth`` and ``--acceptance``."""
    solver_options = (budget, max_depth, acceptance)
    if tree_file is not None and any(o is not None for o in solver_options):
        raise ConfigError("give either --tree or --budget/--max-depth/--acceptance, not both")
    if draft.kind == "none":
        if tree_file is not None or any(o is not None for o in solver_options):
            raise ConfigError("--draft none decodes one token per step; drop the tree options")
        return Tree((-1,))
    if tree_file is not None:
        return Tree.load(tree_file)
    limits = draft.limits  # a trained draft fills at most its heads' levels
    if acceptance is None:
        if budget is not None or max_depth is not None:
            raise ConfigError("--budget/--max-depth need --acceptance (a sequoia-acceptance/1 file)")
        return chain(limits.cap(DEFAULT_TREE_DEPTH))
    if budget is None:
        raise ConfigError("--acceptance needs --budget (the tree size) here; without it the plan for this device uses it")
    vector = AcceptanceResult.load(acceptance).for_solver
    depth = limits.cap(budget - 1 if max_depth is None else max_depth)
    return solve(vector, budget, depth).tree(budget, depth)


# ---------------------------------------------------------------------------- this device's plan
DEFAULT_ACCEPTANCE = {  # draft kind -> a modest guess, used only when nothing measured exists
    "ngram": (0.3, 0.05, 0.02),
    "early-exit": (0.5, 0.12, 0.05, 0.03),
    "lm": (0.5, 0.12, 0.05, 0.03),
    "trained": (0.45, 0.12, 0.05, 0.03),
}
GREEDY_SPREAD = (0.5, 0.3, 0.2)  # how a level's top-4 minus top-1 agreement spreads over ranks 2-4


def default_acceptance(draft: DraftSpec, sampling: SamplingConfig) -> tuple[np.ndarray, str]:
    """The acceptance to plan with when no file is given, and where it came from: a trained
    draft's card (its measured vector for the nearest temperature when sampling; when greedy,
    its held-out top-1/top-4 agreement per level), else :data:`DEFAULT_ACCEPTANCE` for the
    draft's kind (the :class:`Replanner` then learns the real one while decoding)."""
    card = draft.card or {}
    measured = card.get("acceptance")
    if isinstance(measured, dict) and not sampling.greedy:
        result = AcceptanceResult.from_json(measured, f"{draft} card")
        return result.for_solver, f"{draft}'s card (T={result.temperature:g})"
    levels = (card.get("evaluation") or {}).get("levels") or []
    if sampling.greedy and levels:
        rows = [[lv["top1"], *((lv["top4"] - lv["top1"]) * s for s in GREEDY_SPREAD)] for lv in levels]
        return np.asarray(rows, dtype=np.float64), f"{draft}'s card (held-out top-1/top-4 by level)"
    if isinstance(measured, dict):
        return AcceptanceResult.from_json(measured, f"{draft} card").for_solver, f"{draft}'s card"
    return np.asarray(DEFAULT_ACCEPTANCE.get(draft.kind, (0.0,))), f"a default for {draft.kind} drafts"


@dataclass(frozen=True)
class DevicePlan:
    """The plan for this device and everything it was made from."""

    plan: Plan
    profiles: dict[str, CachedProfile]  # dtype -> this device's profile
    draft_costs: dict[str, DraftCosts]  # dtype -> the draft's cost per level
    acceptance: np.ndarray  # [k] or [L, k]
    acceptance_source: str
    prefix_len: int
    max_depth: int  # after the draft's cap
    per_step_gain: tuple[tuple[int, float], ...] = ()  # a per-step draft's (DraftLimits.per_step_gain)

    def latency_fns(self, dtype: str | None = None) -> tuple[LatencyFn, LatencyFn, float]:
        """(target ms by tokens, draft ms by level width, draft ms per step) of ``dtype`` (the
        plan's): the arguments after the tree of :func:`~sequoia.optimizer.evaluate`."""
        dtype = dtype or self.plan.dtype
        profile, costs = self.profiles[dtype].profile, self.draft_costs[dtype].level_ms
        draft = draft_latency_fn(profile, None, self.prefix_len, costs)
        return (lambda n: profile.latency(n, self.prefix_len)), draft, draft_step_ms(costs)

    @property
    def gains(self) -> Callable[[np.ndarray], np.ndarray]:
        """Expected tokens per step over a static tree's, by tree size: a per-step draft's
        measured gain (1 for a static draft; :meth:`DraftLimits.gain`)."""
        return DraftLimits(per_step_gain=self.per_step_gain).gain

    def gain(self, size: int) -> float:
        """:attr:`gains` at one tree size."""
        return float(self.gains(np.array([size]))[0])

    def replanner(self) -> Replanner | None:
        """A :class:`Replanner` for the plan's tree (None for plain decoding: nothing to fall to)."""
        if self.plan.plain:
            return None
        target_ms, draft_ms, step_ms = self.latency_fns()
        largest = int(max(self.profiles[self.plan.dtype].profile.target.tokens))
        return Replanner(self.plan.tree, self.acceptance, target_ms, draft_ms, largest, self.max_depth,
                         plain_ms=self.plan.plain_ms, gain=self.gains,
                         step_ms=step_ms)

    def describe(self) -> str:
        """One line: the dtype and tree chosen, the prediction and the baseline."""
        p = self.plan
        sources = ", ".join(f"{d} {'measured now' if c.measured else 'cached'}" for d, c in self.profiles.items())
        if p.plain:
            return (f"plan: plain decoding in {p.dtype} ({p.plain_ms:.1f} ms/token predicted; profiles: {sources})")
        return (f"plan: {p.dtype}, tree of {p.tree.size} nodes, depth {p.tree.depth}: predicted "
                f"{p.predicted_ms_per_token:.1f} ms/token, {p.speedup:.2f}x plain {p.plain_dtype} "
                f"({p.plain_ms:.1f} ms/token); acceptance from {self.acceptance_source}; profiles: {sources}")


def plan_on_device(
    target: str,
    draft: DraftSpec,
    acceptance: np.ndarray,  # [k] or [L, k]
    acceptance_source: str = "an acceptance file",
    dtypes: Sequence[str] | None = None,  # None: every dtype the device runs
    device: str = "cpu",
    targets: Targets | None = None,
    prefix_len: int = 256,
    max_depth: int = 16,
    profiles: Sequence[str | Path] = (),
    foreign_ok: bool = False,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    max_size: int | None = None,
    level_ms: Mapping[int, float] | None = None,  # the draft's cost per level, if measured elsewhere
    per_step_gain: tuple[tuple[int, float], ...] = (),  # a per-step draft's, for the sampling planned
) -> DevicePlan:
    """This device's profiles (cached, else measured now; or the ``profiles`` given, checked
    against this device), the draft's cost on it, and the optimizer's (dtype, tree) choice
    with plain decoding in the fastest dtype as the floor (:func:`sequoia.optimizer.choose_plan`)."""
    targets = targets or Targets(target, device, tokenizer=False)
    dtypes = tuple(dtypes) if dtypes else (() if profiles else device_dtypes(device))
    found = device_profiles(target, dtypes, device, targets, profiles, foreign_ok, progress, warn)
    if level_ms is not None:
        costs = {d: DraftCosts(dict(level_ms), "draft profile", d) for d in found}
    else:
        costs = device_draft_costs(draft, target, tuple(found), device, targets, progress)
    depth = draft.limits.cap(max_depth)
    limits = {d: DraftLimits(draft.limits.max_depth, costs[d].level_ms, per_step_gain) for d in found}
    plan = choose_plan({d: c.profile for d, c in found.items()}, acceptance, prefix_len, limits, depth, max_size)
    return DevicePlan(plan, found, costs, np.asarray(acceptance, dtype=np.float64), acceptance_source,
                      prefix_len, depth, per_step_gain)


def plan_for_sampling(
    draft: DraftSpec,
    targets: Targets,
    sampling: SamplingConfig,
    acceptance: Path | None = None,
    dtype: str | None = None,  # None: every dtype the device runs
    device: str = "cpu",
    profiles: Sequence[str | Path] = (),
    foreign_ok: bool = False,
    max_depth: int | None = None,
    prefix_len: int = 256,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
) -> DevicePlan:
    """What ``generate`` and ``serve`` decode a sampling setting with when no tree is given: the
    draft's acceptance (``acceptance``, its card for ``sampling``, or a default) priced with this
    device's profiles (cached, measured now, or given) by :func:`plan_on_device`."""
    if draft.kind == "none":
        vector, source = np.zeros(1), "no draft"
    elif acceptance is not None:
        vector, source = AcceptanceResult.load(acceptance).for_solver, str(acceptance)
    else:
        vector, source = default_acceptance(draft, sampling)
    return plan_on_device(
        targets.spec, draft, vector, source, [dtype] if dtype else None, device, targets,
        prefix_len=max(prefix_len, 1), max_depth=16 if max_depth is None else max_depth,
        profiles=profiles, foreign_ok=foreign_ok, progress=progress, warn=warn,
        per_step_gain=draft.per_step_gain(sampling.greedy),
    )


# ---------------------------------------------------------------------------- re-planning
class Replanner:
    """A plan that corrects itself: the engine reports every step, and when a window of steps
    decoded slower per token than plain decoding, the tree is chosen again from what the steps
    measured -- the draft's acceptance and this device's latency -- instead of the profile alone.

    Rule. Every ``window`` steps, the measured time per token (whole steps: draft, target,
    verification, cache) is compared with plain decoding: the profile's one-token latency, or
    once measured, the time per token of plain steps. When slower, the next ``probe`` steps
    decode plainly (a one-node tree: still lossless) and the ``probe`` after them with the tree
    again, so both are measured fresh and side by side (a burst of other work on a shared CPU
    slows everything for a while: only a comparison made within it, or after it, is fair).
    Then the solver runs again (milliseconds) with the acceptance and latencies measured so far
    (the last ``2 * window`` steps of each tree size, within the last ``4 * window`` steps). If
    no tree beats plain decoding by ``margin`` on those numbers, the plan becomes plain decoding
    -- for ``retry`` steps: then the tree it left is measured again beside plain decoding, since
    whatever made it slow (a burst of other work) may have passed. :meth:`observe` returns the
    new tree when the plan changes, else None.

    Example (a profile that said 16 tokens cost as much as 1, on a device where each token
    costs as much again as the first: the plan shrinks to what pays)::

        replanner = Replanner(tree, [0.6, 0.1], profile_ms, draft_ms, max_size=32, max_depth=8)
        for step in steps:
            new = replanner.observe(step.tree, step.accepted_nodes, timer.last)
            if new is not None:
                engine.set_tree(new)
    """

    def __init__(
        self,
        tree: Tree,
        acceptance: Sequence[float] | np.ndarray,  # [k] or [L, k] by depth: the plan's prior
        target_ms: LatencyFn,  # profile: tokens in one forward -> ms
        draft_ms: LatencyFn,  # profile: nodes in one draft level -> ms
        max_size: int,
        max_depth: int,
        plain_ms: float | None = None,  # the profile's plain decoding, ms per token (default target_ms(1))
        window: int = 8,
        probe: int = 4,
        retry: int = 64,
        margin: float = PLAIN_MARGIN,
        prior_nodes: float = 50.0,
        gain: Callable[[np.ndarray], np.ndarray] | None = None,  # a per-step draft's (choose_tree)
        step_ms: float = 0.0,  # the draft's cost per step beyond its levels (draft_step_ms)
    ) -> None:
        self.tree, self.target_ms, self.draft_ms, self.gain = tree, target_ms, draft_ms, gain
        self.draft_step_ms = step_ms
        self.prior = np.atleast_2d(np.asarray(acceptance, dtype=np.float64))  # [L, k]
        self.by_depth = np.asarray(acceptance).ndim == 2
        self.max_size, self.max_depth = max_size, max_depth
        self.plain_ms = float(target_ms(1.0) if plain_ms is None else plain_ms)
        self.window, self.probe, self.margin, self.prior_nodes = window, probe, margin, prior_nodes
        self.retry, self.plain_run = retry, 0  # steps of plain decoding before trying the tree again
        self.accepted = np.zeros_like(self.prior)  # [L, k] nodes whose child of rank i was accepted
        self.tried = np.zeros_like(self.prior)  # [L, k] nodes that had a child of rank i tried
        self.measured: dict[int, deque[tuple[int, float]]] = {}  # tree size -> (step, ms of step - draft)
        self.draft_ratio: list[float] = []  # measured / predicted draft ms per step
        self.recent: list[tuple[float, int]] = []  # (step ms, tokens) of the current window
        self.phase, self.left, self.before = "run", 0, tree  # run | probe (plain) | confirm (tree again)
        self.why = ""  # what the re-plan after a confirm phase is based on
        self.steps = 0
        self.events: list[str] = []  # one line per change of plan

    def observe(self, tree: Tree, accepted_nodes: Sequence[int], seconds: Mapping[str, float]) -> Tree | None:
        """Record one step (its tree, accepted path, and seconds per section: ``step``,
        ``draft``, ``target`` at least); return the tree to use from now on if it changes."""
        self.steps += 1
        self._count_acceptance(tree, accepted_nodes)
        step, draft = 1e3 * seconds.get("step", 0.0), 1e3 * seconds.get("draft", 0.0)
        if self.steps == 1:  # the first step pays first-call costs and reuses the prefill's root
            return None
        self.measured.setdefault(tree.size, deque(maxlen=2 * self.window)).append((self.steps, step - draft))
        predicted = draft_cost(tree, self.draft_ms, self.draft_step_ms)
        if predicted > 0:
            self.draft_ratio.append(draft / predicted)
        if self.phase != "run":
            self.left -= 1
            if self.left:
                return None
            if self.phase == "probe":  # plain decoding measured: the tree again, side by side
                self.phase, self.left, self.why = "confirm", self.probe, "plain decoding measured"
                return self._switch(self.before)
            self.phase = "run"
            return self._replan(self.why)
        if tree.size == 1 and self.before.size > 1:  # fell to plain decoding: look again now and then
            self.plain_run += 1
            if self.plain_run >= self.retry:
                self.plain_run = 0
                self.measured.pop(self.before.size, None)
                self.phase, self.left, self.why = "confirm", self.probe, f"{self.before.size} nodes measured again"
                return self._switch(self.before)
            return None
        self.recent.append((step, len(accepted_nodes)))
        if len(self.recent) < self.window:
            return None
        ms_per_token = sum(s for s, _ in self.recent) / sum(n for _, n in self.recent)
        self.recent = []
        reference = self._plain_reference()
        if tree.size == 1 or ms_per_token <= reference:
            return None
        self.events.append(f"step {self.steps}: {ms_per_token:.1f} ms/token with {tree.size} nodes, "
                           f"plain decoding {reference:.1f}")
        for size in (1, tree.size):  # decide on fresh measurements only
            self.measured.pop(size, None)
        self.phase, self.left, self.before = "probe", self.probe, tree
        return self._switch(PLAIN)

    # ------------------------------------------------------------------ what was measured
    def acceptance(self) -> np.ndarray:  # [k] or [L, k]
        """The prior blended with the accepted ranks counted so far."""
        rates = (self.prior_nodes * self.prior + self.accepted) / (self.prior_nodes + self.tried)
        return rates if self.by_depth else rates[0]

    def corrected_target_ms(self, n: float) -> float:
        """The profile's step cost for ``n`` nodes times the measured/profiled ratio."""
        recent = self._recent()
        sizes = sorted(recent)
        if not sizes:
            return self.target_ms(n)
        ratios = [statistics.median(recent[s]) / self.target_ms(float(s)) for s in sizes]
        if n <= sizes[-1] or len(sizes) == 1:
            ratio = float(np.interp(n, sizes, ratios))
        else:
            slope = (ratios[-1] - ratios[-2]) / (sizes[-1] - sizes[-2])
            ratio = max(ratios[-1] + slope * (n - sizes[-1]), min(ratios))
        return self.target_ms(n) * ratio

    def draft_correction(self) -> float:
        """Measured over predicted draft cost per step (median; 1 before any is measured)."""
        return statistics.median(self.draft_ratio) if self.draft_ratio else 1.0

    def corrected_draft_ms(self, width: float) -> float:
        return self.draft_ms(width) * self.draft_correction()

    # ------------------------------------------------------------------ helpers
    def _plain_reference(self) -> float:
        recent = self._recent()
        return statistics.median(recent[1]) if 1 in recent else self.plain_ms

    def _recent(self) -> dict[int, list[float]]:
        """ms of (step - draft) by tree size, over the last ``4 * window`` steps: a size not run
        since (the tree a burst made look slow) is extrapolated from those measured lately."""
        since = self.steps - 4 * self.window
        recent = {size: [ms for step, ms in steps if step > since] for size, steps in self.measured.items()}
        return {size: values for size, values in recent.items() if values}

    def _replan(self, why: str) -> Tree | None:
        choice = choose_tree(self.acceptance(), self.corrected_target_ms, self.corrected_draft_ms,
                             self.max_size, self.max_depth, gain=self.gain,
                             step_ms=self.draft_step_ms * self.draft_correction())
        plain = self.corrected_target_ms(1.0)
        best = choice.best
        tree = best.tree if best.size > 1 and best.ms_per_token * self.margin <= plain else PLAIN
        self.events.append(f"step {self.steps}: {why}; {tree.size} nodes, depth {tree.depth} "
                           f"(predicted {min(best.ms_per_token, plain):.1f} ms/token, plain {plain:.1f})")
        return self._switch(tree)

    def _switch(self, tree: Tree) -> Tree | None:
        self.recent = []
        if tree.parents == self.tree.parents:
            return None
        self.tree = tree
        return tree

    def _count_acceptance(self, tree: Tree, path: Sequence[int]) -> None:
        children = tree.children
        depths, ranks = tree.depths, tree.ranks
        rows, width = self.prior.shape
        for j, node in enumerate(path):
            kids = children[node]
            if not kids:
                continue
            row = min(int(depths[node]), rows - 1)
            self.tried[row, : min(len(kids), width)] += 1
            if j + 1 < len(path) and ranks[path[j + 1]] < width:
                self.accepted[row, ranks[path[j + 1]]] += 1

