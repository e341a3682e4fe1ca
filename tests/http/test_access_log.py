"""Request ids and the one access line per request, through a served proxy."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from proxy.config import Config
from proxy.http.access_log import REQUEST_ID_HEADER, access_logger
from proxy.http.serve import serve
from proxy.ops.logs import log_handler
from tests.proxyproc import RecordingCredentials, proxy_config
from tests.upstreams import dead_port, run_echo_upstream

GENERATED = re.compile(r"[0-9a-f]{32}")


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[str]:
    stop = asyncio.Event()
    listening: asyncio.Future[list[tuple[str, int]]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(
            config,
            credentials=RecordingCredentials(),
            on_listening=listening.set_result,
            stop=stop,
        )
    )
    try:
        addresses = await asyncio.wait_for(listening, 10)
        yield f"http://127.0.0.1:{addresses[0][1]}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = log_handler(stream, fmt="json")
    logger = access_logger()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


async def test_a_sane_client_id_is_passed_to_pleo_and_returned() -> None:
    async with (
        run_echo_upstream() as upstream,
        serving(proxy_config(upstream.url)) as url,
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v1/x", headers={REQUEST_ID_HEADER: "abc-123.DEF"}) as response,
    ):
        assert response.status == 200
        assert response.headers[REQUEST_ID_HEADER] == "abc-123.DEF"
    assert upstream.seen[0].headers.getall(REQUEST_ID_HEADER) == ["abc-123.DEF"]


@pytest.mark.parametrize("sent", [None, "has space", "x" * 129, 'quote"d', "new\tline"])
async def test_a_missing_or_odd_id_is_replaced_by_a_generated_one(sent: str | None) -> None:
    headers = {} if sent is None else {REQUEST_ID_HEADER: sent}
    async with (
        run_echo_upstream() as upstream,
        serving(proxy_config(upstream.url)) as url,
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v1/x", headers=headers) as response,
    ):
        returned = response.headers[REQUEST_ID_HEADER]
    assert GENERATED.fullmatch(returned)
    assert upstream.seen[0].headers.getall(REQUEST_ID_HEADER) == [returned]


async def test_refusals_and_proxy_errors_carry_the_id_too() -> None:
    with dead_port() as port:
        async with (
            serving(proxy_config(f"http://127.0.0.1:{port}")) as url,
            aiohttp.ClientSession() as session,
        ):
            refused = await session.get(f"{url}/v1/x", headers={"Host": "evil.example"})
            reserved = await session.get(f"{url}/_proxy/nope", headers={REQUEST_ID_HEADER: "r1"})
            failed = await session.get(f"{url}/v1/x", headers={REQUEST_ID_HEADER: "r2"})
            for response in (refused, reserved, failed):
                response.release()
    assert refused.status == 421
    assert GENERATED.fullmatch(refused.headers[REQUEST_ID_HEADER])
    assert reserved.status == 404
    assert reserved.headers[REQUEST_ID_HEADER] == "r1"
    assert failed.status == 502
    assert failed.headers[REQUEST_ID_HEADER] == "r2"


async def test_one_access_line_per_request_without_the_query(access_lines: io.StringIO) -> None:
    async with (
        run_echo_upstream() as upstream,
        serving(proxy_config(upstream.url)) as url,
        aiohttp.ClientSession() as session,
    ):
        for path in ("/v1/a?code=c0de-secret", "/_proxy/healthz"):
            async with session.get(f"{url}{path}", headers={REQUEST_ID_HEADER: "id-1"}) as r:
                await r.read()
    docs = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    assert [d["path"] for d in docs] == ["/v1/a", "/_proxy/healthz"]
    assert "c0de-secret" not in access_lines.getvalue()
    forwarded, healthz = docs
    assert forwarded["method"] == "GET"
    assert forwarded["status"] == 200
    assert forwarded["bytes"] > 0
    assert forwarded["request_id"] == "id-1"
    assert forwarded["upstream_ms"] is not None
    assert forwarded["upstream_ms"] >= 0
    assert forwarded["duration_ms"] >= forwarded["upstream_ms"]
    assert healthz["upstream_ms"] is None  # never went upstream


def test_generated_request_ids_are_unique_and_plain() -> None:
    from proxy.http.access_log import new_request_id

    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and all(c in "0123456789abcdef" for c in i) for i in ids)
