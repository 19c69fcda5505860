"""JSON answers and the application key under which handlers find the Simulator."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from xcloudd.simulator.apierror import ApiError
from xcloudd.simulator.core import Simulator

SIM_KEY = web.AppKey("simulator", Simulator)


class DropConnection(Exception):
    """Close the connection without answering."""

    def __init__(self, fault: str) -> None:
        super().__init__(fault)
        self.fault = fault


class JsonResponse(web.Response):
    """A JSON answer that keeps the object it was made from, for the traffic log."""

    def __init__(self, body: Any, status: int, headers: dict[str, str] | None) -> None:
        super().__init__(
            body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
        )
        self.json_body = body
        self.fault: str | None = None  # the fault rule that shaped this answer, if any


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> JsonResponse:
    return JsonResponse(body, status, headers)


def error_response(error: ApiError) -> JsonResponse:
    return json_response(error.body(), error.status, dict(error.headers))
