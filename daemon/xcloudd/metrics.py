"""Prometheus metrics: what operators graph and alert on.

Two sources, neither of which knows about Prometheus:
- events: `MetricsSink` is one more reader of the outbox (from its end at start-up, cursor in
  memory), so builds, schedule decisions and their histograms are counted from the same
  records every other sink gets;
- state read at scrape time: runs in flight, outbox size, what waits per sink and the last
  successful build per job come from the store (so they outlive a restart); API traffic, the
  key's rate limit, sink health and loop failures from the objects that own them.

Labels are bounded: job, workflow (name once known, else id), result, endpoint class, status,
sink, task. Never run ids or build numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from xcloudd import __version__
from xcloudd.sinks import Record
from xcloudd.store import StoreStats

__all__ = ["CONTENT_TYPE_LATEST", "Live", "Metrics", "MetricsSink"]

# Xcode Cloud stops builds at 120 minutes; queues are usually minutes.
_DURATION_BUCKETS = (60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, float("inf"))
_QUEUE_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))


class _ApiSource(Protocol):
    @property
    def outcomes(self) -> Mapping[tuple[str, str], int]: ...

    @property
    def rate_limit_seen(self) -> tuple[int, int] | None: ...


class _SinkSource(Protocol):
    @property
    def sink_name(self) -> str: ...

    delivered: int
    failures: int
    failing: bool


@dataclass
class Live:
    """The objects whose state /metrics reads when scraped (set once the runtime is up)."""

    api: _ApiSource | None = None
    sinks: Sequence[_SinkSource] = ()
    errors: Callable[[], Mapping[str, int]] = dict
    store: StoreStats | None = None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.live = Live()
        self._workflow_names: dict[str, str] = {}
        r = self.registry
        self.requested = PromCounter(
            "xcloudd_builds_requested", "Build starts sent", ["job", "workflow"], registry=r
        )
        self.created = PromCounter(
            "xcloudd_builds_created",
            "Build runs that came to exist",
            ["workflow", "origin"],
            registry=r,
        )
        self.completed = PromCounter(
            "xcloudd_builds_completed",
            "Build runs that completed, by result",
            ["workflow", "job", "result"],
            registry=r,
        )
        self.duration = Histogram(
            "xcloudd_build_duration_seconds",
            "From start to completion",
            ["workflow"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.queued = Histogram(
            "xcloudd_build_queue_seconds",
            "From creation to start",
            ["workflow"],
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.fired = PromCounter(
            "xcloudd_schedule_fired",
            "Planned occurrences that started a build",
            ["job"],
            registry=r,
        )
        self.skipped = PromCounter(
            "xcloudd_schedule_skipped",
            "Planned occurrences that started no build",
            ["job", "reason"],
            registry=r,
        )
        self.missed = PromCounter(
            "xcloudd_schedule_missed",
            "Planned occurrences missed while down",
            ["job"],
            registry=r,
        )
        self.dropped = PromCounter(
            "xcloudd_sink_dropped_events",
            "Events dropped past the outbox bounds before the sink took them",
            ["sink"],
            registry=r,
        )
        r.register(_LiveCollector(self.live))

    def name_workflow(self, ident: str, name: str) -> None:
        """A workflow's name, learned from a lookup (a watched workflow) before any event."""
        if ident and name:
            self._workflow_names[ident] = name

    def workflow(self, fields: Mapping[str, Any]) -> str:
        """The workflow's name when any event has told it, else its id."""
        ident = str(fields.get("workflow_id") or "")
        name = fields.get("workflow_name")
        if isinstance(name, str) and name and ident:
            self._workflow_names[ident] = name
        return self._workflow_names.get(ident, ident)

    def observe(self, fields: Mapping[str, Any]) -> None:
        name = fields.get("event")
        job = str(fields.get("job") or "")
        match name:
            case "build.requested":
                self.requested.labels(job, self.workflow(fields)).inc()
            case "build.created":
                self.created.labels(self.workflow(fields), str(fields.get("origin") or "")).inc()
            case "build.completed":
                workflow = self.workflow(fields)
                self.completed.labels(workflow, job, str(fields.get("result") or "")).inc()
                if isinstance(d := fields.get("duration_s"), int | float):
                    self.duration.labels(workflow).observe(d)
                if isinstance(q := fields.get("queued_s"), int | float):
                    self.queued.labels(workflow).observe(q)
            case "schedule.fired":
                self.fired.labels(job).inc()
            case "schedule.skipped":
                self.skipped.labels(job, str(fields.get("reason") or "")).inc()
            case "sink.dropped":
                count = fields.get("count")
                self.dropped.labels(str(fields.get("sink") or "")).inc(
                    count if isinstance(count, int) and count > 0 else 0
                )
            case "schedule.missed":
                count = fields.get("count")
                self.missed.labels(job).inc(count if isinstance(count, int) and count > 0 else 1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    def __init__(self, live: Live) -> None:
        self._live = live

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics())

    def _metrics(self) -> Iterator[Metric]:
        live = self._live
        info = GaugeMetricFamily("xcloudd_info", "This xcloudd", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        if live.api is not None:
            requests = CounterMetricFamily(
                "xcloudd_api_requests", "App Store Connect requests", labels=["endpoint", "status"]
            )
            for (endpoint, status), n in sorted(live.api.outcomes.items()):
                requests.add_metric([endpoint, status], n)
            yield requests
            seen = live.api.rate_limit_seen
            if seen is not None:
                limit, remaining = seen
                yield GaugeMetricFamily(
                    "xcloudd_api_rate_limit_limit", "The key's hourly request limit", value=limit
                )
                yield GaugeMetricFamily(
                    "xcloudd_api_rate_limit_remaining",
                    "Requests left in the key's hour, as last reported",
                    value=remaining,
                )
        delivered = CounterMetricFamily(
            "xcloudd_sink_delivered_events", "Events a sink confirmed", labels=["sink"]
        )
        failures = CounterMetricFamily(
            "xcloudd_sink_failures", "Failed deliveries (each retried)", labels=["sink"]
        )
        up = GaugeMetricFamily("xcloudd_sink_up", "1 while the sink takes events", labels=["sink"])
        pending = GaugeMetricFamily(
            "xcloudd_sink_pending_events", "Events waiting for the sink", labels=["sink"]
        )
        stats = live.store
        for sink in live.sinks:
            name = sink.sink_name
            delivered.add_metric([name], sink.delivered)
            failures.add_metric([name], sink.failures)
            up.add_metric([name], 0 if sink.failing else 1)
            if stats is not None and name in stats.pending:
                pending.add_metric([name], stats.pending[name])
        yield from (delivered, failures, up, pending)
        errors = CounterMetricFamily(
            "xcloudd_daemon_errors", "Failures in the daemon's loops", labels=["task"]
        )
        for task, n in sorted(live.errors().items()):
            errors.add_metric([task], n)
        yield errors
        if stats is not None:
            yield GaugeMetricFamily(
                "xcloudd_builds_in_flight", "Build runs followed now", value=stats.runs_in_flight
            )
            yield GaugeMetricFamily(
                "xcloudd_outbox_events", "Events kept in the outbox", value=stats.outbox
            )
            last = GaugeMetricFamily(
                "xcloudd_last_successful_build_timestamp_seconds",
                "When the job's last successful build finished",
                labels=["job"],
            )
            for job, at in sorted(stats.last_success.items()):
                last.add_metric([job], at)
            yield last


class MetricsSink:
    """Counts what the outbox says happened. Never fails, so it never holds anything back."""

    name = "metrics"

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def accepts(self, record: Record) -> bool:
        return True

    async def write(self, records: Sequence[Record]) -> None:
        for record in records:
            self._metrics.observe(record.fields)

    def reopen(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def errors_by_task(failures: Counter[str]) -> dict[str, int]:
    """Supervisor failure counts ("where:Type") summed per task name."""
    out: Counter[str] = Counter()
    for key, n in failures.items():
        out[key.split(":", 1)[0]] += n
    return dict(out)
