"""The App Store Connect client: the only code that speaks HTTP to Apple.

It signs every request, reads `X-Rate-Limit` from every response, keeps total traffic within
the configured share of the key's hourly limit, retries what is safe to retry, and turns
Apple's `errors[]` into typed exceptions that keep `code`, `detail` and `source.pointer`.

Whatever the server or the network does, `get`, `paginate` and `post` raise only ApiError (and
its subclasses), ApiUnavailable, OutcomeUnknown or BadResponse (and `post`, given a deadline,
TooLate). During an outage a circuit breaker shared by all callers lets one probe out at a time
instead of every caller's retries. One request budget serves all callers: starts go first,
polls share fairly, and a 429 holds everyone back (see Budget).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from xcloudd import __version__
from xcloudd.auth import TokenSigner
from xcloudd.clock import Clock, sleep_or
from xcloudd.errors import ExitCode, XcloudError
from xcloudd.events import Emitter

JSON = dict[str, Any]
# Requests waiting in lane "start" (what starting a build needs) go before any in lane "poll".
Lane = Literal["start", "poll"]
USER_AGENT = f"xcloudd/{__version__}"
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 300.0
# Apple's largest CI answers (a 200-item page) are a few hundred KiB; anything this big is not
# App Store Connect talking, and reading it whole once grew the daemon to 300 MB.
MAX_BODY_BYTES = 8 * 1024 * 1024
_READ_CHUNK = 64 * 1024
# Failures in a row, across all requests, that mean App Store Connect (or the way to it) is down.
BREAKER_THRESHOLD = 3
BREAKER_BASE_S = 2.0
BREAKER_MAX_S = 60.0
_TIMER_SLACK_S = 0.001
# While Apple reports the key itself near its limit (other tools included): one request a minute.
NEAR_LIMIT_GAP_S = 60.0
# Apple's error texts are short; a broken server's are not, and they end up in events and on
# the user's terminal.
_MAX_ERRORS = 20
_MAX_ERROR_TEXT = 1000


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


def _text(value: object) -> str:
    return str(value)[:_MAX_ERROR_TEXT] if value else ""


def parse_errors(status: int, body: object) -> tuple[ErrorDetail, ...]:
    """Read `errors[]` defensively: real responses omit `detail` and nest more errors."""
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return ()
    out: list[ErrorDetail] = []
    for raw in body["errors"][:_MAX_ERRORS]:
        if not isinstance(raw, dict):
            continue
        source = raw.get("source")
        if not isinstance(source, dict):
            source = {}
        out.append(
            ErrorDetail(
                status=_text(raw.get("status")) or str(status),
                code=_text(raw.get("code")),
                title=_text(raw.get("title")),
                detail=_text(raw.get("detail")),
                pointer=_text(source.get("pointer")) or None,
                parameter=_text(source.get("parameter")) or None,
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


class TooLate(XcloudError):
    """A request's turn in the budget would come after its deadline: nothing was sent."""


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
    slow to one a minute until `user-hour-rem` recovers. A 429 holds every request back for its
    delay and spends what was saved up, so that traffic resumes at the steady rate, not in a
    burst.

    Requests that have to wait are granted in this order: every waiting start first (a start
    is a few requests that a schedule or a person waits for; a poll can be a little late), then
    polls round-robin across their share keys (one per product, so that a product with many
    runs does not starve one with few), in arrival order within a share. Only the request next
    in that order sleeps on the clock; the others wait to be woken.

    It also keeps the throttling streak, so that `api.throttled` goes out once when requests
    start being held back (here, or by a 429) and again only after one went through unhindered.
    """

    def __init__(self, share: float, clock: Clock, emitter: Emitter, limit: int = 3600) -> None:
        self._share = share
        self._clock = clock
        self._emitter = emitter
        self._limit = limit
        self._remaining = limit
        self._tokens = self._capacity
        self._stamp = clock.monotonic()
        self._held_until = -math.inf
        self._last_grant = -math.inf
        self._starts: deque[asyncio.Event] = deque()
        self._polls: dict[str | None, deque[asyncio.Event]] = {}
        self._throttling = False

    @property
    def _rate(self) -> float:
        return self._share * self._limit / 3600.0

    @property
    def _capacity(self) -> float:
        return max(1.0, self._rate * 60.0)

    @property
    def _near_limit(self) -> bool:
        return self._remaining <= (1.0 - self._share) * self._limit

    @property
    def rate_limit(self) -> RateLimit:
        return RateLimit(self._limit, self._remaining)

    def observe(self, rl: RateLimit) -> None:
        self._refill(self._clock.monotonic())
        before = (self._limit, self._near_limit)
        self._limit = max(1, rl.limit)
        self._remaining = rl.remaining
        self._tokens = min(self._tokens, self._capacity)
        if (self._limit, self._near_limit) != before:
            self._wake_next()  # it sleeps for a pace that no longer holds

    def hold(self, delay: float) -> None:
        """Apple answered 429: nothing goes out for `delay` seconds, in any lane (the refused
        request's retry waits its turn here too)."""
        now = self._clock.monotonic()
        self._refill(now)
        self._held_until = max(self._held_until, now + delay)
        # Tokens keep coming during the hold; this leaves at most one when it ends.
        self._tokens = min(self._tokens, 1.0 - (self._held_until - now) * self._rate)
        self.throttled(delay)
        self._wake_next()

    def throttled(self, delay: float) -> None:
        """A request is held back for `delay` seconds, by this budget or by a 429."""
        if self._throttling:
            return
        self._throttling = True
        self._emitter.emit(
            "api.throttled",
            remaining=self._remaining,
            limit=self._limit,
            delay_s=round(delay, 3),
        )

    def unthrottled(self) -> None:
        """A request went out and was answered without being held back: the streak is over."""
        self._throttling = False

    def _refill(self, now: float) -> None:
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def _wait(self, now: float) -> float:
        """How long until the next request may go out."""
        self._refill(now)
        at = self._held_until
        if self._near_limit:
            at = max(at, self._last_grant + NEAR_LIMIT_GAP_S)
        if self._tokens < 1.0:
            at = max(at, now + (1.0 - self._tokens) / self._rate)
        return max(0.0, at - now)

    def _next(self) -> asyncio.Event | None:
        if self._starts:
            return self._starts[0]
        if self._polls:
            return next(iter(self._polls.values()))[0]
        return None

    def _wake_next(self) -> None:
        if (waiter := self._next()) is not None:
            waiter.set()

    async def acquire(
        self, lane: Lane = "poll", share: str | None = None, *, not_after: float | None = None
    ) -> float:
        """Wait for this request's turn; returns how long it was held back.

        `share` names whose poll this is (ignored for starts). With `not_after` (wall-clock
        seconds on the injected clock), a turn that would come later raises TooLate instead,
        once this request is next in line.
        """
        start = self._clock.monotonic()
        deadline = None if not_after is None else start + (not_after - self._clock.time())
        me = asyncio.Event()
        line = self._starts if lane == "start" else self._polls.setdefault(share, deque())
        line.append(me)
        granted = False
        try:
            while True:
                me.clear()
                now = self._clock.monotonic()
                if self._next() is me:
                    wait = self._wait(now)
                    if deadline is not None and now + wait > deadline + _TIMER_SLACK_S:
                        raise TooLate(
                            f"the request budget has no turn for it for {wait:.0f}s,"
                            " past its deadline"
                        )
                    if wait <= _TIMER_SLACK_S:
                        break
                    self.throttled(wait)
                    await sleep_or(self._clock, wait, me)
                else:
                    # Its turn, and so its deadline, can only be judged once it is next.
                    await me.wait()
            self._tokens -= 1.0
            self._last_grant = now
            granted = True
            return now - start
        finally:
            line.remove(me)
            if lane == "poll":
                if not line:
                    del self._polls[share]
                elif granted:
                    self._polls[share] = self._polls.pop(share)  # to the back of the round
            self._wake_next()


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: spreads many clients' retries instead of synchronising them."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from `Retry-After` (delta-seconds or an HTTP date), None if unusable."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:
                # RFC 9110 dates are GMT; "-0000" parses as naive, which would mean local time.
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if math.isnan(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


class CircuitBreaker:
    """One breaker for all callers of a client: during an outage, one request at a time.

    After `threshold` failures in a row (transport trouble, an unreadable answer, 408 or 5xx)
    across all requests, it opens: requests wait in line instead of going out, and at the probe
    time the first in line goes out alone. Any answer from the server closes it and everyone
    waiting goes at once; a failed probe reopens it for up to twice as long (full jitter, capped).
    Waiting costs no tries, and the one timer runs on the injected clock.
    """

    def __init__(
        self,
        clock: Clock,
        emitter: Emitter,
        rng: random.Random,
        *,
        threshold: int = BREAKER_THRESHOLD,
        base_delay: float = BREAKER_BASE_S,
        max_delay: float = BREAKER_MAX_S,
    ) -> None:
        self._clock = clock
        self._emitter = emitter
        self._rng = rng
        self._threshold = threshold
        self._base = base_delay
        self._max = max_delay
        self._streak = 0
        self._opened = 0  # openings in a row; 0 while closed
        self._probe_at = 0.0
        self._probe: int | None = None  # the probe in flight, if any
        self._probes = 0
        self._line: deque[asyncio.Event] = deque()

    @property
    def is_open(self) -> bool:
        return self._opened > 0

    async def admit(self) -> int | None:
        """Wait until a request may go out; returns a probe ticket when it goes out as the probe."""
        if not self.is_open:
            return None
        me = asyncio.Event()
        self._line.append(me)
        try:
            while self.is_open:
                me.clear()
                if self._line[0] is me and self._probe is None:
                    delay = self._probe_at - self._clock.monotonic()
                    # A timer may fire a hair early (clock resolution, float rounding): that is
                    # on time, not a reason to sleep again for a microsecond.
                    if delay <= _TIMER_SLACK_S:
                        self._probes += 1
                        self._probe = self._probes
                        return self._probe
                    # Only the first in line sleeps; it still wakes at once when the breaker
                    # closes.
                    await sleep_or(self._clock, delay, me)
                else:
                    await me.wait()
            return None
        finally:
            first = self._line[0] is me
            self._line.remove(me)
            if first and self._line and self.is_open:
                self._line[0].set()

    def succeeded(self) -> None:
        self._streak = 0
        if self.is_open:
            self._opened = 0
            self._probe = None
            for waiter in self._line:
                waiter.set()

    def failed(self, status: int | None, reason: str, path: str, probe: int | None) -> None:
        self._streak += 1
        if self.is_open:
            if probe is None or probe != self._probe:
                return  # sent before the breaker opened: the outage is already known
            self._probe = None
            self._opened += 1
            delay = self._schedule_probe()
            self._emitter.emit(
                "api.retrying",
                http_status=status,
                attempt=self._streak,
                delay_s=round(delay, 3),
                path=path,
                reason=reason,
            )
            self._wake_first()
        elif self._streak >= self._threshold:
            self._opened = 1
            delay = self._schedule_probe()
            self._emitter.emit(
                "api.unavailable",
                http_status=status,
                attempt=self._streak,
                delay_s=round(delay, 3),
                path=path,
                reason=reason,
            )

    def abandon(self, probe: int | None) -> None:
        """A request ended without an answer either way (cancelled): if it was the probe, the
        next in line probes instead."""
        if probe is not None and probe == self._probe:
            self._probe = None
            self._wake_first()

    def _schedule_probe(self) -> float:
        # The exponent is capped so a day-long outage cannot overflow the float.
        ceiling = min(self._max, self._base * 2.0 ** min(self._opened - 1, 32))
        delay = self._rng.uniform(0, ceiling)
        self._probe_at = self._clock.monotonic() + delay
        return delay

    def _wake_first(self) -> None:
        if self._line:
            self._line[0].set()


@dataclass(frozen=True)
class _Answer:
    status: int
    body: object
    headers: Mapping[str, str]


@dataclass
class _Call:
    """One get or post: what it sends, its place in the budget, and how many requests it has
    sent so far."""

    method: str
    url: URL
    body: object | None
    lane: Lane = "poll"
    share: str | None = None
    not_after: float | None = None
    before_send: Callable[[], Awaitable[object]] | None = None
    sent: int = 0


class _Trouble(Exception):
    """An exchange without an answer. `delivered` is False only when nothing reached the server
    (no connection), which is what makes retrying a POST safe."""

    def __init__(self, reason: str, *, delivered: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delivered = delivered


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
        self._breaker = CircuitBreaker(clock, emitter, self._rng)
        self._last_success: float | None = None
        self.requests = 0
        # For /metrics and /readyz: requests by (endpoint class, status), the last
        # X-Rate-Limit seen, and whether the last exchange reached App Store Connect.
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.rate_limit_seen: tuple[int, int] | None = None
        self.reachable: bool | None = None
        # Requests on the wire now (tests on virtual time wait for none before moving time).
        self.exchanging = 0

    @property
    def last_success(self) -> float | None:
        """Wall-clock time (the injected clock's) of the last 2xx answer; None before one."""
        return self._last_success

    @property
    def breaker_open(self) -> bool:
        """True while an outage holds requests back (see CircuitBreaker)."""
        return self._breaker.is_open

    def _url(self, path_or_url: str, params: Mapping[str, str] | None) -> URL:
        try:
            if path_or_url.startswith(("http://", "https://")):
                # `links.next` is followed verbatim: its cursor must not be re-encoded.
                url = URL(path_or_url, encoded=True)
                if url.origin() != self._base.origin():
                    raise BadResponse(f"App Store Connect sent a link to another host: {url.host}")
            else:
                url = URL(str(self._base) + path_or_url)
            return url.update_query(params) if params else url
        except ValueError:
            raise BadResponse(
                f"App Store Connect sent a link that is not a usable URL: {path_or_url[:100]!r}"
            ) from None

    async def _exchange(self, call: _Call) -> _Answer:
        """One HTTP request; whatever goes wrong becomes _Trouble or BadResponse."""
        headers = {
            "Authorization": f"Bearer {self._signer.token()}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        data = None
        if call.body is not None:
            headers["Content-Type"] = "application/json"
            data = orjson.dumps(call.body)
        self.requests += 1
        call.sent += 1
        what = f"{call.method} {call.url.path}"
        try:
            async with self._session.request(
                call.method, call.url, headers=headers, data=data, timeout=self._timeout
            ) as resp:
                rl = RateLimit.parse(resp.headers.get("X-Rate-Limit"))
                if rl is not None:
                    self.budget.observe(rl)
                    self.rate_limit_seen = (rl.limit, rl.remaining)
                self.outcomes[endpoint_class(call.method, call.url.path), str(resp.status)] += 1
                self.reachable = resp.status < 500
                raw = await _read_capped(resp, what)
                status, resp_headers = resp.status, resp.headers
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            self._unreachable(call)
            raise _Trouble(_transport_reason(exc), delivered=False) from None
        except (
            aiohttp.ClientError,
            HttpProcessingError,
            TimeoutError,
            OSError,
            EOFError,
            ValueError,  # UnicodeDecodeError and other undecodable headers or bodies
        ) as exc:
            self._unreachable(call)
            raise _Trouble(_transport_reason(exc), delivered=True) from None
        parsed: object = None
        if raw:
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                if status < 300:
                    raise BadResponse(
                        f"App Store Connect sent a body that is not JSON to {what}"
                    ) from None
        if status < 300 and not isinstance(parsed, dict):
            raise BadResponse(f"App Store Connect sent no JSON object to {what}")
        return _Answer(status, parsed, resp_headers)

    def _unreachable(self, call: _Call) -> None:
        self.outcomes[endpoint_class(call.method, call.url.path), "error"] += 1
        self.reachable = False

    async def _send(self, call: _Call) -> _Answer:
        """One request through the circuit breaker and the budget."""
        probe = await self._breaker.admit()
        settled = False
        on_wire = False
        try:
            held = await self.budget.acquire(call.lane, call.share, not_after=call.not_after)
            if call.before_send is not None:
                before_send, call.before_send = call.before_send, None
                await before_send()
            self.exchanging += 1
            on_wire = True
            try:
                answer = await self._exchange(call)
            except (_Trouble, BadResponse) as exc:
                settled = True
                reason = exc.reason if isinstance(exc, _Trouble) else str(exc)
                self._breaker.failed(None, reason, call.url.path, probe)
                raise
            settled = True
            if answer.status >= 500 or answer.status == 408:
                self._breaker.failed(answer.status, f"HTTP {answer.status}", call.url.path, probe)
            else:
                self._breaker.succeeded()
            if answer.status < 300:
                self._last_success = self._clock.time()
            if answer.status != 429 and not held:
                self.budget.unthrottled()
            return answer
        finally:
            if on_wire:
                self.exchanging -= 1
            if not settled:
                self._breaker.abandon(probe)

    async def _authorized(self, call: _Call) -> _Answer:
        """Send once; after a 401 sign a fresh token and send once more."""
        answer = await self._send(call)
        if answer.status == 401:
            self._signer.invalidate()
            answer = await self._send(call)
        return answer

    def _refusal(self, call: _Call, answer: _Answer) -> ApiError:
        path = call.url.path
        errors = parse_errors(answer.status, answer.body)
        if answer.status in (401, 403):
            # A poll, a list or a start: the key was refused, and the user hears it every time.
            self._emitter.emit(
                "api.auth_failed",
                http_status=answer.status,
                attempt=call.sent,
                delay_s=0.0,
                path=path,
            )
            return AuthFailed(call.method, path, answer.status, errors)
        if answer.status == 404:
            return NotFound(call.method, path, answer.status, errors)
        return ApiError(call.method, path, answer.status, errors)

    def _gave_up(self, status: int | None, attempt: int, path: str, reason: str) -> None:
        # During an outage the breaker has said so once; a caller giving up adds nothing.
        if not self._breaker.is_open:
            self._emitter.emit(
                "api.unavailable",
                http_status=status,
                attempt=attempt,
                delay_s=0.0,
                path=path,
                reason=reason,
            )

    async def get(
        self,
        path_or_url: str,
        params: Mapping[str, str] | None = None,
        *,
        lane: Lane = "poll",
        share: str | None = None,
    ) -> JSON:
        """GET with retries for transient trouble.

        `lane` and `share` place it in the budget's order (see Budget): "start" for what a
        start needs, else a poll with the key whose polls share fairly (e.g. a product id).
        When the tries run out it raises ApiUnavailable (transport trouble, 5xx, 429), or
        BadResponse when the last answer could not be read. Waiting for the circuit breaker
        uses up no tries.
        """
        call = _Call("GET", self._url(path_or_url, params), None, lane, share)
        path = call.url.path
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            given: float | None = None
            unreadable: BadResponse | None = None
            try:
                answer = await self._authorized(call)
            except _Trouble as exc:
                reason = exc.reason
            except BadResponse as exc:
                unreadable, reason = exc, str(exc)
            else:
                if answer.status < 300:
                    return _object(answer, call)
                if answer.status not in TRANSIENT_STATUSES:
                    raise self._refusal(call, answer)
                status = answer.status
                reason = f"HTTP {status}"
                given = retry_after(answer.headers, self._clock.time())
            last = attempt >= self._retry.attempts
            delay: float | None
            if given is not None:
                delay = given
            elif self._breaker.is_open and status != 429:
                delay = None  # the open breaker times the next try
            else:
                delay = 0.0 if last else self._retry.backoff(attempt, self._rng)
            if status == 429:
                self.budget.hold(delay or 0.0)
            if last:
                self._gave_up(status, attempt, path, reason)
                if unreadable is not None:
                    raise unreadable
                raise ApiUnavailable(
                    f"App Store Connect is unavailable: GET {path} failed {attempt} times"
                    f" (last: {reason})"
                )
            if delay is None:
                continue  # and it has reported the outage: nothing to say per caller
            self._emitter.emit(
                "api.retrying",
                http_status=status,
                attempt=attempt,
                delay_s=round(delay, 3),
                path=path,
                reason=reason,
            )
            if status != 429:  # a 429 is waited out in the budget, with every other request
                await self._clock.sleep(delay)

    async def paginate(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        lane: Lane = "poll",
        share: str | None = None,
    ) -> AsyncIterator[JSON]:
        """Every resource of a list, following `links.next` exactly as given."""
        page = await self.get(path, params, lane=lane, share=share)
        followed: set[str] = set()
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
            if nxt in followed:
                # A cursor that leads back to an earlier page would page forever.
                raise BadResponse(f"App Store Connect sent next links that loop for {path}")
            followed.add(nxt)
            page = await self.get(nxt, lane=lane, share=share)

    async def post(
        self,
        path: str,
        body: JSON,
        *,
        not_after: float | None = None,
        before_send: Callable[[], Awaitable[object]] | None = None,
    ) -> JSON:
        """A request that creates something: retried only when Apple says it did nothing (429)
        or when it never reached Apple. It goes in the budget's "start" lane.

        A timeout, a reset, an unreadable answer or a 5xx raises OutcomeUnknown: the caller must
        find out what happened before it may try again. When the budget cannot give a try its
        turn by `not_after` (wall-clock seconds on the injected clock), TooLate: that try was
        not sent. `before_send` is awaited once, when the first try has its turn and just
        before it goes out, so that a caller records the request durably only when it really
        leaves; what it raises ends the post with nothing sent.
        """
        call = _Call(
            "POST",
            self._url(path, None),
            body,
            "start",
            not_after=not_after,
            before_send=before_send,
        )
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await self._authorized(call)
            except _Trouble as exc:
                if exc.delivered:
                    raise OutcomeUnknown(exc.reason) from None
                # Nothing reached the server, so trying again cannot create a second run.
                if attempt >= self._retry.attempts:
                    self._gave_up(None, attempt, call.url.path, exc.reason)
                    raise ApiUnavailable(
                        f"App Store Connect is unavailable: {exc.reason}"
                    ) from None
                if self._breaker.is_open:
                    continue
                delay = self._retry.backoff(attempt, self._rng)
                self._emitter.emit(
                    "api.retrying",
                    http_status=None,
                    attempt=attempt,
                    delay_s=round(delay, 3),
                    path=call.url.path,
                    reason=exc.reason,
                )
                await self._clock.sleep(delay)
                continue
            except BadResponse as exc:
                # The unreadable answer may have been the new run's.
                raise OutcomeUnknown(str(exc)) from None
            if answer.status < 300:
                try:
                    return _object(answer, call)
                except BadResponse as exc:
                    raise OutcomeUnknown(str(exc), answer.status) from None
            if answer.status >= 500:
                raise OutcomeUnknown(f"HTTP {answer.status}", answer.status)
            if answer.status == 429:
                given = retry_after(answer.headers, self._clock.time())
                if attempt < self._retry.attempts:
                    delay = given if given is not None else self._retry.backoff(attempt, self._rng)
                    self.budget.hold(delay)
                    continue
                self.budget.hold(given or 0.0)
            raise self._refusal(call, answer)


def endpoint_class(method: str, path: str) -> str:
    """ "GET /v1/ciBuildRuns/{id}": the path with its ids taken out, a bounded metric label."""
    parts = path.strip("/").split("/")
    for i in range(2, len(parts), 2):
        parts[i] = "{id}"
    return f"{method} /{'/'.join(parts)}"


async def _read_capped(resp: aiohttp.ClientResponse, what: str) -> bytearray:
    """The body, or BadResponse as soon as it is larger than MAX_BODY_BYTES."""
    declared = resp.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        resp.close()
        raise _too_big(what)
    body = bytearray()
    async for chunk in resp.content.iter_chunked(_READ_CHUNK):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            # Closing drops the connection, so the rest of the body is never read.
            resp.close()
            raise _too_big(what)
    return body


def _too_big(what: str) -> BadResponse:
    return BadResponse(
        f"App Store Connect sent a body larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB"
        f" to {what}; it was not read"
    )


def _object(answer: _Answer, call: _Call) -> JSON:
    if not isinstance(answer.body, dict):
        raise BadResponse(f"App Store Connect sent no JSON object to {call.method} {call.url.path}")
    return answer.body


def _transport_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    # ClientConnectorError is a ClientOSError: test it first.
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError | OSError | EOFError):
        return "connection reset"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut off or garbled"
    if isinstance(exc, aiohttp.ClientResponseError | HttpProcessingError):
        return "the answer was not valid HTTP"
    if isinstance(exc, ValueError):
        return "the answer could not be decoded"
    return type(exc).__name__
