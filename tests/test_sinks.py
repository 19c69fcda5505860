"""Sinks and their delivery from the outbox: whole lines, rotation, one line per event id, and a
sink that fails delays only itself and loses nothing, across a restart too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from conftest import SteppingClock
from xcloudd.asyncstore import AsyncStore
from xcloudd.clock import FakeClock
from xcloudd.delivery import Delivery
from xcloudd.events import Emitter, EventFactory
from xcloudd.sinks import FileSink, Record
from xcloudd.store import Store


def record(n: int) -> Record:
    body = json.dumps({"event": "build.created", "event_id": f"id-{n}", "pad": "x" * 60})
    return Record(f"id-{n}", "build.created", body.encode(), json.loads(body))


def ids(path: Path) -> list[str]:
    return [json.loads(line)["event_id"] for line in path.read_text().splitlines()]


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A disk that fills up at `limit` bytes, for this process (writes past it fail EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


async def test_a_write_that_fails_half_way_leaves_whole_lines_and_is_written_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink(path)
    try:
        await sink.write([record(1)])
        size = path.stat().st_size
        with file_size_limit(size + 150), pytest.raises(OSError, match="too large"):
            await sink.write([record(2), record(3), record(4)])
        # The batch got partly onto the disk, and was cut back to where it began.
        assert path.read_bytes().endswith(b"\n")
        assert ids(path) == ["id-1"]
        await sink.write([record(2), record(3), record(4)])
        assert ids(path) == ["id-1", "id-2", "id-3", "id-4"]
    finally:
        await sink.aclose()


async def test_the_file_is_reopened_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink(path)
    try:
        await sink.write([record(1)])
        path.rename(tmp_path / "events.jsonl.1")
        await sink.write([record(2)])
        assert ids(tmp_path / "events.jsonl.1") == ["id-1"]
        assert ids(path) == ["id-2"]
        # SIGHUP's reopen: the same path, a new open file (logrotate's copytruncate-less way).
        sink.reopen()
        await sink.write([record(3)])
        assert ids(path) == ["id-2", "id-3"]
    finally:
        await sink.aclose()


async def test_an_event_delivered_again_after_a_crash_is_written_once(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    first = FileSink(path)
    await first.write([record(1), record(2)])
    await first.aclose()
    with path.open("ab") as fh:
        fh.write(b'{"event_id": "id-3", "torn')  # the crash cut a line short
    again = FileSink(path)
    try:
        await again.write([record(2), record(3)])
    finally:
        await again.aclose()
    assert ids(path) == ["id-1", "id-2", "id-3"]


class FlakySink:
    """A receiver that refuses everything while `down`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.down = False
        self.got: list[str] = []

    def accepts(self, record: Record) -> bool:
        return True

    async def write(self, records: Sequence[Record]) -> None:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        self.got.extend(r.event_id for r in records)

    def reopen(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def wait_for(condition: object, rounds: int = 2000) -> None:
    for _ in range(rounds):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


async def test_a_sink_that_is_down_delays_only_itself_and_catches_up_after_a_restart(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    path = tmp_path / "state.db"
    store = AsyncStore(Store.open(path, EventFactory(clock)))
    emitter = Emitter(store.sync.ev, lambda e: store.post(lambda: store.sync.append([e])))
    good, flaky = FlakySink("good"), FlakySink("flaky")
    flaky.down = True
    deliveries = [Delivery(store, s, emitter, clock) for s in (good, flaky)]
    tasks = [asyncio.create_task(d.run()) for d in deliveries]
    try:
        for n in range(20):
            emitter.emit("daemon.started", n=n)
        await wait_for(lambda: len(good.got) >= 21)  # 20, and the flaky one's sink.failed
        assert flaky.got == []
        failed = [r for r in store.sync.outbox_after(0, 100) if r.name == "sink.failed"]
        assert len(failed) == 1
        assert json.loads(failed[0].body)["pending"] == 20
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.aclose()
    # kill -9 here: nothing was delivered to the flaky sink, and its cursor says so.
    store = AsyncStore(Store.open(path, EventFactory(clock)))
    emitter = Emitter(store.sync.ev, lambda e: store.post(lambda: store.sync.append([e])))
    flaky.down = False
    delivery = Delivery(store, flaky, emitter, clock)
    try:
        await delivery.drain(10)
    finally:
        await store.aclose()
    reopened = Store.open(path, EventFactory(clock))
    expected = [r.event_id for r in reopened.outbox_after(0, 100)]
    reopened.close()
    assert flaky.got == expected[: len(flaky.got)]
    assert len(set(flaky.got)) == len(flaky.got) >= 21


async def test_a_stopped_delivery_does_not_wait_out_its_backoff(tmp_path: Path) -> None:
    """A reload that replaces a failing sink, or a shutdown, must not wait for the sink's next
    retry (up to a minute): stop() ends the backoff at once."""
    clock = SteppingClock(FakeClock().time())
    store = AsyncStore(Store.open(tmp_path / "state.db", EventFactory(clock)))
    emitter = Emitter(store.sync.ev, lambda e: store.post(lambda: store.sync.append([e])))
    flaky = FlakySink("flaky")
    flaky.down = True
    delivery = Delivery(store, flaky, emitter, clock)
    task = asyncio.create_task(delivery.run())
    try:
        emitter.emit("daemon.started")
        await wait_for(lambda: delivery.failing and clock.next_wakeup() is not None)
        delivery.stop()
        await asyncio.wait_for(task, 5)  # on a clock that never moves
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.aclose()
    assert flaky.got == []
