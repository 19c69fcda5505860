"""Fault injection: rules that make the simulator misbehave the way Apple sometimes does.

A rule matches a method and a path regex (full match, query excluded) and acts on the next
`times` matching requests (None: every one). Rules are consulted in the order they were added.
Actions:

- "status": answer `status` without handling (Apple-like ErrorResponse, or `body` as plain text);
  `retry_after` adds a Retry-After header (429 throttling, 503 maintenance).
- "drop": close the connection before handling; nothing happens server-side.
- "drop_after_create": POST /v1/ciBuildRuns creates the run, then the connection is closed
  without an answer: the client cannot know whether its build started.
- "error_after_create": creates the run, then answers 500.
- "expire_token": answers 401 NOT_AUTHORIZED as if the token had expired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from xcloudd.simulator.apierror import NOT_AUTHORIZED_DETAIL, ApiError


class FaultAction(StrEnum):
    STATUS = "status"
    DROP = "drop"
    DROP_AFTER_CREATE = "drop_after_create"
    ERROR_AFTER_CREATE = "error_after_create"
    EXPIRE_TOKEN = "expire_token"


# Actions that only make sense once a build run has been created.
AFTER_CREATE = frozenset({FaultAction.DROP_AFTER_CREATE, FaultAction.ERROR_AFTER_CREATE})

_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    429: ("RATE_LIMIT_EXCEEDED", "The request rate limit has been reached."),
    500: ("UNEXPECTED_ERROR", "An unexpected error occurred."),
    502: ("UNEXPECTED_ERROR", "Could not process this request."),
    503: ("SERVICE_UNAVAILABLE", "The service is temporarily unavailable."),
    504: ("UNEXPECTED_ERROR", "The request timed out."),
}


@dataclass(frozen=True)
class Fault:
    action: FaultAction = FaultAction.STATUS
    method: str = "*"
    path: str = ".*"
    times: int | None = 1
    status: int = 503
    code: str | None = None
    body: str | None = None  # plain-text body instead of an ErrorResponse
    retry_after: int | None = None

    def __post_init__(self) -> None:
        # Validate eagerly so a bad rule fails where it is added, not on some later request.
        object.__setattr__(self, "action", FaultAction(self.action))
        re.compile(self.path)
        if self.times is not None and self.times < 1:
            raise ValueError("times must be >= 1 (or None for every request)")
        if not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method.upper())) and re.fullmatch(self.path, path) is not None

    def error(self) -> ApiError:
        """The ErrorResponse this fault answers with (when it has no plain `body`)."""
        if self.action is FaultAction.EXPIRE_TOKEN:
            return ApiError(
                401,
                "NOT_AUTHORIZED",
                "Authentication credentials are missing or invalid.",
                NOT_AUTHORIZED_DETAIL,
                meta={"reason": "the token has expired"},
            )
        status = 500 if self.action is FaultAction.ERROR_AFTER_CREATE else self.status
        default_code, title = _STATUS_ERRORS.get(status, ("UNEXPECTED_ERROR", "Injected fault"))
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return ApiError(
            status,
            self.code or default_code,
            title,
            f"Injected by the simulator's fault rules (HTTP {status}).",
            headers=headers,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        """From the admin API's JSON; raises ValueError/TypeError on anything unexpected."""
        allowed = {"action", "method", "path", "times", "status", "code", "body", "retry_after"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        fault = cls(**data)
        for name, typ in (("method", str), ("path", str), ("status", int)):
            if not isinstance(getattr(fault, name), typ):
                raise TypeError(f"{name} has the wrong type")
        return fault

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": str(self.action),
            "method": self.method,
            "path": self.path,
            "times": self.times,
            "status": self.status,
            "code": self.code,
            "body": self.body,
            "retry_after": self.retry_after,
        }


class FaultRules:
    """The active rules with how many more times each may act."""

    def __init__(self) -> None:
        self._rules: list[tuple[Fault, list[int | None]]] = []

    def add(self, fault: Fault) -> Fault:
        self._rules.append((fault, [fault.times]))
        return fault

    def clear(self) -> None:
        self._rules.clear()

    def take(self, method: str, path: str, *, after_create: bool) -> Fault | None:
        """The first matching rule of the given phase, using up one of its times."""
        for i, (fault, left) in enumerate(self._rules):
            if (fault.action in AFTER_CREATE) != after_create or not fault.matches(method, path):
                continue
            if left[0] is not None:
                left[0] -= 1
                if left[0] <= 0:
                    del self._rules[i]
            return fault
        return None

    def active(self) -> tuple[tuple[Fault, int | None], ...]:
        return tuple((fault, left[0]) for fault, left in self._rules)
