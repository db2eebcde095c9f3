"""The admin listener (aiohttp): /metrics, /healthz, /readyz, /explain, and the read-only page
under /ui (proxy.ui, unless `ui.enabled: false`). Never the proxy port.

`/explain?source=IP&url=URL[&user=NAME]` shows the name decision (`user`: the proxy-auth user a
source in auth.basic.sources logs in as); with `&resolve=1` also the DNS answer,
the decision per address and what the address guard dropped (proxy.explainer)."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import metrics
from proxy.core.identity import IdentityLookup
from proxy.dataplane.proxy_auth import LoggedInIdentity, LoginScope
from proxy.dataplane.router import Router
from proxy.errors import OutgateError
from proxy.explainer import explain, explain_route
from proxy.ui import UiSources, add_ui_routes


def build_admin_app(
    *,
    router: Router,
    identity: IdentityLookup,
    readiness: Callable[[], tuple[bool, dict[str, object]]],
    login: LoginScope | None = None,
    ui: UiSources | None = None,
    ui_token: str | None = None,
) -> web.Application:
    """`ui`: what the page reads (None: no page); `ui_token`: the bearer token it requires."""

    async def metrics_handler(_: web.Request) -> web.Response:
        body = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        # Liveness: the event loop answered. Policy trouble is readiness, not liveness.
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ready, detail = readiness()
        return web.Response(
            status=200 if ready else 503,
            text=json.dumps({"ready": ready, **detail}, indent=1) + "\n",
            content_type="application/json",
        )

    async def explain_handler(request: web.Request) -> web.Response:
        source = request.query.get("source", "")
        url = request.query.get("url", "")
        if not source or not url:
            return web.Response(
                status=400,
                text="usage: /explain?source=IP&url=URL"
                "[&user=NAME][&resolve=1][&listener=KIND][&format=json]\n",
            )
        resolve = request.query.get("resolve", "") in ("1", "true", "yes")
        listener = request.query.get("listener") or None
        # A source in auth.basic.sources is explained as the user it logs in as (&user=NAME).
        as_user = LoggedInIdentity(identity, login, request.query.get("user") or None)
        try:
            if resolve:
                text, data = await explain_route(
                    router, as_user, source=source, url=url, listener=listener
                )
            else:
                text, data = explain(router, as_user, source=source, url=url, listener=listener)
        except OutgateError as exc:
            return web.Response(status=400, text=f"{exc.message} ({exc.reason})\n")
        if request.query.get("format") == "json":
            return web.json_response(data)
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/explain", explain_handler)
    if ui is not None:
        add_ui_routes(app, ui, token=ui_token)
    return app
