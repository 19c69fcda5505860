"""Names people write in configs -> the ids App Store Connect wants.

Lookups are kept for a while (workflows, repositories and git references change rarely, and
every lookup spends the key's request budget), but not for ever: a daemon runs for months.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from xcloudd.api import JSON, AscClient, BadResponse, Lane, NotFound
from xcloudd.clock import Clock, SystemClock
from xcloudd.errors import ExitCode, XcloudError
from xcloudd.resources import Named, related_id

UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
RefKind = Literal["BRANCH", "TAG"]
T = TypeVar("T")
LOOKUP_TTL_S = 600.0
MISS_RECHECK_S = 30.0
# Lookups are what a start waits for before its POST (and, kept, cost little otherwise): they
# take the budget's start lane rather than queue behind polls.
LANE: Lane = "start"
_PREFIX: dict[RefKind, str] = {"BRANCH": "refs/heads/", "TAG": "refs/tags/"}


class ResolveError(XcloudError):
    """A name that matches nothing, or more than one thing: the user's mistake, so a usage
    error (64) on the command line; commands report one from the config as a ConfigError (78)."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class Product:
    id: str
    name: str


@dataclass(frozen=True)
class Workflow:
    id: str
    name: str
    enabled: bool | None
    product_id: str | None
    description: str | None = None


def _workflow(item: Named, product_id: str | None) -> Workflow:
    enabled = item.attributes.get("isEnabled")
    description = item.attributes.get("description")
    return Workflow(
        item.id,
        item.name,
        enabled if isinstance(enabled, bool) else None,
        product_id,
        description.strip() or None if isinstance(description, str) else None,
    )


class _Lookups(Generic[T]):
    """Answers kept for `ttl` seconds; lookups of one key at the same time share one request
    (jobs that fire at the same instant need the same names)."""

    def __init__(self, clock: Clock, ttl: float) -> None:
        self._clock = clock
        self._ttl = ttl
        self._entries: dict[str, tuple[float, asyncio.Future[T]]] = {}

    async def get(
        self, key: str, load: Callable[[], Awaitable[T]], *, max_age: float | None = None
    ) -> T:
        now = self._clock.monotonic()
        limit = self._ttl if max_age is None else min(self._ttl, max_age)
        entry = self._entries.get(key)
        if entry is None or (entry[1].done() and now - entry[0] > limit):
            fut = asyncio.ensure_future(load())
            # Read by the waiters; this keeps a failure nobody awaits any more from being
            # reported as a stray exception.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            entry = self._entries[key] = (now, fut)
        try:
            return await asyncio.shield(entry[1])
        except Exception:
            if self._entries.get(key) is entry:
                del self._entries[key]  # a failed lookup is not kept
            raise

    def age(self, key: str) -> float | None:
        entry = self._entries.get(key)
        return None if entry is None else self._clock.monotonic() - entry[0]


class Resolver:
    """Lookups are kept for LOOKUP_TTL_S; a name that matches nothing is looked up again once
    the answer is older than MISS_RECHECK_S (a tag pushed a minute ago is found)."""

    def __init__(self, client: AscClient, clock: Clock | None = None) -> None:
        self._client = client
        clock = clock or SystemClock()
        self._products: _Lookups[list[Product]] = _Lookups(clock, LOOKUP_TTL_S)
        self._workflows: _Lookups[list[Workflow]] = _Lookups(clock, LOOKUP_TTL_S)
        self._by_id: _Lookups[Workflow] = _Lookups(clock, LOOKUP_TTL_S)
        self._repositories: _Lookups[str] = _Lookups(clock, LOOKUP_TTL_S)
        self._refs: _Lookups[list[Named]] = _Lookups(clock, LOOKUP_TTL_S)

    async def products(self, max_age: float | None = None) -> list[Product]:
        async def load() -> list[Product]:
            items = self._client.paginate(
                "/v1/ciProducts",
                {"limit": "200", "fields[ciProducts]": "name,productType"},
                lane=LANE,
            )
            return [Product(p.id, p.name) async for p in _named(items, "ciProducts")]

        return await self._products.get("", load, max_age=max_age)

    async def workflows_of(self, product: Product, max_age: float | None = None) -> list[Workflow]:
        async def load() -> list[Workflow]:
            items = self._client.paginate(
                f"/v1/ciProducts/{product.id}/workflows",
                {"limit": "200", "fields[ciWorkflows]": "name,description,isEnabled"},
                lane=LANE,
            )
            return [_workflow(w, product.id) async for w in _named(items, "ciWorkflows")]

        return await self._workflows.get(product.id, load, max_age=max_age)

    async def product(self, ident: str) -> Product:
        products = await self.products()
        matches = [p for p in products if ident in (p.id, p.name)]
        if not matches and (self._products.age("") or 0.0) > MISS_RECHECK_S:
            products = await self.products(max_age=MISS_RECHECK_S)
            matches = [p for p in products if ident in (p.id, p.name)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(sorted(p.name for p in products)) or "none"
            raise ResolveError(
                f"no Xcode Cloud product named {ident!r} is visible to this key (products: {known})"
            )
        ids = ", ".join(p.id for p in matches)
        raise ResolveError(
            f"{len(matches)} products are named {ident!r}: give the id of one ({ids})"
        )

    async def workflow(self, ident: str, product: str | None = None) -> Workflow:
        """A workflow by id, or by name within a product."""
        if UUID_RE.match(ident):
            return await self._by_id.get(ident, lambda: self._workflow_by_id(ident))
        if product is None:
            raise ResolveError(
                f"workflow {ident!r} is not an id: give its product too, or use its id"
                " (list them with `xcloudd workflows`)"
            )
        prod = await self.product(product)
        workflows = await self.workflows_of(prod)
        matches = [w for w in workflows if w.name == ident]
        if not matches and (self._workflows.age(prod.id) or 0.0) > MISS_RECHECK_S:
            workflows = await self.workflows_of(prod, max_age=MISS_RECHECK_S)
            matches = [w for w in workflows if w.name == ident]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(sorted(w.name for w in workflows)) or "none"
            raise ResolveError(
                f"product {prod.name!r} has no workflow named {ident!r} (workflows: {known})"
            )
        ids = ", ".join(w.id for w in matches)
        raise ResolveError(
            f"product {prod.name!r} has {len(matches)} workflows named {ident!r}:"
            f" give the id of one ({ids})"
        )

    async def _workflow_by_id(self, ident: str) -> Workflow:
        try:
            doc = await self._client.get(
                f"/v1/ciWorkflows/{ident}",
                # The product's linkage comes with `include` (the follower reads its runs
                # through the product).
                {
                    "fields[ciWorkflows]": "name,isEnabled,product",
                    "include": "product",
                    "fields[ciProducts]": "name",
                },
                lane=LANE,
            )
        except NotFound:
            raise ResolveError(
                f"no workflow with id {ident} is visible to this key"
                " (`xcloudd workflows` lists them)"
            ) from None
        data = doc.get("data")
        if not isinstance(data, dict):
            raise BadResponse(f"App Store Connect sent no data for workflow {ident}")
        return _workflow(Named.parse(data, "ciWorkflows"), related_id(data, "product"))

    async def repository_of(self, workflow_id: str) -> str:
        async def load() -> str:
            doc = await self._client.get(
                f"/v1/ciWorkflows/{workflow_id}/repository",
                {"fields[scmRepositories]": "repositoryName"},
                lane=LANE,
            )
            data = doc.get("data")
            if not isinstance(data, dict) or not isinstance(data.get("id"), str):
                raise ResolveError("the workflow has no repository")
            return str(data["id"])

        return await self._repositories.get(workflow_id, load)

    async def _references(self, repo: str, max_age: float | None = None) -> list[Named]:
        async def load() -> list[Named]:
            items = self._client.paginate(
                f"/v1/scmRepositories/{repo}/gitReferences",
                {"limit": "200", "fields[scmGitReferences]": "name,canonicalName,isDeleted,kind"},
                lane=LANE,
            )
            return [r async for r in _named(items, "scmGitReferences")]

        return await self._refs.get(repo, load, max_age=max_age)

    async def git_reference(self, workflow_id: str, name: str, kind: RefKind) -> Named:
        """The one live branch or tag called `name` (or its canonical refs/... form)."""
        repo = await self.repository_of(workflow_id)
        canonical = name if name.startswith("refs/") else _PREFIX[kind] + name

        def matching(refs: list[Named]) -> list[Named]:
            return [
                r
                for r in refs
                if r.attributes.get("kind") == kind
                and not r.attributes.get("isDeleted")
                and (r.name == name or r.attributes.get("canonicalName") == canonical)
            ]

        refs = await self._references(repo)
        matches = matching(refs)
        if not matches and (self._refs.age(repo) or 0.0) > MISS_RECHECK_S:
            refs = await self._references(repo, max_age=MISS_RECHECK_S)
            matches = matching(refs)
        what = "branch" if kind == "BRANCH" else "tag"
        if len(matches) == 1:
            return matches[0]
        if not matches:
            searched = len(refs)
            raise ResolveError(
                f"the workflow's repository has no {what} {name!r}"
                f" ({searched} {'reference' if searched == 1 else 'references'} searched,"
                " deleted ones skipped)"
            )
        names = ", ".join(
            str(r.attributes.get("canonicalName") or r.name) + f" (id {r.id})" for r in matches
        )
        raise ResolveError(
            f"{what} {name!r} matches {len(matches)} references in the workflow's repository:"
            f" {names}"
        )

    async def pull_request(self, workflow_id: str, ident: str) -> str:
        """A pull request id; a short number is looked up among the repository's pull requests."""
        if not (ident.isdigit() and len(ident) < 10):
            return ident
        repo = await self.repository_of(workflow_id)
        items = self._client.paginate(
            f"/v1/scmRepositories/{repo}/pullRequests",
            {"limit": "200", "fields[scmPullRequests]": "number,title,isClosed"},
            lane=LANE,
        )
        async for pr in _named(items, "scmPullRequests", name_key="number"):
            if pr.name == ident:
                return pr.id
        raise ResolveError(f"the workflow's repository has no pull request number {ident}")


async def _named(
    items: AsyncIterator[JSON], kind: str, name_key: str = "name"
) -> AsyncIterator[Named]:
    async for item in items:
        yield Named.parse(item, kind, name_key)
