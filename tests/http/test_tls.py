"""TLS listeners: the server context (TLS 1.2+, files checked), requests verified against a
generated CA through `serve()` on the main listener and a connection's own port, plain
HTTP and TLS 1.1 refused with nothing forwarded, and the certificate replaced on SIGHUP
(a bad file keeping the running one)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from proxy.config import ClientKey, Config, Connections, ConnectionSpec, Pages
from proxy.http.tls import MINIMUM_VERSION, TlsCertificates, TlsError, server_context
from proxy.secret import Secret
from tests.certs import CertificateAuthority, client_context, common_name, make_ca
from tests.processes import PLEO_PROXY, free_port, stop, write_config
from tests.proxyproc import RecordingCredentials, proxy_config, run_served
from tests.upstreams import run_echo_upstream

KEY = "tls-client-key-0123456789abcdef"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return make_ca(tmp_path / "ca")


def tls_config(
    api_url: str, ca: CertificateAuthority, directory: Path, **sections: object
) -> Config:
    files = ca.issue(directory, "proxy")
    config = proxy_config(api_url, **sections)
    listen = replace(config.listen, tls_cert=files.cert, tls_key=files.key)
    return replace(config, listen=listen)


# --- the context ---


def test_the_context_is_tls_1_2_or_later(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = ca.issue(tmp_path, "proxy")
    context = server_context(files.cert, files.key)
    assert context.minimum_version == MINIMUM_VERSION == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION


def test_unusable_files_are_named_and_never_shown(ca: CertificateAuthority, tmp_path: Path) -> None:
    one, other = ca.issue(tmp_path, "one"), ca.issue(tmp_path, "other")
    locked = ca.issue(tmp_path, "locked", password=b"passphrase")
    cases: list[tuple[Path, Path, str]] = [
        (one.cert, other.key, "the key does not belong to the certificate"),
        (one.key, one.key, "not a PEM certificate and key"),
        (one.cert, locked.key, "the key is encrypted; give listen.tls_key an unencrypted PEM key"),
        (one.cert, tmp_path / "missing.key", "no such file or directory"),
    ]
    for cert, key, reason in cases:
        with pytest.raises(TlsError) as info:
            server_context(cert, key)
        assert info.value.detail.endswith(reason)
        assert "PRIVATE KEY" not in info.value.detail
    with pytest.raises(TlsError) as info:
        server_context(one.cert, other.key)
    assert info.value.detail == (
        f"cannot use listen.tls_cert {str(one.cert)!r} with listen.tls_key {str(other.key)!r}:"
        " the key does not belong to the certificate"
    )


def test_a_failed_reload_keeps_the_running_certificate(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    first, second = ca.issue(tmp_path, "first"), ca.issue(tmp_path, "second")
    certificates = TlsCertificates(first.cert, first.key)
    listening = certificates.context
    with pytest.raises(TlsError):
        certificates.reload(first.cert, second.key)
    certificates.reload(second.cert, second.key)
    assert certificates.context is listening  # the sockets keep their context


# --- through serve() ---


async def test_requests_are_verified_against_the_generated_ca(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    async with run_echo_upstream() as upstream:
        config = tls_config(upstream.url, ca, tmp_path)
        trusted = client_context(ca)
        async with run_served(config, RecordingCredentials()) as port, aiohttp.ClientSession() as s:
            for host in ("127.0.0.1", "localhost"):
                async with s.get(f"https://{host}:{port}/v1/x?q=1", ssl=trusted) as response:
                    assert response.status == 200
                    assert (await response.json())["raw_path"] == "/v1/x?q=1"
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=trusted, server_hostname=host
                )
                assert common_name(writer.get_extra_info("peercert")) == "proxy"
                assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
                writer.close()
                await writer.wait_closed()
            assert upstream.hits == 2
            # A client that does not trust our CA gets no answer, and nothing is forwarded.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await s.get(f"https://127.0.0.1:{port}/v1/x", ssl=ssl.create_default_context())
            assert upstream.hits == 2


async def test_tls_beyond_loopback_with_keys(ca: CertificateAuthority, tmp_path: Path) -> None:
    async with run_echo_upstream() as upstream:
        config = tls_config(upstream.url, ca, tmp_path)
        listen = replace(
            config.listen,
            host="0.0.0.0",  # noqa: S104
            client_keys=(ClientKey(Secret(KEY)),),
        )
        config = replace(config, listen=listen)
        trusted = client_context(ca)
        async with run_served(config, RecordingCredentials()) as port, aiohttp.ClientSession() as s:
            url = f"https://127.0.0.1:{port}/v1/x"
            async with s.get(url, ssl=trusted) as response:
                assert response.status == 401
            headers = {"Proxy-Authorization": f"Bearer {KEY}"}
            async with s.get(url, ssl=trusted, headers=headers) as response:
                assert response.status == 200
                echoed = await response.json()
            assert upstream.hits == 1
            names = {name.lower() for name, _ in echoed["headers"]}
            assert not {"proxy-authorization", "x-proxy-key"} & names


async def test_connection_ports_speak_tls_and_the_pages_listener_does_not(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    own, pages = free_port(), free_port()
    async with run_echo_upstream() as upstream:
        config = tls_config(
            upstream.url,
            ca,
            tmp_path,
            connections=Connections(
                configured=(ConnectionSpec("default", port=own),), implicit_default=False
            ),
            pages=Pages(port=pages),
        )
        async with run_served(config, RecordingCredentials()), aiohttp.ClientSession() as s:
            url = f"https://localhost:{own}/v1/x"
            async with s.get(url, ssl=client_context(ca)) as response:
                assert response.status == 200
            async with s.get(f"http://127.0.0.1:{pages}/_proxy/nothing") as response:
                assert response.status == 404
            assert upstream.hits == 1


async def _plain_http(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()  # to EOF: the server closes the connection
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()


async def test_plain_http_to_a_tls_port_forwards_nothing(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    async with run_echo_upstream() as upstream:
        config = tls_config(upstream.url, ca, tmp_path)
        async with run_served(config, RecordingCredentials()) as port:
            for request in (
                b"GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}",
            ):
                answer = await _plain_http(port, request)
                assert not answer.startswith(b"HTTP/")
            assert upstream.hits == 0


def _tls_1_1_client(ca: CertificateAuthority) -> ssl.SSLContext:
    context = client_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL 3's default security level would stop the client itself from offering 1.1.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


async def test_a_tls_1_1_client_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    old = _tls_1_1_client(ca)
    # The client really offers TLS 1.1: its ClientHello's version field is 3.2.
    hello: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello.set_result(await reader.read(11))
        writer.close()

    capturer = await asyncio.start_server(capture, "127.0.0.1", 0)
    with contextlib.suppress(OSError):
        port = capturer.sockets[0].getsockname()[1]
        await asyncio.open_connection("127.0.0.1", port, ssl=old, server_hostname="localhost")
    capturer.close()
    await capturer.wait_closed()
    record = await hello
    assert (record[0], record[5], record[9:11]) == (0x16, 0x01, b"\x03\x02")

    async with run_echo_upstream() as upstream:
        config = tls_config(upstream.url, ca, tmp_path)
        async with run_served(config, RecordingCredentials()) as port:
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await asyncio.open_connection(
                    "127.0.0.1", port, ssl=old, server_hostname="localhost"
                )
            newest_allowed = client_context(ca)
            newest_allowed.maximum_version = ssl.TLSVersion.TLSv1_2
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=newest_allowed, server_hostname="localhost"
            )
            assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
            writer.close()
            await writer.wait_closed()
        assert upstream.hits == 0


# --- SIGHUP: `pleo-proxy run` picks up a renewed certificate ---


def _peer_name(port: int, ca: CertificateAuthority) -> str:
    context = client_context(ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return common_name(tls.getpeercert())


def _until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_sighup_reloads_the_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    port = free_port()
    first = ca.issue(tmp_path, "first")
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    config = write_config(
        tmp_path / "proxy.yaml",
        sandbox_url="http://127.0.0.1:9",
        port=port,
        state_dir=tmp_path / "st",
        listen={"tls_cert": str(cert), "tls_key": str(key)},
    )
    proc = subprocess.Popen(
        [*PLEO_PROXY, "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _until(lambda: _peer_name(port, ca) == "first")
        renewed = ca.issue(tmp_path, "renewed")
        cert.write_bytes(renewed.cert.read_bytes())
        key.write_bytes(renewed.key.read_bytes())
        proc.send_signal(signal.SIGHUP)
        _until(lambda: _peer_name(port, ca) == "renewed")

        # A broken renewal (certificate without its key) changes nothing.
        cert.write_bytes(ca.issue(tmp_path, "orphan").cert.read_bytes())
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # a reload that went through would fail every handshake now
        assert _peer_name(port, ca) == "renewed"
        assert proc.poll() is None
    finally:
        stop(proc)
