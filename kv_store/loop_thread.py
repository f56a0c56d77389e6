"""An asyncio loop on a thread of its own, where a transport's sends and receives live.

Workers call the transport from ordinary threads (a prefill forward pass, a decode step
loop) and never block on the network: calls are handed to this loop and answered
through state objects they poll. UCX is initialised on this thread, inside the process
that uses it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from kv_store.errors import KVStoreError

log = logging.getLogger(__name__)

T = TypeVar("T")


class EventLoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from another thread only)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("EventLoopThread.run called from its own loop: it would deadlock")
        return self.submit(coro).result(timeout_s)

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def spawn(self, aw: Awaitable[T], what: str, *, quiet: bool = False) -> asyncio.Task[T]:
        """Start a task on the loop (from the loop thread) whose failure is logged, not lost.

        ``quiet`` is for fire-and-forget sends: a failure of one shows up as its connection's
        failure, which the connection's receive loop or heartbeat reports."""
        task = asyncio.ensure_future(aw, loop=self.loop)
        task.add_done_callback(lambda t: _log_failure(t, what, quiet))
        return task

    def stop(self) -> None:
        """Cancel what still runs on the loop (sends to peers that never answered), then stop."""
        if self.loop.is_running():
            try:
                self.run(self._cancel_all(), timeout_s=5)
            except TimeoutError:
                log.warning("tasks of %s did not finish canceling", self._thread.name)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _log_failure(task: asyncio.Task, what: str, quiet: bool) -> None:
    if task.cancelled() or task.exception() is None:
        return
    if quiet and isinstance(task.exception(), (KVStoreError, asyncio.TimeoutError)):
        log.debug("%s failed: %r", what, task.exception())
    else:
        log.error("%s failed: %r", what, task.exception(), exc_info=task.exception())

