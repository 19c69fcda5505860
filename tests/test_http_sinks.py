"""HTTP sinks against real local receivers: what arrives must be what each receiver documents
(OTLP parsed by the official protobuf definitions, Loki's push shape), failures raise a
SinkError that names no secret, and a 413 is split down until every event got through once."""

from __future__ import annotations

import base64
import gzip
import json
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

import xcloudd
from procs import free_port
from xcloudd.httpsinks import HttpSink, SinkError, encode_loki, sink_name
from xcloudd.sinks import Record

TS = "2026-12-01T02:30:00.123Z"
TS_NS = int(datetime(2026, 12, 1, 2, 30, tzinfo=UTC).timestamp()) * 10**9 + 123_000_000
SECRETS = ("s3cr3t-pass", "t0ken-in-query", "hdr-secret-value")


def rec(name: str, n: int = 1, **extra: Any) -> Record:
    """An event as the outbox stores it (common fields first)."""
    fields: dict[str, Any] = {
        "timestamp": TS,
        "level": "info",
        "event": name,
        "event_id": f"ev-{n}",
        "service": "xcloudd",
        **extra,
    }
    return Record(f"ev-{n}", name, orjson.dumps(fields), fields)


def completed(n: int = 1, **extra: Any) -> Record:
    return rec(
        "build.completed",
        n,
        build_run_id=f"run-{n}",
        build_number=100 + n,
        workflow_id="wf-1",
        job="nightly-main",
        origin="schedule",
        completion_status="FAILED",
        result="failure",
        cancel_reason=None,
        issue_counts={
            "analyzerWarningCount": 0,
            "errorCount": 2,
            "testFailureCount": 1,
            "warningCount": 0,
        },
        source_commit="0123456789abcdef0123456789abcdef01234567",
        queued_s=12,
        duration_s=723.5,
        actions=[{"name": "Test", "completion_status": "FAILED"}],
        workflow_name="Nightly",
        product_name="MyApp",
        git_ref="main",
        git_ref_kind="BRANCH",
        commit_url="https://example.com/c/0123456",
        previous_result="success",
        build_url="https://appstoreconnect.apple.com/run-1",
        **extra,
    )


@dataclass
class Seen:
    path: str
    query: str
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> bytes:
        if self.headers.get("Content-Encoding") == "gzip":
            return gzip.decompress(self.raw)
        return self.raw

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    answer: Callable[[Seen], web.Response] = lambda _: web.Response(status=204)

    async def handle(self, request: web.Request) -> web.Response:
        seen = Seen(request.path, request.query_string, dict(request.headers), await request.read())
        self.seen.append(seen)
        return self.answer(seen)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", r.handle)
    server = TestServer(app, host="127.0.0.1")
    # Bodies arrive as sent, so the test sees the gzip the sink produced.
    await server.start_server(auto_decompress=False)
    r.url = f"http://127.0.0.1:{server.port}"
    yield r
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# --- OTLP ------------------------------------------------------------------------------------


def attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        value: AnyValue = kv.value
        out[kv.key] = getattr(value, str(value.WhichOneof("value")))
    return out


async def test_otlp_bodies_parse_with_the_official_definitions(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    sink = HttpSink("http:otlp", f"{receiver.url}/v1/logs", session, "otlp")
    records = [
        rec("build.started", 1, level="debug", build_run_id="run-2", workflow_id="wf-1", job=None),
        completed(2),
        rec("build.watch_expired", 3, level="warning", build_run_id="r3", workflow_id="wf-9"),
        rec("daemon.error", 4, level="error", where="loop", error="boom", count=3),
    ]
    await sink.write(records)

    [seen] = receiver.seen
    assert seen.path == "/v1/logs"
    assert seen.headers["Content-Type"] == "application/json"
    msg = json_format.Parse(seen.body, ExportLogsServiceRequest(), ignore_unknown_fields=False)
    [rl] = msg.resource_logs
    assert attributes(rl.resource.attributes) == {
        "service.name": "xcloudd",
        "service.version": xcloudd.__version__,
    }
    [sl] = rl.scope_logs
    assert sl.scope.name == "xcloudd"
    logs = list(sl.log_records)
    assert [(r.severity_number, r.severity_text) for r in logs] == [
        (5, "DEBUG"),
        (9, "INFO"),
        (13, "WARN"),
        (17, "ERROR"),
    ]
    assert all(r.time_unix_nano == TS_NS == r.observed_time_unix_nano for r in logs)
    assert [r.event_name for r in logs] == [r.name for r in records]

    build = attributes(logs[1].attributes)
    assert build["event.name"] == "build.completed"
    assert build["log.record.uid"] == "ev-2"
    assert build["cicd.pipeline.name"] == "Nightly"
    assert build["cicd.pipeline.run.id"] == "run-2"
    assert build["cicd.pipeline.run.state"] == "finalizing"
    assert build["cicd.pipeline.result"] == "failure"
    assert build["cicd.pipeline.run.url.full"] == "https://appstoreconnect.apple.com/run-1"
    assert build["vcs.ref.head.name"] == "main"
    assert build["vcs.ref.head.type"] == "branch"
    assert build["vcs.ref.head.revision"].startswith("0123456789abcdef")
    # Typed values: ints as int64, floats as doubles, nested counts flattened, nulls left out.
    assert build["xcloudd.build_number"] == 102
    assert build["xcloudd.duration_s"] == 723.5
    assert build["xcloudd.job"] == "nightly-main"
    assert build["xcloudd.issue_counts.errorCount"] == 2
    assert "xcloudd.cancel_reason" not in build
    assert "xcloudd.timestamp" not in build
    assert logs[1].body.string_value.startswith("#102 nightly-main")

    started = attributes(logs[0].attributes)
    assert started["cicd.pipeline.run.state"] == "executing"
    assert started["cicd.pipeline.name"] == "wf-1"  # no workflow name, no job
    assert "cicd.pipeline.result" not in started
    assert "xcloudd.job" not in started
    expired = attributes(logs[2].attributes)
    assert expired["cicd.pipeline.result"] == "timeout"
    assert not any(k.startswith("cicd.") for k in attributes(logs[3].attributes))
    assert logs[3].body.string_value == "trouble in loop: boom (x3)"


# --- Loki ------------------------------------------------------------------------------------

# Loki's push API (POST /loki/api/v1/push, JSON): labels are a map of strings, each value a
# [unix-epoch-nanoseconds-as-string, log-line] pair.
LOKI_PUSH = {
    "type": "object",
    "required": ["streams"],
    "additionalProperties": False,
    "properties": {
        "streams": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["stream", "values"],
                "additionalProperties": False,
                "properties": {
                    "stream": {
                        "type": "object",
                        "minProperties": 1,
                        "propertyNames": {"pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
                        "additionalProperties": {"type": "string"},
                    },
                    "values": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "array",
                            "prefixItems": [
                                {"type": "string", "pattern": "^[0-9]{1,19}$"},
                                {"type": "string"},
                            ],
                            "minItems": 2,
                            "maxItems": 2,
                        },
                    },
                },
            },
        }
    },
}


async def test_loki_push_shape_labels_tenant_auth_and_gzip(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    records = [completed(1), rec("daemon.started", 2), completed(3), rec("build.started", 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # aiohttp >= 3.14 deprecates it
        basic = aiohttp.BasicAuth("loki-user", "loki-pass")
    for gz, auth in ((False, basic), (True, ("loki-user", "loki-pass"))):
        sink = HttpSink(
            "http:loki",
            f"{receiver.url}/loki/api/v1/push",
            session,
            "loki",
            gzip=gz,
            tenant="team-a",
            auth=auth,
        )
        await sink.write(records)
    plain, zipped = receiver.seen
    assert "Content-Encoding" not in plain.headers
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert zipped.raw[:2] == b"\x1f\x8b"
    assert zipped.json() == plain.json()

    for seen in (plain, zipped):
        assert seen.headers["X-Scope-OrgID"] == "team-a"
        assert (
            seen.headers["Authorization"]
            == "Basic " + base64.b64encode(b"loki-user:loki-pass").decode()
        )
        jsonschema.validate(seen.json(), LOKI_PUSH)

    streams = plain.json()["streams"]
    for stream in streams:
        assert set(stream["stream"]) <= {"service", "level", "event", "job"}
    by_event = {s["stream"]["event"]: s for s in streams}
    assert by_event["build.completed"]["stream"] == {
        "service": "xcloudd",
        "level": "info",
        "event": "build.completed",
        "job": "nightly-main",
    }
    # Lines are the stored events; values keep outbox order within a stream.
    lines = [v[1] for v in by_event["build.completed"]["values"]]
    assert lines == [records[0].body.decode(), records[2].body.decode()]
    assert by_event["build.completed"]["values"][0][0] == str(TS_NS)
    assert "job" not in by_event["daemon.started"]["stream"]


def test_loki_labels_never_carry_run_ids_or_build_numbers() -> None:
    body, _ = encode_loki([completed(n) for n in range(20)])
    streams = orjson.loads(body)["streams"]
    assert len(streams) == 1  # twenty builds of one job: one stream
    labels = json.dumps(streams[0]["stream"])
    assert "run-" not in labels
    assert "10" not in labels


# --- JSON, chunks, 413 -----------------------------------------------------------------------


async def test_json_is_the_stored_events_with_custom_headers(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    records = [completed(1), rec("daemon.started", 2)]
    sink = HttpSink(
        "http:json", f"{receiver.url}/in", session, "json", headers={"X-Api-Key": "k-123"}
    )
    await sink.write(records)
    [seen] = receiver.seen
    assert seen.headers["X-Api-Key"] == "k-123"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.json() == [dict(r.fields) for r in records]
    assert seen.body == b"[" + records[0].body + b"," + records[1].body + b"]"


async def test_batches_are_sent_in_chunks_of_batch_max(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    sink = HttpSink("http:json", f"{receiver.url}/in", session, "json", batch_max=3)
    await sink.write([completed(n) for n in range(7)])
    assert [[e["event_id"] for e in s.json()] for s in receiver.seen] == [
        ["ev-0", "ev-1", "ev-2"],
        ["ev-3", "ev-4", "ev-5"],
        ["ev-6"],
    ]


async def test_413_splits_the_batch_until_every_event_arrived_once_in_order(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.answer = lambda s: web.Response(status=413 if len(s.json()) > 2 else 200)
    sink = HttpSink("http:json", f"{receiver.url}/in", session, "json")
    await sink.write([completed(n) for n in range(7)])
    accepted = [e["event_id"] for s in receiver.seen if len(s.json()) <= 2 for e in s.json()]
    assert accepted == [f"ev-{n}" for n in range(7)]

    # One event the receiver still refuses: nothing more to split, the batch fails.
    receiver.answer = lambda s: web.Response(status=413, reason="Payload Too Large")
    with pytest.raises(SinkError, match="HTTP 413"):
        await sink.write([completed(1), completed(2)])


# --- failures name no secret -----------------------------------------------------------------


def assert_no_secrets(exc: BaseException, url: str) -> None:
    shown = f"{exc} {exc!r} {getattr(exc, 'strerror', '')}"
    for secret in (*SECRETS, url):
        assert secret not in shown
    # aiohttp's own exception (which may quote the URL) is not chained for a traceback to show.
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


async def test_a_500_raises_without_secrets(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    # A receiver that echoes what it got: the sink must not pass it on.
    receiver.answer = lambda s: web.Response(
        status=500, text=f"bad request {s.query} {s.headers.get('X-Token')}"
    )
    url = receiver.url.replace("//", f"//user:{SECRETS[0]}@") + f"/push?token={SECRETS[1]}"
    sink = HttpSink("http:json", url, session, "json", headers={"X-Token": SECRETS[2]})
    with pytest.raises(SinkError) as caught:
        await sink.write([completed(1)])
    assert caught.value.status == 500
    assert str(caught.value).startswith("HTTP 500 Internal Server Error")
    assert_no_secrets(caught.value, url)
    # The userinfo went as basic auth, the query as given.
    [seen] = receiver.seen
    assert seen.query == f"token={SECRETS[1]}"
    assert (
        seen.headers["Authorization"]
        == "Basic " + base64.b64encode(f"user:{SECRETS[0]}".encode()).decode()
    )


async def test_a_receiver_not_listening_raises_without_secrets(
    session: aiohttp.ClientSession,
) -> None:
    url = f"http://user:{SECRETS[0]}@127.0.0.1:{free_port()}/push?token={SECRETS[1]}"
    sink = HttpSink("http:json", url, session, "otlp", headers={"X-Token": SECRETS[2]})
    with pytest.raises(SinkError, match="connection failed") as caught:
        await sink.write([completed(1)])
    assert isinstance(caught.value, OSError)
    assert_no_secrets(caught.value, url)


def test_sink_name_keeps_host_port_and_path_only() -> None:
    url = f"https://user:{SECRETS[0]}@loki:3100/loki/api/v1/push?token={SECRETS[1]}"
    assert sink_name(url) == "http:loki:3100/loki/api/v1/push"
    assert sink_name("https://otel.example.com/v1/logs") == "http:otel.example.com/v1/logs"
