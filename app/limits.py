"""Bounding the work the service accepts: a fixed number of inference threads and a bounded wait queue.

Every admitted job holds one of ``max_concurrency + max_queue`` slots from admission until its thread finishes
(or, if it never started, until it is cancelled). A request that finds no free slot is refused at once, so an
overloaded server answers 503 quickly instead of piling up requests and memory. A job abandoned by its request
(deadline passed, client gone) keeps its slot while its thread still runs: threads cannot be interrupted, and
counting them keeps the bound true.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["InferencePool", "PoolFull"]

P = ParamSpec("P")
T = TypeVar("T")


class PoolFull(Exception):
    """Every worker is busy and the wait queue is full."""


class InferencePool:
    """A thread pool of ``max_concurrency`` workers that admits at most ``max_queue`` waiting jobs.

    Safe to use from several event loops and threads (the test client runs each request in its own loop).

    Args:
        max_concurrency: jobs running at the same time (worker threads).
        max_queue: jobs allowed to wait for a worker.
        thread_name_prefix: name prefix of the worker threads (visible in debuggers and thread dumps).
    """

    def __init__(self, max_concurrency: int, max_queue: int, thread_name_prefix: str = "inference") -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._admitted = 0
        self._executor: ThreadPoolExecutor | None = None

    @property
    def capacity(self) -> int:
        """Slots in all: running plus waiting jobs."""
        return self.max_concurrency + self.max_queue

    @property
    def admitted(self) -> int:
        """Jobs running or waiting now."""
        return self._admitted

    @property
    def full(self) -> bool:
        """Whether a job submitted now would be refused."""
        return self._admitted >= self.capacity

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Queues ``fn(*args, **kwargs)`` for a worker thread.

        Returns:
            The job's future; cancelling it before a worker picks it up frees its slot.

        Raises:
            PoolFull: no free slot.
        """
        with self._lock:
            if self._admitted >= self.capacity:
                raise PoolFull(f"{self._admitted} jobs running or queued (capacity {self.capacity})")
            self._admitted += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=self._prefix)
            executor = self._executor
        try:
            future = executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._release)  # runs on completion, failure and cancellation alike
        return future

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs ``fn(*args, **kwargs)`` in a worker thread and waits for it without blocking the event loop.

        Cancelling the caller (a timeout, a disconnect) cancels the job if it is still queued; a running job
        finishes in its thread and keeps its slot until then.

        Raises:
            PoolFull: no free slot (raised at once, nothing queued).
        """
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def shutdown(self) -> None:
        """Drops queued jobs and lets the workers exit after their current job; later submits start a new pool."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _release(self, _: object = None) -> None:
        with self._lock:
            self._admitted -= 1
