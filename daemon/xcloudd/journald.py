"""A sink that writes each event to the systemd journal as one structured entry.

It speaks journald's native protocol (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/) directly,
without libsystemd: one datagram per entry, or a sealed memfd passed over the socket when the
entry is too large for a datagram. Every top-level scalar of an event becomes an `XCLOUDD_*`
field, so `journalctl -u xcloudd XCLOUDD_JOB=nightly` finds a job's events, and the whole event
is in `XCLOUDD_JSON`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from socket import socket as Socket
from typing import Any

from xcloudd.console import render
from xcloudd.sinks import EventFilter, Record, SinkThread, write_all

DEFAULT_SOCKET = Path("/run/systemd/journal/socket")

# syslog priorities, as journalctl -p understands them.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3}
# A journald that stops reading fills the socket's queue; a send then waits this long at most
# and fails, so the batch stays in the outbox instead of holding the sink's thread forever.
_SEND_TIMEOUT_S = 5.0
# Ids of entries already handed to journald: a batch retried after failing half-way is not
# logged twice.
_RECENT_IDS = 8192
_NOT_FIELD_CHAR = re.compile(r"[^A-Z0-9_]")
_FIELD_NAME_MAX = 64

# fcntl names that older Pythons lack; the values are Linux's.
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_SEALS = (
    getattr(fcntl, "F_SEAL_SEAL", 0x1)
    | getattr(fcntl, "F_SEAL_SHRINK", 0x2)
    | getattr(fcntl, "F_SEAL_GROW", 0x4)
    | getattr(fcntl, "F_SEAL_WRITE", 0x8)
)


def _field(name: str, value: bytes) -> bytes:
    if b"\n" in value:
        # The simple form ends at the first newline: such a value goes with its length.
        return b"%s\n%s%s\n" % (name.encode(), struct.pack("<Q", len(value)), value)
    return b"%s=%s\n" % (name.encode(), value)


def _utf8(text: str) -> bytes:
    # A lone surrogate from decoded JSON must not make the event unsendable forever.
    return text.encode("utf-8", "replace")


def _field_name(key: str) -> str:
    # journald drops fields whose names are not [A-Z0-9_], at most 64 long; the prefix also
    # keeps a name from starting with a digit or an underscore (reserved for trusted fields).
    return ("XCLOUDD_" + _NOT_FIELD_CHAR.sub("_", key.upper()))[:_FIELD_NAME_MAX]


def _scalar(value: object) -> str | None:
    if isinstance(value, bool):  # before int: bool is an int, and JSON spells it lowercase
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None  # null, objects and lists are only in XCLOUDD_JSON


def _message(fields: Mapping[str, Any], name: str) -> str:
    try:
        line = render(fields)
    except Exception:  # a summary that cannot be made must not block the event forever
        line = None
    # MESSAGE is what journalctl shows on one line per entry.
    return " ".join((line or name).split("\n"))


def entry(record: Record) -> bytes:
    """The native-protocol serialization of one event."""
    f = record.fields
    parts = [
        _field("MESSAGE", _utf8(_message(f, record.name))),
        _field("PRIORITY", b"%d" % _PRIORITY.get(str(f.get("level")), 6)),
        _field("SYSLOG_IDENTIFIER", b"xcloudd"),
        _field("XCLOUDD_EVENT", _utf8(record.name)),
        _field("XCLOUDD_EVENT_ID", _utf8(record.event_id)),
    ]
    # First name wins: keys that differ only in case or punctuation, and a field called
    # "json", must not add a second value to a field above.
    seen = {"XCLOUDD_EVENT", "XCLOUDD_EVENT_ID", "XCLOUDD_JSON"}
    for key, value in f.items():
        text = _scalar(value)
        name = _field_name(str(key))
        if text is None or name in seen:
            continue
        seen.add(name)
        parts.append(_field(name, _utf8(text)))
    parts.append(_field("XCLOUDD_JSON", record.body))
    return b"".join(parts)


class JournaldSink:
    """Each event as one journal entry, sent on the sink's own thread."""

    def __init__(
        self,
        socket: Path = DEFAULT_SOCKET,
        events: Iterable[str] = ("*",),
        *,
        min_level: str = "debug",
    ) -> None:
        self.name = "journald" if socket == DEFAULT_SOCKET else f"journald:{socket}"
        self.path = socket
        self._filter = EventFilter(events, min_level)
        self._sock: Socket | None = None
        self._sent: dict[str, None] = {}  # insertion-ordered, so the oldest go first
        self._thread = SinkThread(self.name)

    def accepts(self, record: Record) -> bool:
        return self._filter.accepts(record)

    async def write(self, records: Sequence[Record]) -> None:
        await self._thread.run(lambda: self._write(records))

    def reopen(self) -> None:
        # Nothing to reopen: each entry is addressed to the socket's path, so a journald that
        # restarted is reached again as it is.
        return None

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._thread.run(self._close)
        self._thread.stop()

    def _write(self, records: Sequence[Record]) -> None:
        sock = self._open()
        try:
            for r in records:
                if r.event_id in self._sent:
                    continue
                self._send(sock, entry(r))
                self._remember(r.event_id)
        except OSError:
            self._close()
            raise

    def _open(self) -> Socket:
        if self._sock is None:
            # Unconnected: sendto() each time reaches the journald listening now, after a
            # restart too. SO_SNDTIMEO bounds the wait in the kernel; Python's own timeout would
            # spin here, since poll() says an unconnected datagram socket is always writable.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sec, usec = divmod(int(_SEND_TIMEOUT_S * 1_000_000), 1_000_000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", sec, usec))
            self._sock = sock
        return self._sock

    def _send(self, sock: Socket, data: bytes) -> None:
        address = os.fsencode(self.path)
        try:
            sock.sendto(data, address)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(sock, data, address)

    def _send_memfd(self, sock: Socket, data: bytes, address: bytes) -> None:
        # Too large for a datagram: the entry goes in a sealed memfd (journald takes only sealed
        # ones, so it knows the content cannot change under it), sent alone in an empty datagram.
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            write_all(fd, data)
            fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            sock.sendmsg([], rights, 0, address)
        finally:
            os.close(fd)

    def _remember(self, event_id: str) -> None:
        self._sent[event_id] = None
        if len(self._sent) > _RECENT_IDS:
            del self._sent[next(iter(self._sent))]

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
