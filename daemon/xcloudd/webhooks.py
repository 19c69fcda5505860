"""Xcode Cloud webhooks: a hint to look at one build run now, never the truth.

Xcode Cloud POSTs a JSON payload to a URL set per product each time it creates, starts and
completes a build (API-NOTES (h)). Apple signs nothing, so the receiver trusts nothing in it:
it takes the run id (and, as hints, the workflow and product ids and the event type) and hands
them to a callback that only schedules work; whoever follows the run confirms with an
authenticated GET of that run before saying anything about it.

`POST /webhooks/xcode-cloud/<token>`:

- the token is compared in constant time; a wrong token answers 404 exactly as an unknown path
  does, whatever the method, so a stranger learns nothing of the receiver;
- a body over `max_body` bytes is refused (413) without being read whole;
- a body that is not a JSON object with a usable `ciBuildRun.id` answers 400 with a short error;
- a good one answers 202 at once, after calling `hint` (which must be cheap). An exception in
  `hint` is counted, never answered as a 500.

Neither the token nor the body is ever logged or echoed.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

# Ids go into API paths: letters, digits, - and _ only (Apple's are UUIDs), and not too long.
_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
_EVENT_TYPE = re.compile(r"[A-Z0-9_]{1,64}")
UNRECOGNIZED = "UNRECOGNIZED"
PATH = "/webhooks/xcode-cloud/{token}"
_CHUNK = 16 * 1024


@dataclass(frozen=True)
class Hint:
    """What a webhook says happened: look at `run_id` now. Nothing here is verified."""

    run_id: str
    workflow_id: str | None
    product_id: str | None
    event_type: str  # "BUILD_CREATED", "BUILD_STARTED", "BUILD_COMPLETED", or what was sent


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class WebhookReceiver:
    """The route for Xcode Cloud's webhooks; `hint` is called once per good payload."""

    def __init__(
        self, token: str, hint: Callable[[Hint], None], *, max_body: int = 256 * 1024
    ) -> None:
        if not token:
            raise ValueError("the webhook token must not be empty")
        self._token = token.encode()
        self._hint = hint
        self._max_body = max_body
        self.received = 0  # good payloads, answered 202
        self.refused = 0  # wrong token, wrong method, too large, not a usable payload
        self.hint_errors = 0  # the callback raised (the sender still got its 202)

    def routes(self) -> list[web.RouteDef]:
        # Every method, so that a wrong token is a 404 whatever the method (a route that
        # answered 405 would tell that the path exists).
        return [web.route("*", PATH, self._handle)]

    def _token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "replace"), self._token)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not self._token_matches(request.match_info.get("token", "")):
            self.refused += 1
            raise web.HTTPNotFound()  # what the router answers for a path it does not know
        if request.method != "POST":
            self.refused += 1
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        try:
            body = await self._read(request)
            hint = parse_payload(body)
        except _Refused as refusal:
            self.refused += 1
            return _error(refusal.status, refusal.message)
        self.received += 1
        try:
            self._hint(hint)
        except Exception:
            # The hint only schedules a look; polling still finds the run. Never a 500, and
            # nothing logged that could carry the payload.
            self.hint_errors += 1
        return web.Response(
            body=b'{"status":"accepted"}\n', status=202, content_type="application/json"
        )

    async def _read(self, request: web.Request) -> bytes:
        """The body, up to `max_body` bytes; past that, refused without reading the rest."""
        length = request.content_length
        if length is not None and length > self._max_body:
            raise _Refused(413, "body too large")
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(_CHUNK):
            size += len(chunk)
            if size > self._max_body:
                raise _Refused(413, "body too large")
            chunks.append(chunk)
        return b"".join(chunks)


def parse_payload(body: bytes) -> Hint:
    """Apple's webhook payload, reduced to the hint; the rest is ignored."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Refused(400, "body is not JSON") from None
    if not isinstance(doc, dict):
        raise _Refused(400, "body is not a JSON object")
    run_id = _id_of(doc.get("ciBuildRun"))
    if run_id is None:
        raise _Refused(400, "no usable ciBuildRun.id")
    return Hint(
        run_id=run_id,
        workflow_id=_id_of(doc.get("ciWorkflow")),
        product_id=_id_of(doc.get("ciProduct")),
        event_type=_event_type(doc.get("metadata")),
    )


def _id_of(resource: Any) -> str | None:
    if not isinstance(resource, dict):
        return None
    value = resource.get("id")
    if isinstance(value, str) and _ID.fullmatch(value):
        return value
    return None


def _event_type(metadata: Any) -> str:
    attributes = metadata.get("attributes") if isinstance(metadata, dict) else None
    value = attributes.get("eventType") if isinstance(attributes, dict) else None
    if isinstance(value, str) and _EVENT_TYPE.fullmatch(value):
        return value
    return UNRECOGNIZED


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": message}) + b"\n",
        status=status,
        content_type="application/json",
    )
