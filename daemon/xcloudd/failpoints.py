"""Named points where tests of the real process inject faults that no outside stand-in can:
a loop that stops making progress (a wedge), to prove that the systemd watchdog notices.

`XCLOUDD_FAILPOINTS="follower.scan=hang@5"`: from 5 seconds after start-up on, the named
point never returns. Unset (always, outside such tests), a point is one dict lookup.
"""

from __future__ import annotations

import asyncio
import os
import time

_STARTED = time.monotonic()


def _parse(text: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, action = item.partition("=")
        kind, _, after = action.partition("@")
        if kind == "hang":
            try:
                points[name] = float(after or 0)
            except ValueError:
                continue
    return points


_POINTS = _parse(os.environ.get("XCLOUDD_FAILPOINTS", ""))


async def reach(name: str) -> None:
    after = _POINTS.get(name)
    if after is not None and time.monotonic() - _STARTED >= after:
        await asyncio.Event().wait()
