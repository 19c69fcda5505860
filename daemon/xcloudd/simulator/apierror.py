"""Apple's ErrorResponse: one exception type that every layer raises and one renderer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

# Apple's wording for every token problem; clients show it, so it must read like Apple's.
NOT_AUTHORIZED_DETAIL = (
    "Provide a properly configured and signed bearer token, and make sure that it has not "
    "expired. Learn more about Generating Tokens for API Requests "
    "https://developer.apple.com/go/?id=api-generating-tokens"
)


# Not frozen: Python code (contextlib, asyncio) assigns __traceback__ on exceptions it re-raises.
@dataclass(eq=False)
class ApiError(Exception):
    """An error answer. `source` is ("pointer", "/data/...") or ("parameter", "limit")."""

    status: int
    code: str
    title: str
    detail: str
    source: tuple[str, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "status": str(self.status),  # Apple sends the status as a string
            "code": self.code,
            "title": self.title,
            "detail": self.detail,
        }
        if self.source is not None:
            error["source"] = {self.source[0]: self.source[1]}
        if self.meta:
            error["meta"] = dict(self.meta)
        return {"errors": [error]}


def not_found(kind: str, resource_id: str) -> ApiError:
    return ApiError(
        404,
        "NOT_FOUND",
        "The specified resource does not exist",
        f"There is no resource of type '{kind}' with id '{resource_id}'",
    )


def path_error(path: str) -> ApiError:
    return ApiError(
        404,
        "PATH_ERROR",
        "The URL path is not valid",
        f"The URL path '{path}' is not a valid resource path",
    )


def method_not_allowed(method: str, path: str) -> ApiError:
    return ApiError(
        405,
        "METHOD_NOT_ALLOWED",
        "The request method is not valid for the resource path.",
        f"The request method '{method}' is not valid for the resource path '{path}'.",
    )


def parameter_invalid(parameter: str, detail: str) -> ApiError:
    return ApiError(
        400,
        "PARAMETER_ERROR.INVALID",
        "A parameter has an invalid value",
        detail,
        ("parameter", parameter),
    )


def parameter_illegal(parameter: str) -> ApiError:
    return ApiError(
        400,
        "PARAMETER_ERROR.ILLEGAL",
        "A parameter was provided which is not allowed",
        f"The parameter '{parameter}' can not be used with this request",
        ("parameter", parameter),
    )


def not_authorized(reason: str) -> ApiError:
    # The reason goes to meta only: Apple's detail is generic, tests and operators want more.
    # It never contains the token or key material.
    return ApiError(
        401,
        "NOT_AUTHORIZED",
        "Authentication credentials are missing or invalid.",
        NOT_AUTHORIZED_DETAIL,
        meta={"reason": reason},
    )


def entity_error(code: str, title: str, detail: str, pointer: str) -> ApiError:
    return ApiError(409, code, title, detail, ("pointer", pointer))


def unexpected_error() -> ApiError:
    return ApiError(
        500,
        "UNEXPECTED_ERROR",
        "An unexpected error occurred.",
        "An unexpected error occurred on the server side. If this issue continues, contact us "
        "at https://developer.apple.com/contact/.",
    )
