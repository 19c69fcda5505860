"""The Slack sink against a fake incoming webhook: Block Kit messages for finished builds,
"broke"/"fixed" when a job changes, one summary for a storm, a 429 waited out on an injected
clock, and errors that never show the webhook URL (it is the credential)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from xcloudd.clock import FakeClock
from xcloudd.httpsinks import SinkError
from xcloudd.sinks import Record
from xcloudd.slack import SlackSink

SECRET_PATH = "/services/T0000/B0000/s3cretW3bhookT0ken"

TEXT = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {
        "type": {"enum": ["mrkdwn", "plain_text"]},
        "text": {"type": "string", "minLength": 1, "maxLength": 3000},
        "emoji": {"type": "boolean"},
    },
    "additionalProperties": False,
}
HEADER_TEXT = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {
        "type": {"const": "plain_text"},
        "text": {"type": "string", "minLength": 1, "maxLength": 150},
        "emoji": {"type": "boolean"},
    },
    "additionalProperties": False,
}
# The subset of Block Kit an incoming webhook message from this sink may use.
WEBHOOK_MESSAGE = {
    "type": "object",
    "required": ["text", "blocks"],
    "additionalProperties": False,
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "blocks": {
            "type": "array",
            "minItems": 1,
            "maxItems": 50,
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"enum": ["section", "header", "context", "divider"]}},
                "allOf": [
                    {
                        "if": {"properties": {"type": {"const": "header"}}},
                        "then": {"properties": {"text": HEADER_TEXT}, "required": ["text"]},
                    },
                    {
                        "if": {"properties": {"type": {"const": "section"}}},
                        "then": {"properties": {"text": TEXT}, "required": ["text"]},
                    },
                    {
                        "if": {"properties": {"type": {"const": "context"}}},
                        "then": {
                            "properties": {
                                "elements": {"type": "array", "minItems": 1, "items": TEXT}
                            },
                            "required": ["elements"],
                        },
                    },
                ],
            },
        },
    },
}


def completed(n: int, result: str = "success", **extra: Any) -> Record:
    status = {
        "success": "SUCCEEDED",
        "failure": "FAILED",
        "error": "ERRORED",
        "cancellation": "CANCELED",
        "skip": "SKIPPED",
    }[result]
    fields: dict[str, Any] = {
        "timestamp": "2026-12-01T02:30:00.123Z",
        "level": "info" if result == "success" else "warning",
        "event": "build.completed",
        "event_id": f"ev-{n}",
        "service": "xcloudd",
        "build_run_id": f"run-{n}",
        "build_number": n,
        "workflow_id": "wf-1234567890",
        "job": "nightly-main",
        "origin": "schedule",
        "completion_status": status,
        "result": result,
        "cancel_reason": None,
        "issue_counts": {
            "analyzerWarningCount": 0,
            "errorCount": 0,
            "testFailureCount": 0,
            "warningCount": 0,
        },
        "source_commit": "abcdef0123456789abcdef0123456789abcdef01",
        "queued_s": 5,
        "duration_s": 723,
        "actions": [],
        "workflow_name": "Nightly",
        "product_name": "MyApp",
        "git_ref": "main",
        "git_ref_kind": "BRANCH",
        "previous_result": result,
        **extra,
    }
    return Record(f"ev-{n}", "build.completed", orjson.dumps(fields), fields)


def other(name: str, n: int = 99) -> Record:
    fields = {"event": name, "event_id": f"ev-{n}", "level": "info", "build_number": n}
    return Record(f"ev-{n}", name, orjson.dumps(fields), fields)


@dataclass
class Webhook:
    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    answers: list[Callable[[], web.Response]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.path == SECRET_PATH
        assert request.headers["Content-Type"] == "application/json"
        body = orjson.loads(await request.read())
        jsonschema.validate(body, WEBHOOK_MESSAGE)
        self.bodies.append(body)
        return self.answers.pop(0)() if self.answers else web.Response(text="ok")


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/{tail:.*}", hook.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    hook.url = f"http://127.0.0.1:{server.port}{SECRET_PATH}"
    yield hook
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def sink(hook: Webhook | str, session: aiohttp.ClientSession, clock: FakeClock) -> SlackSink:
    return SlackSink(hook.url if isinstance(hook, Webhook) else hook, session, clock=clock)


def all_text(body: dict[str, Any]) -> str:
    return orjson.dumps(body["blocks"]).decode()


async def test_one_message_per_completed_build_with_its_facts(
    webhook: Webhook, session: aiohttp.ClientSession, fake_clock: FakeClock
) -> None:
    slack = sink(webhook, session, fake_clock)
    await slack.write(
        [
            completed(
                42,
                "failure",
                previous_result="failure",
                issue_counts={"errorCount": 3, "testFailureCount": 1, "warningCount": 0},
                commit_url="https://git.example.com/c/abcdef0",
                build_url="https://appstoreconnect.apple.com/runs/42",
            )
        ]
    )
    [body] = webhook.bodies
    header = body["blocks"][0]
    assert header["type"] == "header"
    assert header["text"]["text"] == "❌ MyApp · Nightly #42 failed"
    blocks = all_text(body)
    for fact in ("#42", "12m03s", "branch `main`", "3 errors", "1 test failure"):
        assert fact in blocks
    assert "<https://git.example.com/c/abcdef0|`abcdef0`>" in blocks
    assert "<https://appstoreconnect.apple.com/runs/42|open run>" in blocks
    assert "warning" not in blocks  # zero counts are not mentioned
    # The fallback carries the same facts.
    for fact in ("❌ MyApp · Nightly #42 failed", "12m03s", "main", "abcdef0", "3 errors"):
        assert fact in body["text"]

    await slack.write([completed(43, "cancellation", workflow_name=None, product_name=None)])
    assert webhook.bodies[1]["blocks"][0]["text"]["text"] == "⚪ nightly-main #43 was canceled"
    await slack.write([completed(44, git_ref="v1.2.0", git_ref_kind="TAG", job=None)])
    assert webhook.bodies[2]["blocks"][0]["text"]["text"] == "✅ MyApp · Nightly #44 succeeded"
    assert "tag `v1.2.0`" in all_text(webhook.bodies[2])


async def test_broke_and_fixed_are_explicit(
    webhook: Webhook, session: aiohttp.ClientSession, fake_clock: FakeClock
) -> None:
    slack = sink(webhook, session, fake_clock)
    await slack.write([completed(7, "error", previous_result="success", product_name=None)])
    await slack.write([completed(8, "success", previous_result="failure", product_name=None)])
    broke, fixed = (b["blocks"][0]["text"]["text"] for b in webhook.bodies)
    assert broke == "❌ Nightly broke"
    assert fixed == "✅ Nightly is fixed"
    assert webhook.bodies[0]["text"].startswith("❌ Nightly broke: #7 error")
    assert webhook.bodies[1]["text"].startswith("✅ Nightly is fixed: #8 success")


async def test_up_to_three_builds_share_one_message_and_a_storm_is_one_summary(
    webhook: Webhook, session: aiohttp.ClientSession, fake_clock: FakeClock
) -> None:
    slack = sink(webhook, session, fake_clock)
    await slack.write([completed(1), completed(2, "failure"), other("build.started")])
    [few] = webhook.bodies
    headers = [b["text"]["text"] for b in few["blocks"] if b["type"] == "header"]
    assert headers == ["✅ MyApp · Nightly #1 succeeded", "❌ MyApp · Nightly #2 failed"]
    assert len(few["text"].splitlines()) == 2

    storm = [completed(n, "failure" if n % 10 == 0 else "success") for n in range(1, 51)]
    storm[24] = completed(25, "error", previous_result="success")
    await slack.write(storm)
    assert len(webhook.bodies) == 2
    summary = webhook.bodies[1]
    assert summary["blocks"][0]["text"]["text"] == (
        "50 builds finished: 44 ✅ success, 5 ❌ failure, 1 ❌ error"
    )
    lines = summary["blocks"][1]["text"]["text"].splitlines()
    assert len(lines) == 11
    assert lines[-1] == "and 40 more"
    # The break and the failures are always shown, then the rest; in the order they happened.
    numbers = [int(line.split("#")[1].split(" ")[0]) for line in lines[:-1]]
    assert numbers == [1, 2, 3, 4, 10, 20, 25, 30, 40, 50]
    assert "*broke*" in lines[numbers.index(25)]
    assert summary["text"].startswith("50 builds finished")
    assert "and 40 more" in summary["text"]


async def test_a_watch_that_expired_is_a_short_warning(
    webhook: Webhook, session: aiohttp.ClientSession, fake_clock: FakeClock
) -> None:
    fields = {
        "event": "build.watch_expired",
        "event_id": "ev-1",
        "level": "warning",
        "build_number": 12,
        "workflow_id": "wf-abcdef123",
        "job": None,
        "origin": "watch",
        "last_progress": "RUNNING",
    }
    await sink(webhook, session, fake_clock).write(
        [Record("ev-1", "build.watch_expired", orjson.dumps(fields), fields)]
    )
    [body] = webhook.bodies
    assert body["blocks"][0]["text"]["text"] == "⚠️ workflow wf-abcde #12 is taking too long"
    assert "still RUNNING" in body["text"]


async def test_other_events_cause_no_request(
    webhook: Webhook, session: aiohttp.ClientSession, fake_clock: FakeClock
) -> None:
    slack = sink(webhook, session, fake_clock)
    records = [other("build.started"), other("daemon.started"), other("sink.failed")]
    assert not any(slack.accepts(r) for r in records)
    await slack.write(records)
    assert webhook.bodies == []


async def test_posts_are_spaced_and_a_429_is_waited_out_once(
    webhook: Webhook, session: aiohttp.ClientSession, fake_clock: FakeClock
) -> None:
    slack = sink(webhook, session, fake_clock)
    start = fake_clock.monotonic()
    await slack.write([completed(1)])
    await slack.write([completed(2)])
    assert fake_clock.monotonic() - start == pytest.approx(1.0)  # min_gap_s, not wall time

    webhook.answers.append(lambda: web.Response(status=429, headers={"Retry-After": "7"}))
    before = fake_clock.monotonic()
    await slack.write([completed(3)])
    assert fake_clock.monotonic() - before == pytest.approx(8.0)  # the gap, then Retry-After
    assert webhook.bodies[-1] == webhook.bodies[-2]  # the same message, sent again once

    # Asked to wait longer than a batch is held: fail now, delivery's backoff takes over.
    webhook.answers.append(lambda: web.Response(status=429, headers={"Retry-After": "300"}))
    with pytest.raises(SinkError, match="429"):
        await slack.write([completed(4)])
    # Rate limited twice in a row: the batch fails.
    webhook.answers += [lambda: web.Response(status=429, headers={"Retry-After": "1"})] * 2
    with pytest.raises(SinkError, match="HTTP 429"):
        await slack.write([completed(5)])
    assert len(webhook.bodies) == 7


async def test_errors_do_not_show_the_webhook_url(
    webhook: Webhook, session: aiohttp.ClientSession, fake_clock: FakeClock
) -> None:
    # Slack answers errors in plain text; this one echoes the path, which must not pass.
    webhook.answers.append(lambda: web.Response(status=404, text=f"no_service {SECRET_PATH}"))
    with pytest.raises(SinkError) as caught:
        await sink(webhook, session, fake_clock).write([completed(1)])
    assert str(caught.value).startswith("HTTP 404 Not Found no_service")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = f"http://127.0.0.1:{port}{SECRET_PATH}"
    with pytest.raises(SinkError, match="connection failed") as refused:
        await sink(gone, session, fake_clock).write([completed(1)])

    for exc in (caught.value, refused.value):
        shown = f"{exc} {exc!r} {exc.strerror}"
        assert "s3cretW3bhookT0ken" not in shown
        assert SECRET_PATH not in shown
        assert exc.__cause__ is None
