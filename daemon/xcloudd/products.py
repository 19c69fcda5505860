"""One read of a product's newest build runs: `GET /v1/ciProducts/{id}/buildRuns?sort=-number`.

Build numbers grow per product, whatever the workflow, so one page answers for every run of the
product that is among its newest 200. Further pages are read only while that is cheaper than a
GET per run still missing (numbers are dense, so how many pages it takes to reach a run is
known), or while discovery needs them to reach the runs it has not seen yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from xcloudd.api import JSON, ApiError, AscClient, BadResponse
from xcloudd.resources import RUN_CONTEXT, RUN_FIELDS, BuildRun, run_context

PAGE = 200
# However it is asked, no read goes deeper than this (12,000 runs: discovery after a long
# absence of a busy product): a server whose `next` links never end must not hold the follower.
MAX_PAGES = 60


@dataclass
class Listing:
    """What one read showed: runs by id (newest first as listed) and their names."""

    runs: dict[str, BuildRun] = field(default_factory=dict)
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)
    top: int | None = None  # the highest build number listed
    lowest: int | None = None  # the lowest build number listed
    complete: bool = False  # the list ended: no run older than `lowest` exists
    pages: int = 0  # requests it took

    def short_of(self, number: int | None) -> bool:
        """Whether runs numbered above `number` may exist that this read did not list."""
        if number is None or self.complete:
            return False
        return self.lowest is None or self.lowest > number + 1

    def add(self, page: JSON) -> list[BuildRun]:
        data = page.get("data")
        if not isinstance(data, list):
            raise BadResponse("App Store Connect sent a build run list without data")
        self.pages += 1
        batch: list[BuildRun] = []
        for item in data:
            if not isinstance(item, dict):
                raise BadResponse("App Store Connect sent a build run list with a malformed entry")
            run = BuildRun.parse(item)
            batch.append(run)
            self.runs[run.id] = run
            context = run_context(page, item)
            if context:
                self.contexts[run.id] = context
            if run.number is not None:
                self.top = run.number if self.top is None else max(self.top, run.number)
                self.lowest = run.number if self.lowest is None else min(self.lowest, run.number)
        return batch


def worth_another_page(lowest: int, followed: Sequence[int]) -> bool:
    """Whether paging on is cheaper than a GET for each followed run below `lowest`."""
    below = [n for n in followed if n < lowest]
    if not below:
        return False
    return math.ceil((lowest - min(below)) / PAGE) <= len(below)


class ContextRefused(Exception):
    """The API answered 400 to `include`: read again without it."""


async def read_product(
    client: AscClient,
    product_id: str,
    *,
    followed: Sequence[int],
    discover_from: int | None,
    context: bool,
) -> Listing:
    """The product's newest runs, down to where the followed runs (build numbers) and
    discovery (every run above `discover_from`) need it. Raises ContextRefused when the API
    refuses the `include` of names (asked with `context`)."""
    params = {"sort": "-number", "limit": str(PAGE), "fields[ciBuildRuns]": RUN_FIELDS}
    if context:
        params.update(RUN_CONTEXT)
    path = f"/v1/ciProducts/{product_id}/buildRuns"
    try:
        page = await client.get(path, params, share=product_id)
    except ApiError as exc:
        if context and exc.status == 400:
            raise ContextRefused from None
        raise
    listing = Listing()
    seen: set[str] = set()
    while True:
        listing.add(page)
        links = page.get("links")
        nxt = links.get("next") if isinstance(links, dict) else None
        if not isinstance(nxt, str) or not nxt:
            listing.complete = True
            return listing
        lowest = listing.lowest
        if lowest is None or nxt in seen or listing.pages >= MAX_PAGES:
            return listing
        discovering = discover_from is not None and lowest > discover_from + 1
        if not discovering and not worth_another_page(lowest, followed):
            return listing
        seen.add(nxt)
        page = await client.get(nxt, share=product_id)
