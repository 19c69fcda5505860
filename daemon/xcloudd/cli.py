"""`xcloudd` command line: arguments in, one exit code out (DESIGN 3.1).

Errors reach the user as one line on stderr; a traceback is a bug, so unexpected exceptions
are reported as one line too (without local variables, which could hold the key).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from xcloudd import __version__

if TYPE_CHECKING:
    import aiohttp
from xcloudd.config import Config, load_config, resolve_config_path
from xcloudd.errors import ExitCode, UsageError, XcloudError, redact_key_material
from xcloudd.runtime import (
    Runtime,
    build_sinks,
    open_runtime,
    refuse_unsupported,
    wants_console,
)
from xcloudd.sinks import Sink

_MAX_COUNT = 1000
_FROM_YEARS = (1970, 9000)  # [first, last + 1]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="xcloudd", description="Run Xcode Cloud builds on schedules and follow them.")
    p.add_argument("--version", action="version", version=f"xcloudd {__version__}")
    p.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $XCLOUDD_CONFIG, else /etc/xcloudd/config.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("run", help="the daemon, in the foreground")

    c = sub.add_parser("check", help="validate the config and show upcoming fire times")
    c.add_argument("--online", action="store_true", help="also authenticate and resolve names")
    c.add_argument("--from", dest="from_", metavar="TIME", help="show fire times after TIME")
    c.add_argument("--count", type=int, default=5, metavar="N", help="fire times per job")
    c.add_argument("--json", action="store_true")

    s = sub.add_parser("start", help="start a build now")
    s.add_argument("job", nargs="?", help="a job from the config")
    s.add_argument("--workflow", metavar="W", help="workflow id (or name with --product)")
    s.add_argument("--product", metavar="P", help="product name or id, for a workflow name")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--branch", metavar="B")
    src.add_argument("--tag", metavar="T")
    src.add_argument("--pull-request", metavar="ID")
    src.add_argument("--rebuild", metavar="RUN_ID", help="build an earlier run's commit again")
    s.add_argument("--clean", action="store_true", default=None, help="a clean build")
    s.add_argument("--wait", action="store_true", help="follow the build; exit with its outcome")

    w = sub.add_parser("watch", help="follow an existing build run to the end")
    w.add_argument("run_id", metavar="RUN_ID")

    st = sub.add_parser("status", help="runs in flight and recent runs")
    st.add_argument("--json", action="store_true")

    wf = sub.add_parser("workflows", help="products and their workflows with ids")
    wf.add_argument("--json", action="store_true")

    sim = sub.add_parser("simulator", help="run the local App Store Connect stand-in")
    sim.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    sim.add_argument("--scenario", type=Path, metavar="FILE")
    sim.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where the key and a ready config are written (default: ./simulator)",
    )

    sub.add_parser("demo", help="the simulator plus xcloudd, with readable output")
    return p


def _config(args: argparse.Namespace) -> Config:
    config = load_config(resolve_config_path(args.config, os.environ))
    refuse_unsupported(config)
    return config


async def _with_runtime(
    config: Config,
    body: Callable[[Runtime], Awaitable[ExitCode]],
    *,
    console: bool | None,
    console_stream: TextIO | None = None,
) -> ExitCode:
    # On the daemon's store, a command records what it does there (so the daemon and `status`
    # know it) and shows only its own events; the daemon delivers them to the configured sinks.
    # Without one, an in-memory store serves the command and it delivers to them itself.
    shared = config.state.path.exists()

    def sinks(session: aiohttp.ClientSession) -> list[Sink]:
        return build_sinks(
            () if shared else config.sinks,
            session=session,
            console=console,
            console_stream=console_stream,
        )

    async with open_runtime(
        config, sinks=sinks, store_path=config.state.path if shared else None, durable=not shared
    ) as rt:
        return await body(rt)


def _start_target(args: argparse.Namespace, config: Config | None) -> object:
    from xcloudd.starter import Target

    if args.job and args.workflow:
        raise UsageError("give either a JOB or --workflow, not both")
    if args.job:
        assert config is not None
        try:
            job = config.job(args.job)
        except KeyError:
            names = ", ".join(j.name for j in config.jobs) or "none"
            raise UsageError(f"no job {args.job!r} in {config.path} (jobs: {names})") from None
        base = Target.of_job(job)
        if args.clean:
            base = dataclasses.replace(base, clean=True)
        if any((args.branch, args.tag, args.pull_request, args.rebuild)):
            raise UsageError(
                "a JOB brings its own source: drop --branch/--tag/--pull-request/--rebuild"
            )
        if args.product:
            raise UsageError("a JOB brings its own workflow and product: drop --product")
        return base
    if not args.workflow:
        raise UsageError("name a JOB from the config, or give --workflow")
    return Target(
        workflow=args.workflow,
        product=args.product,
        branch=args.branch,
        tag=args.tag,
        pull_request=args.pull_request,
        rebuild=args.rebuild,
        clean=args.clean,
    )


def _from_time(text: str) -> datetime:
    from xcloudd import commands

    after = commands.parse_time(text)
    # Fire times are shown in each job's time zone, which near year 1 or 9999 is outside
    # Python's calendar; and no schedule has a use for times before the Unix epoch.
    try:
        year = after.astimezone(UTC).year
    except OverflowError:  # 9999-12-31T23:00-01:00 or 0001-01-01T00:00+01:00
        year = after.year
    if not _FROM_YEARS[0] <= year < _FROM_YEARS[1]:
        raise UsageError(
            f"--from {text!r} is out of range; give a time from {_FROM_YEARS[0]} "
            f"to {_FROM_YEARS[1] - 1}"
        )
    return after


def _dispatch(args: argparse.Namespace) -> ExitCode:
    from xcloudd import commands

    match args.command:
        case "simulator":
            from xcloudd.simulator import serve

            state_dir = args.state_dir or Path("simulator")
            asyncio.run(serve(args.listen, args.scenario, state_dir))
            return ExitCode.OK
        case "demo":
            from xcloudd.demo import run_demo

            return asyncio.run(run_demo())
        case "check":
            # Each fire time costs a calendar search; a typo like 50000000 would hang.
            if not 1 <= args.count <= _MAX_COUNT:
                raise UsageError(f"--count must be from 1 to {_MAX_COUNT}, got {args.count}")
            # Argument mistakes are usage errors (64) even when the config is broken too.
            after = _from_time(args.from_) if args.from_ else datetime.now(UTC)
            config = _config(args)
            code = commands.check_offline(
                config, sys.stdout, after=after, count=args.count, as_json=args.json
            )
            if args.online:
                code = asyncio.run(
                    _with_runtime(
                        config,
                        lambda rt: commands.check_online(
                            rt, sys.stderr if args.json else sys.stdout
                        ),
                        console=True,
                        # stdout holds the JSON document: readable events go to stderr.
                        console_stream=sys.stderr if args.json else None,
                    )
                )
            return code
        case "start":
            from xcloudd.starter import Target

            config = _config(args)
            target = _start_target(args, config)
            assert isinstance(target, Target)
            return asyncio.run(
                _with_runtime(
                    config,
                    lambda rt: commands.start(rt, target, wait=args.wait),
                    console=wants_console(),
                )
            )
        case "watch":
            config = _config(args)
            return asyncio.run(
                _with_runtime(
                    config, lambda rt: commands.watch(rt, args.run_id), console=wants_console()
                )
            )
        case "workflows":
            config = _config(args)
            return asyncio.run(
                _with_runtime(
                    config,
                    lambda rt: commands.workflows(rt, sys.stdout, as_json=args.json),
                    console=True,
                    console_stream=sys.stderr if args.json else None,
                )
            )
        case "run":
            from xcloudd.daemon import run_daemon

            config = _config(args)
            return asyncio.run(run_daemon(config))
        case "status":
            config = _config(args)
            return commands.status(config, sys.stdout, as_json=args.json)
    raise UsageError(f"unknown command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return int(_dispatch(args))
    except XcloudError as exc:
        _error(str(exc))
        return int(exc.exit_code)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # a bug: still one line, never a traceback with locals
        _error(f"internal error: {type(exc).__name__}: {exc}")
        return int(ExitCode.FAILED)


def _error(message: str) -> None:
    # Messages are meant never to quote a key; this catches one that does anyway, e.g. through
    # an exception's text that quotes its input. One line, whatever the message held.
    line = " ".join(redact_key_material(message).split())
    print(f"xcloudd: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
