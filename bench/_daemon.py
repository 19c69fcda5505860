"""`xcloudd run` on the bench's virtual time, with an event-loop lag sampler beside it.

    python bench/_daemon.py --config PATH --lag-file PATH --r0 R0 --v0 V0 --factor F

The daemon runs through its real code (`xcloudd.daemon.run_daemon`) on a ScaledClock rebuilt
from R0/V0/F, so it reads the same virtual time as the simulator in the bench process. In the
daemon's own event loop a sampler sleeps LAG_PERIOD_S (real) again and again and records how
late each wake-up came: that lateness is what every other task in the loop waited too. At exit
(SIGTERM, as systemd stops it) the samples go to --lag-file as JSON, [[real monotonic, lag s],
...], for the bench to cut to its measurement window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from common import ScaledClock
from xcloudd.config import load_config
from xcloudd.daemon import run_daemon
from xcloudd.errors import XcloudError

LAG_PERIOD_S = 0.05


async def sample_lag(samples: list[tuple[float, float]]) -> None:
    while True:
        began = time.monotonic()
        await asyncio.sleep(LAG_PERIOD_S)
        woke = time.monotonic()
        samples.append((round(woke, 4), round(max(0.0, woke - began - LAG_PERIOD_S), 5)))


async def main(args: argparse.Namespace) -> int:
    clock = ScaledClock(args.factor, r0=args.r0, v0=args.v0)
    samples: list[tuple[float, float]] = []
    sampler = asyncio.create_task(sample_lag(samples))
    try:
        return int(await run_daemon(load_config(args.config), clock=clock))
    finally:
        sampler.cancel()
        args.lag_file.write_text(json.dumps(samples), encoding="utf-8")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/_daemon.py")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--lag-file", type=Path, required=True)
    parser.add_argument("--r0", type=float, required=True)
    parser.add_argument("--v0", type=float, required=True)
    parser.add_argument("--factor", type=float, required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    try:
        sys.exit(asyncio.run(main(arguments)))
    except XcloudError as exc:  # one line, as `xcloudd run` says it
        print(f"xcloudd: {exc}", file=sys.stderr, flush=True)
        sys.exit(int(exc.exit_code))
