"""Which connection a request names: the pure rules (the HTTP behaviour is in
tests/test_connections.py, against a real proxy)."""

from __future__ import annotations

import pytest

from proxy.errors import ConnectionMismatch, ConnectionRequired, InvalidConnectionName
from proxy.http.select import Target, implied_name, named_target, split_prefix


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/c/acme/v1/x", ("acme", "/v1/x")),
        ("/c/acme/v1/x?a=1&b=%2F", ("acme", "/v1/x?a=1&b=%2F")),
        ("/c/acme", ("acme", "/")),
        ("/c/acme?x=1", ("acme", "/?x=1")),
        ("/c/acme/", ("acme", "/")),
        ("/c/a.b_c-1/v1/accounting-entries:search", ("a.b_c-1", "/v1/accounting-entries:search")),
        ("/v1/c/acme", (None, "/v1/c/acme")),
        ("/cx/acme", (None, "/cx/acme")),
    ],
)
def test_prefix_is_split_byte_exactly(raw: str, expected: tuple[str | None, str]) -> None:
    assert split_prefix(raw) == expected


@pytest.mark.parametrize("raw", ["/c//v1", "/c/Acme/v1", "/c/%61cme/v1", "/c/a%2Fb/v1", "/c/../v1"])
def test_a_prefix_with_a_bad_name_is_refused(raw: str) -> None:
    with pytest.raises(InvalidConnectionName):
        split_prefix(raw)


def test_header_prefix_and_port_must_agree() -> None:
    assert named_target("/v1/x", ["acme"], None) == Target("acme", "/v1/x")
    assert named_target("/c/acme/v1/x", ["acme"], "acme") == Target("acme", "/v1/x")
    assert named_target("/v1/x", [], "acme") == Target("acme", "/v1/x")
    assert named_target("/v1/x", [], None) == Target(None, "/v1/x")
    for raw, headers, fixed in [
        ("/c/acme/v1", ["beta"], None),
        ("/v1", ["acme", "beta"], None),
        ("/v1", ["beta"], "acme"),
        ("/c/beta/v1", [], "acme"),
    ]:
        with pytest.raises(ConnectionMismatch):
            named_target(raw, headers, fixed)


@pytest.mark.parametrize("header", ["", "ACME", "a b", "x" * 64, "acme,beta"])
def test_a_bad_header_value_is_refused(header: str) -> None:
    with pytest.raises(InvalidConnectionName):
        named_target("/v1/x", [header], None)


def test_naming_none_means_default_or_the_only_one() -> None:
    assert implied_name(["acme", "default"]) == "default"
    assert implied_name(["acme"]) == "acme"
    with pytest.raises(ConnectionRequired):
        implied_name(["acme", "beta"])
    with pytest.raises(ConnectionRequired):
        implied_name([])
