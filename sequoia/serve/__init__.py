"""OpenAI-compatible HTTP serving over the speculative engine (``sequoia serve``).

:func:`create_app` builds the FastAPI app from a :class:`ServedModel` (objects already loaded);
:func:`bind` and :func:`run` put it behind uvicorn. The pieces: ``protocol`` (request and
response bodies), ``text`` (incremental detokenization with stop strings), ``worker`` (the job
queue and the engine thread), ``metrics`` (Prometheus series), ``app`` (the endpoints).
"""

from sequoia.serve.app import create_app
from sequoia.serve.server import Server, bind, run
from sequoia.serve.worker import Job, ServedModel, Worker

__all__ = ["Job", "ServedModel", "Server", "Worker", "bind", "create_app", "run"]
