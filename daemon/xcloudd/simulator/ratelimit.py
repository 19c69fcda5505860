"""Per-key request budget over a rolling hour, as Apple reports it in `X-Rate-Limit`."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from xcloudd.clock import Clock

WINDOW_S = 3600.0


@dataclass(frozen=True)
class RateDecision:
    limit: int
    remaining: int
    allowed: bool
    retry_after_s: int | None = None  # when refused: seconds until the oldest request ages out

    def header(self) -> str:
        # Apple's exact shape, trailing semicolon included.
        return f"user-hour-lim:{self.limit};user-hour-rem:{self.remaining};"


class RateLimiter:
    """Counts accepted requests per key id; a refused request does not use up budget."""

    def __init__(self, clock: Clock, limit: int = 3600) -> None:
        self._clock = clock
        self.limit = limit
        self._hits: dict[str, deque[float]] = {}

    def _window(self, key_id: str) -> deque[float]:
        hits = self._hits.setdefault(key_id, deque())
        horizon = self._clock.monotonic() - WINDOW_S
        while hits and hits[0] <= horizon:
            hits.popleft()
        return hits

    def check(self, key_id: str) -> RateDecision:
        hits = self._window(key_id)
        if len(hits) >= self.limit:
            wait = hits[0] + WINDOW_S - self._clock.monotonic()
            return RateDecision(self.limit, 0, False, max(1, math.ceil(wait)))
        hits.append(self._clock.monotonic())
        return RateDecision(self.limit, self.limit - len(hits), True)

    def remaining(self, key_id: str) -> int:
        return max(0, self.limit - len(self._window(key_id)))
