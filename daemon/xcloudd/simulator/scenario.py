"""The simulated world: products, workflows, repositories, git references, pull requests.

A scenario is pure data. The default world (`default_scenario()`) is what the demo and most tests
use; a TOML file passed with `xcloudd simulator --scenario FILE` replaces it. Ids are UUIDs derived
from names (uuid5), so the same file always gives the same ids and a demo config can name them.

Scenario file format (every key optional unless marked required)::

    rate_limit = 3600            # requests per key per rolling hour
    seed = 0                     # for fault rules with a probability: same seed, same faults
    pending_seconds = 1          # default time a new run stays PENDING
    running_seconds = 3          # default time a run stays RUNNING

    [[products]]
    name = "Acme Shop"           # required
    type = "APP"                 # APP | FRAMEWORK
    id = "..."                   # optional fixed id; default: derived from the name

    [products.repository]
    owner = "acme"               # required
    name = "shop-ios"            # required
    branches = ["main", "develop"]   # the first one is the default branch
    tags = ["v1.2.0"]
    deleted_branches = ["old-login"] # listed with isDeleted = true
    filler_branches = 0          # adds "feature/0001".. to make gitReferences span pages
    late_branches = ["release/2026.12"]  # listed after the filler branches

    [[products.repository.pull_requests]]
    number = 42                  # required
    title = "Add dark mode"
    source = "feature/dark-mode" # required: source branch name
    destination = "main"
    closed = false

    [[products.workflows]]
    name = "CI"                  # required
    id = "..."                   # optional fixed id
    description = ""
    enabled = true
    clean = false
    container = "Shop.xcodeproj"
    actions = ["BUILD", "TEST"]  # BUILD | ANALYZE | TEST | ARCHIVE
    outcomes = ["SUCCEEDED"]     # used in turn: SUCCEEDED FAILED ERRORED CANCELED SKIPPED
    pending_seconds = 1
    running_seconds = 3

Run timeline: PENDING for `pending_seconds`, RUNNING for `running_seconds`, then COMPLETE. A
SKIPPED run goes from PENDING straight to COMPLETE (it never starts), which is the case a client
most easily gets wrong.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcloudd.errors import ConfigError

# Namespace for the derived ids: fixed so ids survive restarts and code changes.
_ID_NAMESPACE = uuid.UUID("5e1d6a2c-7c1b-4f7e-9d0a-0c10dd0c10dd")

COMPLETION_STATUSES = ("SUCCEEDED", "FAILED", "ERRORED", "CANCELED", "SKIPPED")
ACTION_TYPES = ("BUILD", "ANALYZE", "TEST", "ARCHIVE")
PRODUCT_TYPES = ("APP", "FRAMEWORK")

DEFAULT_PENDING_S = 1.0
DEFAULT_RUNNING_S = 3.0
DEFAULT_RATE_LIMIT = 3600

# When the world was "set up": createdDate/lastModifiedDate of the static resources.
_EPOCH_CREATED = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def derived_id(*parts: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, "/".join(parts)))


@dataclass(frozen=True)
class GitReference:
    id: str
    repository_id: str
    name: str
    kind: str  # BRANCH | TAG
    is_deleted: bool = False

    @property
    def canonical_name(self) -> str:
        prefix = "refs/heads/" if self.kind == "BRANCH" else "refs/tags/"
        return prefix + self.name


@dataclass(frozen=True)
class PullRequest:
    id: str
    repository_id: str
    number: int
    title: str
    source_branch: str
    destination_branch: str
    is_closed: bool = False


@dataclass(frozen=True)
class Repository:
    id: str
    owner: str
    name: str
    default_branch: str
    references: tuple[GitReference, ...]
    pull_requests: tuple[PullRequest, ...] = ()

    @property
    def http_clone_url(self) -> str:
        return f"https://github.com/{self.owner}/{self.name}.git"

    @property
    def ssh_clone_url(self) -> str:
        # Apple declares the field as a uri, so use the ssh:// form rather than git@host:path.
        return f"ssh://git@github.com/{self.owner}/{self.name}.git"

    @property
    def web_url(self) -> str:
        return f"https://github.com/{self.owner}/{self.name}"


@dataclass(frozen=True)
class BuildBehaviour:
    pending_s: float = DEFAULT_PENDING_S
    running_s: float = DEFAULT_RUNNING_S
    outcomes: tuple[str, ...] = ("SUCCEEDED",)


@dataclass(frozen=True)
class Workflow:
    id: str
    product_id: str
    repository_id: str
    name: str
    description: str = ""
    is_enabled: bool = True
    clean: bool = False
    container_file_path: str = "App.xcodeproj"
    actions: tuple[str, ...] = ("BUILD", "TEST")
    behaviour: BuildBehaviour = field(default_factory=BuildBehaviour)

    @property
    def outcome_summary(self) -> str:
        """What a build of this workflow ends as, e.g. "SUCCEEDED, FAILED in turn"."""
        if not self.is_enabled:
            return "refused (disabled)"
        outcomes = self.behaviour.outcomes
        if len(set(outcomes)) == 1:
            return f"always {outcomes[0]}"
        return f"{', '.join(outcomes)} in turn"

    @property
    def served_description(self) -> str:
        """The `description` App Store Connect clients see: the scenario's text plus the
        outcome, so a listing of workflows says which one gives which result."""
        note = f"simulator: {self.outcome_summary}"
        return f"{self.description} ({note})" if self.description else note


@dataclass(frozen=True)
class Product:
    id: str
    name: str
    product_type: str
    repository: Repository
    workflows: tuple[Workflow, ...]


@dataclass(frozen=True)
class Scenario:
    products: tuple[Product, ...]
    rate_limit: int = DEFAULT_RATE_LIMIT
    created_at: float = _EPOCH_CREATED
    seed: int = 0

    # Lookups: small worlds, so linear scans keep the value type simple and frozen.
    def product(self, product_id: str) -> Product | None:
        return next((p for p in self.products if p.id == product_id), None)

    def workflows(self) -> tuple[Workflow, ...]:
        return tuple(w for p in self.products for w in p.workflows)

    def workflow(self, workflow_id: str) -> Workflow | None:
        return next((w for w in self.workflows() if w.id == workflow_id), None)

    def workflow_named(self, name: str) -> Workflow:
        """The workflow with this name (for tests and demos); KeyError when absent."""
        for wf in self.workflows():
            if wf.name == name:
                return wf
        raise KeyError(name)

    def repositories(self) -> tuple[Repository, ...]:
        return tuple(p.repository for p in self.products)

    def repository(self, repository_id: str) -> Repository | None:
        return next((r for r in self.repositories() if r.id == repository_id), None)

    def git_reference(self, ref_id: str) -> GitReference | None:
        for repo in self.repositories():
            for ref in repo.references:
                if ref.id == ref_id:
                    return ref
        return None

    def reference_named(self, repository_id: str, name: str, kind: str = "BRANCH") -> GitReference:
        """The live reference with this name; KeyError when absent."""
        repo = self.repository(repository_id)
        for ref in repo.references if repo else ():
            if ref.name == name and ref.kind == kind and not ref.is_deleted:
                return ref
        raise KeyError(name)

    def pull_request(self, pr_id: str) -> PullRequest | None:
        for repo in self.repositories():
            for pr in repo.pull_requests:
                if pr.id == pr_id:
                    return pr
        return None


# ---------------------------------------------------------------------------------------------
# Building worlds from plain data (the default world is built through the same path as a file).


class _Reader:
    """Typed access to one TOML table, raising ConfigError that names file and key."""

    def __init__(self, file: str, prefix: str, table: Mapping[str, Any], known: set[str]) -> None:
        self.file, self.prefix, self.table = file, prefix, table
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError.at(file, self.key(unknown[0]), "unknown key")

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, reason: str) -> ConfigError:
        return ConfigError.at(self.file, self.key(name), reason)

    def str_(self, name: str, default: str | None = None) -> str:
        value = self.table.get(name, default)
        if not isinstance(value, str) or (default is None and not value):
            raise self.fail(
                name, "required, a non-empty string" if value is None else "not a string"
            )
        return value

    def bool_(self, name: str, default: bool) -> bool:
        value = self.table.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, "must be true or false")
        return value

    def int_(self, name: str, default: int | None = None, minimum: int = 0) -> int:
        value = self.table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(name, f"must be an integer >= {minimum}")
        return value

    def seconds(self, name: str, default: float) -> float:
        value = self.table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.fail(name, "must be a number of seconds >= 0")
        return float(value)

    def strings(
        self, name: str, default: tuple[str, ...] = (), allowed: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        value = self.table.get(name, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, "must be a list of strings")
        for v in value:
            if allowed and v not in allowed:
                raise self.fail(name, f"{v!r} is not one of {', '.join(allowed)}")
        return tuple(value)

    def tables(self, name: str) -> list[Mapping[str, Any]]:
        value = self.table.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(name, "must be an array of tables ([[...]])")
        return value

    def table_(self, name: str) -> Mapping[str, Any]:
        value = self.table.get(name)
        if not isinstance(value, dict):
            raise self.fail(name, "required table")
        return value


def _repository(r: _Reader) -> Repository:
    owner, name = r.str_("owner"), r.str_("name")
    repo_id = derived_id("repository", owner, name)
    branches = r.strings("branches", ("main",))
    if not branches:
        raise r.fail("branches", "needs at least one branch (the first is the default)")
    filler = r.int_("filler_branches", 0)
    names: list[tuple[str, str, bool]] = [(b, "BRANCH", False) for b in branches]
    names += [(d, "BRANCH", True) for d in r.strings("deleted_branches")]
    names += [(f"feature/{i:04d}", "BRANCH", False) for i in range(1, filler + 1)]
    names += [(b, "BRANCH", False) for b in r.strings("late_branches")]
    names += [(t, "TAG", False) for t in r.strings("tags")]
    refs = tuple(
        GitReference(
            id=derived_id("ref", repo_id, kind, ref_name),
            repository_id=repo_id,
            name=ref_name,
            kind=kind,
            is_deleted=deleted,
        )
        for ref_name, kind, deleted in names
    )
    prs: list[PullRequest] = []
    for i, t in enumerate(r.tables("pull_requests")):
        pr = _Reader(
            r.file,
            r.key(f"pull_requests[{i}]"),
            t,
            {"number", "title", "source", "destination", "closed"},
        )
        number = pr.int_("number", minimum=1)
        prs.append(
            PullRequest(
                id=derived_id("pull", repo_id, str(number)),
                repository_id=repo_id,
                number=number,
                title=pr.str_("title", f"Pull request #{number}"),
                source_branch=pr.str_("source"),
                destination_branch=pr.str_("destination", branches[0]),
                is_closed=pr.bool_("closed", False),
            )
        )
    return Repository(
        id=repo_id,
        owner=owner,
        name=name,
        default_branch=branches[0],
        references=refs,
        pull_requests=tuple(prs),
    )


def scenario_from_dict(data: Mapping[str, Any], file: str = "<scenario>") -> Scenario:
    """Build a world from parsed TOML; errors name the file and the key."""
    top = _Reader(
        file, "", data, {"rate_limit", "pending_seconds", "running_seconds", "products", "seed"}
    )
    pending_default = top.seconds("pending_seconds", DEFAULT_PENDING_S)
    running_default = top.seconds("running_seconds", DEFAULT_RUNNING_S)
    products: list[Product] = []
    for i, t in enumerate(top.tables("products")):
        p = _Reader(file, f"products[{i}]", t, {"name", "type", "id", "repository", "workflows"})
        name = p.str_("name")
        product_type = p.str_("type", "APP")
        if product_type not in PRODUCT_TYPES:
            raise p.fail("type", "must be APP or FRAMEWORK")
        product_id = p.str_("id", derived_id("product", name))
        repo = _repository(
            _Reader(
                file,
                p.key("repository"),
                p.table_("repository"),
                {
                    "owner",
                    "name",
                    "branches",
                    "tags",
                    "deleted_branches",
                    "filler_branches",
                    "late_branches",
                    "pull_requests",
                },
            ),
        )
        workflows: list[Workflow] = []
        for j, wt in enumerate(p.tables("workflows")):
            w = _Reader(
                file,
                p.key(f"workflows[{j}]"),
                wt,
                {
                    "name",
                    "id",
                    "description",
                    "enabled",
                    "clean",
                    "container",
                    "actions",
                    "outcomes",
                    "pending_seconds",
                    "running_seconds",
                },
            )
            wf_name = w.str_("name")
            outcomes = w.strings("outcomes", ("SUCCEEDED",), COMPLETION_STATUSES)
            if not outcomes:
                raise w.fail("outcomes", "needs at least one completion status")
            actions = w.strings("actions", ("BUILD", "TEST"), ACTION_TYPES)
            if not actions:
                raise w.fail("actions", "needs at least one action")
            workflows.append(
                Workflow(
                    id=w.str_("id", derived_id("workflow", product_id, wf_name)),
                    product_id=product_id,
                    repository_id=repo.id,
                    name=wf_name,
                    description=w.str_("description", ""),
                    is_enabled=w.bool_("enabled", True),
                    clean=w.bool_("clean", False),
                    container_file_path=w.str_("container", f"{name.replace(' ', '')}.xcodeproj"),
                    actions=actions,
                    behaviour=BuildBehaviour(
                        pending_s=w.seconds("pending_seconds", pending_default),
                        running_s=w.seconds("running_seconds", running_default),
                        outcomes=outcomes,
                    ),
                )
            )
        products.append(
            Product(
                id=product_id,
                name=name,
                product_type=product_type,
                repository=repo,
                workflows=tuple(workflows),
            )
        )
    if not products:
        raise top.fail("products", "the scenario defines no products")
    ids = [x.id for x in products] + [w.id for p in products for w in p.workflows]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise top.fail("products", f"id {dup} is used twice (same name or same fixed id)")
    return Scenario(
        products=tuple(products),
        rate_limit=top.int_("rate_limit", DEFAULT_RATE_LIMIT, 1),
        seed=top.int_("seed", 0),
    )


def load_scenario(path: Path) -> Scenario:
    """Read a scenario TOML file; any problem is a ConfigError naming the file and key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError.at(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError.at(str(path), "", f"not valid TOML: {exc}") from None
    return scenario_from_dict(data, str(path))


DEFAULT_SCENARIO: dict[str, Any] = {
    "pending_seconds": DEFAULT_PENDING_S,
    "running_seconds": DEFAULT_RUNNING_S,
    "products": [
        {
            "name": "Acme Shop",
            "type": "APP",
            "repository": {
                "owner": "acme",
                "name": "shop-ios",
                "branches": ["main", "develop", "feature/dark-mode"],
                "deleted_branches": ["feature/old-login"],
                # 230 filler branches push "release/2026.12" past the first page of 200.
                "filler_branches": 230,
                "late_branches": ["release/2026.12"],
                "tags": ["v1.1.0", "v1.2.0"],
                "pull_requests": [
                    {
                        "number": 42,
                        "title": "Add dark mode",
                        "source": "feature/dark-mode",
                        "destination": "main",
                    },
                    {
                        "number": 41,
                        "title": "Old login screen",
                        "source": "feature/old-login",
                        "destination": "main",
                        "closed": True,
                    },
                ],
            },
            "workflows": [
                {
                    "name": "CI",
                    "description": "Build and test every change",
                    "outcomes": ["SUCCEEDED"],
                },
                {
                    "name": "Nightly",
                    "description": "Full test suite, alternating results",
                    "outcomes": ["SUCCEEDED", "FAILED"],
                    "clean": True,
                },
                {"name": "UI Tests", "description": "Always fails", "outcomes": ["FAILED"]},
                {
                    "name": "Archive",
                    "description": "Archive for TestFlight; infrastructure error",
                    "actions": ["BUILD", "ARCHIVE"],
                    "outcomes": ["ERRORED"],
                },
                {
                    "name": "Superseded",
                    "description": "Canceled by a newer build",
                    "outcomes": ["CANCELED"],
                },
                {
                    "name": "Docs Only",
                    "description": "Skipped by Xcode Cloud",
                    "outcomes": ["SKIPPED"],
                },
                {
                    "name": "Legacy",
                    "description": "Disabled workflow: starting it is refused",
                    "enabled": False,
                },
            ],
        },
        {
            "name": "Acme Kit",
            "type": "FRAMEWORK",
            "repository": {
                "owner": "acme",
                "name": "acme-kit",
                "branches": ["main", "develop"],
                "tags": ["v0.9.0"],
            },
            "workflows": [
                {
                    "name": "Kit CI",
                    "description": "Framework build and tests",
                    "actions": ["BUILD", "TEST"],
                },
            ],
        },
    ],
}


def default_scenario() -> Scenario:
    return scenario_from_dict(DEFAULT_SCENARIO, "<default scenario>")
