"""Build results in a Slack channel, through an incoming webhook (Block Kit messages).

Only finished builds are worth a person's attention: one message per `build.completed` (and a
short warning per `build.watch_expired`), headed "broke"/"is fixed" when a job changes between
passing and failing. Storm control: one `write` is at most one POST (a batch of more than
three builds becomes one summary), posts are at least `min_gap_s` apart, and a 429 is waited
out once. Webhook URLs are secrets: errors never contain them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp
import orjson
from yarl import URL

from xcloudd.clock import Clock, SystemClock
from xcloudd.events import RESULTS
from xcloudd.httpsinks import Response, SinkError, http_error, post, url_secrets
from xcloudd.sinks import EventFilter, Record

HANDLED = frozenset({"build.completed", "build.watch_expired"})
DETAILED_MAX = 3  # builds in one batch that each get their own section
SUMMARY_LINES = 10
RETRY_AFTER_MAX_S = 60.0
_HEADER_CHARS = 150  # Slack's limit for header text
_TEXT_CHARS = 3000  # and for a section's text

_MARK = {"success": "✅", "failure": "❌", "error": "❌", "cancellation": "⚪", "skip": "⚪"}
_MARK_TIMEOUT = "⚠️"
_VERB = {
    "success": "succeeded",
    "failure": "failed",
    "error": "errored",
    "cancellation": "was canceled",
    "skip": "was skipped",
    "timeout": "is taking too long",
}
_ISSUES = (
    ("errorCount", "error"),
    ("testFailureCount", "test failure"),
    ("warningCount", "warning"),
    ("analyzerWarningCount", "analyzer warning"),
)
_FAILING = ("failure", "error")


def esc(text: object) -> str:
    """Slack mrkdwn escaping: only these three characters are control characters."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def link(url: object, label: str) -> str:
    """A mrkdwn link, or the bare label when the URL is missing or would break the syntax."""
    if not isinstance(url, str) or not url.startswith(("https://", "http://")) or "|" in url:
        return label
    return f"<{esc(url)}|{label}>"


def duration(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "?"
    h, rest = divmod(int(value), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def result_of(f: Mapping[str, Any]) -> str:
    if f.get("event") == "build.watch_expired":
        return "timeout"
    return str(f.get("result") or RESULTS.get(str(f.get("completion_status")), "unknown"))


def transition(f: Mapping[str, Any]) -> str | None:
    """'broke' or 'fixed' when a job crossed between passing and failing, else None."""
    prev, now = f.get("previous_result"), result_of(f)
    if prev == "success" and now in _FAILING:
        return "broke"
    if prev in _FAILING and now == "success":
        return "fixed"
    return None


def title(f: Mapping[str, Any]) -> str:
    """Product · workflow, falling back to the job name or the workflow id."""
    workflow = f.get("workflow_name") or f.get("job")
    if not workflow:
        workflow = f"workflow {str(f.get('workflow_id') or '?')[:8]}"
    product = f.get("product_name")
    return f"{product} · {workflow}" if product else str(workflow)


def mark(f: Mapping[str, Any]) -> str:
    return _MARK.get(result_of(f), _MARK_TIMEOUT)


def number(f: Mapping[str, Any]) -> str:
    n = f.get("build_number")
    return f"#{n}" if n is not None else ""


def headline(f: Mapping[str, Any]) -> str:
    """'❌ App · nightly broke', '✅ App · nightly is fixed', '✅ App · nightly #42 succeeded'."""
    change = transition(f)
    if change:
        return f"{mark(f)} {title(f)} {'broke' if change == 'broke' else 'is fixed'}"
    verb = _VERB.get(result_of(f), result_of(f))
    return f"{mark(f)} {title(f)} {number(f)} {verb}".replace("  ", " ")


def issues(f: Mapping[str, Any]) -> str:
    counts = f.get("issue_counts")
    if not isinstance(counts, Mapping):
        return ""
    parts = []
    for key, noun in _ISSUES:
        n = counts.get(key)
        if isinstance(n, int) and n:
            parts.append(f"{n} {noun}{'s' if n != 1 else ''}")
    return ", ".join(parts)


def facts(
    f: Mapping[str, Any], *, mrkdwn: bool, lead: bool = False, compact: bool = False
) -> list[str]:
    """The build's details, as mrkdwn (links, code) or as plain text for the fallback; `lead`
    starts with the number and result (when no header says them), `compact` is for summaries."""
    q = esc if mrkdwn else str
    out = []
    if lead:
        num = link(f.get("build_url"), number(f)) if mrkdwn and compact else number(f)
        out.append(f"{num} {result_of(f)}".strip())
    if f.get("event") == "build.watch_expired":
        out.append(f"stopped following it, still {q(f.get('last_progress') or 'unknown')}")
    elif f.get("duration_s") is not None:
        out.append(f"took {duration(f.get('duration_s'))}")
    if f.get("cancel_reason"):
        out.append(q(f["cancel_reason"]))
    if f.get("git_ref"):
        kind = "tag" if str(f.get("git_ref_kind")).upper() == "TAG" else "branch"
        out.append(f"{kind} `{q(f['git_ref'])}`" if mrkdwn else f"{kind} {f['git_ref']}")
    if compact:
        return out
    commit = f.get("source_commit")
    if isinstance(commit, str) and commit:
        short = link(f.get("commit_url"), f"`{commit[:7]}`") if mrkdwn else commit[:7]
        out.append(f"commit {short}")
    if found := issues(f):
        out.append(found)
    if mrkdwn and f.get("build_url"):
        out.append(link(f.get("build_url"), "open run"))
    return out


def plain(text: str, limit: int = _HEADER_CHARS) -> dict[str, Any]:
    return {"type": "plain_text", "text": text[:limit], "emoji": True}


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:_TEXT_CHARS]}}


def context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text[:_TEXT_CHARS]}]}


def build_blocks(f: Mapping[str, Any]) -> list[dict[str, Any]]:
    blocks = [
        {"type": "header", "text": plain(headline(f))},
        section(" · ".join(facts(f, mrkdwn=True, lead=bool(transition(f))))),
    ]
    where = [f"job `{esc(f['job'])}`" if f.get("job") else "watched build"]
    if f.get("origin"):
        where.append(esc(f["origin"]))
    if transition(f) and f.get("previous_result"):
        where.append(f"previous build: {esc(f['previous_result'])}")
    blocks.append(context(" · ".join(where)))
    return blocks


def fallback_line(f: Mapping[str, Any]) -> str:
    return f"{headline(f)}: {', '.join(facts(f, mrkdwn=False, lead=bool(transition(f))))}"


def detailed(builds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One section per build (1-3 builds)."""
    blocks: list[dict[str, Any]] = []
    for i, f in enumerate(builds):
        if i:
            blocks.append({"type": "divider"})
        blocks += build_blocks(f)
    return {"text": esc("\n".join(fallback_line(f) for f in builds)), "blocks": blocks}


def summary(builds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A storm: counts by result, then the builds that matter most (transitions, then
    failures, then the rest), in the order they happened, then how many were left out."""
    counts = Counter(result_of(f) for f in builds)
    tally = ", ".join(f"{n} {_MARK.get(r, _MARK_TIMEOUT)} {r}" for r, n in counts.most_common())
    head = f"{len(builds)} builds finished: {tally}"

    def rank(i: int) -> tuple[int, int]:
        f = builds[i]
        return (0 if transition(f) else 1 if result_of(f) in _FAILING else 2, i)

    shown = [builds[i] for i in sorted(sorted(range(len(builds)), key=rank)[:SUMMARY_LINES])]
    lines: list[str] = []
    text = [head]
    for f in shown:
        change = f" · *{transition(f)}*" if transition(f) else ""
        compact = facts(f, mrkdwn=True, lead=True, compact=True)
        lines.append(f"{mark(f)} *{esc(title(f))}* {' · '.join(compact)}{change}")
        short = ", ".join(facts(f, mrkdwn=False, lead=True, compact=True))
        text.append(f"{mark(f)} {title(f)} {short}{change.replace('*', '')}")
    if len(builds) > len(shown):
        lines.append(f"and {len(builds) - len(shown)} more")
        text.append(lines[-1])
    return {
        "text": esc("\n".join(text)),
        "blocks": [{"type": "header", "text": plain(head)}, section("\n".join(lines))],
    }


def message(builds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return detailed(builds) if len(builds) <= DETAILED_MAX else summary(builds)


class SlackSink:
    """Finished builds to a Slack incoming webhook; every other event is skipped."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        events: Iterable[str] = ("*",),
        min_level: str = "debug",
        min_gap_s: float = 1.0,
        clock: Clock | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.name = "slack"
        self._url = URL(url)
        self._secrets = [url, self._url.path, *url_secrets(self._url)]
        self._session = session
        self._filter = EventFilter(events, min_level)
        self._gap = min_gap_s
        self._clock: Clock = clock or SystemClock()
        self._timeout = timeout
        self._last: float | None = None

    def accepts(self, record: Record) -> bool:
        return record.name in HANDLED and self._filter.accepts(record)

    async def write(self, records: Sequence[Record]) -> None:
        builds = [r.fields for r in records if self.accepts(r)]
        if not builds:
            return
        body = orjson.dumps(message(builds))
        resp = await self._post(body)
        if resp.status == 429:
            wait = _retry_after(resp.headers.get("Retry-After"))
            if wait is None:
                raise SinkError("HTTP 429 rate limited for too long", 429)
            await self._clock.sleep(wait)
            resp = await self._post(body)
        if not 200 <= resp.status < 300:
            raise http_error(resp)

    async def _post(self, body: bytes) -> Response:
        if self._last is not None:
            wait = self._last + self._gap - self._clock.monotonic()
            if wait > 0:
                await self._clock.sleep(wait)
        try:
            return await post(
                self._session,
                self._url,
                body,
                {"Content-Type": "application/json"},
                timeout_s=self._timeout,
                secrets=self._secrets,
            )
        finally:
            self._last = self._clock.monotonic()

    def reopen(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait before the one retry: 1 s when Slack gave none, None when it asks for
    longer than we hold a batch (delivery's own backoff takes over)."""
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        seconds = 1.0
    return max(0.0, seconds) if seconds <= RETRY_AFTER_MAX_S else None
