"""The aiohttp application: middleware (auth, rate budget, faults, traffic log) around the routes.

Request pipeline for /v1 paths: token check (401), rate budget (429), fault rules of the
"before handling" phase, the route, then on a 2xx JSON answer the "after create" (201 only) and
"answered" (malformed) rules, and finally the traffic log. Errors anywhere become Apple's
ErrorResponse; every answer to an authenticated key carries `X-Rate-Limit`, errors included.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.payload import AsyncIterablePayload

from xcloudd.simulator.admin import add_admin_routes
from xcloudd.simulator.answers import (
    SIM_KEY,
    DropConnection,
    JsonResponse,
    error_response,
    json_response,
)
from xcloudd.simulator.apierror import ApiError, method_not_allowed, path_error
from xcloudd.simulator.core import Simulator
from xcloudd.simulator.create import create_build_run
from xcloudd.simulator.faults import (
    MIN_OVERSIZE,
    OVERSIZE_PREFIX,
    OVERSIZE_SUFFIX,
    Fault,
    FaultAction,
    FaultPhase,
    MalformedVariant,
)
from xcloudd.simulator.malformed import BAD_JSON_BODY, malformed_body
from xcloudd.simulator.ratelimit import RateDecision
from xcloudd.simulator.routes import add_routes
from xcloudd.simulator.traffic import TrafficEntry

# Small enough to keep memory flat, large enough that a 100 MB body is not a million writes.
_OVERSIZE_CHUNK = 64 * 1024


def _parsed_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


@web.middleware
async def api_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/_sim/"):
        return await handler(request)
    sim = request.app[SIM_KEY]
    request_json = _parsed_json(await request.read()) if request.can_read_body else None
    key_id: str | None = None
    fault: Fault | None = None
    rate: RateDecision | None = None
    response: web.StreamResponse
    try:
        key = sim.verifier.verify(
            request.headers.get("Authorization"),
            request.method,
            request.path,
            request.query_string,
            sim.clock.time(),
        )
        key_id = key.key_id
        rate = sim.rate_limiter.check(key_id)
        if not rate.allowed:
            raise ApiError(
                429,
                "RATE_LIMIT_EXCEEDED",
                "The request rate limit has been reached.",
                "We've received too many requests for this API. Please wait and try again or "
                "slow down your request rate.",
                headers={"Retry-After": str(rate.retry_after_s)},
            )
        fault = sim.faults.take(request.method, request.path, FaultPhase.REQUEST)
        if fault is None:
            response = await handler(request)
            fault, response = await _after_handling(sim, request, response)
        else:
            response = await _instead_of_handling(fault, request, handler)
    except ApiError as error:
        response = error_response(error)
    except web.HTTPNotFound:
        response = error_response(path_error(request.path))
    except web.HTTPMethodNotAllowed:
        response = error_response(method_not_allowed(request.method, request.path))
    except DropConnection as drop:
        _record(
            sim,
            request=request,
            request_json=request_json,
            status=None,
            response_json=None,
            key_id=key_id,
            fault=drop.fault,
        )
        # Closing first makes aiohttp's write fail quietly; the client sees a disconnect.
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)
    if rate is not None:
        response.headers["X-Rate-Limit"] = rate.header()
    _record(
        sim,
        request=request,
        request_json=request_json,
        status=response.status,
        response_json=response.json_body if isinstance(response, JsonResponse) else None,
        key_id=key_id,
        fault=fault,
    )
    return response


async def _instead_of_handling(
    fault: Fault,
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """A REQUEST-phase fault's answer (or drop)."""
    match fault.action:
        case FaultAction.DROP:
            raise DropConnection(fault)
        case FaultAction.HANG:
            # Real time on purpose: the client's own timeouts run on the wall clock.
            await asyncio.sleep(fault.delay_s)
            if fault.then_drop:
                raise DropConnection(fault)
            return await handler(request)
        case FaultAction.OVERSIZE:
            return _oversize_response(fault.size_bytes)
        case FaultAction.STATUS if fault.body is not None:
            retry = fault.retry_after
            headers = {"Retry-After": str(retry)} if retry is not None else {}
            return web.Response(status=fault.status, text=fault.body, headers=headers)
        case _:
            raise fault.error()


async def _after_handling(
    sim: Simulator, request: web.Request, response: web.StreamResponse
) -> tuple[Fault | None, web.StreamResponse]:
    """The CREATED- and ANSWERED-phase faults, which act only on a 2xx JSON answer."""
    if not isinstance(response, JsonResponse) or not 200 <= response.status < 300:
        return None, response
    if response.status == 201:
        fault = sim.faults.take(request.method, request.path, FaultPhase.CREATED)
        if fault is not None:
            if fault.action is FaultAction.HANG_AFTER_CREATE:
                await asyncio.sleep(fault.delay_s)
            if fault.action is not FaultAction.ERROR_AFTER_CREATE:
                raise DropConnection(fault)
            return fault, error_response(fault.error())
    fault = sim.faults.take(request.method, request.path, FaultPhase.ANSWERED)
    if fault is None or fault.variant is None:
        return None, response
    # Location and the like stay: only the body is wrong.
    headers = {
        k: v
        for k, v in response.headers.items()
        if k.lower() not in ("content-type", "content-length")
    }
    if fault.variant is MalformedVariant.BAD_JSON:
        return fault, web.Response(
            status=response.status,
            body=BAD_JSON_BODY,
            content_type="application/json",
            headers=headers,
        )
    body = malformed_body(response.json_body, fault.variant)
    return fault, json_response(body, response.status, headers)


def _oversize_response(size: int) -> web.Response:
    """200 with a `size`-byte JSON body made on the fly, so it never sits in memory whole."""

    async def chunks() -> AsyncIterator[bytes]:
        yield OVERSIZE_PREFIX
        block = b"x" * _OVERSIZE_CHUNK
        left = size - MIN_OVERSIZE
        while left > 0:
            n = min(left, _OVERSIZE_CHUNK)
            yield block if n == _OVERSIZE_CHUNK else block[:n]
            left -= n
        yield OVERSIZE_SUFFIX

    # An explicit Content-Length: aiohttp would otherwise send the stream chunked.
    return web.Response(
        status=200,
        body=AsyncIterablePayload(chunks(), content_type="application/json"),
        headers={"Content-Length": str(size)},
    )


def _record(
    sim: Simulator,
    *,
    request: web.Request,
    request_json: Any,
    status: int | None,
    response_json: Any,
    key_id: str | None,
    fault: Fault | None,
) -> None:
    sim.traffic.append(
        TrafficEntry(
            seq=sim.traffic.next_seq(),
            time=sim.clock.time(),
            method=request.method,
            path=request.path,
            query=dict(request.query),
            request_json=request_json,
            status=status,
            response_json=response_json,
            key_id=key_id,
            fault=None if fault is None else str(fault.action),
            fault_rule=fault,
        )
    )


def build_app(sim: Simulator) -> web.Application:
    app = web.Application(middlewares=[api_middleware])
    app[SIM_KEY] = sim
    add_routes(app)
    app.router.add_post("/v1/ciBuildRuns", create_build_run)
    add_admin_routes(app)

    async def stop_webhooks(_app: web.Application) -> None:
        await sim.webhooks.stop()

    app.on_cleanup.append(stop_webhooks)
    return app
