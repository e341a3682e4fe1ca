"""The admin endpoints of a served proxy: metrics exposition, never forwarded."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.http.app import build_app
from proxy.ops.metrics import METRICS_KEY
from tests.proxyproc import RecordingCredentials, proxy_config, run_proxy_app
from tests.upstreams import run_echo_upstream

FAMILIES = {
    "pleo_proxy_requests",
    "pleo_proxy_upstream_seconds",
    "pleo_proxy_in_flight_requests",
    "pleo_proxy_request_body_bytes",
    "pleo_proxy_response_body_bytes",
    "pleo_proxy_token_refreshes",
    "pleo_proxy_refresh_lock_wait_seconds",
    "pleo_proxy_access_token_expires_in_seconds",
    "pleo_proxy_guard_refusals",
    "pleo_proxy_replays",
}


async def test_metrics_endpoint_exposes_every_family_and_is_not_forwarded() -> None:
    async with (
        run_echo_upstream() as upstream,
        run_proxy_app(proxy_config(upstream.url), RecordingCredentials()) as server,
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/_proxy/metrics")) as response,
    ):
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert names >= FAMILIES
    assert upstream.hits == 0


async def test_refresh_outcomes_are_all_present_from_the_start() -> None:
    app = build_app(proxy_config("http://127.0.0.1:9"), credentials=RecordingCredentials())
    body, _ = app[METRICS_KEY].render()
    for outcome in ("ok", "transient", "invalid_grant", "client_rejected", "adopted"):
        assert f'pleo_proxy_token_refreshes_total{{outcome="{outcome}"}} 0.0'.encode() in body
