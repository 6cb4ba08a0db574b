"""Running the app behind uvicorn: bind the port first (a busy port is one clear error before
any model loads), then serve until SIGINT or SIGTERM.

On a signal uvicorn stops accepting connections and waits for the open ones; meanwhile the
worker drains: it takes no new job, and the jobs not finished ``shutdown_timeout`` seconds
later are cancelled (a stream in progress then ends with an OpenAI error event and
``[DONE]``, a waiting request gets a 503). Then the app's shutdown stops the worker thread.
"""

from __future__ import annotations

import signal
import socket
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from sequoia.errors import ConfigError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CANCEL_GRACE_S = 5.0  # after the drain, how long cancelled responses get to close before uvicorn cuts them


class Server(uvicorn.Server):
    """uvicorn's server, draining the app's engine worker when a stop signal arrives."""

    def __init__(self, app: FastAPI, shutdown_timeout: float = 10.0, log_level: str = "warning") -> None:
        config = uvicorn.Config(app, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=shutdown_timeout + CANCEL_GRACE_S)
        super().__init__(config)
        self.worker, self.shutdown_timeout = app.state.worker, shutdown_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self.worker.drain(self.shutdown_timeout)
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it); raises :class:`ConfigError`."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or exc
        raise ConfigError(f"cannot listen on {host}:{port} ({reason}); pick another --host/--port") from None
    return sock


def run(app: FastAPI, sock: socket.socket, *, shutdown_timeout: float = 10.0, log_level: str = "warning") -> int | None:
    """Serve ``app`` (from :func:`~sequoia.serve.create_app`) on ``sock`` until stopped;
    returns the signal that stopped it, if any.

    uvicorn re-raises the signal it shut down for; from the main thread we catch that one
    instead, so a stop by Ctrl-C or ``kill`` is a normal return, not a KeyboardInterrupt.
    """
    server = Server(app, shutdown_timeout, log_level)
    caught: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda number, frame: caught.append(number)) for sig in STOP_SIGNALS}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return caught[0] if caught else None
