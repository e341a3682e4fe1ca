"""Small GETs, A/B: the forwarder on asyncio's loop and on uvloop, and the proxy, in rounds.

Owns the alternating rounds only; servers, load and measurements come from bench.run.
Alternating the three, round after round, shows how much of a difference is noise on a
shared machine; the uvloop forwarder shows what the event loop alone is worth (the proxy
runs on uvloop when the `speed` extra is installed). Must not be imported by `proxy`.

    python -m bench.ab [--rounds 3] [--seconds 2] [--connections 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.run import (
    Latency,
    Server,
    _spawn,
    _stop,
    free_port,
    measure_small,
    pin,
    proxy_config,
    start_upstream,
    wait_ready,
)

NAMES = ("forwarder", "forwarder on uvloop", "proxy")


def _argv(name: str, port: int, upstream: str, workdir: Path) -> list[str]:
    forwarder = ["--port", str(port), "--serve", "forwarder", "--upstream", upstream]
    if name == "forwarder":
        return ["-m", "bench.run", *forwarder]
    if name == "forwarder on uvloop":
        code = (
            f"import sys, uvloop; uvloop.install(); import bench.run; bench.run.main({forwarder!r})"
        )
        return ["-c", code]
    return ["-m", "proxy", "run", "--config", str(proxy_config(workdir, port, upstream))]


async def rounds(count: int, seconds: float, connections: int) -> dict[str, list[Latency]]:
    with tempfile.TemporaryDirectory(prefix="pleo-ab-") as tmp:
        workdir = Path(tmp)
        stand_in = await start_upstream(workdir)
        upstream = stand_in.url
        started = [stand_in.process]
        try:
            servers = {}
            for index, name in enumerate(NAMES):
                port = free_port()
                log = workdir / f"server-{index}.log"
                started.append(_spawn(_argv(name, port, upstream, workdir), log))
                servers[name] = Server(f"http://127.0.0.1:{port}", started[-1])
                await wait_ready(servers[name], "/small", log)
            results: dict[str, list[Latency]] = {name: [] for name in NAMES}
            for _ in range(count):
                for name in NAMES:
                    results[name].append(
                        await measure_small(servers[name].url, connections, seconds)
                    )
            return results
        finally:
            for process in reversed(started):
                _stop(process)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args(argv)
    pin(os.getpid(), under_test=False)  # as bench.run: the servers have the other core
    results = asyncio.run(rounds(args.rounds, args.seconds, args.connections))
    print(f"small GETs, {args.connections} connections, {args.rounds} rounds of {args.seconds:g} s")
    print("| server | req/s per round | p50 ms per round |")
    print("|---|---|---|")
    for name, runs in results.items():
        rps = " / ".join(f"{r.rps:.0f}" for r in runs)
        p50 = " / ".join(f"{r.p50_ms:.2f}" for r in runs)
        print(f"| {name} | {rps} | {p50} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
