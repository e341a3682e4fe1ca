"""A short run of bench/soak.py (the long one is opt-in), and its verdict rules.

`PLEO_PROXY_SOAK_SECONDS=300 pytest tests/test_soak.py` runs the full-length soak.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from bench.soak import FD_GROWTH_LIMIT, MIB, RSS_GROWTH_LIMIT, Report, Sample, verdict
from tests.proxyproc import REPO_ROOT

SOAK_SECONDS = float(os.environ.get("PLEO_PROXY_SOAK_SECONDS", "15"))


@pytest.mark.timeout(SOAK_SECONDS + 120)
async def test_a_short_soak_passes() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.soak",
        "--seconds",
        str(SOAK_SECONDS),
        "--ttl",
        "2",
        "--json",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), SOAK_SECONDS + 90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    report = json.loads(out)
    assert report["problems"] == []
    assert process.returncode == 0
    assert report["requests"] > 100
    assert report["failures"] == 0
    assert report["reuse_detected"] == 0
    assert report["refreshes"] >= SOAK_SECONDS / 2 / 2  # 2 s tokens, refreshed at half-life
    for key in ("rss_bytes", "open_fds"):
        assert report["start"][key] > 0
        assert report["end"][key] > 0


def report(**changes: object) -> Report:
    base = Report(seconds=60, requests=1000, refreshes=20)
    base.start = Sample(rss_bytes=50 * MIB, open_fds=20)
    base.end = Sample(rss_bytes=52 * MIB, open_fds=22)
    for name, value in changes.items():
        setattr(base, name, value)
    return base


def test_a_clean_run_passes() -> None:
    assert verdict(report(), ttl=3) == []


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"failures": 2, "failure_kinds": {"HTTP 502": 2}}, "2 failed requests"),
        ({"reuse_detected": 1}, "reuse detected"),
        ({"refreshes": 0}, "no refresh"),
        ({"end": Sample(rss_bytes=50 * MIB + RSS_GROWTH_LIMIT + 1, open_fds=20)}, "RSS grew"),
        ({"end": Sample(rss_bytes=50 * MIB, open_fds=20 + FD_GROWTH_LIMIT + 1)}, "descriptors"),
    ],
)
def test_each_kind_of_trouble_fails_the_run(changes: dict[str, object], problem: str) -> None:
    problems = verdict(report(**changes), ttl=3)
    assert len(problems) == 1
    assert problem in problems[0]
