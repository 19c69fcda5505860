"""Wiring: one ClientSession, one token signer, one client and one emitter per process."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO

import aiohttp

from xcloudd.api import AscClient
from xcloudd.auth import TokenSigner
from xcloudd.clock import Clock, SystemClock
from xcloudd.config import Config, SinkConfig
from xcloudd.console import ConsoleSink
from xcloudd.errors import ConfigError
from xcloudd.events import Emitter, Sink
from xcloudd.resolve import Resolver
from xcloudd.sinks import FileSink, StdoutSink


@dataclass(frozen=True)
class Runtime:
    config: Config
    clock: Clock
    emitter: Emitter
    client: AscClient
    resolver: Resolver


def refuse_unsupported(config: Config) -> None:
    """Parts of the config contract that this version parses but cannot act on yet."""
    if config.server is not None:
        raise ConfigError.at(
            str(config.path), "server", "not supported yet by this version; remove the table"
        )
    for index, sink in enumerate(config.sinks):
        if sink.type not in ("stdout", "file"):
            raise ConfigError.at(
                str(config.path),
                f"sinks[{index}].type",
                f"{sink.type} sinks are not supported yet by this version; use stdout or file",
            )


def build_sinks(
    configs: Iterable[SinkConfig],
    *,
    console: bool | None = None,
    console_stream: IO[str] | None = None,
) -> list[Sink]:
    """The configured sinks. With `console`, stdout shows readable lines (a terminal) or JSON
    lines (a pipe) whatever the config says, so a CLI command never prints an event twice.
    `console_stream` sends the readable lines elsewhere (stderr, when stdout is a document)."""
    sinks: list[Sink] = []
    for sc in configs:
        if sc.type == "stdout":
            if console is None:
                sinks.append(StdoutSink(sc.events))
        elif sc.type == "file":
            assert sc.path is not None
            sinks.append(FileSink(sc.path, sc.events))
        else:
            raise ConfigError(f"{sc.type} sinks are not supported yet: use stdout or file")
    if console is not None:
        sinks.insert(0, ConsoleSink(console_stream) if console else StdoutSink())
    return sinks


def wants_console(stream: object = None) -> bool:
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@asynccontextmanager
async def open_runtime(
    config: Config,
    *,
    sinks: list[Sink],
    clock: Clock | None = None,
) -> AsyncIterator[Runtime]:
    clock = clock or SystemClock()
    emitter = Emitter(sinks, clock)
    _wire_sink_health(emitter)
    connector = aiohttp.TCPConnector(limit=16, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector, raise_for_status=False) as session:
        client = AscClient(
            session,
            config.api.base_url,
            TokenSigner(config.api.key, clock),
            clock,
            emitter,
            timeout=config.api.timeout,
            budget=config.polling.budget,
        )
        try:
            yield Runtime(config, clock, emitter, client, Resolver(client))
        finally:
            await emitter.aclose()


def _wire_sink_health(emitter: Emitter) -> None:
    def report(name: str, healthy: bool, pending: int) -> None:
        emitter.emit("sink.recovered" if healthy else "sink.failed", sink=name, pending=pending)

    for sink in emitter.sinks:
        if hasattr(sink, "on_health"):
            sink.on_health = report
