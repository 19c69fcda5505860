"""Discovery for `[[watches]]`: new runs of a watched workflow become runs in the store.

It reads no list of its own: the follower's read of the product's newest runs (products.py)
shows every new run of every workflow of the product, and is read down to the highest number
discovery has seen (so a burst of new runs is never cut at one page). A run that could be one of
our own starts whose outcome is still unknown is held back (the starter may adopt it); every
other new run is recorded with `origin: "watch"`, which writes its `build.created`. Runs that
existed before the first look at a workflow are history and are not reported.

Build numbers grow per product, so after a look every watched workflow's cursor moves to the
product's highest number: the next look need not page further down than that.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, datetime

from xcloudd.asyncstore import AsyncStore
from xcloudd.clock import Clock
from xcloudd.products import Listing
from xcloudd.starter import could_be_pending
from xcloudd.store import NewRun


class Discovery:
    def __init__(self, store: AsyncStore, clock: Clock) -> None:
        self._store = store
        self._db = store.sync
        self._clock = clock

    async def floor(self, watched: Collection[str]) -> tuple[dict[str, int], int | None]:
        """The watched workflows' cursors, and the number a read must reach down to."""
        cursors = await self._store.call(self._db.cursors, list(watched))
        return cursors, min(cursors.values(), default=None)

    async def take(
        self,
        product_id: str,
        watched: Collection[str],
        cursors: Mapping[str, int],
        listing: Listing,
    ) -> tuple[list[NewRun], list[tuple[str, int]]]:
        """The new runs of watched workflows in `listing`, and the cursors to move; both are
        written by the caller, in the transaction of the whole look."""
        if not watched:
            return [], []
        # An empty product: its first run, when it comes, is new.
        top = listing.top if listing.top is not None else 0
        candidates = [r for r in listing.runs.values() if r.workflow_id in watched]
        known = await self._store.call(self._db.known_runs, [r.id for r in candidates])
        now = datetime.fromtimestamp(self._clock.time(), tz=UTC)
        new: list[NewRun] = []
        moves: list[tuple[str, int]] = []
        for workflow_id in watched:
            highest = cursors.get(workflow_id)
            if highest is None:
                moves.append((workflow_id, top))
                continue
            windows = await self._store.call(self._db.pending_windows, workflow_id)
            ours = could_be_pending(windows, now)
            held_back: list[int] = []
            mine = sorted(
                (r for r in candidates if r.workflow_id == workflow_id),
                key=lambda r: r.number or 0,
            )
            for run in mine:
                number = run.number or 0
                if number <= highest or run.id in known:
                    continue
                if ours(run):
                    held_back.append(number)
                    continue
                new.append(
                    NewRun(
                        run_id=run.id,
                        number=run.number,
                        workflow_id=workflow_id,
                        job=None,
                        origin="watch",
                        created_at=run.created,
                        start_reason=run.start_reason,
                        progress=run.progress,
                        product_id=product_id,
                    )
                )
            mark = top if not held_back else min(top, min(held_back) - 1)
            if mark > highest:
                moves.append((workflow_id, mark))
        return new, moves
