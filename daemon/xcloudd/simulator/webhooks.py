"""Xcode Cloud's webhooks, simulated: Apple-shaped payloads POSTed to a URL for each run's
BUILD_CREATED, BUILD_STARTED and BUILD_COMPLETED, after a delay and with a seeded loss rate.

A run never changes after creation (runs.py), so the instants of its three events are known when
it is created: the sender queues them then, and a background task sleeps on the simulator's
clock until the next one is due (`delay_s` after the transition). On a FakeClock, whose sleep
moves time itself, that sleep moves the clock to the next delivery; on a stepping clock it is
one more instant to stop at. While a POST is on the wire the task keeps a short sleep on the
clock, so virtual time moves in small steps until the receiver has answered.

Deliveries happen one after another on the sender's own aiohttp session, never inside a
request handler; failures (connection refused, timeouts, any status) are recorded, counted and
otherwise ignored, as Apple would only retry them. A SKIPPED run never starts, so it has no
BUILD_STARTED. Events whose transition came before `configure` are not sent.

Admin API (admin.py): POST /_sim/webhooks {"url", "delay_s"?, "loss"?, "seed"?} starts (or
restarts, with the records cleared) the sender; GET /_sim/webhooks reports what was sent, lost
and failed; DELETE /_sim/webhooks stops it (the records stay until the next POST).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import random
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from yarl import URL

from xcloudd.simulator.resources import Renderer, Resource, iso
from xcloudd.simulator.runs import BuildRun

if TYPE_CHECKING:
    from xcloudd.simulator.core import Simulator

EVENT_TYPES = ("BUILD_CREATED", "BUILD_STARTED", "BUILD_COMPLETED")
# Virtual time a delivery in flight lets pass per step, and the real time between steps.
HOLD_S = 0.05
HOLD_REAL_S = 0.001
DELIVERY_TIMEOUT_S = 5.0
RECORDS_KEPT = 10_000
# The attributes Apple's webhook payload documents for a workflow.
_WORKFLOW_FIELDS = ("name", "description", "lastModifiedDate", "isEnabled", "isLockedForEditing")


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    delay_s: float = 0.0
    loss: float = 0.0
    seed: int = 0

    @classmethod
    def from_dict(cls, body: dict[str, Any], default_seed: int) -> WebhookSettings:
        """Checked admin input; ValueError names the problem."""
        unknown = set(body) - {"url", "delay_s", "loss", "seed"}
        if unknown:
            raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
        url = body.get("url")
        if not isinstance(url, str):
            raise ValueError("url is required (a string)")
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("url must be an http:// or https:// URL")
        delay = body.get("delay_s", 0.0)
        loss = body.get("loss", 0.0)
        seed = body.get("seed", default_seed)
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise ValueError("delay_s must be a number of seconds >= 0")
        if isinstance(loss, bool) or not isinstance(loss, int | float) or not 0 <= loss <= 1:
            raise ValueError("loss must be a number from 0 to 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError("seed must be an integer")
        return cls(url=url, delay_s=float(delay), loss=float(loss), seed=seed)


@dataclass(frozen=True, order=True)
class _Due:
    due: float  # when to send: the transition plus the delay
    seq: int
    at: float  # the transition
    event_type: str
    run_id: str


def _bare(resource: Resource) -> Resource:
    """A resource as the webhook carries it: type, id and attributes, no links."""
    return {k: resource[k] for k in ("type", "id", "attributes") if k in resource}


def app_id(product_id: str) -> str:
    """A stable numeric App Store app id for a product (Apple's app ids are digits)."""
    digest = hashlib.sha256(product_id.encode()).digest()
    return str(1_000_000_000 + int.from_bytes(digest[:4], "big"))


def webhook_payload(sim: Simulator, run: BuildRun, event_type: str, at: float) -> dict[str, Any]:
    """Apple's webhook payload for `run` as it stood at `at` (the transition's instant)."""
    s = sim.scenario
    r = Renderer(s, base="https://api.appstoreconnect.apple.com", now=at, fields={})
    out: dict[str, Any] = {
        "webhook": {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"xcloudd-simulator/{run.product_id}")),
            "name": "xcloudd simulator",
            # Apple also names the URL here; left out, since it carries the receiver's secret.
        },
        "metadata": {
            "type": "metadata",
            "attributes": {"createdDate": iso(at), "eventType": event_type},
        },
        "app": {"id": app_id(run.product_id), "type": "apps"},
    }
    workflow = s.workflow(run.workflow_id)
    if workflow is not None:
        rendered = _bare(r.workflow(workflow))
        attributes = rendered.get("attributes", {})
        rendered["attributes"] = {k: attributes.get(k) for k in _WORKFLOW_FIELDS}
        out["ciWorkflow"] = rendered
    product = s.product(run.product_id)
    if product is not None:
        out["ciProduct"] = _bare(r.product(product))
    out["ciBuildRun"] = _bare(r.build_run(run))
    out["ciBuildActions"] = [_bare(r.build_action(run, i)) for i in range(len(run.actions))]
    out["scmProvider"] = {
        "type": "scmProviders",
        "attributes": {
            "scmProviderType": {"kind": "GITHUB", "displayName": "GitHub", "isOnPremise": False}
        },
    }
    repo = s.repository(workflow.repository_id) if workflow is not None else None
    if repo is not None:
        out["scmRepository"] = _bare(r.repository(repo))
    ref = s.git_reference(run.source_ref_id) if run.source_ref_id else None
    if ref is not None:
        out["scmGitReference"] = _bare(r.git_reference(ref))
    pull = s.pull_request(run.pull_request_id) if run.pull_request_id else None
    if pull is not None:
        out["scmPullRequest"] = _bare(r.pull_request(pull))
    return out


def transitions(run: BuildRun) -> list[tuple[str, float]]:
    """The run's webhook events and their instants."""
    started = run.created_at + run.pending_s
    if run.outcome == "SKIPPED":
        return [("BUILD_CREATED", run.created_at), ("BUILD_COMPLETED", started)]
    return [
        ("BUILD_CREATED", run.created_at),
        ("BUILD_STARTED", started),
        ("BUILD_COMPLETED", started + run.running_s),
    ]


class WebhookSender:
    """One simulator's webhook deliveries. `configure` needs a running event loop."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self.settings: WebhookSettings | None = None
        self._since = 0.0
        self._queue: list[_Due] = []
        self._seq = itertools.count()
        self._rng = random.Random(0)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.sent: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        self.lost: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        self.failed = 0

    @property
    def active(self) -> bool:
        return self._task is not None

    async def configure(self, settings: WebhookSettings) -> None:
        """Start sending with `settings` (replacing any earlier ones, records cleared)."""
        await self.stop()
        self.settings = settings
        self._rng = random.Random(settings.seed)
        self._since = self._sim.clock.time()
        self.sent.clear()
        self.lost.clear()
        self.failed = 0
        self._queue = []
        for run in self._sim.runs.all():
            self._enqueue(run)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_S)
        )
        self._task = asyncio.create_task(self._loop(), name="simulator webhooks")

    async def stop(self) -> None:
        """Stop sending; what was not sent yet is dropped, the records stay."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        self._queue = []

    def run_created(self, run: BuildRun) -> None:
        """Called by the simulator for each new run."""
        if self._task is not None:
            self._enqueue(run)

    def _enqueue(self, run: BuildRun) -> None:
        assert self.settings is not None
        for event_type, at in transitions(run):
            if at >= self._since:
                due = _Due(at + self.settings.delay_s, next(self._seq), at, event_type, run.id)
                heapq.heappush(self._queue, due)
        self._changed.set()

    def report(self) -> dict[str, Any]:
        s = self.settings
        target = None if s is None else str(URL(s.url).origin())  # never the path: a secret
        return {
            "active": self.active,
            "target": target,
            "delay_s": None if s is None else s.delay_s,
            "loss": None if s is None else s.loss,
            "seed": None if s is None else s.seed,
            "pending": len(self._queue),
            "sent": list(self.sent),
            "lost": list(self.lost),
            "failed": self.failed,
        }

    # -- the background task ---------------------------------------------------------------

    async def _loop(self) -> None:
        clock = self._sim.clock
        while True:
            if self._queue and self._queue[0].due <= clock.time():
                await self._dispatch(heapq.heappop(self._queue))
                continue
            self._changed.clear()
            waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._changed.wait())}
            if self._queue:
                waiters.add(asyncio.ensure_future(clock.sleep_until(self._queue[0].due)))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def _dispatch(self, due: _Due) -> None:
        run = self._sim.runs.get(due.run_id)
        settings = self.settings
        if run is None or settings is None:
            return
        record: dict[str, Any] = {
            "event_type": due.event_type,
            "run_id": run.id,
            "workflow_id": run.workflow_id,
            "product_id": run.product_id,
            "at": due.at,
            "due": due.due,
            "time": self._sim.clock.time(),
        }
        if self._rng.random() < settings.loss:
            self.lost.append(record)
            return
        body = orjson.dumps(webhook_payload(self._sim, run, due.event_type, due.at))
        post = asyncio.ensure_future(self._post(settings.url, body))
        try:
            await self._hold_clock(post)
        finally:
            post.cancel()  # stopped meanwhile: the POST goes too (no-op once it is done)
        status, error = post.result()
        record |= {"status": status, "error": error}
        if error is not None or status is None or not 200 <= status < 300:
            self.failed += 1
        self.sent.append(record)

    async def _post(self, url: str, body: bytes) -> tuple[int | None, str | None]:
        assert self._session is not None
        try:
            async with self._session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                return resp.status, None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return None, type(exc).__name__

    async def _hold_clock(self, post: asyncio.Future[Any]) -> None:
        """Until `post` is done, keep a short sleep on the simulator's clock, so a clock that
        moves from sleeper to sleeper moves by HOLD_S at a time while the POST is on the wire."""
        clock = self._sim.clock
        while not post.done():
            tick = asyncio.ensure_future(clock.sleep(HOLD_S))
            try:
                # A moment of real time first: a clock whose sleep moves it at once would
                # otherwise race ahead while the socket does its work.
                await asyncio.wait({post}, timeout=HOLD_REAL_S)
                if not post.done():
                    await asyncio.wait({post, tick}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                tick.cancel()
