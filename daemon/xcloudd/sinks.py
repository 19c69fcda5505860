"""Sinks for the local machine: stdout (journald-aware) and append-only JSON-lines files.

A sink only writes: `delivery.py` reads the outbox, hands each sink a batch and moves the
sink's cursor once `write` returned. Writes run on the sink's own thread, so a reader that
stops reading (a stuck pipe) or a slow disk delays that sink alone, never the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import orjson

# syslog priorities for journald's `<N>` line prefix.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3}
_RECENT_IDS = 8192
_TAIL_BYTES = 1 << 20

R = TypeVar("R")


@dataclass(frozen=True)
class Record:
    """One outbox row on its way to a sink: the stored body and its decoded fields."""

    event_id: str
    name: str
    body: bytes
    fields: Mapping[str, Any]


class Sink(Protocol):
    """A destination for events. `write` returns once the batch is confirmed (written and
    flushed, or acknowledged by the receiver) and raises OSError when it was not."""

    name: str

    def accepts(self, record: Record) -> bool: ...

    async def write(self, records: Sequence[Record]) -> None: ...

    def reopen(self) -> None:
        """Open files again on the next write (SIGHUP, after rotation)."""

    async def aclose(self) -> None: ...


LEVELS = ("debug", "info", "warning", "error")


class EventFilter:
    """Which events a sink takes: glob patterns on event names, and a lowest level."""

    def __init__(self, patterns: Iterable[str] = ("*",), min_level: str = "debug") -> None:
        self._patterns = tuple(patterns) or ("*",)
        self._min = LEVELS.index(min_level) if min_level in LEVELS else 0

    def accepts(self, record: Record) -> bool:
        if self._min:
            level = record.fields.get("level")
            rank = LEVELS.index(level) if level in LEVELS else len(LEVELS)
            if rank < self._min:
                return False
        return any(fnmatch.fnmatchcase(record.name, p) for p in self._patterns)


def stream_is_journal(fd: int) -> bool:
    """True when `fd` is connected to journald, which sets $JOURNAL_STREAM to dev:inode."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class SinkThread:
    """One daemon thread per sink: a blocked write holds only that thread, and a process that
    must exit does not wait for it."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._work, name=f"sink {name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    async def run(self, fn: Callable[[], R]) -> R:
        fut: Future[R] = Future()
        self._jobs.put((fn, fut))
        return await asyncio.wrap_future(fut)

    def stop(self) -> None:
        self._jobs.put(None)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class StdoutSink:
    """JSON lines on standard output; under systemd each line carries its journald priority."""

    def __init__(
        self, events: Iterable[str] = ("*",), fd: int | None = None, *, min_level: str = "debug"
    ) -> None:
        self.name = "stdout"
        self._filter = EventFilter(events, min_level)
        self._fd = fd if fd is not None else sys.stdout.fileno()
        self._journal = stream_is_journal(self._fd)
        self._thread = SinkThread(self.name)

    def accepts(self, record: Record) -> bool:
        return self._filter.accepts(record)

    def _line(self, record: Record) -> bytes:
        if self._journal:
            level = str(record.fields.get("level"))
            return b"<%d>" % _PRIORITY.get(level, 6) + record.body + b"\n"
        return record.body + b"\n"

    async def write(self, records: Sequence[Record]) -> None:
        data = b"".join(self._line(r) for r in records)
        await self._thread.run(lambda: write_all(self._fd, data))

    def reopen(self) -> None:
        return None

    async def aclose(self) -> None:
        self._thread.stop()


class FileSink:
    """Appends JSON lines, whole lines only, each `event_id` once.

    A batch that cannot be written whole (a full disk) is cut back to where it began, so the
    file never holds a torn line; the batch stays in the outbox and is written again later.
    The file is reopened when its path names another file (rename-style rotation), when it
    disappeared, and on SIGHUP. The ids at the end of the file are read when it is opened, so
    an event delivered again after a crash (its cursor had not moved yet) is written once.
    """

    def __init__(
        self, path: Path, events: Iterable[str] = ("*",), *, min_level: str = "debug"
    ) -> None:
        self.name = f"file:{path}"
        self.path = path
        self._filter = EventFilter(events, min_level)
        self._fd: int | None = None
        self._reopen = False
        self._recent: deque[str] = deque(maxlen=_RECENT_IDS)
        self._recent_set: set[str] = set()
        self._thread = SinkThread(self.name)

    def accepts(self, record: Record) -> bool:
        return self._filter.accepts(record)

    def reopen(self) -> None:
        self._reopen = True

    async def write(self, records: Sequence[Record]) -> None:
        await self._thread.run(lambda: self._write(records))

    def _write(self, records: Sequence[Record]) -> None:
        fd = self._open()
        fresh = [r for r in records if r.event_id not in self._recent_set]
        if not fresh:
            return
        data = b"".join(r.body + b"\n" for r in fresh)
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            write_all(fd, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            self._close()
            raise
        for r in fresh:
            self._remember(r.event_id)

    def _open(self) -> int:
        if self._fd is not None and not self._reopen and self._same_file(self._fd):
            return self._fd
        self._close()
        self._reopen = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            self._load_recent(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        return fd

    def _same_file(self, fd: int) -> bool:
        try:
            st, ours = os.stat(self.path), os.fstat(fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino)

    def _load_recent(self, fd: int) -> None:
        """Remember the ids at the end of the file; cut a line a crash left half-written."""
        size = os.lseek(fd, 0, os.SEEK_END)
        start = max(0, size - _TAIL_BYTES)
        tail = os.pread(fd, size - start, start)
        if tail and not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n") + 1
            os.ftruncate(fd, start + cut)
            tail = tail[:cut]
        for line in tail.splitlines()[1 if start else 0 :]:
            try:
                event_id = orjson.loads(line).get("event_id")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(event_id, str):
                self._remember(event_id)

    def _remember(self, event_id: str) -> None:
        if event_id in self._recent_set:
            return
        if len(self._recent) == self._recent.maxlen:
            self._recent_set.discard(self._recent[0])
        self._recent.append(event_id)
        self._recent_set.add(event_id)

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._thread.run(self._close)
        self._thread.stop()


class LineSink:
    """Text lines rendered from records (the console), written on the sink's own thread."""

    def __init__(
        self,
        name: str,
        render: Callable[[Record], str | None],
        stream: IO[str],
        events: Iterable[str] = ("*",),
    ) -> None:
        self.name = name
        self._render = render
        self._stream = stream
        self._filter = EventFilter(events)
        self._thread = SinkThread(name)

    def accepts(self, record: Record) -> bool:
        return self._filter.accepts(record)

    async def write(self, records: Sequence[Record]) -> None:
        lines = [line for r in records if (line := self._render(r)) is not None]
        if lines:
            await self._thread.run(lambda: self._emit(lines))

    def _emit(self, lines: list[str]) -> None:
        self._stream.write("".join(f"{line}\n" for line in lines))
        self._stream.flush()

    def reopen(self) -> None:
        return None

    async def aclose(self) -> None:
        self._thread.stop()
