"""When to look at a run next: sparsely while no transition is likely, densely around the
expected one.

Each workflow's recent history (how long its runs queued, how long they ran: the API's own
dates, kept in the state store) gives a window in which a run's next transition is likely: a
prediction interval for one more duration, taken on the log scale (build times are skewed and
never negative), so it is wide while history is short or erratic and narrows as it grows. Before
the window a run is left alone (up to `max_interval`), inside it it is looked at every
`min_interval`, and once it is overdue the gaps grow again from there. Without history the gaps
grow from `interval` toward `max_interval` as the run ages. While webhooks arrive they say
when to look, and polling stretches to `max_interval`: it stays only as the safety net for a
webhook that is lost.

Every gap gets jitter (so daemons sharing a key do not poll in step) and is never below the
floor the request budget can pay for.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import NormalDist, fmean, stdev
from typing import Literal

from xcloudd.config import PollingConfig
from xcloudd.store import Span

Wait = Literal["start", "end"]  # what a run is waiting for: to start running, or to finish
# History kept per workflow, and how much of it is needed before it is trusted.
KEEP = 50
MIN_SAMPLES = 3
# The window is meant to hold this share of transitions (the rest are seen later, as overdue or
# early): enough that the 95th percentile of detection latency stays inside it.
COVERAGE = 0.97
# Build times of one workflow never vary less than this on the log scale (about 5%), even when
# history happens to hold the same duration every time.
MIN_SPREAD = 0.05
# Without a window, the gap is this share of how long the run has waited so far; once a run is
# overdue, this share of how long past the window it is.
AGEING = 0.1
OVERDUE = 0.25
# A webhook within this long means webhooks arrive (and polling may stretch).
WEBHOOKS_LIVE_S = 3600.0
JITTER = 0.1


@dataclass(frozen=True)
class Window:
    """Seconds after the wait began within which it most likely ends."""

    opens: float
    closes: float


_Z05 = NormalDist().inv_cdf(0.05)


@dataclass(frozen=True)
class _Fit:
    """Durations on the log scale: their mean, their spread (at least MIN_SPREAD), how many."""

    centre: float
    spread: float
    n: int


def _t_quantile(p: float, df: int) -> float:
    """Student's t quantile (Cornish-Fisher expansion around the normal's; close enough to
    size a window, and wider than the normal's while history is short)."""
    z = NormalDist().inv_cdf(p)
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


class History:
    """The recent queue and run durations of each workflow."""

    def __init__(self) -> None:
        self._spans: dict[tuple[str, Wait], deque[float]] = {}
        # Every look asks for the windows of all its runs; history changes once per build.
        self._fits: dict[tuple[str, Wait], _Fit | None] = {}

    def learn(self, workflow_id: str, span: Span) -> None:
        pairs: tuple[tuple[Wait, float | None], ...] = (
            ("start", span.queued_s),
            ("end", span.ran_s),
        )
        for wait, seconds in pairs:
            if seconds is not None and seconds >= 0:
                key = (workflow_id, wait)
                self._spans.setdefault(key, deque(maxlen=KEEP)).append(seconds)
                self._fits.pop(key, None)

    def load(self, spans: Mapping[str, Iterable[Span]]) -> None:
        for workflow_id, items in spans.items():
            for span in items:
                self.learn(workflow_id, span)

    def _fit(self, key: tuple[str, Wait]) -> _Fit | None:
        """The lognormal fit of one kind of wait, once per change of its history."""
        if key not in self._fits:
            values = self._spans.get(key)
            fit = None
            if values is not None and len(values) >= MIN_SAMPLES:
                logs = [math.log(max(v, 1.0)) for v in values]
                fit = _Fit(fmean(logs), max(stdev(logs), MIN_SPREAD), len(logs))
            self._fits[key] = fit
        return self._fits[key]

    def window(self, workflow_id: str, wait: Wait) -> Window | None:
        fit = self._fit((workflow_id, wait))
        if fit is None:
            return None
        # A prediction interval for one more wait: the fit's own uncertainty included.
        spread = fit.spread * math.sqrt(1 + 1 / fit.n)
        reach = _t_quantile(1 - (1 - COVERAGE) / 2, fit.n - 1) * spread
        return Window(math.exp(fit.centre - reach), math.exp(fit.centre + reach))

    def quick(self, workflow_id: str, wait: Wait) -> float | None:
        """How long the quickest twentieth of such waits take."""
        fit = self._fit((workflow_id, wait))
        return None if fit is None else math.exp(fit.centre + _Z05 * fit.spread)


class Cadence:
    def __init__(
        self, polling: PollingConfig, history: History, rng: random.Random | None = None
    ) -> None:
        self.polling = polling
        self.history = history
        self._rng = rng or random.Random()
        self._last_webhook = float("-inf")
        # The shortest gap the request budget can pay for (set by the follower).
        self.floor = 0.0

    def webhook(self, now: float) -> None:
        """A webhook arrived (with the right token): the pipe from Apple works."""
        self._last_webhook = now

    def webhooks_live(self, now: float) -> bool:
        return now - self._last_webhook < WEBHOOKS_LIVE_S

    def gap(self, workflow_id: str, wait: Wait, waited: float, now: float) -> float:
        """Seconds until a run that has waited `waited` seconds for `wait` is looked at again;
        `now` is the monotonic time (for telling whether webhooks arrive)."""
        p = self.polling
        interval = max(p.min_interval, min(p.interval, p.max_interval))
        if self.webhooks_live(now):
            gap = p.max_interval
        else:
            window = self.history.window(workflow_id, wait)
            if window is None:
                gap = max(interval, AGEING * waited)
            elif waited < window.opens:
                gap = window.opens - waited
            elif waited <= window.closes:
                gap = p.min_interval
            else:
                gap = OVERDUE * (waited - window.closes)
        gap = min(p.max_interval, gap) * self._rng.uniform(1.0 - JITTER, 1.0)
        return max(p.min_interval, self.floor, gap)

    def discovery_gap(self, now: float, workflows: Iterable[str] = ()) -> float:
        """How often a product is looked at for new runs of its watched `workflows`: every
        `interval`, or sooner where history says their runs often wait less than that for a
        machine (a run found only once it has started is seen starting late)."""
        p = self.polling
        base = p.max_interval if self.webhooks_live(now) else p.interval
        if not self.webhooks_live(now):
            for workflow_id in workflows:
                quick = self.history.quick(workflow_id, "start")
                if quick is not None:
                    base = min(base, quick)
        base = max(p.min_interval, min(base, p.max_interval))
        return max(self.floor, base * self._rng.uniform(1.0 - JITTER, 1.0))
