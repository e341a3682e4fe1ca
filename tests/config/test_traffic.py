"""proxy/config/traffic.py: `limits.per_connection` and `upstream`, defaults and problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, PerConnection, Upstream, parse_config
from proxy.errors import ConfigError

OAUTH = {"client_id": "client-1", "client_secret": "client-secret-value"}


def parse(**sections: Any) -> Config:
    return parse_config({"pleo": OAUTH, **sections}, base_dir=Path("/etc"), environ={"HOME": "/h"})


def problems(**sections: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(**sections)
    return [str(p) for p in info.value.problems]


def per_connection(**keys: object) -> dict[str, Any]:
    return {"limits": {"per_connection": keys}}


def test_absent_means_unlimited_and_no_retries() -> None:
    config = parse()
    assert config.limits.per_connection == PerConnection()
    assert config.limits.per_connection.unlimited
    assert config.upstream == Upstream(retries=0, retry_after_cap=10.0)
    assert parse(**per_connection()).limits.per_connection.unlimited
    assert parse(limits={"per_connection": None}, upstream=None).upstream == Upstream()


def test_per_connection_limits_are_read() -> None:
    config = parse(**per_connection(concurrency=8, rate="2.5", burst="20"))
    assert config.limits.per_connection == PerConnection(concurrency=8, rate=2.5, burst=20)
    assert config.limits.per_connection.bucket_size == 20
    assert not config.limits.per_connection.unlimited


@pytest.mark.parametrize(("rate", "size"), [(0.5, 1), (1, 1), (2.5, 3), (10, 10)])
def test_burst_defaults_to_the_rate_rounded_up(rate: float, size: int) -> None:
    assert parse(**per_connection(rate=rate)).limits.per_connection.bucket_size == size


def test_rate_may_come_from_the_environment() -> None:
    config = parse_config(
        {"pleo": OAUTH, **per_connection(rate="${RATE}")},
        base_dir=Path("/etc"),
        environ={"HOME": "/h", "RATE": "0.25"},
    )
    assert config.limits.per_connection.rate == 0.25


def test_bad_per_connection_values_name_their_key() -> None:
    bad = per_connection(concurrency=0, rate=-1, burst=2_000_000, queue=1)
    assert problems(**bad) == [
        "limits.per_connection.concurrency: must be from 1 to 100000, got 0",
        "limits.per_connection.rate: must be greater than 0 and at most 1e+06, got -1",
        "limits.per_connection.burst: must be from 1 to 1000000, got 2000000",
        "limits.per_connection.queue: unknown key; expected one of concurrency, rate, burst",
    ]
    assert problems(**per_connection(rate=0, concurrency="many")) == [
        "limits.per_connection.rate: must be greater than 0 and at most 1e+06, got 0",
        "limits.per_connection.concurrency: expected an integer, got 'many'",
    ]
    assert problems(**per_connection(rate="fast", concurrency=True)) == [
        "limits.per_connection.rate: expected requests per second like 10 or 0.5, got 'fast'",
        "limits.per_connection.concurrency: expected an integer, got True",
    ]
    assert problems(**per_connection(rate=10**400)) == [
        "limits.per_connection.rate: expected requests per second like 10 or 0.5, got "
        + repr(10**400)
    ]
    assert problems(limits={"per_connection": 5}) == [
        "limits.per_connection: expected a mapping, got 5"
    ]


def test_a_burst_needs_a_rate() -> None:
    assert problems(**per_connection(burst=5, concurrency=2)) == [
        "limits.per_connection.burst: needs limits.per_connection.rate"
    ]


def test_upstream_retries_are_read() -> None:
    config = parse(upstream={"retries": "3", "retry_after_cap": "500ms"})
    assert config.upstream == Upstream(retries=3, retry_after_cap=0.5)
    assert parse(upstream={"retry_after_cap": 0}).upstream.retry_after_cap == 0


def test_bad_upstream_values_name_their_key() -> None:
    bad = {"retries": 11, "retry_after_cap": "1h", "retires": 1}
    assert problems(upstream=bad) == [
        "upstream.retries: must be from 0 to 10, got 11",
        "upstream.retry_after_cap: must be at most 600 s, got 3600 s",
        "upstream.retires: unknown key (did you mean 'retries'?)",
    ]
    assert problems(upstream={"retries": -1, "retry_after_cap": "soon"}) == [
        "upstream.retries: must be from 0 to 10, got -1",
        "upstream.retry_after_cap: expected a duration like 90, '90s', '2m', '1h', '7d',"
        " got 'soon'",
    ]
    assert problems(upstream=[1]) == ["upstream: expected a mapping, got a list"]
