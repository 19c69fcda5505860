"""The one event model: what happened, as a value, before it is written to the outbox.

Events are built here and nowhere else: the state store writes an event row in the same
transaction as the fact it reports (see store.py), and sinks deliver rows read from that
outbox (see delivery.py). An `event_id` names one event with one body: ids of facts are
derived from what the fact is about (a run, an occurrence, an intent), so whoever records the
fact first writes the only row with that id.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from xcloudd.clock import Clock

EventName = Literal[
    "daemon.started",
    "daemon.reloaded",
    "daemon.reload_failed",
    "daemon.stopping",
    "daemon.stopped",
    "daemon.error",
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
    "build.watch_ended",
    "api.throttled",
    "api.retrying",
    "api.unavailable",
    "api.auth_failed",
    "sink.failed",
    "sink.recovered",
    "sink.dropped",
]
Level = Literal["debug", "info", "warning", "error"]
Origin = Literal["schedule", "manual", "watch"]

SERVICE = "xcloudd"
# Stable ids: a fact's event is the same event however many processes consider writing it.
_EVENT_NAMESPACE = uuid.UUID("6f0c2a57-3b8e-4f59-9d7e-1c2b8a4e5d10")

# OpenTelemetry CI/CD `cicd.pipeline.result` values.
RESULTS: Mapping[str, str] = {
    "SUCCEEDED": "success",
    "FAILED": "failure",
    "ERRORED": "error",
    "CANCELED": "cancellation",
    "SKIPPED": "skip",
}


def origin_of(value: str | None) -> Origin:
    return "schedule" if value == "schedule" else "watch" if value == "watch" else "manual"


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

    def body(self) -> bytes:
        return orjson.dumps(self.record(), default=str)


_LEVELS: Mapping[EventName, Level] = {
    "build.start_failed": "error",
    "build.start_unknown": "warning",
    "build.watch_expired": "warning",
    "build.watch_ended": "warning",
    "schedule.missed": "warning",
    "api.throttled": "info",
    "api.retrying": "warning",
    "api.unavailable": "error",
    "api.auth_failed": "error",
    "daemon.error": "error",
    "daemon.reload_failed": "error",
    "sink.failed": "error",
    "sink.dropped": "error",
}


def default_level(name: EventName, fields: Mapping[str, Any]) -> Level:
    if name == "build.completed":
        return "info" if fields.get("completion_status") == "SUCCEEDED" else "warning"
    return _LEVELS.get(name, "info")


def stable_event_id(subject: str, name: EventName) -> str:
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{subject}/{name}"))


def occurrence_key(job: str, planned: datetime) -> str:
    return f"{job}@{planned.astimezone(UTC).isoformat()}"


class EventFactory:
    """Builds events with the injected clock's time; pure (it writes nothing)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.time(), tz=UTC)

    def make(
        self,
        name: EventName,
        *,
        subject: str | None = None,
        build: BuildRef | None = None,
        level: Level | None = None,
        context: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> Event:
        """An event; with `subject`, its id is derived from it (one fact, one id). `context`:
        more fields about the build (its names), placed after the build's identity."""
        if build is not None or context:
            fields = {**(build.fields() if build else {}), **(context or {}), **fields}
        return Event(
            name=name,
            level=level or default_level(name, fields),
            event_id=stable_event_id(subject, name) if subject else str(uuid.uuid4()),
            timestamp=self.now(),
            fields=fields,
        )


class Emitter:
    """Reports what is not a recorded fact (api.*, daemon.*, sink.*): each event becomes an
    outbox row through `write`, so it reaches the sinks the same way as every other event."""

    def __init__(self, factory: EventFactory, write: Callable[[Event], None]) -> None:
        self.factory = factory
        self._write = write

    def emit(self, name: EventName, **fields: Any) -> Event:
        event = self.factory.make(name, **fields)
        self._write(event)
        return event


__all__ = [
    "RESULTS",
    "SERVICE",
    "BuildRef",
    "Emitter",
    "Event",
    "EventFactory",
    "EventName",
    "Level",
    "Origin",
    "occurrence_key",
    "origin_of",
    "stable_event_id",
]
