"""DSI orchestrator: greedy output equals the target's own, and no worker outlives a call."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from sequoia.dsi.orchestrator import DSIOrchestrator, _Run, dsi_generate
from sequoia.dsi.pool import THREAD_PREFIX, ThreadPool
from sequoia.errors import ConfigError

PROMPTS = ([1, 2, 3], [5, 9, 11, 13, 2, 7], [40])
NEW_TOKENS = 24


def _workers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def _reference(target, prompt, new_tokens=NEW_TOKENS, **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=new_tokens, **kwargs)
    return out[0, len(prompt):].tolist()


class ConstantDrafter:
    """A drafter that always proposes the same token: nearly every draft is rejected."""

    def __init__(self, token: int, vocab: int = 64) -> None:
        self.token, self.vocab = token, vocab

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[..., self.token] = 1.0
        return SimpleNamespace(logits=logits)


class Faulty:
    """Wraps a model; on call number ``when`` (and, unless ``once``, every later call) runs
    ``action`` (raise, or send Ctrl-C). A single failing call can belong to a speculation the
    orchestrator preempts and ignores, so a failure that must surface keeps failing."""

    def __init__(self, model, when: int, action, once: bool = True) -> None:
        self.model, self.when, self.action, self.once, self.calls = model, when, action, once, 0
        self.lock = threading.Lock()

    def __call__(self, **kwargs):
        with self.lock:
            self.calls += 1
            fire = self.calls == self.when or (not self.once and self.calls > self.when)
        if fire:
            self.action()
        return self.model(**kwargs)


@pytest.fixture(autouse=True)
def no_workers_left():
    assert not _workers()
    yield
    assert not _workers(), "a DSI worker thread outlived its call"


# ---------------------------------------------------------------- losslessness
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("lookahead,sp_degree", [(1, 1), (1, 3), (3, 2), (4, 4)])
def test_greedy_output_equals_target_generate(tiny_target, tiny_draft, prompt, lookahead, sp_degree):
    expected = _reference(tiny_target, prompt)
    for drafter in (tiny_draft, tiny_target, ConstantDrafter(token=7)):
        out = dsi_generate(tiny_target, drafter, prompt, NEW_TOKENS, lookahead, sp_degree)
        assert out.tokens == expected, (type(drafter).__name__, lookahead, sp_degree)


def test_rejections_are_preempted_and_a_perfect_drafter_never_rejects(tiny_target):
    prompt = [5, 9, 11, 13, 2, 7]
    bad = dsi_generate(tiny_target, ConstantDrafter(token=7), prompt, NEW_TOKENS, 2, 3)
    assert bad.stats.rejections > 5 and bad.stats.drafts > 0
    good = dsi_generate(tiny_target, tiny_target, prompt, NEW_TOKENS, 2, 3)
    assert good.stats.rejections == 0 and good.stats.drafted_output > 0
    assert good.stats.verifications >= 1 and bad.stats.verifications > good.stats.verifications


def test_stops_at_eos_like_generate(tiny_target, tiny_draft):
    prompt = [1, 2, 3]
    eos = _reference(tiny_target, prompt)[5]
    expected = _reference(tiny_target, prompt, eos_token_id=eos, pad_token_id=eos)
    out = dsi_generate(tiny_target, tiny_draft, prompt, NEW_TOKENS, 2, 2, eos_token_id=eos)
    assert out.tokens == expected and out.tokens[-1] == eos and len(out.tokens) < NEW_TOKENS


def test_commit_accepts_agreeing_drafts_and_replaces_the_first_rejected():
    # committed [5, 6], drafts [7, 8]; the target says 7 at position 2 and 9 at position 3.
    run = _Run(spec=[5, 6, 7, 8], committed=2, limit=10, eos_token_id=None)
    run.commit((5, 6, 7, 8), 2, [7, 9, 4])
    assert run.spec == [5, 6, 7, 9] and run.committed == 4 and run.stats.rejections == 1
    # all drafts agreed: the target's next token extends them
    run = _Run(spec=[5, 6, 7], committed=2, limit=10, eos_token_id=None)
    run.commit((5, 6, 7), 2, [7, 3])
    assert run.spec == [5, 6, 7, 3] and run.committed == 4 and run.stats.rejections == 0
    assert not run.is_live((5, 6, 7)) and run.is_live((5, 6, 7, 3, 1))


# ---------------------------------------------------------------- no worker left running
def test_error_in_a_worker_propagates_and_stops_all_workers(tiny_target, tiny_draft):
    def boom():
        raise RuntimeError("target replica failed")

    with pytest.raises(RuntimeError, match="target replica failed"):
        dsi_generate(Faulty(tiny_target, 4, boom, once=False), tiny_draft, [1, 2, 3], 200, 2, 3)


def test_keyboard_interrupt_raised_in_the_drafter_stops_all_workers(tiny_target, tiny_draft):
    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dsi_generate(tiny_target, Faulty(tiny_draft, 3, interrupt, once=False), [1, 2, 3], 200, 2, 3)


def test_ctrl_c_signal_mid_run_stops_all_workers(tiny_target, tiny_draft):
    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)  # the drafter is still busy when the main thread takes the interrupt

    # Python's own handler, as in a terminal (a background job starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        started = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            dsi_generate(tiny_target, Faulty(tiny_draft, 3, ctrl_c), [1, 2, 3], 400, 2, 3)
        assert time.perf_counter() - started < 5.0
    finally:
        signal.signal(signal.SIGINT, previous)


def test_orchestrator_closes_its_pools_on_exit(tiny_target, tiny_draft):
    with DSIOrchestrator(ThreadPool(tiny_target, 2, "target"), ThreadPool(tiny_draft, 1, "drafter"), 2) as dsi:
        first = dsi.generate([1, 2, 3], 8)
        second = dsi.generate([1, 2, 3], 8)  # pools are reusable between calls
        assert first.tokens == second.tokens == _reference(tiny_target, [1, 2, 3], 8)
        assert _workers()  # idle workers stay up until the orchestrator is closed


def test_thread_pool_cancels_queued_tasks():
    release = threading.Event()
    pool = ThreadPool(model="m", size=1, name="test")
    running = pool.submit(lambda model: release.wait(5) and model)
    queued = pool.submit(lambda model: model)
    pool.cancel(queued)
    release.set()
    assert queued.cancelled() and running.result() == "m" and pool.size == 1
    pool.shutdown()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "prompt,new_tokens,lookahead,sp_degree,message",
    [
        ([1, 2], 8, 2, 0, "SP degree"),
        ([1, 2], 8, 0, 2, "lookahead"),
        ([], 8, 2, 2, "prompt"),
        ([1, 2], 0, 2, 2, "max_new_tokens"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_target, prompt, new_tokens, lookahead, sp_degree, message):
    with pytest.raises(ConfigError, match=message):
        dsi_generate(tiny_target, tiny_target, prompt, new_tokens, lookahead, sp_degree)
