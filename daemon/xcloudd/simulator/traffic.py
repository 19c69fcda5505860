"""What a test wants to know afterwards: every request and the answer it got."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from xcloudd.simulator.faults import Fault


@dataclass(frozen=True)
class TrafficEntry:
    seq: int
    time: float  # the injected clock's wall time
    method: str
    path: str
    query: dict[str, str]
    request_json: Any  # parsed body, None when absent or not JSON
    status: int | None  # None: the connection was dropped without an answer
    response_json: Any  # parsed body, None when absent or not JSON
    key_id: str | None  # the authenticated key, None before/without authentication
    fault: str | None = None  # the fault action that shaped this answer, if any
    fault_rule: Fault | None = None  # the whole rule, for its variant, delay and so on

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "request_json": self.request_json,
            "status": self.status,
            "response_json": self.response_json,
            "key_id": self.key_id,
            "fault": self.fault,
            "fault_rule": None if self.fault_rule is None else self.fault_rule.as_dict(),
        }


class TrafficLog:
    """Entries in answer order. `max_entries` bounds memory for long benchmarks: the oldest
    entries are forgotten, sequence numbers keep counting."""

    def __init__(self, max_entries: int | None = None) -> None:
        self._entries: deque[TrafficEntry] = deque(maxlen=max_entries)
        self._next = 0

    def append(self, entry: TrafficEntry) -> None:
        self._entries.append(entry)
        self._next = entry.seq + 1

    def next_seq(self) -> int:
        return self._next

    @property
    def entries(self) -> tuple[TrafficEntry, ...]:
        return tuple(self._entries)

    def since(self, seq: int) -> tuple[TrafficEntry, ...]:
        return tuple(e for e in self._entries if e.seq >= seq)

    def matching(self, method: str, path: str) -> tuple[TrafficEntry, ...]:
        return tuple(e for e in self._entries if e.method == method and e.path == path)

    def __len__(self) -> int:
        return len(self._entries)
