"""Wiring: one store, one ClientSession, one token signer, one client per process, and the
deliveries that carry the outbox to the sinks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import aiohttp

from xcloudd.api import AscClient
from xcloudd.asyncstore import AsyncStore
from xcloudd.auth import TokenSigner
from xcloudd.clock import Clock, SystemClock
from xcloudd.config import (
    Config,
    FileSinkConfig,
    HttpSinkConfig,
    JournaldSinkConfig,
    SinkConfig,
    SlackSinkConfig,
    StdoutSinkConfig,
)
from xcloudd.console import console_sink
from xcloudd.delivery import Delivery, Mine
from xcloudd.errors import ConfigError
from xcloudd.events import Emitter, Event, EventFactory
from xcloudd.metrics import Metrics, MetricsSink, errors_by_task
from xcloudd.reload import Diff
from xcloudd.resolve import Resolver
from xcloudd.sinks import FileSink, Sink, StdoutSink
from xcloudd.store import Store, StoreUnwritable
from xcloudd.supervisor import Supervisor, describe, diagnostic

DRAIN_S = 5.0
# Events that could not be written while the store was unwritable wait here, in order.
_UNWRITTEN_MAX = 1000


@dataclass
class Runtime:
    config: Config
    clock: Clock
    events: EventFactory
    emitter: Emitter
    store: AsyncStore
    client: AscClient
    resolver: Resolver
    supervisor: Supervisor
    owner: str
    session: aiohttp.ClientSession
    deliveries: list[Delivery] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)
    metrics: Metrics | None = None


def sink_key(sc: SinkConfig) -> str:
    """The sink's name: it keys the sink's cursor in the store, so it is stable for one
    destination and never shows a secret (Slack's webhook URL is one)."""
    match sc:
        case StdoutSinkConfig():
            return "stdout"
        case FileSinkConfig():
            return f"file:{sc.path}"
        case JournaldSinkConfig():
            default = sc.socket == JournaldSinkConfig().socket
            return "journald" if default else f"journald:{sc.socket}"
        case HttpSinkConfig():
            from xcloudd.httpsinks import sink_name

            return sink_name(str(sc.url))
        case SlackSinkConfig():
            return f"slack:{hashlib.sha256(str(sc.url).encode()).hexdigest()[:8]}"
    raise ConfigError(f"unknown sink type {sc.type!r}")


def build_sink(sc: SinkConfig, session: aiohttp.ClientSession | None) -> Sink:
    """The sink for one [[sinks]] entry: its declared config type picks its delivery code."""
    sink: Sink
    match sc:
        case StdoutSinkConfig():
            sink = StdoutSink(sc.events, min_level=sc.min_level)
        case FileSinkConfig():
            sink = FileSink(sc.path, sc.events, min_level=sc.min_level)
        case JournaldSinkConfig():
            from xcloudd.journald import JournaldSink

            sink = JournaldSink(sc.socket, sc.events, min_level=sc.min_level)
        case HttpSinkConfig():
            from xcloudd.httpsinks import HttpSink

            assert session is not None
            auth = None
            if sc.username is not None and sc.password is not None:
                auth = (str(sc.username), str(sc.password))
            sink = HttpSink(
                sink_key(sc),
                str(sc.url),
                session,
                sc.format,
                headers={k: str(v) for k, v in sc.headers.items()},
                gzip=sc.gzip,
                timeout=sc.timeout,
                batch_max=sc.batch_max,
                tenant=sc.tenant,
                auth=auth,
                events=sc.events,
                min_level=sc.min_level,
            )
        case SlackSinkConfig():
            from xcloudd.slack import SlackSink

            assert session is not None
            sink = SlackSink(str(sc.url), session, events=sc.events, min_level=sc.min_level)
        case _:
            raise ConfigError(f"unknown sink type {sc.type!r}")
    sink.name = sink_key(sc)
    return sink


def build_sinks(
    configs: Iterable[SinkConfig],
    *,
    session: aiohttp.ClientSession | None = None,
    console: bool | None = None,
    console_stream: IO[str] | None = None,
) -> list[Sink]:
    """The configured sinks. With `console`, stdout shows readable lines (a terminal) or JSON
    lines (a pipe) whatever the config says, so a CLI command never prints an event twice.
    `console_stream` sends the readable lines elsewhere (stderr, when stdout is a document).
    Sinks that speak HTTP use `session`, the process's one ClientSession."""
    sinks: list[Sink] = []
    names: set[str] = set()
    for sc in configs:
        if console is not None and sc.type == "stdout":
            continue
        if sink_key(sc) in names:
            continue  # the same destination twice would only write each event twice
        names.add(sink_key(sc))
        sinks.append(build_sink(sc, session))
    if console is not None:
        sinks.insert(0, console_sink(console_stream) if console else StdoutSink())
    return sinks


async def replace_sinks(rt: Runtime, configs: Iterable[SinkConfig], changed: Diff) -> None:
    """A reload: the sinks removed or changed stop after the batch under way (their cursors
    stay where they were confirmed), then the new ones start from their own cursors, so no
    event waiting in the outbox is lost. A batch still unconfirmed after DRAIN_S is cut off and
    sent again by the successor, as after a crash."""
    gone = set(changed.gone)
    leaving = [d for d in rt.deliveries if d.sink.name in gone]
    for delivery in leaving:
        delivery.stop()
    await rt.supervisor.join([f"sink {d.sink.name}" for d in leaving], DRAIN_S)
    for delivery in leaving:
        rt.deliveries.remove(delivery)
        rt.sinks.remove(delivery.sink)
        with contextlib.suppress(Exception):
            await delivery.sink.aclose()
    wanted = set(changed.new)
    for sc in configs:
        if sink_key(sc) in wanted and sink_key(sc) not in {s.name for s in rt.sinks}:
            sink = build_sink(sc, rt.session)
            _deliver(rt, sink)
    if rt.metrics is not None:
        rt.metrics.live.sinks = list(rt.deliveries)


def _deliver(rt: Runtime, sink: Sink) -> None:
    # The cursor is read (or created) when the delivery first runs: under supervision, so a
    # store that cannot be written yet only delays it.
    delivery = Delivery(rt.store, sink, rt.emitter, rt.clock)
    rt.sinks.append(sink)
    rt.deliveries.append(delivery)
    rt.supervisor.spawn(f"sink {sink.name}", delivery.run)


def wants_console(stream: object = None) -> bool:
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _OutboxWriter:
    """The emitter's way into the outbox. While the store cannot be written, events wait in
    memory (bounded) and one line on stderr says why; they are written once it works again."""

    def __init__(self, store: AsyncStore) -> None:
        self._store = store
        self._waiting: deque[Event] = deque(maxlen=_UNWRITTEN_MAX)
        self._failing = False

    def write(self, event: Event) -> None:
        self._waiting.append(event)
        self.flush()

    def flush(self) -> None:
        if not self._waiting:
            return
        batch = list(self._waiting)
        self._waiting.clear()
        try:
            fut = self._store.post(lambda: self._store.sync.append(batch))
        except Exception as exc:  # the store is closed: the process is ending
            diagnostic("event not recorded", error=describe(exc), events=len(batch))
            return
        fut.add_done_callback(lambda f: self._done(f, batch))

    def _done(self, fut: Future[object], batch: list[Event]) -> None:
        exc = fut.exception()
        if exc is None:
            if self._failing:
                self._failing = False
                diagnostic("the state store can be written again")
            return
        # Put them back in front, oldest first, for the next try.
        self._waiting.extendleft(reversed(batch))
        if not self._failing:
            self._failing = True
            what = str(exc) if isinstance(exc, StoreUnwritable) else describe(exc)
            diagnostic("events wait in memory: the state store cannot be written", error=what)


@asynccontextmanager
async def open_runtime(
    config: Config,
    *,
    sinks: list[Sink] | Callable[[aiohttp.ClientSession], list[Sink]],
    clock: Clock | None = None,
    store_path: Path | Literal["config"] | None = "config",
    durable: bool = True,
) -> AsyncIterator[Runtime]:
    """Everything a command needs. `store_path`: the config's state store (the daemon), a
    path, or None for an in-memory store. `durable`: deliver the whole outbox to `sinks` with
    cursors kept in the store (the daemon); otherwise only this process's events (a CLI).
    `sinks` may be a function of the process's ClientSession, for sinks that speak HTTP."""
    clock = clock or SystemClock()
    events = EventFactory(clock)
    path = config.state.path if store_path == "config" else store_path
    store = AsyncStore(Store.open(path, events))
    writer = _OutboxWriter(store)
    emitter = Emitter(events, writer.write)
    supervisor = Supervisor(emitter, clock)
    supervisor.install(asyncio.get_running_loop())
    owner = f"pid-{uuid.uuid4()}"
    connector = aiohttp.TCPConnector(limit=16, ttl_dns_cache=300)
    mine: Mine | None = None
    built: list[Sink] = []
    rt: Runtime | None = None
    try:
        async with aiohttp.ClientSession(connector=connector, raise_for_status=False) as session:
            built = sinks(session) if callable(sinks) else sinks
            client = AscClient(
                session,
                config.api.base_url,
                TokenSigner(config.api.key, clock),
                clock,
                emitter,
                timeout=config.api.timeout,
                budget=config.polling.budget,
            )
            rt = Runtime(
                config,
                clock,
                events,
                emitter,
                store,
                client,
                Resolver(client, clock),
                supervisor,
                owner,
                session,
            )
            if durable:
                for sink in built:
                    _deliver(rt, sink)
            else:
                rt.sinks = list(built)
                mine = Mine(store, built)
                supervisor.spawn("console", mine.run)
            if durable and config.server is not None:
                rt.metrics = Metrics()
                counting = Delivery(store, MetricsSink(rt.metrics), emitter, clock, durable=False)
                supervisor.spawn("metrics", counting.run)
                rt.metrics.live.api = client
                rt.metrics.live.sinks = list(rt.deliveries)
                rt.metrics.live.errors = lambda: errors_by_task(supervisor.failures)
            supervisor.spawn("outbox", lambda: _flush_loop(writer, clock))
            try:
                yield rt
            finally:
                writer.flush()
                # The delivery loops stop first, so that draining is the only writer left.
                for delivery in rt.deliveries:
                    delivery.stop()
                if mine is not None:
                    mine.stop()
                await supervisor.join(
                    [*(f"sink {d.sink.name}" for d in rt.deliveries), "console"], DRAIN_S
                )
                await _drain(rt, mine)
                await supervisor.stop_all()
    finally:
        for sink in rt.sinks if rt is not None else built:
            with contextlib.suppress(Exception):
                await sink.aclose()
        await store.aclose()


async def _flush_loop(writer: _OutboxWriter, clock: Clock) -> None:
    while True:
        await asyncio.sleep(5.0)
        writer.flush()


async def _drain(rt: Runtime, mine: Mine | None) -> None:
    """Deliver what is in the outbox before the process ends, within a few seconds."""
    # Let queued writes (events reported just now) reach the outbox first.
    with contextlib.suppress(Exception):
        await rt.store.call(rt.store.sync.outbox_end)
    if mine is not None:
        await mine.drain(DRAIN_S)
    await asyncio.gather(*(d.drain(DRAIN_S) for d in rt.deliveries))
