"""YAML configuration → frozen dataclasses, with every problem reported as `path: message`.

Parsed once. `${ENV}` is substituted per scalar after YAML parsing; `*_file` keys read
secrets from files. Must not touch the network, create files, or log; never puts a
secret value in a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from proxy.secret import Secret

Environment = Literal["production", "staging", "sandbox"]
TokenAuthMethod = Literal["client_secret_basic", "client_secret_post"]
StoreKind = Literal["file", "redis"]

SANDBOX_DEFAULT_PORT = 8090
MIB = 1024 * 1024


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pleo:
    environment: Environment = "production"
    api_url: str = "https://external.pleo.io"
    authorize_url: str = "https://auth.pleo.io/oauth/authorize"
    token_url: str = "https://auth.pleo.io/oauth/token"
    client_id: str | None = None
    client_secret: Secret | None = None
    token_auth_method: TokenAuthMethod = "client_secret_basic"
    scopes: tuple[str, ...] = ()
    redirect_uri: str = "http://localhost:8080/_proxy/callback"
    api_key: Secret | None = None
    ca_file: Path | None = None

    @property
    def uses_api_key(self) -> bool:
        return self.api_key is not None


@dataclass(frozen=True)
class TokensConfig:
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
    before_expiry: float = 120.0
    replay_body_limit: int = 1 * MIB
    keepalive: float = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    read: float = 120.0
    token_request: float = 15.0
    shutdown: float = 30.0


@dataclass(frozen=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    pleo: Pleo = field(default_factory=Pleo)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    refresh: Refresh = field(default_factory=Refresh)
    timeouts: Timeouts = field(default_factory=Timeouts)
    log_level: str = "info"
