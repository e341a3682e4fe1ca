"""The assembled app and `serve()`: routes, error JSON, resources, shutdown, bounded memory."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import Pleo, Timeouts, TokensConfig
from proxy.errors import ReauthorizationRequired
from proxy.http.app import build_app
from proxy.http.keys import CREDENTIALS_KEY, UPSTREAM_SESSION_KEY
from proxy.http.serve import serve
from proxy.lifecycle.credentials import ApiKeySource
from proxy.secret import Secret
from tests.proxyproc import (
    RecordingCredentials,
    child_config_json,
    proxy_config,
    run_child,
    run_proxy_app,
)
from tests.upstreams import (
    EchoUpstream,
    Seen,
    pattern_chunks,
    pattern_sha256,
    upstream,
)

MIB = 1024 * 1024

__all__ = ["upstream"]  # a fixture, used by name


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def test_healthz(upstream: EchoUpstream, client: aiohttp.ClientSession) -> None:
    credentials = RecordingCredentials()
    async with run_proxy_app(proxy_config(upstream.url), credentials) as proxy:
        async with client.get(proxy.make_url("/_proxy/healthz")) as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}
        async with client.post(proxy.make_url("/_proxy/healthz")) as response:
            assert response.status in (404, 405)
            assert "error" in await response.json()
    assert upstream.hits == 0
    assert credentials.calls == 0


class FailingCredentials:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def authorization(self, *, replayable: bool = True) -> Secret:
        raise self.error

    async def on_rejected(self, sent: Secret) -> Secret | None:
        raise AssertionError("never reached")

    async def stored_since(self, sent: Secret) -> Secret | None:
        raise AssertionError("never reached")


async def test_proxy_errors_become_their_json(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    error = ReauthorizationRequired("consent needed", authorize_url="http://localhost:8080/x")
    async with (
        run_proxy_app(proxy_config(upstream.url), FailingCredentials(error)) as proxy,
        client.get(proxy.make_url("/v1/me")) as response,
    ):
        assert response.status == 503
        assert await response.json() == {
            "error": "reauthorization_required",
            "authorize_url": "http://localhost:8080/x",
            "detail": "consent needed",
        }
    assert upstream.hits == 0


async def test_unexpected_errors_are_500_without_their_text(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    failing = FailingCredentials(RuntimeError("internal detail sk-live-123"))
    async with (
        run_proxy_app(proxy_config(upstream.url), failing) as proxy,
        client.get(proxy.make_url("/v1/me")) as response,
    ):
        assert response.status == 500
        body = await response.text()
    assert "sk-live-123" not in body
    assert '"internal_error"' in body


async def test_api_key_mode_installs_the_api_key_source(upstream: EchoUpstream) -> None:
    config = replace(
        proxy_config(upstream.url), pleo=Pleo(api_url=upstream.url, api_key=Secret("k"))
    )
    app = build_app(config)
    assert isinstance(app[CREDENTIALS_KEY], ApiKeySource)


async def test_oauth_mode_without_tokens_answers_503_and_forwards_nothing(
    upstream: EchoUpstream, tmp_path: Path
) -> None:
    config = proxy_config(
        upstream.url,
        pleo=Pleo(api_url=upstream.url, client_id="c", client_secret=Secret("s")),
        tokens=TokensConfig(path=tmp_path / "tokens.enc", key_file=tmp_path / "tokens.key"),
    )
    async with run_proxy_app(config) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.make_url("/v1/expenses")) as resp:
            assert resp.status == 503
            body = await resp.json()
        async with client.get(proxy.make_url("/_proxy/readyz")) as ready:
            assert ready.status == 503
    assert body["error"] == "reauthorization_required"
    # The client learns where the page is, never the one-time setup code.
    assert body["authorize_url"] == "http://localhost:8080/_proxy/authorize"
    assert upstream.hits == 0


async def test_upstream_session_settings(upstream: EchoUpstream) -> None:
    config = proxy_config(upstream.url, timeouts=Timeouts(connect=3, read=7))
    async with run_proxy_app(config, RecordingCredentials()) as proxy:
        session = proxy.app[UPSTREAM_SESSION_KEY]
        assert session.auto_decompress is False
        assert session.trust_env is False  # netrc must never add credentials
        assert session.timeout.sock_connect == 3
        assert session.timeout.sock_read == 7
        assert session.timeout.total is None
        assert session.connector is not None
        assert 0 < session.connector.limit <= 1000
    assert session.closed  # closed with the app


async def _serve_in_background(
    config_upstream: str, *, shutdown: float = 5.0
) -> tuple[asyncio.Task[None], asyncio.Event, str]:
    stop = asyncio.Event()
    bound: asyncio.Future[list[tuple[str, int]]] = asyncio.get_running_loop().create_future()
    config = proxy_config(config_upstream, timeouts=Timeouts(connect=5, read=10, shutdown=shutdown))
    task = asyncio.create_task(
        serve(
            config,
            credentials=RecordingCredentials(),
            on_listening=bound.set_result,
            stop=stop,
        )
    )
    addresses = await asyncio.wait_for(bound, 5)
    host, port = addresses[0]
    assert host == "127.0.0.1"
    return task, stop, f"http://127.0.0.1:{port}"


async def test_serve_finishes_in_flight_requests_then_stops(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    arrived = asyncio.Event()

    async def slow(request: web.Request, seen: Seen) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(0.5)
        return web.json_response({"done": True})

    upstream.respond = slow
    task, stop, url = await _serve_in_background(upstream.url)
    in_flight = asyncio.create_task(client.get(f"{url}/v1/slow"))
    await asyncio.wait_for(arrived.wait(), 5)
    stop.set()
    response = await asyncio.wait_for(in_flight, 5)
    async with response:
        assert response.status == 200
        assert await response.json() == {"done": True}
    await asyncio.wait_for(task, 10)
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.get(f"{url}/_proxy/healthz")


async def test_serve_cancels_requests_past_the_shutdown_timeout(
    upstream: EchoUpstream, client: aiohttp.ClientSession
) -> None:
    arrived = asyncio.Event()

    async def stuck(request: web.Request, seen: Seen) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(30)
        return web.Response()

    upstream.respond = stuck
    task, stop, url = await _serve_in_background(upstream.url, shutdown=0.3)
    in_flight = asyncio.create_task(client.get(f"{url}/v1/stuck"))
    await asyncio.wait_for(arrived.wait(), 5)
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 10)
    assert time.monotonic() - started < 5
    await asyncio.wait_for(upstream.cancelled.wait(), 5)
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(in_flight, 5)


async def test_serve_cancels_upstream_when_the_client_goes(upstream: EchoUpstream) -> None:
    arrived = asyncio.Event()

    async def slow(request: web.Request, seen: Seen) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(30)
        return web.Response()

    upstream.respond = slow
    task, stop, url = await _serve_in_background(upstream.url)
    try:
        port = int(url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /v1/slow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        await asyncio.wait_for(arrived.wait(), 5)
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(upstream.cancelled.wait(), 5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _download(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    length = 0
    async with client.get(url) as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            length += len(chunk)
    return length, digest.hexdigest()


async def _pattern_body(size: int) -> AsyncIterator[bytes]:
    for piece in pattern_chunks(size):
        yield piece


@pytest.mark.timeout(180)
async def test_large_streams_through_a_child_proxy_in_bounded_memory(
    client: aiohttp.ClientSession,
) -> None:
    download, upload = 1024 * MIB, 256 * MIB
    async with run_child("tests.upstreams") as bulk:
        config = child_config_json(bulk.url, api_key="bulk-key")
        async with run_child("tests.proxyproc", config) as proxy:
            got = await _download(client, f"{proxy.url}/v1/attachments/{download}")
            assert got == (download, pattern_sha256(download))

            headers = {"Content-Length": str(upload)}
            async with client.post(
                f"{proxy.url}/v1/uploads", data=_pattern_body(upload), headers=headers
            ) as response:
                assert response.status == 200
                assert await response.json() == {
                    "sha256": pattern_sha256(upload),
                    "length": upload,
                }

            peak = proxy.peak_rss_bytes()
            assert await proxy.stop() == 0  # SIGTERM → graceful exit
    assert peak < 100 * MIB, f"proxy peak RSS {peak / MIB:.1f} MiB"


def _write_tls_files(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA (written to ca.pem) and a server context for 127.0.0.1 signed by it."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pleo-proxy test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain = directory / "server.pem"
    chain.write_bytes(
        leaf_cert.public_bytes(serialization.Encoding.PEM)
        + leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(chain)
    return ca_file, server_context


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    ca_file, server_context = _write_tls_files(tmp_path)
    app = web.Application()
    app.router.add_get("/v1/me", _json_ok)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context).start()
        yield f"https://127.0.0.1:{runner.addresses[0][1]}", ca_file
    finally:
        await runner.cleanup()


async def _json_ok(request: web.Request) -> web.Response:
    return web.json_response({"tls": True})


@pytest.mark.parametrize("trust_ca", [True, False])
async def test_ca_file_is_trusted_for_the_upstream(
    tls_upstream: tuple[str, Path], client: aiohttp.ClientSession, trust_ca: bool
) -> None:
    url, ca_file = tls_upstream
    config = replace(
        proxy_config(url), pleo=Pleo(api_url=url, ca_file=ca_file if trust_ca else None)
    )
    async with (
        run_proxy_app(config, RecordingCredentials()) as proxy,
        client.get(proxy.make_url("/v1/me")) as response,
    ):
        body = await response.json()
    if trust_ca:
        assert (response.status, body) == (200, {"tls": True})
    else:
        # The system trust store alone does not know the test CA.
        assert (response.status, body["error"]) == (502, "upstream_unreachable")
