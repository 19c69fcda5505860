"""The one event model: every stage reports what happens as an Event, and only sinks render it.

Events pass through structlog (configured once, in `configure_logging`) so that exception
rendering, level handling and key order are the same everywhere; the final step hands the
finished record to the sinks of the emitter that produced it.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import structlog

from xcloudd.clock import Clock

EventName = Literal[
    "daemon.started",
    "daemon.reloaded",
    "daemon.stopping",
    "daemon.stopped",
    "schedule.fired",
    "schedule.skipped",
    "schedule.missed",
    "build.requested",
    "build.start_failed",
    "build.start_unknown",
    "build.created",
    "build.started",
    "build.completed",
    "build.watch_expired",
    "api.throttled",
    "api.retrying",
    "api.unavailable",
    "api.auth_failed",
    "sink.failed",
    "sink.recovered",
]
Level = Literal["debug", "info", "warning", "error"]
Origin = Literal["schedule", "manual", "watch"]

SERVICE = "xcloudd"
# Stable ids for build lifecycle events: a run's build.created is the same event however many
# times a crash makes us consider emitting it, so downstream deduplication can rely on it.
_EVENT_NAMESPACE = uuid.UUID("6f0c2a57-3b8e-4f59-9d7e-1c2b8a4e5d10")

# OpenTelemetry CI/CD `cicd.pipeline.result` values.
RESULTS: Mapping[str, str] = {
    "SUCCEEDED": "success",
    "FAILED": "failure",
    "ERRORED": "error",
    "CANCELED": "cancellation",
    "SKIPPED": "skip",
}


@dataclass(frozen=True)
class BuildRef:
    """What identifies a build run in every build event."""

    build_run_id: str
    build_number: int | None
    workflow_id: str
    job: str | None
    origin: Origin

    def fields(self) -> dict[str, Any]:
        return {
            "build_run_id": self.build_run_id,
            "build_number": self.build_number,
            "workflow_id": self.workflow_id,
            "job": self.job,
            "origin": self.origin,
        }


@dataclass(frozen=True)
class Event:
    name: EventName
    level: Level
    event_id: str
    timestamp: datetime
    fields: Mapping[str, Any]

    def record(self) -> dict[str, Any]:
        """The wire form: common fields first, then the event's own."""
        ts = self.timestamp.astimezone(UTC).isoformat(timespec="milliseconds")
        return {
            "timestamp": ts.replace("+00:00", "Z"),
            "level": self.level,
            "event": self.name,
            "event_id": self.event_id,
            "service": SERVICE,
            **self.fields,
        }


class Sink(Protocol):
    """A destination for events. `deliver` must not block the event loop for long."""

    name: str

    def accepts(self, event_name: str) -> bool: ...

    def deliver(self, record: Mapping[str, Any]) -> None: ...

    async def aclose(self) -> None: ...


_LEVELS: Mapping[EventName, Level] = {
    "build.start_failed": "error",
    "build.start_unknown": "warning",
    "build.watch_expired": "warning",
    "schedule.missed": "warning",
    "api.throttled": "info",
    "api.retrying": "warning",
    "api.unavailable": "error",
    "api.auth_failed": "error",
    "sink.failed": "error",
}


def default_level(name: EventName, fields: Mapping[str, Any]) -> Level:
    if name == "build.completed":
        return "info" if fields.get("completion_status") == "SUCCEEDED" else "warning"
    return _LEVELS.get(name, "info")


def stable_event_id(build_run_id: str, name: EventName) -> str:
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{build_run_id}/{name}"))


class _Fanout:
    """structlog's "logger": receives the finished record and hands it to the sinks."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)

    def _deliver(self, record: dict[str, Any]) -> None:
        name = str(record.get("event", ""))
        for sink in self.sinks:
            if sink.accepts(name):
                sink.deliver(record)

    debug = info = warning = error = msg = _deliver


_FIRST = ("timestamp", "level", "event", "event_id", "service")


def _to_record(_logger: Any, _method: str, event_dict: Any) -> Any:
    """Common fields first, in the documented order, so lines read the same everywhere."""
    record = {k: event_dict[k] for k in _FIRST if k in event_dict}
    record.update((k, v) for k, v in event_dict.items() if k not in record)
    return ((record,), {})


@functools.cache
def configure_logging() -> None:
    """Configure structlog once per process. Exceptions render without local variables,
    because a local may hold the private key or a token."""
    structlog.configure(
        processors=[
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            _to_record,
        ],
        logger_factory=_Fanout,
        cache_logger_on_first_use=False,
    )


class Emitter:
    """Builds events (timestamp from the injected clock, id, level) and sends them to sinks."""

    def __init__(
        self,
        sinks: Iterable[Sink],
        clock: Clock,
        *,
        observers: Iterable[Callable[[Event], None]] = (),
    ) -> None:
        configure_logging()
        self._clock = clock
        self._sinks = list(sinks)
        self._log = structlog.get_logger(self._sinks)
        self._observers = list(observers)

    @property
    def sinks(self) -> list[Sink]:
        return self._sinks

    def observe(self, observer: Callable[[Event], None]) -> None:
        self._observers.append(observer)

    def emit(
        self,
        name: EventName,
        *,
        level: Level | None = None,
        event_id: str | None = None,
        build: BuildRef | None = None,
        **fields: Any,
    ) -> Event:
        if build is not None:
            fields = {**build.fields(), **fields}
        event = Event(
            name=name,
            level=level or default_level(name, fields),
            event_id=event_id or str(uuid.uuid4()),
            timestamp=datetime.fromtimestamp(self._clock.time(), tz=UTC),
            fields=fields,
        )
        record = event.record()
        # structlog takes the event name as its positional "event" argument.
        rest = {k: v for k, v in record.items() if k != "event"}
        getattr(self._log, event.level)(name, **rest)
        for observer in self._observers:
            observer(event)
        return event

    async def aclose(self) -> None:
        for sink in self._sinks:
            await sink.aclose()


__all__ = [
    "RESULTS",
    "SERVICE",
    "BuildRef",
    "Emitter",
    "Event",
    "EventName",
    "Level",
    "Origin",
    "Sink",
    "stable_event_id",
]
