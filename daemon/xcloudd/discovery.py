"""Discovery for `[[watches]]`: new runs of a watched workflow become runs in the store.

Each round reads the workflow's runs newest first, page by page, down to the highest number
already seen (so a burst of new runs is never cut at one page). A run that could be one of our
own starts whose outcome is still unknown is held back (the starter may adopt it); every other
new run is recorded with `origin: "watch"`, which writes its `build.created`. Runs that existed
before the first look are history and are not reported.
"""

from __future__ import annotations

from datetime import UTC, datetime

from xcloudd.api import AscClient
from xcloudd.asyncstore import AsyncStore
from xcloudd.clock import Clock
from xcloudd.resources import RUN_FIELDS, BuildRun
from xcloudd.starter import could_be_pending, runs_of
from xcloudd.store import NewRun

PAGE = 200
MAX_PAGES = 10


class Discovery:
    def __init__(self, store: AsyncStore, client: AscClient, clock: Clock) -> None:
        self._store = store
        self._db = store.sync
        self._client = client
        self._clock = clock

    async def look(self, workflow_id: str) -> int:
        """One round for one workflow; the number of new runs recorded."""
        highest = await self._store.call(self._db.cursor, workflow_id)
        runs = await self._newer_than(workflow_id, highest)
        if highest is None:
            top = max((r.number or 0 for r in runs), default=0)
            await self._store.call(self._db.set_cursor, workflow_id, top)
            return 0
        now = datetime.fromtimestamp(self._clock.time(), tz=UTC)
        windows = await self._store.call(self._db.pending_windows, workflow_id)
        ours = could_be_pending(windows, now)
        known = await self._store.call(self._db.known_runs, [r.id for r in runs])
        held_back: list[int] = []
        recorded = 0
        for run in sorted(runs, key=lambda r: r.number or 0):
            number = run.number or 0
            if number <= highest or run.id in known:
                continue
            if ours(run):
                held_back.append(number)
                continue
            new = await self._store.call(
                self._db.record_run,
                NewRun(
                    run_id=run.id,
                    number=run.number,
                    workflow_id=workflow_id,
                    job=None,
                    origin="watch",
                    created_at=run.created,
                    start_reason=run.start_reason,
                    progress=run.progress,
                ),
                intent_id=None,
                reconciled=False,
            )
            recorded += int(new)
        top = max((r.number or 0 for r in runs), default=highest)
        if held_back:
            top = min(top, min(held_back) - 1)
        if top > highest:
            await self._store.call(self._db.set_cursor, workflow_id, top)
        return recorded

    async def _newer_than(self, workflow_id: str, highest: int | None) -> list[BuildRun]:
        page = await self._client.get(
            f"/v1/ciWorkflows/{workflow_id}/buildRuns",
            {
                "sort": "-number",
                "limit": str(PAGE if highest is not None else 1),
                "fields[ciBuildRuns]": RUN_FIELDS,
            },
        )
        runs: list[BuildRun] = []
        for _ in range(MAX_PAGES):
            batch = runs_of(page)
            runs.extend(batch)
            links = page.get("links")
            nxt = links.get("next") if isinstance(links, dict) else None
            lowest = min((r.number or 0 for r in batch), default=0)
            if highest is None or not isinstance(nxt, str) or not nxt or lowest <= highest:
                break
            page = await self._client.get(nxt)
        return runs
