"""A real DSI decode loop: drafting and target verifications run concurrently on worker pools.

Greedy and lossless: the output equals the target's own greedy output token for token.
The policy is the one :mod:`sequoia.dsi` simulates:

1. the drafter drafts one token after another on the current speculation ``spec``
   (committed tokens followed by drafts) and never waits for a verification;
2. every ``lookahead`` new drafts, a free target worker verifies all of ``spec``; and whenever
   no running verification covers the first uncommitted position, one starts at once (the
   non-SI thread), so no token waits for more than one target forward plus queueing;
3. a finished verification commits the drafts the target agrees with plus the target's own
   next token; a disagreement replaces the drafts by the target's token (a rejection), and
   every verification or draft that was conditioned on the rejected drafts is preempted.

A verification of ``sequence`` started when ``start`` tokens were committed returns the
target's greedy token for every position ``start .. len(sequence)`` (one forward); its
answer for position ``q`` is valid while ``sequence[:q]`` is the committed text.

Example::

    >>> from sequoia.models import tiny_llama
    >>> out = dsi_generate(tiny_llama(seed=0), tiny_llama(seed=1), [1, 2, 3], 8,
    ...                    lookahead=2, sp_degree=2)
    >>> len(out.tokens)
    8
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from sequoia.dsi.pool import ThreadPool, WorkerPool
from sequoia.errors import ConfigError

POLL_S = 0.05  # the coordinator wakes at least this often, so Ctrl-C is seen promptly


def _logits(model: Any, sequence: tuple[int, ...]) -> torch.Tensor:  # [len(sequence), vocab]
    """One forward over the whole sequence (no cache: any worker can take any task)."""
    ids = torch.tensor([sequence], device=getattr(model, "device", "cpu"))
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits[0]


def target_greedy(model: Any, sequence: tuple[int, ...], start: int) -> list[int]:
    """The model's greedy token for each position ``start .. len(sequence)``, one forward."""
    return _logits(model, sequence)[start - 1 :].argmax(-1).tolist()


def draft_next(model: Any, sequence: tuple[int, ...]) -> int:
    """The drafter's greedy token for position ``len(sequence)``."""
    return int(_logits(model, sequence)[-1].argmax())


@dataclass
class DSIStats:
    """What one generation did; ``drafted_output`` counts output tokens drafted in advance."""

    verifications: int = 0  # started
    preempted: int = 0  # verifications cancelled or whose answer was ignored
    drafts: int = 0  # draft tokens produced, discarded ones included
    rejections: int = 0
    drafted_output: int = 0


@dataclass(frozen=True)
class DSIOutput:
    tokens: list[int]  # the new tokens (prompt excluded)
    stats: DSIStats


@dataclass
class _Run:
    """State of one generation; ``spec[:committed]`` is final, the rest are drafts."""

    spec: list[int]
    committed: int
    limit: int  # total length to reach
    eos_token_id: int | None
    eos_seen: bool = False
    verifying: dict[Future, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    abandoned: set[Future] = field(default_factory=set)  # preempted, maybe still running
    drafting: tuple[Future, tuple[int, ...]] | None = None
    longest_verified: int = -1  # length of the longest sequence sent since the last rejection
    stats: DSIStats = field(default_factory=DSIStats)

    def futures(self) -> set[Future]:
        drafting = {self.drafting[0]} if self.drafting else set()
        return set(self.verifying) | self.abandoned | drafting

    def finished(self) -> bool:
        return self.committed >= self.limit or self.eos_seen

    def is_live(self, sequence: tuple[int, ...]) -> bool:
        """Whether a verification of ``sequence`` can still reveal an uncommitted token."""
        c = self.committed
        return len(sequence) >= c and list(sequence[:c]) == self.spec[:c]

    def commit(self, sequence: tuple[int, ...], start: int, answer: list[int]) -> None:
        """Commit what a live verification established; on a disagreement drop the drafts.

        Example: committed ``[5, 6]``, spec ``[5, 6, 7, 8]``, a verification of ``(5, 6, 7, 8)``
        from 2 answers ``[7, 9, 4]``: 7 is accepted, 9 replaces the draft 8 (a rejection), so
        spec and committed text become ``[5, 6, 7, 9]``.
        """
        q = self.committed
        while q < len(sequence) and sequence[q] == answer[q - start]:
            q += 1  # the target agrees with the draft it was given at q
        token = answer[q - start]  # the target's own token at q
        self.stats.drafted_output += q - self.committed
        if q == len(self.spec):
            self.spec.append(token)  # beyond the drafts: extend them
        elif self.spec[q] == token:
            self.stats.drafted_output += 1  # drafted after this verification started
        else:
            self.spec = list(sequence[:q]) + [token]
            self.longest_verified = -1
            self.stats.rejections += 1
        new = self.spec[self.committed : q + 1]
        self.committed = q + 1
        self.eos_seen = self.eos_seen or self.eos_token_id in new


class DSIOrchestrator:
    """Runs DSI over a target pool (``size`` = SP degree) and a one-worker drafter pool.

    Owns both pools: use it as a context manager (or call :meth:`close`) so that no worker
    outlives it. :meth:`generate` leaves no task of its own running when it returns or
    raises (Ctrl-C included).
    """

    def __init__(self, target_pool: WorkerPool, drafter_pool: WorkerPool, lookahead: int) -> None:
        if lookahead < 1:
            raise ConfigError(f"lookahead must be >= 1, got {lookahead}")
        self.target_pool = target_pool
        self.drafter_pool = drafter_pool
        self.lookahead = lookahead

    def __enter__(self) -> DSIOrchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.target_pool.shutdown()
        finally:
            self.drafter_pool.shutdown()

    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None
    ) -> DSIOutput:
        """Greedy-decode ``max_new_tokens`` tokens (fewer if ``eos_token_id`` comes first)."""
        if len(prompt_ids) < 1:
            raise ConfigError("the prompt must hold at least one token")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        start = len(prompt_ids)
        run = _Run([int(t) for t in prompt_ids], start, start + max_new_tokens, eos_token_id)
        try:
            while not run.finished():
                self._schedule(run)
                done, _ = wait(run.futures(), timeout=POLL_S, return_when=FIRST_COMPLETED)
                for future in done:
                    self._collect(run, future)
        finally:
            self._stop(run)
        new = run.spec[start : min(run.committed, run.limit)]
        if eos_token_id is not None and eos_token_id in new:
            new = new[: new.index(eos_token_id) + 1]
        return DSIOutput(new, run.stats)

    # ------------------------------------------------------------------ steps of the loop
    def _schedule(self, run: _Run) -> None:
        """Keep the drafter busy and start the verifications the policy asks for."""
        if run.drafting is None and len(run.spec) < run.limit:
            sequence = tuple(run.spec)
            run.drafting = (self.drafter_pool.submit(draft_next, sequence), sequence)
        if not run.verifying:  # every running verification is live (stale ones are preempted)
            self._verify(run)  # non-SI thread: the next position must always be in work
        if len(run.spec) - run.longest_verified >= self.lookahead:
            self._verify(run)

    def _verify(self, run: _Run) -> None:
        if len(run.verifying) + len(run.abandoned) >= self.target_pool.size:
            return
        sequence = tuple(run.spec)
        future = self.target_pool.submit(target_greedy, sequence, run.committed)
        run.verifying[future] = (sequence, run.committed)
        run.longest_verified = max(run.longest_verified, len(sequence))
        run.stats.verifications += 1

    def _collect(self, run: _Run, future: Future) -> None:
        """Take one finished task's answer (re-raising its error) and preempt stale work."""
        if future in run.abandoned:
            run.abandoned.discard(future)  # preempted: its answer (or error) is moot
            return
        if run.drafting is not None and future is run.drafting[0]:
            sequence = run.drafting[1]
            run.drafting = None
            token = future.result()
            run.stats.drafts += 1
            if list(sequence) == run.spec and len(run.spec) < run.limit:
                run.spec.append(token)
            return
        sequence, start = run.verifying.pop(future)
        run.commit(sequence, start, future.result())
        for other, (seq, _) in list(run.verifying.items()):
            if not run.is_live(seq):
                self._preempt(run, other)

    def _preempt(self, run: _Run, future: Future) -> None:
        del run.verifying[future]
        self.target_pool.cancel(future)
        run.abandoned.add(future)
        run.stats.preempted += 1

    def _stop(self, run: _Run) -> None:
        """Cancel every task of this run and wait until none is running."""
        for future in set(run.verifying) | run.abandoned:
            self.target_pool.cancel(future)
        if run.drafting is not None:
            self.drafter_pool.cancel(run.drafting[0])
        wait(run.futures())


def dsi_generate(
    target: Any,
    drafter: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    lookahead: int,
    sp_degree: int,
    eos_token_id: int | None = None,
) -> DSIOutput:
    """One DSI generation on local thread pools (``sp_degree`` target workers, one drafter)."""
    if sp_degree < 1:
        raise ConfigError(f"SP degree (target workers) must be >= 1, got {sp_degree}")
    with ExitStack() as stack:  # both pools are shut down however the call ends
        target_pool = ThreadPool(target, sp_degree, "target")
        stack.callback(target_pool.shutdown)
        drafter_pool = ThreadPool(drafter, 1, "drafter")
        stack.callback(drafter_pool.shutdown)
        orchestrator = DSIOrchestrator(target_pool, drafter_pool, lookahead)
        return orchestrator.generate(prompt_ids, max_new_tokens, eos_token_id)
