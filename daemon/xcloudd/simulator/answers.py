"""JSON answers and the application key under which handlers find the Simulator."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from xcloudd.simulator.apierror import ApiError
from xcloudd.simulator.core import Simulator
from xcloudd.simulator.faults import Fault

SIM_KEY = web.AppKey("simulator", Simulator)


class DropConnection(Exception):
    """Close the connection without answering; `fault` is the rule that asked for it."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(str(fault.action))
        self.fault = fault


class JsonResponse(web.Response):
    """A JSON answer that keeps the object it was made from, for the traffic log."""

    def __init__(self, body: Any, status: int, headers: dict[str, str] | None) -> None:
        super().__init__(
            body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
        )
        self.json_body = body


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> JsonResponse:
    return JsonResponse(body, status, headers)


def error_response(error: ApiError) -> JsonResponse:
    return json_response(error.body(), error.status, dict(error.headers))
