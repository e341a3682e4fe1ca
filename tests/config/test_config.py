"""Tests for proxy/config.py: the example file, every rule, and the exact problem lines."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    SANDBOX_DEFAULT_PORT,
    ClientKey,
    Config,
    Limits,
    Listen,
    PerConnection,
    Pleo,
    Refresh,
    Timeouts,
    TokensConfig,
    Upstream,
    environment_defaults,
    is_loopback_host,
    load_config,
    parse_config,
)
from proxy.errors import ConfigError, Problem
from proxy.secret import Secret

REPO = Path(__file__).resolve().parent.parent.parent
ENV = {"HOME": "/home/tester"}
OAUTH = {"client_id": "client-1", "client_secret": "client-secret-value"}


def doc(**sections: Any) -> dict[str, Any]:
    """A valid OAuth document with `sections` merged in (one level deep)."""
    out: dict[str, Any] = {"pleo": dict(OAUTH)}
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = {**out[name], **value}
        else:
            out[name] = value
    return out


def parse(
    document: object, base_dir: Path = Path("/etc/pleo-proxy"), environ: Mapping[str, str] = ENV
) -> Config:
    return parse_config(document, base_dir=base_dir, environ=environ)


def problems(
    document: object, base_dir: Path = Path("/etc/pleo-proxy"), environ: Mapping[str, str] = ENV
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(document, base_dir, environ)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


# --- the example file ---


def test_example_file_loads_with_its_variables_set() -> None:
    environ = {"PLEO_CLIENT_ID": "cid-123", "PLEO_CLIENT_SECRET": "very-secret", "HOME": "/h"}
    config = load_config(REPO / "config.example.yaml", environ=environ)
    assert config.listen == Listen("127.0.0.1", 8080, (), ())
    pleo = config.pleo
    assert pleo.environment == "production"
    assert pleo.api_url == "https://external.pleo.io"
    assert pleo.authorize_url == "https://auth.pleo.io/oauth/authorize"
    assert pleo.token_url == "https://auth.pleo.io/oauth/token"
    assert pleo.client_id == "cid-123"
    assert pleo.client_secret == Secret("very-secret")
    assert pleo.token_auth_method == "client_secret_basic"
    assert pleo.scopes == ("export-jobs:read", "users:read")
    assert pleo.redirect_uri == "http://localhost:8080/_proxy/callback"
    assert (pleo.api_key, pleo.ca_file, pleo.uses_api_key) == (None, None, False)
    assert config.tokens.store == "file"
    assert config.tokens.path == Path("/var/lib/pleo-proxy/tokens.enc")
    assert config.tokens.key_file == Path("/var/lib/pleo-proxy/tokens.key")
    assert config.tokens.redis_url == "redis://127.0.0.1:6379/0"
    assert (config.refresh.before_expiry, config.refresh.replay_body_limit) == (120, 1024 * 1024)
    assert config.refresh.keepalive == 7 * 86400
    assert dataclasses.astuple(config.timeouts) == (10, 120, 15, 30)
    assert config.log_level == "info"
    assert config.limits == Limits()
    assert config.upstream == Upstream()


def test_example_file_mentions_every_key() -> None:
    text = (REPO / "config.example.yaml").read_text()
    keys = [f.name for f in dataclasses.fields(Config)]
    keys += [
        f.name
        for cls in (
            Listen,
            ClientKey,
            Pleo,
            TokensConfig,
            Refresh,
            Timeouts,
            Limits,
            PerConnection,
            Upstream,
        )
        for f in dataclasses.fields(cls)
    ]
    keys += ["client_secret_file", "api_key_file", "key_file"]
    for key in keys:
        assert f"{key}:" in text, key


def test_example_file_without_its_variables_names_them() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "config.example.yaml", environ={})
    assert [str(p) for p in info.value.problems] == [
        "pleo.client_id: environment variable PLEO_CLIENT_ID is not set",
        "pleo.client_secret: environment variable PLEO_CLIENT_SECRET is not set",
    ]


# --- defaults ---


def test_minimal_document_gets_the_documented_defaults() -> None:
    config = parse({"pleo": OAUTH})
    assert config.listen.port == 8080
    assert config.pleo.environment == "production"
    assert config.pleo.redirect_uri == "http://localhost:8080/_proxy/callback"
    assert config.tokens.path == Path("/home/tester/.local/state/pleo-proxy/tokens.enc")
    assert config.tokens.key_file == Path("/home/tester/.local/state/pleo-proxy/tokens.key")
    assert config.refresh.replay_body_limit == 1024 * 1024
    assert config.timeouts.read == 120


def test_state_directory_from_systemd_is_the_default_token_dir() -> None:
    config = parse({"pleo": OAUTH}, environ={"STATE_DIRECTORY": "/var/lib/pleo-proxy:/other"})
    assert config.tokens.path == Path("/var/lib/pleo-proxy/tokens.enc")
    assert config.tokens.key_file == Path("/var/lib/pleo-proxy/tokens.key")
    assert config.tokens.state_dir == Path("/var/lib/pleo-proxy")


def test_key_file_defaults_beside_an_explicit_token_path(tmp_path: Path) -> None:
    config = parse(doc(tokens={"path": "state/t.enc"}), base_dir=tmp_path)
    assert config.tokens.path == tmp_path / "state/t.enc"
    assert config.tokens.key_file == tmp_path / "state/tokens.key"


def test_home_relative_paths_use_the_given_environment() -> None:
    config = parse(doc(tokens={"path": "~/x/t.enc", "key_file": "/abs/k"}))
    assert config.tokens.path == Path("/home/tester/x/t.enc")
    assert config.tokens.key_file == Path("/abs/k")


def test_empty_sections_and_empty_values_mean_defaults() -> None:
    config = parse({"pleo": OAUTH, "listen": None, "timeouts": {"read": None}})
    assert config.listen.port == 8080
    assert config.timeouts.read == 120


def test_config_is_frozen() -> None:
    config = parse({"pleo": OAUTH})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen.port = 1  # type: ignore[misc]


# --- unknown keys, types, literals ---


def test_unknown_keys_suggest_the_closest_known_key() -> None:
    assert problems(doc(tokens={"pathh": "x"}, listn={})) == [
        "tokens.pathh: unknown key (did you mean 'path'?)",
        "listn: unknown key (did you mean 'listen'?)",
    ]


def test_unknown_key_without_a_close_match_lists_the_known_ones() -> None:
    assert problems(doc(refresh={"zzz": 1})) == [
        "refresh.zzz: unknown key; expected one of before_expiry, replay_body_limit, keepalive,"
        " max_concurrent, max_per_second"
    ]


def test_wrong_types_name_the_expected_type() -> None:
    assert problems(doc(listen={"port": "abc", "host": 5, "allowed_hosts": "h"})) == [
        "listen.port: expected an integer, got 'abc'",
        "listen.host: expected a string, got 5",
        "listen.allowed_hosts: expected a list, got 'h'",
    ]


def test_a_section_that_is_not_a_mapping() -> None:
    assert problems(doc(timeouts=[1, 2])) == ["timeouts: expected a mapping, got a list"]


@pytest.mark.parametrize("key", ["client_secret", "api_key"])
def test_a_mistyped_secret_is_never_echoed(key: str) -> None:
    found = problems(doc(pleo={key: 987654321}))
    assert found == [f"pleo.{key}: expected a string"]
    assert "987654321" not in "\n".join(found)


def test_literals_are_checked_with_the_choices_listed() -> None:
    document = doc(
        pleo={"environment": "prod", "token_auth_method": "basic"},
        tokens={"store": "s3"},
        log_level="loud",
    )
    assert problems(document) == [
        "pleo.environment: unknown environment 'prod'; expected one of production, staging,"
        " sandbox",
        "pleo.token_auth_method: unknown token auth method 'basic'; expected one of"
        " client_secret_basic, client_secret_post",
        "tokens.store: unknown store 's3'; expected one of file, redis",
        "log_level: unknown log level 'loud'; expected one of debug, info, warning, error",
    ]


@pytest.mark.parametrize(("port", "ok"), [(1, True), (65535, True), (0, True), (65536, False)])
def test_port_range(port: int, ok: bool) -> None:
    document = doc(listen={"port": port}, pleo={"redirect_uri": "http://localhost:1/cb"})
    if ok:
        assert parse(document).listen.port == port
    else:
        assert problems(document) == ["listen.port: expected a port from 0 to 65535, got 65536"]


def test_port_from_an_environment_variable() -> None:
    config = parse(doc(listen={"port": "${PORT}"}), environ={"PORT": "9000"})
    assert config.listen.port == 9000
    assert config.pleo.redirect_uri == "http://localhost:9000/_proxy/callback"


# --- ${ENV} substitution ---


def test_substitution_default_and_dollar_escape() -> None:
    environ = {"ID": "abc", "EMPTY": ""}
    document = doc(
        pleo={"client_id": "${ID}-x", "scopes": ["${SCOPE:-users:read}", "$${ID}", "${EMPTY:-d}"]}
    )
    config = parse(document, environ=environ)
    assert config.pleo.client_id == "abc-x"
    assert config.pleo.scopes == ("users:read", "${ID}", "d")


def test_missing_variables_are_reported_at_their_key_and_list_index() -> None:
    document = doc(listen={"allowed_hosts": ["ok", "${NOPE}"]}, pleo={"client_id": "${CID}"})
    assert problems(document) == [
        "pleo.client_id: environment variable CID is not set",
        "listen.allowed_hosts[1]: environment variable NOPE is not set",
    ]


def test_malformed_reference_is_a_problem() -> None:
    assert problems(doc(pleo={"client_id": "${oops"})) == [
        "pleo.client_id: malformed '${' reference; expected ${NAME} or ${NAME:-default}"
    ]


def test_substitution_happens_after_parsing(tmp_path: Path) -> None:
    # A value with YAML syntax in it stays one string; a reference in a comment is inert.
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        "# ${NOT_SET} in a comment\npleo:\n  client_id: ${CID}\n  client_secret: s\n"
    )
    config = load_config(config_file, environ={"CID": "a: [b]\nc: d", "HOME": "/h"})
    assert config.pleo.client_id == "a: [b]\nc: d"


def test_scopes_as_one_space_separated_string() -> None:
    config = parse(doc(pleo={"scopes": "${S}"}), environ={"S": "a:read  b:write"})
    assert config.pleo.scopes == ("a:read", "b:write")


def test_empty_scopes_are_allowed() -> None:
    assert parse(doc(pleo={"scopes": []})).pleo.scopes == ()


# --- secrets and *_file ---


def test_client_secret_file_is_read_relative_to_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("from-file\n\n")
    pleo = {"client_id": "c", "client_secret_file": "secret.txt"}
    config = parse({"pleo": pleo}, base_dir=tmp_path)
    # Exactly one trailing newline is stripped.
    assert config.pleo.client_secret == Secret("from-file\n")
    assert isinstance(config.pleo.client_secret, Secret)


def test_secret_file_under_the_systemd_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "client_secret").write_text("cred\r\n")
    pleo = {"client_id": "c", "client_secret_file": "${CREDENTIALS_DIRECTORY}/client_secret"}
    config = parse({"pleo": pleo}, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.pleo.client_secret == Secret("cred")


def test_missing_secret_file_names_key_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert problems({"pleo": {"client_id": "c", "client_secret_file": str(missing)}}) == [
        f"pleo.client_secret_file: cannot read '{missing}': No such file or directory"
    ]


def test_empty_secret_file_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("\n")
    assert problems({"pleo": {"client_id": "c", "client_secret_file": "s"}}, tmp_path) == [
        f"pleo.client_secret_file: '{tmp_path / 's'}' is empty"
    ]


def test_secret_values_never_appear_in_any_problem(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("file-secret-7f3a\n")
    document = {
        "pleo": {
            "client_id": "c",
            "client_secret_file": "secret",
            "api_key": "inline-key-9c2e",
            "api_key_file": "secret",
            "redirect_uri": "ftp://x",
            "token_url": "http://example.com/t",
        },
        "listen": {"port": "p"},
    }
    with pytest.raises(ConfigError) as info:
        parse(document, tmp_path, environ={"X": "env-secret-1b7d"})
    text = f"{info.value}\n{info.value!r}\n{info.value.problems!r}"
    assert "pleo.api_key_file: set either api_key or api_key_file, not both" in text
    for value in ("file-secret-7f3a", "inline-key-9c2e"):
        assert value not in text


def test_both_secret_sources_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("x")
    pleo = {"client_id": "c", "client_secret": "y", "client_secret_file": "s"}
    assert problems({"pleo": pleo}, tmp_path) == [
        "pleo.client_secret_file: set either client_secret or client_secret_file, not both"
    ]


def test_oauth_mode_requires_client_id_and_secret() -> None:
    assert problems({"pleo": {"scopes": ["a"]}}) == [
        "pleo.client_id: required (or set pleo.api_key for API-key mode)",
        "pleo.client_secret: required: set client_secret or client_secret_file",
    ]
    assert problems({}) == problems({"log_level": "info"})


def test_api_key_mode_needs_no_client(tmp_path: Path) -> None:
    config = parse({"pleo": {"api_key": "k-1"}, "listen": {"port": 0}})
    assert config.pleo.uses_api_key
    assert config.pleo.api_key == Secret("k-1")
    assert config.pleo.client_id is None
    (tmp_path / "key").write_text("k-2\n")
    from_file = parse({"pleo": {"api_key_file": "key"}}, base_dir=tmp_path)
    assert from_file.pleo.api_key == Secret("k-2")


# --- durations and sizes ---


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(90, 90.0), (1.5, 1.5), ("90", 90.0), ("90s", 90.0), ("2m", 120.0), ("1h", 3600.0),
     ("7d", 604800.0), ("500ms", 0.5), ("1.5 h", 5400.0)],
)  # fmt: skip
def test_durations(given: object, seconds: float) -> None:
    assert parse(doc(timeouts={"connect": given})).timeouts.connect == seconds


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("abc", "expected a duration like 90, '90s', '2m', '1h', '7d', got 'abc'"),
        ("5y", "expected a duration like 90, '90s', '2m', '1h', '7d', got '5y'"),
        (True, "expected a duration like 90, '90s', '2m', '1h', '7d', got True"),
        (-1, "must not be negative, got -1"),
        (0, "must be greater than zero"),
        ("0s", "must be greater than zero"),
    ],
)
def test_bad_durations(given: object, message: str) -> None:
    assert problems(doc(timeouts={"read": given})) == [f"timeouts.read: {message}"]


def test_zero_is_meaningful_for_before_expiry_and_replay_limit() -> None:
    config = parse(doc(refresh={"before_expiry": 0, "replay_body_limit": 0}))
    assert (config.refresh.before_expiry, config.refresh.replay_body_limit) == (0, 0)
    assert problems(doc(refresh={"keepalive": 0})) == [
        "refresh.keepalive: must be greater than zero"
    ]


@pytest.mark.parametrize(
    ("given", "size"),
    [(4096, 4096), ("1MiB", 1048576), ("512KiB", 524288), ("2 mib", 2097152), ("1KB", 1000)],
)
def test_sizes(given: object, size: int) -> None:
    assert parse(doc(refresh={"replay_body_limit": given})).refresh.replay_body_limit == size


def test_bad_size() -> None:
    assert problems(doc(refresh={"replay_body_limit": "1 parsec"})) == [
        "refresh.replay_body_limit: expected a size like 1048576, '512KiB', '1MiB', got '1 parsec'"
    ]


# --- URLs and the loopback rule ---


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.5:9/x", "http://[::1]:8/", "http://localhost/t", "http://LOCALHOST:1",
     "https://example.com/t"],
)  # fmt: skip
def test_plain_http_is_fine_for_loopback(url: str) -> None:
    assert parse(doc(pleo={"token_url": url})).pleo.token_url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com/t", "plain http is allowed only for loopback hosts"),
        ("http://127.0.0.1.example.com/", "plain http is allowed only for loopback hosts"),
        ("ftp://localhost/", "expected an absolute http(s) URL, got 'ftp://localhost/'"),
        ("/oauth/token", "expected an absolute http(s) URL, got '/oauth/token'"),
        ("https://u:pw@host/", "must not contain a user name or password"),
        ("https://host:99999/", "invalid port in URL 'https://host:99999/'"),
        ("https://host/#frag", "must not have a fragment"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    assert problems(doc(pleo={"token_url": url})) == [f"pleo.token_url: {message}"]


def test_is_loopback_host() -> None:
    for host in ("localhost", "127.0.0.1", "127.255.0.9", "::1", "[::1]", "::ffff:127.0.0.1"):
        assert is_loopback_host(host), host
    for host in ("example.com", "10.0.0.1", "0.0.0.0", "::", "localhost.evil.com", ""):  # noqa: S104
        assert not is_loopback_host(host), host


def test_redirect_uri_may_be_external_https() -> None:
    uri = "https://proxy.example.com/_proxy/callback"
    assert parse(doc(pleo={"redirect_uri": uri})).pleo.redirect_uri == uri
    assert problems(doc(pleo={"redirect_uri": "http://proxy.example.com/cb"})) == [
        "pleo.redirect_uri: plain http is allowed only for loopback hosts"
    ]


def test_redirect_uri_is_derived_from_the_listen_port() -> None:
    config = parse(doc(listen={"port": 8123}))
    assert config.pleo.redirect_uri == "http://localhost:8123/_proxy/callback"


def test_port_zero_needs_an_explicit_redirect_uri_in_oauth_mode() -> None:
    assert problems(doc(listen={"port": 0})) == [
        "pleo.redirect_uri: required when listen.port is 0"
    ]
    explicit = doc(listen={"port": 0}, pleo={"redirect_uri": "http://localhost:5/_proxy/callback"})
    assert parse(explicit).pleo.redirect_uri == "http://localhost:5/_proxy/callback"


def test_api_url_override_loses_its_trailing_slash_and_may_not_have_a_query() -> None:
    assert parse(doc(pleo={"api_url": "https://api.example/"})).pleo.api_url == (
        "https://api.example"
    )
    assert problems(doc(pleo={"api_url": "https://api.example/?a=1"})) == [
        "pleo.api_url: must not have a query"
    ]


def test_allowed_origins_are_normalised_and_checked() -> None:
    config = parse(doc(listen={"allowed_origins": ["https://App.Example.com/", "http://h:81"]}))
    assert config.listen.allowed_origins == ("https://app.example.com", "http://h:81")
    assert problems(doc(listen={"allowed_origins": ["https://a.example/path"]})) == [
        "listen.allowed_origins[0]: expected an origin like 'https://app.example.com',"
        " got 'https://a.example/path'"
    ]


def test_allowed_hosts_reject_urls() -> None:
    config = parse(doc(listen={"allowed_hosts": ["proxy.internal", "proxy.internal:8080"]}))
    assert config.listen.allowed_hosts == ("proxy.internal", "proxy.internal:8080")
    assert problems(doc(listen={"allowed_hosts": ["http://x/"]})) == [
        "listen.allowed_hosts[0]: expected a host name, optionally with ':port', got 'http://x/'"
    ]


# --- environments ---


def test_environment_defaults() -> None:
    assert environment_defaults("production") == (
        "https://external.pleo.io",
        "https://auth.pleo.io/oauth/authorize",
        "https://auth.pleo.io/oauth/token",
    )
    assert environment_defaults("staging") == (
        "https://external.staging.pleo.io",
        "https://auth.staging.pleo.io/oauth/authorize",
        "https://auth.staging.pleo.io/oauth/token",
    )
    base = f"http://127.0.0.1:{SANDBOX_DEFAULT_PORT}"
    assert environment_defaults("sandbox") == (
        base,
        f"{base}/oauth/authorize",
        f"{base}/oauth/token",
    )
    assert environment_defaults("sandbox", sandbox_url="http://127.0.0.1:5/")[2] == (
        "http://127.0.0.1:5/oauth/token"
    )


def test_environment_selects_urls_and_overrides_win() -> None:
    staging = parse(doc(pleo={"environment": "staging"})).pleo
    assert (staging.api_url, staging.authorize_url, staging.token_url) == environment_defaults(
        "staging"
    )
    sandbox = parse(doc(pleo={"environment": "sandbox", "token_url": "http://[::1]:7/t"})).pleo
    assert sandbox.api_url == "http://127.0.0.1:8090"
    assert sandbox.token_url == "http://[::1]:7/t"


# --- store ---


def test_redis_store_requires_redis_url() -> None:
    assert problems(doc(tokens={"store": "redis"})) == [
        "tokens.redis_url: required when tokens.store is redis"
    ]
    config = parse(doc(tokens={"store": "redis", "redis_url": "redis://127.0.0.1:1/0"}))
    assert config.tokens.redis_url == "redis://127.0.0.1:1/0"
    assert problems(doc(tokens={"redis_url": "http://x"})) == [
        "tokens.redis_url: expected a redis://, rediss:// or unix:// URL"
    ]


def test_ca_file_must_exist(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert parse(doc(pleo={"ca_file": "ca.pem"}), tmp_path).pleo.ca_file == tmp_path / "ca.pem"
    assert problems(doc(pleo={"ca_file": "none.pem"}), tmp_path) == [
        f"pleo.ca_file: no such file: '{tmp_path / 'none.pem'}'"
    ]


# --- whole documents and files ---


def test_several_problems_at_once_in_document_order() -> None:
    document = {
        "timeouts": {"connect": "soon"},
        "listen": {"port": 0, "hots": "x"},
        "pleo": {"environment": "dev", "token_url": "http://auth.example/t"},
        "tokens": {"store": "redis"},
        "log_level": 3,
    }
    assert problems(document) == [
        "timeouts.connect: expected a duration like 90, '90s', '2m', '1h', '7d', got 'soon'",
        "listen.hots: unknown key (did you mean 'host'?)",
        "pleo.environment: unknown environment 'dev'; expected one of production, staging, sandbox",
        "pleo.token_url: plain http is allowed only for loopback hosts",
        "pleo.client_id: required (or set pleo.api_key for API-key mode)",
        "pleo.client_secret: required: set client_secret or client_secret_file",
        "pleo.redirect_uri: required when listen.port is 0",
        "tokens.redis_url: required when tokens.store is redis",
        "log_level: unknown log level 3; expected one of debug, info, warning, error",
    ]


def test_empty_and_non_mapping_documents() -> None:
    assert problems(None) == ["(file): the configuration is empty"]
    assert problems(["pleo"]) == [
        "(file): expected a mapping of settings at the top level, got list"
    ]
    assert problems("a-pasted-secret") == [
        "(file): expected a mapping of settings at the top level, got str"
    ]


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("# nothing here\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml", environ={})
    assert info.value.problems == [Problem("(file)", "the configuration is empty")]


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("pleo:\n  client_id: a\n  client_secret: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml", environ={})
    [problem] = info.value.problems
    assert problem.path == "(file)"
    assert problem.message.startswith("invalid YAML at line 4, column 1: ")
    assert "unclosed" not in problem.message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml", environ={})
    assert [str(p) for p in info.value.problems] == [
        f"(file): cannot read '{tmp_path / 'missing.yaml'}': No such file or directory"
    ]


def test_relative_paths_resolve_against_the_config_file_dir(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    config_file = tmp_path / "etc" / "c.yaml"
    config_file.write_text(
        "pleo: {client_id: c, client_secret: s}\ntokens: {path: ../state/t.enc}\n"
    )
    config = load_config(config_file, environ={"HOME": "/h"})
    assert config.tokens.path == tmp_path / "etc" / "../state/t.enc"
    assert config.tokens.key_file == tmp_path / "etc" / "../state/tokens.key"


def test_duplicate_keys_are_refused_with_their_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "pleo: {client_id: c, client_secret: s}\nlisten: {port: 1}\npleo: {client_id: d}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml", environ={})
    assert [str(p) for p in info.value.problems] == [
        "(file): invalid YAML at line 3, column 1: duplicate key 'pleo'"
    ]


def test_yaml_tags_that_build_objects_are_refused(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("pleo: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml", environ={})
    [problem] = info.value.problems
    assert problem.message.startswith("invalid YAML at line 1, column 7: ")


# --- limits ---


def test_limits_default_to_safe_values() -> None:
    assert parse({"pleo": OAUTH}).limits == Limits(8190, 8190, 100, 30.0)


def test_limits_accept_sizes_counts_and_durations() -> None:
    given = {"max_request_line": "16KiB", "max_header_size": 4096, "max_headers": "50"}
    config = parse(doc(limits={**given, "idle_timeout": "500ms"}))
    assert config.limits == Limits(16384, 4096, 50, 0.5)


def test_limits_out_of_range_or_mistyped_are_problems() -> None:
    bad = {
        "max_request_line": 10,
        "max_header_size": "2MiB",
        "max_headers": 0,
        "idle_timeout": 0,
        "max_body": 1,
    }
    assert problems(doc(limits=bad)) == [
        "limits.max_request_line: must be from 256 to 1048576, got 10",
        "limits.max_header_size: must be from 256 to 1048576, got 2097152",
        "limits.max_headers: must be from 1 to 10000, got 0",
        "limits.idle_timeout: must be greater than zero",
        "limits.max_body: unknown key; expected one of max_request_line, max_header_size,"
        " max_headers, idle_timeout, per_connection",
    ]
    assert problems(doc(limits={"max_headers": [1]})) == [
        "limits.max_headers: expected an integer, got a list"
    ]


def test_numbers_too_large_for_a_float_are_problems_not_crashes() -> None:
    assert problems(doc(timeouts={"read": 10**400}, limits={"max_header_size": -(10**400)})) == [
        "timeouts.read: expected a duration like 90, '90s', '2m', '1h', '7d', got " + repr(10**400),
        "limits.max_header_size: expected a size like 1048576, '512KiB', '1MiB', got "
        + repr(-(10**400)),
    ]


def test_odd_unknown_keys_are_quoted_in_the_path() -> None:
    lines = problems({"pleo": OAUTH, "": 1, 7: 2, "a b": 3, "listen": {"x.y": 1, None: 2}})
    assert [line.partition(": ")[0] for line in lines] == [
        "''",
        "7",
        "'a b'",
        "listen.'x.y'",
        "listen.None",
    ]


def test_workers_default_and_range(tmp_path: Path) -> None:
    env = {"PLEO_CLIENT_ID": "id", "PLEO_CLIENT_SECRET": "s"}
    base = {"pleo": {"client_id": "id", "client_secret": "s"}}
    assert parse_config(base, base_dir=tmp_path, environ=env).workers == 1
    assert parse_config({**base, "workers": 4}, base_dir=tmp_path, environ=env).workers == 4
    with pytest.raises(ConfigError) as caught:
        parse_config({**base, "workers": 0}, base_dir=tmp_path, environ=env)
    assert [p.path for p in caught.value.problems] == ["workers"]
