"""YAML configuration → frozen dataclasses, with every problem reported as `path: message`.

Parsed once. `${ENV}` is substituted per scalar after YAML parsing; `*_file` keys read
secrets from files. Must not touch the network, create files, or log; never puts a
secret value in a message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from proxy.config.listen import ClientKey as ClientKey, build_listen_access, listen_spec
from proxy.config.reader import Reader, Spec, valid as valid_values
from proxy.config.sections import (
    Admin as Admin,
    Connections as Connections,
    ConnectionSpec as ConnectionSpec,
    Events as Events,
    Pages as Pages,
    build_sections,
    max_concurrent_parser,
    parse_rate,
    sections_spec,
)
from proxy.config.traffic import (
    PerConnection as PerConnection,
    Upstream as Upstream,
    build_per_connection,
    build_upstream,
    per_connection_spec,
    upstream_spec,
)
from proxy.config.values import (
    MIB,
    home_dir,
    is_loopback_host as is_loopback_host,
    parse_api_url,
    parse_choice,
    parse_duration,
    parse_existing_file,
    parse_host,
    parse_integer,
    parse_list_of,
    parse_origin,
    parse_path,
    parse_port,
    parse_redis_url,
    parse_scopes,
    parse_secret,
    parse_secret_file,
    parse_size,
    parse_string,
    parse_url,
    parse_within,
)
from proxy.errors import FILE_PROBLEM_PATH, ConfigError, Problem
from proxy.secret import Secret

Environment = Literal["production", "staging", "sandbox"]
TokenAuthMethod = Literal["client_secret_basic", "client_secret_post"]
StoreKind = Literal["file", "redis"]
LogLevel = Literal["debug", "info", "warning", "error"]

SANDBOX_DEFAULT_PORT = 8090
CALLBACK_PATH = "/_proxy/callback"

# (api_url, authorize_url, token_url); the sandbox row is built from its base URL.
ENVIRONMENTS: dict[str, tuple[str, str, str]] = {
    "production": (
        "https://external.pleo.io",
        "https://auth.pleo.io/oauth/authorize",
        "https://auth.pleo.io/oauth/token",
    ),
    "staging": (
        "https://external.staging.pleo.io",
        "https://auth.staging.pleo.io/oauth/authorize",
        "https://auth.staging.pleo.io/oauth/token",
    ),
}


@dataclass(frozen=True)
class Listen:
    """Where the proxy listens, e.g. `Listen(host="127.0.0.1", port=0)` in tests."""

    host: str = "127.0.0.1"
    port: int = 8080  # 0 = an ephemeral port (then pleo.redirect_uri must be explicit)
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()  # normalised: "scheme://host[:port]", lower case
    # Required for a listener beyond loopback; when set, every request but the exempt
    # ones (proxy.http.client_keys) must present one.
    client_keys: tuple[ClientKey, ...] = ()
    tls_cert: Path | None = None  # PEM; with tls_key, the main and connection ports speak TLS
    tls_key: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"


@dataclass(frozen=True)
class Pleo:
    """The Pleo side, e.g. `Pleo(environment="sandbox", client_id="c", client_secret=s)`."""

    environment: Environment = "production"
    api_url: str = "https://external.pleo.io"  # never ends with "/"
    authorize_url: str = "https://auth.pleo.io/oauth/authorize"
    token_url: str = "https://auth.pleo.io/oauth/token"  # noqa: S105 - a URL
    client_id: str | None = None
    client_secret: Secret | None = None
    token_auth_method: TokenAuthMethod = "client_secret_basic"  # noqa: S105 - a name
    scopes: tuple[str, ...] = ()
    redirect_uri: str = "http://localhost:8080/_proxy/callback"
    api_key: Secret | None = None
    ca_file: Path | None = None

    @property
    def uses_api_key(self) -> bool:
        return self.api_key is not None


@dataclass(frozen=True)
class TokensConfig:
    """Where tokens are kept, e.g. `TokensConfig(path=tmp / "t.enc", key_file=tmp / "t.key")`."""

    store: StoreKind = "file"
    path: Path = Path("tokens.enc")
    key_file: Path = Path("tokens.key")
    redis_url: str | None = None

    @property
    def state_dir(self) -> Path:
        """Where the authorize-url file and the lock file live: beside the token file."""
        return self.path.parent


@dataclass(frozen=True)
class Refresh:
    """Refresh policy in seconds/bytes, e.g. `Refresh(before_expiry=30)`."""

    before_expiry: float = 120.0
    replay_body_limit: int = 1 * MIB
    keepalive: float = 7 * 24 * 3600.0
    max_concurrent: int = 4  # token-endpoint calls in flight at once, all connections
    max_per_second: float | None = None  # token-endpoint calls started per second, at most


@dataclass(frozen=True)
class Timeouts:
    """Timeouts in seconds, e.g. `Timeouts(connect=1, read=5)`."""

    connect: float = 10.0
    read: float = 120.0
    token_request: float = 15.0
    shutdown: float = 30.0


@dataclass(frozen=True)
class Limits:
    """What one client connection may send, e.g. `Limits(max_headers=20, idle_timeout=1)`.

    Enforced by aiohttp's HTTP parser and keep-alive timer (see proxy/limits.py).
    """

    max_request_line: int = 8190  # bytes of "METHOD target HTTP/1.1"
    max_header_size: int = 8190  # bytes of one header field, name and value together
    max_headers: int = 100
    # A complete request head must arrive within this long of the connection opening
    # or of the previous answer; also how long an idle keep-alive connection stays.
    idle_timeout: float = 30.0
    # What one Pleo connection may send on (enforced by proxy/http/fairness.py).
    per_connection: PerConnection = field(default_factory=PerConnection)


@dataclass(frozen=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    pleo: Pleo = field(default_factory=Pleo)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    refresh: Refresh = field(default_factory=Refresh)
    timeouts: Timeouts = field(default_factory=Timeouts)
    log_level: str = "info"  # one of LogLevel
    workers: int = 1  # processes serving one port (SO_REUSEPORT), sharing the token store
    limits: Limits = field(default_factory=Limits)
    connections: Connections = field(default_factory=Connections)
    admin: Admin = field(default_factory=Admin)
    events: Events = field(default_factory=Events)
    pages: Pages = field(default_factory=Pages)
    upstream: Upstream = field(default_factory=Upstream)


def environment_defaults(
    env: Environment, *, sandbox_url: str = f"http://127.0.0.1:{SANDBOX_DEFAULT_PORT}"
) -> tuple[str, str, str]:
    """(api_url, authorize_url, token_url) of a Pleo environment."""
    if env == "sandbox":
        base = sandbox_url.rstrip("/")
        return base, f"{base}/oauth/authorize", f"{base}/oauth/token"
    return ENVIRONMENTS[env]


def _spec(base_dir: Path, environ: Mapping[str, str]) -> Spec:
    path = parse_path(base_dir, environ)
    positive, non_negative = parse_duration(zero_ok=False), parse_duration(zero_ok=True)
    return {
        "listen": {
            "host": parse_host,
            "port": parse_port,
            "allowed_hosts": parse_list_of(parse_host),
            "allowed_origins": parse_list_of(parse_origin),
            **listen_spec(path),
        },
        "pleo": {
            "environment": parse_choice("environment", get_args(Environment)),
            "api_url": parse_api_url,
            "authorize_url": parse_url,
            "token_url": parse_url,
            "client_id": parse_string,
            "client_secret": parse_secret,
            "client_secret_file": parse_secret_file(path),
            "token_auth_method": parse_choice("token auth method", get_args(TokenAuthMethod)),
            "scopes": parse_scopes,
            "redirect_uri": parse_url,
            "api_key": parse_secret,
            "api_key_file": parse_secret_file(path),
            "ca_file": parse_existing_file(path),
        },
        "tokens": {
            "store": parse_choice("store", get_args(StoreKind)),
            "path": path,
            "key_file": path,
            "redis_url": parse_redis_url,
        },
        "refresh": {
            "before_expiry": non_negative,
            "replay_body_limit": parse_size,
            "keepalive": positive,
            "max_concurrent": max_concurrent_parser(),
            "max_per_second": parse_rate,
        },
        "timeouts": {k: positive for k in ("connect", "read", "token_request", "shutdown")},
        "log_level": parse_choice("log level", get_args(LogLevel)),
        "workers": parse_within(parse_integer, 1, 64),
        "limits": {
            "max_request_line": parse_within(parse_size, 256, MIB),
            "max_header_size": parse_within(parse_size, 256, MIB),
            "max_headers": parse_within(parse_integer, 1, 10_000),
            "idle_timeout": positive,
            "per_connection": per_connection_spec(),
        },
        "upstream": upstream_spec(),
        **sections_spec(path, parse_host),
    }


# --- assembly: defaults and rules that span keys ---


def _one_secret(values: dict[str, Any], key: str, reader: Reader, at: int) -> Secret | None:
    """`key` XOR `key_file` (like oauth2-proxy's SecretSource): the secret, if any."""
    file_key = f"{key}_file"
    if key in values and file_key in values:
        reader.add(f"pleo.{file_key}", f"set either {key} or {file_key}, not both", at=at)
    for name in (key, file_key):
        if isinstance(values.get(name), Secret):
            return values[name]  # type: ignore[no-any-return]
    return None


def _build_pleo(
    values: dict[str, Any], listen: Listen, reader: Reader, *, public_url: str | None
) -> Pleo:
    at = reader.ends.get("pleo", reader.seq)
    api_key = _one_secret(values, "api_key", reader, at)
    client_secret = _one_secret(values, "client_secret", reader, at)
    valid = valid_values(values)
    api_url, authorize_url, token_url = environment_defaults(valid.get("environment", "production"))
    # Pages behind a public front: Pleo sends the browser back there.
    redirect_uri = f"{public_url or f'{listen.scheme}://localhost:{listen.port}'}{CALLBACK_PATH}"
    if "api_key" not in values and "api_key_file" not in values:  # OAuth mode
        if "client_id" not in values:
            reader.add("pleo.client_id", "required (or set pleo.api_key for API-key mode)", at=at)
        if "client_secret" not in values and "client_secret_file" not in values:
            reader.add(
                "pleo.client_secret", "required: set client_secret or client_secret_file", at=at
            )
        if "redirect_uri" not in values and listen.port == 0 and public_url is None:
            reader.add("pleo.redirect_uri", "required when listen.port is 0", at=at)
    fields: dict[str, Any] = {
        "api_url": api_url,
        "authorize_url": authorize_url,
        "token_url": token_url,
    }
    fields |= {"redirect_uri": redirect_uri} | valid
    fields |= {"client_secret": client_secret, "api_key": api_key}
    fields.pop("client_secret_file", None)
    fields.pop("api_key_file", None)
    return replace(Pleo(), **fields)


def _build_tokens(values: dict[str, Any], reader: Reader) -> TokensConfig:
    valid = valid_values(values)
    state_dirs = reader.environ.get("STATE_DIRECTORY", "")
    if state_dirs:  # systemd StateDirectory=; several are ':'-separated, the first is ours
        default_path = Path(state_dirs.split(":")[0]) / "tokens.enc"
    else:
        default_path = home_dir(reader.environ) / ".local/state/pleo-proxy/tokens.enc"
    path: Path = valid.get("path", default_path)
    key_file: Path = valid.get("key_file", path.with_name("tokens.key"))
    if valid.get("store") == "redis" and "redis_url" not in values:
        at = reader.ends.get("tokens", reader.seq)
        reader.add("tokens.redis_url", "required when tokens.store is redis", at=at)
    return replace(TokensConfig(), **(valid | {"path": path, "key_file": key_file}))


def _build_listen(values: dict[str, Any], reader: Reader) -> Listen:
    fields = valid_values(values) | build_listen_access(values, reader)
    return replace(Listen(), **fields)


def _build(values: dict[str, Any], reader: Reader) -> Config:
    listen = _build_listen(values.get("listen", {}), reader)
    sections = build_sections(values, reader, main_port=listen.port)
    pleo = _build_pleo(values.get("pleo", {}), listen, reader, public_url=sections.pages.public_url)
    if pleo.uses_api_key and not sections.connections.implicit_default:
        reader.add("connections", "connections need OAuth; pleo.api_key is set")
    return Config(
        listen=listen,
        pleo=pleo,
        tokens=_build_tokens(values.get("tokens", {}), reader),
        refresh=replace(Refresh(), **valid_values(values.get("refresh", {}))),
        timeouts=replace(Timeouts(), **valid_values(values.get("timeouts", {}))),
        log_level=valid_values(values).get("log_level", "info"),
        workers=valid_values(values).get("workers", 1),
        limits=_build_limits(values.get("limits", {}), reader),
        connections=sections.connections,
        admin=sections.admin,
        events=sections.events,
        pages=sections.pages,
        upstream=build_upstream(values.get("upstream", {})),
    )


def _build_limits(values: dict[str, Any], reader: Reader) -> Limits:
    given = valid_values(values)
    per_connection = build_per_connection(given.pop("per_connection", {}), reader)
    return replace(Limits(), **given, per_connection=per_connection)


def parse_config(doc: object, *, base_dir: Path, environ: Mapping[str, str]) -> Config:
    """The config in `doc` (parsed YAML); raises ConfigError listing every problem."""
    if doc is None:
        raise ConfigError([Problem(FILE_PROBLEM_PATH, "the configuration is empty")])
    if not isinstance(doc, Mapping):
        kind = type(doc).__name__  # not the value: a pasted secret must not come back
        message = f"expected a mapping of settings at the top level, got {kind}"
        raise ConfigError([Problem(FILE_PROBLEM_PATH, message)])
    reader = Reader(environ)
    config = _build(reader.section(doc, "", _spec(base_dir, environ)), reader)
    if problems := reader.problems():
        raise ConfigError(problems)
    return config


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the YAML file at `path`; raises ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(
            [Problem(FILE_PROBLEM_PATH, f"cannot read {str(path)!r}: {reason}")]
        ) from None
    # Here, not at the top: PyYAML is only for reading files, and the refresh helper
    # (which builds its Config from a mapping) would load it for nothing.
    from proxy.config.yamldoc import parse_document

    doc = parse_document(text)
    env = os.environ if environ is None else environ
    return parse_config(doc, base_dir=path.absolute().parent, environ=env)
