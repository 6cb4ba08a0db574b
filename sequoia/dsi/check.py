"""Check the DSI orchestrator against the simulator, with latency-injected models.

On this CPU the forwards of tiny models last a millisecond and share two cores, so the
orchestrator cannot show a real speed-up. A forward that mostly *waits* -- as a GPU forward
does, for the CPU thread that launched it -- does overlap across threads. :class:`Delayed`
adds a fixed sleep to every forward and :class:`NoisyDrafter` turns the target into a
drafter with a chosen per-token acceptance rate, so the orchestrator's wall time per token
can be compared with :func:`sequoia.dsi.simulate` for the same latencies, acceptance,
lookahead and SP degree, and with non-SI decoding by the same delayed target.

Example::

    >>> from sequoia.models import tiny_llama
    >>> r = check(tiny_llama(seed=0), [[1, 2, 3]], 8, target_delay_ms=5.0, drafter_delay_ms=1.0,
    ...           acceptance=0.8, lookahead=2, sp_degree=2)
    >>> r.lossless
    True
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sequoia.dsi.simulator import DSIConfig, SimResult, simulate
from sequoia.dsi.orchestrator import dsi_generate, target_greedy
from sequoia.errors import ConfigError


CHECK_PROMPTS = ((1, 2, 3), (5, 9, 11, 13, 2, 7), (40,))  # token ids for tiny_llama (vocab 64)


class Delayed:
    """A model whose every forward also sleeps ``delay_ms`` (releasing the GIL, like a GPU);
    ``durations`` records how long each call really took, in ms."""

    def __init__(self, model: Any, delay_ms: float) -> None:
        self.model, self.delay_s = model, delay_ms / 1000
        self.durations: list[float] = []

    def __call__(self, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self.model(**kwargs)
        time.sleep(self.delay_s)
        self.durations.append(1000 * (time.perf_counter() - start))
        return out


class NoisyDrafter(Delayed):
    """The target as a drafter that is right with probability ``acceptance`` per token.

    Whether the draft after a prefix is right is a deterministic hash of the prefix, so the
    same prefix always gets the same draft; a wrong draft is the target's runner-up token.
    """

    def __init__(self, model: Any, acceptance: float, delay_ms: float, seed: int = 0) -> None:
        super().__init__(model, delay_ms)
        self.acceptance, self.seed = acceptance, seed

    def is_right(self, prefix: Sequence[int]) -> bool:
        digest = hashlib.sha256(f"{self.seed}:{list(prefix)}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < self.acceptance

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False) -> Any:
        out = super().__call__(input_ids=input_ids, use_cache=use_cache)
        if not self.is_right(input_ids[0].tolist()):
            out.logits[0, -1, out.logits[0, -1].argmax()] = torch.finfo(out.logits.dtype).min
        return out


@dataclass(frozen=True)
class CheckResult:
    """Measured ms per token of non-SI and DSI next to the simulator's prediction."""

    target_ms: float  # median duration of a target forward during the DSI runs
    drafter_ms: float  # median duration of a draft during the DSI runs
    acceptance: float  # realised: share of the target's tokens the drafter got right
    non_si_ms: float  # measured, per token
    dsi_ms: float  # measured, per token
    simulated: SimResult  # at the effective latencies and the requested acceptance
    lossless: bool  # DSI output == non-SI output for every prompt

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "simulated"},
                "simulated": self.simulated.to_json()}


def check(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    target_delay_ms: float,
    drafter_delay_ms: float,
    acceptance: float,
    lookahead: int,
    sp_degree: int,
    samples: int = 20_000,
) -> CheckResult:
    """Decode every prompt with non-SI and with DSI on delayed models; simulate DSI with the
    forward durations measured during the DSI runs (concurrent forwards may slow each other
    on a small CPU, which the simulator's fixed latencies then include)."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ConfigError("give at least one non-empty prompt")
    DSIConfig(1.0, 1.0, acceptance, lookahead, sp_degree)  # one-line errors before any work
    target, drafter = Delayed(model, target_delay_ms), NoisyDrafter(model, acceptance, drafter_delay_ms)
    target_greedy(model, tuple(prompts[0]), 1)  # untimed warm-up: first calls pay lazy set-up
    references = []
    start = time.perf_counter()
    for prompt in prompts:  # non-SI: one delayed target forward per token
        sequence = [int(t) for t in prompt]
        for _ in range(max_new_tokens):
            sequence.append(target_greedy(target, tuple(sequence), len(sequence))[-1])
        references.append(sequence[len(prompt) :])
    non_si_s = time.perf_counter() - start
    target.durations.clear()  # from here on, only forwards of the DSI runs
    start = time.perf_counter()
    outputs = [dsi_generate(target, drafter, p, max_new_tokens, lookahead, sp_degree).tokens for p in prompts]
    dsi_s = time.perf_counter() - start
    right = sum(
        drafter.is_right([*prompt, *ref[:i]]) for prompt, ref in zip(prompts, references) for i in range(len(ref))
    )
    target_ms, drafter_ms = statistics.median(target.durations), statistics.median(drafter.durations)
    tokens = max_new_tokens * len(prompts)
    simulated = simulate(DSIConfig(target_ms, drafter_ms, acceptance, lookahead, sp_degree), samples)
    return CheckResult(target_ms, drafter_ms, right / tokens, 1000 * non_si_s / tokens,
                       1000 * dsi_s / tokens, simulated, outputs == references)
