"""Apple's GET routes: what each accepts (QuerySpec) and which entities it answers with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from xcloudd.simulator.answers import SIM_KEY, json_response
from xcloudd.simulator.apierror import not_found
from xcloudd.simulator.core import Simulator
from xcloudd.simulator.query import Query, QuerySpec, paginate, parse_query
from xcloudd.simulator.resources import Entity, Renderer
from xcloudd.simulator.runs import BuildRun

# -- route declarations ---------------------------------------------------------------------------

_RUN_FIELDS = (
    "ciBuildRuns",
    "builds",
    "ciWorkflows",
    "ciProducts",
    "scmGitReferences",
    "scmPullRequests",
)
_RUN_INCLUDE = (
    "builds",
    "workflow",
    "product",
    "sourceBranchOrTag",
    "destinationBranch",
    "pullRequest",
)
RUN_ONE = QuerySpec(fields=_RUN_FIELDS, include=_RUN_INCLUDE, extra=("limit[builds]",))
RUN_LIST = QuerySpec(
    fields=_RUN_FIELDS,
    include=_RUN_INCLUDE,
    paged=True,
    sort=("number", "-number"),
    filters={"builds": None},
    extra=("limit[builds]",),
)
_PRODUCT_FIELDS = ("ciProducts", "apps", "bundleIds", "scmRepositories")
_PRODUCT_INCLUDE = ("app", "bundleId", "primaryRepositories")
PRODUCT_ONE = QuerySpec(
    fields=_PRODUCT_FIELDS, include=_PRODUCT_INCLUDE, extra=("limit[primaryRepositories]",)
)
PRODUCT_LIST = QuerySpec(
    fields=_PRODUCT_FIELDS,
    include=_PRODUCT_INCLUDE,
    paged=True,
    filters={"productType": ("APP", "FRAMEWORK"), "app": None},
    extra=("limit[primaryRepositories]",),
)
_WORKFLOW_FIELDS = (
    "ciWorkflows",
    "ciProducts",
    "scmRepositories",
    "ciXcodeVersions",
    "ciMacOsVersions",
)
_WORKFLOW_INCLUDE = ("product", "repository", "xcodeVersion", "macOsVersion")
WORKFLOW_ONE = QuerySpec(fields=_WORKFLOW_FIELDS, include=_WORKFLOW_INCLUDE)
WORKFLOW_LIST = QuerySpec(fields=_WORKFLOW_FIELDS, include=_WORKFLOW_INCLUDE, paged=True)
_REPO_FIELDS = ("scmRepositories", "scmProviders", "scmGitReferences")
REPO_ONE = QuerySpec(fields=_REPO_FIELDS, include=("scmProvider", "defaultBranch"))
REPO_LIST = QuerySpec(
    fields=_REPO_FIELDS,
    include=("scmProvider", "defaultBranch"),
    paged=True,
    filters={"id": None},
)
REF_ONE = QuerySpec(fields=("scmGitReferences", "scmRepositories"), include=("repository",))
REF_LIST = QuerySpec(
    fields=("scmGitReferences", "scmRepositories"), include=("repository",), paged=True
)
PULL_ONE = QuerySpec(fields=("scmPullRequests", "scmRepositories"), include=("repository",))
PULL_LIST = QuerySpec(
    fields=("scmPullRequests", "scmRepositories"), include=("repository",), paged=True
)
ACTION_ONE = QuerySpec(fields=("ciBuildActions", "ciBuildRuns"), include=("buildRun",))
ACTION_LIST = QuerySpec(fields=("ciBuildActions", "ciBuildRuns"), include=("buildRun",), paged=True)


def _empty_list(kind: str) -> QuerySpec:
    return QuerySpec(fields=(kind,), paged=True)


@dataclass(frozen=True)
class _Ctx:
    sim: Simulator
    request: web.Request
    query: Query

    @property
    def id(self) -> str:
        return self.request.match_info["id"]


def _product(c: _Ctx) -> Entity:
    found = c.sim.scenario.product(c.id)
    if found is None:
        raise not_found("ciProducts", c.id)
    return found


def _workflow(c: _Ctx) -> Entity:
    found = c.sim.scenario.workflow(c.id)
    if found is None:
        raise not_found("ciWorkflows", c.id)
    return found


def _repository(c: _Ctx) -> Entity:
    found = c.sim.scenario.repository(c.id)
    if found is None:
        raise not_found("scmRepositories", c.id)
    return found


def _run(c: _Ctx) -> BuildRun:
    found = c.sim.runs.get(c.id)
    if found is None:
        raise not_found("ciBuildRuns", c.id)
    return found


def _action(c: _Ctx) -> tuple[BuildRun, int]:
    found = c.sim.runs.action(c.id)
    if found is None:
        raise not_found("ciBuildActions", c.id)
    return found


def _sorted_runs(c: _Ctx, runs: Sequence[BuildRun]) -> Sequence[BuildRun]:
    # Apple's default order is oldest first; only sort=-number gives newest first.
    ordered = sorted(runs, key=lambda r: r.number, reverse=c.query.sort == "-number")
    wanted = c.query.filters.get("builds")
    # No simulated run produces App Store builds, so a builds filter matches nothing.
    return [] if wanted else ordered


def _products(c: _Ctx) -> Sequence[Entity]:
    types = c.query.filters.get("productType")
    return [p for p in c.sim.scenario.products if not types or p.product_type in types]


def _git_reference(c: _Ctx) -> Entity:
    found = c.sim.scenario.git_reference(c.id)
    if found is None:
        raise not_found("scmGitReferences", c.id)
    return found


def _pull_request(c: _Ctx) -> Entity:
    found = c.sim.scenario.pull_request(c.id)
    if found is None:
        raise not_found("scmPullRequests", c.id)
    return found


def _repositories(c: _Ctx) -> Sequence[Entity]:
    ids = c.query.filters.get("id")
    return [r for r in c.sim.scenario.repositories() if not ids or r.id in ids]


def _workflow_repository(c: _Ctx) -> Entity:
    wf = c.sim.scenario.workflow(c.id)
    if wf is None:
        raise not_found("ciWorkflows", c.id)
    found = c.sim.scenario.repository(wf.repository_id)
    if found is None:
        raise not_found("scmRepositories", wf.repository_id)
    return found


def _runs_of_workflow(c: _Ctx) -> Sequence[Entity]:
    _workflow(c)
    return _sorted_runs(c, c.sim.runs.of_workflow(c.id))


def _runs_of_product(c: _Ctx) -> Sequence[Entity]:
    _product(c)
    return _sorted_runs(c, c.sim.runs.of_product(c.id))


def _actions_of_run(c: _Ctx) -> Sequence[Entity]:
    run = _run(c)
    return [(run, i) for i in range(len(run.actions))]


def _workflows_of_product(c: _Ctx) -> Sequence[Entity]:
    product = c.sim.scenario.product(c.id)
    if product is None:
        raise not_found("ciProducts", c.id)
    return product.workflows


def _primary_repositories(c: _Ctx) -> Sequence[Entity]:
    product = c.sim.scenario.product(c.id)
    if product is None:
        raise not_found("ciProducts", c.id)
    return [product.repository]


def _references(c: _Ctx) -> Sequence[Entity]:
    repo = c.sim.scenario.repository(c.id)
    if repo is None:
        raise not_found("scmRepositories", c.id)
    return repo.references


def _pull_requests(c: _Ctx) -> Sequence[Entity]:
    repo = c.sim.scenario.repository(c.id)
    if repo is None:
        raise not_found("scmRepositories", c.id)
    return repo.pull_requests


def _nothing_of_action(c: _Ctx) -> Sequence[Entity]:
    _action(c)
    return []


def _action_run(c: _Ctx) -> Entity:
    return _action(c)[0]


GET_ONE: tuple[tuple[str, QuerySpec, Callable[[_Ctx], Entity]], ...] = (
    ("/v1/ciProducts/{id}", PRODUCT_ONE, _product),
    ("/v1/ciWorkflows/{id}", WORKFLOW_ONE, _workflow),
    ("/v1/ciWorkflows/{id}/repository", REPO_ONE, _workflow_repository),
    ("/v1/ciBuildRuns/{id}", RUN_ONE, _run),
    ("/v1/ciBuildActions/{id}", ACTION_ONE, _action),
    ("/v1/ciBuildActions/{id}/buildRun", RUN_ONE, _action_run),
    ("/v1/scmRepositories/{id}", REPO_ONE, _repository),
    ("/v1/scmGitReferences/{id}", REF_ONE, _git_reference),
    ("/v1/scmPullRequests/{id}", PULL_ONE, _pull_request),
)
GET_MANY: tuple[tuple[str, QuerySpec, Callable[[_Ctx], Sequence[Entity]]], ...] = (
    ("/v1/ciProducts", PRODUCT_LIST, _products),
    ("/v1/ciProducts/{id}/workflows", WORKFLOW_LIST, _workflows_of_product),
    ("/v1/ciProducts/{id}/buildRuns", RUN_LIST, _runs_of_product),
    ("/v1/ciProducts/{id}/primaryRepositories", REPO_LIST, _primary_repositories),
    ("/v1/ciWorkflows/{id}/buildRuns", RUN_LIST, _runs_of_workflow),
    ("/v1/ciBuildRuns/{id}/actions", ACTION_LIST, _actions_of_run),
    ("/v1/ciBuildActions/{id}/artifacts", _empty_list("ciArtifacts"), _nothing_of_action),
    ("/v1/ciBuildActions/{id}/issues", _empty_list("ciIssues"), _nothing_of_action),
    ("/v1/ciBuildActions/{id}/testResults", _empty_list("ciTestResults"), _nothing_of_action),
    ("/v1/scmRepositories", REPO_LIST, _repositories),
    ("/v1/scmRepositories/{id}/gitReferences", REF_LIST, _references),
    ("/v1/scmRepositories/{id}/pullRequests", PULL_LIST, _pull_requests),
)


def _context(sim: Simulator, request: web.Request, spec: QuerySpec) -> tuple[_Ctx, Renderer]:
    query = parse_query(request.query, list(request.query.keys()), spec)
    ctx = _Ctx(sim, request, query)
    renderer = Renderer(sim.scenario, str(request.url.origin()), sim.clock.time(), query.fields)
    return ctx, renderer


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _one_handler(spec: QuerySpec, finder: Callable[[_Ctx], Entity]) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        ctx, renderer = _context(request.app[SIM_KEY], request, spec)
        entity = finder(ctx)
        body: dict[str, Any] = {
            "data": renderer.render(entity),
            "links": {"self": str(request.url)},
        }
        if ctx.query.include:
            body["included"] = renderer.included([entity], ctx.query.include)
        return json_response(body)

    return handle


def _many_handler(spec: QuerySpec, finder: Callable[[_Ctx], Sequence[Entity]]) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        ctx, renderer = _context(request.app[SIM_KEY], request, spec)
        page, links, meta = paginate(finder(ctx), ctx.query, request.url)
        body = {"data": [renderer.render(e) for e in page], "links": links, "meta": meta}
        if ctx.query.include:
            body["included"] = renderer.included(page, ctx.query.include)
        return json_response(body)

    return handle


def add_routes(app: web.Application) -> None:
    for path, spec, one in GET_ONE:
        app.router.add_get(path, _one_handler(spec, one), allow_head=False)
    for path, spec, many in GET_MANY:
        app.router.add_get(path, _many_handler(spec, many), allow_head=False)
