"""Config of how much traffic reaches Pleo: `limits.per_connection` and `upstream`.

Frozen values, their specs for the reader and the rules that span their keys (a burst
needs a rate). `upstream` is a section of its own so more upstream settings can join it.
Must not touch the network or files, and must not enforce anything (proxy.http does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.config.reader import Reader, Spec, valid
from proxy.config.values import Parser, describe, parse_duration, parse_integer, parse_within

MAX_RATE = 1_000_000.0  # requests per second: past this a limit limits nothing
MAX_RETRY_AFTER_CAP = 600.0  # seconds: a client held longer has given up on us


@dataclass(frozen=True)
class PerConnection:
    """Limits on one connection's traffic, e.g. `PerConnection(concurrency=4, rate=10)`.

    None everywhere (the default) means unlimited. Over a limit: 429 `rate_limited`.
    """

    concurrency: int | None = None  # requests in flight at once (held until answered)
    rate: float | None = None  # requests per second, refilling the token bucket
    burst: int | None = None  # the bucket's size; default: the rate rounded up, at least 1

    @property
    def bucket_size(self) -> int:
        """How many requests may arrive at once after an idle spell."""
        if self.burst is not None:
            return self.burst
        return max(1, math.ceil(self.rate or 1))

    @property
    def unlimited(self) -> bool:
        return self.concurrency is None and self.rate is None


@dataclass(frozen=True)
class Upstream:
    """How requests to the Pleo API are sent, e.g. `Upstream(retries=2)`."""

    retries: int = 0  # extra attempts for idempotent requests; 0: never retried
    retry_after_cap: float = 10.0  # the longest wait before one retry, Retry-After included
    # Connections to the Pleo API at once (0: no bound); a request waits for one at most
    # `queue_timeout`, then gets 503 upstream_busy.
    max_connections: int = 1000
    queue_timeout: float = 10.0


_NUMBER = re.compile(r"\s*[+]?(\d+(\.\d*)?|\.\d+)\s*")


def parse_rate(value: object) -> float:
    """Requests per second: a positive number (numeric strings too, for `${RATE}`)."""
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value) if abs(value) < 1e308 else math.inf
    elif isinstance(value, str) and _NUMBER.fullmatch(value):
        number = float(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"expected requests per second like 10 or 0.5, got {describe(value)}")
    if not 0 < number <= MAX_RATE:
        raise ValueError(f"must be greater than 0 and at most {MAX_RATE:g}, got {number:g}")
    return number


def _parse_cap(value: object) -> float:
    seconds: float = parse_duration(zero_ok=True)(value)
    if seconds > MAX_RETRY_AFTER_CAP:
        raise ValueError(f"must be at most {MAX_RETRY_AFTER_CAP:g} s, got {seconds:g} s")
    return seconds


def per_connection_spec() -> Spec:
    """The keys of `limits.per_connection`."""
    concurrency: Parser = parse_within(parse_integer, 1, 100_000)
    burst: Parser = parse_within(parse_integer, 1, 1_000_000)
    return {"concurrency": concurrency, "rate": parse_rate, "burst": burst}


def upstream_spec() -> Spec:
    """The keys of the `upstream` section."""
    return {
        "retries": parse_within(parse_integer, 0, 10),
        "retry_after_cap": _parse_cap,
        "max_connections": parse_within(parse_integer, 0, 1_000_000),
        "queue_timeout": parse_duration(zero_ok=False),
    }


def build_per_connection(values: Mapping[str, Any], reader: Reader) -> PerConnection:
    given = valid(values)
    if "burst" in values and "rate" not in values:
        at = reader.ends.get("limits.per_connection", reader.seq)
        reader.add("limits.per_connection.burst", "needs limits.per_connection.rate", at=at)
    return PerConnection(**given)


def build_upstream(values: Mapping[str, Any]) -> Upstream:
    return Upstream(**valid(values))
