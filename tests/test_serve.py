"""``sequoia serve`` on tiny seeded models: the real uvicorn server on a free local port, talked
to with the official ``openai`` client and with httpx. Greedy answers equal the engine's and
plain greedy decoding's, seeded samples equal the engine's, concurrent clients each get their
own answer, a client that leaves frees the engine, bad requests get OpenAI errors, metrics
and the CLI's errors and SIGTERM shutdown."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from cli_helpers import assert_user_error, cache_profiles, invoke
from word_tokenizer import WORDS, word_tokenizer

from sequoia.drafts import LMProposer, NgramProposer
from sequoia.drafts.base import Draft, DraftContext, Proposer
from sequoia.engine import Engine
from sequoia.models import tiny_llama
from sequoia.sampling import SamplingConfig
from sequoia.serve import ServedModel, Server, create_app
from sequoia.serve.text import TextStream
from sequoia.tree import Tree

NAME = "tiny"
TREE = Tree.from_children_counts([2, 2, 1, 1, 1])
PROMPT = "w3 w1 w4 w1 w5 w9 w2 w6"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}w7"


def _tokenizer():
    tok = word_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _served(proposer: Proposer) -> ServedModel:
    return ServedModel(NAME, tiny_llama(seed=0), _tokenizer(), proposer, lambda sampling: TREE)


class _Server:
    """uvicorn serving ``app`` from a background thread on a free port of 127.0.0.1."""

    def __init__(self, app, shutdown_timeout: float = 2.0) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = Server(app, shutdown_timeout)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert not self.app.state.worker.alive  # the lifespan shutdown stopped the engine thread

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=30)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def server():
    """The main server: the tiny target with a different tiny model as its LM draft."""
    with _Server(create_app(_served(LMProposer(tiny_llama(seed=1))))) as running:
        yield running


class _GatedProposer:
    """An n-gram draft that waits for ``gate`` and then ``delay`` seconds before each proposal,
    so a test can hold the engine inside a job."""

    needs_hidden_states = False

    def __init__(self) -> None:
        self.inner, self.gate, self.delay, self.fail_next = NgramProposer(), threading.Event(), 0.0, False
        self.gate.set()

    def reset(self) -> None:
        self.inner.reset()

    def warmup(self) -> None:
        pass

    def propose(self, ctx: DraftContext, tree: Tree) -> Draft:
        self.gate.wait()
        time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a bug in the draft")
        return self.inner.propose(ctx, tree)

    def observe(self, step) -> None:
        self.inner.observe(step)


@pytest.fixture(scope="module")
def gated():
    """A server whose queue holds one waiting request and whose draft a test can slow or stop."""
    proposer = _GatedProposer()
    with _Server(create_app(_served(proposer), max_queue=1)) as running:
        running.proposer = proposer
        yield running


# ---------------------------------------------------------------------------- references
def _engine_text(prompt_ids: list[int], max_tokens: int, sampling=SamplingConfig(), seed: int = 0) -> str:
    engine = Engine(tiny_llama(seed=0), LMProposer(tiny_llama(seed=1)), TREE, sampling, seed=seed)
    list(engine.generate(torch.tensor(prompt_ids), max_tokens))
    return _tokenizer().decode(engine.tokens, skip_special_tokens=True)


def _plain_greedy_text(prompt_ids: list[int], max_tokens: int) -> str:
    ids = torch.tensor([prompt_ids])
    out = tiny_llama(seed=0).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_tokens, pad_token_id=0)
    return _tokenizer().decode(out[0, len(prompt_ids):])


def _ids(text: str) -> list[int]:
    return _tokenizer()(text)["input_ids"]


def _chat_ids(text: str) -> list[int]:
    return _ids(f"{text} w7")


# ---------------------------------------------------------------------------- the OpenAI API
def test_openai_client_greedy_equals_engine_and_plain_greedy(server):
    client = server.client()
    expected = _plain_greedy_text(_ids(PROMPT), 20)
    assert expected == _engine_text(_ids(PROMPT), 20) and len(expected.split()) == 20

    done = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (8, 20, 28)
    pieces = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == expected and len(pieces) > 2
    assert pieces[-1].choices[0].finish_reason == "length"

    chat_expected = _plain_greedy_text(_chat_ids(PROMPT), 12)
    messages = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == chat_expected and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == 9 and reply.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stop_strings_cut_text_streamed_or_not(server):
    client = server.client()
    full = _plain_greedy_text(_ids(PROMPT), 20)
    words = full.split()
    stop = f" {words[6]} {words[7]}"  # spans two tokens; cut before its first occurrence
    expected = full[: full.find(stop)]
    tokens = len(expected.split()) + 2  # the completion ends with the token that completes the stop
    done = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "zzz"])
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == tokens
    pieces = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == expected
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_engine_with_that_seed(server):
    client = server.client()
    sampling = SamplingConfig(0.9, top_p=0.95)
    expected = _engine_text(_ids(PROMPT), 16, sampling, seed=1234)
    answers = [client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.95,
                                         seed=1234).choices[0].text for _ in range(2)]
    assert answers == [expected, expected]
    other = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    assert other.choices[0].text != expected  # the seed matters (a collision is vanishingly unlikely)


def test_eight_concurrent_clients_each_get_their_own_answer(server):
    rng = random.Random(0)
    requests = [
        {"prompt": " ".join(rng.choices(WORDS[1:], k=rng.randint(2, 12))), "max_tokens": rng.randint(8, 24),
         "temperature": 0 if i % 2 else 1.0, "seed": i, "stream": i % 4 < 2}
        for i in range(8)
    ]

    def ask(request: dict) -> str:
        answer = server.client().completions.create(model=NAME, **request)
        if request["stream"]:
            return "".join(piece.choices[0].text for piece in answer)
        return answer.choices[0].text

    sequential = [ask(r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, requests))
    assert concurrent == sequential
    greedy = [i for i, r in enumerate(requests) if r["temperature"] == 0]
    assert [concurrent[i] for i in greedy] == [
        _plain_greedy_text(_ids(requests[i]["prompt"]), requests[i]["max_tokens"]) for i in greedy
    ]


# ---------------------------------------------------------------------------- the queue
def test_client_leaving_mid_stream_cancels_its_job(gated):
    gated.proposer.delay = 0.05  # 50 ms per step: 200 tokens (at most 4 per step) would take 2.5 s or more
    before = {name: gated.metric(name) for name in ("sequoia_jobs_cancelled_total", "sequoia_generated_tokens_total")}
    worker = gated.app.state.worker
    try:
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{gated.url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # decoding has begun
        left, steps = time.monotonic(), gated.metric("sequoia_engine_steps_total")
        _wait(lambda: worker.current is None, timeout=1.0)  # the job ended well before its 200 tokens
        assert gated.metric("sequoia_engine_steps_total") - steps <= 2  # within a step or two of leaving
        assert time.monotonic() - left < 1.0
    finally:
        gated.proposer.delay = 0.0
    assert gated.metric("sequoia_jobs_cancelled_total") == before["sequoia_jobs_cancelled_total"] + 1
    assert gated.metric("sequoia_generated_tokens_total") - before["sequoia_generated_tokens_total"] < 200
    start = time.monotonic()
    answer = gated.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.choices[0].text == _plain_greedy_text(_ids(PROMPT), 8) and time.monotonic() - start < 2


def test_sigterm_drains_then_cancels_an_open_stream_and_stops_the_engine_thread():
    proposer = _GatedProposer()
    proposer.delay = 0.05
    running = _Server(create_app(_served(proposer)), shutdown_timeout=0.3)
    with running:
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            stopping = time.monotonic()
            running.server.handle_exit(signal.SIGTERM, None)  # what the signal calls
            rest = [line for line in lines if line]
            running.thread.join(5)
    assert 0.3 <= time.monotonic() - stopping < 2  # a 0.3 s drain, then the job is cancelled
    assert json.loads(rest[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert rest[-1] == "data: [DONE]" and len(rest) > 3  # it went on decoding during the drain
    assert running.app.state.worker.cancelled == 1 and running.app.state.worker.finished == 0
    assert not running.app.state.worker.alive and not running.thread.is_alive()


def test_full_queue_answers_503_and_recovers(gated):
    url, worker = gated.url, gated.app.state.worker
    gated.proposer.gate.clear()  # the engine blocks inside the first job
    try:
        with ThreadPoolExecutor(2) as pool:
            body = {"model": NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
            running = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
            _wait(lambda: worker.current is not None)
            waiting = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
            _wait(lambda: worker.queue_length == 1)
            health = httpx.get(f"{url}/health").json()
            assert health == {"status": "ok", "queue": 1, "busy": True}
            assert gated.metric("sequoia_queue_length") == 1
            refused = httpx.post(f"{url}/v1/completions", json=body)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "queue_full"
            assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
            gated.proposer.gate.set()
            expected = _plain_greedy_text(_ids(PROMPT), 6)
            assert [f.result().json()["choices"][0]["text"] for f in (running, waiting)] == [expected] * 2
    finally:
        gated.proposer.gate.set()
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200


def test_a_failing_decode_is_a_500_and_the_worker_goes_on(gated):
    gated.proposer.fail_next = True
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    failed = httpx.post(f"{gated.url}/v1/completions", json=body)
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    assert "a bug in the draft" in failed.json()["error"]["message"]
    assert httpx.post(f"{gated.url}/v1/completions", json=body).json()["choices"][0]["text"] == (
        _plain_greedy_text(_ids(PROMPT), 4))


def _wait(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# ---------------------------------------------------------------------------- errors, metrics
@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b'{"prompt": "w1", ', 400, None, "invalid_json"),
        ({"prompt": "w1", "temperature": -1}, 400, "temperature", None),
        ({"prompt": "w1", "top_p": 0}, 400, "top_p", None),
        ({"prompt": "w1", "max_tokens": 0}, 400, "max_tokens", None),
        ({"prompt": "w1", "n": 2}, 400, "n", None),
        ({"prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ({"max_tokens": 4}, 400, "prompt", None),
        ({"prompt": "w1", "model": "gpt-4"}, 404, "model", "model_not_found"),
        ({"prompt": " ".join(["w2"] * 300)}, 400, "prompt", "context_length_exceeded"),
        ({"prompt": [1, 2, 99]}, 400, "prompt", None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/completions", content=content,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and error["message"]
    assert error["type"] == "invalid_request_error"
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w1 w2", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_openai_client_raises_on_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "w1"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w1"}], temperature=-1)
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["code"] == "not_found"


def test_health_models_and_metrics(server):
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "w1", "top_p": 2}).status_code == 400
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "queue": 0, "busy": False}
    assert [m.id for m in server.client().models.list()] == [NAME]
    before = {name: server.metric(name) for name in ("sequoia_generated_tokens_total", "sequoia_engine_steps_total",
                                                      "sequoia_tokens_per_step_sum", "sequoia_tokens_per_step_count")}
    server.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0)
    after = {name: server.metric(name) - value for name, value in before.items()}
    assert after["sequoia_generated_tokens_total"] == 30
    steps = after["sequoia_engine_steps_total"]
    assert after["sequoia_tokens_per_step_count"] == steps and 0 < steps <= 30
    assert after["sequoia_tokens_per_step_sum"] >= 30  # accepted + 1 per step; the last step may be cut
    text = httpx.get(f"{server.url}/metrics").text
    assert 'sequoia_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'sequoia_requests_total{endpoint="/v1/completions",status="400"}' in text
    for series in ("sequoia_time_per_token_seconds_bucket", "sequoia_time_to_first_token_seconds_count",
                   "sequoia_queue_length 0.0", "sequoia_jobs_running 0.0", "sequoia_prompt_tokens_total"):
        assert series in text


# ---------------------------------------------------------------------------- text streaming
def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    pieces = {1: "caf", 2: "", 3: "\u00e9", 4: " ba", 5: "r!", 6: " ok"}

    def decode(ids: list[int]) -> str:  # token 2 is the first byte of "\u00e9", token 3 the second
        return "".join(pieces[i] for i in ids) + ("\ufffd" if ids[-1] == 2 else "")

    stream = TextStream(decode, stop=[" bar!!", "xyz"])
    assert [stream.push([1]), stream.push([2]), stream.push([3]), stream.push([4, 5])] == ["caf", "", "\u00e9", ""]
    assert stream.push([6]) == " bar! ok" and not stream.stopped and stream.flush() == ""
    stream = TextStream(decode, stop=["\u00e9 b"])
    assert (stream.push([1, 2, 3]), stream.push([4, 5])) == ("caf", "")  # "\u00e9" could start the stop string
    assert stream.stopped and stream.tokens == [1, 2, 3, 4]  # token 5 is not consumed
    assert stream.flush() == "" and stream.text == "caf"


# ---------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "--port must be in 1..65535"),
        (["--port", "-5"], "--port must be in 1..65535"),
        (["--max-queue", "0"], "--max-queue must be at least 1"),
        (["--tree", "missing-tree.json", "--draft", "ngram"], "missing-tree.json"),
        (["--verifier", "nope"], "--verifier must be one of"),
    ],
)
def test_cli_bad_option_is_one_error_line(args, message):
    assert_user_error(invoke("serve", *args), message)


def test_cli_serves_and_stops_cleanly_on_sigterm(tmp_path):
    """The real command on the main thread (as from a shell), planned for this device as
    ``generate`` plans (cached profiles: float32 only, where 4 tokens cost what one does); a
    client thread asks, then sends SIGTERM to this process, which the server catches, drains and
    returns from."""
    tiny_llama(seed=0).save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    cache_profiles(str(tmp_path), {"float32": [10, 10, 10, 20, 40]})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url, answers = f"http://127.0.0.1:{port}", []

    def ask_then_stop() -> None:
        try:
            _wait(lambda: _answers(url), timeout=60)  # uvicorn's signal handlers are in place now
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            answers.append(client.completions.create(model=str(tmp_path), prompt=PROMPT, max_tokens=10,
                                                     temperature=0).choices[0].text)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    engines = _engine_threads()
    asker = threading.Thread(target=ask_then_stop, daemon=True)
    asker.start()
    result = invoke("serve", "--target", tmp_path, "--draft", "ngram", "--dtype", "float32", "--port", port,
                    "--shutdown-timeout", 1)
    asker.join(5)
    assert result.exit_code == 0, result.output
    assert answers == [_plain_greedy_text(_ids(PROMPT), 10)]
    lines = result.stderr.strip().splitlines()
    serving = next(line for line in lines if line.startswith("serving"))
    assert serving.startswith(f"serving {tmp_path} on {url}/v1 (draft ngram, float32; greedy: tree of ")
    assert "greedy plan: float32, tree of" in result.stderr and "sampled plan: float32, tree of" in result.stderr
    assert lines[-1] == "stopped (SIGTERM)", result.stderr
    assert _engine_threads() == engines  # the command's engine thread is gone


def _engine_threads() -> int:
    return sum(t.name == "sequoia-engine" for t in threading.enumerate())


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False
