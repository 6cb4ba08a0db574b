"""Simulator of non-SI, SI and DSI (distributed speculative inference) latency per token.

Model (as in Timor et al., arXiv 2405.14105): one target forward takes ``target_latency``
whatever the number of tokens it verifies; one drafted token takes ``drafter_latency``; each
draft is accepted independently with probability ``acceptance`` given a correct prefix.

* **non-SI** decodes one token per target forward: ``target_latency`` per token.
* **SI** drafts ``lookahead = k`` tokens, then one target forward verifies them: a step costs
  ``k * drafter_latency + target_latency`` and yields ``min(G, k) + 1`` tokens, where ``G`` is
  the number of leading accepted drafts (geometric); ``E[tokens] = (1 - a**(k+1)) / (1 - a)``.
* **DSI** runs the drafter without pause and ``sp_degree`` target instances at once. Every
  ``k`` new drafts, a free target instance verifies all drafts so far; whenever no running
  verification covers the first unknown position, one is started at once (the *non-SI
  thread*), so a token is never slower than one target forward. The first verification that
  reveals a rejected draft preempts everything and restarts from the corrected prefix.

A DSI *epoch* (from one restart to the next) yields ``A + 1`` tokens, ``A`` the number of
leading correct drafts. Before the rejection is revealed the run is identical to the run in
which every draft is correct, so one event-driven simulation of that run (a heap of events)
gives ``reveal[m]``, the time the target token at position ``m + 1`` becomes known, and the
epoch lasts ``reveal[A]``. Epochs are independent, so the latency per token is
``E[reveal[A]] / E[A + 1]`` (renewal-reward); ``A`` is sampled by Monte Carlo with a seed,
capped at ``horizon - 1`` (no run of correct drafts outlasts the generation).

Example::

    >>> r = simulate(DSIConfig(target_latency=1.0, drafter_latency=0.9, acceptance=0.1,
    ...                        lookahead=1, sp_degree=7), samples=2000)
    >>> r.si.mean > r.non_si >= r.dsi.mean   # SI is slower than plain decoding, DSI is not
    True
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from sequoia.errors import ConfigError

DEFAULT_HORIZON = 1000  # tokens per generation, as the paper's S = 1000
DEFAULT_SAMPLES = 20_000
DEFAULT_SP_DEGREE = 7  # one 8-GPU node: seven target instances next to the drafter
DEFAULT_DRAFTER_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0
DEFAULT_ACCEPTANCES = tuple(round(0.05 * i, 2) for i in range(0, 20))  # 0.0 .. 0.95
DEFAULT_LOOKAHEADS = tuple(range(1, 11))


@dataclass(frozen=True)
class DSIConfig:
    """One simulated setting; latencies share one unit (the CLI uses milliseconds)."""

    target_latency: float  # one target forward
    drafter_latency: float  # one drafted token
    acceptance: float  # per-token acceptance rate a, in [0, 1]
    lookahead: int  # k drafts per verification, >= 1
    sp_degree: int  # target instances running at once (speculation parallelism), >= 1
    horizon: int = DEFAULT_HORIZON  # generation length: cap on one run of correct drafts

    def __post_init__(self) -> None:
        for name in ("target_latency", "drafter_latency"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name.replace('_', ' ')} must be > 0, got {value}")
        if not 0.0 <= self.acceptance <= 1.0:
            raise ConfigError(f"acceptance rate must be in [0, 1], got {self.acceptance}")
        if self.lookahead < 1:
            raise ConfigError(f"lookahead must be >= 1, got {self.lookahead}")
        if self.sp_degree < 1:
            raise ConfigError(f"SP degree (target instances) must be >= 1, got {self.sp_degree}")
        if self.horizon < 1:
            raise ConfigError(f"horizon must be >= 1 token, got {self.horizon}")


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo mean and its standard error."""

    mean: float
    stderr: float


@dataclass(frozen=True)
class SimResult:
    """Latency per generated token of each algorithm (unit of the config), and SI's tokens/step."""

    config: DSIConfig
    non_si: float
    si: Estimate
    dsi: Estimate
    si_tokens_per_step: Estimate  # includes the bonus token

    @property
    def si_speedup(self) -> float:
        """SI over non-SI (< 1: SI is slower than plain decoding)."""
        return self.non_si / self.si.mean

    @property
    def dsi_speedup_vs_si(self) -> float:
        return self.si.mean / self.dsi.mean

    @property
    def dsi_speedup_vs_non_si(self) -> float:
        return self.non_si / self.dsi.mean

    def to_json(self) -> dict:
        return {
            "config": asdict(self.config),
            "latency_per_token": {
                "non_si": self.non_si,
                "si": asdict(self.si),
                "dsi": asdict(self.dsi),
            },
            "si_tokens_per_step": asdict(self.si_tokens_per_step),
            "speedup": {
                "si_vs_non_si": self.si_speedup,
                "dsi_vs_si": self.dsi_speedup_vs_si,
                "dsi_vs_non_si": self.dsi_speedup_vs_non_si,
            },
        }


@lru_cache(maxsize=4096)
def reveal_times(
    target_latency: float, drafter_latency: float, lookahead: int, sp_degree: int, horizon: int
) -> np.ndarray:  # [horizon] float64
    """Event-driven DSI run in which every draft is correct: when each position is known.

    ``reveal[m]`` is the time at which the target token at position ``m + 1`` (counted from
    the epoch start) is known. A verification started with ``p`` drafts ends one target
    forward later and reveals positions up to ``p + 1``.

    Example (target 1, drafter 0.5, k = 2, enough instances): the non-SI thread starts at 0
    and reveals position 1 at 1.0; drafts 1-2 are done at 1.0, verified by 2.0 (positions up
    to 3); drafts 3-4 at 2.0, verified by 3.0; so every half time unit one more token::

        >>> reveal_times(1.0, 0.5, 2, 7, 5).tolist()
        [1.0, 2.0, 2.0, 3.0, 3.0]
    """
    reveal = np.empty(horizon)
    draft_event, task_event = -1, 0  # at equal times a draft is handled first: freshest drafts
    events: list[tuple[float, int, int]] = [(drafter_latency, draft_event, 1)]  # (time, kind, value)
    running: list[int] = []  # drafts verified by each running verification
    state = {"known": 0, "drafted": 0, "max_started": -1}

    def start(now: float, drafts: int) -> None:
        running.append(drafts)
        state["max_started"] = max(state["max_started"], drafts)
        heapq.heappush(events, (now + target_latency, task_event, drafts))

    def spawn(now: float) -> None:
        known, drafted = state["known"], state["drafted"]
        if len(running) < sp_degree and not any(p >= known for p in running):
            start(now, max(drafted, known))  # non-SI thread: the next position is uncovered
        if len(running) < sp_degree and drafted - state["max_started"] >= lookahead:
            start(now, drafted)  # k new drafts since the last verification started

    start(0.0, 0)
    while state["known"] < horizon:
        now, kind, value = heapq.heappop(events)
        if kind == draft_event:
            if value != state["drafted"] + 1:
                continue  # stale: the drafter was moved to the known frontier
            state["drafted"] = value
        else:
            running.remove(value)
            if value + 1 > state["known"]:
                reveal[state["known"] : min(value + 1, horizon)] = now
                state["known"] = value + 1
            if state["known"] > state["drafted"]:  # target is ahead: draft from its frontier
                state["drafted"] = state["known"]
            else:
                spawn(now)
                continue
        heapq.heappush(events, (now + drafter_latency, draft_event, state["drafted"] + 1))
        spawn(now)
    reveal.flags.writeable = False  # cached: shared by every caller
    return reveal


@lru_cache(maxsize=8)
def _log_uniforms(samples: int, seed: int) -> np.ndarray:  # [samples] read-only, <= 0
    logs = np.log(1.0 - np.random.default_rng(seed).random(samples))  # uniform in (0, 1]
    logs.flags.writeable = False
    return logs


def _leading_accepts(acceptance: float, samples: int, seed: int, cap: int) -> np.ndarray:
    """``samples`` draws of the number of leading accepted drafts, capped at ``cap``.

    Inverse-CDF sampling (``P(G >= g) = a**g``) from one seeded uniform stream, so every
    setting with the same seed sees the same random numbers: common random numbers make
    comparisons between algorithms, lookaheads and grid points less noisy.
    """
    if acceptance == 0.0:
        return np.zeros(samples, dtype=np.int64)
    if acceptance == 1.0:
        return np.full(samples, cap, dtype=np.int64)
    draws = np.floor(_log_uniforms(samples, seed) / math.log(acceptance))
    return np.minimum(draws, cap).astype(np.int64)


def _ratio(times: np.ndarray, tokens: np.ndarray) -> Estimate:
    """Renewal-reward estimate of time per token, with a delta-method standard error."""
    mean = times.sum() / tokens.sum()
    resid = times - mean * tokens
    stderr = resid.std(ddof=1) / math.sqrt(len(times)) / tokens.mean()
    return Estimate(float(mean), float(stderr))


def simulate(config: DSIConfig, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> SimResult:
    """Monte Carlo latency per token of non-SI, SI and DSI for one setting (see module doc)."""
    if samples < 2:
        raise ConfigError(f"samples must be >= 2, got {samples}")
    c = config
    si_tokens = _leading_accepts(c.acceptance, samples, seed, c.lookahead) + 1
    si_step = c.lookahead * c.drafter_latency + c.target_latency
    tokens = Estimate(float(si_tokens.mean()), float(si_tokens.std(ddof=1) / math.sqrt(samples)))
    si = Estimate(si_step / tokens.mean, si_step * tokens.stderr / tokens.mean**2)

    accepted = _leading_accepts(c.acceptance, samples, seed, c.horizon - 1)
    reveal = reveal_times(
        c.target_latency, c.drafter_latency, c.lookahead, c.sp_degree, c.horizon
    )
    dsi = _ratio(reveal[accepted], accepted + 1)
    return SimResult(c, c.target_latency, si, dsi, tokens)


@dataclass(frozen=True)
class Grid:
    """Best-lookahead latencies per token over drafter fraction x acceptance (target = 1)."""

    drafter_fractions: tuple[float, ...]
    acceptances: tuple[float, ...]
    lookaheads: tuple[int, ...]
    sp_degree: int
    si: np.ndarray  # [len(acceptances), len(drafter_fractions)] latency / target latency
    dsi: np.ndarray  # [len(acceptances), len(drafter_fractions)]
    si_lookahead: np.ndarray  # [len(acceptances), len(drafter_fractions)] int, argmin
    dsi_lookahead: np.ndarray  # [len(acceptances), len(drafter_fractions)] int

    def to_json(self) -> dict:
        return {
            "drafter_fractions": list(self.drafter_fractions),
            "acceptances": list(self.acceptances),
            "lookaheads": list(self.lookaheads),
            "sp_degree": self.sp_degree,
            "non_si": 1.0,
            "si": self.si.tolist(),
            "dsi": self.dsi.tolist(),
            "si_lookahead": self.si_lookahead.tolist(),
            "dsi_lookahead": self.dsi_lookahead.tolist(),
        }


def best_over_lookaheads(
    target_latency: float,
    drafter_latency: float,
    acceptance: float,
    lookaheads: Sequence[int],
    sp_degree: int,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> tuple[SimResult, SimResult]:
    """The SI result at SI's best lookahead and the DSI result at DSI's best lookahead.

    The paper tunes the lookahead of each algorithm separately; so does this.
    """
    if not lookaheads:
        raise ConfigError("give at least one lookahead")
    results = [
        simulate(
            DSIConfig(target_latency, drafter_latency, acceptance, k, sp_degree), samples, seed
        )
        for k in lookaheads
    ]
    return min(results, key=lambda r: r.si.mean), min(results, key=lambda r: r.dsi.mean)


def grid(
    drafter_fractions: Sequence[float] = DEFAULT_DRAFTER_FRACTIONS,
    acceptances: Sequence[float] = DEFAULT_ACCEPTANCES,
    lookaheads: Sequence[int] = DEFAULT_LOOKAHEADS,
    sp_degree: int = DEFAULT_SP_DEGREE,
    samples: int = 4000,
    seed: int = 0,
) -> Grid:
    """Simulate every (drafter latency / target latency, acceptance) point; target latency 1."""
    shape = (len(acceptances), len(drafter_fractions))
    si, dsi = np.empty(shape), np.empty(shape)
    si_k, dsi_k = np.empty(shape, dtype=np.int64), np.empty(shape, dtype=np.int64)
    for i, a in enumerate(acceptances):
        for j, c in enumerate(drafter_fractions):
            best_si, best_dsi = best_over_lookaheads(1.0, c, a, lookaheads, sp_degree, samples, seed)
            si[i, j], si_k[i, j] = best_si.si.mean, best_si.config.lookahead
            dsi[i, j], dsi_k[i, j] = best_dsi.dsi.mean, best_dsi.config.lookahead
    return Grid(
        tuple(drafter_fractions), tuple(acceptances), tuple(lookaheads), sp_degree,
        si, dsi, si_k, dsi_k,
    )
