"""The aiohttp application: middleware (auth, rate budget, faults, traffic log) around the routes.

Request pipeline for /v1 paths: traffic log, then token check (401), rate budget (429), fault
rules, then the route. Errors anywhere become Apple's ErrorResponse; every answer to an
authenticated key carries `X-Rate-Limit`, errors included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from xcloudd.simulator.admin import add_admin_routes
from xcloudd.simulator.answers import SIM_KEY, DropConnection, JsonResponse, error_response
from xcloudd.simulator.apierror import ApiError, method_not_allowed, path_error
from xcloudd.simulator.core import Simulator
from xcloudd.simulator.create import create_build_run
from xcloudd.simulator.faults import Fault, FaultAction
from xcloudd.simulator.ratelimit import RateDecision
from xcloudd.simulator.routes import add_routes
from xcloudd.simulator.traffic import TrafficEntry


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
    fault_name: str | None = None
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
        fault = sim.faults.take(request.method, request.path, after_create=False)
        if fault is not None:
            fault_name = str(fault.action)
            response = _fault_response(fault)
        else:
            response = await handler(request)
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
        fault=fault_name or (response.fault if isinstance(response, JsonResponse) else None),
    )
    return response


def _fault_response(fault: Fault) -> web.StreamResponse:
    if fault.action is FaultAction.DROP:
        raise DropConnection(str(fault.action))
    if fault.body is not None and fault.action is FaultAction.STATUS:
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        return web.Response(status=fault.status, text=fault.body, headers=headers)
    raise fault.error()


def _record(
    sim: Simulator,
    *,
    request: web.Request,
    request_json: Any,
    status: int | None,
    response_json: Any,
    key_id: str | None,
    fault: str | None,
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
            fault=fault,
        )
    )


def build_app(sim: Simulator) -> web.Application:
    app = web.Application(middlewares=[api_middleware])
    app[SIM_KEY] = sim
    add_routes(app)
    app.router.add_post("/v1/ciBuildRuns", create_build_run)
    add_admin_routes(app)
    return app
