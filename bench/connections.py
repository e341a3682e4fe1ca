"""Benchmark: one proxy carrying thousands of connections, against the bundled sandbox.

Prints a table: start-up time and token calls at start-up with N stored connections;
RSS after start-up and under traffic; per-request p50/p99 to random connections beside
the same proxy with one connection; refreshes per second at `refresh.max_concurrent`
with a slow token endpoint, and the most token calls the endpoint saw at once. Every
server is a child process (the sandbox, `pleo-proxy run`); the client is this process.
Must not be imported by `proxy` or run as a test.

    python -m bench.connections [--connections 10000] [--active 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.run import describe_machine, free_port, percentile, tail

PLEO_PROXY = [sys.executable, "-m", "proxy"]
TOKEN_LATENCY = 0.1  # seconds a token call takes, as over the internet
MAX_CONCURRENT = 4


def _spawn(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def _wait(url: str, process: subprocess.Popen[bytes], log: Path, limit: float = 60) -> float:
    """Seconds until `url` answers 200."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < limit:
            if process.poll() is not None:
                raise RuntimeError(f"exited: {tail(log)}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.01)
    raise RuntimeError(f"{url} not ready: {tail(log)}")


async def _control(sandbox: str, path: str, body: object | None = None) -> Any:
    async with aiohttp.ClientSession() as session:
        method = "POST" if body is not None else "GET"
        async with session.request(method, f"{sandbox}/_sandbox/{path}", json=body) as resp:
            return await resp.json()


def _config(workdir: Path, sandbox: str, port: int, *, one: bool) -> Path:
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "pleo": {
            "environment": "sandbox",
            "api_url": sandbox,
            "authorize_url": f"{sandbox}/oauth/authorize",
            "token_url": f"{sandbox}/oauth/token",
            "client_id": "sandbox-client",
            "client_secret": "sandbox-secret",
            "scopes": ["users:read"],
            "redirect_uri": f"http://localhost:{port}/_proxy/callback",
        },
        "tokens": {"path": str(workdir / "tokens.enc")},
        "refresh": {"max_concurrent": MAX_CONCURRENT},
        "log_level": "warning",
    }
    if not one:
        doc["connections"] = {"configured": []}
    path = workdir / "proxy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def _import(sandbox: str, config: Path, names: list[str], ttl: tuple[float, float]) -> None:
    minted = await _control(
        sandbox, "mint", {"count": len(names), "ttl_min": ttl[0], "ttl_max": ttl[1]}
    )
    fields = ("access_token", "refresh_token", "expires_in")
    lines = [
        json.dumps({"connection": name, **{k: g[k] for k in fields}})
        for name, g in zip(names, minted["grants"], strict=True)
    ]
    done = await asyncio.to_thread(
        subprocess.run,
        [*PLEO_PROXY, "import-tokens", "--config", str(config)],
        input="\n".join(lines).encode(),
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode())


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _latencies(port: int, names: list[str], seconds: float) -> list[float]:
    url = f"http://127.0.0.1:{port}/v1/introspect"
    samples: list[float] = []
    until = time.monotonic() + seconds

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < until:
                headers = {"X-Pleo-Connection": rng.choice(names)} if names else {}
                started = time.perf_counter()
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"status {resp.status}")
                samples.append(time.perf_counter() - started)

    await asyncio.gather(*(client(i) for i in range(8)))
    return sorted(samples)


async def _proxy_run(
    sandbox: str,
    workdir: Path,
    names: list[str],
    *,
    one: bool,
    ttl: tuple[float, float],
    seconds: float,
) -> dict[str, float]:
    port = free_port()
    config = _config(workdir, sandbox, port, one=one)
    if one:
        await _import(sandbox, config, ["default"], ttl)
    else:
        await _import(sandbox, config, names, ttl)
    await _control(sandbox, "reset-stats", {})
    log = workdir / "proxy.log"
    proc = _spawn([*PLEO_PROXY, "run", "--config", str(config)], log)
    try:
        startup = await _wait(f"http://127.0.0.1:{port}/_proxy/healthz", proc, log)
        calls_at_start = (await _control(sandbox, "stats"))["token_requests"]
        rss_start = _rss_mib(proc.pid)
        lat = await _latencies(port, [] if one else names, seconds)
        stats = await _control(sandbox, "stats")
        return {
            "startup_s": startup,
            "calls_at_start": calls_at_start,
            "rss_start": rss_start,
            "rss_traffic": _rss_mib(proc.pid),
            "p50_ms": percentile(lat, 0.5) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000,
            "requests": len(lat),
            "refreshes": stats["refresh_grants"],
            "in_flight_max": stats["token_in_flight_max"],
        }
    finally:
        _stop(proc)


def _sandbox(workdir: Path) -> tuple[str, subprocess.Popen[bytes], Path]:
    port = free_port()
    log = workdir / "sandbox.log"
    proc = _spawn([*PLEO_PROXY, "sandbox", "--port", str(port)], log)
    return f"http://127.0.0.1:{port}", proc, log


async def run(args: argparse.Namespace) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="pleo-bench-") as tmp:
        root = Path(tmp)
        sandbox, proc, log = _sandbox(root)
        try:
            await _wait(f"{sandbox}/_sandbox/stats", proc, log)
            await _control(sandbox, "knobs", {"access_ttl": 3600})
            many = [f"customer-{i:05d}" for i in range(args.connections)]
            stored = await _proxy_run(
                sandbox, _dir(root, "stored"), many, one=False, ttl=(3600, 3600), seconds=1
            )
            active = many[: args.active]
            big = await _proxy_run(
                sandbox,
                _dir(root, "active"),
                active,
                one=False,
                ttl=(3600, 3600),
                seconds=args.seconds,
            )
            one = await _proxy_run(
                sandbox, _dir(root, "one"), [], one=True, ttl=(3600, 3600), seconds=args.seconds
            )
            await _control(sandbox, "knobs", {"token_latency": TOKEN_LATENCY, "access_ttl": 3600})
            churn = await _proxy_run(
                sandbox, _dir(root, "churn"), active, one=False, ttl=(2, 12), seconds=args.seconds
            )
        finally:
            proc.terminate()
            proc.wait()
    rows += [
        (f"start-up, {args.connections} stored connections: s", f"{stored['startup_s']:.2f}"),
        ("token calls during start-up", f"{stored['calls_at_start']:.0f}"),
        (f"RSS after start-up, {args.connections} stored: MiB", f"{stored['rss_start']:.1f}"),
        ("RSS, 1 connection, under traffic: MiB", f"{one['rss_traffic']:.1f}"),
        (f"RSS, {args.active} active connections, under traffic: MiB", f"{big['rss_traffic']:.1f}"),
        ("  above one connection: MiB", f"{big['rss_traffic'] - one['rss_traffic']:.1f}"),
        ("p50 per request, 1 connection: ms", f"{one['p50_ms']:.2f}"),
        (f"p50 per request, {args.active} connections: ms", f"{big['p50_ms']:.2f}"),
        ("  ratio", f"{big['p50_ms'] / one['p50_ms']:.2f}"),
        ("p99 per request, 1 connection: ms", f"{one['p99_ms']:.2f}"),
        (f"p99 per request, {args.active} connections: ms", f"{big['p99_ms']:.2f}"),
        (
            f"refreshes/s, {args.active} tokens of 2-12 s,"
            f" {TOKEN_LATENCY * 1000:.0f} ms token calls, cap {MAX_CONCURRENT}",
            f"{churn['refreshes'] / args.seconds:.1f}",
        ),
        ("token calls in flight at once (max)", f"{churn['in_flight_max']:.0f}"),
    ]
    return rows


def _dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir()
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.connections")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--active", type=int, default=2_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args))
    width = max(len(label) for label, _ in rows)
    print(describe_machine())
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for label, value in rows:
        print(f"| {label.ljust(width)} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
