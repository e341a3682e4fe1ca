"""Tests for proxy/config/listen.py: `listen.client_keys` and `listen.tls_cert`/`tls_key`,
with the exact problem lines, and no key value in any of them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ClientKey, Config, parse_config
from proxy.errors import ConfigError
from proxy.secret import Secret

KEY = "client-key-0123456789abcdef"
OTHER = "other-key-0123456789abcdef"
OAUTH = {"client_id": "client-1", "client_secret": "client-secret-value"}
ENV = {"HOME": "/home/tester", "PROXY_KEY": OTHER}


def parse(listen: Mapping[str, Any], base_dir: Path = Path("/etc/pleo-proxy")) -> Config:
    return parse_config({"pleo": OAUTH, "listen": listen}, base_dir=base_dir, environ=ENV)


def problems(listen: Mapping[str, Any], base_dir: Path = Path("/etc/pleo-proxy")) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(listen, base_dir)
    return [str(p) for p in info.value.problems]


def test_no_keys_and_no_tls_by_default() -> None:
    listen = parse({}).listen
    assert (listen.client_keys, listen.tls_cert, listen.tls_key) == ((), None, None)
    assert listen.scheme == "http"


def test_keys_inline_from_the_environment_and_from_files(tmp_path: Path) -> None:
    (tmp_path / "acme.key").write_text(KEY.upper() + "\n")
    listen = parse(
        {
            "client_keys": [
                {"key": KEY},
                {"key": "${PROXY_KEY}", "connections": ["acme", "beta", "acme"]},
                {"key_file": "acme.key", "connections": ["acme"]},
            ]
        },
        base_dir=tmp_path,
    ).listen
    assert listen.client_keys == (
        ClientKey(Secret(KEY)),
        ClientKey(Secret(OTHER), connections=("acme", "beta")),
        ClientKey(Secret(KEY.upper()), connections=("acme",)),
    )


def test_an_empty_list_means_no_keys() -> None:
    assert parse({"client_keys": []}).listen.client_keys == ()
    assert parse({"client_keys": None}).listen.client_keys == ()


def test_misshapen_keys_are_problems_at_their_index(tmp_path: Path) -> None:
    (tmp_path / "empty.key").write_text("\n")
    found = problems(
        {
            "client_keys": [
                {"key": "short-key"},
                {"key": "has spaces in the middle of it"},
                {"key_file": "empty.key"},
                {"key": KEY, "key_file": "empty.key"},
                {"connections": ["acme"]},
                {"key": OTHER, "connections": []},
                {"key": "third-key-0123456789abcdef", "connections": ["Not Valid"]},
                {"key": KEY, "conections": ["acme"]},
            ]
        },
        base_dir=tmp_path,
    )
    empty = str(tmp_path / "empty.key")
    rule = "a client key must be at least 16 visible ASCII characters (no spaces)"
    assert found == [
        f"listen.client_keys[0].key: {rule}",
        f"listen.client_keys[1].key: {rule}",
        f"listen.client_keys[2].key_file: {empty!r} is empty",
        f"listen.client_keys[3].key_file: {empty!r} is empty",
        "listen.client_keys[5].connections: must name at least one connection;"
        " leave it out to allow every one",
        "listen.client_keys[6].connections[0]: invalid connection name 'Not Valid':"
        " 1-63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
        "listen.client_keys[7].conections: unknown key (did you mean 'connections'?)",
        "listen.client_keys[3].key_file: set either key or key_file, not both",
        "listen.client_keys[4].key: required: set key or key_file",
    ]


def test_the_same_key_twice_is_a_problem() -> None:
    assert problems({"client_keys": [{"key": KEY}, {"key": OTHER}, {"key": KEY}]}) == [
        "listen.client_keys[2]: the same key as listen.client_keys[0]"
    ]


@pytest.mark.parametrize(
    "client_keys",
    [
        KEY,  # `client_keys: ${KEY}` instead of a list
        [KEY],  # `- KEY` instead of `- key: KEY`
        [{"key": KEY[:10]}],  # too short
        [{"key": KEY + " x"}],  # a space
        [{"key": KEY + "\x00"}],  # a control byte
        [{"key": KEY, "key_file": "/no/such/file"}],
        [{"key": KEY}, {"key": KEY}],
        [{"key": 12345678901234567890}],
    ],
)
def test_a_key_value_never_appears_in_a_problem(client_keys: object) -> None:
    text = "\n".join(problems({"client_keys": client_keys}))
    assert text
    for shown in (KEY, KEY[:10], "12345678901234567890"):
        assert shown not in text


def test_items_that_are_not_mappings_are_described_by_their_kind_only() -> None:
    assert problems({"client_keys": [KEY, 5, {"key": KEY}]}) == [
        "listen.client_keys[0]: expected a mapping, got a string",
        "listen.client_keys[1]: expected a mapping, got an integer",
    ]
    assert problems({"client_keys": KEY}) == ["listen.client_keys: expected a list, got a string"]


def test_tls_files_both_or_neither(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("PEM")
    listen = parse({"tls_cert": "cert.pem", "tls_key": "key.pem"}, base_dir=tmp_path).listen
    assert (listen.tls_cert, listen.tls_key) == (tmp_path / "cert.pem", tmp_path / "key.pem")
    assert listen.scheme == "https"
    assert problems({"tls_cert": "cert.pem"}, base_dir=tmp_path) == [
        "listen.tls_key: required with listen.tls_cert: set both"
    ]
    assert problems({"tls_key": "key.pem"}, base_dir=tmp_path) == [
        "listen.tls_cert: required with listen.tls_key: set both"
    ]
    missing = str(tmp_path / "nope.pem")
    assert problems({"tls_cert": "nope.pem", "tls_key": "key.pem"}, base_dir=tmp_path) == [
        f"listen.tls_cert: no such file: {missing!r}"
    ]


def test_with_tls_the_default_redirect_uri_is_https(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("PEM")
    tls = {"tls_cert": "cert.pem", "tls_key": "key.pem", "port": 8443}
    assert parse(tls, base_dir=tmp_path).pleo.redirect_uri == (
        "https://localhost:8443/_proxy/callback"
    )
    explicit = "http://localhost:9000/_proxy/callback"
    config = parse_config(
        {"pleo": {**OAUTH, "redirect_uri": explicit}, "listen": tls},
        base_dir=tmp_path,
        environ=ENV,
    )
    assert config.pleo.redirect_uri == explicit
