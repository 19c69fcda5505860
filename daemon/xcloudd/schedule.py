"""Planned instants of a job: a cron in a time zone, a fixed interval, or one date.

This module is pure (no I/O, no clock, no asyncio). The daemon keys every occurrence in the state
store by (job, planned instant), so the instants computed here must be identical on every restart
and every host: nothing depends on when the process started, and jitter comes from a stable hash.
The daemon wakes up through the injected Clock (xcloudd.clock), so tests run schedules in virtual
time; nothing here decides when to wake, only which instants exist.

Why cron matching is hand-written instead of delegated to APScheduler's CronTrigger: its semantics
differ from crontab's exactly where this project needs them.
- `from_crontab` reads day-of-week 0 as Monday (its weekdays are indexed from Monday) and rejects 7.
- Its fields are always ANDed; Vixie cron's "day-of-month OR day-of-week when both are restricted"
  would need two triggers and a merge of their streams.
- Its DST handling is the same for every job (a repeated wall time fires twice, a skipped one
  shifts); Vixie cron treats fixed-time and wildcard jobs differently (below).
- Its errors do not name the crontab field that is wrong.
What remains is parsing five small integer sets and walking a calendar, which is short and tested.

Crontab dialect: Vixie/cronie. `*`, lists, ranges, steps (`*/15`, `1-5/2`, and cronie's `5/15` for
`5-59/15`), names jan..dec and sun..sat in any case, day-of-week 0 and 7 both Sunday, and the
macros @yearly @annually @monthly @weekly @daily @midnight @hourly (not @reboot). A day-of-week
range may end on Sunday ("fri-sun", "5-0") because that reads naturally. As in Vixie cron, a day
field counts as unrestricted when it starts with `*` (so "*/2" days AND a weekday, not OR). A
line that can never fire ("0 0 31 2 *") is rejected, so next_after never has to search in vain.

DST rules, as in Vixie/Debian cron, with cron fields matching wall-clock time in the job's zone.
Which rule applies depends only on the line (after expanding a macro):
- Wildcard jobs, whose minute or hour field starts with `*` (`*/15 * * * *`, `30 * * * *`,
  `0 */2 * * *`, `@hourly`), follow real time: they fire at every instant whose wall time
  matches. A repeated wall time fires in both passes (Berlin 2026-10-25: `*/15 * * * *` fires
  at 02:00..02:45 CEST and again at 02:00..02:45 CET, every 15 real minutes), and a skipped one
  does not fire at all (2027-03-28: `30 * * * *` fires at 01:30 CET, then 03:30 CEST). So
  `*/10 2 * * *` fires twelve times on the autumn night and never on the spring night.
- Fixed-time jobs (all others, e.g. `30 2 * * *`) fire once per matching wall time. One that a
  spring change skips fires at the first valid instant after it: the transition itself
  (Europe/Berlin 2027-03-28 02:30 -> 03:00 CEST = 01:00Z). If the cron also matches the wall
  time right after the gap, both are the same instant and fire once. One that an autumn change
  repeats fires once, at its first pass.
Either way planned instants are strictly increasing, with no duplicates, and a pure function
of the schedule: the same on every host and restart.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import MAXYEAR, UTC, date, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "AtSchedule",
    "CronSchedule",
    "EverySchedule",
    "Missed",
    "Schedule",
    "build_schedule",
    "jitter_offset",
    "missed_between",
    "upcoming",
    "validate_cron",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_ONE_MINUTE = timedelta(minutes=1)
_ONE_DAY = timedelta(days=1)
# Every calendar combination a crontab can ask for (even "the 1st of February when it is a
# Monday") recurs within one 400-year Gregorian cycle: searching further can find nothing new.
_SEARCH_YEARS = 400


class Schedule(Protocol):
    def next_after(self, after: datetime) -> datetime | None:
        """The first planned instant strictly after `after` (aware), as an aware UTC datetime;
        None when there is none."""
        ...

    def describe(self) -> str:
        """One line for humans, e.g. "cron '30 2 * * *' Europe/Berlin, jitter 7m12s"."""
        ...


@dataclass(frozen=True)
class Missed:
    """Occurrences in a window, typically the time the daemon was down.

    `capped` is True when counting stopped at the caller's limit (cron schedules only): `count`
    is then the limit, a lower bound, while `oldest` and `newest` are still exact.
    """

    count: int
    oldest: datetime | None
    newest: datetime | None
    capped: bool = False


# --------------------------------------------------------------------------------------------
# Cron parsing


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: Mapping[str, int]


_MONTH_NAMES = {
    n: i + 1
    for i, n in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
_WEEKDAY_NAMES = {n: i for i, n in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_MINUTE = _Field("minute", 0, 59, {})
_HOUR = _Field("hour", 0, 23, {})
_DAY = _Field("day-of-month", 1, 31, {})
_MONTH = _Field("month", 1, 12, _MONTH_NAMES)
_WEEKDAY = _Field("day-of-week", 0, 7, _WEEKDAY_NAMES)  # 0 and 7 are both Sunday
_FIELDS = (_MINUTE, _HOUR, _DAY, _MONTH, _WEEKDAY)

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# February counts with 29 days: a crontab for Feb 29 fires in leap years, so it is not "never".
_LONGEST_MONTH = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30}


@dataclass(frozen=True)
class _CronSpec:
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: tuple[int, ...]
    weekdays: frozenset[int]  # 0 = Sunday, as in crontab
    day_or: bool  # both day fields restricted: Vixie cron matches a day when either matches
    real_time: bool  # a wildcard job (minute or hour starts with "*"): see the DST rules

    def day_matches(self, day: date) -> bool:
        dom = day.day in self.days
        dow = day.isoweekday() % 7 in self.weekdays
        return (dom or dow) if self.day_or else (dom and dow)

    def next_day(self, day: date, limit: date) -> date | None:
        """The first matching date on or after `day`, None past `limit`."""
        while day <= limit:
            if day.month not in self.months:
                i = bisect_left(self.months, day.month)
                if i < len(self.months):
                    day = date(day.year, self.months[i], 1)
                elif day.year < MAXYEAR:
                    day = date(day.year + 1, self.months[0], 1)
                else:
                    return None
                continue
            if self.day_matches(day):
                return day
            if day == date.max:
                return None
            day += _ONE_DAY
        return None


def _value(spec: _Field, token: str) -> int:
    if not token:
        raise ValueError("missing value")
    named = spec.names.get(token.lower())
    if named is not None:
        return named
    if not (token.isascii() and token.isdigit()):
        if spec.names:
            raise ValueError(f"unknown name '{token}'")
        raise ValueError(f"'{token}' is not a number")
    value = int(token)
    if not spec.low <= value <= spec.high:
        raise ValueError(f"{token} out of range {spec.low}-{spec.high}")
    return value


def _parse_item(spec: _Field, item: str) -> range:
    if not item:
        raise ValueError("empty list element")
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not (step_text.isascii() and step_text.isdigit()):
            raise ValueError(f"step '{step_text}' is not a number")
        step = int(step_text)
        if step < 1:
            raise ValueError("step must be at least 1")
    if base == "*":
        return range(spec.low, spec.high + 1, step)
    first_text, dash, last_text = base.partition("-")
    first = _value(spec, first_text)
    if dash:
        last = _value(spec, last_text)
    elif slash:
        last = spec.high  # "5/15" means 5-59/15, as in cronie
    else:
        last = first
    if spec is _WEEKDAY and dash and last == 0 and first > 0:
        last = 7  # "fri-sun" reads naturally; Sunday as 7 keeps the range ascending
    if first > last:
        raise ValueError(f"range '{base}' runs backwards")
    return range(first, last + 1, step)


def _parse_field(spec: _Field, text: str) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        try:
            values.update(_parse_item(spec, item))
        except ValueError as e:
            reason = str(e)
            # A lone bad value is already quoted in front of the reason; don't say it twice.
            if reason.startswith(f"{text} "):
                reason = reason[len(text) + 1 :]
            raise ValueError(f"{spec.name} field '{text}': {reason}") from None
    return frozenset(values)


def _parse_cron(expr: str) -> _CronSpec:
    text = expr.strip()
    if text.startswith("@"):
        macro = _MACROS.get(text.lower())
        if macro is None:
            known = ", ".join(_MACROS)
            raise ValueError(f"unknown macro '{text}' (known: {known})")
        text = macro
    parts = text.split()
    if len(parts) != len(_FIELDS):
        raise ValueError(
            "expected 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(parts)} in '{text}'"
        )
    minutes, hours, days, months, weekdays = (
        _parse_field(spec, part) for spec, part in zip(_FIELDS, parts, strict=True)
    )
    # Vixie cron decides by the first character: "*/2" counts as unrestricted too.
    day_or = not parts[2].startswith("*") and not parts[4].startswith("*")
    # Vixie cron's MIN_STAR/HR_STAR, also decided by the first character ("*/15" counts).
    real_time = parts[0].startswith("*") or parts[1].startswith("*")
    if not day_or and not any(d <= _LONGEST_MONTH.get(m, 31) for m in months for d in days):
        raise ValueError(
            f"never fires: day-of-month '{parts[2]}' never occurs in month '{parts[3]}'"
        )
    return _CronSpec(
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=days,
        months=tuple(sorted(months)),
        weekdays=frozenset(w % 7 for w in weekdays),
        day_or=day_or,
        real_time=real_time,
    )


def validate_cron(expr: str) -> None:
    """Raise ValueError with a short reason naming the bad field; return None when valid."""
    _parse_cron(expr)


# --------------------------------------------------------------------------------------------
# Shared helpers


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone '{name}' (use an IANA name like Europe/Berlin)"
        ) from None


def _require_aware(*values: datetime) -> None:
    for value in values:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"datetime {value.isoformat()} has no time zone")


def _check_offset(seconds: float) -> None:
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"jitter must be a finite number of seconds >= 0, got {seconds}")


def _format_seconds(seconds: float) -> str:
    whole = int(seconds)
    frac = seconds - whole
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    out = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    if frac:
        out += f"{secs + frac:g}s"
    elif secs or not out:
        out += f"{secs}s"
    return out


def _jitter_suffix(seconds: float) -> str:
    return f", jitter {_format_seconds(seconds)}" if seconds else ""


def jitter_offset(job_name: str, max_seconds: float) -> float:
    """A fixed offset in whole seconds within [0, max_seconds], derived from the job's name.

    Like Jenkins' H: spreads jobs that share a cron line, yet is the same on every restart and
    every host. SHA-256 rather than hash(), whose seed changes with every process.
    """
    _check_offset(max_seconds)
    span = math.floor(max_seconds)
    if span == 0:
        return 0.0
    digest = hashlib.sha256(job_name.encode("utf-8")).digest()
    return float(int.from_bytes(digest[:8], "big") % (span + 1))


# --------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True)
class CronSchedule:
    """A 5-field crontab (or @macro) matched against wall-clock time in `timezone`.

    `jitter` is the offset in seconds already chosen for the job (see jitter_offset), added to
    every instant the cron yields.
    """

    expr: str
    timezone: str = "UTC"
    jitter: float = 0.0
    _spec: _CronSpec = field(init=False, repr=False, compare=False)
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_offset(self.jitter)
        object.__setattr__(self, "_spec", _parse_cron(self.expr))
        object.__setattr__(self, "_zone", _zone(self.timezone))

    def next_after(self, after: datetime) -> datetime | None:
        _require_aware(after)
        return next(self._planned(after), None)

    def describe(self) -> str:
        return f"cron '{self.expr}' {self.timezone}{_jitter_suffix(self.jitter)}"

    def _planned(self, after: datetime) -> Iterator[datetime]:
        """Planned instants strictly after `after`, in order; empty near the end of time."""
        shift = timedelta(seconds=self.jitter)
        try:
            for base in self._base_instants(after - shift):
                yield base + shift
        except OverflowError:
            return

    def _base_instants(self, after: datetime) -> Iterator[datetime]:
        # Both candidate streams are non-decreasing and start early enough that nothing after
        # `after` is missed, so dropping anything not later than the last yield gives each
        # instant once, in order.
        last = after.astimezone(UTC)
        wall = after.astimezone(self._zone).replace(tzinfo=None)
        candidates = self._real_time(wall) if self._spec.real_time else self._fixed_time(wall)
        for instant in candidates:
            if instant > last:
                yield instant
                last = instant

    def _fixed_time(self, wall: datetime) -> Iterator[datetime]:
        # Resolved instants never decrease as wall time increases (a skipped wall time maps to
        # the end of its gap, a repeated one to its first pass), and no wall time before
        # `wall` can resolve to an instant after it.
        start = wall.replace(second=0, microsecond=0) + _ONE_MINUTE
        for candidate in self._walls(start):
            yield self._resolve(candidate)

    def _real_time(self, wall: datetime) -> Iterator[datetime]:
        """Instants whose wall time matches, from about `wall` on, non-decreasing."""
        zone = self._zone
        # Inside the first pass of a repeated stretch, the second pass of earlier wall times
        # (down to the stretch's start, at most its length back) is still ahead.
        repeat = _offset(wall, zone, 0) - _offset(wall, zone, 1)
        start = (wall - max(repeat, timedelta(0))).replace(second=0, microsecond=0)
        # First passes come in order along the walk, and so do second passes, but a second
        # pass lies after later first passes of the same stretch: hold second passes back
        # until the walk's first passes overtake them. At most one stretch's worth waits.
        second_passes: deque[datetime] = deque()
        for candidate in self._walls(start):
            # PEP 495: fold=0 takes the offset from before a transition, fold=1 the one after.
            offset_before = _offset(candidate, zone, 0)
            offset_after = _offset(candidate, zone, 1)
            if offset_before < offset_after:
                continue  # skipped by a spring change: no such instant, so no fire
            first = (candidate - offset_before).replace(tzinfo=UTC)
            while second_passes and second_passes[0] < first:
                yield second_passes.popleft()
            yield first
            if offset_after != offset_before:
                second_passes.append((candidate - offset_after).replace(tzinfo=UTC))
        yield from second_passes

    def _walls(self, start: datetime) -> Iterator[datetime]:
        """Matching naive wall times at or after `start` (minute-aligned), in order."""
        spec = self._spec
        first_day = start.date()
        if first_day.year + _SEARCH_YEARS <= MAXYEAR:
            limit = first_day.replace(year=first_day.year + _SEARCH_YEARS, day=1)
        else:
            limit = date.max
        day = first_day
        while (found := spec.next_day(day, limit)) is not None:
            day = found
            on_first = day == first_day
            hours = spec.hours[bisect_left(spec.hours, start.hour) :] if on_first else spec.hours
            for hour in hours:
                minutes = spec.minutes
                if on_first and hour == start.hour:
                    minutes = minutes[bisect_left(minutes, start.minute) :]
                for minute in minutes:
                    yield datetime(day.year, day.month, day.day, hour, minute)
            if day == date.max:
                return
            day += _ONE_DAY

    def _resolve(self, wall: datetime) -> datetime:
        """The instant a matching wall time fires at, per the DST rules in the module docstring."""
        first = wall.replace(tzinfo=self._zone).astimezone(UTC)  # fold=0: first pass if repeated
        if first.astimezone(self._zone).replace(tzinfo=None) == wall:
            return first
        # In a gap, PEP 495 maps fold=0 past the transition and fold=1 before it.
        before = wall.replace(tzinfo=self._zone, fold=1).astimezone(UTC)
        return _transition(self._zone, min(before, first), max(before, first))


def _offset(wall: datetime, zone: ZoneInfo, fold: int) -> timedelta:
    offset = wall.replace(tzinfo=zone, fold=fold).utcoffset()
    assert offset is not None  # a ZoneInfo always has one
    return offset


def _transition(zone: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """The first whole second at or before `after` that has `after`'s UTC offset.

    zoneinfo does not expose its transition table, so bisect; this only runs for wall times
    that fall into a gap, a handful of times a year.
    """
    offset_before = before.astimezone(zone).utcoffset()
    lo = math.floor(before.timestamp())
    hi = math.ceil(after.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).utcoffset() == offset_before:
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)


def _micros(value: datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND


@dataclass(frozen=True)
class EverySchedule:
    """Every `interval` seconds, at k * interval after the Unix epoch (plus `jitter`).

    Anchoring at the epoch (not at start-up) keeps the instants the same on every restart and
    host. Arithmetic is in integer microseconds so that next_after(planned) can never land on
    `planned` again through float rounding.
    """

    interval: float
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.interval) or self.interval < 1:
            raise ValueError(f"every must be at least 1 second, got {self.interval}")
        _check_offset(self.jitter)

    @property
    def _interval_us(self) -> int:
        return round(self.interval * 1_000_000)

    @property
    def _jitter_us(self) -> int:
        return round(self.jitter * 1_000_000)

    def _index_at_or_before(self, value: datetime) -> int:
        return (_micros(value) - self._jitter_us) // self._interval_us

    def _instant(self, index: int) -> datetime | None:
        try:
            return _EPOCH + timedelta(microseconds=index * self._interval_us + self._jitter_us)
        except OverflowError:
            return None

    def next_after(self, after: datetime) -> datetime | None:
        _require_aware(after)
        return self._instant(self._index_at_or_before(after) + 1)

    def describe(self) -> str:
        return f"every {_format_seconds(self.interval)}{_jitter_suffix(self.jitter)}"

    def _missed(self, start: datetime, end: datetime) -> Missed:
        first = self._index_at_or_before(start) + 1
        last = self._index_at_or_before(end)
        if last < first:
            return Missed(0, None, None)
        return Missed(last - first + 1, self._instant(first), self._instant(last))


@dataclass(frozen=True)
class AtSchedule:
    """One occurrence, at `at` (aware) plus `jitter` seconds."""

    at: datetime
    jitter: float = 0.0

    def __post_init__(self) -> None:
        _require_aware(self.at)
        _check_offset(self.jitter)

    def next_after(self, after: datetime) -> datetime | None:
        _require_aware(after)
        try:
            planned = self.at.astimezone(UTC) + timedelta(seconds=self.jitter)
        except OverflowError:
            return None
        return planned if planned > after else None

    def describe(self) -> str:
        return f"at {self.at.isoformat()}{_jitter_suffix(self.jitter)}"


def build_schedule(
    *,
    job_name: str,
    cron: str | None,
    every: float | None,
    at: datetime | None,
    timezone: str = "UTC",
    jitter: float = 0.0,
) -> Schedule | None:
    """The job's schedule, or None when it has none (manual starts only).

    `jitter` is the maximum; the offset actually used comes from jitter_offset(job_name, jitter).
    Raises ValueError on bad input (the message is meant to follow "jobs.<name>: ").
    """
    given = [
        key for key, value in (("cron", cron), ("every", every), ("at", at)) if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"set at most one of cron, every, at (got {' and '.join(given)})")
    _zone(timezone)
    offset = jitter_offset(job_name, jitter)
    if cron is not None:
        return CronSchedule(cron, timezone, offset)
    if every is not None:
        return EverySchedule(every, offset)
    if at is not None:
        return AtSchedule(at, offset)
    return None


def _iterate(schedule: Schedule, after: datetime) -> Iterator[datetime]:
    if isinstance(schedule, CronSchedule):
        yield from schedule._planned(after)
        return
    current = after
    while (planned := schedule.next_after(current)) is not None and planned > current:
        yield planned
        current = planned


def upcoming(schedule: Schedule, after: datetime, count: int) -> list[datetime]:
    """The next `count` planned instants strictly after `after` (fewer if the schedule ends)."""
    _require_aware(after)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    out: list[datetime] = []
    if count == 0:
        return out
    for planned in _iterate(schedule, after):
        out.append(planned)
        if len(out) == count:
            break
    return out


def missed_between(
    schedule: Schedule, start: datetime, end: datetime, limit: int = 100_000
) -> Missed:
    """Occurrences in (start, end], without building a list of them.

    Interval schedules are counted arithmetically, exactly, whatever `limit` says. Cron (and any
    other Schedule) is iterated: past `limit` occurrences counting stops and the result has
    count=limit and capped=True; `newest` is still exact for cron (found by searching back from
    `end`), and for other implementations is the last one counted.
    """
    _require_aware(start, end)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if end <= start:
        return Missed(0, None, None)
    if isinstance(schedule, EverySchedule):
        return schedule._missed(start, end)
    count = 0
    oldest: datetime | None = None
    newest: datetime | None = None
    for planned in _iterate(schedule, start):
        if planned > end:
            break
        if count == limit:
            if isinstance(schedule, CronSchedule):
                newest = _cron_last_until(schedule, newest or start, end)
            return Missed(count, oldest, newest, capped=True)
        count += 1
        if oldest is None:
            oldest = planned
        newest = planned
    return Missed(count, oldest, newest)


def _cron_last_until(schedule: CronSchedule, floor: datetime, end: datetime) -> datetime | None:
    """The last planned instant in (floor, end], searching back from `end` in growing windows."""
    window = _ONE_DAY
    while True:
        lo = max(floor, end - window)
        last: datetime | None = None
        for planned in schedule._planned(lo):
            if planned > end:
                break
            last = planned
        if last is not None or lo == floor:
            return last
        window *= 2
