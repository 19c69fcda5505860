"""Sinks that POST events to HTTP receivers: a JSON array, Loki's push API, or OTLP/HTTP logs.

`write` returns once the receiver answered 2xx for every chunk of the batch, and raises
`SinkError` otherwise; `delivery.py` then retries the whole batch later. Chunks that were
accepted before a later one failed are sent again with it: delivery is at-least-once per batch,
and Loki and plain JSON receivers do not deduplicate (OTLP receivers can, on `log.record.uid`).

Secrets stay out of errors and logs: URLs may carry userinfo and query tokens and headers
carry API keys, so a `SinkError` says only the status and a short reason, never the URL, and
any text taken from the receiver is scrubbed of the secrets we know of.
"""

from __future__ import annotations

import asyncio
import base64
import gzip as gzipmod
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from time import time_ns
from typing import Any, Literal

import aiohttp
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

import xcloudd
from xcloudd.console import render
from xcloudd.sinks import EventFilter, Record

Format = Literal["json", "loki", "otlp"]
Encoded = tuple[bytes, str]

# Bodies above this are encoded/compressed on a worker thread: 500 events of a few KB each
# take milliseconds to serialise and gzip, which would stall every other task on the loop.
_OFFLOAD_BYTES = 128 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_REASON_CHARS = 100


class SinkError(OSError):
    """A receiver did not confirm a batch. The message is safe to log: status and short reason
    only (`strerror` is set so that delivery's `sink.failed` reports it)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.strerror = reason
        self.status = status


def sink_name(url: str) -> str:
    """`http:host[:port]/path`: names the sink in events and cursors, without secrets."""
    u = URL(url)
    host = u.raw_host or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = f":{u.explicit_port}" if u.explicit_port is not None else ""
    return f"http:{host}{port}{u.raw_path}"


def unix_ns(timestamp: object) -> int:
    """Nanoseconds since the epoch of an RFC 3339 timestamp, computed exactly (no float)."""
    try:
        dt = datetime.fromisoformat(str(timestamp))
    except ValueError:
        return time_ns()  # every stored event has one; never drop an event over it
    d = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)) - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000_000 + d.microseconds * 1_000


# --- encoders: pure functions of the records ------------------------------------------------


def encode_json(records: Sequence[Record]) -> Encoded:
    """The events exactly as stored, as one JSON array."""
    return b"[" + b",".join(r.body for r in records) + b"]", "application/json"


def loki_labels(fields: Mapping[str, Any]) -> dict[str, str]:
    """Low-cardinality labels only: each label set is a Loki stream, and run ids or build
    numbers would create a stream per build (ids stay searchable in the line itself)."""
    labels = {
        "service": str(fields.get("service") or "xcloudd"),
        "level": str(fields.get("level") or "info"),
        "event": str(fields.get("event") or "unknown"),
    }
    if fields.get("job") is not None:
        labels["job"] = str(fields["job"])
    return labels


def encode_loki(records: Sequence[Record]) -> Encoded:
    """Loki's push API JSON: one stream per label set, values in outbox order."""
    streams: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], list[list[str]]]] = {}
    for r in records:
        labels = loki_labels(r.fields)
        key = tuple(sorted(labels.items()))
        stream = streams.setdefault(key, (labels, []))
        stream[1].append([str(unix_ns(r.fields.get("timestamp"))), r.body.decode()])
    body = {"streams": [{"stream": lbl, "values": vals} for lbl, vals in streams.values()]}
    return orjson.dumps(body), "application/json"


_SEVERITY = {
    "debug": (5, "DEBUG"),
    "info": (9, "INFO"),
    "warning": (13, "WARN"),
    "error": (17, "ERROR"),
}
# Mapped to OTLP fields or resource attributes rather than repeated as `xcloudd.*` attributes.
_MAPPED = frozenset({"timestamp", "level", "event", "event_id", "service"})
_RUN_STATE = {
    "build.requested": "pending",
    "build.created": "pending",
    "build.started": "executing",
    "build.completed": "finalizing",
    "build.watch_expired": "finalizing",
    "build.watch_ended": "finalizing",
}
_INT64 = range(-(2**63), 2**63)


def _any_value(value: object) -> dict[str, Any] | None:
    """An OTLP AnyValue in the JSON mapping (int64 as a decimal string); None for nulls and
    for values that are not scalars."""
    if isinstance(value, bool):  # before int: bool is an int
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)} if value in _INT64 else {"stringValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    return None


def _attrs(pairs: Iterable[tuple[str, object]]) -> list[dict[str, Any]]:
    return [{"key": k, "value": v} for k, raw in pairs if (v := _any_value(raw)) is not None]


def _flatten(prefix: str, fields: Mapping[str, Any]) -> Iterable[tuple[str, object]]:
    """Scalars as `prefix.key`, nested objects (issue_counts) as dotted keys. Lists (actions)
    are left out: attributes are for filtering, and the JSON and Loki sinks carry them."""
    for key, value in fields.items():
        if isinstance(value, Mapping):
            yield from _flatten(f"{prefix}.{key}", value)
        elif not isinstance(value, list):
            yield f"{prefix}.{key}", value


def _cicd(f: Mapping[str, Any]) -> Iterable[tuple[str, object]]:
    """OpenTelemetry CI/CD and VCS semantic conventions for build events."""
    name = f.get("event")
    yield "cicd.pipeline.name", f.get("workflow_name") or f.get("job") or f.get("workflow_id")
    yield "cicd.pipeline.run.id", f.get("build_run_id")
    yield "cicd.pipeline.run.state", _RUN_STATE.get(str(name))
    if name == "build.watch_expired":
        yield "cicd.pipeline.result", "timeout"
    elif name == "build.completed":
        yield "cicd.pipeline.result", f.get("result")
    yield "cicd.pipeline.run.url.full", f.get("build_url")
    yield "vcs.ref.head.name", f.get("git_ref")
    kind = f.get("git_ref_kind")
    yield "vcs.ref.head.type", kind.lower() if isinstance(kind, str) else None
    yield "vcs.ref.head.revision", f.get("source_commit")


def otlp_log_record(f: Mapping[str, Any]) -> dict[str, Any]:
    """One event as an OTLP/JSON LogRecord: a readable body, the fields as typed attributes."""
    ns = str(unix_ns(f.get("timestamp")))
    number, text = _SEVERITY.get(str(f.get("level")), (9, "INFO"))
    name = str(f.get("event") or "")
    pairs: list[tuple[str, object]] = [("event.name", name), ("log.record.uid", f.get("event_id"))]
    own = {k: v for k, v in f.items() if k not in _MAPPED}
    pairs += _flatten("xcloudd", own)
    if name.startswith("build.") and (f.get("build_run_id") or f.get("workflow_id")):
        pairs += _cicd(f)
    return {
        # The event's own time for both: the daemon observed it when it recorded it, and
        # keeping the encoder pure makes a retried batch byte-identical.
        "timeUnixNano": ns,
        "observedTimeUnixNano": ns,
        "severityNumber": number,
        "severityText": text,
        "body": {"stringValue": render(f) or name},
        "attributes": _attrs(pairs),
        # LogRecord.event_name exists since OTLP 1.5; older receivers ignore unknown fields
        # as the OTLP/JSON spec requires. `event.name` is kept for those.
        "eventName": name,
    }


def encode_otlp(records: Sequence[Record]) -> Encoded:
    """An ExportLogsServiceRequest in the OTLP/JSON encoding (for `/v1/logs`)."""
    resource = _attrs([("service.name", "xcloudd"), ("service.version", xcloudd.__version__)])
    body = {
        "resourceLogs": [
            {
                "resource": {"attributes": resource},
                "scopeLogs": [
                    {
                        "scope": {"name": "xcloudd", "version": xcloudd.__version__},
                        "logRecords": [otlp_log_record(r.fields) for r in records],
                    }
                ],
            }
        ]
    }
    return orjson.dumps(body), "application/json"


ENCODERS: Mapping[str, Callable[[Sequence[Record]], Encoded]] = {
    "json": encode_json,
    "loki": encode_loki,
    "otlp": encode_otlp,
}


# --- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: CIMultiDictProxy[str]
    reason: str


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:  # shorter "secrets" would mangle ordinary words
            text = text.replace(secret, "***")
    return text


def url_secrets(url: URL) -> list[str]:
    """The parts of a URL that must never be shown: userinfo, query values, the whole query."""
    found = [s for s in (url.user, url.password, url.raw_query_string, url.query_string) if s]
    return found + [str(v) for v in url.query.values()]


async def post(
    session: aiohttp.ClientSession,
    url: URL,
    data: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    secrets: Iterable[str] = (),
) -> Response:
    """One POST. Timeouts and connection failures become a `SinkError` that names only their
    kind (aiohttp's messages carry the host and sometimes the URL)."""
    try:
        async with session.post(
            url,
            data=data,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,  # a redirect would replay credentials to another place
            raise_for_status=False,  # ours to read (413 splits), whatever the session says
        ) as resp:
            text = (await resp.read())[:512].decode("utf-8", "replace")
            first = text.strip().splitlines()[0] if text.strip() else ""
            short = re.sub(r"\s+", " ", f"{resp.reason or ''} {first}").strip()
            reason = scrub(short, secrets)[:_REASON_CHARS]
            return Response(resp.status, resp.headers, reason)
    except TimeoutError:
        raise SinkError(f"timed out after {timeout_s:g}s") from None
    except aiohttp.ClientConnectionError as exc:
        raise SinkError(f"connection failed ({type(exc).__name__})") from None
    except aiohttp.ClientError as exc:
        raise SinkError(f"request failed ({type(exc).__name__})") from None


def basic_auth(login: str, password: str) -> str:
    """An `Authorization: Basic` value. Built here rather than with aiohttp.BasicAuth, which
    aiohttp 3.14 deprecates; latin-1 like aiohttp, UTF-8 (RFC 7617) when that cannot encode."""
    raw = f"{login}:{password}"
    try:
        data = raw.encode("latin-1")
    except UnicodeEncodeError:
        data = raw.encode()
    return "Basic " + base64.b64encode(data).decode("ascii")


def http_error(resp: Response) -> SinkError:
    return SinkError(f"HTTP {resp.status} {resp.reason}".rstrip(), resp.status)


class HttpSink:
    """Batches of events POSTed to one receiver in one format. At-least-once: a batch that
    failed part-way is sent again whole, and these receivers may store its first part twice."""

    def __init__(
        self,
        name: str,
        url: str,
        session: aiohttp.ClientSession,
        format: Format,
        *,
        headers: Mapping[str, str] | None = None,
        gzip: bool = False,
        timeout: float = 10.0,
        batch_max: int = 500,
        tenant: str | None = None,
        auth: aiohttp.BasicAuth | tuple[str, str] | None = None,
        events: Iterable[str] = ("*",),
        min_level: str = "debug",
    ) -> None:
        self.name = name
        self._encode = ENCODERS[format]
        self._session = session
        parsed = URL(url)
        self._headers = dict(headers or {})
        self._secrets = [*url_secrets(parsed), *self._headers.values()]
        if parsed.user is not None:
            # Credentials in the URL become a header and the URL used from here on carries
            # none: aiohttp's own errors may quote the URL.
            if auth is not None:
                raise ValueError(f"sink {name}: credentials both in the URL and in auth")
            auth = (parsed.user, parsed.password or "")
            parsed = parsed.with_user(None)
        if auth is not None:
            value = auth.encode() if isinstance(auth, aiohttp.BasicAuth) else basic_auth(*auth)
            self._headers["Authorization"] = value
            self._secrets += [auth[1], value]
        self._url = parsed
        if tenant:
            self._headers["X-Scope-OrgID"] = tenant
        self._gzip = gzip
        self._timeout = timeout
        self._batch_max = max(1, batch_max)
        self._filter = EventFilter(events, min_level)

    def accepts(self, record: Record) -> bool:
        return self._filter.accepts(record)

    async def write(self, records: Sequence[Record]) -> None:
        for start in range(0, len(records), self._batch_max):
            await self._send(records[start : start + self._batch_max])

    def _body(self, records: Sequence[Record]) -> tuple[bytes, dict[str, str]]:
        data, content_type = self._encode(records)
        headers = {**self._headers, "Content-Type": content_type}
        if self._gzip:
            data = gzipmod.compress(data, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        return data, headers

    async def _send(self, records: Sequence[Record]) -> None:
        if sum(len(r.body) for r in records) > _OFFLOAD_BYTES:
            data, headers = await asyncio.to_thread(self._body, records)
        else:
            data, headers = self._body(records)
        resp = await post(
            self._session,
            self._url,
            data,
            headers,
            timeout_s=self._timeout,
            secrets=self._secrets,
        )
        if resp.status == 413 and len(records) > 1:
            # Too large for the receiver: halves, down to single events, in order.
            half = len(records) // 2
            await self._send(records[:half])
            await self._send(records[half:])
            return
        if not 200 <= resp.status < 300:
            raise http_error(resp)

    def reopen(self) -> None:
        return None

    async def aclose(self) -> None:
        return None  # the session belongs to the process, not to the sink


__all__ = [
    "ENCODERS",
    "HttpSink",
    "SinkError",
    "encode_json",
    "encode_loki",
    "encode_otlp",
    "loki_labels",
    "otlp_log_record",
    "post",
    "sink_name",
    "unix_ns",
]
