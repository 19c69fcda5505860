"""Fault injection: rules that make the simulator misbehave the way Apple sometimes does.

A rule matches a method and a path regex (full match, query excluded) and acts on the next
`times` matching requests (None: every one). Rules are consulted in the order they were added,
and each request is shaped by at most one rule: the first that matches at the first phase the
request reaches (before handling; after a successful create; on the 2xx answer).

`probability` (0..1, default 1) makes a rule act on a matching request only that often, drawn
from the simulator's seeded generator (`Simulator(seed=...)`, scenario `seed`, POST /_sim/seed),
so a chaos run replays exactly as long as the requests arrive in the same order. A request the
rule lets through does not use up one of its `times`, and later rules still get their turn.

Before handling:

- "status": answer `status` without handling (Apple-like ErrorResponse, or `body` as plain text);
  `retry_after` adds a Retry-After header (429 throttling, 503 maintenance). 401 and 403 give
  Apple's NOT_AUTHORIZED and FORBIDDEN_ERROR bodies; `code` overrides the error code.
- "drop": close the connection before handling; nothing happens server-side.
- "expire_token": answers 401 NOT_AUTHORIZED as if the token had expired.
- "hang": wait `delay` seconds of real time (default 60), then handle the request normally, or
  close the connection when `then_drop` is true. The work is done even if the client gave up,
  as with a slow backend.
- "oversize": answer 200 with a JSON body of `size` bytes (default 100 MB: a long string in
  `meta.padding`), streamed in chunks with a Content-Length, without handling.

After POST /v1/ciBuildRuns created the run (the client cannot know whether its build started):

- "drop_after_create": the connection is closed without an answer.
- "error_after_create": answers 500.
- "hang_after_create": waits `delay` seconds of real time (default 60), then closes the connection.

On a 2xx JSON answer (so a rule is not used up by a 4xx):

- "malformed": the answer is rewritten into valid JSON of an unexpected shape, by `variant`
  (required), applied to every resource in `data` and `included`:
  - "unknown_enum": enum attributes get values Apple does not list (executionProgress
    QUEUED_FOR_REVIEW, completionStatus PARTIALLY_SUCCEEDED, startReason EXTERNAL_TRIGGER,
    actionType NOTARIZE, productType APP_CLIP, kind COMMIT).
  - "naive_date": every *Date attribute loses its "Z" or offset.
  - "bad_relationship": by position in the answer, `relationships` becomes a string (1st, 4th,
    ...), or the first linkage relationship becomes a list (2nd, ...) or a number (3rd, ...).
  - "missing_optional": build runs lose number, createdDate, startedDate, issueCounts,
    sourceCommit and startReason; build actions lose name, actionType, startedDate and
    issueCounts; other resources keep only `name`.
  - "not_object": `data` becomes the resource's id (a string) or the list's length (a number).
  - "bad_json": the body is not JSON at all (an HTML page), still labelled application/json.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from xcloudd.simulator.apierror import NOT_AUTHORIZED_DETAIL, ApiError


class FaultAction(StrEnum):
    STATUS = "status"
    DROP = "drop"
    DROP_AFTER_CREATE = "drop_after_create"
    ERROR_AFTER_CREATE = "error_after_create"
    EXPIRE_TOKEN = "expire_token"
    MALFORMED = "malformed"
    HANG = "hang"
    HANG_AFTER_CREATE = "hang_after_create"
    OVERSIZE = "oversize"


class MalformedVariant(StrEnum):
    UNKNOWN_ENUM = "unknown_enum"
    NAIVE_DATE = "naive_date"
    BAD_RELATIONSHIP = "bad_relationship"
    MISSING_OPTIONAL = "missing_optional"
    NOT_OBJECT = "not_object"
    BAD_JSON = "bad_json"


class FaultPhase(Enum):
    """Where in handling a rule is consulted."""

    REQUEST = "before handling"
    CREATED = "after a successful create"
    ANSWERED = "on the 2xx answer"


_PHASES: dict[FaultAction, FaultPhase] = {
    FaultAction.DROP_AFTER_CREATE: FaultPhase.CREATED,
    FaultAction.ERROR_AFTER_CREATE: FaultPhase.CREATED,
    FaultAction.HANG_AFTER_CREATE: FaultPhase.CREATED,
    FaultAction.MALFORMED: FaultPhase.ANSWERED,
}

DEFAULT_DELAY_S = 60.0
DEFAULT_OVERSIZE = 100_000_000
# The oversize body is this frame around the padding; smaller sizes cannot be valid JSON.
OVERSIZE_PREFIX = b'{"data":[],"meta":{"padding":"'
OVERSIZE_SUFFIX = b'"}}'
MIN_OVERSIZE = len(OVERSIZE_PREFIX) + len(OVERSIZE_SUFFIX)

# (code, title, detail); detail None means "say it was injected".
_STATUS_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("PARAMETER_ERROR.INVALID", "A parameter has an invalid value", None),
    401: (
        "NOT_AUTHORIZED",
        "Authentication credentials are missing or invalid.",
        NOT_AUTHORIZED_DETAIL,
    ),
    # Apple's wording, as clients report it (e.g. AvdLee/appstoreconnect-swift-sdk#182).
    403: (
        "FORBIDDEN_ERROR",
        "This request is forbidden for security reasons",
        "The API key in use does not allow this request",
    ),
    404: ("NOT_FOUND", "The specified resource does not exist", None),
    409: ("ENTITY_ERROR", "The provided entity is invalid", None),
    422: ("ENTITY_UNPROCESSABLE", "The request entity is not processable", None),
    429: ("RATE_LIMIT_EXCEEDED", "The request rate limit has been reached.", None),
    500: ("UNEXPECTED_ERROR", "An unexpected error occurred.", None),
    502: ("UNEXPECTED_ERROR", "Could not process this request.", None),
    503: ("SERVICE_UNAVAILABLE", "The service is temporarily unavailable.", None),
    504: ("UNEXPECTED_ERROR", "The request timed out.", None),
}

_FIELDS = (
    "action",
    "method",
    "path",
    "times",
    "status",
    "code",
    "body",
    "retry_after",
    "variant",
    "delay",
    "then_drop",
    "size",
    "probability",
)


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `"times": true` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _choices(enum: type[StrEnum]) -> str:
    return ", ".join(str(m) for m in enum)


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
    variant: MalformedVariant | None = None  # malformed only, required there
    delay: float | None = None  # hang, hang_after_create: seconds, default 60
    then_drop: bool = False  # hang only
    size: int | None = None  # oversize only: bytes, default 100_000_000
    probability: float = 1.0

    def __post_init__(self) -> None:
        # Validate eagerly so a bad rule fails where it is added, not on some later request;
        # every message is one line because the admin API returns it as is.
        try:
            action = FaultAction(self.action)
        except ValueError:
            raise ValueError(
                f"action must be one of: {_choices(FaultAction)} (got {self.action!r})"
            ) from None
        object.__setattr__(self, "action", action)
        for name in ("method", "path"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string")
        object.__setattr__(self, "method", self.method.upper())
        try:
            re.compile(self.path)
        except re.error as exc:
            raise ValueError(f"path is not a valid regular expression: {exc}") from None
        if self.times is not None and (not _is_int(self.times) or self.times < 1):
            raise ValueError("times must be an integer >= 1 (or null for every request)")
        if not _is_int(self.status) or not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code (100..599)")
        for name in ("code", "body"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string or null")
        if self.retry_after is not None and (not _is_int(self.retry_after) or self.retry_after < 0):
            raise ValueError("retry_after must be an integer >= 0 (seconds) or null")
        if not _is_number(self.probability) or not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be a number from 0 to 1, got {self.probability!r}")
        object.__setattr__(self, "probability", float(self.probability))
        self._check_variant(action)
        self._check_delay(action)
        self._check_size(action)

    def _check_variant(self, action: FaultAction) -> None:
        if action is not FaultAction.MALFORMED:
            if self.variant is not None:
                raise ValueError("variant only applies to action malformed")
            return
        try:
            variant = MalformedVariant(self.variant)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(
                f"malformed needs variant, one of: {_choices(MalformedVariant)} "
                f"(got {self.variant!r})"
            ) from None
        object.__setattr__(self, "variant", variant)

    def _check_delay(self, action: FaultAction) -> None:
        if not isinstance(self.then_drop, bool):
            raise TypeError("then_drop must be true or false")
        if self.then_drop and action is not FaultAction.HANG:
            raise ValueError("then_drop only applies to action hang")
        if action not in (FaultAction.HANG, FaultAction.HANG_AFTER_CREATE):
            if self.delay is not None:
                raise ValueError("delay only applies to actions hang and hang_after_create")
            return
        delay = DEFAULT_DELAY_S if self.delay is None else self.delay
        if not _is_number(delay) or not math.isfinite(delay) or delay < 0:
            raise ValueError(f"delay must be a number of seconds >= 0, got {self.delay!r}")
        object.__setattr__(self, "delay", float(delay))

    def _check_size(self, action: FaultAction) -> None:
        if action is not FaultAction.OVERSIZE:
            if self.size is not None:
                raise ValueError("size only applies to action oversize")
            return
        size = DEFAULT_OVERSIZE if self.size is None else self.size
        if not _is_int(size) or size < MIN_OVERSIZE:
            raise ValueError(f"size must be an integer >= {MIN_OVERSIZE} bytes, got {self.size!r}")
        object.__setattr__(self, "size", size)

    @property
    def phase(self) -> FaultPhase:
        return _PHASES.get(self.action, FaultPhase.REQUEST)

    @property
    def delay_s(self) -> float:
        """The hang's delay (validation fills in the default for the hang actions)."""
        return self.delay if self.delay is not None else DEFAULT_DELAY_S

    @property
    def size_bytes(self) -> int:
        """The oversize body's length (validation fills in the default for oversize)."""
        return self.size if self.size is not None else DEFAULT_OVERSIZE

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
        default_code, title, detail = _STATUS_ERRORS.get(
            status, ("UNEXPECTED_ERROR", "Injected fault", None)
        )
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return ApiError(
            status,
            self.code or default_code,
            title,
            detail or f"Injected by the simulator's fault rules (HTTP {status}).",
            headers=headers,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        """From the admin API's JSON; raises ValueError/TypeError on anything unexpected."""
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _FIELDS}
        out["action"] = str(self.action)
        out["variant"] = None if self.variant is None else str(self.variant)
        return out


class FaultRules:
    """The active rules with how many more times each may act.

    `rng` decides the `probability` draws; it belongs to the Simulator so one seed covers a run.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rules: list[tuple[Fault, list[int | None]]] = []
        self._rng = rng or random.Random(0)

    def add(self, fault: Fault) -> Fault:
        self._rules.append((fault, [fault.times]))
        return fault

    def clear(self) -> None:
        self._rules.clear()

    def take(self, method: str, path: str, phase: FaultPhase) -> Fault | None:
        """The first matching rule of `phase` that acts on this request, using up one time."""
        for i, (fault, left) in enumerate(self._rules):
            if fault.phase is not phase or not fault.matches(method, path):
                continue
            # Draw only for partial rules, so adding a certain rule does not shift the sequence.
            if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                continue
            if left[0] is not None:
                left[0] -= 1
                if left[0] <= 0:
                    del self._rules[i]
            return fault
        return None

    def active(self) -> tuple[tuple[Fault, int | None], ...]:
        return tuple((fault, left[0]) for fault, left in self._rules)
