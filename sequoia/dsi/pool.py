"""Worker pools for DSI: each worker holds one model replica and runs tasks on it.

The orchestrator only needs :class:`WorkerPool`: ``submit(task, *args)`` runs
``task(model, *args)`` on a free worker's replica and returns a
:class:`concurrent.futures.Future`; ``cancel(future)`` preempts it; ``shutdown()`` stops the
workers. :class:`ThreadPool` is the local implementation (threads sharing one model, for
one machine). A distributed backend implements the same three methods over an existing
runtime instead of a home-made cluster:

* **Ray**: one actor per replica (``@ray.remote(num_gpus=1)`` holding the model, with a
  ``run(task, *args)`` method); ``submit`` picks an idle actor and returns
  ``actor.run.remote(task, *args).future()``; ``cancel`` calls ``ray.cancel(ref)``;
  ``shutdown`` calls ``ray.kill`` on each actor.
* **torch.distributed.rpc**: rank 0 runs the orchestrator, ranks 1..N load a replica into a
  module-level global at start-up; ``submit`` is ``rpc.rpc_async(worker, task, args)``
  wrapped into a ``Future`` (``fut.then``); ``cancel`` marks the result to be ignored (RPC
  cannot interrupt a running call); ``shutdown`` is ``rpc.shutdown()``.

Tasks must be picklable module-level functions for both (they are, in the orchestrator).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from sequoia.errors import ConfigError

T = TypeVar("T")
THREAD_PREFIX = "sequoia-dsi"


class WorkerPool(Protocol):
    """Workers that each hold one replica of a model and run tasks on it."""

    @property
    def size(self) -> int:
        """Number of workers: how many tasks run at once."""
        ...

    def submit(self, task: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``task(model, *args)`` on a worker; queue it if all workers are busy."""
        ...

    def cancel(self, future: Future[Any]) -> None:
        """Preempt: drop a queued task; a running one may finish, its result is ignored."""
        ...

    def shutdown(self) -> None:
        """Drop queued tasks, wait for running ones, release every worker. Idempotent."""
        ...


class ThreadPool:
    """Local :class:`WorkerPool`: ``size`` threads sharing one model (inference only).

    PyTorch releases the GIL inside kernels, so forwards of different threads overlap on a
    multi-core CPU or on a GPU; threads are named ``sequoia-dsi-<name>_<i>``.
    """

    def __init__(self, model: Any, size: int, name: str) -> None:
        if size < 1:
            raise ConfigError(f"a worker pool needs >= 1 worker, got {size}")
        self._model = model
        self._size = size
        self._executor = ThreadPoolExecutor(
            max_workers=size, thread_name_prefix=f"{THREAD_PREFIX}-{name}"
        )

    @property
    def size(self) -> int:
        return self._size

    def submit(self, task: Callable[..., T], *args: Any) -> Future[T]:
        return self._executor.submit(task, self._model, *args)

    def cancel(self, future: Future[Any]) -> None:
        future.cancel()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
