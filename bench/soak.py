"""Soak: the proxy under mixed traffic with short-lived tokens for a while; does it hold up?

Owns the soak run: the sandbox and `pleo-proxy run` as child processes, the one-time
authorisation (through the sandbox's consent page), mixed traffic (small GETs and
POSTs, large downloads and uploads, an occasional 401 from the API), and the verdict.
Must not be imported by `proxy`.

    python -m bench.soak [--seconds 300] [--ttl 3] [--concurrency 8] [--json]

Exit 0 when there were no failures, no refresh-token reuse, at least one refresh, and
neither the proxy's RSS nor its open file descriptors grew beyond noise; else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.config import load_config
from proxy.connect.authorise import read_authorize_url
from proxy.demo import walk_authorisation

MIB = 1024 * 1024
START_TIMEOUT = 30.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=60)
WARM_UP_SECONDS = 2.0  # RSS and fds are sampled after this: imports and pools settle first
# Growth allowed between the start and end samples: beyond this it is not noise.
RSS_GROWTH_LIMIT = 30 * MIB
FD_GROWTH_LIMIT = 16
LARGE = 3 * MIB  # larger than refresh.replay_body_limit: streamed, never replayed


@dataclass
class Sample:
    rss_bytes: int
    open_fds: int


@dataclass
class Report:
    seconds: float
    requests: int = 0
    failures: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    not_replayed: int = 0  # 401 + X-Pleo-Proxy-Replay: body-too-large (documented)
    refreshes: int = 0
    reuse_detected: int = 0
    start: Sample | None = None
    end: Sample | None = None
    problems: list[str] = field(default_factory=list)

    def fail(self, kind: str) -> None:
        self.failures += 1
        self.failure_kinds[kind] = self.failure_kinds.get(kind, 0) + 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample(pid: int) -> Sample:
    """VmRSS and the number of entries in /proc/<pid>/fd of a running process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return Sample(rss_bytes=rss, open_fds=len(os.listdir(f"/proc/{pid}/fd")))


@contextlib.asynccontextmanager
async def child(args: Sequence[str], health_url: str) -> AsyncIterator[int]:
    """Run `python -m proxy …` until `health_url` answers 200; SIGTERM on exit; yields pid."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await wait_for(health_url)
        yield process.pid
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def wait_for(url: str) -> None:
    async with asyncio.timeout(START_TIMEOUT), aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)


async def control(
    session: aiohttp.ClientSession, sandbox: str, path: str, body: object = None
) -> dict[str, Any]:
    """A sandbox control call: POST with a JSON body, or GET without one."""
    method = "GET" if body is None else "POST"
    async with session.request(method, f"{sandbox}/_sandbox/{path}", json=body) as response:
        response.raise_for_status()
        answer: dict[str, Any] = await response.json()
        return answer


def write_config(directory: Path, *, sandbox: str, port: int) -> Path:
    doc = {
        "listen": {"host": "127.0.0.1", "port": port},
        "pleo": {
            "environment": "sandbox",
            "api_url": sandbox,
            "authorize_url": f"{sandbox}/oauth/authorize",
            "token_url": f"{sandbox}/oauth/token",
            "client_id": "sandbox-client",
            "client_secret": "sandbox-secret",
            "scopes": ["users:read", "test:test"],
            "redirect_uri": f"http://localhost:{port}/_proxy/callback",
        },
        "tokens": {"path": str(directory / "tokens.enc"), "key_file": str(directory / "t.key")},
        "timeouts": {"token_request": 5, "connect": 2, "shutdown": 5},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def authorise(config_path: Path) -> None:
    """Walk the one-time page as a browser would (the sandbox approves)."""
    url = read_authorize_url(load_config(config_path))
    if url is None:
        raise RuntimeError("the proxy wrote no authorise URL")
    walk = await walk_authorisation(url)
    if walk.status != 200:
        raise RuntimeError(f"authorisation failed with HTTP {walk.status}")


# -- traffic ---------------------------------------------------------------------------


async def one_request(
    session: aiohttp.ClientSession, base: str, rng: random.Random, report: Report
) -> None:
    """One request of the mix; anything but the expected answer is a failure."""
    roll = rng.random()
    if roll < 0.6:
        method, path, data = "GET", "/v1/introspect", None
    elif roll < 0.85:
        method, path, data = "POST", "/v1/uploads", rng.randbytes(rng.randint(1, 4096))
    elif roll < 0.93:
        method, path, data = "GET", f"/v1/attachments/{LARGE}", None
    else:
        method, path, data = "POST", "/v1/uploads", rng.randbytes(LARGE)
    report.requests += 1
    try:
        async with session.request(method, base + path, data=data) as response:
            body = await response.read()
            replay = response.headers.get("X-Pleo-Proxy-Replay")
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        report.fail(type(exc).__name__)
        return
    if status == 401 and replay == "body-too-large":
        report.not_replayed += 1  # the documented answer for a large body after a 401
    elif status != 200:
        report.fail(f"HTTP {status}")
    elif path.startswith("/v1/attachments") and len(body) != LARGE:
        report.fail("short download")


async def worker(base: str, deadline: float, seed: int, report: Report) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        while time.monotonic() < deadline:
            await one_request(session, base, rng, report)


async def api_401s(sandbox: str, deadline: float) -> None:
    """Now and then the API rejects a valid token once: refresh and replay must cope."""
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        while time.monotonic() < deadline:
            await asyncio.sleep(1.5)
            await control(session, sandbox, "knobs", {"api_401_once": True})


# -- the run ---------------------------------------------------------------------------


async def soak(seconds: float, *, ttl: float, concurrency: int) -> Report:
    report = Report(seconds=seconds)
    sandbox_port, proxy_port = free_port(), free_port()
    sandbox = f"http://127.0.0.1:{sandbox_port}"
    base = f"http://127.0.0.1:{proxy_port}"
    redirect = f"http://localhost:{proxy_port}/_proxy/callback"
    with tempfile.TemporaryDirectory(prefix="pleo-soak-") as tmp:
        config_path = write_config(Path(tmp), sandbox=sandbox, port=proxy_port)
        sandbox_args = ["sandbox", "--port", str(sandbox_port), "--redirect-uri", redirect]
        async with (
            child(sandbox_args, f"{sandbox}/_sandbox/stats"),
            aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session,
        ):
            await control(session, sandbox, "knobs", {"access_ttl": ttl})
            run_args = ["run", "--config", str(config_path)]
            async with child(run_args, f"{base}/_proxy/healthz") as pid:
                await authorise(config_path)
                await control(session, sandbox, "reset-stats", {})
                await traffic(base, sandbox, pid, seconds, concurrency, report)
            stats = await control(session, sandbox, "stats")
    report.refreshes = int(stats["refresh_grants"])
    report.reuse_detected = int(stats["reuse_detected"])
    report.problems = verdict(report, ttl=ttl)
    return report


async def traffic(
    base: str, sandbox: str, pid: int, seconds: float, concurrency: int, report: Report
) -> None:
    """Warm up, sample, run the mix until the deadline, let the pools settle, sample."""
    deadline = time.monotonic() + seconds
    tasks = [worker(base, deadline, seed, report) for seed in range(concurrency)]
    tasks.append(api_401s(sandbox, deadline))
    running = asyncio.gather(*tasks)
    await asyncio.sleep(min(WARM_UP_SECONDS, seconds / 4))
    report.start = sample(pid)
    await running
    await asyncio.sleep(1.0)  # closed client connections leave the proxy's fd table
    report.end = sample(pid)


def verdict(report: Report, *, ttl: float) -> list[str]:
    """Why the run failed; empty when it passed."""
    problems = []
    if report.failures:
        problems.append(f"{report.failures} failed requests: {report.failure_kinds}")
    if report.reuse_detected:
        problems.append(f"refresh token reuse detected {report.reuse_detected} times")
    if report.seconds > 2 * ttl and report.refreshes == 0:
        problems.append("no refresh happened although tokens expired")
    if report.start is not None and report.end is not None:
        rss = report.end.rss_bytes - report.start.rss_bytes
        fds = report.end.open_fds - report.start.open_fds
        if rss > RSS_GROWTH_LIMIT:
            problems.append(f"RSS grew by {rss / MIB:.1f} MiB")
        if fds > FD_GROWTH_LIMIT:
            problems.append(f"open file descriptors grew by {fds}")
    return problems


def render(report: Report) -> str:
    assert report.start is not None
    assert report.end is not None
    lines = [
        f"soak: {report.seconds:.0f} s, {report.requests} requests, {report.failures} failures",
        f"  refreshes {report.refreshes}, reuse detected {report.reuse_detected}, "
        f"large bodies not replayed after a 401: {report.not_replayed}",
        f"  RSS  {report.start.rss_bytes / MIB:.1f} MiB -> {report.end.rss_bytes / MIB:.1f} MiB",
        f"  fds  {report.start.open_fds} -> {report.end.open_fds}",
        "verdict: " + ("PASS" if not report.problems else "FAIL: " + "; ".join(report.problems)),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=300.0, help="how long (default 300)")
    parser.add_argument("--ttl", type=float, default=3.0, help="access token lifetime (3 s)")
    parser.add_argument("--concurrency", type=int, default=8, help="client workers (8)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = asyncio.run(soak(args.seconds, ttl=args.ttl, concurrency=args.concurrency))
    print(json.dumps(asdict(report)) if args.json else render(report), flush=True)
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
