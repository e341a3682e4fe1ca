"""Where the proxy spends its time under small-GET load: py-spy on the real process.

Owns the profiling run only: the servers, the load and the tables come from
bench.run. Starts the upstream stand-in and `python -m proxy run` (API-key mode, as
bench.run), drives small GETs over keep-alive connections, samples the proxy with
`py-spy record --format raw` meanwhile, and prints the functions with the largest
share of samples, inclusive and self. Must not be imported by `proxy` or run as a test.

    python -m bench.profile [--seconds 10] [--connections 64] [--top 30] [--raw FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.run import (
    REPO_ROOT,
    Server,
    _spawn,
    _stop,
    free_port,
    measure_small,
    proxy_config,
    start_upstream,
    wait_ready,
)


def summarise(raw: str, top: int) -> str:
    """Collapsed stacks (`frame;frame;... count`) → the top frames, inclusive and self."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if frame]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples"]
    for title, counter in (("inclusive", inclusive), ("self", own)):
        lines.append(f"\n{title} (% of samples):")
        for frame, count in counter.most_common(top):
            lines.append(f"{100 * count / total:6.1f}  {frame}")
    return "\n".join(lines)


async def profile(seconds: float, connections: int, raw_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="pleo-profile-") as tmp:
        workdir = Path(tmp)
        proxy_port = free_port()
        upstream = await start_upstream(workdir)
        started = [upstream.process]
        try:
            config = proxy_config(workdir, proxy_port, upstream.url)
            started.append(
                _spawn(["-m", "proxy", "run", "--config", str(config)], workdir / "proxy.log")
            )
            proxy = Server(f"http://127.0.0.1:{proxy_port}", started[1])
            await wait_ready(proxy, "/small", workdir / "proxy.log")
            await measure_small(proxy.url, connections, 1.0)  # warm up
            spy = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--format", "raw", "--rate", "999", "--nonblocking",
                "--duration", str(int(seconds)), "--output", str(raw_path),
                "--pid", str(proxy.pid),
                cwd=REPO_ROOT,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            result = await measure_small(proxy.url, connections, seconds)
            await spy.wait()
            print(f"{result.rps:.0f} req/s at {connections} connections while sampled")
        finally:
            for process in reversed(started):
                _stop(process)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--raw", type=Path, default=None, help="keep py-spy's collapsed stacks")
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("error: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="pleo-profile-out-") as out:
        raw_path = args.raw or Path(out) / "profile.txt"
        asyncio.run(profile(args.seconds, args.connections, raw_path))
        print(summarise(raw_path.read_text(), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
