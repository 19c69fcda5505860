"""What a reload changes: the old config against the new one, as a value.

Jobs, watches, polling and sinks take effect at once; `[api]`, `[state]` and `[server]` need a
restart (a new key or store under running loops would be a different daemon) and are kept as
they were, which the reload event says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from xcloudd.config import Config, SinkConfig


@dataclass(frozen=True)
class Diff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    @property
    def gone(self) -> tuple[str, ...]:
        """What must stop: removed, and changed (it starts again with its new settings)."""
        return self.removed + self.changed

    @property
    def new(self) -> tuple[str, ...]:
        return self.added + self.changed


def diff(old: Mapping[str, Hashable], new: Mapping[str, Hashable]) -> Diff:
    return Diff(
        added=tuple(k for k in new if k not in old),
        removed=tuple(k for k in old if k not in new),
        changed=tuple(k for k in new if k in old and old[k] != new[k]),
    )


@dataclass(frozen=True)
class Changes:
    config: Config  # what runs from now on: the new config with the old [api], [state], [server]
    jobs: Diff
    watches: Diff
    sinks: Diff
    polling: bool
    restart_needed: tuple[str, ...]

    def fields(self) -> dict[str, Any]:
        """For `daemon.reloaded`: only what changed."""
        out: dict[str, Any] = {}
        for name in ("jobs", "watches", "sinks"):
            d: Diff = getattr(self, name)
            for kind in ("added", "removed", "changed"):
                if values := getattr(d, kind):
                    out[f"{name}_{kind}"] = list(values)
        if self.polling:
            out["polling_changed"] = True
        if self.restart_needed:
            out["restart_needed"] = list(self.restart_needed)
        return out


def watch_key(workflow: str, product: str | None) -> str:
    return f"{product}/{workflow}" if product else workflow


def compare(old: Config, new: Config, sink_key: Callable[[SinkConfig], str]) -> Changes:
    restart = tuple(
        name for name in ("api", "state", "server") if getattr(old, name) != getattr(new, name)
    )
    kept = dataclasses.replace(new, api=old.api, state=old.state, server=old.server)
    return Changes(
        config=kept,
        jobs=diff({j.name: j for j in old.jobs}, {j.name: j for j in new.jobs}),
        watches=diff(
            {watch_key(w.workflow, w.product): w for w in old.watches},
            {watch_key(w.workflow, w.product): w for w in new.watches},
        ),
        sinks=diff({sink_key(s): s for s in old.sinks}, {sink_key(s): s for s in new.sinks}),
        polling=old.polling != new.polling,
        restart_needed=restart,
    )
