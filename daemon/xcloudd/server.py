"""`[server]`: the daemon's HTTP face for probes and Prometheus.

- `/livez`: the event loop answers and none of the supervised loops has ended;
- `/readyz`: the config is loaded, the state store answers, and App Store Connect answered the
  last request (no outage holds requests back);
- `/metrics`: Prometheus text format (see metrics.py);
- `/webhooks/xcode-cloud/<token>`: Xcode Cloud's webhooks, when a receiver is given
  (webhooks.py).

Every check is cheap and local: a probe never spends the API key's request budget. Answers
are small JSON objects, so a person with curl sees why a check fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from xcloudd.metrics import CONTENT_TYPE_LATEST, Metrics
from xcloudd.webhooks import WebhookReceiver

# A store that does not answer within this long counts as not ready (a stuck disk).
CHECK_TIMEOUT_S = 2.0

Check = Callable[[], Awaitable[dict[str, str]]]


@dataclass(frozen=True)
class Probes:
    """Each returns the problems it found, by check name; empty means fine."""

    live: Check
    ready: Check
    refresh: Callable[[], Awaitable[None]]  # read the store's figures before a scrape


class Server:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        probes: Probes,
        webhooks: WebhookReceiver | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._probes = probes
        self._webhooks = webhooks
        self._runner: web.AppRunner | None = None
        self.address: str | None = None

    async def start(self) -> str:
        """Listen; returns "host:port" as bound (port 0 picks a free one)."""
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        if self._webhooks is not None:
            app.router.add_routes(self._webhooks.routes())
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self._port
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.address = f"{host}:{port}"
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _livez(self, _request: web.Request) -> web.Response:
        return _answer(await self._probes.live())

    async def _readyz(self, _request: web.Request) -> web.Response:
        return _answer(await self._probes.ready())

    async def _metrics_page(self, _request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await self._probes.refresh()
        except Exception:
            pass  # the figures read from the store stay as last read; the rest is current
        body = self._metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _answer(problems: dict[str, str]) -> web.Response:
    body = {"status": "ok"} if not problems else {"status": "failing", "problems": problems}
    return web.Response(
        body=orjson.dumps(body) + b"\n",
        status=200 if not problems else 503,
        content_type="application/json",
    )
