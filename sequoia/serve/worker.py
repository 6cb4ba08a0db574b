"""The engine worker: one thread decodes one job at a time, in the order the jobs came.

A :class:`Job` carries everything one request needs (prompt ids, sampling, seed, limits, stop
strings) and an output channel, ``emit``, which receives :class:`Chunk` events and then exactly
one :class:`Done` or :class:`Failed`. The queue in front of the worker is bounded: a full queue
refuses a job at once (:class:`QueueFullError`) instead of letting waits grow without limit.
A job's ``cancel()`` (its client went away, the server is stopping) takes effect before the
next engine step. Batching several jobs into one tree forward later means a worker that takes
several jobs from the same queue; the job and event types stay as they are.

Output is lossless because each job gets its own :class:`~sequoia.engine.Engine` (seeded with
the job's seed) over the one loaded model and proposer: greedy output is the target's greedy
output token for token, and sampled output is the engine's verified sampling with that seed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sequoia.drafts.base import Proposer
from sequoia.engine import STOP_EOS, VERIFIERS, Engine
from sequoia.errors import ConfigError, SequoiaError
from sequoia.models import eos_token_ids
from sequoia.prompts import render_messages
from sequoia.sampling import SamplingConfig
from sequoia.serve.metrics import ServeMetrics
from sequoia.serve.text import TextStream
from sequoia.tree import Tree

log = logging.getLogger(__name__)
FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


class QueueFullError(SequoiaError):
    """Every place in the queue is taken; the client should retry later."""


class ShuttingDownError(SequoiaError):
    """The server is stopping and takes no more jobs."""


@dataclass(frozen=True)
class Chunk:
    """Text that is final (never changes), in order."""

    text: str


@dataclass(frozen=True)
class Done:
    """The job ended; ``finish_reason`` is ``stop`` (EOS or a stop string), ``length`` (max
    tokens or the context) or ``cancelled``."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    steps: int


@dataclass(frozen=True)
class Failed:
    """The job could not be decoded (a :class:`SequoiaError` is the request's fault)."""

    error: Exception


Event = Chunk | Done | Failed


def _discard(event: Event) -> None:
    pass


@dataclass(eq=False)
class Job:
    """One request for the engine, and the channel its output goes to."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    emit: Callable[[Event], None] = _discard  # called on the worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop before the next engine step (or skip the job if it has not started)."""
        self.cancelled.set()


@dataclass(frozen=True)
class ServedModel:
    """What the server decodes with, loaded once: the target and its tokenizer, the proposer,
    and the tree to speculate with for a request's sampling settings."""

    name: str  # the model id clients ask for
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    proposer: Proposer
    tree_for: Callable[[SamplingConfig], Tree]
    verifier: str = "sequoia"
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's own (as generate stops)
    # A fast tokenizer used from two threads at once can fail ("Already borrowed").
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.verifier not in VERIFIERS:
            raise ConfigError(f"unknown verifier {self.verifier!r}; choose one of {', '.join(VERIFIERS)}")
        if self.eos_token_ids is None:
            object.__setattr__(self, "eos_token_ids", eos_token_ids(self.model, self.tokenizer))

    @property
    def max_context(self) -> int:
        """Positions the target holds: prompt plus output."""
        return int(self.model.config.max_position_embeddings)

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return self.tokenizer(text)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Through the chat template (a :class:`ConfigError` if the tokenizer has none)."""
        with self.tokenizer_lock:
            return render_messages(self.tokenizer, messages)

    def decode(self, ids: list[int]) -> str:
        """As ``sequoia generate`` shows text: special tokens skipped."""
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def engine(self, sampling: SamplingConfig, seed: int) -> Engine:
        return Engine(
            self.model, self.proposer, self.tree_for(sampling), sampling,
            verifier=self.verifier, seed=seed, eos_token_ids=self.eos_token_ids,
        )


class Worker:
    """A bounded FIFO queue of jobs and the one thread that decodes them."""

    def __init__(self, served: ServedModel, max_queue: int = 16, metrics: ServeMetrics | None = None) -> None:
        if max_queue < 1:
            raise ConfigError(f"the queue must hold at least 1 request, got {max_queue}")
        self.served = served
        self.max_queue = max_queue
        self.metrics = metrics or ServeMetrics()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._stopping = False  # no new jobs
        self._cancelling = False  # every job cancelled, also one between queue and engine
        self._thread: threading.Thread | None = None
        self.current: Job | None = None  # the job being decoded
        self.finished = 0  # jobs that ran to their end
        self.cancelled = 0  # jobs cancelled, before or while decoding
        self.metrics.track_queue(self._queue.qsize)

    @property
    def queue_length(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        # daemon: a forced exit (second Ctrl-C) must not hang on a step in progress
        self._thread = threading.Thread(target=self._run, name="sequoia-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFullError` or :class:`ShuttingDownError`."""
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFullError(
                    f"the server's queue is full ({self.max_queue} requests waiting); retry later"
                ) from None

    def drain(self, timeout: float) -> None:
        """Take no new jobs; cancel the jobs still waiting or running ``timeout`` seconds from
        now (a server's graceful shutdown: what can finish in time finishes)."""
        with self._lock:
            self._stopping = True
        timer = threading.Timer(timeout, self._cancel_all)
        timer.daemon = True
        timer.start()

    def _cancel_all(self) -> None:
        """Cancel the waiting jobs (each fails with :class:`ShuttingDownError`) and the running
        one (it ends within one step, with finish reason ``cancelled``)."""
        waiting = []
        with self._lock:
            self._stopping = self._cancelling = True
            while True:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in waiting:  # stop()'s wake-up call stays queued
                self._queue.put_nowait(None)
        for job in waiting:
            if job is not None:
                job.cancel()
                self._cancelled(job)
                job.emit(Failed(ShuttingDownError("the server is shutting down")))
        running = self.current
        if running is not None:
            running.cancel()

    def stop(self, timeout: float = 30.0) -> bool:
        """Refuse new jobs, cancel the waiting ones and the running one, and wait for the
        thread to exit; returns whether it did."""
        self._cancel_all()
        if self._thread is None:
            return True
        with self._lock:
            if self._thread.is_alive():
                try:
                    self._queue.put_nowait(None)  # wakes the thread; the queue was just emptied
                except queue.Full:  # a second stop() already queued the wake-up
                    pass
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._is_cancelled(job):
                self._cancelled(job)
                job.emit(Done(FINISH_CANCELLED, len(job.prompt_ids), 0, 0))
                continue
            self.current = job
            self.metrics.running.set(1)
            try:
                self._decode(job)
            except Exception as exc:  # the request's fault or a bug: either way the worker goes on
                if not isinstance(exc, SequoiaError):
                    log.exception("decoding a job failed")
                job.emit(Failed(exc))
            finally:
                self.current = None
                self.metrics.running.set(0)

    def _decode(self, job: Job) -> None:
        engine = self.served.engine(job.sampling, job.seed)
        stream = TextStream(self.served.decode, job.stop)
        engine.start(torch.tensor(job.prompt_ids, dtype=torch.long), job.max_tokens)
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        started = time.perf_counter()
        cancelled = False
        while engine.stop is None and not stream.stopped:
            if self._is_cancelled(job):
                cancelled = True
                break
            step = engine.step()
            consumed = len(stream.tokens)
            text = stream.push(step.tokens)
            self.metrics.observe_step(step.num_accepted, len(stream.tokens) - consumed)
            if engine.stats.steps == 1:
                self.metrics.time_to_first_token.observe(time.perf_counter() - job.queued_at)
            if text:
                job.emit(Chunk(text))
        if cancelled:
            self._cancelled(job)
            reason = FINISH_CANCELLED
        else:
            tail = stream.flush()
            if tail:
                job.emit(Chunk(tail))
            reason = FINISH_STOP if stream.stopped or engine.stop == STOP_EOS else FINISH_LENGTH
            self.finished += 1
        generated = len(stream.tokens)
        if generated:
            self.metrics.time_per_token.observe((time.perf_counter() - started) / generated)
        job.emit(Done(reason, len(job.prompt_ids), generated, engine.stats.steps))

    def _is_cancelled(self, job: Job) -> bool:
        if self._cancelling:
            job.cancel()
        return job.cancelled.is_set()

    def _cancelled(self, job: Job) -> None:
        self.cancelled += 1
        self.metrics.cancelled.inc()
