"""Outbox -> sinks: each sink reads the outbox in order from its own cursor.

The cursor moves only after the sink confirmed a batch, so a crash delivers the batch again
(same ids; file sinks write an id once) and never loses it. A sink that fails is reported once
(`sink.failed` with how much waits for it) and retried with backoff; the others go on.

A CLI command delivers to its console only the events it wrote itself (`Mine`), and leaves the
configured sinks' cursors to the daemon that owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence

import orjson

from xcloudd.asyncstore import AsyncStore
from xcloudd.clock import Clock, sleep_or, wait_first
from xcloudd.events import Emitter
from xcloudd.sinks import Record, Sink
from xcloudd.store import OutboxRow

BATCH = 500
# Rows from other processes (a CLI start on the daemon's store) are noticed within this long.
IDLE_POLL_S = 1.0
RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0


def to_record(row: OutboxRow) -> Record:
    try:
        fields = orjson.loads(row.body)
    except orjson.JSONDecodeError:
        fields = {}
    return Record(row.event_id, row.name, row.body, fields if isinstance(fields, dict) else {})


class Delivery:
    """Delivers the outbox to one sink, from the sink's durable cursor."""

    def __init__(
        self,
        store: AsyncStore,
        sink: Sink,
        emitter: Emitter,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        durable: bool = True,
    ) -> None:
        self.sink = sink
        # Not durable: an in-process reader (metrics) that starts at the outbox's end and
        # keeps its cursor in memory; it holds no rows back from pruning.
        self._durable = durable
        self.delivered = 0
        self.failures = 0
        self._store = store
        self._emitter = emitter
        self._clock = clock
        self._rng = rng or random.Random()
        self.cursor: int | None = None
        self.failing = False
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """End `run` after the batch under way (cutting it off would deliver it twice)."""
        self._stopping.set()

    @property
    def sink_name(self) -> str:
        return self.sink.name

    async def _start(self) -> None:
        """Read the cursor (a sink seen for the first time starts at the oldest row kept)."""
        if not self._durable:
            self.cursor = await self._store.call(self._store.sync.outbox_end)
            return
        self.cursor = await self._store.call(self._store.sync.sink_cursor, self.sink.name)

    async def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            token = self._store.changed()
            if not await self.deliver_once():
                await wait_first(IDLE_POLL_S, token, self._stopping)
                continue
            if self.failing:
                failures += 1
                delay = self._rng.uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2**failures))
                # A stop (shutdown, a reload replacing the sink) does not wait out the backoff.
                await sleep_or(self._clock, max(0.2, delay), self._stopping)
            else:
                failures = 0

    async def deliver_once(self) -> bool:
        """One batch; False when there was nothing to deliver."""
        if self.cursor is None:
            await self._start()
        assert self.cursor is not None
        rows = await self._store.call(self._store.sync.outbox_after, self.cursor, BATCH)
        if not rows:
            return False
        await self._deliver(rows)
        return True

    async def _deliver(self, rows: Sequence[OutboxRow]) -> None:
        batch = [r for r in map(to_record, rows) if self.sink.accepts(r)]
        try:
            if batch:
                await self.sink.write(batch)
        except Exception as exc:
            self.failures += 1
            if not self.failing:
                self.failing = True
                pending = await self._pending()
                self._emitter.emit(
                    "sink.failed", sink=self.sink.name, pending=pending, error=_reason(exc)
                )
            return
        if self._durable:
            await self._store.call(self._store.sync.advance_sink, self.sink.name, rows[-1].seq)
        self.cursor = rows[-1].seq
        self.delivered += len(batch)
        if self.failing:
            self.failing = False
            self._emitter.emit("sink.recovered", sink=self.sink.name, pending=await self._pending())

    async def _pending(self) -> int:
        return await self._store.call(self._store.sync.pending_count, self.sink.name)

    async def drain(self, seconds: float) -> None:
        """Deliver what is in the outbox now (shutdown), within `seconds`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self.failing and await self.deliver_once():
                    pass


class Mine:
    """A CLI command's console: the events this process wrote, in outbox order."""

    def __init__(self, store: AsyncStore, sinks: Sequence[Sink]) -> None:
        self._store = store
        self._sinks = list(sinks)
        self._pending: list[str] = []
        store.on_written(lambda rows: self._pending.extend(i for i, _ in rows))
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            token = self._store.changed()
            if not await self.deliver_once():
                await wait_first(IDLE_POLL_S, token, self._stopping)

    async def deliver_once(self) -> bool:
        if not self._pending:
            return False
        wanted = list(dict.fromkeys(self._pending))
        rows = await self._store.call(self._store.sync.outbox_by_ids, wanted)
        found = {r.event_id for r in rows}
        self._pending = [i for i in self._pending if i not in found]
        records = [to_record(r) for r in rows]
        for sink in self._sinks:
            batch = [r for r in records if sink.accepts(r)]
            if batch:
                with contextlib.suppress(Exception):
                    await sink.write(batch)
        return bool(rows)

    async def drain(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while await self.deliver_once():
                    pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
