"""Sinks for the local machine: stdout (journald-aware) and append-only files.

Each sink is isolated: one that fails to write reports it once as `sink.failed` through the
other sinks and keeps the records it could not write, in order, until it works again.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import orjson

# syslog priorities for journald's `<N>` line prefix.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3}
_MAX_PENDING = 10_000
_RECENT_IDS = 4096
_TAIL_BYTES = 1 << 20


def encode(record: Mapping[str, Any]) -> bytes:
    return orjson.dumps(record, default=str) + b"\n"


class EventFilter:
    def __init__(self, patterns: Iterable[str] = ("*",)) -> None:
        self._patterns = tuple(patterns) or ("*",)

    def accepts(self, event_name: str) -> bool:
        return any(fnmatch.fnmatchcase(event_name, p) for p in self._patterns)


def stream_is_journal(stream: IO[Any]) -> bool:
    """True when `stream` is connected to journald, which sets $JOURNAL_STREAM to dev:inode."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _LineSink:
    """Writes one JSON line per record; what it cannot write waits, bounded, for the next try."""

    def __init__(self, name: str, events: Iterable[str]) -> None:
        self.name = name
        self._filter = EventFilter(events)
        self._pending: deque[bytes] = deque(maxlen=_MAX_PENDING)
        self._failed = False
        self.on_health: Callable[[str, bool, int], None] | None = None

    def accepts(self, event_name: str) -> bool:
        return self._filter.accepts(event_name)

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _line(self, record: Mapping[str, Any]) -> bytes:
        return encode(record)

    def deliver(self, record: Mapping[str, Any]) -> None:
        self._pending.append(self._line(record))
        try:
            while self._pending:
                self._write(self._pending[0])
                self._pending.popleft()
        except OSError:
            if not self._failed:
                self._failed = True
                if self.on_health:
                    self.on_health(self.name, False, len(self._pending))
            return
        if self._failed:
            self._failed = False
            if self.on_health:
                self.on_health(self.name, True, 0)

    async def aclose(self) -> None:
        return None


class StdoutSink(_LineSink):
    def __init__(self, events: Iterable[str] = ("*",), stream: IO[bytes] | None = None) -> None:
        super().__init__("stdout", events)
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._journal = stream_is_journal(self._stream)

    def _line(self, record: Mapping[str, Any]) -> bytes:
        line = encode(record)
        if self._journal:
            return b"<%d>" % _PRIORITY.get(str(record.get("level")), 6) + line
        return line

    def _write(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()


class FileSink(_LineSink):
    """Appends JSON lines; the file is reopened after a failure so log rotation and a
    full disk that clears up both heal by themselves.

    Delivery is idempotent by `event_id`: after a crash the daemon may emit an event again
    (with the same id) because it died before noting that it had gone out; the sink reads
    the ids at the end of its file when it opens it and writes such an event only once.
    """

    def __init__(self, path: Path, events: Iterable[str] = ("*",)) -> None:
        super().__init__(f"file:{path}", events)
        self.path = path
        self._fh: IO[bytes] | None = None
        self._recent: deque[str] = deque(maxlen=_RECENT_IDS)
        self._recent_set: set[str] = set()

    def deliver(self, record: Mapping[str, Any]) -> None:
        if self._fh is None and not self._recent:
            self._load_recent()
        event_id = str(record.get("event_id", ""))
        if event_id in self._recent_set:
            return
        if len(self._recent) == self._recent.maxlen:
            self._recent_set.discard(self._recent[0])
        self._recent.append(event_id)
        self._recent_set.add(event_id)
        super().deliver(record)

    def _load_recent(self) -> None:
        """Remember the ids at the end of the file; cut a line a crash left half-written."""
        try:
            with self.path.open("r+b") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = max(0, size - _TAIL_BYTES)
                fh.seek(start)
                tail = fh.read()
                if tail and not tail.endswith(b"\n"):
                    cut = tail.rfind(b"\n") + 1
                    fh.truncate(start + cut)
                    tail = tail[:cut]
        except OSError:
            return
        for line in tail.splitlines()[1 if start else 0 :]:
            try:
                event_id = orjson.loads(line).get("event_id")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(event_id, str) and event_id not in self._recent_set:
                if len(self._recent) == self._recent.maxlen:
                    self._recent_set.discard(self._recent[0])
                self._recent.append(event_id)
                self._recent_set.add(event_id)

    def _write(self, data: bytes) -> None:
        try:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("ab")
            self._fh.write(data)
            self._fh.flush()
        except OSError:
            self._close()
            raise

    def _close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None

    async def aclose(self) -> None:
        self._close()
