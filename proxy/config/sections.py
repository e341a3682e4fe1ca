"""The config sections of a multi-customer proxy: connections, admin, events, pages.

Frozen values, their spec for the reader, and the rules that span their keys (unique
names and ports, a secret that goes with a URL). Must not touch the network or files
beyond reading `*_file` secrets (done by the value parsers), and never echoes a secret.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.config.reader import Reader, SectionList, Spec, valid
from proxy.config.traffic import parse_rate as parse_rate
from proxy.config.values import (
    parse_duration,
    parse_integer,
    parse_list_of,
    parse_origin,
    parse_port,
    parse_secret,
    parse_secret_file,
    parse_url,
    parse_within,
)
from proxy.names import DEFAULT_CONNECTION, check_name
from proxy.secret import Secret

DAY = 24 * 3600.0


@dataclass(frozen=True)
class ConnectionSpec:
    """A connection named in the config, e.g. `ConnectionSpec("acme", port=8081)`."""

    name: str
    port: int | None = None  # its own listener on listen.host: no selector needed there


@dataclass(frozen=True)
class Connections:
    """Connections of the config and the rules for connect links."""

    configured: tuple[ConnectionSpec, ...] = ()
    # False once `connections:` appears at all: then there is no implicit `default`.
    implicit_default: bool = True
    link_ttl: float = DAY
    return_to_origins: tuple[str, ...] = ()
    # Connections kept in memory at most (least recently used dropped; 0: no bound).
    cache: int = 10_000

    @property
    def names(self) -> tuple[str, ...]:
        """The connections that exist by configuration alone."""
        if self.implicit_default:
            return (DEFAULT_CONNECTION,)
        return tuple(spec.name for spec in self.configured)

    def ports(self) -> dict[int, str]:
        return {spec.port: spec.name for spec in self.configured if spec.port is not None}


@dataclass(frozen=True)
class Admin:
    """The admin API's key; the API is served only when it is set."""

    key: Secret | None = None


@dataclass(frozen=True)
class Events:
    """Where connection state changes are POSTed, signed with `webhook_secret`."""

    webhook_url: str | None = None
    webhook_secret: Secret | None = None


@dataclass(frozen=True)
class Pages:
    """A listener that serves only the authorise page and the callback."""

    host: str | None = None
    port: int | None = None
    public_url: str | None = None  # how browsers reach it, e.g. https://connect.example.com

    @property
    def separate(self) -> bool:
        return self.port is not None


@dataclass(frozen=True)
class Sections:
    connections: Connections = field(default_factory=Connections)
    admin: Admin = field(default_factory=Admin)
    events: Events = field(default_factory=Events)
    pages: Pages = field(default_factory=Pages)


def _name(value: object) -> str:
    return check_name(value)


def _public_url(value: object) -> str:
    text = parse_url(value, base_only=True).rstrip("/")
    if urlsplit(text).path:
        raise ValueError("expected an origin like 'https://connect.example.com' (no path)")
    return text


def sections_spec(path: Callable[[object], Path], parse_host: Callable[[object], str]) -> Spec:
    positive = parse_duration(zero_ok=False)
    connection: Spec = {"name": _name, "listen": {"port": parse_within(parse_port, 1, 65535)}}
    return {
        "connections": SectionList(
            connection,
            shorthand="configured",
            section={
                "link_ttl": positive,
                "return_to_origins": parse_list_of(parse_origin),
                "cache": parse_within(parse_integer, 0, 10_000_000),
            },
        ),
        "admin": {"key": parse_secret, "key_file": parse_secret_file(path)},
        "events": {
            "webhook_url": parse_url,
            "webhook_secret": parse_secret,
            "webhook_secret_file": parse_secret_file(path),
        },
        "pages": {
            "listen": {"host": parse_host, "port": parse_within(parse_port, 1, 65535)},
            "public_url": _public_url,
        },
    }


def max_concurrent_parser() -> Callable[[object], int]:
    return parse_within(parse_integer, 1, 1000)


def one_secret(
    values: Mapping[str, Any], key: str, reader: Reader, *, section: str
) -> Secret | None:
    """`key` XOR `key_file` (like oauth2-proxy's SecretSource): the secret, if any."""
    file_key = f"{key}_file"
    if key in values and file_key in values:
        at = reader.ends.get(section, reader.seq)
        reader.add(f"{section}.{file_key}", f"set either {key} or {file_key}, not both", at=at)
    for name in (key, file_key):
        if isinstance(values.get(name), Secret):
            secret: Secret = values[name]
            return secret
    return None


def build_sections(values: Mapping[str, Any], reader: Reader, *, main_port: int) -> Sections:
    pages = _build_pages(values.get("pages", {}))
    return Sections(
        connections=_build_connections(values, reader, main_port=main_port, pages=pages),
        admin=Admin(key=one_secret(values.get("admin", {}), "key", reader, section="admin")),
        events=_build_events(values.get("events", {}), reader),
        pages=pages,
    )


def _build_pages(values: Mapping[str, Any]) -> Pages:
    listen = valid(values.get("listen", {}))
    return Pages(
        host=listen.get("host"), port=listen.get("port"), public_url=valid(values).get("public_url")
    )


def _build_events(values: Mapping[str, Any], reader: Reader) -> Events:
    secret = one_secret(values, "webhook_secret", reader, section="events")
    url = valid(values).get("webhook_url")
    given = {"webhook_secret", "webhook_secret_file"} & set(values)
    if "webhook_url" in values and secret is None and not given:
        at = reader.ends.get("events", reader.seq)
        reader.add("events.webhook_secret", "required when webhook_url is set", at=at)
    return Events(webhook_url=url, webhook_secret=secret)


def _build_connections(
    values: Mapping[str, Any], reader: Reader, *, main_port: int, pages: Pages
) -> Connections:
    if "connections" not in values:
        return Connections()
    section = values["connections"]
    section = section if isinstance(section, Mapping) else {}
    items = section.get("configured", [])
    indexed = _connection_specs(items if isinstance(items, list) else [], reader)
    _check_ports(indexed, reader, taken={main_port: "listen.port", pages.port: "pages.listen.port"})
    specs = [spec for _, spec in indexed]
    rest = valid(section)
    return Connections(
        configured=tuple(specs),
        implicit_default=False,
        link_ttl=rest.get("link_ttl", DAY),
        return_to_origins=rest.get("return_to_origins", ()),
        cache=rest.get("cache", Connections.cache),
    )


def _connection_specs(items: list[Any], reader: Reader) -> list[tuple[int, ConnectionSpec]]:
    specs: list[tuple[int, ConnectionSpec]] = []
    seen: set[str] = set()
    at = reader.ends.get("connections", reader.seq)
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            continue  # the reader has reported it
        path = f"connections[{index}]"
        name = valid(item).get("name")
        if "name" not in item:
            reader.add(f"{path}.name", "required", at=at)
        if not isinstance(name, str):
            continue
        if name in seen:
            reader.add(f"{path}.name", f"duplicate connection name {name!r}", at=at)
            continue
        seen.add(name)
        port = valid(item.get("listen", {})).get("port")
        specs.append((index, ConnectionSpec(name=name, port=port)))
    return specs


def _check_ports(
    specs: list[tuple[int, ConnectionSpec]], reader: Reader, *, taken: Mapping[int | None, str]
) -> None:
    used = {port: owner for port, owner in taken.items() if port}
    at = reader.ends.get("connections", reader.seq)
    for index, spec in specs:
        if spec.port is None:
            continue
        if spec.port in used:
            reader.add(
                f"connections[{index}].listen.port",
                f"port {spec.port} is already used by {used[spec.port]}",
                at=at,
            )
        used[spec.port] = f"connection {spec.name!r}"
