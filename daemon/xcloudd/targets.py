"""Names and ids people write (on the command line or in a job) -> what App Store Connect
wants, with the error for one that matches nothing reported where it was written: an option
(exit 64) or a config key (exit 78), the same from `check --online` and `start`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from xcloudd.api import NotFound
from xcloudd.config import Config
from xcloudd.errors import ConfigError, UsageError, XcloudError
from xcloudd.resolve import UUID_RE, Product, RefKind, ResolveError, Resolver, Workflow
from xcloudd.resources import RUN_FIELDS, BuildRun
from xcloudd.runtime import Runtime
from xcloudd.starter import Target
from xcloudd.store import StartRequest

SourceKind = Literal["branch", "tag", "pull_request", "rebuild", "default"]
# The command-line option for each key a target may come from.
_OPTIONS = {
    "workflow": "--workflow",
    "product": "--product",
    "branch": "--branch",
    "tag": "--tag",
    "pull_request": "--pull-request",
    "rebuild": "--rebuild",
}


@dataclass(frozen=True)
class Origin:
    """Where a target came from, so that a name or id that matches nothing is reported there:
    an option on the command line (exit 64) or a key of the config (exit 78). The same mistake
    in a job gets the same message and code from `check --online` and from `start JOB`."""

    config_path: Path | None = None
    table: str = ""  # "jobs[0]", "watches[1]"

    @classmethod
    def of(cls, config: Config, target: Target) -> Origin:
        if target.job is None:
            return cls()
        index = next((i for i, j in enumerate(config.jobs) if j.name == target.job), None)
        return cls(config.path, f"jobs[{index}]" if index is not None else "jobs")

    def mistake(self, key: str, value: str, reason: str) -> XcloudError:
        # The value, unless the reason names it already.
        named = re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w.-])", reason)
        shown = "" if named else f" {value!r}"
        if self.config_path is None:
            return ResolveError(f"{_OPTIONS[key]}{shown}: {reason}")
        return ConfigError.at(str(self.config_path), f"{self.table}.{key}{shown}", reason)


@dataclass(frozen=True)
class Resolved:
    """A target as App Store Connect knows it (the request), with the names people know it by."""

    request: StartRequest
    workflow: Workflow
    product: Product | None
    source_kind: SourceKind
    source_name: str | None = None  # the branch or tag, "#12" for a pull request or a run
    source_id: str | None = None

    def source(self) -> str:
        match self.source_kind:
            case "branch" | "tag":
                return f"{self.source_kind} {self.source_name}"
            case "pull_request":
                return f"pull request {self.source_name}"
            case "rebuild":
                return f"a rebuild of run {self.source_name}"
        return "the workflow's default branch"

    def describe(self) -> str:
        """ "workflow "CI" of Acme Shop, branch main"."""
        product = f" of {self.product.name or self.product.id}" if self.product else ""
        return f"workflow {quoted(self.workflow.name)}{product}, {self.source()}"

    def as_json(self) -> dict[str, Any]:
        product = None
        if self.product is not None:
            product = {"id": self.product.id, "name": self.product.name or None}
        return {
            "workflow": {"id": self.workflow.id, "name": self.workflow.name or None},
            "product": product,
            "source": {
                "kind": self.source_kind,
                "name": self.source_name,
                "id": self.source_id,
            },
        }


def quoted(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


def _id_problem(value: str) -> str | None:
    """Why `value` cannot be an App Store Connect id in a URL path, if it cannot."""
    if not value.strip():
        return "is empty"
    if value in (".", "..") or any(c in value for c in "/?#%\\") or any(c.isspace() for c in value):
        return "is not an id"
    return None


def check_run_id(run_id: str) -> None:
    """A RUN_ID from the command line that could not be one: a usage error before any request."""
    if (problem := _id_problem(run_id)) is not None:
        raise UsageError(f"RUN_ID {run_id!r} {problem} (`xcloudd status` lists recent runs)")


def check_target(target: Target) -> None:
    """What can be told wrong about a command-line target without asking App Store Connect."""
    if not UUID_RE.match(target.workflow) and target.product is None:
        raise UsageError(
            f"--workflow {target.workflow!r} is a name, not an id: give --product too, or the"
            " workflow's id (`xcloudd workflows` lists them)"
        )
    for key in ("pull_request", "rebuild"):
        value = getattr(target, key)
        if value is not None and (problem := _id_problem(value)) is not None:
            raise UsageError(f"{_OPTIONS[key]} {value!r} {problem}")


async def resolve_named(rt: Runtime, target: Target, origin: Origin) -> Resolved:
    """Resolve `target` like the starter does, keeping the names; a name or id that matches
    nothing is the user's mistake, reported where it came from (see Origin)."""
    resolver = rt.resolver
    product: Product | None = None
    if target.product is not None:
        try:
            product = await resolver.product(target.product)
        except ResolveError as exc:
            raise origin.mistake("product", target.product, str(exc)) from None
    try:
        workflow = await resolver.workflow(target.workflow, target.product)
    except ResolveError as exc:
        raise origin.mistake("workflow", target.workflow, str(exc)) from None
    if product is not None and workflow.product_id not in (None, product.id):
        raise origin.mistake(
            "workflow",
            target.workflow,
            f"workflow {quoted(workflow.name)} is not in product {quoted(product.name)}",
        )
    if product is None and workflow.product_id is not None:
        product = await product_by_id(resolver, workflow.product_id)
    kind: SourceKind = "default"
    name = ident = ref_id = pr_id = None
    if target.branch is not None or target.tag is not None:
        ref_kind: RefKind
        if target.branch is not None:
            kind, wanted, ref_kind = "branch", target.branch, "BRANCH"
        else:
            kind, wanted, ref_kind = "tag", target.tag or "", "TAG"
        try:
            ref = await resolver.git_reference(workflow.id, wanted, ref_kind)
        except ResolveError as exc:
            raise origin.mistake(kind, wanted, str(exc)) from None
        name, ident = ref.name or wanted, ref.id
        ref_id = ref.id
    elif target.pull_request is not None:
        kind = "pull_request"
        pr_id, name = await _pull_request(rt, workflow, target.pull_request, origin)
        ident = pr_id
    elif target.rebuild is not None:
        kind = "rebuild"
        name = await _rebuilt_run(rt, workflow, target.rebuild, origin)
        ident = target.rebuild
    request = StartRequest(
        workflow_id=workflow.id,
        git_reference_id=ref_id,
        pull_request_id=pr_id,
        rebuild_of=target.rebuild,
        clean=target.clean,
        workflow_name=workflow.name or None,
    )
    return Resolved(request, workflow, product, kind, name, ident)


async def product_by_id(resolver: Resolver, product_id: str) -> Product:
    """The product, named for people (its id alone if the list does not have it)."""
    products = await resolver.products()
    return next((p for p in products if p.id == product_id), Product(product_id, ""))


async def _pull_request(
    rt: Runtime, workflow: Workflow, given: str, origin: Origin
) -> tuple[str, str]:
    """(id, "#number") of a pull request given by number or by id."""
    try:
        pr_id = await rt.resolver.pull_request(workflow.id, given)
    except ResolveError as exc:
        raise origin.mistake("pull_request", given, str(exc)) from None
    if pr_id != given:
        return pr_id, f"#{given}"
    if (problem := _id_problem(given)) is not None:
        raise origin.mistake("pull_request", given, problem)
    try:
        doc = await rt.client.get(
            f"/v1/scmPullRequests/{quote(given, safe='')}", {"fields[scmPullRequests]": "number"}
        )
    except NotFound:
        raise origin.mistake(
            "pull_request", given, "no pull request with this id is visible to this key"
        ) from None
    data = doc.get("data")
    attrs = data.get("attributes") if isinstance(data, dict) else None
    number = attrs.get("number") if isinstance(attrs, dict) else None
    shown = f"#{number}" if isinstance(number, int) and not isinstance(number, bool) else given
    return given, shown


async def _rebuilt_run(rt: Runtime, workflow: Workflow, run_id: str, origin: Origin) -> str:
    """ "#12" for the run to build again, which must be one of the workflow's."""
    if (problem := _id_problem(run_id)) is not None:
        raise origin.mistake("rebuild", run_id, problem)
    try:
        doc = await rt.client.get(
            f"/v1/ciBuildRuns/{quote(run_id, safe='')}", {"fields[ciBuildRuns]": RUN_FIELDS}
        )
    except NotFound:
        raise origin.mistake(
            "rebuild", run_id, "no build run with this id is visible to this key"
        ) from None
    data = doc.get("data")
    run = BuildRun.parse(data)
    shown = f"#{run.number}" if run.number is not None else run.id
    if run.workflow_id is not None and run.workflow_id != workflow.id:
        raise origin.mistake(
            "rebuild",
            run_id,
            f"run {shown} is not a run of workflow {quoted(workflow.name)}; give that"
            " workflow's --workflow",
        )
    return shown
