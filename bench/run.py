"""Benchmark: the proxy side by side with a direct connection and a minimal forwarder.

Owns the upstream stand-in, the ~30-line reference forwarder, the load client and the
table. Every server runs in its own child process (the client's CPU is not shared with
a server's event loop); the proxy runs as `python -m proxy run --config FILE` in
API-key mode. Must not be imported by `proxy` or run as a test.

    python -m bench.run [--quick] [--seconds N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.load import gets

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
CHUNK = 64 * 1024
UPLOAD_CHUNK = 1 * MIB
# ~200 bytes, the size of a small Pleo API answer.
SMALL_BODY = json.dumps(
    {
        "id": "00000000-0000-4000-8000-000000000000",
        "amount": {"value": 12345, "currency": "DKK"},
        "merchant": "Bench Coffee ApS",
        "status": "APPROVED",
        "note": "x" * 60,
    }
).encode()
TARGETS = ("direct", "forwarder", "proxy")
SLOW_SECONDS = 0.5
SLOW_CLIENTS = 512
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# Hop-by-hop headers (RFC 9110 §7.6.1) never cross a forwarder.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "host",
    }
)


# ---------------------------------------------------------------- upstream stand-in


async def small(request: web.Request) -> web.Response:
    return web.Response(body=SMALL_BODY, content_type="application/json")


async def big(request: web.Request) -> web.StreamResponse:
    """`GET /big?size=N`: N bytes, streamed with a Content-Length."""
    size = int(request.query.get("size", str(MIB)))
    response = web.StreamResponse()
    response.content_length = size
    response.content_type = "application/octet-stream"
    await response.prepare(request)
    block = memoryview(b"\0" * CHUNK)
    sent = 0
    while sent < size:
        part = block[: min(CHUNK, size - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    """`POST /upload`: counts the bytes received and says how many."""
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.json_response({"received": received})


async def slow(request: web.Request) -> web.Response:
    """`GET /slow`: the small body after SLOW_SECONDS, as a busy remote API answers."""
    await asyncio.sleep(SLOW_SECONDS)
    return web.Response(body=SMALL_BODY, content_type="application/json")


def upstream_app() -> web.Application:
    app = web.Application()
    app.add_routes(
        [
            web.get("/small", small),
            web.get("/slow", slow),
            web.get("/big", big),
            web.post("/upload", upload),
        ]
    )
    return app


# ---------------------------------------------------------------- minimal forwarder


def forwarder_app(upstream: str) -> web.Application:
    """The reference: what any aiohttp forwarder costs, without guard, auth or replay."""
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)  # no pool queue of its own
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app[session_key] = session
            yield

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = request.content if request.body_exists else None
        async with request.app[session_key].request(
            request.method, upstream + request.raw_path, headers=headers, data=body
        ) as upstream_response:
            response = web.StreamResponse(status=upstream_response.status)
            response.headers.extend(
                (k, v) for k, v in upstream_response.headers.items() if k.lower() not in HOP_BY_HOP
            )
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


# ---------------------------------------------------------------- child processes


async def serve_until_signal(app: web.Application, port: int) -> None:
    """Serve on 127.0.0.1:`port` until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def free_port() -> int:
    """An ephemeral loopback port, free now (the child binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Server:
    """A server child: its base URL and pid (whose /proc status gives the peak RSS)."""

    url: str
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid


def _spawn(
    argv: Sequence[str], log_path: Path, *, under_test: bool = True
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    pin(process.pid, under_test=under_test)
    return process


PIN = os.environ.get("PLEO_BENCH_PIN") == "1"


def cores(*, under_test: bool) -> set[int] | None:
    """Where a process runs: a server under test on its own core; the load client and
    the upstream stand-in share the other (None: fewer than 2 cores, no pinning)."""
    if not PIN:
        return None
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(available) < 2:
        return None
    return {available[-1]} if under_test else {available[0]}


def pin(pid: int, *, under_test: bool) -> None:
    chosen = cores(under_test=under_test)
    if chosen is not None:
        os.sched_setaffinity(pid, chosen)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(log_path: Path) -> str:
    """The end of a child's output, for the error when it failed to start."""
    return log_path.read_text(errors="replace")[-2000:]


async def wait_ready(server: Server, path: str, log_path: Path) -> None:
    """Poll `path` until it answers 200; fail with the child's output if it died."""
    deadline = time.monotonic() + START_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                break
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(server.url + path) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"server at {server.url} did not start:\n{tail(log_path)}")


async def start_upstream(workdir: Path) -> Server:
    """The upstream stand-in in its own process on a free port, answering (stop it after)."""
    port = free_port()
    log_path = workdir / "upstream.log"
    argv = ["-m", "bench.run", "--port", str(port), "--serve", "upstream"]
    server = Server(f"http://127.0.0.1:{port}", _spawn(argv, log_path, under_test=False))
    try:
        await wait_ready(server, "/small", log_path)
    except BaseException:
        _stop(server.process)
        raise
    return server


def proxy_config(workdir: Path, port: int, upstream: str) -> Path:
    """A minimal API-key-mode config file (the key is a bench value, not a credential)."""
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "pleo": {"api_url": upstream, "api_key": "bench-key"},
        "tokens": {"path": str(workdir / "tokens.enc"), "key_file": str(workdir / "tokens.key")},
        "timeouts": {"shutdown": 2},
    }
    path = workdir / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@contextlib.asynccontextmanager
async def start_servers(workdir: Path) -> AsyncIterator[dict[str, Server]]:
    """Upstream, forwarder and proxy, each in its own process; all stopped on exit."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        servers: dict[str, Server] = {}
        specs = _server_specs(workdir)
        for name, (argv, url, ready_path) in specs.items():
            log_path = workdir / f"{name}.log"
            process = _spawn(argv, log_path, under_test=name != "direct")
            started.append(process)
            servers[name] = Server(url, process)
            await wait_ready(servers[name], ready_path, log_path)
        yield servers
    finally:
        for process in reversed(started):
            _stop(process)


def _server_specs(workdir: Path) -> dict[str, tuple[list[str], str, str]]:
    # Upstream first: the others are checked by a request that passes through to it.
    ports = {name: free_port() for name in TARGETS}
    upstream = f"http://127.0.0.1:{ports['direct']}"
    config = proxy_config(workdir, ports["proxy"], upstream)
    own = ["-m", "bench.run", "--port"]
    return {
        "direct": ([*own, str(ports["direct"]), "--serve", "upstream"], upstream, "/small"),
        "forwarder": (
            [*own, str(ports["forwarder"]), "--serve", "forwarder", "--upstream", upstream],
            f"http://127.0.0.1:{ports['forwarder']}",
            "/small",
        ),
        "proxy": (
            ["-m", "proxy", "run", "--config", str(config)],
            f"http://127.0.0.1:{ports['proxy']}",
            "/small",
        ),
    }


# ---------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Latency:
    rps: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Transfer:
    mb_per_s: float
    peak_rss_mib: float


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


async def measure_small(
    base: str, connections: int, seconds: float, *, path: str = "/small"
) -> Latency:
    """Small GETs over `connections` keep-alive connections, after a short warm-up."""
    url = base + path
    await gets(url, connections, min(1.0, seconds / 4), SMALL_BODY)
    latencies, elapsed = await gets(url, connections, seconds, SMALL_BODY)
    latencies.sort()
    return Latency(
        rps=len(latencies) / elapsed,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
    )


POST_BYTES = 1 * MIB
POST_CONNECTIONS = 8


async def _post_worker(
    session: aiohttp.ClientSession, url: str, deadline: float, body: bytes, done: list[float]
) -> None:
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        async with session.post(url, data=body) as response:
            answer = await response.json()
        if response.status != 200 or answer.get("received") != len(body):
            raise RuntimeError(f"POST {url}: status {response.status}, answer {answer}")
        done.append(time.perf_counter() - started)


async def measure_posts(base: str, seconds: float) -> Latency:
    """1 MiB POSTs (a Content-Length: kept whole by the proxy, so replayable) over
    POST_CONNECTIONS keep-alive connections."""
    body = b"\0" * POST_BYTES
    connector = aiohttp.TCPConnector(limit=POST_CONNECTIONS)
    done: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline = started + seconds
        workers = [
            _post_worker(session, f"{base}/upload", deadline, body, done)
            for _ in range(POST_CONNECTIONS)
        ]
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - started
    done.sort()
    return Latency(
        rps=len(done) / elapsed,
        p50_ms=statistics.median(done) * 1000,
        p99_ms=percentile(done, 0.99) * 1000,
    )


def reset_peak_rss(pid: int) -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each transfer has its own peak."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB → MiB
    raise RuntimeError(f"no VmHWM for pid {pid}")


async def _download(base: str, size: int) -> None:
    received = 0
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(f"{base}/big?size={size}") as response,
    ):
        async for chunk in response.content.iter_any():
            received += len(chunk)
    if response.status != 200 or received != size:
        raise RuntimeError(f"download: status {response.status}, {received} of {size} bytes")


async def _chunks(size: int) -> AsyncIterator[bytes]:
    block = b"\0" * UPLOAD_CHUNK
    sent = 0
    while sent < size:
        part = block[: min(UPLOAD_CHUNK, size - sent)]
        yield part
        sent += len(part)


async def _upload(base: str, size: int) -> None:
    # A Content-Length, as `curl -T` sends: the proxy streams it (too big to replay).
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/upload", data=_chunks(size), headers=headers) as response,
    ):
        answer = await response.json()
    if response.status != 200 or answer.get("received") != size:
        raise RuntimeError(f"upload: status {response.status}, answer {answer}")


async def measure_transfer(server: Server, size: int, *, upload_direction: bool) -> Transfer:
    """One streamed transfer of `size` bytes; MB/s (10^6) and the server's peak RSS."""
    reset_peak_rss(server.pid)
    started = time.perf_counter()
    if upload_direction:
        await _upload(server.url, size)
    else:
        await _download(server.url, size)
    elapsed = time.perf_counter() - started
    return Transfer(mb_per_s=size / elapsed / 1e6, peak_rss_mib=peak_rss_mib(server.pid))


# ---------------------------------------------------------------- the run and the table


@dataclass(frozen=True)
class Settings:
    seconds: float
    download_bytes: int
    upload_bytes: int


Row = tuple[str, dict[str, float]]


async def small_rows(servers: dict[str, Server], connections: int, seconds: float) -> list[Row]:
    results = {
        name: await measure_small(servers[name].url, connections, seconds) for name in TARGETS
    }
    label = f"GET small, {connections} conn"
    return [
        (f"{label}: req/s", {n: r.rps for n, r in results.items()}),
        (f"{label}: p50 ms", {n: r.p50_ms for n, r in results.items()}),
        (f"{label}: p99 ms", {n: r.p99_ms for n, r in results.items()}),
    ]


async def slow_rows(servers: dict[str, Server], seconds: float) -> list[Row]:
    """Many clients waiting on a slow upstream: the proxy must not queue them itself."""
    results = {
        name: await measure_small(servers[name].url, SLOW_CLIENTS, max(seconds, 3.0), path="/slow")
        for name in TARGETS
    }
    label = f"{SLOW_SECONDS * 1000:.0f} ms upstream, {SLOW_CLIENTS} conn"
    return [
        (f"{label}: req/s", {n: r.rps for n, r in results.items()}),
        (f"{label}: p50 ms", {n: r.p50_ms for n, r in results.items()}),
    ]


async def post_rows(servers: dict[str, Server], seconds: float) -> list[Row]:
    results = {name: await measure_posts(servers[name].url, seconds) for name in TARGETS}
    label = f"POST {POST_BYTES // MIB} MiB, {POST_CONNECTIONS} conn"
    return [
        (f"{label}: req/s", {n: r.rps for n, r in results.items()}),
        (f"{label}: p50 ms", {n: r.p50_ms for n, r in results.items()}),
    ]


async def transfer_rows(servers: dict[str, Server], size: int, *, upload: bool) -> list[Row]:
    results = {
        name: await measure_transfer(servers[name], size, upload_direction=upload)
        for name in TARGETS
    }
    label = f"{'upload' if upload else 'download'} {size // MIB} MiB"
    return [
        (f"{label}: MB/s", {n: r.mb_per_s for n, r in results.items()}),
        (f"{label}: peak RSS MiB", {n: r.peak_rss_mib for n, r in results.items()}),
    ]


async def run_all(settings: Settings) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="pleo-bench-") as tmp:
        async with start_servers(Path(tmp)) as servers:
            rows = await small_rows(servers, 1, settings.seconds)
            rows += await small_rows(servers, 64, settings.seconds)
            rows += await slow_rows(servers, settings.seconds)
            rows += await post_rows(servers, settings.seconds)
            rows += await transfer_rows(servers, settings.download_bytes, upload=False)
            rows += await transfer_rows(servers, settings.upload_bytes, upload=True)
            return rows


def format_table(rows: Sequence[Row]) -> str:
    header = ("scenario", "direct", "min. forwarder", "proxy", "proxy ÷ fwd")
    lines: list[tuple[str, ...]] = [header]
    for label, values in rows:
        ratio = values["proxy"] / values["forwarder"] if values["forwarder"] else float("nan")
        lines.append((label, *(f"{values[n]:.1f}" for n in TARGETS), f"{ratio:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        out.append("| " + " | ".join(cells) + " |")
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def describe_machine() -> str:
    return (
        f"{time.strftime('%Y-%m-%d')}, {platform.platform()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs")
    parser.add_argument("--seconds", type=float, default=None, help="per small-GET run")
    # Internal: how the bench starts its own server children.
    parser.add_argument("--serve", choices=["upstream", "forwarder"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(args.seconds or 1.0, 64 * MIB, 32 * MIB)
    return Settings(args.seconds or 5.0, 512 * MIB, 256 * MIB)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        app = upstream_app() if args.serve == "upstream" else forwarder_app(args.upstream)
        asyncio.run(serve_until_signal(app, args.port))
        return 0
    settings = settings_from(args)
    pin(os.getpid(), under_test=False)  # the load client, beside the upstream stand-in
    try:
        rows = asyncio.run(run_all(settings))
    except KeyboardInterrupt:
        return 130  # the servers were stopped on the way out
    print(describe_machine())
    print(
        f"small GETs: {settings.seconds:g} s per run; download {settings.download_bytes // MIB}"
        f" MiB, upload {settings.upload_bytes // MIB} MiB; RSS = the server process's VmHWM"
    )
    under_test, beside = cores(under_test=True), cores(under_test=False)
    if under_test is not None and beside is not None:
        print(
            f"forwarder and proxy on CPU {min(under_test)}; load client and upstream on"
            f" CPU {min(beside)}"
        )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
