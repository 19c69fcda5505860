"""The state store driven from the event loop: every call runs on one worker thread, in order.

SQLite's commits fsync (`synchronous=FULL`); on the event loop they would stall every timer,
poll and delivery behind the disk. Here the loop only waits for a future.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

from xcloudd.store import Store, StoreError, StoreUnwritable

P = ParamSpec("P")
R = TypeVar("R")


class AsyncStore:
    """The store, driven from the event loop: every call runs on one worker thread, in order,
    so SQLite's fsyncs never stall the loop. Waiters learn of new outbox rows and changed
    facts through `changed()`."""

    def __init__(self, store: Store) -> None:
        self.sync = store
        self._loop = asyncio.get_running_loop()
        self._queue: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="xcloudd-store", daemon=True)
        self._thread.start()
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[list[tuple[str, str]]], None]] = []
        self.unwritable: StoreUnwritable | None = None
        # Calls not answered yet (tests on virtual time wait for none before moving time on).
        self.inflight = 0

    def on_written(self, listener: Callable[[list[tuple[str, str]]], None]) -> None:
        """`listener([(event_id, name), ...])` after each call that put events in the outbox."""
        self._listeners.append(listener)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                fn, fut = self._queue.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:
                self.sync.written = []
                fut.set_exception(exc)
                continue
            ids, self.sync.written = self.sync.written, []
            if ids:
                self._loop.call_soon_threadsafe(self._wrote, ids)
            fut.set_result(result)

    def _wrote(self, ids: list[tuple[str, str]]) -> None:
        for listener in self._listeners:
            listener(ids)
        self.notify()

    def _submit(self, fn: Callable[[], R]) -> Future[R]:
        fut: Future[R] = Future()
        with self._cv:
            if self._closed:
                raise StoreError("the state store is closed")
            self._queue.append((fn, fut))
            self._cv.notify()
        return fut

    async def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run `fn(*args)` (a Store method) on the store's thread."""
        fut = self._submit(lambda: fn(*args, **kwargs))
        self.inflight += 1
        try:
            result = await asyncio.wrap_future(fut)
        except StoreUnwritable as exc:
            self.unwritable = exc
            raise
        finally:
            self.inflight -= 1
        self.unwritable = None
        return result

    def post(self, fn: Callable[[], object]) -> Future[object]:
        """Queue a write without waiting for it (events reported from synchronous code)."""
        fut: Future[object] = self._submit(fn)
        self.inflight += 1
        fut.add_done_callback(lambda _f: self._loop.call_soon_threadsafe(self._posted))
        return fut

    def _posted(self) -> None:
        self.inflight -= 1
        self.notify()

    def notify(self) -> None:
        self._changed.set()

    def changed(self) -> asyncio.Event:
        """An event set at the next change; take it before looking, then wait on it."""
        if self._changed.is_set():
            self._changed = asyncio.Event()
        return self._changed

    async def aclose(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join, 10.0)
        self.sync.close()
