"""The App Store Connect client: the only code that speaks HTTP to Apple.

It signs every request, reads `X-Rate-Limit` from every response, keeps total traffic within
the configured share of the key's hourly limit, retries what is safe to retry, and turns
Apple's `errors[]` into typed exceptions that keep `code`, `detail` and `source.pointer`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from xcloudd import __version__
from xcloudd.auth import TokenSigner
from xcloudd.clock import Clock
from xcloudd.errors import ExitCode, XcloudError
from xcloudd.events import Emitter

JSON = dict[str, Any]
USER_AGENT = f"xcloudd/{__version__}"
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 300.0


@dataclass(frozen=True)
class ErrorDetail:
    """One entry of Apple's `errors[]`."""

    status: str
    code: str
    title: str
    detail: str
    pointer: str | None = None
    parameter: str | None = None

    def describe(self) -> str:
        text = self.detail or self.title or "no detail given"
        where = self.pointer or (f"parameter {self.parameter}" if self.parameter else None)
        return f"{self.code}: {text}" + (f" (at {where})" if where else "")


def parse_errors(status: int, body: object) -> tuple[ErrorDetail, ...]:
    """Read `errors[]` defensively: real responses omit `detail` and nest more errors."""
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return ()
    out: list[ErrorDetail] = []
    for raw in body["errors"]:
        if not isinstance(raw, dict):
            continue
        source = raw.get("source") if isinstance(raw.get("source"), dict) else {}
        assert isinstance(source, dict)
        out.append(
            ErrorDetail(
                status=str(raw.get("status") or status),
                code=str(raw.get("code") or ""),
                title=str(raw.get("title") or ""),
                detail=str(raw.get("detail") or ""),
                pointer=str(source["pointer"]) if source.get("pointer") else None,
                parameter=str(source["parameter"]) if source.get("parameter") else None,
            )
        )
    return tuple(out)


class ApiError(XcloudError):
    """App Store Connect answered with an error; Apple's own words are kept."""

    def __init__(
        self, method: str, path: str, status: int, errors: tuple[ErrorDetail, ...]
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.errors = errors
        what = "; ".join(e.describe() for e in errors) or "no error details in the response"
        super().__init__(f"App Store Connect answered {status} to {method} {path}: {what}")

    @property
    def first(self) -> ErrorDetail | None:
        return self.errors[0] if self.errors else None


class NotFound(ApiError):
    pass


class AuthFailed(ApiError):
    exit_code = ExitCode.CREDENTIALS

    def __init__(
        self, method: str, path: str, status: int, errors: tuple[ErrorDetail, ...]
    ) -> None:
        super().__init__(method, path, status, errors)
        hint = (
            "check api.key_id, api.issuer_id and the private key, and that the key is active"
            if status == 401
            else "the key's role may not allow this (Xcode Cloud needs Developer or higher)"
        )
        self.args = (f"{self.args[0]} — {hint}",)


class ApiUnavailable(XcloudError):
    exit_code = ExitCode.UNAVAILABLE


class OutcomeUnknown(XcloudError):
    """A request that changes state may or may not have taken effect (timeout, reset, 5xx)."""

    exit_code = ExitCode.UNAVAILABLE

    def __init__(self, reason: str, status: int | None = None) -> None:
        self.reason = reason
        self.status = status
        super().__init__(f"the outcome of the request is unknown: {reason}")


class BadResponse(XcloudError):
    """A response we cannot read: treated like a transient failure for GETs."""


@dataclass(frozen=True)
class RateLimit:
    limit: int
    remaining: int

    @classmethod
    def parse(cls, header: str | None) -> RateLimit | None:
        """`user-hour-lim:3600;user-hour-rem:3121;` -> RateLimit(3600, 3121)."""
        if not header:
            return None
        parts: dict[str, str] = {}
        for item in header.split(";"):
            key, sep, value = item.partition(":")
            if sep:
                parts[key.strip()] = value.strip()
        try:
            return cls(int(parts["user-hour-lim"]), int(parts["user-hour-rem"]))
        except (KeyError, ValueError):
            return None


class Budget:
    """Paces requests so that the key's rolling hour stays within `share` of its limit.

    A token bucket refills at share*limit per hour, with at most a minute's worth saved up;
    when Apple reports that the key itself (other tools included) is near its limit, requests
    slow to one a minute until `user-hour-rem` recovers.
    """

    def __init__(self, share: float, clock: Clock, emitter: Emitter, limit: int = 3600) -> None:
        self._share = share
        self._clock = clock
        self._emitter = emitter
        self._limit = limit
        self._remaining = limit
        self._tokens = self._capacity
        self._stamp = clock.monotonic()
        self._lock = asyncio.Lock()
        self._throttling = False

    @property
    def _rate(self) -> float:
        return self._share * self._limit / 3600.0

    @property
    def _capacity(self) -> float:
        return max(1.0, self._rate * 60.0)

    @property
    def rate_limit(self) -> RateLimit:
        return RateLimit(self._limit, self._remaining)

    def observe(self, rl: RateLimit) -> None:
        self._limit = max(1, rl.limit)
        self._remaining = rl.remaining
        self._tokens = min(self._tokens, self._capacity)

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def _delay(self) -> float:
        reserve = (1.0 - self._share) * self._limit
        if self._remaining <= reserve:
            return 60.0
        self._refill()
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self._rate

    async def acquire(self) -> None:
        async with self._lock:
            delay = self._delay()
            if delay > 0:
                if not self._throttling:
                    self._emitter.emit(
                        "api.throttled",
                        remaining=self._remaining,
                        limit=self._limit,
                        delay_s=round(delay, 3),
                    )
                self._throttling = True
                await self._clock.sleep(delay)
                self._refill()
            else:
                self._throttling = False
            self._tokens = max(0.0, self._tokens - 1.0)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: spreads many clients' retries instead of synchronising them."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - now
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


@dataclass(frozen=True)
class _Answer:
    status: int
    body: object
    headers: Mapping[str, str]


class AscClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        signer: TokenSigner,
        clock: Clock,
        emitter: Emitter,
        *,
        timeout: float = 30.0,
        budget: float = 0.8,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self._base = URL(base_url.rstrip("/"))
        self._signer = signer
        self._clock = clock
        self._emitter = emitter
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self.budget = Budget(budget, clock, emitter)
        self.requests = 0

    def _url(self, path_or_url: str, params: Mapping[str, str] | None) -> URL:
        if path_or_url.startswith(("http://", "https://")):
            # `links.next` is followed verbatim: its cursor must not be re-encoded.
            url = URL(path_or_url, encoded=True)
            if url.origin() != self._base.origin():
                raise BadResponse(f"App Store Connect sent a link to another host: {url.host}")
        else:
            url = URL(str(self._base) + path_or_url)
        return url.update_query(params) if params else url

    async def _send(self, method: str, url: URL, body: object | None) -> _Answer:
        await self.budget.acquire()
        headers = {
            "Authorization": f"Bearer {self._signer.token()}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = orjson.dumps(body)
        self.requests += 1
        async with self._session.request(
            method, url, headers=headers, data=data, timeout=self._timeout
        ) as resp:
            raw = await resp.read()
            rl = RateLimit.parse(resp.headers.get("X-Rate-Limit"))
            if rl is not None:
                self.budget.observe(rl)
            parsed: object = None
            if raw:
                try:
                    parsed = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    parsed = None
                    if resp.status < 300:
                        raise BadResponse(
                            f"App Store Connect sent a body that is not JSON to {method} {url.path}"
                        ) from None
            return _Answer(resp.status, parsed, dict(resp.headers))

    def _error(self, method: str, path: str, answer: _Answer) -> ApiError:
        errors = parse_errors(answer.status, answer.body)
        if answer.status in (401, 403):
            return AuthFailed(method, path, answer.status, errors)
        if answer.status == 404:
            return NotFound(method, path, answer.status, errors)
        return ApiError(method, path, answer.status, errors)

    async def _authorized(self, method: str, url: URL, body: object | None) -> _Answer:
        """Send once; after a 401 sign a fresh token and send once more."""
        answer = await self._send(method, url, body)
        if answer.status == 401:
            self._signer.invalidate()
            answer = await self._send(method, url, body)
            if answer.status == 401:
                self._emitter.emit("api.auth_failed", http_status=401, attempt=2, delay_s=0)
        return answer

    async def get(self, path_or_url: str, params: Mapping[str, str] | None = None) -> JSON:
        """GET with retries for transient trouble; raises ApiUnavailable after the last try."""
        url = self._url(path_or_url, params)
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            wait: float | None = None
            try:
                answer = await self._authorized("GET", url, None)
            except (aiohttp.ClientError, TimeoutError, BadResponse) as exc:
                reason = _transport_reason(exc)
            else:
                if answer.status < 300:
                    if not isinstance(answer.body, dict):
                        raise BadResponse(f"App Store Connect sent an empty body to GET {url.path}")
                    return answer.body
                if answer.status not in TRANSIENT_STATUSES:
                    raise self._error("GET", url.path, answer)
                status = answer.status
                reason = f"HTTP {status}"
                wait = retry_after(answer.headers, self._clock.time())
                if status == 429:
                    self._emitter.emit(
                        "api.throttled",
                        remaining=self.budget.rate_limit.remaining,
                        limit=self.budget.rate_limit.limit,
                        delay_s=round(wait if wait is not None else 0.0, 3),
                    )
            if attempt >= self._retry.attempts:
                self._emitter.emit(
                    "api.unavailable", http_status=status, attempt=attempt, delay_s=0, path=url.path
                )
                raise ApiUnavailable(
                    f"App Store Connect is unavailable: GET {url.path} failed {attempt} times"
                    f" (last: {reason})"
                )
            delay = wait if wait is not None else self._retry.backoff(attempt, self._rng)
            self._emitter.emit(
                "api.retrying",
                http_status=status,
                attempt=attempt,
                delay_s=round(delay, 3),
                path=url.path,
                reason=reason,
            )
            await self._clock.sleep(delay)

    async def paginate(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[JSON]:
        """Every resource of a list, following `links.next` exactly as given."""
        page = await self.get(path, params)
        while True:
            data = page.get("data")
            if not isinstance(data, list):
                raise BadResponse(f"App Store Connect sent a list without data for {path}")
            for item in data:
                if isinstance(item, dict):
                    yield item
            links = page.get("links")
            nxt = links.get("next") if isinstance(links, dict) else None
            if not isinstance(nxt, str) or not nxt:
                return
            page = await self.get(nxt)

    async def post(self, path: str, body: JSON) -> JSON:
        """A request that creates something: retried only when Apple says it did nothing (429).

        A timeout, a reset or a 5xx raises OutcomeUnknown: the caller must find out what
        happened before it may try again.
        """
        url = self._url(path, None)
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await self._authorized("POST", url, body)
            except aiohttp.ClientConnectorError as exc:
                # Nothing reached the server, so trying again cannot create a second run.
                if attempt >= self._retry.attempts:
                    raise ApiUnavailable(
                        f"App Store Connect is unavailable: {_transport_reason(exc)}"
                    ) from None
                delay = self._retry.backoff(attempt, self._rng)
                self._emitter.emit(
                    "api.retrying",
                    http_status=None,
                    attempt=attempt,
                    delay_s=round(delay, 3),
                    path=url.path,
                    reason=_transport_reason(exc),
                )
                await self._clock.sleep(delay)
                continue
            except (aiohttp.ClientError, TimeoutError, BadResponse) as exc:
                raise OutcomeUnknown(_transport_reason(exc)) from None
            if answer.status < 300:
                if not isinstance(answer.body, dict):
                    raise OutcomeUnknown("the answer had no readable body", answer.status)
                return answer.body
            if answer.status >= 500:
                raise OutcomeUnknown(f"HTTP {answer.status}", answer.status)
            if answer.status == 429 and attempt < self._retry.attempts:
                given = retry_after(answer.headers, self._clock.time())
                delay = given if given is not None else self._retry.backoff(attempt, self._rng)
                self._emitter.emit(
                    "api.throttled",
                    remaining=self.budget.rate_limit.remaining,
                    limit=self.budget.rate_limit.limit,
                    delay_s=round(delay, 3),
                )
                await self._clock.sleep(delay)
                continue
            raise self._error("POST", path, answer)


def _transport_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timed out"
    # ClientConnectorError is a ClientOSError: test it first.
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "connection reset"
    if isinstance(exc, BadResponse):
        return str(exc)
    return type(exc).__name__
