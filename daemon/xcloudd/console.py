"""A sink for people at a terminal: one short, readable line per event instead of JSON."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import datetime
from typing import IO, Any

from xcloudd.sinks import LineSink, Record

_MARK = {"SUCCEEDED": "✔", "FAILED": "✘", "ERRORED": "✘", "CANCELED": "⊘", "SKIPPED": "⊘"}


def _workflow(r: Mapping[str, Any]) -> str:
    name = r.get("workflow_name")
    return f'"{name}"' if name else f"workflow {str(r.get('workflow_id', ''))[:8]}"


def _who(r: Mapping[str, Any]) -> str:
    number = r.get("build_number")
    label = r.get("job") or (
        f"watched {_workflow(r)}" if r.get("origin") == "watch" else _workflow(r)
    )
    return f"#{number} {label}" if number is not None else str(label)


def plural(count: object, noun: str, many: str | None = None) -> str:
    """ "1 job", "2 jobs", "0 watches" (with many="watches")."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def _secs(value: object) -> str:
    if not isinstance(value, int | float):
        return "?"
    m, s = divmod(int(value), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def render(r: Mapping[str, Any]) -> str | None:
    """The line for one event record, or None for events people need not see."""
    name = r.get("event")
    match name:
        case "build.requested":
            return f"requesting a build of {_workflow(r)}" + (
                f" for job {r['job']}" if r.get("job") else ""
            )
        case "build.created":
            how = " (found after an unclear answer)" if r.get("reconciled") else ""
            return f"{_who(r)} created, waiting for a builder{how} · run {r.get('build_run_id')}"
        case "build.started":
            return f"{_who(r)} running (queued {_secs(r.get('queued_s'))})"
        case "build.completed":
            status = str(r.get("completion_status"))
            extra = f" ({r['cancel_reason']})" if r.get("cancel_reason") else ""
            counts = r.get("issue_counts") or {}
            issues = ""
            if isinstance(counts, dict) and any(counts.values()):
                issues = " · " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
            return (
                f"{_who(r)} {_MARK.get(status, '?')} {status}{extra} after"
                f" {_secs(r.get('duration_s'))}{issues}"
            )
        case "build.watch_expired":
            return f"{_who(r)} gave up waiting (still {r.get('last_progress')})"
        case "build.watch_ended":
            return f"{_who(r)} no longer followed: {r.get('reason')}"
        case "daemon.error":
            return f"trouble in {r.get('where')}: {r.get('error')} (x{r.get('count')})"
        case "sink.dropped":
            return (
                f"{plural(r.get('count'), 'event')} dropped for {r.get('sink')}:"
                " it fell too far behind"
            )
        case "build.start_failed":
            where = f" at {r['pointer']}" if r.get("pointer") else ""
            return (
                f"start refused: HTTP {r.get('http_status')} {r.get('error_code')}:"
                f" {r.get('detail')}{where}"
            )
        case "build.start_unknown":
            return f"no clear answer to the start ({r.get('reason')}); checking what happened"
        case "api.retrying":
            return (
                f"App Store Connect trouble ({r.get('reason')}), retry {r.get('attempt')}"
                f" in {r.get('delay_s')}s"
            )
        case "api.throttled":
            return f"slowing down: {r.get('remaining')}/{r.get('limit')} requests left this hour"
        case "api.unavailable":
            status = f" (HTTP {r['http_status']})" if r.get("http_status") else ""
            return f"App Store Connect is unavailable{status}; waiting for it"
        case "api.auth_failed":
            return (
                f"App Store Connect refused the key (HTTP {r.get('http_status')}); "
                "check [api] key_id, issuer_id and the key's access"
            )
        case "sink.failed":
            return (
                f"sink {r.get('sink')} fails ({r.get('error')}); "
                f"{plural(r.get('pending'), 'event')} wait for it"
            )
        case "sink.recovered":
            return f"sink {r.get('sink')} works again"
        case "schedule.fired":
            return f"{r.get('job')}: planned for {r.get('scheduled_for')}, starting"
        case "schedule.skipped":
            return f"{r.get('job')}: skipped the {r.get('scheduled_for')} run ({r.get('reason')})"
        case "schedule.missed":
            return f"{r.get('job')}: {plural(r.get('count'), 'planned run')} missed"
        case "daemon.reload_failed":
            return f"the new config was refused, the old one keeps running: {r.get('error')}"
        case "daemon.started" | "daemon.stopped" | "daemon.stopping" | "daemon.reloaded":
            return f"xcloudd {str(name).split('.')[1]}"
    return None


def _line(record: Record) -> str | None:
    r = record.fields
    line = render(r)
    if line is None:
        return None
    ts = str(r.get("timestamp", ""))
    try:
        clock = datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone().strftime("%H:%M:%S")
    except ValueError:
        clock = ""
    return f"{clock}  {line}"


def console_sink(stream: IO[str] | None = None, events: tuple[str, ...] = ("*",)) -> LineSink:
    """Readable lines for a person at a terminal."""
    return LineSink("console", _line, stream or sys.stdout, events)
