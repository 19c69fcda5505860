"""JSON:API rendering of the simulated world, shaped like Apple's schemas.

Every attribute Apple defines is present (null where unknown, as Apple's own examples show), so
a client that tolerates Apple tolerates the simulator. Sparse fieldsets (`fields[type]`) and
`include` are applied here; the field names per type are Apple's (OpenAPI 4.4.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from xcloudd.simulator.runs import BuildRun
from xcloudd.simulator.scenario import (
    GitReference,
    Product,
    PullRequest,
    Repository,
    Scenario,
    Workflow,
)

Resource = dict[str, Any]
Entity = (
    Product | Workflow | Repository | GitReference | PullRequest | BuildRun | tuple[BuildRun, int]
)

# Apple's field names per resource type: attributes first, then relationships.
FIELDS: dict[str, tuple[str, ...]] = {
    "ciProducts": (
        "name", "createdDate", "productType",
        "app", "bundleId", "workflows", "primaryRepositories", "additionalRepositories",
        "buildRuns",
    ),
    "ciWorkflows": (
        "name", "description", "branchStartCondition", "tagStartCondition",
        "pullRequestStartCondition", "scheduledStartCondition", "manualBranchStartCondition",
        "manualTagStartCondition", "manualPullRequestStartCondition", "actions", "isEnabled",
        "isLockedForEditing", "clean", "containerFilePath", "lastModifiedDate",
        "product", "repository", "xcodeVersion", "macOsVersion", "buildRuns",
    ),
    "scmRepositories": (
        "lastAccessedDate", "httpCloneUrl", "sshCloneUrl", "ownerName", "repositoryName",
        "scmProvider", "defaultBranch", "gitReferences", "pullRequests",
    ),
    "scmGitReferences": ("name", "canonicalName", "isDeleted", "kind", "repository"),
    "scmPullRequests": (
        "title", "number", "webUrl", "sourceRepositoryOwner", "sourceRepositoryName",
        "sourceBranchName", "destinationRepositoryOwner", "destinationRepositoryName",
        "destinationBranchName", "isClosed", "isCrossRepository", "repository",
    ),
    "ciBuildRuns": (
        "number", "createdDate", "startedDate", "finishedDate", "sourceCommit",
        "destinationCommit", "isPullRequestBuild", "issueCounts", "executionProgress",
        "completionStatus", "startReason", "cancelReason",
        "builds", "workflow", "product", "sourceBranchOrTag", "destinationBranch", "actions",
        "pullRequest",
    ),
    "ciBuildActions": (
        "name", "actionType", "startedDate", "finishedDate", "issueCounts", "executionProgress",
        "completionStatus", "isRequiredToPass",
        "buildRun", "artifacts", "issues", "testResults",
    ),
}  # fmt: skip

_ACTION_NAMES = {"BUILD": "Build", "ANALYZE": "Analyze", "TEST": "Test", "ARCHIVE": "Archive"}
_ACTION_DESTINATIONS = {
    "BUILD": "ANY_IOS_DEVICE",
    "ANALYZE": "ANY_IOS_DEVICE",
    "TEST": "ANY_IOS_SIMULATOR",
    "ARCHIVE": "ANY_IOS_DEVICE",
}
_ALL_BRANCHES = {"source": {"isAllMatch": True, "patterns": []}}


def iso(t: float | None) -> str | None:
    """Apple's date form: UTC with milliseconds, e.g. 2021-08-17T19:04:31.876Z."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _linkage(kind: str, resource_id: str) -> dict[str, Any]:
    return {"data": {"type": kind, "id": resource_id}}


@dataclass(frozen=True)
class Renderer:
    """Renders entities for one request: base URL for links, current time, sparse fieldsets."""

    scenario: Scenario
    base: str
    now: float
    fields: Mapping[str, frozenset[str]]

    def _url(self, *parts: str) -> str:
        return self.base + "/v1/" + "/".join(parts)

    def _rel_links(self, kind: str, resource_id: str, rel: str) -> dict[str, str]:
        return {
            "self": self._url(kind, resource_id, "relationships", rel),
            "related": self._url(kind, resource_id, rel),
        }

    def _finish(
        self, kind: str, resource_id: str, attributes: Resource, relationships: Resource
    ) -> Resource:
        wanted = self.fields.get(kind)
        if wanted is not None:
            attributes = {k: v for k, v in attributes.items() if k in wanted}
            relationships = {k: v for k, v in relationships.items() if k in wanted}
        out: Resource = {"type": kind, "id": resource_id}
        if attributes:
            out["attributes"] = attributes
        if relationships:
            out["relationships"] = relationships
        out["links"] = {"self": self._url(kind, resource_id)}
        return out

    # -- one function per type ---------------------------------------------------------------

    def product(self, p: Product) -> Resource:
        attributes = {
            "name": p.name,
            "createdDate": iso(self.scenario.created_at),
            "productType": p.product_type,
        }
        relationships = {
            "workflows": {"links": self._rel_links("ciProducts", p.id, "workflows")},
            "primaryRepositories": {
                "links": self._rel_links("ciProducts", p.id, "primaryRepositories"),
                "data": [{"type": "scmRepositories", "id": p.repository.id}],
            },
            "additionalRepositories": {
                "links": self._rel_links("ciProducts", p.id, "additionalRepositories")
            },
            "buildRuns": {"links": self._rel_links("ciProducts", p.id, "buildRuns")},
        }
        return self._finish("ciProducts", p.id, attributes, relationships)

    def workflow(self, w: Workflow) -> Resource:
        repo = self.scenario.repository(w.repository_id)
        default_branch = repo.default_branch if repo else "main"
        first = w.behaviour.outcomes == ("SUCCEEDED",)
        attributes = {
            "name": w.name,
            "description": w.served_description,
            # Only always-green workflows start on pushes to the default branch; all accept
            # manual starts on any branch, tag or pull request (what xcloudd needs).
            "branchStartCondition": {
                "source": {
                    "isAllMatch": False,
                    "patterns": [{"pattern": default_branch, "isPrefix": False}],
                },
                "autoCancel": True,
            }
            if first
            else None,
            "tagStartCondition": None,
            "pullRequestStartCondition": None,
            "scheduledStartCondition": None,
            "manualBranchStartCondition": _ALL_BRANCHES,
            "manualTagStartCondition": _ALL_BRANCHES,
            "manualPullRequestStartCondition": {
                "source": _ALL_BRANCHES["source"],
                "destination": _ALL_BRANCHES["source"],
            },
            "actions": [
                {
                    "name": f"{_ACTION_NAMES[a]} - iOS",
                    "actionType": a,
                    "destination": _ACTION_DESTINATIONS[a],
                    "scheme": w.container_file_path.rsplit("/", 1)[-1].split(".")[0],
                    "platform": "IOS",
                    "isRequiredToPass": True,
                }
                for a in w.actions
            ],
            "isEnabled": w.is_enabled,
            "isLockedForEditing": False,
            "clean": w.clean,
            "containerFilePath": w.container_file_path,
            "lastModifiedDate": iso(self.scenario.created_at),
        }
        relationships = {
            "product": _linkage("ciProducts", w.product_id),
            "repository": {
                "links": self._rel_links("ciWorkflows", w.id, "repository"),
                "data": {"type": "scmRepositories", "id": w.repository_id},
            },
            "buildRuns": {"links": self._rel_links("ciWorkflows", w.id, "buildRuns")},
        }
        return self._finish("ciWorkflows", w.id, attributes, relationships)

    def repository(self, r: Repository) -> Resource:
        attributes = {
            "lastAccessedDate": iso(self.scenario.created_at),
            "httpCloneUrl": r.http_clone_url,
            "sshCloneUrl": r.ssh_clone_url,
            "ownerName": r.owner,
            "repositoryName": r.name,
        }
        default = next(
            (x for x in r.references if x.kind == "BRANCH" and x.name == r.default_branch), None
        )
        relationships: Resource = {
            "gitReferences": {"links": self._rel_links("scmRepositories", r.id, "gitReferences")},
            "pullRequests": {"links": self._rel_links("scmRepositories", r.id, "pullRequests")},
        }
        if default is not None:
            relationships = {"defaultBranch": _linkage("scmGitReferences", default.id)} | (
                relationships
            )
        return self._finish("scmRepositories", r.id, attributes, relationships)

    def git_reference(self, g: GitReference) -> Resource:
        attributes = {
            "name": g.name,
            "canonicalName": g.canonical_name,
            "isDeleted": g.is_deleted,
            "kind": g.kind,
        }
        relationships = {"repository": _linkage("scmRepositories", g.repository_id)}
        return self._finish("scmGitReferences", g.id, attributes, relationships)

    def pull_request(self, pr: PullRequest) -> Resource:
        repo = self.scenario.repository(pr.repository_id)
        owner, name = (repo.owner, repo.name) if repo else ("", "")
        attributes = {
            "title": pr.title,
            "number": pr.number,
            "webUrl": f"https://github.com/{owner}/{name}/pull/{pr.number}",
            "sourceRepositoryOwner": owner,
            "sourceRepositoryName": name,
            "sourceBranchName": pr.source_branch,
            "destinationRepositoryOwner": owner,
            "destinationRepositoryName": name,
            "destinationBranchName": pr.destination_branch,
            "isClosed": pr.is_closed,
            "isCrossRepository": False,
        }
        relationships = {"repository": _linkage("scmRepositories", pr.repository_id)}
        return self._finish("scmPullRequests", pr.id, attributes, relationships)

    def _commit(self, sha: str | None, message: str, repo: Repository | None) -> Resource | None:
        if sha is None:
            return None
        user = {
            "displayName": "Jane Appleseed",
            "avatarUrl": "https://avatars.githubusercontent.com/u/1?v=4",
        }
        web = repo.web_url if repo else "https://github.com/example/example"
        return {
            "commitSha": sha,
            "message": message,
            "author": user,
            "committer": user,
            "webUrl": f"{web}/commit/{sha}",
        }

    def build_run(self, run: BuildRun) -> Resource:
        p = run.progress(self.now)
        workflow = self.scenario.workflow(run.workflow_id)
        repo = self.scenario.repository(workflow.repository_id) if workflow else None
        complete = p.execution_progress == "COMPLETE"
        attributes = {
            "number": run.number,
            "createdDate": iso(run.created_at),
            "startedDate": iso(p.started_at),
            "finishedDate": iso(p.finished_at),
            "sourceCommit": self._commit(run.commit_sha, run.commit_message, repo),
            "destinationCommit": self._commit(
                run.destination_sha, "Merge the latest changes", repo
            ),
            "isPullRequestBuild": run.is_pull_request_build,
            "issueCounts": run.issue_counts if complete else None,
            "executionProgress": p.execution_progress,
            "completionStatus": p.completion_status,
            "startReason": run.start_reason,
            "cancelReason": run.cancel_reason if complete else None,
        }
        relationships: Resource = {
            "builds": {"links": self._rel_links("ciBuildRuns", run.id, "builds")},
            "workflow": _linkage("ciWorkflows", run.workflow_id),
            "product": _linkage("ciProducts", run.product_id),
        }
        if run.source_ref_id is not None:
            relationships["sourceBranchOrTag"] = _linkage("scmGitReferences", run.source_ref_id)
        if run.destination_ref_id is not None:
            relationships["destinationBranch"] = _linkage(
                "scmGitReferences", run.destination_ref_id
            )
        relationships["actions"] = {"links": self._rel_links("ciBuildRuns", run.id, "actions")}
        if run.pull_request_id is not None:
            relationships["pullRequest"] = _linkage("scmPullRequests", run.pull_request_id)
        return self._finish("ciBuildRuns", run.id, attributes, relationships)

    def build_action(self, run: BuildRun, index: int) -> Resource:
        action_type = run.actions[index]
        p = run.action_progress(index, self.now)
        complete = p.execution_progress == "COMPLETE"
        failed = complete and p.completion_status not in ("SUCCEEDED", "SKIPPED", "CANCELED")
        zero = {"analyzerWarnings": 0, "errors": 0, "testFailures": 0, "warnings": 0}
        action_id = run.action_id(index)
        attributes = {
            "name": f"{_ACTION_NAMES[action_type]} - iOS",
            "actionType": action_type,
            "startedDate": iso(p.started_at),
            "finishedDate": iso(p.finished_at),
            "issueCounts": (run.issue_counts if failed else zero) if complete else None,
            "executionProgress": p.execution_progress,
            "completionStatus": p.completion_status,
            "isRequiredToPass": True,
        }
        relationships = {
            "buildRun": {
                "links": self._rel_links("ciBuildActions", action_id, "buildRun"),
                "data": {"type": "ciBuildRuns", "id": run.id},
            },
            "artifacts": {"links": self._rel_links("ciBuildActions", action_id, "artifacts")},
            "issues": {"links": self._rel_links("ciBuildActions", action_id, "issues")},
            "testResults": {"links": self._rel_links("ciBuildActions", action_id, "testResults")},
        }
        return self._finish("ciBuildActions", action_id, attributes, relationships)

    # -- dispatch and include -----------------------------------------------------------------

    def render(self, entity: Entity) -> Resource:
        match entity:
            case Product():
                return self.product(entity)
            case Workflow():
                return self.workflow(entity)
            case Repository():
                return self.repository(entity)
            case GitReference():
                return self.git_reference(entity)
            case PullRequest():
                return self.pull_request(entity)
            case BuildRun():
                return self.build_run(entity)
            case (BuildRun() as run, int() as index):
                return self.build_action(run, index)
        raise TypeError(f"cannot render {type(entity).__name__}")

    def related(self, entity: Entity, rel: str) -> list[Entity]:
        """The entities behind a relationship, for `include`; unknown kinds have none here."""
        s = self.scenario
        found: list[Entity | None] = []
        match entity:
            case Product() if rel == "primaryRepositories":
                found = [entity.repository]
            case Workflow() if rel == "product":
                found = [s.product(entity.product_id)]
            case Workflow() if rel == "repository":
                found = [s.repository(entity.repository_id)]
            case Repository() if rel == "defaultBranch":
                found = [
                    next(
                        (
                            r
                            for r in entity.references
                            if r.kind == "BRANCH" and r.name == entity.default_branch
                        ),
                        None,
                    )
                ]
            case GitReference() | PullRequest() if rel == "repository":
                found = [s.repository(entity.repository_id)]
            case BuildRun() if rel == "workflow":
                found = [s.workflow(entity.workflow_id)]
            case BuildRun() if rel == "product":
                found = [s.product(entity.product_id)]
            case BuildRun() if rel == "sourceBranchOrTag" and entity.source_ref_id:
                found = [s.git_reference(entity.source_ref_id)]
            case BuildRun() if rel == "destinationBranch" and entity.destination_ref_id:
                found = [s.git_reference(entity.destination_ref_id)]
            case BuildRun() if rel == "pullRequest" and entity.pull_request_id:
                found = [s.pull_request(entity.pull_request_id)]
            case (BuildRun() as run, int()) if rel == "buildRun":
                found = [run]
        return [e for e in found if e is not None]

    def included(self, entities: Sequence[Entity], include: Sequence[str]) -> list[Resource]:
        out: list[Resource] = []
        seen: set[tuple[str, str]] = set()
        for entity in entities:
            for rel in include:
                for other in self.related(entity, rel):
                    rendered = self.render(other)
                    key = (rendered["type"], rendered["id"])
                    if key not in seen:
                        seen.add(key)
                        out.append(rendered)
        return out
