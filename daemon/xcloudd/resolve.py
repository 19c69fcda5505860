"""Names people write in configs -> the ids App Store Connect wants.

Lookups are cached for the life of the Resolver: workflows, repositories and git references
change rarely, and every lookup spends the key's request budget.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from xcloudd.api import JSON, AscClient, BadResponse, NotFound
from xcloudd.errors import ExitCode, XcloudError
from xcloudd.resources import Named, related_id

UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
RefKind = Literal["BRANCH", "TAG"]
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


def _workflow(item: Named, product_id: str | None) -> Workflow:
    enabled = item.attributes.get("isEnabled")
    return Workflow(item.id, item.name, enabled if isinstance(enabled, bool) else None, product_id)


class Resolver:
    def __init__(self, client: AscClient) -> None:
        self._client = client
        self._products: list[Product] | None = None
        self._workflows: dict[str, list[Workflow]] = {}
        self._repositories: dict[str, str] = {}
        self._refs: dict[str, list[Named]] = {}

    async def products(self) -> list[Product]:
        if self._products is None:
            items = self._client.paginate(
                "/v1/ciProducts", {"limit": "200", "fields[ciProducts]": "name,productType"}
            )
            self._products = [Product(p.id, p.name) async for p in _named(items, "ciProducts")]
        return self._products

    async def workflows_of(self, product: Product) -> list[Workflow]:
        if product.id not in self._workflows:
            items = self._client.paginate(
                f"/v1/ciProducts/{product.id}/workflows",
                {"limit": "200", "fields[ciWorkflows]": "name,isEnabled"},
            )
            self._workflows[product.id] = [
                _workflow(w, product.id) async for w in _named(items, "ciWorkflows")
            ]
        return self._workflows[product.id]

    async def product(self, ident: str) -> Product:
        products = await self.products()
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
            try:
                doc = await self._client.get(
                    f"/v1/ciWorkflows/{ident}", {"fields[ciWorkflows]": "name,isEnabled,product"}
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
        if product is None:
            raise ResolveError(
                f"workflow {ident!r} is not an id: give its product too, or use its id"
                " (list them with `xcloudd workflows`)"
            )
        prod = await self.product(product)
        workflows = await self.workflows_of(prod)
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

    async def repository_of(self, workflow_id: str) -> str:
        if workflow_id not in self._repositories:
            doc = await self._client.get(
                f"/v1/ciWorkflows/{workflow_id}/repository",
                {"fields[scmRepositories]": "repositoryName"},
            )
            data = doc.get("data")
            if not isinstance(data, dict) or not isinstance(data.get("id"), str):
                raise ResolveError("the workflow has no repository")
            self._repositories[workflow_id] = data["id"]
        return self._repositories[workflow_id]

    async def git_reference(self, workflow_id: str, name: str, kind: RefKind) -> Named:
        """The one live branch or tag called `name` (or its canonical refs/... form)."""
        repo = await self.repository_of(workflow_id)
        if repo not in self._refs:
            items = self._client.paginate(
                f"/v1/scmRepositories/{repo}/gitReferences",
                {"limit": "200", "fields[scmGitReferences]": "name,canonicalName,isDeleted,kind"},
            )
            self._refs[repo] = [r async for r in _named(items, "scmGitReferences")]
        canonical = name if name.startswith("refs/") else _PREFIX[kind] + name
        matches = [
            r
            for r in self._refs[repo]
            if r.attributes.get("kind") == kind
            and not r.attributes.get("isDeleted")
            and (r.name == name or r.attributes.get("canonicalName") == canonical)
        ]
        what = "branch" if kind == "BRANCH" else "tag"
        if len(matches) == 1:
            return matches[0]
        if not matches:
            searched = len(self._refs[repo])
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
