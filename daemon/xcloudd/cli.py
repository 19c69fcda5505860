"""`xcloudd` command line: arguments in, one exit code out (DESIGN 3.1).

Errors reach the user as one line on stderr; a traceback is a bug, so unexpected exceptions
are reported as one line too (without local variables, which could hold the key).

Only the standard library and xcloudd.errors are imported here at module level: `xcloudd
--help` must stay fast, so every command imports what it needs (aiohttp, the config's
parsers, the store) when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from xcloudd import __version__
from xcloudd.errors import ExitCode, Interrupted, UsageError, XcloudError, redact_key_material

if TYPE_CHECKING:
    import aiohttp

    from xcloudd.config import Config
    from xcloudd.runtime import Runtime
    from xcloudd.sinks import Sink
    from xcloudd.starter import Target

_MAX_COUNT = 1000
# What a command whose stdout is its result shows on stderr while it works. Events that end the
# command (api.auth_failed, api.unavailable) are left out: its one error line says it.
_PROGRESS_EVENTS = ("api.retrying", "api.throttled", "daemon.error")
_FROM_YEARS = (1970, 9000)  # [first, last + 1]

_DESCRIPTION = "Run Xcode Cloud builds on schedules and follow them."
_EPILOG = """\
config: --config PATH (before or after the command), else $XCLOUDD_CONFIG,
else /etc/xcloudd/config.toml.

exit codes:
  0    done; with --wait or watch: the build SUCCEEDED
  1    the build FAILED or ERRORED, or App Store Connect refused the start
  3    the build was CANCELED or SKIPPED
  4    gave up watching (polling.give_up_after)
  64   usage error, also a workflow, product, branch, tag, pull request or run given
       on the command line that does not exist
  69   App Store Connect unavailable after retries, or no answer within
       2 x api.timeout + 5s
  70   internal error (a bug in xcloudd)
  74   the state store cannot be read or written
  77   credentials rejected
  78   config invalid, also a workflow, product, branch or tag in it that does not exist
  130  interrupted (SIGINT); 143 terminated (SIGTERM)
"""
_FROM_HELP = (
    "show fire times after TIME, an ISO 8601 time: 2026-12-01T00:00:00+01:00,"
    " 2026-12-01T00:00Z, or without an offset (2026-12-01T00:00, 2026-12-01) read in each"
    " job's own time zone (default: now)"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before and after the command. On the command's parser its default
    # is SUPPRESS, so that leaving it out there keeps the value given before the command.
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: $XCLOUDD_CONFIG, else /etc/xcloudd/config.toml)",
    )
    p = _Parser(
        prog="xcloudd",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"xcloudd {__version__}")
    p.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $XCLOUDD_CONFIG, else /etc/xcloudd/config.toml)",
    )
    sub = p.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND", title="commands"
    )

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, parents=[common])

    command("run", "the daemon, in the foreground (systemd Type=notify)")

    c = command("check", "validate the config and show each job's upcoming fire times")
    c.add_argument(
        "--online",
        action="store_true",
        help="also sign in to App Store Connect and resolve every job's workflow, product,"
        " branch or tag, and every watched workflow",
    )
    c.add_argument("--from", dest="from_", metavar="TIME", help=_FROM_HELP)
    c.add_argument(
        "--count",
        type=int,
        default=5,
        metavar="N",
        help=f"fire times per job, 1 to {_MAX_COUNT} (default: %(default)s)",
    )
    c.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (with --online, each job's resolved ids)",
    )

    s = command("start", "start a build now: a job's, or one described by the options")
    s.add_argument("job", nargs="?", metavar="JOB", help="a job from the config")
    s.add_argument(
        "--workflow",
        metavar="W",
        help="workflow id, or workflow name together with --product (instead of JOB)",
    )
    s.add_argument("--product", metavar="P", help="product name or id, for a workflow name")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--branch", metavar="B", help="build this branch")
    src.add_argument("--tag", metavar="T", help="build this tag")
    src.add_argument(
        "--pull-request", metavar="ID", help="build this pull request (its number or id)"
    )
    src.add_argument("--rebuild", metavar="RUN_ID", help="build an earlier run's commit again")
    s.add_argument(
        "--clean",
        action="store_true",
        default=None,
        help="a clean build (default: the job's or workflow's setting)",
    )
    s.add_argument(
        "--wait",
        action="store_true",
        help="follow the build to the end and exit with its outcome (0, 1, 3 or 4)",
    )

    w = command("watch", "follow an existing build run to the end; exit with its outcome")
    w.add_argument("run_id", metavar="RUN_ID", help="the build run's id")

    st = command("status", "runs in flight and recent runs, from the state store")
    st.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    wf = command("workflows", "products and their workflows with ids (to fill in a config)")
    wf.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    sim = command("simulator", "run the local App Store Connect stand-in")
    sim.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="where it listens (default: %(default)s)",
    )
    sim.add_argument(
        "--scenario",
        type=Path,
        metavar="FILE",
        help="a TOML scenario of products, workflows and builds (default: the built-in one)",
    )
    sim.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where the key and a ready config are written (default: $XDG_STATE_HOME/"
        "xcloudd-simulator, else ~/.local/state/xcloudd-simulator)",
    )

    command("demo", "the simulator plus xcloudd on a built-in config, with readable output")
    return p


def _config(args: argparse.Namespace) -> Config:
    from xcloudd.config import load_config, resolve_config_path

    return load_config(resolve_config_path(args.config, os.environ))


async def _with_runtime(
    config: Config,
    body: Callable[[Runtime], Awaitable[ExitCode]],
    *,
    result_on_stdout: bool,
) -> ExitCode:
    """Run `body` with a runtime. `result_on_stdout`: stdout carries the command's result (a
    listing, a JSON document), so only progress (retries, throttling) is shown, on stderr, as
    readable lines. Otherwise the events are the output: readable lines on a terminal, JSON
    lines on a pipe."""
    from xcloudd.console import console_sink
    from xcloudd.runtime import build_sinks, open_runtime, wants_console

    # On the daemon's store, a command records what it does there (so the daemon and `status`
    # know it) and shows only its own events; the daemon delivers them to the configured sinks.
    # Without one, an in-memory store serves the command and it delivers to them itself.
    shared = config.state.path.exists()
    configured = () if shared else config.sinks

    def sinks(session: aiohttp.ClientSession) -> list[Sink]:
        if not result_on_stdout:
            return build_sinks(configured, session=session, console=wants_console())
        others = [sc for sc in configured if sc.type != "stdout"]
        return [
            console_sink(sys.stderr, events=_PROGRESS_EVENTS),
            *build_sinks(others, session=session),
        ]

    async with open_runtime(
        config, sinks=sinks, store_path=config.state.path if shared else None, durable=not shared
    ) as rt:
        return await body(rt)


def _run(main: Callable[[], Coroutine[Any, Any, ExitCode]]) -> ExitCode:
    """asyncio.run with SIGINT and SIGTERM as exit codes 130 and 143: the command stops what
    it does (a build already started goes on in Xcode Cloud), cleans up, and says so in one
    line. A second signal ends it at once."""
    import asyncio

    async def guarded() -> ExitCode:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        got: list[signal.Signals] = []

        def on_signal(sig: signal.Signals) -> None:
            if got:
                os._exit(ExitCode.TERMINATED if sig == signal.SIGTERM else ExitCode.INTERRUPTED)
            got.append(sig)
            task.cancel()

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue  # ignored on purpose by whoever started us (nohup, a background job)
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals here: the defaults stay
        try:
            return await main()
        except asyncio.CancelledError:
            if not got:
                raise
            terminated = got[0] == signal.SIGTERM
            raise Interrupted(
                f"{'terminated (SIGTERM)' if terminated else 'interrupted (SIGINT)'}: a build"
                " already started goes on in Xcode Cloud",
                terminated=terminated,
            ) from None
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    return asyncio.run(guarded())


def _start_target(args: argparse.Namespace) -> Target | None:
    """The target the options describe, or None for a JOB (which needs the config). Mistakes
    in the arguments are found here, before the config is read: they are usage errors (64)
    even when the config is broken too."""
    from xcloudd.starter import Target
    from xcloudd.targets import check_target

    if args.job and args.workflow:
        raise UsageError("give either a JOB or --workflow, not both")
    if args.job:
        if any((args.branch, args.tag, args.pull_request, args.rebuild)):
            raise UsageError(
                "a JOB brings its own source: drop --branch/--tag/--pull-request/--rebuild"
            )
        if args.product:
            raise UsageError("a JOB brings its own workflow and product: drop --product")
        return None
    if not args.workflow:
        raise UsageError("name a JOB from the config, or give --workflow")
    target = Target(
        workflow=args.workflow,
        product=args.product,
        branch=args.branch,
        tag=args.tag,
        pull_request=args.pull_request,
        rebuild=args.rebuild,
        clean=args.clean,
    )
    check_target(target)
    return target


def _job_target(args: argparse.Namespace, config: Config) -> Target:
    from xcloudd.starter import Target

    try:
        job = config.job(args.job)
    except KeyError:
        names = ", ".join(j.name for j in config.jobs) or "none"
        raise UsageError(f"no job {args.job!r} in {config.path} (jobs: {names})") from None
    target = Target.of_job(job)
    return dataclasses.replace(target, clean=True) if args.clean else target


def _from_time(text: str) -> datetime:
    from xcloudd import commands

    after = commands.parse_time(text)
    # Fire times are shown in each job's time zone, which near year 1 or 9999 is outside
    # Python's calendar; and no schedule has a use for times before the Unix epoch.
    try:
        year = after.astimezone(UTC).year if after.tzinfo else after.year
    except OverflowError:  # 9999-12-31T23:00-01:00 or 0001-01-01T00:00+01:00
        year = after.year
    if not _FROM_YEARS[0] <= year < _FROM_YEARS[1]:
        raise UsageError(
            f"--from {text!r} is out of range; give a time from {_FROM_YEARS[0]} "
            f"to {_FROM_YEARS[1] - 1}"
        )
    return after


def _dispatch(args: argparse.Namespace) -> ExitCode:
    import asyncio

    match args.command:
        case "simulator":
            from xcloudd.simulator import serve

            asyncio.run(serve(args.listen, args.scenario, args.state_dir))
            return ExitCode.OK
        case "demo":
            from xcloudd.demo import run_demo

            return asyncio.run(run_demo())
        case "check":
            return _check(args)
        case "start":
            from xcloudd import commands, targets
            from xcloudd.deadline import Deadline

            given = _start_target(args)
            config = _config(args)
            target = given or _job_target(args, config)
            deadline = Deadline.of(config, sys.stderr)
            return _run(
                lambda: _with_runtime(
                    config,
                    lambda rt: commands.start(rt, target, wait=args.wait, deadline=deadline),
                    result_on_stdout=False,
                )
            )
        case "watch":
            from xcloudd import commands, targets
            from xcloudd.deadline import Deadline

            targets.check_run_id(args.run_id)
            config = _config(args)
            deadline = Deadline.of(config, sys.stderr)
            return _run(
                lambda: _with_runtime(
                    config,
                    lambda rt: commands.watch(rt, args.run_id, deadline=deadline),
                    result_on_stdout=False,
                )
            )
        case "workflows":
            from xcloudd import commands, targets
            from xcloudd.deadline import Deadline

            config = _config(args)
            deadline = Deadline.of(config, sys.stderr)
            return _run(
                lambda: _with_runtime(
                    config,
                    lambda rt: commands.workflows(
                        rt, sys.stdout, as_json=args.json, deadline=deadline
                    ),
                    result_on_stdout=True,
                )
            )
        case "run":
            from xcloudd.daemon import run_daemon

            config = _config(args)
            return asyncio.run(run_daemon(config))
        case "status":
            from xcloudd import commands, targets
            from xcloudd.deadline import Deadline

            config = _config(args)
            return commands.status(config, sys.stdout, as_json=args.json)
    raise UsageError(f"unknown command {args.command!r}")


def _check(args: argparse.Namespace) -> ExitCode:
    from xcloudd import commands
    from xcloudd.deadline import Deadline

    # Each fire time costs a calendar search; a typo like 50000000 would hang.
    if not 1 <= args.count <= _MAX_COUNT:
        raise UsageError(f"--count must be from 1 to {_MAX_COUNT}, got {args.count}")
    # Argument mistakes are usage errors (64) even when the config is broken too.
    after = _from_time(args.from_) if args.from_ else datetime.now(UTC)
    config = _config(args)
    planned = commands.plan(config, after=after, count=args.count)
    for line in commands.warnings(config, datetime.now(UTC)):
        _error(f"warning: {line}")
    if not args.online:
        if args.json:
            sys.stdout.write(commands.dumps(commands.check_document(config, planned)))
        else:
            commands.write_plan(config, planned, sys.stdout)
        return ExitCode.OK
    if not args.json:
        commands.write_plan(config, planned, sys.stdout)
        sys.stdout.flush()
    deadline = Deadline.of(config, sys.stderr)
    return _run(
        lambda: _with_runtime(
            config,
            lambda rt: commands.check_online(
                rt, sys.stdout, planned=planned, as_json=args.json, deadline=deadline
            ),
            result_on_stdout=True,
        )
    )


def exit_code(exc: XcloudError) -> ExitCode:
    """The exit code for an error; 1 is kept for failed builds and refused starts."""
    store = sys.modules.get("xcloudd.store")
    if store is not None and isinstance(exc, store.StoreError):
        return ExitCode.IO
    api = sys.modules.get("xcloudd.api")
    if api is not None and isinstance(exc, api.BadResponse):
        # Answers that could not be read, after retries: App Store Connect is not usable.
        return ExitCode.UNAVAILABLE
    return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if "config" not in args:
            args.config = None
        return int(_dispatch(args))
    except XcloudError as exc:
        _error(str(exc))
        return int(exit_code(exc))
    except KeyboardInterrupt:
        _error("interrupted (SIGINT)")
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # a bug: still one line, never a traceback with locals
        _error(f"internal error: {type(exc).__name__}: {exc}")
        return int(ExitCode.SOFTWARE)


def _error(message: str) -> None:
    # Messages are meant never to quote a key; this catches one that does anyway, e.g. through
    # an exception's text that quotes its input. One line, whatever the message held.
    line = " ".join(redact_key_material(message).split())
    print(f"xcloudd: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
