"""Following build runs: every run in the store that is not finished is watched until
`executionProgress` is COMPLETE, the API says it is gone, or `give_up_after` passes.

Runs are looked at per product. One `GET /v1/ciProducts/{id}/buildRuns?sort=-number` answers for
every run of the product among its newest (products.py), so N runs in flight in P products cost
P requests per look, not N; the same read shows discovery the new runs of watched workflows. A
run the list cannot answer for (of a product not known yet, older than it is worth paging to,
missing from the list) gets a GET of its own, and so does a run a webhook hints at: the hint is
confirmed by one authenticated GET of the run's actions with the run included, which for a
completed run is also the read of its actions. `/actions` is read once per completed run.

A product is looked at when the run of it that most needs it wants to be (cadence.py: sparse
while no transition is likely, dense around the expected one), and what one look learns is
written in one transaction.

The follower learns of runs from the store (the starter and discovery record them; a CLI start
on the same store too). A look that fails for any reason, transient or not understood (a
malformed answer, a key that stopped working, a full disk), is counted, reported once per
streak, and tried again with backoff; it never ends a watch nor the loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from xcloudd import failpoints
from xcloudd.api import ApiError, ApiUnavailable, AscClient, AuthFailed, BadResponse, NotFound
from xcloudd.asyncstore import AsyncStore
from xcloudd.cadence import Cadence, History, Wait
from xcloudd.clock import Clock, sleep_or, wait_first
from xcloudd.config import PollingConfig
from xcloudd.discovery import Discovery
from xcloudd.errors import XcloudError
from xcloudd.events import RESULTS, BuildRef, Event, EventFactory, EventName
from xcloudd.notify import Heartbeats
from xcloudd.products import MAX_PAGES, ContextRefused, Listing, read_product
from xcloudd.resources import RUN_CONTEXT, RUN_FIELDS, BuildRun, run_context
from xcloudd.store import Ended, NewRun, RunRecord, Seen, Span, parse_iso

ACTION_FIELDS = "name,actionType,executionProgress,completionStatus,isRequiredToPass,issueCounts"
MAX_CONCURRENT_POLLS = 16
# Runs started elsewhere on this store (a CLI start) are noticed within this long.
RESCAN_S = 30.0
# A poll due within this long is due now (sleeping a few nanoseconds is only rounding noise).
POLL_SLACK_S = 0.001
# Polls may use this share of the request budget; starts, reconciles and /actions the rest.
POLL_SHARE = 0.8
ENDED_KEPT = 10_000

Kind = Literal["product", "run"]


@dataclass(slots=True)
class _Tracked:
    ref: BuildRef
    deadline: float  # wall clock
    created: datetime | None
    started: datetime | None
    progress: str | None
    started_recorded: bool
    product_id: str | None
    context: dict[str, str] = field(default_factory=dict)
    # When it wants to be looked at next (monotonic), by its product's list.
    need: float = 0.0
    # A GET of its own: when (the one heap entry that counts), and whether to confirm a hint.
    single_due: float | None = None
    confirm: bool = False
    polling: bool = False
    repoll: bool = False
    failures: int = 0
    poked: float = float("-inf")  # when a hint last brought a look forward
    hinted: int = 0  # hints taken: one during a look asks for another after it

    @property
    def run_id(self) -> str:
        return self.ref.build_run_id

    def waiting(self, now: float) -> tuple[Wait, float]:
        """What the run waits for, and for how long so far (wall seconds)."""
        if self.started is not None or self.progress == "RUNNING":
            since = self.started or self.created
            return "end", now - since.timestamp() if since else 0.0
        return "start", now - self.created.timestamp() if self.created else 0.0


@dataclass(slots=True)
class _Product:
    id: str
    runs: set[str] = field(default_factory=set)
    watched: set[str] = field(default_factory=set)  # workflow ids discovered through it
    due: float | None = None  # the one heap entry that counts
    discover_at: float = 0.0
    not_before: float = 0.0  # after failures
    polling: bool = False
    failures: int = 0
    poked: float = float("-inf")
    hinted: int = 0
    cost: int = 1  # requests its last look took (pages of the list)


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 3) if a and b else None


class Follower:
    def __init__(
        self,
        store: AsyncStore,
        client: AscClient,
        events: EventFactory,
        clock: Clock,
        polling: PollingConfig,
        *,
        report: Callable[[str, BaseException], None],
        only: Container[str] | None = None,
        rng: random.Random | None = None,
        heartbeats: Heartbeats | None = None,
        discovery: Discovery | None = None,
    ) -> None:
        self._store = store
        self._db = store.sync
        self._client = client
        self._ev = events
        self._clock = clock
        self._polling = polling
        self._report = report
        self._only = only
        self._rng = rng or random.Random()
        self._discovery = discovery or Discovery(store, clock)
        self.history = History()
        self.cadence = Cadence(polling, self.history, self._rng)
        self._runs: dict[str, _Tracked] = {}
        self._products: dict[str, _Product] = {}
        self._workflow_products: dict[str, str] = {}
        self._watches: dict[str, int] = {}  # watched workflow -> how many watches name it
        # Runs whose watch ended lately (a late webhook about one is no news).
        self._ended: dict[str, None] = {}
        self._due: list[tuple[float, int, Kind, str]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_POLLS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._rescan = 0.0
        self._new_runs = asyncio.Event()
        self._heartbeats = heartbeats or Heartbeats(clock)
        self._with_context = True
        self._loaded = False
        # Set once the store's unfinished runs are taken up (start-up: "runs resumed").
        self.resumed = asyncio.Event()
        store.on_written(self._on_written)

    def _on_written(self, rows: list[tuple[str, str]]) -> None:
        if any(name == "build.created" for _, name in rows):
            self._new_runs.set()
            self._wake.set()

    def configure(self, polling: PollingConfig) -> None:
        """New polling settings (a reload): they apply from each run's next look."""
        self._polling = polling
        self.cadence.polling = polling

    # --- what to look at ---------------------------------------------------------------------

    def watch(self, workflow_id: str, product_id: str) -> None:
        """Discover new runs of this workflow, in its product's looks (until as many unwatch
        calls: two watches in the config may name one workflow, by name and by id)."""
        self._watches[workflow_id] = self._watches.get(workflow_id, 0) + 1
        self._workflow_products[workflow_id] = product_id
        product = self._product(product_id)
        if workflow_id not in product.watched:
            product.watched.add(workflow_id)
            product.discover_at = self._clock.monotonic()
            self._plan(product)

    def unwatch(self, workflow_id: str) -> None:
        left = self._watches.pop(workflow_id, 0) - 1
        if left > 0:
            self._watches[workflow_id] = left
            return
        for product in self._products.values():
            product.watched.discard(workflow_id)
        self._forget_idle()

    def hint(self, run_id: str, workflow_id: str | None, event_type: str = "") -> bool:
        """A webhook says this run changed (the payload proves nothing). A followed run is
        confirmed by one GET: for BUILD_STARTED its product's list (which also serves every
        other run of the product, and counts as the product's regular look), otherwise the
        run's own actions with the run included (for a completed run, also the read of its
        actions). News the follower has already seen costs nothing, and a watched workflow's
        product is looked at for a run it does not know. A flood of hints does not spend the
        key's budget: one look per run (or product) per `min_interval`. False when the hint
        concerns nothing followed or watched."""
        now = self._clock.monotonic()
        self.cadence.webhook(now)
        tracked = self._runs.get(run_id)
        if tracked is not None:
            if event_type == "BUILD_CREATED" or (
                event_type == "BUILD_STARTED" and tracked.started_recorded
            ):
                return True  # no news
            if event_type == "BUILD_STARTED" and tracked.product_id is not None:
                self._look_soon(tracked, now)
                return True
            return self.poke(run_id)
        if run_id in self._ended:
            return True  # its watch ended here already
        product_id = self._workflow_products.get(workflow_id or "")
        product = self._products.get(product_id or "")
        if product is None or workflow_id not in product.watched:
            return False
        if product.poked < now:
            at = max(now, product.poked + self._polling.min_interval)
            product.poked = at
            product.hinted += 1
            product.discover_at = min(product.discover_at, at)
            self._plan(product)
        return True

    def _look_soon(self, tracked: _Tracked, now: float) -> None:
        """Bring the look at the run's product forward (at most once per `min_interval`)."""
        if tracked.poked >= now or tracked.product_id is None:
            return
        at = max(now, tracked.poked + self._polling.min_interval)
        tracked.poked = at
        tracked.hinted += 1
        if tracked.polling:
            return  # its own GET is under way: when it ends, it plans the look (see _poll)
        if tracked.single_due is not None:
            self._single(tracked, at)  # it is out of its product's looks: its own GET, sooner
            return
        tracked.need = min(tracked.need, at)
        product = self._products.get(tracked.product_id)
        if product is not None:
            self._plan(product, at)

    def poke(self, run_id: str) -> bool:
        """Confirm this run now (a webhook hint); False if it is not being followed. A hint
        within `min_interval` of the last one it brought forward moves the look to the end of
        that time, not sooner (so a build's COMPLETED right after its STARTED is still seen)."""
        tracked = self._runs.get(run_id)
        if tracked is None:
            return False
        now = self._clock.monotonic()
        if tracked.poked >= now:
            return True  # a look brought forward by an earlier hint is still to come
        at = max(now, tracked.poked + self._polling.min_interval)
        tracked.poked = at
        tracked.hinted += 1
        tracked.confirm = True
        self._single(tracked, at)
        return True

    def _product(self, product_id: str) -> _Product:
        product = self._products.get(product_id)
        if product is None:
            product = self._products[product_id] = _Product(product_id)
            self._set_floor()
        return product

    def _forget_idle(self) -> None:
        for pid in [p.id for p in self._products.values() if not p.runs and not p.watched]:
            del self._products[pid]
        self._set_floor()

    def _set_floor(self) -> None:
        """The shortest gap between looks at one product that the budget pays for, with every
        product looked at that often (a look costs a request per page it reads)."""
        limit = self._client.budget.rate_limit.limit
        per_second = POLL_SHARE * self._polling.budget * limit / 3600.0
        cost = sum(p.cost for p in self._products.values())
        self.cadence.floor = cost / per_second if per_second > 0 else 0.0

    def _push(self, kind: Kind, key: str, at: float) -> None:
        heapq.heappush(self._due, (at, next(self._seq), kind, key))
        self._wake.set()

    def _plan(self, product: _Product, need: float | None = None) -> None:
        """Its next look: when the neediest of its runs (or discovery) wants one. With `need`
        (one run's), only sooner than planned matters: no pass over every run."""
        if need is not None and product.due is not None:
            due = max(need, product.not_before)
            if due < product.due:
                product.due = due
                self._push("product", product.id, due)
            return
        if product.polling:
            return  # the look under way plans the next one when it ends
        needs = [
            t.need
            for t in (self._runs.get(r) for r in product.runs)
            if t is not None and t.single_due is None and not t.polling
        ]
        if product.watched:
            needs.append(product.discover_at)
        if not needs:
            product.due = None
            return
        due = max(min(needs), product.not_before)
        if product.due != due:
            product.due = due
            self._push("product", product.id, due)

    def _single(self, tracked: _Tracked, at: float) -> None:
        if tracked.single_due is not None and tracked.single_due <= at and not tracked.polling:
            return
        tracked.single_due = at
        self._push("run", tracked.run_id, at)

    def _gap(self, tracked: _Tracked) -> float:
        wait, waited = tracked.waiting(self._clock.time())
        workflow = tracked.ref.workflow_id or ""
        return self.cadence.gap(workflow, wait, waited, self._clock.monotonic())

    # --- taking up runs ----------------------------------------------------------------------

    async def _scan(self) -> None:
        """Take up the store's unfinished runs that are not followed yet."""
        self._rescan = self._clock.monotonic() + RESCAN_S
        with self._heartbeats.busy("follower"):
            await failpoints.reach("follower.scan")
            if not self._loaded:
                spans = await self._store.call(self._db.spans)
                self.history.load(spans)
                known = await self._store.call(self._db.workflow_products)
                self._workflow_products = {**known, **self._workflow_products}
                self._loaded = True
            records = await self._store.call(self._db.runs_in_flight)
        for rec in records:
            wanted = self._only is None or rec.run_id in self._only
            if rec.run_id in self._runs or not wanted:
                continue
            self._track(rec)
        if not self.resumed.is_set():
            self._spread()
        self.resumed.set()

    def _spread(self) -> None:
        """After a restart, the first looks at the products spread over their first gap
        instead of all going out at once (and bunching again every interval after)."""
        now = self._clock.monotonic()
        for product in self._products.values():
            due = product.due
            if due is not None and due > now:
                product.due = now + self._rng.uniform(0.0, 1.0) * (due - now)
                self._push("product", product.id, product.due)

    def _track(self, rec: RunRecord) -> None:
        born = parse_iso(rec.created_at or rec.first_seen)
        product_id = rec.product_id or self._workflow_products.get(rec.workflow_id)
        tracked = _Tracked(
            ref=rec.ref,
            deadline=born.timestamp() + self._polling.give_up_after,
            created=parse_iso(rec.created_at) if rec.created_at else None,
            started=parse_iso(rec.started_at) if rec.started_at else None,
            progress=rec.progress,
            started_recorded=rec.started_emitted,
            product_id=product_id,
        )
        self._runs[rec.run_id] = tracked
        now = self._clock.monotonic()
        if product_id is None:
            # Which product it belongs to is learnt from a GET of the run itself.
            self._single(tracked, now)
            return
        # A run just read from an answer needs no look at once; one of unknown state does.
        known = rec.progress in ("PENDING", "RUNNING")
        tracked.need = now + (self._gap(tracked) if known else 0.0)
        self._join(tracked, product_id)

    def _join(self, tracked: _Tracked, product_id: str) -> None:
        tracked.product_id = product_id
        self._workflow_products.setdefault(tracked.ref.workflow_id, product_id)
        product = self._product(product_id)
        product.runs.add(tracked.run_id)
        self._plan(product, tracked.need)

    def _drop(self, run_id: str) -> None:
        """The run's watch ended."""
        self._ended[run_id] = None
        if len(self._ended) > ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
        tracked = self._runs.pop(run_id, None)
        if tracked is not None and tracked.product_id is not None:
            product = self._products.get(tracked.product_id)
            if product is not None:
                product.runs.discard(run_id)
                if not product.runs and not product.watched:
                    self._forget_idle()

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """The poll loop; runs until cancelled."""
        try:
            while True:
                # Cleared before the scan: news that arrives during it wakes the next wait.
                self._wake.clear()
                if self._new_runs.is_set() or self._clock.monotonic() >= self._rescan:
                    self._new_runs.clear()
                    await self._scan()
                if not self._due:
                    await wait_first(RESCAN_S, self._wake)
                    continue
                due, _, kind, key = self._due[0]
                delay = due - self._clock.monotonic()
                if delay > POLL_SLACK_S:
                    await sleep_or(self._clock, delay, self._wake)
                    continue
                heapq.heappop(self._due)
                work = self._take(kind, key, due)
                if work is None:
                    continue
                await self._slots.acquire()
                task = asyncio.create_task(self._guarded(work))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _take(self, kind: Kind, key: str, due: float) -> Callable[[], Any] | None:
        """The look a popped heap entry stands for, if it still counts."""
        if kind == "product":
            product = self._products.get(key)
            if product is None or product.due != due:
                return None
            product.due = None
            if product.polling:
                return None  # the look under way plans the next one when it ends
            product.polling = True
            return lambda: self._look(product)
        tracked = self._runs.get(key)
        if tracked is None or tracked.single_due != due:
            return None
        tracked.single_due = None
        if tracked.polling:
            tracked.repoll = True
            return None
        tracked.polling = True
        return lambda: self._poll(tracked)

    async def _guarded(self, work: Callable[[], Any]) -> None:
        try:
            await work()
        except Exception as exc:
            # A look handles its own failures; this is a bug's last line of defence, so that
            # no look dies unobserved.
            self._report("follower", exc)
        finally:
            self._slots.release()

    # --- a look at a product -----------------------------------------------------------------

    async def _look(self, product: _Product) -> None:
        began = self._clock.monotonic()
        self._set_floor()  # the key's limit may have changed (X-Rate-Limit)
        runs = [self._runs[r] for r in product.runs if r in self._runs]
        hinted = {t.run_id: t.hinted for t in runs}
        try:
            try:
                await self._look_once(product, runs, product.hinted)
                product.failures = 0
                product.not_before = 0.0
            except (AuthFailed, ApiUnavailable, BadResponse) as exc:
                self._product_failed(product, exc, report=isinstance(exc, BadResponse))
            except ApiError as exc:
                if exc.status in (408, 409, 429) or exc.status >= 500:
                    self._product_failed(product, exc, report=False)
                else:
                    # The list is refused (the product is gone?): each run answers for itself.
                    self._product_failed(product, exc, report=True)
                    for tracked in runs:
                        self._single(tracked, self._clock.monotonic())
            except Exception as exc:
                # Whatever went wrong (a store that cannot be written included), the runs stay
                # followed: they are looked at again, later.
                self._product_failed(product, exc, report=True)
            try:
                await self._expire([t for t in runs if t.run_id in self._runs])
            except Exception as exc:
                self._product_failed(product, exc, report=True)
        finally:
            product.polling = False
            for tracked in runs:
                if tracked.run_id in self._runs:
                    tracked.need = began + self._gap(tracked)
                    if tracked.hinted != hinted[tracked.run_id]:
                        # A hint during this look (after its read, maybe) asks for another.
                        tracked.need = min(tracked.need, tracked.poked)
            self._plan(product)

    def _product_failed(self, product: _Product, exc: BaseException, *, report: bool) -> None:
        product.failures += 1
        if report and product.failures == 1:
            self._report(f"follow product {product.id}", exc)
        product.not_before = self._clock.monotonic() + self._retry_in(product.failures)

    def _retry_in(self, failures: int) -> float:
        """After `failures` failed looks in a row: from `interval`, doubling up to
        `max_interval`, with jitter (so a recovering API is not hit by every look at once)."""
        p = self._polling
        base = max(p.min_interval, min(p.interval, p.max_interval))
        backoff = min(p.max_interval, base * 2.0 ** min(failures - 1, 10))
        return backoff * self._rng.uniform(0.5, 1.0)

    async def _look_once(self, product: _Product, runs: list[_Tracked], hinted: int) -> None:
        cursors: dict[str, int] = {}
        discover_from: int | None = None
        watched = set(product.watched)
        if watched:
            cursors, discover_from = await self._discovery.floor(watched)
        followed = [
            t.ref.build_number for t in runs if t.ref.build_number is not None and not t.polling
        ]
        listing = await self._read(product.id, followed, discover_from)
        product.cost = listing.pages
        now = self._clock.monotonic()
        seen: list[Seen] = []
        ended: list[Ended] = []
        done: dict[str, tuple[_Tracked, BuildRun]] = {}
        for tracked in runs:
            if tracked.polling or tracked.run_id not in self._runs:
                continue
            run = listing.runs.get(tracked.run_id)
            if run is None:
                # Older than the list reached, or missing from it: a GET of its own tells,
                # when the run itself wants a look (another run may have asked for this one).
                self._single(tracked, max(now, tracked.need))
                continue
            tracked.context = listing.contexts.get(run.id, tracked.context)
            if run.progress == "COMPLETE":
                done[run.id] = (tracked, run)
            elif (news := self._news(tracked, run)) is not None:
                seen.append(news)
        actions = await asyncio.gather(*(self._actions(r, product.id) for r in done))
        for (tracked, run), acts in zip(done.values(), actions, strict=True):
            ended.append(self._completed(tracked, run, acts))
        new: list[NewRun] = []
        moves: list[tuple[str, int]] = []
        if watched:
            if listing.short_of(discover_from):
                # Said once per streak; the cursor moves on all the same, or every look would
                # page as deep again and never get further.
                self._report(
                    f"discover {product.id}",
                    XcloudError(
                        f"runs of product {product.id} between #{discover_from} and"
                        f" #{listing.lowest} were not looked at: more than {MAX_PAGES} pages of"
                        " new runs since the last look; new runs of watched workflows among"
                        " them are not reported"
                    ),
                )
            new, moves = await self._discovery.take(product.id, watched, cursors, listing)
            product.discover_at = now + self.cadence.discovery_gap(now, watched)
            if product.hinted != hinted:  # a hint during this look asks for another
                product.discover_at = min(product.discover_at, product.poked)
        finished = await self._store.call(
            self._db.write_round, seen=seen, ended=ended, new=new, cursors=moves
        )
        self._settle(seen, ended, finished, done)

    async def _read(
        self, product_id: str, followed: list[int], discover_from: int | None
    ) -> Listing:
        while True:
            try:
                return await read_product(
                    self._client,
                    product_id,
                    followed=followed,
                    discover_from=discover_from,
                    context=self._with_context,
                )
            except ContextRefused:
                # The names are a nicety: an API that refuses `include` still gets followed.
                self._with_context = False

    def _settle(
        self,
        seen: Iterable[Seen],
        ended: Iterable[Ended],
        finished: set[str],
        runs: dict[str, tuple[_Tracked, BuildRun]],
    ) -> None:
        """Take what was written into the runs followed."""
        for s in seen:
            tracked = self._runs.get(s.run_id)
            if tracked is not None:
                tracked.progress = s.progress
                tracked.started = tracked.started or s.started_at
                tracked.started_recorded = tracked.started_recorded or s.started is not None
                tracked.failures = 0
        for e in ended:
            if e.run_id in finished and e.run_id in runs:
                tracked, run = runs[e.run_id]
                span = Span(_seconds(run.created, run.started), _seconds(run.started, run.finished))
                self.history.learn(tracked.ref.workflow_id, span)
            self._drop(e.run_id)

    # --- a run of its own --------------------------------------------------------------------

    async def _poll(self, tracked: _Tracked) -> None:
        run_id = tracked.run_id
        hinted = tracked.hinted
        confirm, tracked.confirm = tracked.confirm, False
        try:
            try:
                await self._attempt(tracked, confirm)
                if run_id in self._runs:
                    await self._expire([tracked])
            except Exception as exc:
                # Whatever went wrong (a store that cannot be written included), the run stays
                # followed: it is looked at again, later.
                self._failed(tracked, exc, report=True)
        finally:
            tracked.polling = False
        if run_id not in self._runs:
            return
        now = self._clock.monotonic()
        if tracked.repoll:
            tracked.repoll = False
            self._single(tracked, now)
        elif tracked.single_due is not None:
            pass  # a hint during this GET planned the next one
        elif tracked.hinted != hinted and (tracked.failures or tracked.product_id is None):
            self._single(tracked, tracked.poked)  # a hint during this GET asks for another
        elif tracked.failures:
            self._single(tracked, now + self._retry_in(tracked.failures))
        elif tracked.product_id is None:  # the API does not say: this run is polled alone
            self._single(tracked, now + self._gap(tracked))
        else:
            tracked.need = now + self._gap(tracked)
            if tracked.hinted != hinted:  # a hint during this GET asks for another look
                tracked.need = min(tracked.need, tracked.poked)
            self._join(tracked, tracked.product_id)

    async def _attempt(self, tracked: _Tracked, confirm: bool) -> None:
        """One GET of the run; its watch may end (on record)."""
        try:
            await self._poll_once(tracked, confirm)
            return
        except NotFound:
            pass
        except AuthFailed as exc:
            self._failed(tracked, exc, report=False)  # the client reported api.auth_failed
            return
        except ApiError as exc:
            if exc.status in (408, 409, 429) or exc.status >= 500:
                self._failed(tracked, exc, report=False)
                return
            await self._end(tracked, f"http_{exc.status}")
            return
        except (ApiUnavailable, BadResponse) as exc:
            # Transient trouble only delays this run; give_up_after still bounds the watch.
            self._failed(tracked, exc, report=isinstance(exc, BadResponse))
            return
        await self._end(tracked, "not_found")

    def _failed(self, tracked: _Tracked, exc: BaseException, *, report: bool) -> None:
        tracked.failures += 1
        if report and tracked.failures == 1:
            self._report(f"follow {tracked.run_id}", exc)

    async def _poll_once(self, tracked: _Tracked, confirm: bool) -> None:
        run_id = tracked.run_id
        actions: list[dict[str, Any]] | None = None
        run: BuildRun | None = None
        if confirm:
            run, actions = await self._confirm(run_id, tracked.product_id)
        if run is None:
            doc = await self._get_run(run_id, tracked.product_id)
            data = doc.get("data")
            if not isinstance(data, dict):
                raise BadResponse(f"App Store Connect sent no build run for {run_id}")
            run = BuildRun.parse(data)
            tracked.context = run_context(doc, data) or tracked.context
        if run.id != run_id:
            raise BadResponse(f"App Store Connect answered for {run.id} when asked for {run_id}")
        learned = run.product_id is not None and tracked.product_id is None
        if learned:
            tracked.product_id = run.product_id
        seen: list[Seen] = []
        ended: list[Ended] = []
        done: dict[str, tuple[_Tracked, BuildRun]] = {}
        if run.progress == "COMPLETE":
            if actions is None:
                actions = await self._actions(run_id, tracked.product_id)
            ended.append(self._completed(tracked, run, actions))
            done[run_id] = (tracked, run)
        else:
            news = self._news(tracked, run)
            if news is None and learned:
                # Nothing new, but the store learns the run's product (for the next start-up).
                news = Seen(run_id, run.number, run.progress, product_id=run.product_id)
            if news is not None:
                seen.append(news)
        finished = await self._store.call(self._db.write_round, seen=seen, ended=ended)
        tracked.failures = 0
        self._settle(seen, ended, finished, done)

    async def _get_run(self, run_id: str, share: str | None) -> dict[str, Any]:
        path = f"/v1/ciBuildRuns/{run_id}"
        if self._with_context:
            try:
                return await self._client.get(
                    path, {"fields[ciBuildRuns]": RUN_FIELDS, **RUN_CONTEXT}, share=share
                )
            except ApiError as exc:
                if exc.status != 400:
                    raise
                self._with_context = False
        return await self._client.get(path, {"fields[ciBuildRuns]": RUN_FIELDS}, share=share)

    async def _confirm(
        self, run_id: str, share: str | None
    ) -> tuple[BuildRun | None, list[dict[str, Any]] | None]:
        """A hint's one GET: the run's actions with the run itself included. (None, None)
        when the answer does not include the run (a run without actions yet)."""
        doc = await self._client.get(
            f"/v1/ciBuildRuns/{run_id}/actions",
            {
                "include": "buildRun",
                "fields[ciBuildRuns]": RUN_FIELDS,
                "fields[ciBuildActions]": ACTION_FIELDS + ",buildRun",
                "limit": "200",
            },
            share=share,
        )
        included = doc.get("included")
        for item in included if isinstance(included, list) else []:
            found = isinstance(item, dict) and item.get("type") == "ciBuildRuns"
            if found and item.get("id") == run_id:
                return BuildRun.parse(item), _parse_actions(doc)
        return None, None

    # --- what a look means -------------------------------------------------------------------

    def _ref(self, tracked: _Tracked, run: BuildRun) -> BuildRef:
        ref = tracked.ref
        if ref.build_number is None and run.number is not None:
            ref = tracked.ref = BuildRef(
                ref.build_run_id, run.number, ref.workflow_id, ref.job, ref.origin
            )
        return ref

    def _started(self, ref: BuildRef, run: BuildRun, created: datetime | None) -> Event:
        return self._ev.make(
            "build.started",
            subject=ref.build_run_id,
            build=ref,
            queued_s=_seconds(created, run.started),
        )

    def _news(self, tracked: _Tracked, run: BuildRun) -> Seen | None:
        """What a run still going has that the store does not have yet."""
        if tracked.progress == "RUNNING" and run.progress == "PENDING":
            return None  # an answer older than one already taken in
        ref = self._ref(tracked, run)
        started = None
        if run.started is not None and not tracked.started_recorded:
            started = self._started(ref, run, run.created or tracked.created)
        if started is None and run.progress == tracked.progress:
            return None
        return Seen(
            run.id,
            run.number,
            run.progress,
            started,
            product_id=run.product_id,
            started_at=run.started,
        )

    def _completed(
        self, tracked: _Tracked, run: BuildRun, actions: list[dict[str, Any]] | None
    ) -> Ended:
        ref = self._ref(tracked, run)
        created = run.created or tracked.created
        events = []
        if run.started is not None:
            events.append(self._started(ref, run, created))
        status = run.completion_status
        commit = run.source_commit or {}
        events.append(
            self._ev.make(
                "build.completed",
                subject=run.id,
                build=ref,
                completion_status=status,
                result=RESULTS.get(status or "", "error"),
                cancel_reason=run.cancel_reason,
                issue_counts=run.issue_counts,
                source_commit=commit.get("commitSha"),
                commit_url=commit.get("webUrl"),
                queued_s=_seconds(created, run.started),
                duration_s=_seconds(run.started, run.finished),
                actions=actions,
                context=tracked.context,
            )
        )
        return Ended(
            run.id,
            "completed",
            events,
            number=run.number,
            progress="COMPLETE",
            completion_status=status,
            started_at=run.started,
            ended_at=run.finished,
        )

    async def _actions(self, run_id: str, share: str | None) -> list[dict[str, Any]] | None:
        """The run's actions for build.completed; the event goes out without them if this fails."""
        try:
            doc = await self._client.get(
                f"/v1/ciBuildRuns/{run_id}/actions",
                {"fields[ciBuildActions]": ACTION_FIELDS, "limit": "200"},
                share=share,
            )
        except (ApiError, ApiUnavailable, BadResponse):
            return None
        return _parse_actions(doc)

    async def _expire(self, runs: list[_Tracked]) -> None:
        now = self._clock.time()
        late = [t for t in runs if now >= t.deadline and t.run_id in self._runs]
        if not late:
            return
        ended = [
            self._ending(
                t,
                "expired",
                "build.watch_expired",
                last_progress=t.progress,
                result="timeout",
                give_up_after_s=self._polling.give_up_after,
            )
            for t in late
        ]
        await self._store.call(self._db.write_round, ended=ended)
        for t in late:
            self._drop(t.run_id)

    async def _end(self, tracked: _Tracked, reason: str) -> None:
        """The API says the run is gone (or refuses to show it): the watch ends, on record."""
        ended = self._ending(
            tracked, reason, "build.watch_ended", reason=reason, last_progress=tracked.progress
        )
        await self._store.call(self._db.write_round, ended=[ended])
        self._drop(tracked.run_id)

    def _ending(self, tracked: _Tracked, end: str, name: EventName, **fields: Any) -> Ended:
        event = self._ev.make(name, subject=tracked.run_id, build=tracked.ref, **fields)
        return Ended(tracked.run_id, end, [event])


def _parse_actions(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    data = doc.get("data")
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict):
            continue
        a = item.get("attributes")
        if not isinstance(a, dict):
            continue
        out.append(
            {
                "name": a.get("name"),
                "action_type": a.get("actionType"),
                "completion_status": a.get("completionStatus"),
                "is_required_to_pass": a.get("isRequiredToPass"),
                "issue_counts": a.get("issueCounts"),
            }
        )
    return out
