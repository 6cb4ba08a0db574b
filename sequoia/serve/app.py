"""The FastAPI app: OpenAI-compatible endpoints over one :class:`~sequoia.serve.worker.Worker`.

    POST /v1/chat/completions   POST /v1/completions   (stream: server-sent events)
    GET  /v1/models   GET /health   GET /metrics (Prometheus text)

:func:`create_app` takes a :class:`ServedModel` of already-loaded objects, so tests build it on
tiny models without the CLI. The worker thread starts and stops with the app's lifespan.
Requests are validated and tokenized on the event loop, then queued as jobs; every error is
OpenAI's error body with a fitting status (400 bad request, 404 unknown model or route, 503
queue full or shutting down), and none takes the server down.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

import sequoia
from sequoia.errors import SequoiaError
from sequoia.serve.metrics import ServeMetrics
from sequoia.serve.protocol import (
    CHAT,
    TEXT,
    ChatCompletionRequest,
    CompletionRequest,
    Flavor,
    RequestError,
    error_body,
    usage,
)
from sequoia.serve.worker import (
    FINISH_CANCELLED,
    Chunk,
    Done,
    Event,
    Failed,
    Job,
    QueueFullError,
    ServedModel,
    ShuttingDownError,
    Worker,
)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
CLIENT_CLOSED = 499  # status recorded for a request whose client left before the answer


def create_app(served: ServedModel, *, max_queue: int = 16) -> FastAPI:
    """The server for ``served``; its queue holds ``max_queue`` waiting requests."""
    metrics = ServeMetrics()
    worker = Worker(served, max_queue=max_queue, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="Sequoia", version=sequoia.__version__, lifespan=lifespan)
    app.state.served, app.state.worker, app.state.metrics = served, worker, metrics
    app.add_middleware(_CountRequests, metrics=metrics)
    _add_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        ids = served.encode_chat(body.chat())
        return await _complete(request, worker, body, ids, CHAT, "messages")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if isinstance(body.prompt, str):
            ids = served.encode(body.prompt)
        else:
            ids = body.prompt
            vocab = served.model.config.vocab_size
            if not all(0 <= t < vocab for t in ids):
                raise RequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return await _complete(request, worker, body, ids, TEXT, "prompt")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "sequoia"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if worker.alive else "stopped", "queue": worker.queue_length,
                "busy": worker.current is not None}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


async def _complete(
    request: Request, worker: Worker, body: ChatCompletionRequest | CompletionRequest,
    ids: list[int], flavor: Flavor, prompt_param: str,
) -> Response:
    """Check the request against the model, queue its job, and answer (streamed or whole)."""
    served = worker.served
    if body.model is not None and body.model != served.name:
        raise RequestError(
            f"the model {body.model!r} does not exist; this server serves {served.name!r}",
            404, param="model", code="model_not_found",
        )
    if not ids:
        raise RequestError("the prompt is empty", param=prompt_param)
    room = served.max_context - len(ids)
    if room < 1:
        raise RequestError(
            f"the prompt has {len(ids)} tokens but the model's context holds {served.max_context}; shorten it",
            param=prompt_param, code="context_length_exceeded",
        )
    channel = _Channel()
    job = Job(list(ids), min(body.max_new_tokens(room), room), body.sampling(), body.job_seed(),
              body.stop_strings(), emit=channel.put)
    try:
        worker.submit(job)
    except (QueueFullError, ShuttingDownError) as exc:
        raise _as_request_error(exc) from None
    answer_id = flavor.new_id()
    if body.stream:
        events = _stream(job, channel, flavor, answer_id, served.name, body.include_usage())
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _collect(request, job, channel, flavor, answer_id, served.name)


async def _collect(
    request: Request, job: Job, channel: _Channel, flavor: Flavor, answer_id: str, model: str
) -> Response:
    parts: list[str] = []
    try:
        while True:
            event = await channel.get(request)
            if event is None:  # the client left: cancel (finally) and answer no one
                return Response(status_code=CLIENT_CLOSED)
            if isinstance(event, Chunk):
                parts.append(event.text)
            elif isinstance(event, Done):
                _check_not_cancelled(event)
                use = usage(event.prompt_tokens, event.completion_tokens)
                return JSONResponse(flavor.response(answer_id, model, "".join(parts), event.finish_reason, use))
            else:
                raise _as_request_error(event.error)
    finally:
        job.cancel()  # no effect once the job is done


async def _stream(
    job: Job, channel: _Channel, flavor: Flavor, answer_id: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events; a client that disconnects cancels this generator, and the job."""
    try:
        first = flavor.first_chunk(answer_id, model)
        if first is not None:
            yield _sse(first)
        while True:
            event = await channel.queue.get()
            if isinstance(event, Chunk):
                yield _sse(flavor.chunk(answer_id, model, event.text))
                continue
            try:
                if isinstance(event, Failed):
                    raise _as_request_error(event.error)
                _check_not_cancelled(event)
            except RequestError as exc:
                yield _sse(error_body(str(exc), exc.type, exc.param, exc.code))
            else:
                yield _sse(flavor.chunk(answer_id, model, None, event.finish_reason))
                if include_usage:
                    use = usage(event.prompt_tokens, event.completion_tokens)
                    yield _sse(flavor.usage_chunk(answer_id, model, use))
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancel()  # no effect once the job is done


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _check_not_cancelled(done: Done) -> None:
    if done.finish_reason == FINISH_CANCELLED:  # a client still listening: the server is stopping
        raise _as_request_error(ShuttingDownError("the server is shutting down; generation was cancelled"))


class _Channel:
    """Events from the worker thread into the request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:  # on the worker thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def get(self, request: Request) -> Event | None:
        """The next event, or None once the client has disconnected."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None


# ---------------------------------------------------------------------------- errors
def _as_request_error(exc: Exception) -> RequestError:
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, QueueFullError):
        return RequestError(str(exc), 503, type="server_error", code="queue_full")
    if isinstance(exc, ShuttingDownError):
        return RequestError(str(exc), 503, type="server_error", code="shutting_down")
    if isinstance(exc, SequoiaError):
        return RequestError(str(exc))
    return RequestError(f"internal error: {type(exc).__name__}: {exc}", 500, type="server_error")


def _add_error_handlers(app: FastAPI) -> None:
    def reply(exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(SequoiaError)
    async def sequoia_error(request: Request, exc: SequoiaError) -> JSONResponse:
        return reply(_as_request_error(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "")
            return reply(RequestError(f"the body is not valid JSON ({reason})", code="invalid_json"))
        fields = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(fields) or None
        return reply(RequestError(f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return reply(RequestError(str(exc.detail), exc.status_code, type=kind, code=code))


class _CountRequests:
    """ASGI middleware: count every HTTP request by endpoint and status code."""

    def __init__(self, app: Callable, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
