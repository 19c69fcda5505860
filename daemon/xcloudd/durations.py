"""Durations as people write them in the config: "90s", "15m", "1h30m", "2d", or plain seconds."""

from __future__ import annotations

import math
import re

_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_NUMBER = r"\d+(?:\.\d+)?"
# Units must come largest first and at most once each, so "30m1h" or "1m1m" (almost
# certainly typos) fail instead of adding up to something nobody meant.
_DURATION = re.compile(
    rf"(?:(?P<d>{_NUMBER})d)?(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m)?(?:(?P<s>{_NUMBER})s)?"
)
_EXPECTED = 'expected a duration like "90s", "15m", "1h30m", "2d" or a number of seconds'


def parse_duration(value: object) -> float:
    """Seconds in `value`; ValueError with a one-line reason for anything else.

    A bare string of digits is refused: "5" could mean seconds or minutes, and the unit costs
    the user one character.
    """
    if isinstance(value, bool):
        # bool is an int subclass; `timeout = true` is a mistake, not one second.
        raise ValueError(f"{_EXPECTED}, got {str(value).lower()}")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"{_EXPECTED}, got {value}")
    elif isinstance(value, str):
        text = value.strip()
        match = _DURATION.fullmatch(text)
        if not text or match is None:
            hint = f'; add a unit, e.g. "{text}s"' if re.fullmatch(_NUMBER, text) else ""
            raise ValueError(f"{_EXPECTED}, got {_quote(value)}{hint}")
        seconds = sum(
            float(amount) * _UNIT_SECONDS[unit]
            for unit, amount in match.groupdict().items()
            if amount is not None
        )
    else:
        raise ValueError(f"{_EXPECTED}, got {type(value).__name__}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value}")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration for whole seconds, for messages: 5400 -> "1h30m"."""
    if seconds != int(seconds) or seconds < 0:
        return f"{seconds:g}s"
    rest = int(seconds)
    parts: list[str] = []
    for unit, size in _UNIT_SECONDS.items():
        count, rest = divmod(rest, int(size))
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _quote(text: str) -> str:
    shown = text if len(text) <= 40 else text[:37] + "..."
    return '"' + shown.replace('"', '\\"') + '"'
