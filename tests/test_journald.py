"""The journald sink, checked against a journal socket bound here and a reader of the native
protocol written from its documentation (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/): simple
and binary fields, and entries too large for a datagram passed as a sealed memfd. The tests
look at entries as journalctl would show them."""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xcloudd import journald
from xcloudd.journald import JournaldSink
from xcloudd.sinks import Record

_FIELD_NAME = re.compile(rb"[A-Z][A-Z0-9_]{0,63}")
# What journald demands of a memfd before it reads it: nothing may change it any more.
_SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


@dataclass
class Entry:
    fields: dict[str, list[str]] = field(default_factory=dict)
    binary: set[str] = field(default_factory=set)  # names sent in the length-prefixed form
    via_memfd: bool = False

    def __getitem__(self, name: str) -> str:
        (value,) = self.fields[name]  # each field once: journalctl would show a repeat
        return value

    def __contains__(self, name: object) -> bool:
        return name in self.fields


def parse(data: bytes, via_memfd: bool) -> Entry:
    entry = Entry(via_memfd=via_memfd)
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        eq = data.find(b"=", i, end)
        if eq >= 0:  # NAME=value\n
            name, value, i = data[i:eq], data[eq + 1 : end], end + 1
        else:  # NAME\n, 64-bit little-endian length, value, \n
            name = data[i:end]
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 1 + 8
            value = data[start : start + size]
            assert data[start + size : start + size + 1] == b"\n"
            i = start + size + 1
            entry.binary.add(name.decode())
        assert _FIELD_NAME.fullmatch(name), name
        entry.fields.setdefault(name.decode(), []).append(value.decode())
    return entry


def read_memfd(fd: int) -> bytes:
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALED == _SEALED
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class Journal:
    """The receiving end of the native protocol, as journald reads it."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, count: int = 1) -> list[Entry]:
        self.sock.settimeout(5)  # only bounds a failing test: the entries are already queued
        return [self._one() for _ in range(count)]

    def pending(self) -> list[Entry]:
        self.sock.settimeout(0)
        entries = []
        while True:
            try:
                entries.append(self._one())
            except BlockingIOError:
                return entries

    def _one(self) -> Entry:
        data, ancillary, flags, _ = self.sock.recvmsg(1 << 21, socket.CMSG_SPACE(4 * 4))
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        try:
            if fds:
                # Either a payload or one memfd, never both.
                assert (data, len(fds)) == (b"", 1)
                data = read_memfd(fds[0])
        finally:
            for fd in fds:
                os.close(fd)
        return parse(data, via_memfd=bool(fds))

    def close(self) -> None:
        self.sock.close()


def event(name: str, n: int, level: str = "info", **fields: Any) -> Record:
    body = {
        "timestamp": "2026-05-09T07:35:25.123Z",
        "level": level,
        "event": name,
        "event_id": f"ev-{n}",
        "service": "xcloudd",
        **fields,
    }
    raw = json.dumps(body).encode()
    return Record(f"ev-{n}", name, raw, json.loads(raw))


def max_dgram_queue() -> int:
    """How many datagrams a Unix socket queues for its reader (10 unless the host changed it)."""
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            return int(f.read())
    except OSError:
        return 10


def ids(entries: list[Entry]) -> list[str]:
    return [e["XCLOUDD_EVENT_ID"] for e in entries]


@pytest.fixture
def path() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes, which pytest's tmp_path can exceed.
    directory = Path(tempfile.mkdtemp(prefix="jd", dir="/tmp"))
    yield directory / "socket"
    shutil.rmtree(directory)


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    j = Journal(path)
    yield j
    j.close()


@pytest.fixture
async def make_sink() -> AsyncIterator[Callable[..., JournaldSink]]:
    made: list[JournaldSink] = []

    def make(*args: Any, **kwargs: Any) -> JournaldSink:
        made.append(JournaldSink(*args, **kwargs))
        return made[-1]

    yield make
    for sink in made:
        await sink.aclose()


async def test_each_event_is_one_entry_that_journalctl_can_match_on(
    path: Path, journal: Journal, make_sink: Callable[..., JournaldSink]
) -> None:
    completed = event(
        "build.completed",
        1,
        build_run_id="run-1",
        build_number=42,
        workflow_id="wf-12345678",
        workflow_name="Nightly",
        job="nightly",
        origin="schedule",
        completion_status="SUCCEEDED",
        result="succeeded",
        duration_s=754.5,
        source_commit="abc123",
        git_ref=None,
        issue_counts={"errors": 0, "warnings": 2},
    )
    started = event(
        "build.started",
        2,
        level="debug",
        build_number=43,
        workflow_id="wf-12345678",
        job=None,
        origin="watch",
        queued_s=5,
        reconciled=False,
    )
    failed = event("daemon.error", 3, level="error", where="poll", error="boom", count=2)
    unrendered = event("build.log_uploaded", 4, level="warning", **{"log-url.v2": "https://x"})
    sink = make_sink(path)
    await sink.write([completed, started, failed, unrendered])

    entries = journal.receive(4)
    assert journal.pending() == []
    assert ids(entries) == ["ev-1", "ev-2", "ev-3", "ev-4"]
    assert not any(e.via_memfd for e in entries)
    first, second, third, fourth = entries

    assert first["MESSAGE"] == "#42 nightly ✔ SUCCEEDED after 12m34s · 2 warnings"
    assert first["PRIORITY"] == "6"
    assert first["SYSLOG_IDENTIFIER"] == "xcloudd"
    assert first["XCLOUDD_EVENT"] == "build.completed"
    assert first["XCLOUDD_JOB"] == "nightly"
    assert first["XCLOUDD_BUILD_NUMBER"] == "42"
    assert first["XCLOUDD_BUILD_RUN_ID"] == "run-1"
    assert first["XCLOUDD_WORKFLOW_ID"] == "wf-12345678"
    assert first["XCLOUDD_WORKFLOW_NAME"] == "Nightly"
    assert first["XCLOUDD_RESULT"] == "succeeded"
    assert first["XCLOUDD_ORIGIN"] == "schedule"
    assert first["XCLOUDD_DURATION_S"] == "754.5"
    assert first["XCLOUDD_SERVICE"] == "xcloudd"
    # Nulls and nested objects are only in the JSON.
    assert "XCLOUDD_GIT_REF" not in first
    assert "XCLOUDD_ISSUE_COUNTS" not in first
    assert json.loads(first["XCLOUDD_JSON"]) == completed.fields
    assert first.binary == set()

    assert second["MESSAGE"] == "#43 watched workflow wf-12345 running (queued 5s)"
    assert second["PRIORITY"] == "7"
    assert "XCLOUDD_JOB" not in second
    assert second["XCLOUDD_RECONCILED"] == "false"
    assert json.loads(second["XCLOUDD_JSON"]) == started.fields

    assert third["MESSAGE"] == "trouble in poll: boom (x2)"
    assert third["PRIORITY"] == "3"
    assert third["XCLOUDD_COUNT"] == "2"

    # An event with no summary of its own is shown by name; odd keys become valid names.
    assert fourth["MESSAGE"] == "build.log_uploaded"
    assert fourth["PRIORITY"] == "4"
    assert fourth["XCLOUDD_LOG_URL_V2"] == "https://x"

    # `journalctl XCLOUDD_JOB=nightly` finds the one event of that job.
    assert [
        e["XCLOUDD_EVENT_ID"] for e in entries if "nightly" in e.fields.get("XCLOUDD_JOB", [])
    ] == ["ev-1"]
    assert sink.name == f"journald:{path}"


async def test_a_value_with_newlines_arrives_whole_and_the_message_stays_one_line(
    path: Path, journal: Journal, make_sink: Callable[..., JournaldSink]
) -> None:
    record = event(
        "build.start_failed",
        1,
        level="error",
        http_status=409,
        error_code="STATE_ERROR",
        detail="line1\nline2\n",
    )
    await make_sink(path).write([record])

    (entry,) = journal.receive()
    assert entry["XCLOUDD_DETAIL"] == "line1\nline2\n"
    assert "XCLOUDD_DETAIL" in entry.binary
    assert entry["MESSAGE"] == "start refused: HTTP 409 STATE_ERROR: line1 line2 "
    assert "MESSAGE" not in entry.binary
    assert json.loads(entry["XCLOUDD_JSON"]) == record.fields


async def test_an_entry_too_large_for_a_datagram_arrives_whole_through_a_memfd(
    path: Path, journal: Journal, make_sink: Callable[..., JournaldSink]
) -> None:
    # A datagram may be as large as the sender's SO_SNDBUF, less a little: go past it.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        limit = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    detail = "x" * max(300_000, limit) + "\nend"
    large = event("build.start_failed", 1, level="error", detail=detail)
    small = event("build.created", 2, build_number=7, build_run_id="run-7")
    await make_sink(path).write([large, small])

    first, second = journal.receive(2)
    assert first.via_memfd
    assert first["XCLOUDD_DETAIL"] == detail
    assert json.loads(first["XCLOUDD_JSON"]) == large.fields
    assert first["XCLOUDD_EVENT_ID"] == "ev-1"
    # The next entry fits a datagram again.
    assert not second.via_memfd
    assert second["XCLOUDD_BUILD_RUN_ID"] == "run-7"


async def test_events_and_min_level_choose_what_the_sink_takes(
    path: Path, make_sink: Callable[..., JournaldSink]
) -> None:
    sink = make_sink(path, ("build.*",), min_level="info")
    assert sink.accepts(event("build.completed", 1))
    assert sink.accepts(event("build.start_failed", 2, level="error"))
    assert not sink.accepts(event("build.started", 3, level="debug"))
    assert not sink.accepts(event("daemon.error", 4, level="error"))
    everything = make_sink()
    assert everything.name == "journald"
    assert everything.accepts(event("daemon.started", 5, level="debug"))


async def test_without_a_journal_write_fails_and_the_retried_batch_arrives_once(
    path: Path, make_sink: Callable[..., JournaldSink]
) -> None:
    sink = make_sink(path)
    batch = [event("build.created", n, build_number=n) for n in range(3)]
    with pytest.raises(FileNotFoundError):
        await sink.write(batch)

    # A socket file that nobody listens on any more: journald stopped.
    stale = Journal(path)
    stale.close()
    with pytest.raises(ConnectionRefusedError):
        await sink.write(batch)

    os.unlink(path)
    journal = Journal(path)
    try:
        await sink.write(batch)
        assert ids(journal.receive(3)) == ["ev-0", "ev-1", "ev-2"]
        assert journal.pending() == []
    finally:
        journal.close()


async def test_a_journal_that_stops_reading_fails_the_write_and_loses_nothing(
    path: Path,
    journal: Journal,
    make_sink: Callable[..., JournaldSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(journald, "_SEND_TIMEOUT_S", 0.2)
    queue = max_dgram_queue()
    # More entries than the socket queues for a reader that does not read.
    batch = [event("build.created", n, build_number=n) for n in range(min(queue, 2000) + 2)]
    sink = make_sink(path)
    with pytest.raises(BlockingIOError):
        await sink.write(batch)
    got = journal.pending()
    assert 0 < len(got) < len(batch)

    # Retried while the journal reads again: the rest arrives, and nothing twice.
    reading = asyncio.create_task(asyncio.to_thread(journal.receive, len(batch) - len(got)))
    await sink.write(batch)
    got += await reading
    assert ids(got) == [f"ev-{n}" for n in range(len(batch))]
    assert journal.pending() == []
