"""Malformed and hostile HTTP from raw sockets against a running proxy: a corpus and Hypothesis.

Every case must end within a bound with a 4xx or a closed connection (or, for a request
that is odd but valid, a forward to the configured upstream only), nothing may reach
the "attacker" server whose address the cases use, a smuggled second request must
never reach the upstream, and the proxy must serve a normal request afterwards.
`PLEO_PROXY_FUZZ_EXAMPLES` raises the number of generated cases (default 40).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from proxy.config import Limits
from tests.http.test_limits import run_limited_proxy
from tests.proxyproc import proxy_config, raw_http
from tests.upstreams import EchoUpstream, run_echo_upstream

IDLE_TIMEOUT = 1.0  # the proxy's limits.idle_timeout in these tests
BOUND = 4.0  # seconds a case may take before the proxy must have answered or closed
FUZZ_EXAMPLES = int(os.environ.get("PLEO_PROXY_FUZZ_EXAMPLES", "40"))
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
SMUGGLED = b"/smuggled"  # the path of every smuggled request: must never reach the upstream


@dataclass(frozen=True)
class World:
    port: int
    upstream: EchoUpstream
    attacker: EchoUpstream  # its address is used in targets and Host headers

    @property
    def evil(self) -> bytes:
        return self.attacker.url.removeprefix("http://").encode()


@asynccontextmanager
async def world() -> AsyncIterator[World]:
    """Upstream, attacker and a proxy (with tight limits) in front of the upstream."""
    limits = Limits(idle_timeout=IDLE_TIMEOUT)
    async with run_echo_upstream() as upstream, run_echo_upstream() as attacker:
        config = proxy_config(upstream.url, limits=limits)
        async with run_limited_proxy(config) as proxy:
            assert proxy.port is not None
            yield World(proxy.port, upstream, attacker)


@dataclass(frozen=True)
class Outcome:
    data: bytes  # everything the proxy sent back
    closed: bool  # the proxy closed the connection within BOUND

    @property
    def statuses(self) -> list[int]:
        """The status of each response in `data`, framed by Content-Length."""
        statuses, rest = [], self.data
        while (match := STATUS_LINE.match(rest)) and b"\r\n\r\n" in rest:
            head, _, rest = rest.partition(b"\r\n\r\n")
            statuses.append(int(match[1]))
            length = CONTENT_LENGTH.search(head)
            rest = rest[int(length[1]) :] if length else b""
        return statuses


async def exchange(port: int, data: bytes, *, bound: float = BOUND) -> Outcome:
    """Send `data` as it is; read until the proxy closes, or `bound` seconds pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    closed = False
    try:
        async with asyncio.timeout(bound):
            try:
                writer.write(data)
                await writer.drain()
            except ConnectionError:
                pass  # refused before we finished sending: still read what came back
            while chunk := await reader.read(65536):
                received += chunk
            closed = True
    except ConnectionError:
        closed = True  # a reset is a close
    except TimeoutError:
        pass
    finally:
        writer.close()
    return Outcome(received, closed)


async def assert_still_serves(w: World) -> None:
    before = w.upstream.hits
    response = await raw_http(
        w.port, b"GET /v1/after HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 200
    assert [s.raw_path for s in w.upstream.seen[before:]] == ["/v1/after"]


def assert_contained(w: World, outcome: Outcome) -> None:
    """The invariants of every case, valid or not."""
    assert outcome.closed, f"still open after {BOUND} s: {outcome.data[:200]!r}"
    assert all(s < 500 for s in outcome.statuses), outcome.data[:300]
    assert w.attacker.hits == 0
    for seen in w.upstream.seen:
        assert seen.raw_path.startswith("/")
        assert SMUGGLED.decode() not in seen.raw_path


H = b"Host: 127.0.0.1\r\n"
CLOSE = b"Connection: close\r\n"
EVIL = b"{evil}"  # replaced by the attacker server's host:port
SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
END_SMUGGLE = b"0\r\n\r\n" + SMUGGLE  # the end of a chunked body, then a smuggled request


def get(target: bytes, *headers: bytes) -> bytes:
    """A GET with Host: 127.0.0.1 and the given header lines."""
    return b"GET " + target + b" HTTP/1.1\r\n" + H + b"".join(headers) + b"\r\n"


def post(*headers: bytes, body: bytes = b"") -> bytes:
    return b"POST /v1/front HTTP/1.1\r\n" + H + b"".join(headers) + b"\r\n" + body


def cl(length: bytes) -> bytes:
    return b"Content-Length: " + length + b"\r\n"


# (id, raw bytes, the raw paths the upstream must see: () = refused, nothing forwarded)
CORPUS: list[tuple[str, bytes, tuple[str, ...]]] = [
    # -- bad request lines
    ("garbage", b"GARBAGE\r\n\r\n", ()),
    ("method-only", b"GET\r\n\r\n", ()),
    ("http-0.9", b"GET /v1/x\r\n\r\n", ()),
    ("extra-token", b"GET /v1/x HTTP/1.1 extra\r\n" + H + b"\r\n", ()),
    ("bad-version", b"GET /v1/x HTTP/9.9\r\n" + H + CLOSE + b"\r\n", ()),
    ("bad-method-char", b"G@T /v1/x HTTP/1.1\r\n" + H + b"\r\n", ()),
    ("space-in-target", get(b"/v1/x y"), ()),
    ("nul-in-target", get(b"/v1/x\x00y"), ()),
    ("tls-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), ()),
    ("huge-target", get(b"/" + b"a" * 9000), ()),
    # -- proxy forms: never an open proxy
    ("absolute-form", b"GET http://" + EVIL + b"/v1/x HTTP/1.1\r\nHost: " + EVIL + b"\r\n\r\n", ()),
    ("absolute-form-own-host", get(b"http://127.0.0.1/v1/x"), ()),
    ("authority-form", get(EVIL), ()),
    ("connect", b"CONNECT " + EVIL + b" HTTP/1.1\r\nHost: " + EVIL + b"\r\n\r\n", ()),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", ()),
    ("userinfo-target", get(b"@" + EVIL + b"/v1/x"), ()),
    # -- path tricks: odd but origin-form, so they go to the configured upstream only
    ("dot-dot", get(b"/v1/../../etc/passwd", CLOSE), ("/v1/../../etc/passwd",)),
    ("encoded-dot-dot", get(b"/%2e%2e/%2E%2E/x", CLOSE), ("/%2e%2e/%2E%2E/x",)),
    ("double-slash-host", get(b"//" + EVIL + b"/v1/x", CLOSE), ("//{evil}/v1/x",)),
    ("backslash-host", get(b"/\\" + EVIL + b"/v1/x", CLOSE), ("/\\{evil}/v1/x",)),
    # The proxy routes on the literal path and does not resolve dot segments: this is
    # not one of its own paths, so it goes to the upstream, which sees the literal target.
    ("dot-dot-into-reserved", get(b"/v1/../_proxy/nope", CLOSE), ("/v1/../_proxy/nope",)),
    ("reserved-dot-dot-out", get(b"/_proxy/../v1/x", CLOSE), ()),
    ("non-utf8-target", get(b"/v1/caf\xe9", CLOSE), ()),
    # -- Host
    ("no-host", b"GET /v1/x HTTP/1.1\r\n" + CLOSE + b"\r\n", ()),
    ("duplicate-host", get(b"/v1/x", H, CLOSE), ()),
    ("evil-host", b"GET /v1/x HTTP/1.1\r\nHost: " + EVIL + b"\r\n" + CLOSE + b"\r\n", ()),
    ("host-and-evil-host", get(b"/v1/x", b"Host: " + EVIL + b"\r\n"), ()),
    # -- header injection and malformed fields
    ("bare-cr-in-value", get(b"/v1/x", b"X-A: a\rInjected: 1\r\n"), ()),
    ("bare-lf-in-value", get(b"/v1/x", b"X-A: a\nHost: " + EVIL + b"\r\n"), ()),
    ("nul-in-value", get(b"/v1/x", b"X-A: a\x00b\r\n"), ()),
    ("space-before-colon", get(b"/v1/x", b"X-A : b\r\n"), ()),
    ("space-in-name", get(b"/v1/x", b"X A: b\r\n"), ()),
    ("obs-fold", get(b"/v1/x", b"X-A: a\r\n b\r\n"), ()),
    ("non-utf8-name", get(b"/v1/x", b"\xff: a\r\n"), ()),
    ("no-colon", get(b"/v1/x", b"X-A\r\n"), ()),
    ("huge-header", get(b"/v1/x", b"X-A: " + b"a" * 9000 + b"\r\n"), ()),
    ("many-headers", get(b"/v1/x", b"X-A: a\r\n" * 200), ()),
    # -- request smuggling: the smuggled request must never reach the upstream
    ("cl-te", post(cl(b"6"), TE, body=END_SMUGGLE), ()),
    ("te-cl", post(TE, cl(b"3"), body=b"8\r\nSMUGGLED\r\n" + END_SMUGGLE), ()),
    ("te-te-xchunked", post(TE, b"Transfer-Encoding: xchunked\r\n", body=END_SMUGGLE), ()),
    ("te-xchunked-cl", post(b"Transfer-Encoding: xchunked\r\n", cl(b"5"), body=END_SMUGGLE), ()),
    ("te-leading-space", post(b"Transfer-Encoding:  chunked\r\n", cl(b"5"), body=END_SMUGGLE), ()),
    ("te-folded", post(b"Transfer-Encoding:\r\n chunked\r\n", cl(b"5"), body=END_SMUGGLE), ()),
    ("te-space-name", post(b"Transfer-Encoding : chunked\r\n", cl(b"5"), body=END_SMUGGLE), ()),
    ("te-then-identity", post(b"Transfer-Encoding: chunked, identity\r\n", body=END_SMUGGLE), ()),
    ("two-cl", post(cl(b"5"), cl(b"52"), body=b"hello" + SMUGGLE), ()),
    ("cl-list", post(cl(b"5, 52"), body=b"hello" + SMUGGLE), ()),
    ("cl-plus", post(cl(b"+5"), body=b"hello" + SMUGGLE), ()),
    ("cl-negative", post(cl(b"-1"), body=SMUGGLE), ()),
    ("cl-hex", post(cl(b"0x5"), body=b"hello" + SMUGGLE), ()),
    # -- bad chunks
    ("chunk-size-not-hex", post(TE, body=b"zz\r\nab\r\n0\r\n\r\n"), ()),
    ("chunk-size-negative", post(TE, body=b"-1\r\nab\r\n0\r\n\r\n"), ()),
    ("chunk-size-0x", post(TE, body=b"0x2\r\nab\r\n0\r\n\r\n"), ()),
    ("chunk-size-huge", post(TE, body=b"f" * 40 + b"\r\nab\r\n"), ()),
    ("chunk-bad-ending", post(TE, body=b"2\r\nabXX" + END_SMUGGLE), ()),
    ("chunk-lf-in-ext", post(TE, body=b"2;\nx\r\nab\r\n0\r\n\r\n"), ()),
]


@pytest.mark.parametrize(("data", "paths"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
async def test_corpus_case_is_refused_or_contained(data: bytes, paths: tuple[str, ...]) -> None:
    async with world() as w:
        outcome = await exchange(w.port, data.replace(EVIL, w.evil))
        assert_contained(w, outcome)
        expected = [p.replace("{evil}", w.evil.decode()) for p in paths]
        assert [s.raw_path for s in w.upstream.seen] == expected
        if not paths:
            # Refused: a 4xx, or a closed connection with nothing said.
            assert all(400 <= s < 500 for s in outcome.statuses), outcome.data[:300]
        else:
            assert outcome.statuses == [200]
        await assert_still_serves(w)


async def test_a_valid_chunked_body_is_forwarded_whole() -> None:
    """The control for the chunk cases: correct framing works."""
    async with world() as w:
        data = post(
            b"Transfer-Encoding: chunked\r\n", CLOSE, body=b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
        )
        outcome = await exchange(w.port, data)
        assert outcome.statuses == [200]
        assert [(s.raw_path, s.body) for s in w.upstream.seen] == [("/v1/front", b"abc")]


async def test_pipelined_requests_are_each_forwarded_once() -> None:
    """The control for the smuggling cases: what the proxy itself parsed passes the guard."""
    async with world() as w:
        first = b"GET /v1/one HTTP/1.1\r\n" + H + b"\r\n"
        second = b"GET /v1/two HTTP/1.1\r\n" + H + CLOSE + b"\r\n"
        outcome = await exchange(w.port, first + second)
        assert outcome.statuses == [200, 200]
        assert [s.raw_path for s in w.upstream.seen] == ["/v1/one", "/v1/two"]


@pytest.mark.parametrize("declared", [100, 2 * 1024 * 1024])
async def test_a_truncated_body_never_reaches_the_upstream_whole(declared: int) -> None:
    """The client promises `declared` bytes, sends 10 and goes away."""
    async with world() as w:
        data = post(f"Content-Length: {declared}\r\n".encode(), body=b"0123456789")
        reader, writer = await asyncio.open_connection("127.0.0.1", w.port)
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()
        await writer.wait_closed()
        del reader
        await asyncio.sleep(0.3)
        # A small body is kept for a replay, so never sent; a large one is streamed and
        # the upstream's request fails mid-body: neither arrives as a complete request.
        assert w.upstream.hits == 0
        assert w.attacker.hits == 0
        await assert_still_serves(w)


# -- generated cases ------------------------------------------------------------------

METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE"])
ODD_TOKENS = st.binary(min_size=1, max_size=12)
SEGMENTS = st.sampled_from(
    [b"v1", b"..", b".", b"%2e%2e", b"%2E%2e", b"", b"_proxy", b"\\", b"{evil}", b"@{evil}",
     b"%00", b"caf\xc3\xa9", b"\xff\xfe", b"?", b"#", b"%", b"a b", b"\t"]
)  # fmt: skip
PREFIXES = st.sampled_from(
    [b"/", b"//", b"http://{evil}/", b"https://{evil}/", b"{evil}", b"*", b"", b"/\\", b"\\\\"]
)
HEADER_NAMES = st.sampled_from(
    [b"Host", b"X-A", b"Origin", b"Sec-Fetch-Site", b"Connection", b"Expect", b"Upgrade",
     b"Authorization", b"Proxy-Authorization", b"X-Forwarded-Host", b"TE", b"Trailer",
     b"Host ", b" Host", b"X\xffA", b"X A", b"Content-Type"]
)  # fmt: skip
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [b"127.0.0.1", b"{evil}", b"localhost:1", b"null", b"cross-site", b"close",
         b"keep-alive, Host", b"100-continue", b"websocket", b"a\rb", b"a\nb", b"a\x00b",
         b"\xff\xfe", b"caf\xc3\xa9", b"", b" ", b"x" * 9000]
    ),
    st.binary(max_size=40),
)  # fmt: skip


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    """A request line and headers from hostile parts; the body is framed consistently."""
    method = draw(st.one_of(METHODS.map(str.encode), ODD_TOKENS))
    target = draw(PREFIXES) + b"/".join(draw(st.lists(SEGMENTS, max_size=5)))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0", b""]))
    line = b" ".join(part for part in (method, target, version) if part)
    headers = [b"Host: 127.0.0.1"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 6))):
        headers.append(draw(HEADER_NAMES) + b": " + draw(HEADER_VALUES))
    body = draw(st.binary(max_size=64))
    if body:
        headers.append(b"Content-Length: %d" % len(body))
    headers.append(b"Connection: close")
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize="PLEO_PROXY_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=hostile_requests())
async def test_generated_hostile_requests_are_contained(data: bytes) -> None:
    async with world() as w:
        outcome = await exchange(w.port, data.replace(EVIL, w.evil))
        assert_contained(w, outcome)
        # Whatever was forwarded went to the upstream, once, as the origin-form target.
        assert w.upstream.hits <= 1
        if w.upstream.hits:
            assert outcome.statuses in ([200], [])
        await assert_still_serves(w)
